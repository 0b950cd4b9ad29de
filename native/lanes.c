/* Lanes: a known peer's packets in one call each way. The twin of agent/node/lanes.py.
 *
 *   Sealer(aead, remote_index)   a session's sending half: the key and the one send counter
 *                                (`counter`, read and written by its Keypair); seal(packets)
 *                                numbers them from `counter` and moves it on
 *   Lane()                       one peer's armed paths, set by Python (agent/node/lanes.py):
 *       arm_tx(sealer, sockaddr, limit, deadline)   seal with `sealer`, send to `sockaddr`,
 *                                                   while counter + n <= limit, now < deadline
 *       arm_rx(aead, replay, index, sockaddr, deadline)
 *                                                   open messages for receiver `index` that
 *                                                   come from `sockaddr`, while now < deadline
 *       disarm_tx(), disarm_rx(); take() -> the counters since the last take, zeroed
 *
 *   fast_tx(tun_fd, max_reads, vnet_hdr, routes, udp_fd, gso, now, tcp_only)
 *       -> (packets, runs, reads, not_ip, malformed, error, lanes, dropped, errors, errno, gso)
 *   fast_rx(udp_fd, max_datagrams, lanes, routes, tun_fd, vnet_hdr, uso, now, filter, answer)
 *       -> (slow, lanes, receives, checks, authentication, replay, not_ip, malformed,
 *           writes, failed, answered)
 *
 * fast_tx reads the TUN as tun_read does; a read whose destination `routes` (the device's
 * route cache: address -> peer) maps to a peer whose `lane` is armed, with room under its
 * limits for all the read's segments, is segmented and sealed straight into one buffer, and
 * the buffer goes out by udp_send's core, one batch per run of one lane: no Python and no
 * object per packet. The other reads come back as tun_read's batch, for the Python path.
 * fast_rx receives (GRO) until EAGAIN or max_datagrams; a transport message whose receiver
 * `lanes` (index -> Lane) maps to an armed lane, from that lane's address, is opened there
 * into one buffer, and the TUN is written from it (tun_write's core) when `routes` maps the
 * packet's source address to the same lane, else the packet goes to `checks` as (lane,
 * packet) for Python to judge. With a packet filter, `filter` is its cache of decisions
 * (agent/policy/filter.py, `PacketFilter.fast_view`): (tables by protocol for IPv4, for
 * IPv6, ACCEPT, SYN_DENIED), each table keyed by the packet's addresses and ports; a packet
 * passes here only where the filter's own batch would pass it on the cached path (ACCEPT, or
 * SYN_DENIED and not a SYN), else it goes to `checks` too. Every other datagram comes back in
 * `slow` as (datagrams, raw source address), one entry per receive, for the Python path.
 * `answer`, None or (max_reads, gso, tcp_only): when packets went to the TUN, fast_tx runs
 * right after (what they provoked, an echo reply or an ACK, is queued before the write
 * returns) and its result is `answered`; else `answered` is None.
 * `lanes` in a result lists the lanes used by the call, once each; their counters say what
 * they did. In the daemon, pump.c's thread makes both calls (lanes.h).
 */
#include "offload_py.h" /* Python.h first, as CPython asks */
#include "lanes.h"
#include "transport.h"

#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#define RECV_SIZE 65535

fp_replay *fp_replay_of(PyObject *replay); /* crypto.c: a ReplayWindow's window */

static PyObject *str_lane; /* interned "lane" */

/* ------------------------------------------------------------------ Sealer */

typedef struct {
    PyObject_HEAD
    PyObject *aead;
    uint32_t remote_index;
    uint64_t counter;
} SealerObject;

static void sealer_dealloc(SealerObject *self) {
    Py_XDECREF(self->aead);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int sealer_init(SealerObject *self, PyObject *args, PyObject *kwds) {
    PyObject *aead;
    unsigned long index;
    static char *kwlist[] = {"aead", "remote_index", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Ok:Sealer", kwlist, &aead, &index)) return -1;
    if (!fp_is_aead(aead)) {
        PyErr_SetString(PyExc_TypeError, "Sealer(aead: Aead, remote_index)");
        return -1;
    }
    if (index > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "remote_index is 32 bits");
        return -1;
    }
    Py_INCREF(aead);
    Py_XSETREF(self->aead, aead);
    self->remote_index = (uint32_t)index;
    self->counter = 0;
    return 0;
}

/* seal() with this sealer's key, index and counter; the counter moves on by len(packets). */
static PyObject *sealer_seal(SealerObject *self, PyObject *packets) {
    PyObject *index = PyLong_FromUnsignedLong(self->remote_index);
    PyObject *ctr = PyLong_FromUnsignedLongLong(self->counter);
    PyObject *out = NULL;
    if (index && ctr) {
        PyObject *args[4] = {self->aead, index, ctr, packets};
        out = fp_seal(NULL, args, 4);
    }
    Py_XDECREF(index);
    Py_XDECREF(ctr);
    if (out) self->counter += (uint64_t)PyList_GET_SIZE(out);
    return out;
}

static PyObject *sealer_get_counter(SealerObject *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->counter);
}

