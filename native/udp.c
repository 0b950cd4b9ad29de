/* Batched UDP send with UDP_SEGMENT: the twin of UdpSocket.send_batch (agent/node/udp.py).
 *
 *   sockaddr(family, host, port) -> bytes        struct sockaddr_in / sockaddr_in6 for sendmsg
 *                                                (an IPv4 host on AF_INET6 becomes ::ffff:a.b.c.d)
 *   udp_send(fd, sockaddr, datagrams, gso) -> (dropped, errors, last_errno, gso)
 *
 * Runs of equal-size datagrams (the last of a run may be shorter), at most MAX_GSO_SEGMENTS and
 * MAX_GSO_BYTES, leave in one sendmsg with a UDP_SEGMENT cmsg; a lone datagram in one sendto.
 * EAGAIN/ENOBUFS count as dropped (the queue was full), anything else as errors. EIO or EINVAL
 * on a GSO send (no checksum offload on the egress device) resends the run one by one and, if
 * that works, turns GSO off for the caller (the returned flag).
 */
#include "fastpath.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#define MAX_GSO_SEGMENTS 64
#define MAX_GSO_BYTES 65507

typedef struct {
    long long dropped, errors;
    int last_errno;
} send_result;

static void count_error(send_result *r, int err, Py_ssize_t n) {
    if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS) {
        r->dropped += n;
    } else {
        r->errors += n;
        r->last_errno = err;
    }
}

static void send_each(int fd, const struct sockaddr *sa, socklen_t salen, const fp_iov *bufs,
                      size_t n, send_result *r) {
    for (size_t i = 0; i < n; i++) {
        ssize_t rc;
        do {
            rc = sendto(fd, bufs[i].p, bufs[i].n, 0, sa, salen);
        } while (rc < 0 && errno == EINTR);
        if (rc < 0) count_error(r, errno, 1);
    }
}

/* One GSO send of bufs[0..n) (equal sizes but maybe the last); 1 if GSO was refused. */
static int send_gso(int fd, const struct sockaddr *sa, socklen_t salen, const fp_iov *bufs,
                    size_t n, uint16_t size, send_result *r) {
    struct iovec iov[MAX_GSO_SEGMENTS];
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof(control));
    for (size_t i = 0; i < n; i++) {
        iov[i].iov_base = (void *)bufs[i].p;
        iov[i].iov_len = bufs[i].n;
    }
    struct msghdr msg = {0};
    msg.msg_name = (void *)sa;
    msg.msg_namelen = salen;
    msg.msg_iov = iov;
    msg.msg_iovlen = n;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_UDP;
    c->cmsg_type = UDP_SEGMENT;
    c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(c), &size, sizeof(size));
    ssize_t rc;
    do {
        rc = sendmsg(fd, &msg, 0);
    } while (rc < 0 && errno == EINTR);
    if (rc >= 0) return 0;
    int err = errno;
    if (err == EIO || err == EINVAL) {
        long long before = r->dropped + r->errors;
        send_each(fd, sa, salen, bufs, n, r);
        return r->dropped + r->errors == before;  /* worked one by one: stop using GSO */
    }
    count_error(r, err, (Py_ssize_t)n);
    return 0;
}

void fp_udp_send_bufs(int fd, const struct sockaddr *sa, socklen_t salen, const fp_iov *bufs,
                      size_t n, int *gso, long long *dropped, long long *errors, int *last_errno) {
    send_result r = {0, 0, 0};
    size_t i = 0;
    while (i < n) {
        /* the next run: bufs i..i+got */
        size_t got = 0, size = bufs[i].n, total = 0;
        while (i + got < n && got < MAX_GSO_SEGMENTS) {
            size_t len = bufs[i + got].n;
            int fits = *gso && len > 0 && len <= size && total + len <= MAX_GSO_BYTES &&
                       size <= UINT16_MAX;
            if (got > 0 && !fits) break;
            total += len;
            got++;
            if (len < size) break;  /* a shorter datagram ends a run */
        }
        if (got == 1 || !*gso) {
            send_each(fd, sa, salen, bufs + i, got, &r);
        } else if (send_gso(fd, sa, salen, bufs + i, got, (uint16_t)size, &r)) {
            *gso = 0;
        }
        i += got;
    }
    *dropped += r.dropped;
    *errors += r.errors;
    if (r.last_errno) *last_errno = r.last_errno;
}

