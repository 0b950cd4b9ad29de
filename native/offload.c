/* TUN offload arithmetic in C: the twin of agent/proto/offload (segment, checksum, coalesce).
 *
 *   segment(hdr, packet) -> [bytes]      segment.segment(VirtioNetHdr.parse(hdr), packet)
 *   coalesce(packets, udp) -> [bytes]    [head + b"".join(bufs) for head, bufs in
 *                                         coalesce.coalesce(packets, udp=udp)]
 *
 * The core (everything above the CPython section) works on plain byte buffers and is declared
 * in offload.h; fuzz/native/ links it alone, compiled with -DFP_CORE_ONLY. Checksums are
 * one's-complement sums over 64-bit loads in host order, folded and byte-swapped once at the
 * end (RFC 1071's byte-order independence), fused with the copy that builds each segment.
 */
#ifndef FP_CORE_ONLY
#include "offload_py.h" /* Python.h first, as CPython asks */
#endif
#include "offload.h"

#include <string.h>

/* ------------------------------------------------------------------ bytes */

static inline uint64_t ld64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}
static inline uint32_t ld32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static inline uint16_t ld16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}
static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void put_be16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static inline void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

const char *fp_err_text(fp_err err) {
    switch (err) {
    case FP_OK: return "ok";
    case FP_ERR_SHORT_VNET: return "short virtio_net_hdr";
    case FP_ERR_CSUM_OFFSETS: return "checksum offsets outside the packet";
    case FP_ERR_UNSUPPORTED_GSO: return "unsupported gso_type";
    case FP_ERR_GSO_SIZE_0: return "gso_size 0";
    case FP_ERR_TOO_LONG: return "GSO super-packet longer than 65535 bytes";
    case FP_ERR_SHORT_IP: return "short IP packet";
    case FP_ERR_BAD_IHL: return "bad IPv4 header length";
    case FP_ERR_NOT_IP: return "not IPv4/IPv6";
    case FP_ERR_TRUNC_V6_EXT: return "truncated IPv6 extension header";
    case FP_ERR_TRUNC_TCP: return "truncated TCP header";
    case FP_ERR_BAD_DOFF: return "bad TCP data offset";
    case FP_ERR_OUTSIDE: return "transport header outside the packet";
    case FP_ERR_ODD_OFFSET: return "transport header at an odd offset";
    case FP_ERR_VERSION: return "gso_type does not match the IP version";
    }
    return "malformed packet";
}

void fp_vnet_parse(const uint8_t *p, fp_vnet_hdr *h) {
    h->flags = p[0];
    h->gso_type = p[1];
    h->hdr_len = ld16(p + 2);
    h->gso_size = ld16(p + 4);
    h->csum_start = ld16(p + 6);
    h->csum_offset = ld16(p + 8);
}

void fp_vnet_encode(const fp_vnet_hdr *h, uint8_t *p) {
    p[0] = h->flags;
    p[1] = h->gso_type;
    memcpy(p + 2, &h->hdr_len, 2);
    memcpy(p + 4, &h->gso_size, 2);
    memcpy(p + 6, &h->csum_start, 2);
    memcpy(p + 8, &h->csum_offset, 2);
}

/* ------------------------------------------------------------------ checksums */

/* Host-order 16-bit words summed as 32-bit halves of 64-bit loads: 2^32 = 1 (mod 2^16 - 1), so
 * the folded total is the one's-complement sum of the words (no carry can be lost before 2^32
 * loads). A lone last byte is the first byte of a zero-padded word. */
static inline uint64_t fold_in(uint64_t acc, uint64_t v) { return acc + (v & 0xFFFFFFFFu) + (v >> 32); }

static inline uint64_t sum_tail(uint64_t acc, const uint8_t *p, size_t n) {
    if (n & 4) {
        acc += ld32(p);
        p += 4;
    }
    if (n & 2) {
        acc += ld16(p);
        p += 2;
    }
    if (n & 1) {
        uint8_t pad[2] = {p[0], 0};
        acc += ld16(pad);
    }
    return acc;
}