static int sealer_set_counter(SealerObject *self, PyObject *value, void *closure) {
    (void)closure;
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "counter cannot be deleted");
        return -1;
    }
    unsigned long long c = PyLong_AsUnsignedLongLong(value);
    if (c == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    self->counter = c;
    return 0;
}

static PyObject *sealer_get_index(SealerObject *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLong(self->remote_index);
}

static PyObject *sealer_get_aead(SealerObject *self, void *closure) {
    (void)closure;
    return Py_NewRef(self->aead);
}

static PyMethodDef sealer_methods[] = {
    {"seal", (PyCFunction)sealer_seal, METH_O,
     "seal(packets) -> transport datagrams numbered from counter; counter moves on"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sealer_getset[] = {
    {"counter", (getter)sealer_get_counter, (setter)sealer_set_counter, "next send counter", NULL},
    {"remote_index", (getter)sealer_get_index, NULL, "the peer's receiver index", NULL},
    {"aead", (getter)sealer_get_aead, NULL, "the sending key", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SealerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._fastpath.Sealer",
    .tp_doc = "A session's sending key and its one send counter.",
    .tp_basicsize = sizeof(SealerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sealer_init,
    .tp_dealloc = (destructor)sealer_dealloc,
    .tp_methods = sealer_methods,
    .tp_getset = sealer_getset,
};

/* ------------------------------------------------------------------ Lane */

typedef struct {
    PyObject_HEAD
    /* sending; sealer NULL = disarmed */
    SealerObject *sealer;
    PyObject *sockaddr; /* bytes for udp_send */
    uint64_t tx_limit;
    double tx_deadline;
    /* receiving; aead NULL = disarmed */
    PyObject *rx_aead, *rx_replay;
    uint32_t rx_index;
    struct sockaddr_storage rx_src;
    socklen_t rx_srclen;
    double rx_deadline;
    /* since the last take() */
    long long tx_packets, tx_bytes, tx_datagrams, tx_wire, tx_failed;
    long long rx_datagrams, rx_wire, rx_packets, rx_bytes;
    int rx_data, used;
} LaneObject;

static PyTypeObject LaneType;

static void lane_clear_tx(LaneObject *self) {
    Py_CLEAR(self->sealer);
    Py_CLEAR(self->sockaddr);
}

static void lane_clear_rx(LaneObject *self) {
    Py_CLEAR(self->rx_aead);
    Py_CLEAR(self->rx_replay);
}

static void lane_dealloc(LaneObject *self) {
    lane_clear_tx(self);
    lane_clear_rx(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int sockaddr_len_ok(Py_ssize_t n) {
    return n == (Py_ssize_t)sizeof(struct sockaddr_in) || n == (Py_ssize_t)sizeof(struct sockaddr_in6);
}

static PyObject *lane_arm_tx(LaneObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyObject_TypeCheck(args[0], &SealerType) || !PyBytes_Check(args[1]) ||
        !sockaddr_len_ok(PyBytes_GET_SIZE(args[1]))) {
        PyErr_SetString(PyExc_TypeError,
                        "arm_tx(sealer: Sealer, sockaddr: bytes from sockaddr(), limit, deadline)");
        return NULL;
    }
    unsigned long long limit = PyLong_AsUnsignedLongLong(args[2]);
    if (limit == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    double deadline = PyFloat_AsDouble(args[3]);
    if (deadline == -1.0 && PyErr_Occurred()) return NULL;
    lane_clear_tx(self);
    self->sealer = (SealerObject *)Py_NewRef(args[0]);
    self->sockaddr = Py_NewRef(args[1]);
    self->tx_limit = limit;
    self->tx_deadline = deadline;
    Py_RETURN_NONE;
}

static PyObject *lane_arm_rx(LaneObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !fp_is_aead(args[0]) || !fp_is_replay(args[1]) || !PyBytes_Check(args[3]) ||
        !sockaddr_len_ok(PyBytes_GET_SIZE(args[3]))) {
        PyErr_SetString(PyExc_TypeError,
                        "arm_rx(aead: Aead, replay: ReplayWindow, index, sockaddr: bytes, deadline)");
        return NULL;
    }
    unsigned long index = PyLong_AsUnsignedLong(args[2]);
    if (index == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (index > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "index is 32 bits");
        return NULL;
    }
    double deadline = PyFloat_AsDouble(args[4]);
    if (deadline == -1.0 && PyErr_Occurred()) return NULL;
    lane_clear_rx(self);
    self->rx_aead = Py_NewRef(args[0]);
    self->rx_replay = Py_NewRef(args[1]);
    self->rx_index = (uint32_t)index;
    memset(&self->rx_src, 0, sizeof(self->rx_src));
    self->rx_srclen = (socklen_t)PyBytes_GET_SIZE(args[3]);
    memcpy(&self->rx_src, PyBytes_AS_STRING(args[3]), (size_t)self->rx_srclen);
    self->rx_deadline = deadline;
    Py_RETURN_NONE;
}

static PyObject *lane_disarm_tx(LaneObject *self, PyObject *unused) {
    (void)unused;
    lane_clear_tx(self);
    Py_RETURN_NONE;
}

static PyObject *lane_disarm_rx(LaneObject *self, PyObject *unused) {
    (void)unused;
    lane_clear_rx(self);
    Py_RETURN_NONE;
}

static PyObject *lane_take(LaneObject *self, PyObject *unused) {
    (void)unused;
    PyObject *t = Py_BuildValue("(LLLLLLLLLO)", self->tx_packets, self->tx_bytes,
                                self->tx_datagrams, self->tx_wire, self->tx_failed,
                                self->rx_datagrams, self->rx_wire, self->rx_packets,
                                self->rx_bytes, self->rx_data ? Py_True : Py_False);
    if (!t) return NULL;
    self->tx_packets = self->tx_bytes = self->tx_datagrams = self->tx_wire = self->tx_failed = 0;
    self->rx_datagrams = self->rx_wire = self->rx_packets = self->rx_bytes = 0;
    self->rx_data = self->used = 0;
    return t;
}

static PyObject *lane_tx_armed(LaneObject *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->sealer != NULL);
}

static PyObject *lane_rx_armed(LaneObject *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->rx_aead != NULL);
}

static PyObject *lane_rx_index(LaneObject *self, void *closure) {
    (void)closure;
    if (!self->rx_aead) Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(self->rx_index);
}

static PyMethodDef lane_methods[] = {
    {"arm_tx", (PyCFunction)(void (*)(void))lane_arm_tx, METH_FASTCALL,
     "arm_tx(sealer, sockaddr, limit, deadline)"},
    {"arm_rx", (PyCFunction)(void (*)(void))lane_arm_rx, METH_FASTCALL,
     "arm_rx(aead, replay, index, sockaddr, deadline)"},
    {"disarm_tx", (PyCFunction)lane_disarm_tx, METH_NOARGS, "stop sending here"},
    {"disarm_rx", (PyCFunction)lane_disarm_rx, METH_NOARGS, "stop receiving here"},
    {"take", (PyCFunction)lane_take, METH_NOARGS,
     "take() -> (tx_packets, tx_bytes, tx_datagrams, tx_wire_bytes, tx_failed, rx_datagrams, "
     "rx_wire_bytes, rx_packets, rx_bytes, rx_data), counted since the last take"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef lane_getset[] = {
    {"tx_armed", (getter)lane_tx_armed, NULL, "sending armed", NULL},
    {"rx_armed", (getter)lane_rx_armed, NULL, "receiving armed", NULL},
    {"rx_index", (getter)lane_rx_index, NULL, "the receiver index armed, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._fastpath.Lane",
    .tp_doc = "One peer's armed send and receive paths (agent/node/lanes.py arms them).",
    .tp_basicsize = sizeof(LaneObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_methods = lane_methods,
    .tp_getset = lane_getset,
};

/* The lane of the peer `routes` maps `addr` to, armed or not (borrowed from the peer; NULL if
 * none).
 * Never raises: a missing or odd entry is no lane. */
static LaneObject *lane_of(PyObject *routes, PyObject *addr) {
    PyObject *peer = PyDict_GetItemWithError(routes, addr);
    if (!peer || peer == Py_None) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *lane = PyObject_GetAttr(peer, str_lane);
    if (!lane) {
        PyErr_Clear();
        return NULL;
    }
    Py_DECREF(lane); /* the peer keeps it */
    return PyObject_TypeCheck(lane, &LaneType) ? (LaneObject *)lane : NULL;
}

static int note_used(PyObject *used, LaneObject *lane) {
    if (lane->used) return 0;
    lane->used = 1;
    return PyList_Append(used, (PyObject *)lane);
}

/* ------------------------------------------------------------------ buffers */

/* Packets sealed or opened by one call, back to back in one growing buffer (offsets, since
 * the buffer moves when it grows), sent or written from there without an object each. */
typedef struct {
    size_t off, len;
    LaneObject *lane; /* whose packet it is (borrowed: the call's `used` list holds it) */
} span;

typedef struct {
    uint8_t *mem;
    size_t cap, used;
    span *spans;
    size_t nspans, spcap;
} arena;

/* Room for n more bytes at a->mem + a->used; NULL with MemoryError. */
static uint8_t *arena_room(arena *a, size_t n) {
    if (!a->mem || a->cap - a->used < n) { /* (room for 0 bytes is still a pointer) */
        size_t cap = a->cap ? a->cap : 1 << 16;
        while (cap - a->used < n) cap *= 2;
        uint8_t *mem = PyMem_Realloc(a->mem, cap);
        if (!mem) {
            PyErr_NoMemory();
            return NULL;
        }
        a->mem = mem;
        a->cap = cap;
    }
    return a->mem + a->used;
}

/* Keep the len bytes at a->mem + a->used. */
static int arena_keep(arena *a, size_t len, LaneObject *lane) {
    if (a->nspans == a->spcap) {
        size_t cap = a->spcap ? a->spcap * 2 : 64;
        span *spans = PyMem_Realloc(a->spans, cap * sizeof(span));
        if (!spans) {
            PyErr_NoMemory();
            return -1;
        }
        a->spans = spans;
        a->spcap = cap;
    }
    a->spans[a->nspans++] = (span){a->used, len, lane};
    a->used += len;
    return 0;
}

static void arena_free(arena *a) {
    PyMem_Free(a->mem);
    PyMem_Free(a->spans);
}

/* ------------------------------------------------------------------ fast_tx */

/* Seal every segment of `plan` into the arena with the lane's session. */
static int seal_segments(LaneObject *lane, const fp_segment_plan *plan, arena *a) {
    SealerObject *s = lane->sealer;
    EVP_CIPHER_CTX *ctx = fp_aead_enc(s->aead);
    for (size_t i = 0; i < plan->count; i++) {
        size_t n = fp_segment_len(plan, i), sealed = fp_sealed_len(n);
        uint8_t *out = arena_room(a, sealed);
        if (!out) return -1;
        fp_segment_write(plan, i, out + FP_HEADER_LEN);
        if (fp_seal_message(ctx, s->remote_index, s->counter, out + FP_HEADER_LEN, n, out) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL encryption failed");
            return -1;
        }
        s->counter++;
        lane->tx_packets++;
        lane->tx_bytes += (long long)n;
        lane->tx_wire += (long long)sealed;
        if (arena_keep(a, sealed, lane) < 0) return -1;
    }
    return 0;
}

/* Send the sealed datagrams, one udp_send batch per run of one lane. */
static void send_spans(int fd, const arena *a, fp_iov *iov, int *gso, long long *dropped,
                       long long *errors, int *last_errno) {
    size_t i = 0;
    while (i < a->nspans) {
        LaneObject *lane = a->spans[i].lane;
        size_t j = i;
        for (; j < a->nspans && a->spans[j].lane == lane; j++)
            iov[j - i] = (fp_iov){a->mem + a->spans[j].off, a->spans[j].len};
        long long d = 0, e = 0;
        const char *sa = PyBytes_AS_STRING(lane->sockaddr);
        fp_udp_send_bufs(fd, (const struct sockaddr *)sa,
                         (unsigned int)PyBytes_GET_SIZE(lane->sockaddr), iov, j - i, gso, &d, &e,
                         last_errno);
        lane->tx_datagrams += (long long)(j - i) - d - e;
        lane->tx_failed += d + e;
        *dropped += d;
        *errors += e;
        i = j;
    }
}

PyObject *fp_fast_tx_run(int tun_fd, Py_ssize_t max_reads, int vnet, PyObject *routes,
                         int udp_fd, int gso, double now, int tcp_only) {
    fp_reader rd = {tun_fd, vnet, max_reads, PyMem_Malloc(FP_READ_SIZE), 0, 0, 0, NULL};
    if (!rd.buf) return PyErr_NoMemory();
    fp_runs rs = {PyList_New(0), PyList_New(0), 0, {0}, 0};
    PyObject *used = PyList_New(0), *result = NULL;
    arena a = {0};
    fp_iov *iov = NULL;
    long long dropped = 0, errors = 0;
    int last_errno = 0;
    uint8_t last_dst[16];
    size_t last_dlen = 0;
    LaneObject *last_lane = NULL;
    if (!rs.packets || !rs.runs || !used) goto done;

    while (rd.reads < max_reads) {
        fp_segment_plan plan;
        const uint8_t *dst = NULL;
        size_t dlen = 0;
        int got = fp_reader_next(&rd, &plan, &dst, &dlen);
        if (got < 0) goto done;
        if (!got) break;
        if (dlen != last_dlen || memcmp(dst, last_dst, dlen) != 0) {
            PyObject *addr = PyBytes_FromStringAndSize((const char *)dst, (Py_ssize_t)dlen);
            if (!addr) goto done;
            last_lane = lane_of(routes, addr);
            Py_DECREF(addr);
            memcpy(last_dst, dst, dlen);
            last_dlen = dlen;
        }
        LaneObject *lane = last_lane;
        SealerObject *s = lane ? lane->sealer : NULL;
        uint64_t count = plan.count;
        int proto = dlen == 4 ? plan.pkt[9] : plan.pkt[6];
        if (s && now < lane->tx_deadline && count <= lane->tx_limit &&
            s->counter <= lane->tx_limit - count && (!tcp_only || proto == 6)) {
            if (note_used(used, lane) < 0 || seal_segments(lane, &plan, &a) < 0) goto done;
        } else if (fp_runs_add(&rs, &plan, dst, dlen) < 0) {
            goto done;
        }
    }
    if (fp_runs_finish(&rs) < 0) goto done;
    if (a.nspans) {
        iov = PyMem_Malloc(a.nspans * sizeof(fp_iov));
        if (!iov) {
            PyErr_NoMemory();
            goto done;
        }
        send_spans(udp_fd, &a, iov, &gso, &dropped, &errors, &last_errno);
    }
    result = Py_BuildValue("(OOnnnOOLLiO)", rs.packets, rs.runs, rd.reads, rd.not_ip,
                           rd.malformed, rd.error ? rd.error : Py_None, used, dropped, errors,
                           last_errno, gso ? Py_True : Py_False);
done:
    PyMem_Free(rd.buf);
    PyMem_Free(iov);
    arena_free(&a);
    Py_XDECREF(rs.packets);
    Py_XDECREF(rs.runs);
    Py_XDECREF(used);
    Py_XDECREF(rd.error);
    return result;
}

PyObject *fp_fast_tx(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 8 || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "fast_tx(tun_fd, max_reads, vnet_hdr, routes: dict, udp_fd, gso, now, "
                        "tcp_only)");
        return NULL;
    }
    int tun_fd = PyObject_AsFileDescriptor(args[0]);
    if (tun_fd < 0) return NULL;
    Py_ssize_t max_reads = PyLong_AsSsize_t(args[1]);
    if (max_reads == -1 && PyErr_Occurred()) return NULL;
    int vnet = PyObject_IsTrue(args[2]);
    if (vnet < 0) return NULL;
    int udp_fd = PyObject_AsFileDescriptor(args[4]);
    if (udp_fd < 0) return NULL;
    int gso = PyObject_IsTrue(args[5]);
    if (gso < 0) return NULL;
    double now = PyFloat_AsDouble(args[6]);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    int tcp_only = PyObject_IsTrue(args[7]);
    if (tcp_only < 0) return NULL;
    return fp_fast_tx_run(tun_fd, max_reads, vnet, args[3], udp_fd, gso, now, tcp_only);
}

/* ------------------------------------------------------------------ fast_rx */

/* Same peer address: family, address and port (not flow info or scope). */
static int same_source(const struct sockaddr_storage *a, socklen_t alen,
                       const struct sockaddr_storage *b, socklen_t blen) {
    if (a->ss_family != b->ss_family || alen < sizeof(sa_family_t) || blen < sizeof(sa_family_t))
        return 0;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return alen >= sizeof(*x) && blen >= sizeof(*y) && x->sin_port == y->sin_port &&
               x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
        return alen >= sizeof(*x) && blen >= sizeof(*y) && x->sin6_port == y->sin6_port &&
               memcmp(&x->sin6_addr, &y->sin6_addr, 16) == 0;
    }
    return 0;
}

typedef struct {
    long long auth, replay, not_ip, malformed;
} rx_drops;

/* The packet filter's cache of decisions, as fast_rx takes it (borrowed). */
typedef struct {
    PyObject *v4, *v6, *accept, *syn_denied;
} rx_filter;

/* Whether the filter's cached path passes p[0..n) (an IP packet with a valid header) as is:
 * 2 for a flow it accepts whole (ACCEPT), 1 for a TCP segment other than a SYN of a flow whose
 * SYNs it denies (SYN_DENIED), 0 when it does not pass (or has no decision). `key` is the
 * packet's flow_key (k bytes: the protocol, then the table's key). */
static int filter_passes(const rx_filter *f, const uint8_t *key, size_t k, const uint8_t *p,
                         size_t n) {
    PyObject *proto = PyLong_FromLong(key[0]);
    PyObject *flow = PyBytes_FromStringAndSize((const char *)key + 1, (Py_ssize_t)(k - 1));
    PyObject *table, *v;
    size_t flags_at = k == 13 ? 33 : 53; /* TCP flags, behind a 20- or 40-byte IP header */
    int pass = 0;
    if (proto && flow && (table = PyDict_GetItemWithError(k == 13 ? f->v4 : f->v6, proto)) &&
        PyDict_Check(table) && (v = PyDict_GetItemWithError(table, flow))) {
        pass = v == f->accept ? 2
               : (v == f->syn_denied && n > flags_at && (p[flags_at] & 0x12) != 0x02) ? 1
                                                                                     : 0;
    }
    PyErr_Clear();
    Py_XDECREF(proto);
    Py_XDECREF(flow);
    return pass;
}

/* One fast_rx call's state: lookups remembered from the previous datagram (a batch is mostly
 * one flow), the opened packets, the drops. */
typedef struct {
    PyObject *lanes, *routes;
    const rx_filter *flt;
    int64_t index; /* the last receiver index looked up (-1: none) and its lane or NULL */
    LaneObject *index_lane;
    uint8_t src[16]; /* the last inner source looked up and the lane routes give it */
    size_t src_len;
    LaneObject *src_lane;
    uint8_t key[37]; /* the last flow the filter accepts whole (key_len 0: none) */
    size_t key_len;
    arena a;
    PyObject *checks;
    rx_drops drops;
} rx_ctx;

static LaneObject *index_lane(rx_ctx *cx, uint32_t index) {
    if (cx->index == (int64_t)index) return cx->index_lane;
    LaneObject *l = NULL;
    PyObject *key = PyLong_FromUnsignedLong(index);
    if (key) {
        PyObject *lane = PyDict_GetItemWithError(cx->lanes, key);
        Py_DECREF(key);
        if (lane && PyObject_TypeCheck(lane, &LaneType)) l = (LaneObject *)lane;
    }
    PyErr_Clear();
    cx->index = index;
    cx->index_lane = l;
    return l;
}

/* The armed lane for a transport message of `len` bytes at `b`, or NULL. */
static LaneObject *rx_lane(rx_ctx *cx, const uint8_t *b, size_t len,
                           const struct sockaddr_storage *src, socklen_t srclen, double now) {
    if (len < FP_MIN_MESSAGE || fp_le32(b) != 4) return NULL;
    uint32_t index = fp_le32(b + 4);
    LaneObject *l = index_lane(cx, index);
    if (!l || !l->rx_aead || l->rx_index != index || !(now < l->rx_deadline) ||
        !same_source(src, srclen, &l->rx_src, l->rx_srclen))
        return NULL;
    return l;
}

static LaneObject *source_lane(rx_ctx *cx, const uint8_t *src, size_t n) {
    if (cx->src_len == n && memcmp(cx->src, src, n) == 0) return cx->src_lane;
    PyObject *addr = PyBytes_FromStringAndSize((const char *)src, (Py_ssize_t)n);
    LaneObject *l = addr ? lane_of(cx->routes, addr) : NULL;
    PyErr_Clear();
    Py_XDECREF(addr);
    memcpy(cx->src, src, n);
    cx->src_len = n;
    cx->src_lane = l;
    return l;
}

/* The flow key the filter's tables use: protocol, then addresses and ports. */
static size_t flow_key(const uint8_t *p, size_t n, uint8_t key[37]) {
    if (p[0] == 0x45 && n >= 24) {
        key[0] = p[9];
        memcpy(key + 1, p + 12, 12);
        return 13;
    }
    if (p[0] >> 4 == 6 && n >= 44) {
        key[0] = p[6];
        memcpy(key + 1, p + 8, 36);
        return 37;
    }
    return 0;
}

/* filter_passes, remembering the last flow accepted whole: a batch is mostly one flow. */
static int filter_passes_cached(rx_ctx *cx, const uint8_t *p, size_t n) {
    uint8_t key[37];
    size_t k = flow_key(p, n, key);
    if (!k) return 0; /* IPv4 options, or too short for ports: the filter's own batch decides */
    if (k == cx->key_len && memcmp(key, cx->key, k) == 0) return 1;
    int pass = filter_passes(cx->flt, key, k, p, n);
    if (pass == 2) {
        memcpy(cx->key, key, k);
        cx->key_len = k;
    }
    return pass != 0;
}

/* Open one message on `lane` into the arena; kept there for the TUN, or copied out as
 * (lane, packet) to `checks`. */
static int rx_open(rx_ctx *cx, LaneObject *lane, const uint8_t *b, size_t len) {
    size_t m = len - FP_HEADER_LEN - FP_TAG_LEN, length = 0, src_len = 0;
    const uint8_t *src = NULL;
    uint8_t *out = arena_room(&cx->a, m);
    if (!out) return -1;
    fp_open_verdict v = fp_open_message(fp_aead_dec(lane->rx_aead), fp_replay_of(lane->rx_replay),
                                        b, len, out, &length, &src, &src_len);
    switch (v) {
    case FP_OPEN_AUTH: cx->drops.auth++; return 0;
    case FP_OPEN_REPLAY: cx->drops.replay++; return 0;
    case FP_OPEN_NOT_IP: cx->drops.not_ip++; lane->rx_data = 1; break;
    case FP_OPEN_MALFORMED: cx->drops.malformed++; lane->rx_data = 1; break;
    case FP_OPEN_KEEPALIVE: break;
    case FP_OPEN_PACKET: break;
    }
    lane->rx_datagrams++;
    lane->rx_wire += (long long)len;
    if (v != FP_OPEN_PACKET) return 0;
    lane->rx_data = 1;
    int ours = source_lane(cx, src, src_len) == lane;
    if (ours && cx->flt) ours = filter_passes_cached(cx, out, length);
    if (ours) {
        lane->rx_packets++;
        lane->rx_bytes += (long long)length;
        return arena_keep(&cx->a, length, lane);
    }
    PyObject *pt = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)length);
    PyObject *item = pt ? PyTuple_Pack(2, (PyObject *)lane, pt) : NULL;
    int rc = item ? PyList_Append(cx->checks, item) : -1;
    Py_XDECREF(pt);
    Py_XDECREF(item);
    return rc;
}

/* One recvmsg with the GRO segment size; bytes received, or -1 with errno. */
static ssize_t recv_gro(int fd, uint8_t *buf, size_t cap, struct sockaddr_storage *src,
                        socklen_t *srclen, int *seg) {
    struct iovec iov = {buf, cap};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {0};
    msg.msg_name = src;
    msg.msg_namelen = sizeof(*src);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    ssize_t got;
    do {
        got = recvmsg(fd, &msg, 0);
    } while (got < 0 && errno == EINTR);
    if (got < 0) return -1;
    *srclen = msg.msg_namelen;
    *seg = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO &&
            c->cmsg_len >= CMSG_LEN(sizeof(int)))
            memcpy(seg, CMSG_DATA(c), sizeof(int));
    }
    return got;
}