PyObject *fp_udp_send(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "udp_send(fd, sockaddr, datagrams, gso)");
        return NULL;
    }
    int fd = fp_as_int(args[0]);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    int gso = PyObject_IsTrue(args[3]);
    if (gso < 0) return NULL;
    Py_buffer sab;
    if (PyObject_GetBuffer(args[1], &sab, PyBUF_SIMPLE) < 0) return NULL;
    if (sab.len != sizeof(struct sockaddr_in) && sab.len != sizeof(struct sockaddr_in6)) {
        PyBuffer_Release(&sab);
        PyErr_SetString(PyExc_ValueError, "sockaddr must come from sockaddr()");
        return NULL;
    }
    struct sockaddr_storage ss;
    memcpy(&ss, sab.buf, (size_t)sab.len);
    socklen_t salen = (socklen_t)sab.len;
    PyBuffer_Release(&sab);

    PyObject *seq = PySequence_Fast(args[2], "datagrams must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_buffer *views = PyMem_Malloc(((size_t)n + 1) * sizeof(Py_buffer));
    fp_iov *bufs = PyMem_Malloc(((size_t)n + 1) * sizeof(fp_iov));
    Py_ssize_t held = 0;
    PyObject *out = NULL;
    if (!views || !bufs) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < n; held++) {
        if (PyObject_GetBuffer(items[held], &views[held], PyBUF_SIMPLE) < 0) goto done;
        bufs[held].p = views[held].buf;
        bufs[held].n = (size_t)views[held].len;
    }
    long long dropped = 0, errors = 0;
    int last_errno = 0;
    fp_udp_send_bufs(fd, (const struct sockaddr *)&ss, salen, bufs, (size_t)n, &gso, &dropped,
                     &errors, &last_errno);
    out = Py_BuildValue("(LLiO)", dropped, errors, last_errno, gso ? Py_True : Py_False);
done:
    for (Py_ssize_t k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    PyMem_Free(views);
    PyMem_Free(bufs);
    Py_DECREF(seq);
    return out;
}

static PyObject *fp_sockaddr(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    const char *host;
    if (nargs != 3 || !(host = PyUnicode_AsUTF8(args[1]))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "sockaddr(family, host, port)");
        return NULL;
    }
    int family = fp_as_int(args[0]);
    long port = PyLong_AsLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port must be 0..65535");
        return NULL;
    }
    if (family == AF_INET) {
        struct sockaddr_in sin;
        memset(&sin, 0, sizeof(sin));
        sin.sin_family = AF_INET;
        sin.sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) goto bad;
        return PyBytes_FromStringAndSize((const char *)&sin, sizeof(sin));
    }
    if (family == AF_INET6) {
        struct sockaddr_in6 sin6;
        memset(&sin6, 0, sizeof(sin6));
        sin6.sin6_family = AF_INET6;
        sin6.sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &sin6.sin6_addr) != 1) {
            struct in_addr v4;
            if (inet_pton(AF_INET, host, &v4) != 1) goto bad;
            sin6.sin6_addr.s6_addr[10] = 0xff;
            sin6.sin6_addr.s6_addr[11] = 0xff;
            memcpy(&sin6.sin6_addr.s6_addr[12], &v4, 4);
        }
        return PyBytes_FromStringAndSize((const char *)&sin6, sizeof(sin6));
    }
    PyErr_SetString(PyExc_ValueError, "family must be AF_INET or AF_INET6");
    return NULL;
bad:
    PyErr_Format(PyExc_ValueError, "%R is not an IP address", args[1]);
    return NULL;
}

PyMethodDef fp_udp_methods[] = {
    {"udp_send", (PyCFunction)(void (*)(void))fp_udp_send, METH_FASTCALL,
     "udp_send(fd, sockaddr, datagrams, gso) -> (dropped, errors, last_errno, gso)"},
    {"sockaddr", (PyCFunction)(void (*)(void))fp_sockaddr, METH_FASTCALL,
     "sockaddr(family, host, port) -> the raw socket address for udp_send"},
    {NULL, NULL, 0, NULL},
};