/* Folded host-order sum -> the big-endian sum's value. */
static inline uint16_t fold_host(uint64_t acc) {
    acc = (acc & 0xFFFFFFFFu) + (acc >> 32);
    acc = (acc & 0xFFFFFFFFu) + (acc >> 32);
    acc = (acc & 0xFFFF) + (acc >> 16);
    acc = (acc & 0xFFFF) + (acc >> 16);
    uint16_t h = (uint16_t)acc;
    uint8_t b[2];
    memcpy(b, &h, 2);
    return (uint16_t)((b[0] << 8) | b[1]);
}

uint16_t fp_csum(const uint8_t *p, size_t n) {
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (; n >= 32; p += 32, n -= 32) {
        a = fold_in(a, ld64(p));
        b = fold_in(b, ld64(p + 8));
        c = fold_in(c, ld64(p + 16));
        d = fold_in(d, ld64(p + 24));
    }
    for (; n >= 8; p += 8, n -= 8) a = fold_in(a, ld64(p));
    return fold_host(sum_tail(a + b + c + d, p, n));
}

uint16_t fp_csum_copy(uint8_t *dst, const uint8_t *src, size_t n) {
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (; n >= 32; src += 32, dst += 32, n -= 32) {
        uint64_t w0 = ld64(src), w1 = ld64(src + 8), w2 = ld64(src + 16), w3 = ld64(src + 24);
        memcpy(dst, &w0, 8);
        memcpy(dst + 8, &w1, 8);
        memcpy(dst + 16, &w2, 8);
        memcpy(dst + 24, &w3, 8);
        a = fold_in(a, w0);
        b = fold_in(b, w1);
        c = fold_in(c, w2);
        d = fold_in(d, w3);
    }
    memcpy(dst, src, n);
    for (; n >= 8; src += 8, n -= 8) a = fold_in(a, ld64(src));
    return fold_host(sum_tail(a + b + c + d, src, n));
}

/* ------------------------------------------------------------------ segmentation */

#define PROTO_TCP 6
#define PROTO_UDP 17
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_URG 0x20
#define TCP_CWR 0x80

/* segment.py's _layout and the checks of segment(), in the same order. */
static fp_err gso_layout(const fp_vnet_hdr *h, int gso, const uint8_t *pkt, size_t len,
                         fp_segment_plan *pl) {
    if (len < 20) return FP_ERR_SHORT_IP;
    int version = pkt[0] >> 4;
    if (version == 4) {
        if ((pkt[0] & 0x0F) < 5) return FP_ERR_BAD_IHL;
    } else if (version != 6 || len < 40) {
        return FP_ERR_NOT_IP;
    }
    /* where the transport header starts: csum_start, else the IP header's own account */
    size_t l3len;
    if (h->flags & FP_F_NEEDS_CSUM) {
        l3len = h->csum_start;
    } else if (version == 4) {
        l3len = (size_t)(pkt[0] & 0x0F) * 4;
    } else {
        size_t off = 40;
        int nxt = pkt[6];
        while (nxt == 0 || nxt == 43 || nxt == 60) { /* hop-by-hop, routing, destination */
            if (off + 8 > len) return FP_ERR_TRUNC_V6_EXT;
            nxt = pkt[off];
            off += ((size_t)pkt[off + 1] + 1) * 8;
        }
        l3len = off;
    }
    /* the GSO type decides the protocol (the header's own next-protocol field is not read) */
    int proto = gso == FP_GSO_UDP_L4 ? PROTO_UDP : PROTO_TCP;
    size_t l4len;
    if (proto == PROTO_TCP) {
        if (l3len + 20 > len) return FP_ERR_TRUNC_TCP;
        l4len = (size_t)(pkt[l3len + 12] >> 4) * 4;
        if (l4len < 20) return FP_ERR_BAD_DOFF;
    } else {
        l4len = 8;
    }
    if (l3len < (version == 4 ? 20u : 40u) || l3len + l4len > len) return FP_ERR_OUTSIDE;
    if (l3len & 1) return FP_ERR_ODD_OFFSET;
    if ((gso == FP_GSO_TCPV4) != (version == 4) && gso != FP_GSO_UDP_L4) return FP_ERR_VERSION;
    pl->v4 = version == 4;
    pl->tcp = proto == PROTO_TCP;
    pl->l3len = l3len;
    pl->l4len = l4len;
    pl->hlen = l3len + l4len;
    pl->plen = len - pl->hlen;
    pl->mss = h->gso_size;
    pl->count = pl->plen ? (pl->plen + pl->mss - 1) / pl->mss : 1;
    uint16_t addrs = pl->v4 ? fp_csum(pkt + 12, 8) : fp_csum(pkt + 8, 32);
    pl->pseudo = fp_csum_add(addrs, (uint32_t)proto);
    return FP_OK;
}

