/* The Python-free core of offload.c: TUN offload arithmetic on plain byte buffers.
 *
 * The twin of agent/proto/offload (segment.py, checksum.py, coalesce.py): the same inputs give
 * the same bytes and the same MalformedPacket cases (fp_err). No allocation and no CPython API
 * here, so the same code links into the CPython module (offload.c's wrappers, io.c) and into
 * the libFuzzer harnesses of fuzz/native/ (built with -DFP_CORE_ONLY).
 *
 * Byte order: virtio_net_hdr fields are host order (little-endian on every supported machine),
 * IP/TCP/UDP fields big-endian. Every length is checked against the buffer before a read.
 */
#ifndef AGENT_OFFLOAD_H
#define AGENT_OFFLOAD_H

#include <stddef.h>
#include <stdint.h>

#define FP_VNET_HDR_LEN 10
#define FP_F_NEEDS_CSUM 1
#define FP_GSO_NONE 0
#define FP_GSO_TCPV4 1
#define FP_GSO_TCPV6 4
#define FP_GSO_UDP_L4 5
#define FP_GSO_ECN 0x80
#define FP_TCP_CSUM_OFFSET 16
#define FP_UDP_CSUM_OFFSET 6

/* An IP length field is 16 bits: the largest super-packet we cut, the largest merged packet. */
#define FP_MAX_IP_LEN 0xFFFF
/* coalesce.py's MAX_COALESCED_SEGMENTS and MAX_UDP_SEGMENTS. */
#define FP_MAX_TCP_SEGMENTS 256
#define FP_MAX_UDP_SEGMENTS 64
/* The most header bytes in front of a merged item's payloads: vnet + IPv6 + TCP with options. */
#define FP_MAX_ITEM_HEAD (FP_VNET_HDR_LEN + 40 + 60)

typedef struct {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
} fp_vnet_hdr;

/* Why a packet is malformed; fp_err_text gives the Python reference's message. */
typedef enum {
    FP_OK = 0,
    FP_ERR_SHORT_VNET,       /* short virtio_net_hdr */
    FP_ERR_CSUM_OFFSETS,     /* checksum offsets outside the packet */
    FP_ERR_UNSUPPORTED_GSO,  /* unsupported gso_type N (the caller adds N) */
    FP_ERR_GSO_SIZE_0,       /* gso_size 0 */
    FP_ERR_TOO_LONG,         /* GSO super-packet longer than 65535 bytes */
    FP_ERR_SHORT_IP,         /* short IP packet */
    FP_ERR_BAD_IHL,          /* bad IPv4 header length */
    FP_ERR_NOT_IP,           /* not IPv4/IPv6 */
    FP_ERR_TRUNC_V6_EXT,     /* truncated IPv6 extension header */
    FP_ERR_TRUNC_TCP,        /* truncated TCP header */
    FP_ERR_BAD_DOFF,         /* bad TCP data offset */
    FP_ERR_OUTSIDE,          /* transport header outside the packet */
    FP_ERR_ODD_OFFSET,       /* transport header at an odd offset */
    FP_ERR_VERSION,          /* gso_type does not match the IP version */
} fp_err;

const char *fp_err_text(fp_err err);

/* The 10 header bytes (host order) <-> the struct. */
void fp_vnet_parse(const uint8_t *p, fp_vnet_hdr *h);
void fp_vnet_encode(const fp_vnet_hdr *h, uint8_t *p);

/* ------------------------------------------------------------------ checksums */

/* One's-complement sum of the big-endian 16-bit words of p[0..n) (odd tail zero-padded), folded
 * to 16 bits; 0 only when every byte is 0. Word-wide adds; p needs no alignment. */
uint16_t fp_csum(const uint8_t *p, size_t n);
/* The same sum of src[0..n) while copying it to dst. */
uint16_t fp_csum_copy(uint8_t *dst, const uint8_t *src, size_t n);
/* a + b in one's complement (end-around carry), 16 bits. */
static inline uint16_t fp_csum_add(uint32_t a, uint32_t b) {
    uint32_t s = a + b;
    s = (s & 0xFFFF) + (s >> 16);
    return (uint16_t)((s & 0xFFFF) + (s >> 16));
}

