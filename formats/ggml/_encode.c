/* GGML block encoders of formats.ggml._kernels (bound in formats/ggml/codec.py), without an importance
 * matrix. The 32-value types are bit-identical to ggml's reference quantisers (tests/test_kernels.py); the
 * K-quants use the same weighted least-squares searches in the same float operation order, so they are
 * bit-identical to llama.cpp's too (tests/test_kquants.py). The helpers declared in encode.h are defined
 * here and shared with _encode_w.c and _grid.c (same library). */
#define QC_GGML_ENCODERS  /* encode.h: this library's shared encoder functions */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "half.h"
#include "encode.h"
#include "types.h"

/* ---- quantisers for the 32-value block types, bit-identical to ggml's reference (no importance
 * matrix): the scale comes from the block's extreme values, values are truncated after adding the
 * offset, and the scale is stored as f16 while the unrounded scale is used to quantise. ---- */

static void q_q8_0(const float *x, uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QC_Q8_0_BLOCK, b += QC_Q8_0_BYTES) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) { const float v = fabsf(x[j]); if (v > amax) amax = v; }
        const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
        put16(b, d);
        for (int j = 0; j < 32; j++) ((int8_t *)(b + 2))[j] = (int8_t)roundf(x[j] * id);
    }
}
/* signed extreme: the value of largest magnitude, first one on ties */
static inline float signed_max(const float *x) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; j++) { const float v = fabsf(x[j]); if (amax < v) { amax = v; max = x[j]; } }
    return max;
}
static void q_q4_0(const float *x, uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QC_Q4_0_BLOCK, b += QC_Q4_0_BYTES) {
        const float d = signed_max(x) / -8, id = d ? 1.0f / d : 0.0f;
        put16(b, d);
        for (int j = 0; j < 16; j++) {
            const int q0 = (int)(x[j] * id + 8.5f), q1 = (int)(x[j + 16] * id + 8.5f);
            b[2 + j] = (uint8_t)((q0 > 15 ? 15 : q0) | ((q1 > 15 ? 15 : q1) << 4));
        }
    }
}
static inline void min_max(const float *x, float *mn, float *mx) {
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < 32; j++) { if (x[j] < lo) lo = x[j]; if (x[j] > hi) hi = x[j]; }
    *mn = lo; *mx = hi;
}
static void q_q4_1(const float *x, uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QC_Q4_1_BLOCK, b += QC_Q4_1_BYTES) {
        float mn, mx; min_max(x, &mn, &mx);
        const float d = (mx - mn) / 15, id = d ? 1.0f / d : 0.0f;
        put16(b, d); put16(b + 2, mn);
        for (int j = 0; j < 16; j++) {
            const int q0 = (int)((x[j] - mn) * id + 0.5f), q1 = (int)((x[j + 16] - mn) * id + 0.5f);
            b[4 + j] = (uint8_t)((q0 > 15 ? 15 : q0) | ((q1 > 15 ? 15 : q1) << 4));
        }
    }
}
static void q_q5_0(const float *x, uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QC_Q5_0_BLOCK, b += QC_Q5_0_BYTES) {
        const float d = signed_max(x) / -16, id = d ? 1.0f / d : 0.0f;
        put16(b, d);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            int q0 = (int)(x[j] * id + 16.5f), q1 = (int)(x[j + 16] * id + 16.5f);
            q0 = q0 > 31 ? 31 : q0; q1 = q1 > 31 ? 31 : q1;
            b[6 + j] = (uint8_t)((q0 & 0xF) | ((q1 & 0xF) << 4));
            qh |= ((uint32_t)(q0 >> 4) & 1u) << j;
            qh |= ((uint32_t)(q1 >> 4) & 1u) << (j + 16);
        }
        memcpy(b + 2, &qh, 4);
    }
}
static void q_q5_1(const float *x, uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QC_Q5_1_BLOCK, b += QC_Q5_1_BYTES) {
        float mn, mx; min_max(x, &mn, &mx);
        const float d = (mx - mn) / 31, id = d ? 1.0f / d : 0.0f;
        put16(b, d); put16(b + 2, mn);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            int q0 = (int)((x[j] - mn) * id + 0.5f), q1 = (int)((x[j + 16] - mn) * id + 0.5f);
            q0 = q0 > 31 ? 31 : q0; q1 = q1 > 31 ? 31 : q1;
            b[8 + j] = (uint8_t)((q0 & 0xF) | ((q1 & 0xF) << 4));
            qh |= ((uint32_t)(q0 >> 4) & 1u) << j;
            qh |= ((uint32_t)(q1 >> 4) & 1u) << (j + 16);
        }
        memcpy(b + 4, &qh, 4);
    }
}