fp_err fp_segment_plan_make(const fp_vnet_hdr *h, const uint8_t *pkt, size_t len,
                            fp_segment_plan *pl) {
    memset(pl, 0, sizeof *pl);
    pl->pkt = pkt;
    pl->len = len;
    pl->count = 1;
    int gso = h->gso_type & ~FP_GSO_ECN;
    if (gso == FP_GSO_NONE) {
        if (!(h->flags & FP_F_NEEDS_CSUM)) {
            pl->kind = FP_SEG_PASS;
            return FP_OK;
        }
        size_t start = h->csum_start, field = start + h->csum_offset;
        if (field + 2 > len || start < 20) return FP_ERR_CSUM_OFFSETS;
        pl->kind = FP_SEG_CSUM;
        pl->csum_start = start;
        pl->csum_field = field;
        pl->csum_udp = h->csum_offset == FP_UDP_CSUM_OFFSET;
        return FP_OK;
    }
    if (gso != FP_GSO_TCPV4 && gso != FP_GSO_TCPV6 && gso != FP_GSO_UDP_L4)
        return FP_ERR_UNSUPPORTED_GSO;
    if (h->gso_size == 0) return FP_ERR_GSO_SIZE_0;
    if (len > FP_MAX_IP_LEN) return FP_ERR_TOO_LONG;
    pl->kind = FP_SEG_GSO;
    return gso_layout(h, gso, pkt, len, pl);
}

static inline size_t chunk_len(const fp_segment_plan *pl, size_t i) {
    size_t off = i * pl->mss;
    if (off >= pl->plen) return 0;
    size_t left = pl->plen - off;
    return left < pl->mss ? left : pl->mss;
}

size_t fp_segment_len(const fp_segment_plan *pl, size_t i) {
    return pl->kind == FP_SEG_GSO ? pl->hlen + chunk_len(pl, i) : pl->len;
}

void fp_segment_write(const fp_segment_plan *pl, size_t i, uint8_t *out) {
    const uint8_t *pkt = pl->pkt;
    if (pl->kind == FP_SEG_PASS) {
        memcpy(out, pkt, pl->len);
        return;
    }
    if (pl->kind == FP_SEG_CSUM) {
        /* the field holds the pseudo-header sum; the sum runs from csum_start to the end */
        size_t start = pl->csum_start;
        memcpy(out, pkt, start);
        uint16_t sum = fp_csum_copy(out + start, pkt + start, pl->len - start);
        uint16_t csum = (uint16_t)~sum;
        if (csum == 0 && pl->csum_udp) csum = 0xFFFF;
        put_be16(out + pl->csum_field, csum);
        return;
    }
    size_t t = pl->l3len, hlen = pl->hlen, off = i * pl->mss, clen = chunk_len(pl, i);
    memcpy(out, pkt, hlen);
    uint16_t payload = fp_csum_copy(out + hlen, pkt + hlen + off, clen);
    if (pl->v4) {
        put_be16(out + 2, (uint32_t)(hlen + clen));
        put_be16(out + 4, be16(pkt + 4) + (uint32_t)i);
        out[10] = out[11] = 0;
        put_be16(out + 10, (uint16_t)~fp_csum(out, t));
    } else {
        put_be16(out + 4, (uint32_t)(hlen - 40 + clen));
    }
    uint32_t l4total = (uint32_t)(pl->l4len + clen);
    size_t field;
    if (pl->tcp) {
        put_be32(out + t + 4, be32(pkt + t + 4) + (uint32_t)off);
        uint8_t flags = pkt[t + 13];
        if (i != pl->count - 1) flags &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (i != 0) flags &= (uint8_t)~TCP_CWR;
        out[t + 13] = flags;
        field = t + FP_TCP_CSUM_OFFSET;
    } else {
        put_be16(out + t + 4, l4total);
        field = t + FP_UDP_CSUM_OFFSET;
    }
    out[field] = out[field + 1] = 0;
    uint16_t sum = fp_csum_add(fp_csum(out + t, pl->l4len), payload);
    sum = fp_csum_add(sum, fp_csum_add(pl->pseudo, l4total));
    uint16_t csum = (uint16_t)~sum;
    if (csum == 0 && !pl->tcp) csum = 0xFFFF;
    put_be16(out + field, csum);
}