int fp_filter_view_ok(PyObject *f) {
    if (f == Py_None) return 1;
    if (!PyTuple_Check(f) || PyTuple_GET_SIZE(f) != 4 || !PyDict_Check(PyTuple_GET_ITEM(f, 0)) ||
        !PyDict_Check(PyTuple_GET_ITEM(f, 1))) {
        PyErr_SetString(PyExc_TypeError,
                        "filter: None or (v4 tables, v6 tables, ACCEPT, SYN_DENIED)");
        return 0;
    }
    return 1;
}

PyObject *fp_fast_rx(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 10 || !PyDict_Check(args[2]) || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "fast_rx(udp_fd, max_datagrams, lanes: dict, routes: dict, tun_fd, "
                        "vnet_hdr, uso, now, filter, answer)");
        return NULL;
    }
    Py_ssize_t answer_reads = 0;
    int answer_gso = 0, answer_tcp_only = 0;
    if (args[9] != Py_None) {
        if (!PyArg_ParseTuple(args[9], "npp:answer", &answer_reads, &answer_gso,
                              &answer_tcp_only))
            return NULL;
    }
    if (!fp_filter_view_ok(args[8])) return NULL;
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0) return NULL;
    Py_ssize_t max_datagrams = PyLong_AsSsize_t(args[1]);
    if (max_datagrams == -1 && PyErr_Occurred()) return NULL;
    int tun_fd = PyObject_AsFileDescriptor(args[4]);
    if (tun_fd < 0) return NULL;
    int vnet = PyObject_IsTrue(args[5]);
    if (vnet < 0) return NULL;
    int uso = PyObject_IsTrue(args[6]);
    if (uso < 0) return NULL;
    double now = PyFloat_AsDouble(args[7]);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    return fp_fast_rx_run(fd, max_datagrams, args[2], args[3], tun_fd, vnet, uso, now, args[8],
                          answer_reads, answer_gso, answer_tcp_only);
}

