/* Transport data messages in C: the twin of agent/proto/wireguard/transport.py.
 *
 *   Aead(key)                 ChaCha20-Poly1305 (OpenSSL EVP), one context per direction, reused;
 *                             encrypt/decrypt(nonce, data, aad) as cryptography's AEAD classes
 *   ReplayWindow()            accept(counter): RFC 6479 ring of 128 64-bit blocks, as replay.py
 *   seal(aead, remote_index, counter, packets) -> [datagram]
 *   open_run(aead, replay, datagrams, start, index)
 *       -> (next, packets, sources, authentication, replay, not_ip, malformed, wire_bytes, data)
 *
 * Transport message: 04 00 00 00 | receiver LE32 | counter LE64 | ciphertext of the payload
 * zero-padded to 16 | 16-byte tag. Nonce: 4 zero bytes || counter LE64.
 */
#include "fastpath.h"
#include "transport.h"

#include <string.h>

#define TAG_LEN FP_TAG_LEN
#define KEY_LEN FP_KEY_LEN
#define NONCE_LEN FP_NONCE_LEN
#define HEADER_LEN FP_HEADER_LEN
#define REJECT_AFTER_MESSAGES FP_REJECT_AFTER_MESSAGES

static PyObject *invalid_tag;  /* cryptography.exceptions.InvalidTag */

/* ------------------------------------------------------------------ Aead */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
} AeadObject;

static void aead_dealloc(AeadObject *self) {
    EVP_CIPHER_CTX_free(self->enc);  /* frees and cleanses the key schedule */
    EVP_CIPHER_CTX_free(self->dec);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int aead_init(AeadObject *self, PyObject *args, PyObject *kwds) {
    Py_buffer key;
    static char *kwlist[] = {"key", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*:Aead", kwlist, &key)) return -1;
    if (key.len != KEY_LEN) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "ChaCha20Poly1305 key must be 32 bytes.");
        return -1;
    }
    EVP_CIPHER_CTX_free(self->enc);
    EVP_CIPHER_CTX_free(self->dec);
    self->enc = EVP_CIPHER_CTX_new();
    self->dec = EVP_CIPHER_CTX_new();
    int ok = self->enc && self->dec &&
             EVP_EncryptInit_ex(self->enc, EVP_chacha20_poly1305(), NULL, key.buf, NULL) == 1 &&
             EVP_DecryptInit_ex(self->dec, EVP_chacha20_poly1305(), NULL, key.buf, NULL) == 1;
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL refused ChaCha20-Poly1305");
        return -1;
    }
    return 0;
}

static int parse_nonce_aad(PyObject *nonce, PyObject *aad, Py_buffer *nb, Py_buffer *ab) {
    if (PyObject_GetBuffer(nonce, nb, PyBUF_SIMPLE) < 0) return -1;
    if (nb->len != NONCE_LEN) {
        PyBuffer_Release(nb);
        PyErr_SetString(PyExc_ValueError, "Nonce must be 12 bytes");
        return -1;
    }
    ab->buf = NULL;
    ab->len = 0;
    ab->obj = NULL;
    if (aad != Py_None && PyObject_GetBuffer(aad, ab, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(nb);
        return -1;
    }
    return 0;
}

static PyObject *aead_encrypt(AeadObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encrypt(nonce, data, associated_data)");
        return NULL;
    }
    Py_buffer nb, ab, data;
    if (parse_nonce_aad(args[0], args[2], &nb, &ab) < 0) return NULL;
    PyObject *out = NULL;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) == 0) {
        out = PyBytes_FromStringAndSize(NULL, data.len + TAG_LEN);
        if (out && fp_aead_seal(self->enc, nb.buf, ab.buf, (size_t)ab.len, data.buf, (size_t)data.len,
                            (uint8_t *)PyBytes_AS_STRING(out)) != 0) {
            Py_CLEAR(out);
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL encryption failed");
        }
        PyBuffer_Release(&data);
    }
    PyBuffer_Release(&nb);
    if (ab.obj) PyBuffer_Release(&ab);
    return out;
}

static PyObject *aead_decrypt(AeadObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "decrypt(nonce, data, associated_data)");
        return NULL;
    }
    Py_buffer nb, ab, data;
    if (parse_nonce_aad(args[0], args[2], &nb, &ab) < 0) return NULL;
    PyObject *out = NULL;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) == 0) {
        if (data.len < TAG_LEN) {
            PyErr_SetNone(invalid_tag);
        } else {
            out = PyBytes_FromStringAndSize(NULL, data.len - TAG_LEN);
            if (out && fp_aead_open(self->dec, nb.buf, ab.buf, (size_t)ab.len, data.buf,
                                (size_t)data.len, (uint8_t *)PyBytes_AS_STRING(out)) != 0) {
                Py_CLEAR(out);
                PyErr_SetNone(invalid_tag);
            }
        }
        PyBuffer_Release(&data);
    }
    PyBuffer_Release(&nb);
    if (ab.obj) PyBuffer_Release(&ab);
    return out;
}