/* ------------------------------------------------------------------ coalescing */

static size_t table_size(size_t n) {
    size_t size = 16;
    while (size < 2 * n) size <<= 1;
    return size;
}

size_t fp_coalesce_size(size_t n) {
    return n * sizeof(fp_item) + table_size(n) * sizeof(fp_flow_slot) +
           n * (3 * sizeof(uint32_t) + sizeof(uint16_t));
}

/* Flow keys live in the packets: the addresses (8 bytes from 12 for IPv4, 32 from 8 for IPv6)
 * and the ports at the transport header. TCP and UDP keys are separate tables in coalesce.py,
 * one table with a flag here. */
static inline const uint8_t *key_addrs(const uint8_t *p, int v6) { return v6 ? p + 8 : p + 12; }

static uint32_t key_hash(const uint8_t *p, int v6, size_t l3len, int udp) {
    const uint8_t *a = key_addrs(p, v6);
    uint64_t h = 0x9E3779B97F4A7C15u * (uint64_t)(udp + 1);
    for (size_t k = 0; k < (v6 ? 32u : 8u); k += 8) h = (h ^ ld64(a + k)) * 0xFF51AFD7ED558CCDu;
    h = (h ^ ld32(p + l3len)) * 0xC4CEB9FE1A85EC53u;
    return (uint32_t)(h >> 32);
}

/* The slot of the key of packet i (an empty slot takes the key, with no open run). */
static fp_flow_slot *flow_slot(fp_coalesce_plan *pl, const fp_buf *pkts, uint32_t i, int v6,
                               int udp) {
    const uint8_t *p = pkts[i].p;
    size_t l3len = pl->l3len[i];
    uint32_t hash = key_hash(p, v6, l3len, udp);
    size_t alen = v6 ? 32 : 8;
    for (size_t s = hash & pl->table_mask;; s = (s + 1) & pl->table_mask) {
        fp_flow_slot *slot = &pl->table[s];
        if (slot->pkt < 0) {
            slot->hash = hash;
            slot->pkt = (int32_t)i;
            slot->item = -1;
            slot->udp = (uint8_t)udp;
            slot->v6 = (uint8_t)v6;
            return slot;
        }
        if (slot->hash != hash || slot->udp != udp || slot->v6 != v6) continue;
        const uint8_t *q = pkts[slot->pkt].p;
        if (memcmp(key_addrs(q, v6), key_addrs(p, v6), alen) == 0 &&
            memcmp(q + pl->l3len[slot->pkt], p + l3len, 4) == 0)
            return slot;
    }
}

static fp_item *new_item(fp_coalesce_plan *pl, int kind, uint32_t i) {
    fp_item *item = &pl->items[pl->nitems++];
    memset(item, 0, sizeof *item);
    item->kind = (uint8_t)kind;
    item->first = item->last = i;
    item->count = 1;
    pl->next[i] = FP_NONE;
    return item;
}

static void add_raw(fp_coalesce_plan *pl, uint32_t i, size_t len) {
    new_item(pl, FP_ITEM_RAW, i)->raw_len = (uint32_t)len;
}

static void append(fp_coalesce_plan *pl, fp_item *item, uint32_t i, size_t off, size_t plen) {
    pl->next[item->last] = i;
    pl->next[i] = FP_NONE;
    pl->off[i] = (uint32_t)off;
    pl->plen[i] = (uint32_t)plen;
    item->last = i;
    item->count++;
}

