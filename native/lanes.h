/* The lanes' two batches (lanes.c) as the pump's thread (pump.c) runs them: the arguments of
 * fast_tx / fast_rx already parsed. Both need the GIL; each returns the entry point's result
 * tuple, or NULL with an exception. */
#ifndef AGENT_LANES_H
#define AGENT_LANES_H

#include "fastpath.h"

PyObject *fp_fast_tx_run(int tun_fd, Py_ssize_t max_reads, int vnet, PyObject *routes,
                         int udp_fd, int gso, double now, int tcp_only);

/* `filter`: Py_None or a view fp_filter_view_ok accepted; answer_reads 0: no answer read. */
PyObject *fp_fast_rx_run(int fd, Py_ssize_t max_datagrams, PyObject *lanes, PyObject *routes,
                         int tun_fd, int vnet, int uso, double now, PyObject *filter,
                         Py_ssize_t answer_reads, int answer_gso, int answer_tcp_only);

/* 1 if `f` is None or (v4 tables, v6 tables, ACCEPT, SYN_DENIED); else 0 with TypeError. */
int fp_filter_view_ok(PyObject *f);

#endif
