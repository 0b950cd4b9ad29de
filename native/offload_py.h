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

/* tun_write's core (io.c): bufs[0..n) to the TUN fd, coalesced when vnet and n > 1, the GIL
 * released around the writes. 0 (writes and failed set), or -1 with MemoryError. */
int fp_tun_write_bufs(int fd, const fp_buf *bufs, size_t n, int vnet, int udp,
                      Py_ssize_t *writes, Py_ssize_t *failed);

#endif