/* coalesce.py's _UDP4/_UDP6 path; 1 when packet i was taken (it is a UDP datagram). */
static int coalesce_udp(fp_coalesce_plan *pl, const fp_buf *pkts, uint32_t i) {
    const uint8_t *p = pkts[i].p;
    size_t n = pkts[i].n;
    uint8_t b0 = p[0];
    size_t l3;
    uint32_t ulen;
    int ok, v6;
    if (b0 == 0x45) {
        if (p[9] != PROTO_UDP) return 0;
        uint32_t iplen = be16(p + 2);
        ulen = be16(p + 24);
        ok = iplen <= n && ulen + 20 == iplen && !(be16(p + 6) & 0x3FFF);
        l3 = 20;
        v6 = 0;
    } else if (b0 >> 4 == 6 && n >= 48 && p[6] == PROTO_UDP) {
        uint32_t plen6 = be16(p + 4);
        ulen = be16(p + 44);
        ok = plen6 + 40 <= n && ulen == plen6;
        l3 = 40;
        v6 = 1;
    } else {
        return 0;
    }
    pl->l3len[i] = (uint16_t)l3;
    fp_flow_slot *slot = flow_slot(pl, pkts, i, v6, 1);
    fp_item *run = slot->item >= 0 ? &pl->items[slot->item] : NULL;
    if (!ok || ulen < 8) {
        slot->item = -1; /* a later datagram may not pass it */
        add_raw(pl, i, n);
        return 1;
    }
    uint32_t plen = ulen - 8;
    if (run && !run->closed && plen > 0 && plen <= run->mss &&
        run->total + plen <= FP_MAX_IP_LEN && run->count < FP_MAX_UDP_SEGMENTS) {
        const uint8_t *q = pkts[run->first].p; /* same shape: TOS/TTL/fragment word, or the
                                                  first word and the hop limit */
        int same = v6 ? memcmp(p, q, 4) == 0 && p[7] == q[7]
                      : p[1] == q[1] && p[8] == q[8] && p[6] == q[6] && p[7] == q[7];
        if (same) {
            append(pl, run, i, l3 + 8, plen);
            run->total += plen;
            if (plen < run->mss) run->closed = 1;
            return 1;
        }
    }
    fp_item *item = new_item(pl, FP_ITEM_UDP, i);
    item->l3len = (uint16_t)l3;
    item->hlen = (uint16_t)(l3 + 8);
    item->mss = (uint16_t)plen;
    item->total = (uint32_t)(l3 + 8 + plen);
    item->closed = plen == 0;
    pl->off[i] = (uint32_t)(l3 + 8);
    pl->plen[i] = plen;
    slot->item = (int32_t)(item - pl->items);
    return 1;
}

/* coalesce.py's _tcp_segment_info and the TCP branch of coalesce(). */
static void coalesce_tcp(fp_coalesce_plan *pl, const fp_buf *pkts, uint32_t i) {
    const uint8_t *p = pkts[i].p;
    size_t n = pkts[i].n;
    if (n < 40) {
        add_raw(pl, i, n);
        return;
    }
    uint8_t b0 = p[0];
    size_t l3len;
    uint32_t iplen;
    int frag_ok, v6 = 0;
    if (b0 == 0x45) {
        if (p[9] != PROTO_TCP) goto raw;
        l3len = 20;
        iplen = be16(p + 2);
        frag_ok = !(be16(p + 6) & 0x3FFF);
    } else if (b0 >> 4 == 6) {
        if (n < 60 || p[6] != PROTO_TCP) goto raw;
        l3len = 40;
        iplen = 40 + (uint32_t)be16(p + 4);
        frag_ok = 1;
        v6 = 1;
    } else if (b0 >> 4 == 4) {
        if (p[9] != PROTO_TCP) goto raw;
        l3len = (size_t)(b0 & 0x0F) * 4;
        if (l3len < 20 || l3len + 20 > n) goto raw;
        iplen = be16(p + 2);
        frag_ok = 0; /* IPv4 options: never merged */
    } else {
        goto raw;
    }
    const uint8_t *th = p + l3len;
    size_t thlen = (size_t)(th[12] >> 4) * 4, hlen = l3len + thlen;
    if (iplen > n || thlen < 20 || hlen > iplen) goto raw;
    uint32_t plen = iplen - (uint32_t)hlen, seq = be32(th + 4);
    uint8_t flags = th[13];
    int mergeable = frag_ok && !(flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_CWR)) &&
                    (flags & TCP_ACK);
    pl->l3len[i] = (uint16_t)l3len;
    fp_flow_slot *slot = flow_slot(pl, pkts, i, v6, 0);
    fp_item *run = slot->item >= 0 ? &pl->items[slot->item] : NULL;
    if (run && mergeable && !run->closed && seq == run->next_seq && plen > 0 &&
        plen <= run->mss && run->total + plen <= FP_MAX_IP_LEN &&
        run->count < FP_MAX_TCP_SEGMENTS && run->hlen == hlen) {
        /* same shape: the IP fields that must match, then ACK, data offset, flags but PSH,
           options (hlen equal: the data offsets may still differ in their low bits) */
        const uint8_t *q = pkts[run->first].p, *qh = q + l3len;
        int same = v6 ? memcmp(p, q, 4) == 0 && p[7] == q[7]
                      : p[1] == q[1] && p[8] == q[8] && p[6] == q[6] && p[7] == q[7];
        same = same && memcmp(th + 8, qh + 8, 5) == 0 && (th[13] & ~TCP_PSH) == (qh[13] & ~TCP_PSH) &&
               memcmp(th + 20, qh + 20, thlen - 20) == 0;
        if (same) {
            append(pl, run, i, hlen, plen);
            run->total += plen;
            run->next_seq = seq + plen;
            if (plen < run->mss || (flags & TCP_PSH)) {
                run->psh = (flags & TCP_PSH) != 0;
                run->closed = 1;
            }
            return;
        }
    }
    if (!mergeable) {
        slot->item = -1;
        add_raw(pl, i, hlen + plen);
        return;
    }
    fp_item *item = new_item(pl, FP_ITEM_TCP, i);
    item->l3len = (uint16_t)l3len;
    item->hlen = (uint16_t)hlen;
    item->mss = (uint16_t)plen;
    item->next_seq = seq + plen;
    item->total = (uint32_t)(hlen + plen);
    item->closed = plen == 0 || (flags & TCP_PSH);
    pl->off[i] = (uint32_t)hlen;
    pl->plen[i] = plen;
    slot->item = (int32_t)(item - pl->items);
    return;
