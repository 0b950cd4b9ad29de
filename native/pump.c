/* Pump: a thread that waits on the TUN and the UDP socket itself and runs the lanes' batches
 * (lanes.c) the moment either is readable, so a known peer's packet never waits for the event
 * loop. The twin of nothing: it is I/O around fast_tx / fast_rx, which have their twins.
 *
 *   Pump(tun_fd, udp_fd, vnet_hdr, uso, max_reads, max_datagrams, sparse_gap, book_delay,
 *        queue_max)
 *   configure(routes, lanes, filter, gso, tcp_only)   what fast_tx / fast_rx take (Python
 *                                    calls it again whenever one of them may have changed)
 *   start(), stop()                  the thread; stop() waits for it to end
 *   take() -> (results, sums, used)  since the last take: `results`, [(kind, result)], the
 *                                    batches with work for Python (kind 0 a fast_tx result,
 *                                    1 a fast_rx result, 2 an exception: the thread has
 *                                    ended); `sums`, the other batches'
 *                                    counts summed: (tun_reads, udp_reads, tun_writes,
 *                                    write_failed, authentication, replay, not_ip, malformed,
 *                                    send_dropped, send_errors, send_errno, gso); `used`, the
 *                                    lanes they used
 *   wake_fd                          an eventfd readable while take() has something urgent
 *   clock() -> the thread's clock (CLOCK_MONOTONIC, as time.monotonic)
 *
 * A wakeup reads as the event loop's handlers do: after a quiet spell (`sparse_gap`) one read
 * or datagram, else a batch; a lone datagram into a quiet TUN reads its answer in the same
 * call. Results that hold work for Python (packets no lane took, packets to judge, a TUN
 * error) make wake_fd readable at once; results of lanes alone wait up to `book_delay`, so
 * that a round trip is not slowed by the loop's bookkeeping. At `queue_max` results not
 * taken the thread stops reading until take().
 *
 * Everything the batches touch is Python's, read under the GIL: the thread takes it per
 * wakeup, with the cyclic GC paused for the batch so that no Python code (a finalizer) runs
 * and lets another thread in mid-batch. Python's own seals share the Sealer counter under
 * the same GIL. The thread blocks all signals (they stay the main thread's).
 */
#include "offload_py.h" /* Python.h first, as CPython asks */
#include "lanes.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* What the batches of lanes alone did since the last take(), summed. */
typedef struct {
    long long tun_reads, udp_reads, tun_writes, write_failed;
    long long auth, replay, not_ip, malformed; /* messages lanes opened and dropped */
    long long send_dropped, send_errors;
    int send_errno, any;
} tally;

typedef struct {
    PyObject_HEAD
    int tun_fd, udp_fd, vnet, uso;
    Py_ssize_t max_reads, max_datagrams, queue_max;
    double sparse_gap, book_delay;
    /* configure(); read by the thread under the GIL */
    PyObject *routes, *lanes, *filter;
    int gso, tcp_only;
    /* the thread's */
    int wake_fd, stop_fd, room_fd;
    pthread_t thread;
    int started, stopping, ended, signalled, waiting_room;
    double tun_seen, udp_seen;
    PyObject *queue; /* results with work for Python */
    tally sum;       /* ... and those without, summed */
    PyObject *used;  /* the lanes the summed results used (each once, by the lane's flag) */
} PumpObject;

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void poke(int fd) {
    uint64_t one = 1;
    ssize_t rc;
    do {
        rc = write(fd, &one, sizeof one);
    } while (rc < 0 && errno == EINTR);
}

static void drain(int fd) {
    uint64_t n;
    ssize_t rc;
    do {
        rc = read(fd, &n, sizeof n);
    } while (rc < 0 && errno == EINTR);
}

/* ------------------------------------------------------------------ the thread (GIL held) */

/* Append (kind, obj) to the queue, stealing obj; 0 or -1 with an exception. */
static int enqueue(PumpObject *p, int kind, PyObject *obj) {
    PyObject *item = Py_BuildValue("(iN)", kind, obj);
    if (!item) return -1;
    int rc = PyList_Append(p->queue, item);
    Py_DECREF(item);
    return rc;
}

static int nonempty_list(PyObject *r, Py_ssize_t i) {
    PyObject *x = PyTuple_GET_ITEM(r, i);
    return PyList_Check(x) && PyList_GET_SIZE(x) > 0;
}

static long long ll_at(PyObject *r, Py_ssize_t i) {
    return PyLong_AsLongLong(PyTuple_GET_ITEM(r, i));
}

static int extend_used(PumpObject *p, PyObject *r, Py_ssize_t i) {
    PyObject *used = PyTuple_GET_ITEM(r, i);
    Py_ssize_t n = PyList_GET_SIZE(p->used);
    return PyList_GET_SIZE(used) ? PyList_SetSlice(p->used, n, n, used) : 0;
}