/* ------------------------------------------------------------------ segmentation (TX) */

enum { FP_SEG_PASS, FP_SEG_CSUM, FP_SEG_GSO };

/* What segment() does with one TUN read: fp_segment_plan fills it, fp_segment_write builds
 * packet i of fp_segment_len(plan, i) bytes. Holds pointers into the packet, no copies. */
typedef struct {
    const uint8_t *pkt;
    size_t len;
    int kind;        /* FP_SEG_*: as is, checksum completed, GSO cut */
    size_t count;    /* packets out (>= 1) */
    /* FP_SEG_CSUM */
    size_t csum_start, csum_field;
    int csum_udp;
    /* FP_SEG_GSO */
    int v4, tcp;
    size_t l3len, l4len, hlen, plen, mss;
    uint16_t pseudo; /* folded pseudo-header sum without the length: addresses + protocol */
} fp_segment_plan;

/* FP_OK, or why agent.proto.offload.segment(hdr, pkt) raises MalformedPacket. */
fp_err fp_segment_plan_make(const fp_vnet_hdr *h, const uint8_t *pkt, size_t len,
                            fp_segment_plan *plan);
size_t fp_segment_len(const fp_segment_plan *plan, size_t i);
/* Writes packet i (fp_segment_len bytes) to out; out must not overlap the input packet. */
void fp_segment_write(const fp_segment_plan *plan, size_t i, uint8_t *out);

/* ------------------------------------------------------------------ coalescing (RX) */

typedef struct {
    const uint8_t *p;
    size_t n;
} fp_buf;

enum { FP_ITEM_RAW, FP_ITEM_TCP, FP_ITEM_UDP };

/* One TUN write: a zero vnet header and a prefix of one packet (count 1: RAW, or a run that
 * merged nothing), or a GSO packet made of a built head and `count` payloads (TCP, UDP): the
 * payload of packet k is pkts[k].p[off[k] .. off[k] + plen[k]), the item's next packet next[k]. */
typedef struct {
    uint8_t kind, closed, psh;
    uint32_t first, last, count;
    uint32_t raw_len;          /* count 1: bytes of the packet written */
    uint32_t total;            /* TCP/UDP: IP bytes of the merged packet */
    uint32_t next_seq;
    uint16_t l3len, hlen, mss;
} fp_item;

typedef struct {
    uint32_t hash;
    int32_t pkt;   /* a packet carrying the key, -1: empty slot */
    int32_t item;  /* the open run of the key, -1: none */
    uint8_t udp;
    uint8_t v6;
} fp_flow_slot;

/* Scratch space for n packets: fp_coalesce_size(n) bytes, aligned for any type. */
typedef struct {
    size_t n, nitems, table_mask;
    fp_item *items;
    uint32_t *next, *off, *plen;
    uint16_t *l3len;
    fp_flow_slot *table;
} fp_coalesce_plan;

size_t fp_coalesce_size(size_t n);
/* Groups pkts[0..n) as agent.proto.offload.coalesce(pkts, udp=udp); never fails. `mem` holds
 * fp_coalesce_size(n) bytes and backs the plan. n < 2^31. */
void fp_coalesce(const fp_buf *pkts, size_t n, int udp, void *mem, fp_coalesce_plan *plan);
/* The vnet header plus, for a merged item, its IP/TCP/UDP headers: up to FP_MAX_ITEM_HEAD
 * bytes written to `out`, their number returned. A RAW item (or a run of one) has a zero
 * header and a single payload of raw_len bytes from its packet's start. */
size_t fp_item_head(const fp_coalesce_plan *plan, const fp_buf *pkts, const fp_item *item,
                    uint8_t *out);
/* Bytes of the whole item (head and payloads), as one TUN write. */
size_t fp_item_len(const fp_coalesce_plan *plan, const fp_item *item);

/* The payloads of a merged item in order: for (k = item->first; k != FP_NONE; k = next[k]). */
#define FP_NONE UINT32_MAX
/* Whether the item is one packet written as is behind a zero vnet header (RAW, or a run that
 * merged nothing): pkts[item->first].p[0 .. raw_len). */
static inline int fp_item_single(const fp_item *item) { return item->count == 1; }

#endif