raw:
    add_raw(pl, i, n);
}

void fp_coalesce(const fp_buf *pkts, size_t n, int udp, void *mem, fp_coalesce_plan *pl) {
    size_t tsize = table_size(n);
    uint8_t *m = mem;
    pl->n = n;
    pl->nitems = 0;
    pl->table_mask = tsize - 1;
    pl->items = (fp_item *)m;
    m += n * sizeof(fp_item);
    pl->table = (fp_flow_slot *)m;
    m += tsize * sizeof(fp_flow_slot);
    pl->next = (uint32_t *)m;
    pl->off = pl->next + n;
    pl->plen = pl->off + n;
    pl->l3len = (uint16_t *)(pl->plen + n);
    for (size_t s = 0; s < tsize; s++) pl->table[s].pkt = -1;
    for (uint32_t i = 0; i < n; i++) {
        if (udp && pkts[i].n >= 28 && coalesce_udp(pl, pkts, i)) continue;
        coalesce_tcp(pl, pkts, i);
    }
    for (size_t k = 0; k < pl->nitems; k++) {
        fp_item *item = &pl->items[k];
        if (item->kind != FP_ITEM_RAW && item->count == 1) item->raw_len = item->total;
    }
}

size_t fp_item_len(const fp_coalesce_plan *pl, const fp_item *item) {
    (void)pl;
    return FP_VNET_HDR_LEN + (fp_item_single(item) ? item->raw_len : item->total);
}