/* A fast_tx result without work for Python into the sum; 0 or -1 with an exception. */
static int sum_tx(PumpObject *p, PyObject *r) {
    tally *t = &p->sum;
    t->any = 1;
    t->tun_reads += ll_at(r, 2);
    long long dropped = ll_at(r, 7), errors = ll_at(r, 8);
    t->send_dropped += dropped;
    t->send_errors += errors;
    if (errors) t->send_errno = (int)ll_at(r, 9);
    return extend_used(p, r, 6);
}

/* A fast_rx result without work for Python (its answer's too) into the sum. */
static int sum_rx(PumpObject *p, PyObject *r) {
    tally *t = &p->sum;
    t->any = 1;
    t->udp_reads += ll_at(r, 2);
    t->auth += ll_at(r, 4);
    t->replay += ll_at(r, 5);
    t->not_ip += ll_at(r, 6);
    t->malformed += ll_at(r, 7);
    t->tun_writes += ll_at(r, 8);
    t->write_failed += ll_at(r, 9);
    PyObject *answered = PyTuple_GET_ITEM(r, 10);
    if (answered != Py_None && sum_tx(p, answered) < 0) return -1;
    return extend_used(p, r, 1);
}

/* A fast_tx result with work for Python: reads no lane took, or a read error. */
static int tx_urgent(PyObject *r) {
    return nonempty_list(r, 0) || PyLong_AsSsize_t(PyTuple_GET_ITEM(r, 3)) > 0 ||
           PyLong_AsSsize_t(PyTuple_GET_ITEM(r, 4)) > 0 || PyTuple_GET_ITEM(r, 5) != Py_None;
}

/* Runs the batches for the readable fds; 1 if a result wants Python at once, 0 if not, -1
 * with an exception. */
static int pump_batches(PumpObject *p, int tun_ready, int udp_ready, double now, int *tun_dead) {
    int urgent = 0;
    if (udp_ready) {
        int sparse = now - p->udp_seen > p->sparse_gap;
        p->udp_seen = now;
        int answer = sparse && now - p->tun_seen > p->sparse_gap;
        PyObject *r = fp_fast_rx_run(p->udp_fd, sparse ? 1 : p->max_datagrams, p->lanes,
                                     p->routes, p->tun_fd, p->vnet, p->uso, now, p->filter,
                                     answer ? 1 : 0, p->gso, p->tcp_only);
        if (!r) return -1;
        PyObject *answered = PyTuple_GET_ITEM(r, 10);
        int work = nonempty_list(r, 0) || nonempty_list(r, 3);
        if (answered != Py_None) {
            if (PyTuple_GET_ITEM(answered, 5) != Py_None) *tun_dead = 1;
            p->gso = PyObject_IsTrue(PyTuple_GET_ITEM(answered, 10));
            if (PyLong_AsSsize_t(PyTuple_GET_ITEM(answered, 2)) > 0) p->tun_seen = now;
            work |= tx_urgent(answered);
        }
        int rc = 0;
        if (PyLong_AsSsize_t(PyTuple_GET_ITEM(r, 2)) == 0) {
            Py_DECREF(r);
        } else if (work) {
            urgent = 1;
            rc = enqueue(p, 1, r);
        } else {
            rc = sum_rx(p, r);
            Py_DECREF(r);
        }
        if (rc < 0) return -1;
    }
    if (tun_ready) {
        int sparse = now - p->tun_seen > p->sparse_gap;
        p->tun_seen = now;
        PyObject *r = fp_fast_tx_run(p->tun_fd, sparse ? 1 : p->max_reads, p->vnet, p->routes,
                                     p->udp_fd, p->gso, now, p->tcp_only);
        if (!r) return -1;
        p->gso = PyObject_IsTrue(PyTuple_GET_ITEM(r, 10));
        if (PyTuple_GET_ITEM(r, 5) != Py_None) *tun_dead = 1; /* Python stops the data plane */
        int rc = 0;
        if (tx_urgent(r)) {
            urgent = 1;
            rc = enqueue(p, 0, r);
        } else {
            if (PyLong_AsSsize_t(PyTuple_GET_ITEM(r, 2)) > 0) rc = sum_tx(p, r);
            Py_DECREF(r);
        }
        if (rc < 0) return -1;
    }
    return urgent;
}

static void signal_loop(PumpObject *p) {
    if (!p->signalled) {
        p->signalled = 1;
        poke(p->wake_fd);
    }
}

