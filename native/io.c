/* Batched TUN system calls: the twin of agent/node/tun_batch.py.
 *
 *   tun_read(fd, max_reads, vnet_hdr)
 *       -> (packets, runs, reads, not_ip, malformed, error)
 *   tun_write(fd, packets, vnet_hdr, udp) -> (writes, failed)
 *
 * The fd is non-blocking: EAGAIN ends a read batch, a write that would block fails (the packet
 * is dropped, as os.writev's BlockingIOError is); EINTR is retried. Segmentation, checksums and
 * coalescing are offload.c's core; writes go out with writev straight from the callers'
 * buffers, the merged headers built on the stack.
 */
#include "offload_py.h" /* Python.h first, as CPython asks */

#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

PyObject *fp_os_error(int err) {
    return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
}

fp_read_status fp_tun_read_one(int fd, uint8_t *buf, int vnet, fp_segment_plan *plan,
                               const uint8_t **dst, size_t *dlen) {
    ssize_t got;
    do {
        got = read(fd, buf, FP_READ_SIZE);
    } while (got < 0 && errno == EINTR);
    if (got < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? FP_READ_EMPTY : FP_READ_ERROR;
    if (got == 0) return FP_READ_EMPTY;
    fp_vnet_hdr h = {0};
    const uint8_t *pkt = buf;
    size_t n = (size_t)got;
    if (vnet) {
        if (n < FP_VNET_HDR_LEN) return FP_READ_NOT_IP; /* no room for an IP packet */
        fp_vnet_parse(buf, &h);
        pkt += FP_VNET_HDR_LEN;
        n -= FP_VNET_HDR_LEN;
    }
    int version = n ? pkt[0] >> 4 : 0;
    if (version == 4 && n >= 20) {
        *dst = pkt + 16;
        *dlen = 4;
    } else if (version == 6 && n >= 40) {
        *dst = pkt + 24;
        *dlen = 16;
    } else {
        return FP_READ_NOT_IP;
    }
    return fp_segment_plan_make(&h, pkt, n, plan) == FP_OK ? FP_READ_PACKET : FP_READ_MALFORMED;
}

int fp_reader_next(fp_reader *r, fp_segment_plan *plan, const uint8_t **dst, size_t *dlen) {
    for (;;) {
        fp_read_status st = fp_tun_read_one(r->fd, r->buf, r->vnet, plan, dst, dlen);
        if (st == FP_READ_EMPTY) return 0;
        if (st == FP_READ_ERROR) return (r->error = fp_os_error(errno)) ? 0 : -1;
        r->reads++;
        if (st == FP_READ_PACKET) return 1;
        if (st == FP_READ_NOT_IP) r->not_ip++;
        else r->malformed++;
        if (r->reads >= r->max_reads) return 0;
    }
}

/* Appends (dst, count) to runs; 0 or -1 with an exception. */
static int add_run(PyObject *runs, const uint8_t *dst, size_t dlen, Py_ssize_t count) {
    PyObject *run = Py_BuildValue("(y#n)", (const char *)dst, (Py_ssize_t)dlen, count);
    if (!run) return -1;
    int rc = PyList_Append(runs, run);
    Py_DECREF(run);
    return rc;
}

int fp_runs_add(fp_runs *s, const fp_segment_plan *plan, const uint8_t *dst, size_t dlen) {
    if (fp_append_segments(s->packets, plan) < 0) return -1;
    if (s->run_count && dlen == s->run_dlen && memcmp(dst, s->run_dst, dlen) == 0) {
        s->run_count += (Py_ssize_t)plan->count;
        return 0;
    }
    if (s->run_count && add_run(s->runs, s->run_dst, s->run_dlen, s->run_count) < 0) return -1;
    memcpy(s->run_dst, dst, dlen);
    s->run_dlen = dlen;
    s->run_count = (Py_ssize_t)plan->count;
    return 0;
}

int fp_runs_finish(fp_runs *s) {
    if (s->run_count && add_run(s->runs, s->run_dst, s->run_dlen, s->run_count) < 0) return -1;
    s->run_count = 0;
    return 0;
}

PyObject *fp_tun_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "tun_read(fd, max_reads, vnet_hdr) takes 3 arguments");
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0) return NULL;
    Py_ssize_t max_reads = PyLong_AsSsize_t(args[1]);
    if (max_reads == -1 && PyErr_Occurred()) return NULL;
    int vnet = PyObject_IsTrue(args[2]);
    if (vnet < 0) return NULL;

    fp_reader rd = {fd, vnet, max_reads, PyMem_Malloc(FP_READ_SIZE), 0, 0, 0, NULL};
    if (!rd.buf) return PyErr_NoMemory();
    fp_runs rs = {PyList_New(0), PyList_New(0), 0, {0}, 0};
    PyObject *result = NULL;
    if (!rs.packets || !rs.runs) goto done;
    while (rd.reads < max_reads) {
        fp_segment_plan plan;
        const uint8_t *dst = NULL;
        size_t dlen = 0;
        int got = fp_reader_next(&rd, &plan, &dst, &dlen);
        if (got < 0) goto done;
        if (!got) break;
        if (fp_runs_add(&rs, &plan, dst, dlen) < 0) goto done;
    }
    if (fp_runs_finish(&rs) < 0) goto done;
    result = Py_BuildValue("(OOnnnO)", rs.packets, rs.runs, rd.reads, rd.not_ip, rd.malformed,
                           rd.error ? rd.error : Py_None);