size_t fp_item_head(const fp_coalesce_plan *pl, const fp_buf *pkts, const fp_item *item,
                    uint8_t *out) {
    (void)pl;
    if (fp_item_single(item)) {
        memset(out, 0, FP_VNET_HDR_LEN);
        return FP_VNET_HDR_LEN;
    }
    const uint8_t *first = pkts[item->first].p;
    size_t l3len = item->l3len, hlen = item->hlen;
    int tcp = item->kind == FP_ITEM_TCP, v4 = first[0] >> 4 == 4;
    uint8_t *h = out + FP_VNET_HDR_LEN;
    memcpy(h, first, hlen);
    uint16_t addrs;
    if (v4) {
        put_be16(h + 2, item->total);
        h[10] = h[11] = 0;
        put_be16(h + 10, (uint16_t)~fp_csum(h, l3len));
        addrs = fp_csum(h + 12, 8);
    } else {
        put_be16(h + 4, item->total - 40);
        addrs = fp_csum(h + 8, 32);
    }
    /* CHECKSUM_PARTIAL: the pseudo-header sum (over the whole length) in the checksum field */
    uint32_t l4total = item->total - (uint32_t)l3len;
    fp_vnet_hdr vnet = {FP_F_NEEDS_CSUM, 0, (uint16_t)hlen, item->mss, (uint16_t)l3len, 0};
    if (tcp) {
        if (item->psh) h[l3len + 13] |= TCP_PSH;
        put_be16(h + l3len + FP_TCP_CSUM_OFFSET, fp_csum_add(addrs, PROTO_TCP + l4total));
        vnet.gso_type = v4 ? FP_GSO_TCPV4 : FP_GSO_TCPV6;
        vnet.csum_offset = FP_TCP_CSUM_OFFSET;
    } else {
        put_be16(h + l3len + 4, l4total);
        put_be16(h + l3len + FP_UDP_CSUM_OFFSET, fp_csum_add(addrs, PROTO_UDP + l4total));
        vnet.gso_type = FP_GSO_UDP_L4;
        vnet.csum_offset = FP_UDP_CSUM_OFFSET;
    }
    fp_vnet_encode(&vnet, out);
    return FP_VNET_HDR_LEN + hlen;
}

#ifndef FP_CORE_ONLY
/* ------------------------------------------------------------------ CPython */

PyObject *fp_malformed; /* agent.proto.errors.MalformedPacket */

void fp_raise_malformed(fp_err err, const fp_vnet_hdr *h) {
    if (err == FP_ERR_UNSUPPORTED_GSO)
        PyErr_Format(fp_malformed, "unsupported gso_type %d", h->gso_type);
    else
        PyErr_SetString(fp_malformed, fp_err_text(err));
}

int fp_append_segments(PyObject *list, const fp_segment_plan *plan) {
    for (size_t i = 0; i < plan->count; i++) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)fp_segment_len(plan, i));
        if (!b) return -1;
        fp_segment_write(plan, i, (uint8_t *)PyBytes_AS_STRING(b));
        int rc = PyList_Append(list, b);
        Py_DECREF(b);
        if (rc < 0) return -1;
    }
    return 0;
}

int fp_pkts_get(PyObject *obj, fp_pkts *pk) {
    memset(pk, 0, sizeof *pk);
    /* A tuple owns its items: another thread may change the caller's list while io.c writes
       without the GIL, and the bytes read in place must stay alive. */
    pk->seq = PySequence_Tuple(obj);
    if (!pk->seq) return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(pk->seq);
    PyObject **items = PySequence_Fast_ITEMS(pk->seq);
    size_t views = 0;
    for (Py_ssize_t i = 0; i < n; i++) views += !PyBytes_CheckExact(items[i]);
    if ((size_t)n > (size_t)INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "too many packets");
        goto fail;
    }
    pk->bufs = PyMem_Malloc(((size_t)n + 1) * sizeof(fp_buf) + (views + 1) * sizeof(Py_buffer));
    if (!pk->bufs) {
        PyErr_NoMemory();
        goto fail;
    }
    pk->views = (Py_buffer *)(pk->bufs + n + 1);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = items[i];
        if (PyBytes_CheckExact(o)) {
            pk->bufs[i].p = (const uint8_t *)PyBytes_AS_STRING(o);
            pk->bufs[i].n = (size_t)PyBytes_GET_SIZE(o);
            continue;
        }
        Py_buffer *v = &pk->views[pk->nviews];
        if (PyObject_GetBuffer(o, v, PyBUF_SIMPLE) < 0) goto fail;
        pk->nviews++;
        pk->bufs[i].p = v->buf;
        pk->bufs[i].n = (size_t)v->len;
    }
    pk->n = (size_t)n;
    return 0;
fail:
    fp_pkts_release(pk);
    return -1;
}

void fp_pkts_release(fp_pkts *pk) {
    for (size_t i = 0; i < pk->nviews; i++) PyBuffer_Release(&pk->views[i]);
    PyMem_Free(pk->bufs);
    Py_XDECREF(pk->seq);
    memset(pk, 0, sizeof *pk);
}