static void *pump_thread(void *arg) {
    PumpObject *p = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    PyGILState_STATE g = PyGILState_Ensure();
    double pending = -1; /* when the oldest result not yet signalled was queued */
    int tun_dead = 0, failed = 0;
    while (!p->stopping && !failed) {
        int watch = !p->waiting_room;
        struct pollfd fds[3] = {{p->stop_fd, POLLIN, 0}, {-1, POLLIN, 0}, {-1, POLLIN, 0}};
        if (watch) {
            fds[1].fd = tun_dead ? -1 : p->tun_fd;
            fds[2].fd = p->udp_fd;
        } else {
            fds[1].fd = p->room_fd;
        }
        struct timespec tmo, *tp = NULL;
        if (pending >= 0 && !p->signalled) {
            double wait = pending + p->book_delay - mono();
            if (wait < 0) wait = 0;
            tmo.tv_sec = (time_t)wait;
            tmo.tv_nsec = (long)((wait - (double)tmo.tv_sec) * 1e9);
            tp = &tmo;
        }
        int rc, err = 0;
        Py_BEGIN_ALLOW_THREADS
        rc = ppoll(fds, 3, tp, NULL);
        if (rc < 0 && errno != EINTR) err = errno;
        Py_END_ALLOW_THREADS
        if (p->stopping) break;
        double now = mono();
        int urgent = 0;
        if (err) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            urgent = -1;
        } else if (rc > 0 && !watch && fds[1].revents) {
            drain(p->room_fd);
        } else if (rc > 0 && watch) {
            short bad = POLLNVAL;
            if ((fds[1].revents | fds[2].revents) & bad) {
                PyErr_SetString(PyExc_OSError, "the pump's TUN or UDP fd was closed under it");
                urgent = -1;
            } else {
                int gc = PyGC_Disable();
                urgent = pump_batches(p, fds[1].revents != 0, fds[2].revents != 0, now, &tun_dead);
                if (gc) PyGC_Enable();
            }
        }
        if (urgent < 0) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            Py_XDECREF(type);
            Py_XDECREF(tb);
            if (!value || enqueue(p, 2, value) < 0) PyErr_Clear();
            failed = 1;
            urgent = 1;
        }
        Py_ssize_t queued = PyList_GET_SIZE(p->queue);
        if (queued || p->sum.any) {
            if (pending < 0) pending = now;
            if (urgent || now >= pending + p->book_delay || queued >= p->queue_max) {
                signal_loop(p);
                pending = -1;
            }
            if (queued >= p->queue_max) p->waiting_room = 1;
        } else {
            pending = -1;
        }
    }
    p->ended = 1;
    Py_DECREF((PyObject *)p); /* the reference start() gave the thread */
    PyGILState_Release(g);
    return NULL;
}

/* ------------------------------------------------------------------ the Python side */

static PyObject *pump_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    PumpObject *self = (PumpObject *)type->tp_alloc(type, 0);
    if (self) self->wake_fd = self->stop_fd = self->room_fd = -1;
    return (PyObject *)self;
}

static int pump_init(PumpObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tun_fd",     "udp_fd",     "vnet_hdr",  "uso", "max_reads",
                             "max_datagrams", "sparse_gap", "book_delay", "queue_max", NULL};
    int tun_fd, udp_fd, vnet, uso;
    Py_ssize_t max_reads, max_datagrams, queue_max;
    double gap, delay;
    if (self->queue) {
        PyErr_SetString(PyExc_RuntimeError, "Pump already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iippnnddn:Pump", kwlist, &tun_fd, &udp_fd,
                                     &vnet, &uso, &max_reads, &max_datagrams, &gap, &delay,
                                     &queue_max))
        return -1;
    if (tun_fd < 0 || udp_fd < 0 || max_reads < 1 || max_datagrams < 1 || queue_max < 1 ||
        !(gap >= 0) || !(delay >= 0)) {
        PyErr_SetString(PyExc_ValueError, "Pump: fds, limits and times must be positive");
        return -1;
    }
    self->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->room_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->wake_fd < 0 || self->stop_fd < 0 || self->room_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->queue = PyList_New(0);
    if (!self->queue) return -1;
    self->tun_fd = tun_fd;
    self->udp_fd = udp_fd;
    self->vnet = vnet;
    self->uso = uso;
    self->max_reads = max_reads;
    self->max_datagrams = max_datagrams;
    self->queue_max = queue_max;
    self->sparse_gap = gap;
    self->book_delay = delay;
    self->tun_seen = self->udp_seen = -1e300;
    self->used = PyList_New(0);
    self->routes = PyDict_New();
    self->lanes = PyDict_New();
    self->filter = Py_NewRef(Py_None);
    return self->routes && self->lanes && self->used ? 0 : -1;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void pump_dealloc(PumpObject *self) {
    /* never while the thread runs: it holds a reference until it ends */
    close_fd(&self->wake_fd);
    close_fd(&self->stop_fd);
    close_fd(&self->room_fd);
    Py_XDECREF(self->routes);
    Py_XDECREF(self->lanes);
    Py_XDECREF(self->filter);
    Py_XDECREF(self->queue);
    Py_XDECREF(self->used);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ready(PumpObject *self) {
    if (!self->queue) {
        PyErr_SetString(PyExc_RuntimeError, "Pump not initialised");
        return 0;
    }
    return 1;
}

static PyObject *pump_configure(PumpObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!ready(self)) return NULL;
    if (nargs != 5 || !PyDict_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "configure(routes: dict, lanes: dict, filter, gso, tcp_only)");
        return NULL;
    }
    if (!fp_filter_view_ok(args[2])) return NULL;
    int gso = PyObject_IsTrue(args[3]), tcp_only = PyObject_IsTrue(args[4]);
    if (gso < 0 || tcp_only < 0) return NULL;
    Py_SETREF(self->routes, Py_NewRef(args[0]));
    Py_SETREF(self->lanes, Py_NewRef(args[1]));
    Py_SETREF(self->filter, Py_NewRef(args[2]));
    self->gso = gso;
    self->tcp_only = tcp_only;
    Py_RETURN_NONE;
}

