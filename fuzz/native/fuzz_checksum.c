/* The word-wide checksums (fp_csum, fp_csum_copy) and checksum completion of a NEEDS_CSUM
 * packet (fp_segment_* with GSO_NONE).
 *
 * Input: byte 0 picks a misalignment (0-7) for the sums; bytes 1-4 are csum_start and
 * csum_offset (little-endian u16 each) and byte 5 its flags; the rest is the packet. The sums
 * must equal the textbook one at every alignment, the copy must be exact; the completed
 * packet differs from the input at most in its checksum field, and verifies.
 */
#include "fuzz.h"
#include "offload.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 6) return 0;
    size_t shift = data[0] & 7, n = size - 6;
    const uint8_t *body = data + 6;

    /* sums at an arbitrary alignment: copy behind `shift` spare bytes */
    uint8_t *buf = malloc(n + shift + 1);
    CHECK(buf != NULL);
    memcpy(buf + shift, body, n);
    uint16_t want = (uint16_t)ref_sum(body, n, 0);
    CHECK(fp_csum(buf + shift, n) == want);
    uint8_t *dst = dup_exact(body, n);
    memset(dst, 0xA5, n);
    CHECK(fp_csum_copy(dst, buf + shift, n) == want);
    CHECK(n == 0 || memcmp(dst, body, n) == 0);
    free(dst);
    free(buf);

    /* completion of a NEEDS_CSUM packet */
    fp_vnet_hdr h = {0};
    h.flags = (uint8_t)(data[5] | FP_F_NEEDS_CSUM);
    h.gso_type = (uint8_t)(data[5] & FP_GSO_ECN);
    h.csum_start = (uint16_t)(data[1] | data[2] << 8);
    h.csum_offset = (uint16_t)(data[3] | data[4] << 8);
    uint8_t *pkt = dup_exact(body, n);
    fp_segment_plan pl;
    fp_err err = fp_segment_plan_make(&h, pkt, n, &pl);
    size_t start = h.csum_start, field = start + h.csum_offset;
    CHECK((err == FP_OK) == (field + 2 <= n && start >= 20));
    if (err == FP_OK) {
        CHECK(pl.kind == FP_SEG_CSUM && pl.count == 1 && fp_segment_len(&pl, 0) == n);
        uint8_t *out = dup_exact(pkt, n);
        fp_segment_write(&pl, 0, out);
        CHECK(memcmp(out, pkt, field) == 0);
        CHECK(memcmp(out + field + 2, pkt + field + 2, n - field - 2) == 0);
        uint16_t csum = get_be16(out + field);
        if (h.csum_offset == FP_UDP_CSUM_OFFSET) CHECK(csum != 0);
        if (h.csum_offset % 2 == 0) /* the field held the pseudo-header sum */
            CHECK(ref_sum(out + start, n - start, get_be16(pkt + field)) == 0xFFFF);
        free(out);
    } else {
        CHECK(err == FP_ERR_CSUM_OFFSETS);
    }
    free(pkt);
    return 0;
}
