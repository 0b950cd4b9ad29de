/* libFuzzer target: WireGuard transport messages through native/transport.c's core.
 *
 * The attacker is an authenticated peer (it holds the session key) or anyone on the path (it
 * does not). Input: one flag byte, a 64-bit counter, then the payload. Each run
 *   1. seals the payload under a fixed key and opens it again: the plaintext must come back
 *      byte for byte (padding trimmed by the IP length when it is a valid IP packet), and the
 *      source address must lie inside the output buffer;
 *   2. flips one byte or truncates the sealed message (flag bits): the open must fail cleanly;
 *   3. opens the raw input as if it were a message from the network.
 * Output buffers are heap-allocated at their exact size, so AddressSanitizer sees any overrun.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../native/transport.h"

static EVP_CIPHER_CTX *enc, *dec;

static void setup(void) {
    static const uint8_t key[FP_KEY_LEN] = {7, 1, 2, 3};
    enc = EVP_CIPHER_CTX_new();
    dec = EVP_CIPHER_CTX_new();
    if (!enc || !dec || EVP_EncryptInit_ex(enc, EVP_chacha20_poly1305(), NULL, key, NULL) != 1 ||
        EVP_DecryptInit_ex(dec, EVP_chacha20_poly1305(), NULL, key, NULL) != 1)
        abort();
}

static fp_open_verdict open_copy(fp_replay *w, const uint8_t *msg, size_t len, uint8_t **out,
                                 size_t *out_len, const uint8_t **src, size_t *src_len) {
    *out = malloc(len - FP_MIN_MESSAGE + 1);  /* +1: malloc(0) may return NULL */
    if (!*out) abort();
    fp_open_verdict v = fp_open_message(dec, w, msg, len, *out, out_len, src, src_len);
    if (v == FP_OPEN_PACKET) {
        if (*out_len > len - FP_MIN_MESSAGE || *out_len < 20) abort();
        if (*src < *out || *src + *src_len > *out + *out_len) abort();
    }
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!enc) setup();
    if (size < 9) return 0;
    uint8_t flags = data[0];
    uint64_t counter;
    memcpy(&counter, data + 1, 8);
    counter %= FP_REJECT_AFTER_MESSAGES;
    const uint8_t *payload = data + 9;
    size_t n = size - 9;

    /* 1. seal and open */
    size_t mlen = fp_sealed_len(n);
    uint8_t *msg = malloc(mlen);
    if (!msg) abort();
    if (fp_seal_message(enc, 0x01020304, counter, payload, n, msg) != 0) abort();
    if (!fp_is_transport_for(msg, mlen, 0x01020304) || fp_is_transport_for(msg, mlen, 5)) abort();
    fp_replay w;
    memset(&w, 0, sizeof(w));
    uint8_t *out;
    size_t out_len = 0, src_len = 0;
    const uint8_t *src = NULL;
    fp_open_verdict v = open_copy(&w, msg, mlen, &out, &out_len, &src, &src_len);
    if (v == FP_OPEN_AUTH || v == FP_OPEN_REPLAY) abort();
    if (v == FP_OPEN_KEEPALIVE && n != 0) abort();
    if (v == FP_OPEN_PACKET && memcmp(out, payload, out_len < n ? out_len : n) != 0) abort();
    free(out);
    /* the same message again is a replay */
    if (open_copy(&w, msg, mlen, &out, &out_len, &src, &src_len) != FP_OPEN_REPLAY) abort();
    free(out);

    /* 2. a flipped byte past the header, or a shorter message, never authenticates */
    if (flags & 1) {
        fp_replay fresh;
        memset(&fresh, 0, sizeof(fresh));
        size_t at = FP_HEADER_LEN + (size_t)(flags >> 1) % (mlen - FP_HEADER_LEN);
        msg[at] ^= 0x40;
        if (open_copy(&fresh, msg, mlen, &out, &out_len, &src, &src_len) != FP_OPEN_AUTH) abort();
        free(out);
        if ((flags & 2) && mlen > FP_MIN_MESSAGE + 16) {
            memset(&fresh, 0, sizeof(fresh));
            if (open_copy(&fresh, msg, mlen - 16, &out, &out_len, &src, &src_len) != FP_OPEN_AUTH)
                abort();
            free(out);
        }
    }
    free(msg);

    /* 3. the raw input as a message from the network */
    if (size >= FP_MIN_MESSAGE) {
        uint8_t *raw = malloc(size);
        if (!raw) abort();
        memcpy(raw, data, size);
        uint32_t receiver = (uint32_t)raw[4] | ((uint32_t)raw[5] << 8) |
                            ((uint32_t)raw[6] << 16) | ((uint32_t)raw[7] << 24);
        if (fp_is_transport_for(raw, size, receiver)) {
            memset(&w, 0, sizeof(w));
            open_copy(&w, raw, size, &out, &out_len, &src, &src_len);
            free(out);
        }
        free(raw);
    }
    return 0;
}