static PyObject *pump_start(PumpObject *self, PyObject *unused) {
    (void)unused;
    if (!ready(self)) return NULL;
    if (self->started) {
        PyErr_SetString(PyExc_RuntimeError, "Pump already started");
        return NULL;
    }
    Py_INCREF(self); /* the thread's, released as it ends */
    int rc = pthread_create(&self->thread, NULL, pump_thread, self);
    if (rc != 0) {
        Py_DECREF(self);
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->started = 1;
    Py_RETURN_NONE;
}

static PyObject *pump_stop(PumpObject *self, PyObject *unused) {
    (void)unused;
    if (!self->started || self->stopping) Py_RETURN_NONE;
    self->stopping = 1;
    poke(self->stop_fd);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *pump_take(PumpObject *self, PyObject *unused) {
    (void)unused;
    if (!ready(self)) return NULL;
    PyObject *queue = PyList_New(0), *used = PyList_New(0);
    if (!queue || !used) {
        Py_XDECREF(queue);
        Py_XDECREF(used);
        return NULL;
    }
    const tally *t = &self->sum;
    PyObject *out = Py_BuildValue("(N(LLLLLLLLLLiO)N)", self->queue, t->tun_reads, t->udp_reads,
                                  t->tun_writes, t->write_failed, t->auth, t->replay, t->not_ip,
                                  t->malformed, t->send_dropped, t->send_errors, t->send_errno,
                                  self->gso ? Py_True : Py_False, self->used);
    /* (on failure too, N gave the old lists away: MemoryError loses them) */
    self->queue = queue;
    self->used = used;
    memset(&self->sum, 0, sizeof self->sum);
    if (!out) return NULL;
    if (self->signalled) {
        drain(self->wake_fd);
        self->signalled = 0;
    }
    if (self->waiting_room) {
        self->waiting_room = 0;
        poke(self->room_fd);
    }
    return out;
}

static PyObject *pump_clock(PumpObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyFloat_FromDouble(mono());
}

static PyObject *pump_wake_fd(PumpObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->wake_fd);
}

static PyObject *pump_running(PumpObject *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->started && !self->stopping && !self->ended);
}

static PyMethodDef pump_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))pump_configure, METH_FASTCALL,
     "configure(routes, lanes, filter, gso, tcp_only)"},
    {"start", (PyCFunction)pump_start, METH_NOARGS, "start the thread"},
    {"stop", (PyCFunction)pump_stop, METH_NOARGS, "stop the thread and wait for it"},
    {"take", (PyCFunction)pump_take, METH_NOARGS,
     "take() -> (results, sums, used), what the batches did since the last take"},
    {"clock", (PyCFunction)pump_clock, METH_NOARGS, "the thread's clock (CLOCK_MONOTONIC)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pump_getset[] = {
    {"wake_fd", (getter)pump_wake_fd, NULL, "readable while results wait for take()", NULL},
    {"running", (getter)pump_running, NULL, "started, and neither stopped nor failed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._fastpath.Pump",
    .tp_doc = "A thread running the lanes' batches as soon as the TUN or UDP fd is readable.",
    .tp_basicsize = sizeof(PumpObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = pump_new,
    .tp_init = (initproc)pump_init,
    .tp_dealloc = (destructor)pump_dealloc,
    .tp_methods = pump_methods,
    .tp_getset = pump_getset,
};

int fp_pump_init(PyObject *module) {
    if (PyType_Ready(&PumpType) < 0) return -1;
    return PyModule_AddObjectRef(module, "Pump", (PyObject *)&PumpType);
}