static PyMethodDef aead_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))aead_encrypt, METH_FASTCALL,
     "encrypt(nonce, data, associated_data) -> ciphertext || tag"},
    {"decrypt", (PyCFunction)(void (*)(void))aead_decrypt, METH_FASTCALL,
     "decrypt(nonce, data, associated_data) -> plaintext; raises InvalidTag"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AeadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._fastpath.Aead",
    .tp_doc = "ChaCha20-Poly1305 with one reused OpenSSL context per direction.",
    .tp_basicsize = sizeof(AeadObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)aead_init,
    .tp_dealloc = (destructor)aead_dealloc,
    .tp_methods = aead_methods,
};

/* ------------------------------------------------------------------ ReplayWindow */

typedef struct {
    PyObject_HEAD
    fp_replay w;
} ReplayObject;

static PyObject *replay_accept(ReplayObject *self, PyObject *arg) {
    unsigned long long c = PyLong_AsUnsignedLongLong(arg);
    if (c == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return NULL;
        PyErr_Clear();  /* negative or >= 2^64: never a valid counter */
        Py_RETURN_FALSE;
    }
    return PyBool_FromLong(fp_replay_accept(&self->w, (uint64_t)c));
}

static PyMethodDef replay_methods[] = {
    {"accept", (PyCFunction)replay_accept, METH_O,
     "accept(counter) -> True (and remember it) if new and inside the window"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReplayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._fastpath.ReplayWindow",
    .tp_doc = "Sliding-window replay filter for transport counters (RFC 6479).",
    .tp_basicsize = sizeof(ReplayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,  /* zeroed: last = 0, every block empty */
    .tp_methods = replay_methods,
};

/* ------------------------------------------------------------------ seal */

PyObject *fp_seal(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 4 || !PyObject_TypeCheck(args[0], &AeadType)) {
        PyErr_SetString(PyExc_TypeError, "seal(aead: Aead, remote_index, counter, packets)");
        return NULL;
    }
    AeadObject *aead = (AeadObject *)args[0];
    unsigned long index = PyLong_AsUnsignedLong(args[1]);
    if (index == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (index > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "remote_index is 32 bits");
        return NULL;
    }
    unsigned long long ctr = PyLong_AsUnsignedLongLong(args[2]);
    if (ctr == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    PyObject *seq = PySequence_Fast(args[3], "packets must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if ((uint64_t)n > REJECT_AFTER_MESSAGES || ctr > REJECT_AFTER_MESSAGES - (uint64_t)n) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_OverflowError, "send counter exhausted");
        return NULL;
    }
    PyObject *out = PyList_New(n);
    if (!out) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer p;
        if (PyObject_GetBuffer(items[i], &p, PyBUF_SIMPLE) < 0) goto fail;
        PyObject *d = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)fp_sealed_len((size_t)p.len));
        if (!d) {
            PyBuffer_Release(&p);
            goto fail;
        }
        int rc = fp_seal_message(aead->enc, (uint32_t)index, (uint64_t)ctr, p.buf, (size_t)p.len,
                                 (uint8_t *)PyBytes_AS_STRING(d));
        PyBuffer_Release(&p);
        if (rc != 0) {
            Py_DECREF(d);
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL encryption failed");
            goto fail;
        }
        PyList_SET_ITEM(out, i, d);
        ctr++;
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_DECREF(seq);
    Py_DECREF(out);
    return NULL;
}

/* ------------------------------------------------------------------ open_run */

