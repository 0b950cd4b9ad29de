/* What the libFuzzer harnesses of fuzz/native/ share: a failed invariant aborts (libFuzzer
 * saves the input), exact-size heap copies (AddressSanitizer traps a read one byte past a
 * packet), and a textbook checksum to hold the word-wide one against. */
#ifndef AGENT_FUZZ_NATIVE_H
#define AGENT_FUZZ_NATIVE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond)                                                                         \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            fprintf(stderr, "invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
            abort();                                                                        \
        }                                                                                   \
    } while (0)

/* A heap copy of exactly n bytes (malloc(0) may return NULL: one spare byte, never read). */
static inline uint8_t *dup_exact(const uint8_t *p, size_t n) {
    uint8_t *out = malloc(n ? n : 1);
    CHECK(out != NULL);
    if (n) memcpy(out, p, n);
    return out;
}

static inline uint16_t get_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t get_be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* RFC 1071, one big-endian word at a time with end-around carry after each add. */
static inline uint32_t ref_sum(const uint8_t *p, size_t n, uint32_t acc) {
    for (size_t i = 0; i < n; i += 2) {
        acc += (uint32_t)p[i] << 8 | (i + 1 < n ? p[i + 1] : 0);
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    return acc;
}

static inline uint32_t ref_fold(uint32_t acc) {
    while (acc > 0xFFFF) acc = (acc & 0xFFFF) + (acc >> 16);
    return acc;
}

/* The pseudo-header sum of an IP packet's addresses, protocol and transport length. */
static inline uint32_t ref_pseudo(const uint8_t *ip, int v4, int proto, uint32_t l4len) {
    uint32_t acc = v4 ? ref_sum(ip + 12, 8, 0) : ref_sum(ip + 8, 32, 0);
    return ref_fold(acc + (uint32_t)proto + (l4len & 0xFFFF) + (l4len >> 16));
}

#endif
