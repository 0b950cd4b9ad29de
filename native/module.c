/* agent._fastpath: module definition; the entry points live in crypto.c, offload.c, io.c,
 * udp.c, lanes.c and pump.c. */
#include "fastpath.h"

static int add_methods(PyObject *module, PyMethodDef *defs) {
    return PyModule_AddFunctions(module, defs);
}

static int fastpath_exec(PyObject *module) {
    if (add_methods(module, fp_crypto_methods) < 0 || add_methods(module, fp_offload_methods) < 0 ||
        add_methods(module, fp_io_methods) < 0 || add_methods(module, fp_udp_methods) < 0 ||
        add_methods(module, fp_lanes_methods) < 0)
        return -1;
    if (fp_crypto_init(module) < 0 || fp_offload_init(module) < 0 || fp_io_init(module) < 0 ||
        fp_lanes_init(module) < 0 || fp_pump_init(module) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot fastpath_slots[] = {
    {Py_mod_exec, fastpath_exec},
    {0, NULL},
};

static PyMethodDef no_methods[] = {{NULL, NULL, 0, NULL}};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent._fastpath",
    .m_doc = "The data plane's per-packet batches in C (see agent/node/fastpath.py).",
    .m_size = 0,
    .m_methods = no_methods,
    .m_slots = fastpath_slots,
};

PyMODINIT_FUNC PyInit__fastpath(void) { return PyModuleDef_Init(&fastpath_module); }
