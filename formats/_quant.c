/* GGML block encoders for qconvert, called through ctypes via formats/_kernels (same shared library).
 * 32-value types are bit-identical to ggml's reference quantisers; K-quants use the same weighted
 * least-squares search (see the comment above q_k45). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "_half.h"
#include "_quant.h"

/* ---- quantisers for the 32-value block types, bit-identical to ggml's reference (no importance
 * matrix): the scale comes from the block's extreme values, values are truncated after adding the
 * offset, and the scale is stored as f16 while the unrounded scale is used to quantise. ---- */

static void q_q8_0(const float *x, uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32, b += 34) {
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
    for (int64_t i = 0; i < nb; i++, x += 32, b += 18) {
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
    for (int64_t i = 0; i < nb; i++, x += 32, b += 20) {
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
    for (int64_t i = 0; i < nb; i++, x += 32, b += 22) {
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
    for (int64_t i = 0; i < nb; i++, x += 32, b += 24) {
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
 * bit-identical to ggml's (tests/test_kquants.py). */
float qc_fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L, float *m_out,
                           float rmin, float rdelta, int nstep) {
    float lo = x[0], hi = x[0], sw = 0, sx = 0;
    for (int i = 0; i < n; i++) { lo = x[i] < lo ? x[i] : lo; hi = x[i] > hi ? x[i] : hi; sw += w[i]; sx += w[i] * x[i]; }
    if (lo > 0) lo = 0;
    if (hi == lo) { memset(L, 0, n); *m_out = -lo; return 0.0f; }
    float iscale = nmax / (hi - lo), scale = 1 / iscale, best = 0;
    for (int i = 0; i < n; i++) {
        L[i] = (uint8_t)clampi(rnd(iscale * (x[i] - lo)), 0, nmax);
        const float d = scale * L[i] + lo - x[i];
        best += w[i] * (d * d);
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
        for (int i = 0; i < n; i++) { const float d = sc * aux[i] + m - x[i]; err += w[i] * (d * d); }
        if (err < best) { memcpy(L, aux, n); best = err; scale = sc; lo = m; }
    }
    *m_out = -lo;
    return scale;
}

/* symmetric: x ~ scale * (L - nmax), L in [0, 2 nmax - 1], weights w (NULL: x^2): the scale from the value
 * of largest magnitude, then 18 nearby grids, each with its weighted least-squares scale; the grid with the
 * largest explained sum wins. Same operation order as ggml's make_qx_quants (bit-identical results). */
float qc_fit_sym(int n, int nmax, const float *x, const float *w, int8_t *L) {
    float amax = 0, max = 0;
    for (int i = 0; i < n; i++) { const float a = fabsf(x[i]); if (a > amax) { amax = a; max = x[i]; } }
    if (amax < 1e-15f) { memset(L, 0, n); return 0.0f; }
    float is = -nmax / max, sxl = 0, sl2 = 0;
    for (int i = 0; i < n; i++) {
        const int l = clampi(rnd(is * x[i]), -nmax, nmax - 1);
        const float wi = w ? w[i] : x[i] * x[i];
        L[i] = (int8_t)(l + nmax);
        sxl += wi * x[i] * l; sl2 += wi * l * l;
    }
    float scale = sl2 ? sxl / sl2 : 0.0f, best = scale * sxl;
    for (int k = -9; k <= 9; k++) {
        if (!k) continue;
        is = -(nmax + 0.1f * k) / max;
        sxl = sl2 = 0;
        for (int i = 0; i < n; i++) {
            const int l = clampi(rnd(is * x[i]), -nmax, nmax - 1);
            const float wi = w ? w[i] : x[i] * x[i];
            sxl += wi * x[i] * l; sl2 += wi * l * l;
        }
        if (sl2 > 0 && sxl * sxl > best * sl2) {
            for (int i = 0; i < n; i++) L[i] = (int8_t)(clampi(rnd(is * x[i]), -nmax, nmax - 1) + nmax);
            scale = sxl / sl2; best = scale * sxl;
        }
    }
    return scale;
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
    const int nmax = five ? 31 : 15, bsize = five ? 176 : 144;
    for (int64_t i = 0; i < nb; i++, x += 256, b += bsize) {
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
    for (int64_t i = 0; i < nb; i++, x += 256, b += 210, qw = qw ? qw + 256 : NULL) {
        int8_t L[256]; float scales[16], max_scale = 0, max_abs = 0;
        memset(b, 0, 210);
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

/* Q2_K: 16 sub-blocks of 16, x ~ d * sc * L - dmin * m with L in [0, 3] and 4-bit sc, m. The per
 * sub-block fit is the weighted search of fit_scale_min; once the super-block scales are rounded to f16,
 * each sub-block picks, among the 4-bit (sc, m) pairs next to the rounded ones, the pair whose re-coded
 * values have the smallest squared error. */
static void q_q2_k(const float *x, uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 256, b += 84) {
        uint8_t L[256], La[16]; float w[16], scales[16], mins[16], max_scale = 0, max_min = 0;
        memset(b, 0, 84);
        for (int j = 0; j < 16; j++) {
            const float *xs = x + 16 * j;
            for (int l = 0; l < 16; l++) w[l] = fabsf(xs[l]);
            scales[j] = qc_fit_scale_min(16, 3, xs, w, L + 16 * j, &mins[j], -0.5f, 0.1f, 15);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
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
    for (int64_t i = 0; i < nb; i++, x += 256, b += 110) {
        uint8_t L[256], La[16]; int8_t Ls[16]; float scales[16], max_scale = 0, max_abs = 0;
        memset(b, 0, 110);
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
        case 2: q_q4_0(x, out, n_blocks); return 0;
        case 3: q_q4_1(x, out, n_blocks); return 0;
        case 6: q_q5_0(x, out, n_blocks); return 0;
        case 7: q_q5_1(x, out, n_blocks); return 0;
        case 8: q_q8_0(x, out, n_blocks); return 0;
        case 10: q_q2_k(x, out, n_blocks); return 0;
        case 11: q_q3_k(x, out, n_blocks); return 0;
        case 12: q_k45(0, x, out, n_blocks); return 0;
        case 13: q_k45(1, x, out, n_blocks); return 0;
        case 14: qc_q6k(x, out, n_blocks, NULL); return 0;
        default: return -1;
    }
}


/* ---- group-wise quantisation for the int4 layout (see docs/int4-format.md) ----
 * Rows of `cols` values are cut into groups of `group` (the last one may be shorter). Asymmetric:
 * x ~ scale * q + offset, q in [0, 2^bits - 1]; symmetric: x ~ scale * (q - 2^(bits-1)) with a signed scale.
 * method 0 (rtn): scale and offset from the group's min / max. method 1 (search): the weighted
 * least-squares search of the K-quants over candidate scales. Scale and offset are rounded to f16 and
 * the values re-quantised with the rounded pair, so what is stored is what was optimised for. */
/* Same search as fit_scale_min (x ~ scale * L + offset, offset <= 0), but each candidate costs one pass:
 * the weighted error follows from the sums, err = s^2 Sll + 2 s m Sl - 2 s Slx + m^2 Sw - 2 m Sx + Sxx. */
#ifdef QC_X86
__attribute__((target("avx2,fma"))) static void cand_sums_avx2(int n, const float *x, const float *w, float lo,
                                                               float is, float nmax, float out[3][8]) {
    const __m256 vlo = _mm256_set1_ps(lo), vis = _mm256_set1_ps(is), vmax = _mm256_set1_ps(nmax);
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps(), c = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i), wv = _mm256_loadu_ps(w + i);
        __m256 l = _mm256_round_ps(_mm256_mul_ps(vis, _mm256_sub_ps(xv, vlo)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        l = _mm256_min_ps(_mm256_max_ps(l, _mm256_setzero_ps()), vmax);
        const __m256 wl = _mm256_mul_ps(wv, l);
        a = _mm256_add_ps(a, wl);
        b = _mm256_fmadd_ps(wl, l, b);
        c = _mm256_fmadd_ps(wl, xv, c);
    }
    _mm256_storeu_ps(out[0], a); _mm256_storeu_ps(out[1], b); _mm256_storeu_ps(out[2], c);
}
#endif
/* Weighted sums of one candidate grid: l = clamp(round(is * (x - lo)), 0, nmax); returns sum w l, sum w l^2,
 * sum w l x. The AVX2 path computes the same codes (same float operations, round half to even). */
static void cand_sums(int n, const float *x, const float *w, float lo, float is, int nmax,
                      double *sl_out, double *sl2_out, double *sxl_out) {
    int i = 0;
    double sl = 0, sl2 = 0, sxl = 0;
#ifdef QC_X86
    if (has_f16c() && n >= 8) {
        float a[3][8];
        cand_sums_avx2(n & ~7, x, w, lo, is, (float)nmax, a);
        for (int k = 0; k < 8; k++) { sl += a[0][k]; sl2 += a[1][k]; sxl += a[2][k]; }
        i = n & ~7;
    }
#endif
    for (; i < n; i++) {
        const int l = clampi(rnd(is * (x[i] - lo)), 0, nmax);
        sl += w[i] * l; sl2 += (double)w[i] * l * l; sxl += (double)w[i] * l * x[i];
    }
    *sl_out = sl; *sl2_out = sl2; *sxl_out = sxl;
}

static float fit_group_asym(int n, int nmax, const float *x, const float *w, float *off_out, int nstep) {
    float lo = x[0], hi = x[0];
    double sw = 0, sx = 0, sxx = 0;
    for (int i = 0; i < n; i++) {
        lo = x[i] < lo ? x[i] : lo; hi = x[i] > hi ? x[i] : hi;
        sw += w[i]; sx += w[i] * x[i]; sxx += (double)w[i] * x[i] * x[i];
    }
    if (lo > 0) lo = 0;
    if (hi == lo) { *off_out = lo; return 0.0f; }
    double best = INFINITY; float bs = (hi - lo) / nmax, bm = lo;
    for (int k = -1; k <= nstep; k++) {  /* k = -1: plain min/max */
        const float is = (k < 0 ? (float)nmax : (-1.0f + 2.0f * k / nstep + nmax)) / (hi - lo);
        double sl, sl2, sxl;
        cand_sums(n, x, w, lo, is, nmax, &sl, &sl2, &sxl);
        double sc, m;
        if (k < 0) { sc = 1.0 / is; m = lo; }
        else {
            const double D = sw * sl2 - sl * sl;
            if (D <= 0) continue;
            sc = (sw * sxl - sx * sl) / D; m = (sl2 * sx - sl * sxl) / D;
            if (m > 0) { m = 0; sc = sxl / sl2; }
        }
        const double err = sc * sc * sl2 + 2 * sc * m * sl - 2 * sc * sxl + m * m * sw - 2 * m * sx + sxx;
        if (err < best) { best = err; bs = (float)sc; bm = (float)m; }
    }
    *off_out = bm;
    return bs;
}

/* Integer-zero fit of one group: x ~ s * (l - z), z in [1, nmax], l in [0, nmax]. For each candidate grid
 * of fit_group_asym and each integer next to its zero, the codes, then the weighted least-squares scale
 * for them; returns the best scale, its zero in *z_out. */
static float fit_group_zint(int n, int nmax, const float *x, const float *w, int nstep, int *z_out) {
    float lo = x[0], hi = x[0];
    double sxx = 0;
    for (int i = 0; i < n; i++) {
        lo = x[i] < lo ? x[i] : lo; hi = x[i] > hi ? x[i] : hi;
        sxx += (double)w[i] * x[i] * x[i];
    }
    if (lo > 0) lo = 0;
    if (hi < 0) hi = 0;
    if (hi == lo) { *z_out = 1; return 0.0f; }
    float bs = (hi - lo) / nmax;
    int bz = clampi(rnd(-lo / bs), 1, nmax);
    double best = INFINITY;
    for (int k = -1; k <= nstep; k++) {  /* k = -1: plain min/max */
        const float is = (k < 0 ? (float)nmax : (-1.0f + 2.0f * k / nstep + nmax)) / (hi - lo);
        const float zc = -lo * is;
        for (int up = 0; up < 2; up++) {
            const int z = clampi(up ? (int)ceilf(zc) : (int)floorf(zc), 1, nmax);
            if (up && z == clampi((int)floorf(zc), 1, nmax)) continue;
            double sdd = 0, sdx = 0;
            for (int i = 0; i < n; i++) {
                const int d = clampi(rnd(x[i] * is) + z, 0, nmax) - z;
                sdd += (double)w[i] * d * d; sdx += (double)w[i] * d * x[i];
            }
            if (sdd <= 0 || sdx <= 0) continue;
            const double err = sxx - sdx * sdx / sdd;
            if (err < best) { best = err; bs = (float)(sdx / sdd); bz = z; }
        }
    }
    *z_out = bz;
    return bs;
}

/* Scale and offset (float) of one group of n values: min/max (method 0) or the weighted search (1).
 * scheme: 0 asymmetric, 1 symmetric, 2 (ZINT) integer zeros: the offset returned is -z * scale. */
static void fit_one_group(const float *xs, int n, int bits, int scheme, int method, float *s_out, float *m_out) {
    const int sym = scheme == 1, nmax = (1 << bits) - 1, half = 1 << (bits - 1);
    float w[256]; int8_t Ls[256];
    float s, m = 0;
    if (sym) {
        /* signed scale: the extreme value maps to q = 0 (l = -half), as Q4_0 does */
        if (method == 1 && n <= 256) s = qc_fit_sym(n, half, xs, NULL, Ls);
        else { float mx = 0, amax = 0; for (int i = 0; i < n; i++) if (fabsf(xs[i]) > amax) { amax = fabsf(xs[i]); mx = xs[i]; } s = mx / -half; }
    } else if (method == 1 && n <= 256) {
        float s2 = 0; for (int i = 0; i < n; i++) s2 += xs[i] * xs[i];
        const float av = sqrtf(s2 / n);
        for (int i = 0; i < n; i++) w[i] = av + fabsf(xs[i]);
        if (scheme == 2) {
            int z;
            s = fit_group_zint(n, nmax, xs, w, 10, &z);
            m = (float)z * -s;
        } else s = fit_group_asym(n, nmax, xs, w, &m, 10);
    } else {
        float lo = xs[0], hi = xs[0];
        for (int i = 1; i < n; i++) { lo = xs[i] < lo ? xs[i] : lo; hi = xs[i] > hi ? xs[i] : hi; }
        s = (hi - lo) / nmax; m = lo;
    }
    *s_out = s; *m_out = m;
}

/* The stored form of a group's scale s and offset m, and the float values dequantisation will use.
 * dq == NULL: f16 bits. Otherwise 8-bit codes on the row's steps dq = {scale step, offset step} (f16 bits):
 * scale code in [0, 255] (asymmetric) or [-127, 127] (symmetric, signed scale), offset code in [-127, 127],
 * returned as 16-bit two's complement; the value is step * code. `sym` is the scheme: 0 asymmetric, 1
 * symmetric, 2 (ZINT) asymmetric on integer zeros: *mh = z = round(-m / scale) in [1, 2^bits - 1] (GPTQ v1
 * stores z - 1), the offset z * -scale (the offset step is unused); an f16 scale keeps 11 - bits significant
 * bits, so that z * -scale is an exact f16 as well. */
#define ZINT 2
static void store_group_z(float s, float m, int scheme, int nmax, const uint16_t *dq, uint16_t *sh,
                          uint16_t *mh, float *sf, float *mf);
static void store_group(float s, float m, int sym, const uint16_t *dq, uint16_t *sh, uint16_t *mh,
                        float *sf, float *mf) {
    if (!dq) {
        *sh = f2h(s); *mh = f2h(m);
        *sf = h2f(*sh); *mf = sym ? 0.0f : h2f(*mh);
        return;
    }
    const float ds = h2f(dq[0]), dm = h2f(dq[1]);
    const int cs = ds > 0 ? clampi(rnd(s / ds), sym ? -127 : 0, sym ? 127 : 255) : 0;
    const int cm = (!sym && dm > 0) ? clampi(rnd(m / dm), -127, 127) : 0;
    *sh = (uint16_t)(int16_t)cs; *mh = (uint16_t)(int16_t)cm;
    *sf = ds * (float)cs; *mf = dm * (float)cm;
}
static int zero_of(float m, float sf, int nmax) { return sf > 0 ? clampi(rnd(-m / sf), 1, nmax) : 1; }
static void store_group_z(float s, float m, int scheme, int nmax, const uint16_t *dq, uint16_t *sh, uint16_t *mh,
                          float *sf, float *mf) {
    if (scheme != ZINT) { store_group(s, m, scheme, dq, sh, mh, sf, mf); return; }
    if (!dq) {  /* f16 scale of 11 - bits significant bits (rounded up): z * -s is an exact f16 too (GGUF Q4_1) */
        int e;
        const float f = frexpf(s, &e), k = (float)(1 << (11 - (32 - __builtin_clz((unsigned)nmax))));
        *sh = f2h(ldexpf(ceilf(f * k) / k, e)); *sf = h2f(*sh);
    }
    else {
        const float ds = h2f(dq[0]);
        const int cs = ds > 0 ? clampi(rnd(s / ds), 0, 255) : 0;
        *sh = (uint16_t)cs; *sf = ds * (float)cs;
    }
    const int z = zero_of(m, *sf, nmax);
    *mh = (uint16_t)z; *mf = (float)z * -*sf;
}

/* f16 bits h (positive) rounded up to 3 significant bits: times any 8-bit code, an exact f16 */
static uint16_t three_bits(uint16_t h) {
    for (;; h++) {
        int len = 0;
        for (uint16_t v = h < 0x400 ? h : (uint16_t)((h & 0x3ff) | 0x400); v; v >>= 1) len++;
        const int drop = len > 3 ? len - 3 : 0;
        if ((h & ((1u << drop) - 1)) == 0 || h >= 0x7b00) return h;
    }
}
/* Row steps for 8-bit scale codes: the largest |scale| / 255 (127 when symmetric) and |offset| / 127, as f16
 * bits, rounded up so that the largest value still has a code. ZINT: the scale step has 3 significant bits
 * (so every scale is an exact f16, as the GPTQ / AWQ / compressed-tensors exports store it); no offset step. */
static void row_steps(const float *s, const float *m, int64_t ng, int scheme, uint16_t *dq) {
    const int sym = scheme == 1;
    float smax = 0, mmax = 0;
    for (int64_t g = 0; g < ng; g++) {
        smax = fabsf(s[g]) > smax ? fabsf(s[g]) : smax;
        if (!sym) mmax = fabsf(m[g]) > mmax ? fabsf(m[g]) : mmax;
    }
    const float t[2] = {smax / (sym ? 127.0f : 255.0f), mmax / 127.0f};
    for (int k = 0; k < 2; k++) {
        uint16_t h = f2h(t[k]);
        if (h2f(h) < t[k] && h < 0x7bff) h++;  /* positive f16: the next bit pattern is the next value up */
        dq[k] = h;
    }
    if (scheme == ZINT) dq[0] = three_bits(dq[0]), dq[1] = 0;
}

static inline int code_of(float x, float is, float mf, int sym, int half, int nmax) {
    return clampi(sym ? rnd(x * is) + half : rnd((x - mf) * is), 0, nmax);
}

/* codes of one group of n values for the stored sf, mf into qs; returns the squared error */
static float group_codes(const float *xs, int n, float sf, float mf, int sym, int half, int nmax, uint8_t *qs) {
    const float is = sf ? 1.0f / sf : 0.0f;
    float e = 0;
    for (int i = 0; i < n; i++) {
        const int v = code_of(xs[i], is, mf, sym, half, nmax);
        qs[i] = (uint8_t)v;
        const float d = (sym ? sf * (float)(v - half) : (float)v * sf + mf) - xs[i];
        e += d * d;
    }
    return e;
}

/* Quantise rows of x group-wise: codes to q [rows, cols], scales / offsets [rows, ng] as f16 bits, or, when dq
 * is not NULL, as 8-bit codes (store_group) on per-row steps dq [rows, 2]: computed and written there, or,
 * with fixed_steps, read from there. err_out (may be NULL) receives the sum of squared dequantisation errors.
 * scheme: 0 asymmetric, 1 symmetric, 2 (ZINT) asymmetric on integer zeros (offset_out gets z). */
void qc_group_quant(const float *x, int64_t rows, int64_t cols, int group, int bits, int scheme, int method,
                    uint8_t *q, uint16_t *scale_out, uint16_t *offset_out, uint16_t *dq, int fixed_steps,
                    double *err_out) {
    double err = 0;
    const int sym = scheme == 1, nmax = (1 << bits) - 1, half = 1 << (bits - 1);
    const int64_t ng = (cols + group - 1) / group;
    float *sbuf = malloc(2 * ng * sizeof(float)), *mbuf = sbuf + ng;
    if (!sbuf) { if (err_out) *err_out = -1; return; }
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < ng; g++) {
            const int64_t c0 = g * group;
            const int n = (int)(cols - c0 < group ? cols - c0 : group);
            fit_one_group(x + r * cols + c0, n, bits, scheme, method, &sbuf[g], &mbuf[g]);
        }
        if (dq && !fixed_steps) row_steps(sbuf, mbuf, ng, scheme, dq + 2 * r);
        for (int64_t g = 0; g < ng; g++) {
            const int64_t c0 = g * group;
            const int n = (int)(cols - c0 < group ? cols - c0 : group);
            const float *xs = x + r * cols + c0;
            uint8_t *qs = q + r * cols + c0;
            uint16_t sh, mh;
            float sf, mf;
            store_group_z(sbuf[g], mbuf[g], scheme, nmax, dq ? dq + 2 * r : NULL, &sh, &mh, &sf, &mf);
            const float e = group_codes(xs, n, sf, mf, sym, half, nmax, qs);
            scale_out[r * ng + g] = sh;
            if (!sym) offset_out[r * ng + g] = mh;
            err += e;
        }
    }
    free(sbuf);
    if (err_out) *err_out = err;
}

/* GPTQ's sequential sweep over one block of n columns, rows [r0, r1) (rows are independent, so callers
 * split them over threads). W: the block's first column, row stride ld, updated in place; U: the
 * block's n x n corner of the upper Cholesky factor of H^-1 (row stride ldu). At each column that starts
 * a group (the block starts on a group boundary) the group's scale/offset are fitted on the updated
 * weights and written to scales/offsets [rows, ng] at group g0 + i / group (f16 bits, or 8-bit codes on the
 * fixed row steps dq [rows, 2] when dq is not NULL, see store_group); codes go to Q (row stride
 * ldq); each column's scaled error (w - dequant) / U[i,i] goes to E [rows, n], for the caller's update
 * of the columns after the block. */
void qc_gptq_block(float *W, int64_t ld, const float *U, int64_t ldu, int64_t n, int64_t r0, int64_t r1,
                   int group, int bits, int scheme, int method, uint8_t *Q, int64_t ldq,
                   uint16_t *scales, uint16_t *offsets, const uint16_t *dq, int64_t ng, int64_t g0, float *E) {
    const int sym = scheme == 1, nmax = (1 << bits) - 1, half = 1 << (bits - 1);
    for (int64_t r = r0; r < r1; r++) {
        float *w = W + r * ld, *e = E + r * n;
        float sf = 0, mf = 0, is = 0;
        for (int64_t i = 0; i < n; i++) {
            if (i % group == 0) {
                uint16_t sh, mh;
                float s, m;
                const int gn = (int)(n - i < group ? n - i : group);
                fit_one_group(w + i, gn, bits, scheme, method, &s, &m);
                store_group_z(s, m, scheme, nmax, dq ? dq + 2 * r : NULL, &sh, &mh, &sf, &mf);
                const int64_t g = g0 + i / group;
                scales[r * ng + g] = sh;
                if (!sym) offsets[r * ng + g] = mh;
                is = sf ? 1.0f / sf : 0.0f;
            }
            const int v = code_of(w[i], is, mf, sym, half, nmax);
            Q[r * ldq + i] = (uint8_t)v;
            const float deq = sym ? (float)(v - half) * sf : (float)v * sf + mf;
            const float err = (w[i] - deq) / U[i * ldu + i];
            e[i] = err;
            const float *u = U + i * ldu;
            for (int64_t j = i + 1; j < n; j++) w[j] -= err * u[j];
        }
    }
}