/* ---- K-quant encoders (256-value super-blocks). Each sub-block gets its own scale (and min) found by
 * a weighted least-squares search over candidate grids, as ggml's reference quantisers do; the
 * sub-block scales are then quantised against the super-block's f16 scale, and values re-quantised
 * with the final (rounded) scales. ---- */
/* x ~ scale * L - m with L in [0, nmax], m >= 0; weights w. Returns scale, writes L and m.
 * As in ggml's reference, a better candidate's offset becomes the origin of the later candidates' grids
 * (lo is updated inside the search); together with the same operation order this makes the result
 * bit-identical to ggml's (tests/test_kquants.py). mad: the error weighs |diff| instead of diff^2 (ggml's use_mad). */
static float fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L, float *m_out,
                           float rmin, float rdelta, int nstep, int mad) {
    float lo = x[0], hi = x[0], sw = 0, sx = 0;
    for (int i = 0; i < n; i++) { lo = x[i] < lo ? x[i] : lo; hi = x[i] > hi ? x[i] : hi; sw += w[i]; sx += w[i] * x[i]; }
    if (lo > 0) lo = 0;
    if (hi == lo) { memset(L, 0, n); *m_out = -lo; return 0.0f; }
    float iscale = nmax / (hi - lo), scale = 1 / iscale, best = 0;
    for (int i = 0; i < n; i++) {
        L[i] = (uint8_t)clampi(rnd(iscale * (x[i] - lo)), 0, nmax);
        const float d = scale * L[i] + lo - x[i];
        best += w[i] * (mad ? fabsf(d) : d * d);
    }
    uint8_t aux[32];
    for (int k = 0; k <= nstep; k++) {
        const float is = (rmin + rdelta * k + nmax) / (hi - lo);
        float sl = 0, sl2 = 0, sxl = 0;
        for (int i = 0; i < n; i++) {
            const int l = clampi(rnd(is * (x[i] - lo)), 0, nmax);
            aux[i] = (uint8_t)l;
            sl += w[i] * l; sl2 += w[i] * l * l; sxl += w[i] * l * x[i];
        }
        const float D = sw * sl2 - sl * sl;
        if (D <= 0) continue;
        float sc = (sw * sxl - sx * sl) / D, m = (sl2 * sx - sl * sxl) / D;
        if (m > 0) { m = 0; sc = sxl / sl2; }
        float err = 0;
        for (int i = 0; i < n; i++) { const float d = sc * aux[i] + m - x[i]; err += w[i] * (mad ? fabsf(d) : d * d); }
        if (err < best) { memcpy(L, aux, n); best = err; scale = sc; lo = m; }
    }
    *m_out = -lo;
    return scale;
}

float qc_fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L, float *m_out,
                       float rmin, float rdelta, int nstep) {
    return fit_scale_min(n, nmax, x, w, L, m_out, rmin, rdelta, nstep, 0);
}

void qc_pack_scale_min_k4(uint8_t *sc, int j, int ls, int lm) {
    if (j < 4) { sc[j] = (uint8_t)ls; sc[j + 4] = (uint8_t)lm; }
    else {
        sc[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
        sc[j - 4] |= (uint8_t)((ls >> 4) << 6);
        sc[j] |= (uint8_t)((lm >> 4) << 6);
    }
}

/* Q4_K (nmax 15) and Q5_K (nmax 31): 8 sub-blocks of 32 with 6-bit scales and mins */
static void q_k45(int five, const float *x, uint8_t *b, int64_t nb) {
    const int nmax = five ? 31 : 15, bsize = five ? QC_Q5_K_BYTES : QC_Q4_K_BYTES;
    for (int64_t i = 0; i < nb; i++, x += QC_QK_K, b += bsize) {
        uint8_t L[256]; float w[32], scales[8], mins[8], max_scale = 0, max_min = 0;
        memset(b, 0, bsize);
        for (int j = 0; j < 8; j++) {
            const float *xs = x + 32 * j; float s2 = 0;
            for (int l = 0; l < 32; l++) s2 += xs[l] * xs[l];
            const float av = sqrtf(s2 / 32);
            for (int l = 0; l < 32; l++) w[l] = av + fabsf(xs[l]);
            scales[j] = five ? qc_fit_scale_min(32, 31, xs, w, L + 32 * j, &mins[j], -0.5f, 0.1f, 15)
                             : qc_fit_scale_min(32, 15, xs, w, L + 32 * j, &mins[j], -1.0f, 0.1f, 20);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        const float inv_s = max_scale > 0 ? 63.f / max_scale : 0.f, inv_m = max_min > 0 ? 63.f / max_min : 0.f;
        uint8_t *sc = b + 4;
        for (int j = 0; j < 8; j++)
            qc_pack_scale_min_k4(sc, j, clampi(rnd(inv_s * scales[j]), 0, 63), clampi(rnd(inv_m * mins[j]), 0, 63));
        put16(b, max_scale / 63.f); put16(b + 2, max_min / 63.f);
        const float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2));
        for (int j = 0; j < 8; j++) {
            uint8_t s, m; scale_min_k4(j, sc, &s, &m);
            const float dj = d * s, mj = dmin * m;
            if (!dj) continue;
            for (int l = 0; l < 32; l++) L[32 * j + l] = (uint8_t)clampi(rnd((x[32 * j + l] + mj) / dj), 0, nmax);
        }
        qc_pack_k45(five, L, b);
    }
}