static PyObject *fp_open_run(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 5 || !PyObject_TypeCheck(args[0], &AeadType) ||
        !PyObject_TypeCheck(args[1], &ReplayType)) {
        PyErr_SetString(PyExc_TypeError,
                        "open_run(aead: Aead, replay: ReplayWindow, datagrams, start, index)");
        return NULL;
    }
    AeadObject *aead = (AeadObject *)args[0];
    ReplayObject *replay = (ReplayObject *)args[1];
    Py_ssize_t start = PyLong_AsSsize_t(args[3]);
    if (start == -1 && PyErr_Occurred()) return NULL;
    unsigned long index = PyLong_AsUnsignedLong(args[4]);
    if (index == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    PyObject *seq = PySequence_Fast(args[2], "datagrams must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (start < 0) start = 0;
    PyObject *packets = PyList_New(0), *sources = PyList_New(0);
    long long n_auth = 0, n_replay = 0, n_not_ip = 0, n_malformed = 0, wire = 0;
    int data = 0;
    uint8_t last_src[16];
    size_t last_src_len = 0;
    Py_ssize_t i = start;
    if (!packets || !sources) goto fail;
    for (; i < n; i++) {
        Py_buffer d;
        if (PyObject_GetBuffer(items[i], &d, PyBUF_SIMPLE) < 0) goto fail;
        const uint8_t *b = d.buf;
        size_t len = (size_t)d.len;
        if (!fp_is_transport_for(b, len, (uint32_t)index)) {
            PyBuffer_Release(&d);
            break;  /* not ours: the caller looks at it */
        }
        PyObject *pt = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(len - HEADER_LEN - TAG_LEN));
        if (!pt) {
            PyBuffer_Release(&d);
            goto fail;
        }
        size_t length = 0, src_len = 0;
        const uint8_t *src = NULL;
        fp_open_verdict verdict = fp_open_message(aead->dec, &replay->w, b, len,
                                                  (uint8_t *)PyBytes_AS_STRING(pt), &length,
                                                  &src, &src_len);
        PyBuffer_Release(&d);
        if (verdict != FP_OPEN_PACKET) {
            Py_DECREF(pt);
            switch (verdict) {
            case FP_OPEN_AUTH: n_auth++; break;
            case FP_OPEN_REPLAY: n_replay++; break;
            case FP_OPEN_NOT_IP: n_not_ip++; data = 1; wire += (long long)len; break;
            case FP_OPEN_MALFORMED: n_malformed++; data = 1; wire += (long long)len; break;
            default: wire += (long long)len; break;  /* keepalive */
            }
            continue;
        }
        data = 1;
        wire += (long long)len;
        size_t m = len - HEADER_LEN - TAG_LEN;
        if (src_len != last_src_len || memcmp(src, last_src, src_len) != 0) {
            memcpy(last_src, src, src_len);
            last_src_len = src_len;
            int seen = 0;
            Py_ssize_t ns = PyList_GET_SIZE(sources);
            for (Py_ssize_t k = 0; k < ns && !seen; k++) {
                PyObject *s = PyList_GET_ITEM(sources, k);
                seen = (size_t)PyBytes_GET_SIZE(s) == src_len &&
                       memcmp(PyBytes_AS_STRING(s), src, src_len) == 0;
            }
            if (!seen) {
                PyObject *s = PyBytes_FromStringAndSize((const char *)src, (Py_ssize_t)src_len);
                if (!s || PyList_Append(sources, s) < 0) {
                    Py_XDECREF(s);
                    Py_DECREF(pt);
                    goto fail;
                }
                Py_DECREF(s);
            }
        }
        if (length < m && _PyBytes_Resize(&pt, (Py_ssize_t)length) < 0) goto fail;
        if (PyList_Append(packets, pt) < 0) {
            Py_DECREF(pt);
            goto fail;
        }
        Py_DECREF(pt);
    }
    Py_DECREF(seq);
    return Py_BuildValue("(nNNLLLLLO)", i, packets, sources, n_auth, n_replay, n_not_ip,
                         n_malformed, wire, data ? Py_True : Py_False);
fail:
    Py_DECREF(seq);
    Py_XDECREF(packets);
    Py_XDECREF(sources);
    return NULL;
}

PyMethodDef fp_crypto_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))fp_seal, METH_FASTCALL,
     "seal(aead, remote_index, counter, packets) -> transport datagrams"},
    {"open_run", (PyCFunction)(void (*)(void))fp_open_run, METH_FASTCALL,
     "open_run(aead, replay, datagrams, start, index) -> (next, packets, sources, authentication,"
     " replay, not_ip, malformed, wire_bytes, data)"},
    {NULL, NULL, 0, NULL},
};

int fp_is_aead(PyObject *o) { return PyObject_TypeCheck(o, &AeadType); }
int fp_is_replay(PyObject *o) { return PyObject_TypeCheck(o, &ReplayType); }
EVP_CIPHER_CTX *fp_aead_dec(PyObject *aead) { return ((AeadObject *)aead)->dec; }
EVP_CIPHER_CTX *fp_aead_enc(PyObject *aead) { return ((AeadObject *)aead)->enc; }
fp_replay *fp_replay_of(PyObject *replay) { return &((ReplayObject *)replay)->w; }

int fp_crypto_init(PyObject *module) {
    PyObject *exc = PyImport_ImportModule("cryptography.exceptions");
    if (!exc) return -1;
    invalid_tag = PyObject_GetAttrString(exc, "InvalidTag");
    Py_DECREF(exc);
    if (!invalid_tag) return -1;
    if (PyType_Ready(&AeadType) < 0 || PyType_Ready(&ReplayType) < 0) return -1;
    if (PyModule_AddObjectRef(module, "Aead", (PyObject *)&AeadType) < 0) return -1;
    if (PyModule_AddObjectRef(module, "ReplayWindow", (PyObject *)&ReplayType) < 0) return -1;
    return 0;
}