static PyObject *py_segment(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "segment(hdr, packet) takes 2 arguments");
        return NULL;
    }
    Py_buffer hb, pb;
    if (PyObject_GetBuffer(args[0], &hb, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &pb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&hb);
        return NULL;
    }
    PyObject *out = NULL;
    fp_vnet_hdr h = {0};
    if (hb.len < FP_VNET_HDR_LEN) {
        fp_raise_malformed(FP_ERR_SHORT_VNET, &h);
        goto done;
    }
    fp_vnet_parse(hb.buf, &h);
    fp_segment_plan plan;
    fp_err err = fp_segment_plan_make(&h, pb.buf, (size_t)pb.len, &plan);
    if (err != FP_OK) {
        fp_raise_malformed(err, &h);
        goto done;
    }
    if (plan.kind == FP_SEG_PASS && PyBytes_CheckExact(args[1])) {
        out = PyList_New(1);
        if (out) PyList_SET_ITEM(out, 0, Py_NewRef(args[1]));
        goto done;
    }
    out = PyList_New((Py_ssize_t)plan.count);
    for (size_t i = 0; out && i < plan.count; i++) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)fp_segment_len(&plan, i));
        if (!b) {
            Py_CLEAR(out);
            break;
        }
        fp_segment_write(&plan, i, (uint8_t *)PyBytes_AS_STRING(b));
        PyList_SET_ITEM(out, (Py_ssize_t)i, b);
    }
done:
    PyBuffer_Release(&pb);
    PyBuffer_Release(&hb);
    return out;
}

void *fp_coalesce_pkts(const fp_pkts *pk, int udp, fp_coalesce_plan *plan) {
    void *mem = PyMem_Malloc(fp_coalesce_size(pk->n) + 1);
    if (!mem) {
        PyErr_NoMemory();
        return NULL;
    }
    fp_coalesce(pk->bufs, pk->n, udp, mem, plan);
    return mem;
}

static PyObject *py_coalesce(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "coalesce(packets, udp) takes 2 arguments");
        return NULL;
    }
    int udp = PyObject_IsTrue(args[1]);
    if (udp < 0) return NULL;
    fp_pkts pk;
    if (fp_pkts_get(args[0], &pk) < 0) return NULL;
    fp_coalesce_plan plan;
    PyObject *out = NULL;
    void *mem = fp_coalesce_pkts(&pk, udp, &plan);
    if (!mem) goto done;
    out = PyList_New((Py_ssize_t)plan.nitems);
    if (!out) goto done;
    for (size_t k = 0; k < plan.nitems; k++) {
        const fp_item *item = &plan.items[k];
        PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)fp_item_len(&plan, item));
        if (!b) {
            Py_CLEAR(out);
            goto done;
        }
        uint8_t *w = (uint8_t *)PyBytes_AS_STRING(b);
        w += fp_item_head(&plan, pk.bufs, item, w);
        if (fp_item_single(item)) {
            memcpy(w, pk.bufs[item->first].p, item->raw_len);
        } else {
            for (uint32_t j = item->first; j != FP_NONE; j = plan.next[j]) {
                memcpy(w, pk.bufs[j].p + plan.off[j], plan.plen[j]);
                w += plan.plen[j];
            }
        }
        PyList_SET_ITEM(out, (Py_ssize_t)k, b);
    }
done:
    PyMem_Free(mem);
    fp_pkts_release(&pk);
    return out;
}

PyMethodDef fp_offload_methods[] = {
    {"segment", (PyCFunction)(void (*)(void))py_segment, METH_FASTCALL,
     "segment(hdr, packet) -> [bytes]: agent.proto.offload.segment of one TUN read (hdr: the "
     "10-byte virtio_net_hdr); raises MalformedPacket where it does."},
    {"coalesce", (PyCFunction)(void (*)(void))py_coalesce, METH_FASTCALL,
     "coalesce(packets, udp) -> [bytes]: agent.proto.offload.coalesce, each item one TUN "
     "write (vnet header, headers and payloads joined)."},
    {NULL, NULL, 0, NULL},
};

int fp_offload_init(PyObject *module) {
    (void)module;
    if (fp_malformed) return 0;
    PyObject *errors = PyImport_ImportModule("agent.proto.errors");
    if (!errors) return -1;
    fp_malformed = PyObject_GetAttrString(errors, "MalformedPacket");
    Py_DECREF(errors);
    return fp_malformed ? 0 : -1;
}
#endif