/* The codes L [256] of a Q4_K / Q5_K super-block into its bytes (fifth bits in qh; qh must be zero) */
void qc_pack_k45(int five, const uint8_t *L, uint8_t *b) {
    uint8_t *qh = b + 16, *q = five ? b + 48 : b + 16;
    for (int j = 0, u1 = 1, u2 = 2; j < 256; j += 64, q += 32, u1 <<= 2, u2 <<= 2) {
        for (int l = 0; l < 32; l++) {
            uint8_t a = L[j + l], c = L[j + l + 32];
            if (five) {
                if (a > 15) { a -= 16; qh[l] |= (uint8_t)u1; }
                if (c > 15) { c -= 16; qh[l] |= (uint8_t)u2; }
            }
            q[l] = (uint8_t)(a | (c << 4));
        }
    }
}

/* Q6_K: 16 sub-blocks of 16 with signed 8-bit scales, 6-bit values. qw: importance weights of the 256
 * columns of each super-block, used as they are (NULL: x^2), as ggml does. */
void qc_q6k(const float *x, uint8_t *b, int64_t nb, const float *qw) {
    for (int64_t i = 0; i < nb; i++, x += QC_Q6_K_BLOCK, b += QC_Q6_K_BYTES, qw = qw ? qw + QC_Q6_K_BLOCK : NULL) {
        int8_t L[256]; float scales[16], max_scale = 0, max_abs = 0;
        memset(b, 0, QC_Q6_K_BYTES);
        for (int j = 0; j < 16; j++) {
            scales[j] = qc_fit_sym(16, 32, x + 16 * j, qw ? qw + 16 * j : NULL, L + 16 * j);
            if (fabsf(scales[j]) > max_abs) { max_abs = fabsf(scales[j]); max_scale = scales[j]; }
        }
        if (max_abs < 1e-15f) continue;
        const float iscale = -128.f / max_scale;
        put16(b + 208, 1 / iscale);
        int8_t *sc = (int8_t *)(b + 192);
        for (int j = 0; j < 16; j++) sc[j] = (int8_t)(rnd(iscale * scales[j]) > 127 ? 127 : rnd(iscale * scales[j]));
        const float d = h2f(rd16(b + 208));
        for (int j = 0; j < 16; j++) {
            const float dj = d * sc[j];
            if (!dj) continue;
            for (int l = 0; l < 16; l++) L[16 * j + l] = (int8_t)(clampi(rnd(x[16 * j + l] / dj), -32, 31) + 32);
        }
        qc_pack_q6k((const uint8_t *)L, b);
    }
}

/* The codes L [256] (0..63) of a Q6_K super-block into its ql / qh bytes */
void qc_pack_q6k(const uint8_t *L, uint8_t *b) {
    uint8_t *ql = b, *qh = b + 128;
    for (int j = 0; j < 256; j += 128, ql += 64, qh += 32) {
        for (int l = 0; l < 32; l++) {
            const uint8_t a = L[j + l], c = L[j + l + 32], e = L[j + l + 64], f = L[j + l + 96];
            ql[l] = (uint8_t)((a & 0xF) | ((e & 0xF) << 4));
            ql[l + 32] = (uint8_t)((c & 0xF) | ((f & 0xF) << 4));
            qh[l] = (uint8_t)((a >> 4) | ((c >> 4) << 2) | ((e >> 4) << 4) | ((f >> 4) << 6));
        }
    }
}

/* 2-bit fields of a Q2_K / Q3_K block: byte l of each 32-byte group holds values l, l+32, l+64, l+96 of
 * its 128-value half, lowest bits first */
