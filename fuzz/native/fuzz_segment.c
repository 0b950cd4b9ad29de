/* Segmentation from an arbitrary virtio_net_hdr and packet (offload.c's fp_segment_*).
 *
 * Input: 10 bytes of vnet header, then the packet. Every accepted packet is cut into buffers of
 * exactly fp_segment_len bytes; each segment must carry its share of the payload, valid IPv4
 * header and TCP/UDP checksums (checked word by word), consistent length fields and the right
 * sequence number; the payloads must add up to the packet's. A plain or NEEDS_CSUM packet comes
 * back as one copy that differs at most in its checksum field, which must then verify.
 */
#include "fuzz.h"
#include "offload.h"

static void check_gso(const fp_segment_plan *pl, const uint8_t *pkt, size_t i, const uint8_t *seg,
                      size_t len) {
    size_t t = pl->l3len, hlen = pl->hlen, off = i * pl->mss;
    CHECK(len >= hlen && len <= 0xFFFF);
    size_t clen = len - hlen;
    CHECK(clen <= pl->mss);
    CHECK(i + 1 == pl->count || clen == pl->mss);
    CHECK(memcmp(seg + hlen, pkt + hlen + off, clen) == 0);
    if (pl->v4) {
        CHECK(get_be16(seg + 2) == len);
        CHECK(ref_sum(seg, t, 0) == 0xFFFF);
    } else {
        CHECK(get_be16(seg + 4) == len - 40);
    }
    uint32_t l4len = (uint32_t)(len - t);
    int proto = pl->tcp ? 6 : 17;
    CHECK(ref_fold(ref_sum(seg + t, l4len, ref_pseudo(seg, pl->v4, proto, l4len))) == 0xFFFF);
    if (pl->tcp) {
        CHECK(get_be32(seg + t + 4) == (uint32_t)(get_be32(pkt + t + 4) + off));
        uint8_t flags = seg[t + 13], orig = pkt[t + 13];
        CHECK((flags & ~0x89) == (orig & ~0x89)); /* only FIN, PSH, CWR may change */
    } else {
        CHECK(get_be16(seg + t + 4) == l4len);
        CHECK(get_be16(seg + t + 6) != 0);
    }
}

static void check_csum(const fp_segment_plan *pl, const uint8_t *pkt, const uint8_t *out) {
    size_t f = pl->csum_field, start = pl->csum_start;
    CHECK(memcmp(out, pkt, f) == 0);
    CHECK(memcmp(out + f + 2, pkt + f + 2, pl->len - f - 2) == 0);
    if ((f - start) % 2 == 0) { /* the field holds the pseudo-header sum: add it back */
        uint32_t pseudo = get_be16(pkt + f);
        CHECK(ref_sum(out + start, pl->len - start, pseudo) == 0xFFFF);
    }
    if (pl->csum_udp) CHECK(get_be16(out + f) != 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < FP_VNET_HDR_LEN) return 0;
    fp_vnet_hdr h;
    fp_vnet_parse(data, &h);
    uint8_t enc[FP_VNET_HDR_LEN];
    fp_vnet_encode(&h, enc);
    CHECK(memcmp(enc, data, FP_VNET_HDR_LEN) == 0);
    size_t n = size - FP_VNET_HDR_LEN;
    uint8_t *pkt = dup_exact(data + FP_VNET_HDR_LEN, n);
    fp_segment_plan pl;
    fp_err err = fp_segment_plan_make(&h, pkt, n, &pl);
    if (err == FP_OK) {
        CHECK(pl.count >= 1 && pl.count <= 0xFFFF);
        CHECK(pl.kind == FP_SEG_GSO || pl.count == 1);
        /* segments come in at most two lengths (full, last): one exact buffer each. A packet
           cut into thousands (MSS 1) has all but the first and last 128, and every 97th,
           skipped: the same code runs for each, and the fuzzer's time goes to new inputs. */
        size_t full_len = fp_segment_len(&pl, 0), last_len = fp_segment_len(&pl, pl.count - 1);
        CHECK(last_len <= full_len);
        uint8_t *full = malloc(full_len ? full_len : 1), *last = malloc(last_len ? last_len : 1);
        CHECK(full != NULL && last != NULL);
        for (size_t i = 0; i < pl.count; i++) {
            if (i >= 128 && i + 128 < pl.count && i % 97) continue;
            size_t len = fp_segment_len(&pl, i);
            uint8_t *seg = i + 1 == pl.count ? last : full;
            CHECK(len == (i + 1 == pl.count ? last_len : full_len));
            fp_segment_write(&pl, i, seg);
            if (pl.kind == FP_SEG_GSO) {
                check_gso(&pl, pkt, i, seg, len);
            } else if (pl.kind == FP_SEG_CSUM) {
                CHECK(len == n);
                check_csum(&pl, pkt, seg);
            } else {
                CHECK(len == n && memcmp(seg, pkt, n) == 0);
            }
        }
        free(full);
        free(last);
        size_t payload = (pl.count - 1) * (full_len - pl.hlen) + (last_len - pl.hlen);
        CHECK(pl.kind != FP_SEG_GSO || payload == pl.plen);
    } else {
        CHECK(err > FP_OK && err <= FP_ERR_VERSION);
        CHECK(strlen(fp_err_text(err)) > 0);
    }
    free(pkt);
    return 0;
}
