/* The CPython side of offload.c that io.c shares: MalformedPacket, segments into a list, and a
 * sequence of buffers held as plain (pointer, length) pairs. */
#ifndef AGENT_OFFLOAD_PY_H
#define AGENT_OFFLOAD_PY_H

#include "fastpath.h"
#include "offload.h"

extern PyObject *fp_malformed; /* agent.proto.errors.MalformedPacket, set by fp_offload_init */

/* Raises MalformedPacket with the Python reference's message. */
void fp_raise_malformed(fp_err err, const fp_vnet_hdr *h);

/* Appends the plan's packets to `list` as new bytes objects; 0, or -1 with an exception. */
int fp_append_segments(PyObject *list, const fp_segment_plan *plan);

/* A sequence of buffers (bytes read in place, other objects through the buffer protocol),
 * held by a tuple of its items until fp_pkts_release. */
typedef struct {
    PyObject *seq;
    fp_buf *bufs;
    Py_buffer *views;
    size_t n, nviews;
} fp_pkts;

int fp_pkts_get(PyObject *obj, fp_pkts *pk); /* 0, or -1 with an exception (nothing held) */
void fp_pkts_release(fp_pkts *pk);

/* fp_coalesce over held packets; returns the plan's memory (PyMem_Free it), NULL with an
 * exception. */
void *fp_coalesce_pkts(const fp_pkts *pk, int udp, fp_coalesce_plan *plan);

/* A read holds at most one 64 KB IP packet plus the vnet header (tun.py's READ_SIZE). */
#define FP_READ_SIZE (0xFFFF + FP_VNET_HDR_LEN)

/* tun_read's core (io.c): one read of a non-blocking TUN fd into buf (FP_READ_SIZE bytes). */
typedef enum {
    FP_READ_PACKET,    /* an IP packet: *plan segments it, dst[0..dlen) is its destination */
    FP_READ_NOT_IP,    /* read, but not IPv4/IPv6 of at least a header's length */
    FP_READ_MALFORMED, /* read, but segmentation refuses it */
    FP_READ_EMPTY,     /* nothing to read (EAGAIN, or a read of 0) */
    FP_READ_ERROR,     /* another error, in errno */
} fp_read_status;
fp_read_status fp_tun_read_one(int fd, uint8_t *buf, int vnet, fp_segment_plan *plan,
                               const uint8_t **dst, size_t *dlen);
PyObject *fp_os_error(int err); /* OSError(err, strerror(err)) */

/* Up to max_reads reads of a TUN batch, counted: reads, those not IP, those segmentation
 * refused, and the OSError other than EAGAIN that ended the batch (a new reference, or NULL). */
typedef struct {
    int fd, vnet;
    Py_ssize_t max_reads;
    uint8_t *buf; /* FP_READ_SIZE bytes */
    Py_ssize_t reads, not_ip, malformed;
    PyObject *error;
} fp_reader;
/* The batch's next IP packet: 1 (plan, dst, dlen set), 0 when the batch ends (nothing more to
 * read, max_reads reached, or an error kept in r->error), -1 with an exception. */
int fp_reader_next(fp_reader *r, fp_segment_plan *plan, const uint8_t **dst, size_t *dlen);

/* tun_read's result being built: segments as bytes, grouped in runs of one destination. */
typedef struct {
    PyObject *packets, *runs;
    Py_ssize_t run_count;
    uint8_t run_dst[16];
    size_t run_dlen;
} fp_runs;
int fp_runs_add(fp_runs *s, const fp_segment_plan *plan, const uint8_t *dst, size_t dlen);
int fp_runs_finish(fp_runs *s); /* the last run into `runs`; 0, or -1 with an exception */

/* tun_write's core (io.c): bufs[0..n) to the TUN fd, coalesced when vnet and n > 1, the GIL
 * released around the writes. 0 (writes and failed set), or -1 with MemoryError. */
int fp_tun_write_bufs(int fd, const fp_buf *bufs, size_t n, int vnet, int udp,
                      Py_ssize_t *writes, Py_ssize_t *failed);

#endif