void qc_pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < 256; j += 128, qs += 32)
        for (int l = 0; l < 32; l++)
            qs[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

/* Squared error of 16 values coded as dl * L - ml, L in [0, 3] (the nearest code); writes L. */
static float q2_sub_err(const float *x, float dl, float ml, uint8_t *L) {
    float err = 0;
    for (int l = 0; l < 16; l++) {
        const int q = dl ? clampi(rnd((x[l] + ml) / dl), 0, 3) : 0;
        const float e = dl * q - ml - x[l];
        L[l] = (uint8_t)q; err += e * e;
    }
    return err;
}

/* The per sub-block fit of a Q2_K block (weights |x|; mad: ggml's |error| criterion), with the largest scale
 * and min */
static void q2_fit(const float *x, uint8_t *L, float *scales, float *mins, float *max_scale, float *max_min,
                   int mad) {
    float w[16];
    *max_scale = *max_min = 0;
    for (int j = 0; j < 16; j++) {
        const float *xs = x + 16 * j;
        for (int l = 0; l < 16; l++) w[l] = fabsf(xs[l]);
        scales[j] = fit_scale_min(16, 3, xs, w, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, mad);
        if (scales[j] > *max_scale) *max_scale = scales[j];
        if (mins[j] > *max_min) *max_min = mins[j];
    }
}

/* Q2_K: 16 sub-blocks of 16, x ~ d * sc * L - dmin * m with L in [0, 3] and 4-bit sc, m. The per
 * sub-block fit is the weighted search of qc_fit_scale_min; once the super-block scales are rounded to f16,
 * each sub-block picks, among the 4-bit (sc, m) pairs next to the rounded ones, the pair whose re-coded
 * values have the smallest squared error. */
static void q_q2_k(const float *x, uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QC_Q2_K_BLOCK, b += QC_Q2_K_BYTES) {
        uint8_t L[256], La[16]; float scales[16], mins[16], max_scale, max_min;
        memset(b, 0, QC_Q2_K_BYTES);
        q2_fit(x, L, scales, mins, &max_scale, &max_min, 0);
        put16(b + 80, max_scale / 15.f); put16(b + 82, max_min / 15.f);
        const float d = h2f(rd16(b + 80)), dmin = h2f(rd16(b + 82));
        for (int j = 0; j < 16; j++) {
            const float *xs = x + 16 * j;
            const int s0 = d ? clampi(rnd(scales[j] / d), 0, 15) : 0, m0 = dmin ? clampi(rnd(mins[j] / dmin), 0, 15) : 0;
            float best = INFINITY; int bs = s0, bm = m0;
            for (int s = s0 - 1; s <= s0 + 1; s++) {
                if (s < 0 || s > 15 || (s && !d)) continue;
                for (int m = m0 - 1; m <= m0 + 1; m++) {
                    if (m < 0 || m > 15 || (m && !dmin)) continue;
                    const float e = q2_sub_err(xs, d * s, dmin * m, La);
                    if (e < best) { best = e; bs = s; bm = m; memcpy(L + 16 * j, La, 16); }
                }
            }
            b[j] = (uint8_t)(bs | (bm << 4));
        }
        qc_pack_2bit(L, b + 16);
    }
}

/* Q2_K as ggml's reference quantiser (quantize_row_q2_K_ref) codes it: the same per sub-block fit, then each
 * sub-block's 4-bit scale and min rounded from the fit alone (no re-scoring) and the values re-coded on them.
 * llama-quantize uses it for a tensor its importance matrix has no entry for (tests/test_iq_mixtures.py). */
static void q_q2_k_ref(const float *x, uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QC_Q2_K_BLOCK, b += QC_Q2_K_BYTES) {
        uint8_t L[256]; float scales[16], mins[16], max_scale, max_min;
        memset(b, 0, QC_Q2_K_BYTES);
        q2_fit(x, L, scales, mins, &max_scale, &max_min, 1);
        if (max_scale > 0) {
            const float is = 15.f / max_scale;
            for (int j = 0; j < 16; j++) b[j] = (uint8_t)rnd(is * scales[j]);
            put16(b + 80, max_scale / 15.f);
        }
        if (max_min > 0) {
            const float is = 15.f / max_min;
            for (int j = 0; j < 16; j++) b[j] |= (uint8_t)((unsigned)rnd(is * mins[j]) << 4);
            put16(b + 82, max_min / 15.f);
        }
        for (int j = 0; j < 16; j++) {
            const float dl = h2f(rd16(b + 80)) * (b[j] & 0xF);
            if (!dl) continue;
            const float ml = h2f(rd16(b + 82)) * (b[j] >> 4);
            for (int l = 0; l < 16; l++) L[16 * j + l] = (uint8_t)clampi(rnd((x[16 * j + l] + ml) / dl), 0, 3);
        }
        qc_pack_2bit(L, b + 16);
    }
}

