/* The Python-free core of crypto.c: WireGuard transport data messages on plain byte buffers.
 *
 * The twin of agent/proto/wireguard/transport.py and replay.py. No CPython API and no
 * allocation here, so the same code links into the CPython module (crypto.c's wrappers) and
 * into the libFuzzer harnesses of fuzz/native/. ChaCha20-Poly1305 is OpenSSL's EVP, one context
 * per key and direction, reused (the caller owns it). Every length is checked before use.
 *
 * Transport message: 04 00 00 00 | receiver LE32 | counter LE64 | ciphertext of the payload
 * zero-padded to 16 | 16-byte tag. Nonce: 4 zero bytes || counter LE64.
 */
#ifndef AGENT_TRANSPORT_H
#define AGENT_TRANSPORT_H

#include <openssl/evp.h>
#include <stddef.h>
#include <stdint.h>

#define FP_TAG_LEN 16
#define FP_KEY_LEN 32
#define FP_NONCE_LEN 12
#define FP_HEADER_LEN 16
#define FP_MIN_MESSAGE (FP_HEADER_LEN + FP_TAG_LEN)
#define FP_REJECT_AFTER_MESSAGES (UINT64_MAX - (UINT64_C(1) << 13))  /* 2^64 - 2^13 - 1 */

/* RFC 6479 replay window: 128 blocks of 64 bits, 8128 counters behind the newest. */
#define FP_RING_BLOCKS 128
typedef struct {
    uint64_t last;
    uint64_t blocks[FP_RING_BLOCKS];
} fp_replay;

/* 1 and remember `counter` if it is new and inside the window; 0 if replayed or too old. */
int fp_replay_accept(fp_replay *w, uint64_t counter);

/* out = ciphertext || tag of in[0..n) (out may equal in; out has n + 16 bytes). 0 on success. */
int fp_aead_seal(EVP_CIPHER_CTX *c, const uint8_t nonce[FP_NONCE_LEN], const uint8_t *aad,
                 size_t aad_len, const uint8_t *in, size_t n, uint8_t *out);
/* out = plaintext of in[0..n) (tag last, n >= 16; out has n - 16 bytes). 0 if authentic. */
int fp_aead_open(EVP_CIPHER_CTX *c, const uint8_t nonce[FP_NONCE_LEN], const uint8_t *aad,
                 size_t aad_len, const uint8_t *in, size_t n, uint8_t *out);

/* The transport message for `packet` (len n): out needs fp_sealed_len(n) bytes. 0 on success. */
static inline size_t fp_sealed_len(size_t n) { return FP_HEADER_LEN + n + ((16 - (n & 15)) & 15) + FP_TAG_LEN; }
int fp_seal_message(EVP_CIPHER_CTX *c, uint32_t receiver, uint64_t counter,
                    const uint8_t *packet, size_t n, uint8_t *out);

/* What opening one message gave. */
typedef enum {
    FP_OPEN_PACKET = 0,   /* an IP packet: out[0..*len), source address at *src (*src_len) */
    FP_OPEN_KEEPALIVE,    /* authentic, new, empty */
    FP_OPEN_AUTH,         /* drop: AEAD failed */
    FP_OPEN_REPLAY,       /* drop: counter replayed or too old */
    FP_OPEN_NOT_IP,       /* drop: neither IPv4 nor IPv6, or shorter than its header */
    FP_OPEN_MALFORMED,    /* drop: IP length beyond the payload or below 20 */
} fp_open_verdict;

/* Is msg[0..len) a transport message for `receiver`? (type word, receiver, minimum size) */
int fp_is_transport_for(const uint8_t *msg, size_t len, uint32_t receiver);

/* Open one transport message (fp_is_transport_for was true): authenticate, then the replay
 * window, then the IP header. `out` has len - 32 bytes; on FP_OPEN_PACKET *out_len is the IP
 * length (padding trimmed) and *src points into out. */
fp_open_verdict fp_open_message(EVP_CIPHER_CTX *c, fp_replay *w, const uint8_t *msg, size_t len,
                                uint8_t *out, size_t *out_len, const uint8_t **src,
                                size_t *src_len);

#endif
