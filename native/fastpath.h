/* The compiled twin of the data plane's per-packet work (module agent._fastpath).
 *
 * Every entry point has a pure-Python reference with the same inputs and outputs (named in
 * each file's header); tests/native/ feeds both the same bytes and requires the same results.
 * Attacker bytes reach crypto.c (transport messages) and offload.c (TUN super-packets): every
 * length is checked before use. Crypto is OpenSSL's EVP ChaCha20-Poly1305, one context per key.
 */
#ifndef AGENT_FASTPATH_H
#define AGENT_FASTPATH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

/* Methods and types each file contributes to the module (module.c collects them). */
extern PyMethodDef fp_crypto_methods[];
extern PyMethodDef fp_offload_methods[];
extern PyMethodDef fp_io_methods[];
extern PyMethodDef fp_udp_methods[];
extern PyMethodDef fp_lanes_methods[];
int fp_crypto_init(PyObject *module);  /* adds Aead, ReplayWindow; 0 or -1 with an exception */
int fp_offload_init(PyObject *module);
int fp_io_init(PyObject *module);
int fp_lanes_init(PyObject *module); /* adds Sealer, Lane */
int fp_pump_init(PyObject *module);  /* adds Pump */

/* Entry points lanes.c composes (METH_FASTCALL signatures; `mod` unused). */
PyObject *fp_seal(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fp_tun_read(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fp_tun_write(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fp_udp_send(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);

/* A datagram to send: udp.c's batch core, which lanes.c drives from its own buffers. */
typedef struct {
    const uint8_t *p;
    size_t n;
} fp_iov;
struct sockaddr;
/* udp_send's core: bufs[0..n) to `sa`, GSO runs while *gso (cleared when the device refuses
 * it); failures added to *dropped (queue full) and *errors (last one in *last_errno). */
void fp_udp_send_bufs(int fd, const struct sockaddr *sa, unsigned int salen, const fp_iov *bufs,
                      size_t n, int *gso, long long *dropped, long long *errors,
                      int *last_errno);

/* crypto.c's types as lanes.c sees them (no exception set by the tests). */
struct evp_cipher_ctx_st;
int fp_is_aead(PyObject *o);
int fp_is_replay(PyObject *o);
struct evp_cipher_ctx_st *fp_aead_dec(PyObject *aead);
struct evp_cipher_ctx_st *fp_aead_enc(PyObject *aead);

/* An int argument (PyLong_AsInt is 3.13+). -1 with an exception set on error. */
static inline int fp_as_int(PyObject *o) {
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "value out of range for a C int");
        return -1;
    }
    return (int)v;
}

/* Little-endian and big-endian loads and stores, alignment-free. */
static inline uint16_t fp_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline void fp_put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline uint32_t fp_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t fp_le64(const uint8_t *p) {
    return (uint64_t)fp_le32(p) | ((uint64_t)fp_le32(p + 4) << 32);
}
static inline void fp_put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline void fp_put_le64(uint8_t *p, uint64_t v) {
    fp_put_le32(p, (uint32_t)v); fp_put_le32(p + 4, (uint32_t)(v >> 32));
}

#endif
