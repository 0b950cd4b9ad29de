/* Batched TUN and UDP system calls: the twin of agent/node/tun.py and agent/node/udp.py. */
#include "fastpath.h"

PyMethodDef fp_io_methods[] = {{NULL, NULL, 0, NULL}};

int fp_io_init(PyObject *module) { (void)module; return 0; }