done:
    PyMem_Free(rd.buf);
    Py_XDECREF(rs.packets);
    Py_XDECREF(rs.runs);
    Py_XDECREF(rd.error);
    return result;
}

/* One writev, EINTR retried; 0, or -1 when it failed (would block, or refused). A TUN takes
 * or refuses a packet whole, so a short count is not looked at (as os.writev's callers). */
static int write_iov(int fd, const struct iovec *iov, int cnt) {
    ssize_t put;
    do {
        put = writev(fd, iov, cnt);
    } while (put < 0 && errno == EINTR);
    return put < 0 ? -1 : 0;
}

/* One write, EINTR retried. Not a writev: an empty writev returns 0 without reaching the
 * device, where write hands the device the empty packet (a TUN refuses it). */
static int write_one(int fd, const uint8_t *p, size_t n) {
    ssize_t put;
    do {
        put = write(fd, p, n);
    } while (put < 0 && errno == EINTR);
    return put < 0 ? -1 : 0;
}

int fp_tun_write_bufs(int fd, const fp_buf *bufs, size_t n, int vnet, int udp,
                      Py_ssize_t *writes_out, Py_ssize_t *failed_out) {
    static const uint8_t zero_hdr[FP_VNET_HDR_LEN];
    Py_ssize_t writes = 0, failed = 0;
    if (vnet && n > 1) {
        fp_coalesce_plan plan;
        void *mem = PyMem_Malloc(fp_coalesce_size(n) + 1);
        if (!mem) {
            PyErr_NoMemory();
            return -1;
        }
        fp_coalesce(bufs, n, udp, mem, &plan);
        uint8_t head[FP_MAX_ITEM_HEAD];
        struct iovec iov[FP_MAX_TCP_SEGMENTS + 1];
        Py_BEGIN_ALLOW_THREADS
        for (size_t k = 0; k < plan.nitems; k++) {
            const fp_item *item = &plan.items[k];
            iov[0].iov_base = head;
            iov[0].iov_len = fp_item_head(&plan, bufs, item, head);
            int cnt = 1;
            if (fp_item_single(item)) {
                iov[1].iov_base = (void *)bufs[item->first].p;
                iov[1].iov_len = item->raw_len;
                cnt = 2;
            } else {
                for (uint32_t j = item->first; j != FP_NONE; j = plan.next[j], cnt++) {
                    iov[cnt].iov_base = (void *)(bufs[j].p + plan.off[j]);
                    iov[cnt].iov_len = plan.plen[j];
                }
            }
            if (write_iov(fd, iov, cnt) < 0) failed += (Py_ssize_t)item->count;
        }
        Py_END_ALLOW_THREADS
        writes = (Py_ssize_t)plan.nitems;
        PyMem_Free(mem);
    } else {
        Py_BEGIN_ALLOW_THREADS
        for (size_t i = 0; i < n; i++) {
            struct iovec iov[2] = {
                {(void *)zero_hdr, FP_VNET_HDR_LEN},
                {(void *)bufs[i].p, bufs[i].n},
            };
            if (vnet ? write_iov(fd, iov, 2) < 0 : write_one(fd, bufs[i].p, bufs[i].n) < 0)
                failed++;
        }
        Py_END_ALLOW_THREADS
        writes = (Py_ssize_t)n;
    }
    *writes_out = writes;
    *failed_out = failed;
    return 0;
}

PyObject *fp_tun_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "tun_write(fd, packets, vnet_hdr, udp) takes 4 arguments");
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0) return NULL;
    int vnet = PyObject_IsTrue(args[2]);
    if (vnet < 0) return NULL;
    int udp = PyObject_IsTrue(args[3]);
    if (udp < 0) return NULL;
    fp_pkts pk;
    if (fp_pkts_get(args[1], &pk) < 0) return NULL;
    Py_ssize_t writes = 0, failed = 0;
    int rc = fp_tun_write_bufs(fd, pk.bufs, pk.n, vnet, udp, &writes, &failed);
    fp_pkts_release(&pk);
    if (rc < 0) return NULL;
    return Py_BuildValue("(nn)", writes, failed);
}

PyMethodDef fp_io_methods[] = {
    {"tun_read", (PyCFunction)(void (*)(void))fp_tun_read, METH_FASTCALL,
     "tun_read(fd, max_reads, vnet_hdr) -> (packets, runs, reads, not_ip, malformed, error): "
     "agent.node.tun_batch.tun_read."},
    {"tun_write", (PyCFunction)(void (*)(void))fp_tun_write, METH_FASTCALL,
     "tun_write(fd, packets, vnet_hdr, udp) -> (writes, failed): "
     "agent.node.tun_batch.tun_write."},
    {NULL, NULL, 0, NULL},
};

int fp_io_init(PyObject *module) {
    (void)module;
    return 0;
}