/* Squared error of 16 values coded as dl * (L - 4), L in [0, 7]; writes L. */
static float q3_sub_err(const float *x, float dl, uint8_t *L) {
    float err = 0;
    for (int l = 0; l < 16; l++) {
        const int q = dl ? clampi(rnd(x[l] / dl), -4, 3) : 0;
        const float e = dl * q - x[l];
        L[l] = (uint8_t)(q + 4); err += e * e;
    }
    return err;
}

/* Q3_K: 16 sub-blocks of 16, x ~ d * sc * (L - 4) with L in [0, 7] and signed 6-bit sc. Sub-block scales
 * come from qc_fit_sym; after the super-block scale is rounded to f16, each sub-block takes the 6-bit
 * scale next to the rounded one whose re-coded values have the smallest squared error. */
static void q_q3_k(const float *x, uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QC_Q3_K_BLOCK, b += QC_Q3_K_BYTES) {
        uint8_t L[256], La[16]; int8_t Ls[16]; float scales[16], max_scale = 0, max_abs = 0;
        memset(b, 0, QC_Q3_K_BYTES);
        for (int j = 0; j < 16; j++) {
            scales[j] = qc_fit_sym(16, 4, x + 16 * j, NULL, Ls);
            if (fabsf(scales[j]) > max_abs) { max_abs = fabsf(scales[j]); max_scale = scales[j]; }
        }
        memset(L, 4, 256);
        if (max_abs >= 1e-15f) {
            put16(b + 108, max_scale / -32.f);
            const float d = h2f(rd16(b + 108));
            uint8_t *sc = b + 96;
            for (int j = 0; j < 16; j++) {
                const float *xs = x + 16 * j;
                const int s0 = d ? clampi(rnd(scales[j] / d), -32, 31) : 0;
                float best = INFINITY; int bs = s0;
                for (int s = s0 - 1; s <= s0 + 1; s++) {
                    if (s < -32 || s > 31) continue;
                    const float e = q3_sub_err(xs, d * s, La);
                    if (e < best) { best = e; bs = s; memcpy(L + 16 * j, La, 16); }
                }
                const int u = bs + 32;  /* 6 bits: low nibble in bytes 0-7, high pair in bytes 8-11 */
                sc[j % 8] |= (uint8_t)((u & 0xF) << (j < 8 ? 0 : 4));
                sc[8 + j % 4] |= (uint8_t)((u >> 4) << (2 * (j / 4)));
            }
        }
        uint8_t *hm = b;  /* bit k of hm[l] is the high bit of value 32 k + l */
        for (int j = 0; j < 256; j++)
            if (L[j] > 3) { hm[j % 32] |= (uint8_t)(1u << (j / 32)); L[j] -= 4; }
        qc_pack_2bit(L, b + 32);
    }
}

/* type ids are GGMLQuantizationType values; returns 0 on success, -1 for an unhandled type */
int qc_quant(int type, const float *x, uint8_t *out, int64_t n_blocks) {
    switch (type) {
        case QC_Q4_0: q_q4_0(x, out, n_blocks); return 0;
        case QC_Q4_1: q_q4_1(x, out, n_blocks); return 0;
        case QC_Q5_0: q_q5_0(x, out, n_blocks); return 0;
        case QC_Q5_1: q_q5_1(x, out, n_blocks); return 0;
        case QC_Q8_0: q_q8_0(x, out, n_blocks); return 0;
        case QC_Q2_K: q_q2_k(x, out, n_blocks); return 0;
        case QC_Q3_K: q_q3_k(x, out, n_blocks); return 0;
        case QC_Q4_K: q_k45(0, x, out, n_blocks); return 0;
        case QC_Q5_K: q_k45(1, x, out, n_blocks); return 0;
        case QC_Q6_K: qc_q6k(x, out, n_blocks, NULL); return 0;
        default: return -1;
    }
}

/* ggml's reference quantisers where ours differ (Q2_K), else qc_quant's */
int qc_quant_ref(int type, const float *x, uint8_t *out, int64_t n_blocks) {
    if (type == QC_Q2_K) { q_q2_k_ref(x, out, n_blocks); return 0; }
    return qc_quant(type, x, out, n_blocks);
}