PyObject *fp_fast_rx_run(int fd, Py_ssize_t max_datagrams, PyObject *lanes, PyObject *routes,
                         int tun_fd, int vnet, int uso, double now, PyObject *filter,
                         Py_ssize_t answer_reads, int answer_gso, int answer_tcp_only) {
    rx_filter filter_view;
    rx_ctx cx;
    memset(&cx, 0, sizeof cx);
    cx.index = -1;
    cx.lanes = lanes;
    cx.routes = routes;
    if (filter != Py_None) {
        filter_view.v4 = PyTuple_GET_ITEM(filter, 0);
        filter_view.v6 = PyTuple_GET_ITEM(filter, 1);
        filter_view.accept = PyTuple_GET_ITEM(filter, 2);
        filter_view.syn_denied = PyTuple_GET_ITEM(filter, 3);
        cx.flt = &filter_view;
    }
    uint8_t *buf = PyMem_Malloc(RECV_SIZE);
    if (!buf) return PyErr_NoMemory();
    PyObject *slow = PyList_New(0), *used = PyList_New(0), *result = NULL;
    cx.checks = PyList_New(0);
    fp_buf *bufs = NULL;
    Py_ssize_t count = 0, receives = 0;
    if (!slow || !used || !cx.checks) goto done;
    while (count < max_datagrams) {
        struct sockaddr_storage src;
        socklen_t srclen = 0;
        int seg = 0;
        ssize_t got = recv_gro(fd, buf, RECV_SIZE, &src, &srclen, &seg);
        if (got < 0) {
            if (errno == ECONNREFUSED) continue; /* a queued ICMP error: nothing to deliver */
            break; /* EAGAIN; another error ends the batch (the reader comes back if more waits) */
        }
        receives++;
        size_t n = (size_t)got, size = (seg > 0 && (size_t)seg < n) ? (size_t)seg : n;
        PyObject *rest = NULL; /* this receive's datagrams for the Python path */
        for (size_t off = 0; off < n || (n == 0 && off == 0); off += size) {
            size_t len = n - off < size ? n - off : size;
            const uint8_t *b = buf + off;
            count++;
            LaneObject *lane = rx_lane(&cx, b, len, &src, srclen, now);
            if (lane) {
                if (rx_open(&cx, lane, b, len) < 0 || note_used(used, lane) < 0) {
                    Py_XDECREF(rest);
                    goto done;
                }
            } else {
                PyObject *d = PyBytes_FromStringAndSize((const char *)b, (Py_ssize_t)len);
                if (!d || (!rest && !(rest = PyList_New(0))) || PyList_Append(rest, d) < 0) {
                    Py_XDECREF(d);
                    Py_XDECREF(rest);
                    goto done;
                }
                Py_DECREF(d);
            }
            if (n == 0) break;
        }
        if (rest) {
            PyObject *item = Py_BuildValue("(Ny#)", rest, (const char *)&src, (Py_ssize_t)srclen);
            if (!item || PyList_Append(slow, item) < 0) {
                Py_XDECREF(item);
                goto done;
            }
            Py_DECREF(item);
        }
    }
    Py_ssize_t writes = 0, failed = 0;
    if (cx.a.nspans) {
        bufs = PyMem_Malloc(cx.a.nspans * sizeof(fp_buf));
        if (!bufs) {
            PyErr_NoMemory();
            goto done;
        }
        for (size_t i = 0; i < cx.a.nspans; i++)
            bufs[i] = (fp_buf){cx.a.mem + cx.a.spans[i].off, cx.a.spans[i].len};
        if (fp_tun_write_bufs(tun_fd, bufs, cx.a.nspans, vnet, uso, &writes, &failed) < 0)
            goto done;
    }
    PyObject *answer = NULL;
    if (answer_reads > 0 && writes > failed) {
        /* what the packets provoked (an echo reply, an ACK) is queued by now: send it */
        answer = fp_fast_tx_run(tun_fd, answer_reads, vnet, cx.routes, fd, answer_gso, now,
                                answer_tcp_only);
        if (!answer) goto done;
    }
    result = Py_BuildValue("(OOnOLLLLnnN)", slow, used, receives, cx.checks, cx.drops.auth,
                           cx.drops.replay, cx.drops.not_ip, cx.drops.malformed, writes, failed,
                           answer ? answer : Py_NewRef(Py_None));
done:
    PyMem_Free(buf);
    PyMem_Free(bufs);
    arena_free(&cx.a);
    Py_XDECREF(slow);
    Py_XDECREF(used);
    Py_XDECREF(cx.checks);
    return result;
}

