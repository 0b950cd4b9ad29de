/* Coalescing of a batch of packets split from the input (offload.c's fp_coalesce, fp_item_*).
 *
 * Input: byte 0 bit 0 turns UDP coalescing on; then packets, each a little-endian u16 length
 * (cut to what is left) and its bytes, every one copied to a heap buffer of exactly its size.
 * Every packet must land in exactly one item; a single item is a prefix of its packet; a merged
 * item must be a GSO packet that segmentation accepts and cuts back into exactly the payloads
 * that were merged, in order, every one but the last gso_size long.
 */
#include "fuzz.h"
#include "offload.h"

#define MAX_PACKETS 1024

static void check_merged(const fp_coalesce_plan *pl, const fp_buf *pkts, const fp_item *item,
                         const uint8_t *head, size_t hlen) {
    size_t len = fp_item_len(pl, item);
    CHECK(len == FP_VNET_HDR_LEN + item->total && item->total <= 0xFFFF);
    uint8_t *whole = malloc(len);
    CHECK(whole != NULL);
    memcpy(whole, head, hlen);
    size_t at = hlen;
    for (uint32_t k = item->first; k != FP_NONE; k = pl->next[k]) {
        CHECK(pl->off[k] + pl->plen[k] <= pkts[k].n);
        memcpy(whole + at, pkts[k].p + pl->off[k], pl->plen[k]);
        at += pl->plen[k];
    }
    CHECK(at == len);
    fp_vnet_hdr h;
    fp_vnet_parse(whole, &h);
    CHECK(h.flags == FP_F_NEEDS_CSUM && h.gso_size == item->mss && h.hdr_len == hlen - 10);
    fp_segment_plan sp;
    CHECK(fp_segment_plan_make(&h, whole + FP_VNET_HDR_LEN, len - FP_VNET_HDR_LEN, &sp) == FP_OK);
    CHECK(sp.count == item->count);
    uint32_t k = item->first;
    for (size_t i = 0; i < sp.count; i++, k = pl->next[k]) {
        size_t slen = fp_segment_len(&sp, i);
        uint8_t *seg = malloc(slen);
        CHECK(seg != NULL);
        fp_segment_write(&sp, i, seg);
        CHECK(slen - sp.hlen == pl->plen[k]);
        CHECK(i + 1 == sp.count || pl->plen[k] == item->mss);
        CHECK(memcmp(seg + sp.hlen, pkts[k].p + pl->off[k], pl->plen[k]) == 0);
        free(seg);
    }
    free(whole);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int udp = data[0] & 1;
    fp_buf pkts[MAX_PACKETS];
    size_t n = 0, at = 1;
    while (at + 2 <= size && n < MAX_PACKETS) {
        size_t len = (size_t)(data[at] | data[at + 1] << 8);
        at += 2;
        if (len > size - at) len = size - at;
        pkts[n].p = dup_exact(data + at, len);
        pkts[n].n = len;
        n++;
        at += len;
    }
    size_t memlen = fp_coalesce_size(n);
    void *mem = malloc(memlen ? memlen : 1);
    CHECK(mem != NULL);
    fp_coalesce_plan pl;
    fp_coalesce(pkts, n, udp, mem, &pl);
    CHECK(pl.nitems <= n);
    uint8_t seen[MAX_PACKETS] = {0};
    for (size_t j = 0; j < pl.nitems; j++) {
        const fp_item *item = &pl.items[j];
        CHECK(item->count >= 1 && item->first < n);
        CHECK(udp || item->kind != FP_ITEM_UDP);
        uint8_t head[FP_MAX_ITEM_HEAD];
        size_t hlen = fp_item_head(&pl, pkts, item, head);
        CHECK(hlen >= FP_VNET_HDR_LEN && hlen <= FP_MAX_ITEM_HEAD);
        if (fp_item_single(item)) {
            static const uint8_t zero[FP_VNET_HDR_LEN];
            CHECK(hlen == FP_VNET_HDR_LEN && memcmp(head, zero, hlen) == 0);
            CHECK(item->raw_len <= pkts[item->first].n);
            CHECK(fp_item_len(&pl, item) == FP_VNET_HDR_LEN + item->raw_len);
            CHECK(seen[item->first]++ == 0);
            continue;
        }
        CHECK(item->kind != FP_ITEM_RAW);
        CHECK(item->count <= (item->kind == FP_ITEM_TCP ? FP_MAX_TCP_SEGMENTS : FP_MAX_UDP_SEGMENTS));
        uint32_t last = FP_NONE;
        for (uint32_t k = item->first; k != FP_NONE; k = pl.next[k]) {
            CHECK(k < n && seen[k]++ == 0);
            CHECK(last == FP_NONE || k > last); /* a flow keeps its order */
            last = k;
        }
        CHECK(last == item->last);
        check_merged(&pl, pkts, item, head, hlen);
    }
    for (size_t i = 0; i < n; i++) CHECK(seen[i] == 1);
    free(mem);
    for (size_t i = 0; i < n; i++) free((void *)pkts[i].p);
    return 0;
}