PyMethodDef fp_lanes_methods[] = {
    {"fast_tx", (PyCFunction)(void (*)(void))fp_fast_tx, METH_FASTCALL,
     "fast_tx(tun_fd, max_reads, vnet_hdr, routes, udp_fd, gso, now, tcp_only) -> (packets, "
     "runs, reads, not_ip, malformed, error, lanes, dropped, errors, errno, gso)"},
    {"fast_rx", (PyCFunction)(void (*)(void))fp_fast_rx, METH_FASTCALL,
     "fast_rx(udp_fd, max_datagrams, lanes, routes, tun_fd, vnet_hdr, uso, now, filter, answer) "
     "-> (slow, lanes, receives, checks, authentication, replay, not_ip, malformed, writes, "
     "failed, answered)"},
    {NULL, NULL, 0, NULL},
};

int fp_lanes_init(PyObject *module) {
    str_lane = PyUnicode_InternFromString("lane");
    if (!str_lane) return -1;
    if (PyType_Ready(&SealerType) < 0 || PyType_Ready(&LaneType) < 0) return -1;
    if (PyModule_AddObjectRef(module, "Sealer", (PyObject *)&SealerType) < 0) return -1;
    if (PyModule_AddObjectRef(module, "Lane", (PyObject *)&LaneType) < 0) return -1;
    return 0;
}
