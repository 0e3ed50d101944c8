/* GGML block encoders of formats.ggml._kernels (bound in formats/ggml/codec.py) with an importance matrix (per
 * input column: the mean squared activation over calibration text, formats/gguf/imatrix.py), and the
 * encoders of the non-linear 4-bit types IQ4_NL / IQ4_XS.
 *
 * With an importance matrix every block's fit minimises sum_j w_j (x_j - q_j)^2 with, for column j,
 * w_j = imatrix_j * sqrt(sigma2 + x_j^2) (sigma2: the mean square of the row, or twice that of the
 * super-block for the K-quants; Q6_K uses imatrix_j as it is). The searches and their float operation
 * order are those of llama-quantize --imatrix (ggml's quantize_row_*_impl), so the results are
 * bit-identical to it (tests/test_imatrix.py). Q8_0 ignores the importance matrix, as ggml does.
 */
#define QC_GGML_ENCODERS  /* encode.h: this library's shared encoder functions */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "encode.h"
#include "types.h"
#include "iq.h"

/* sum of squares, in index order (the order fixes the float result) */
static float sum_sq(const float *x, int64_t n) {
    float s = 0;
    for (int64_t j = 0; j < n; j++) s += x[j] * x[j];
    return s;
}

static void importance(const float *x, const float *qw, float sigma2, int n, float *w) {
    for (int j = 0; j < n; j++) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
}

/* 32-value types on one row (one block length, QC_Q4_0_BLOCK): Q4_0 / Q5_0 (symmetric, nmax 8 / 16), Q4_1 /
 * Q5_1 (scale and min) */
static void q_legacy_w(int type, const float *x, uint8_t *b, int64_t cols, const float *qw) {
    const float sigma2 = sum_sq(x, cols) / cols;
    const int asym = type == QC_Q4_1 || type == QC_Q5_1, five = type == QC_Q5_0 || type == QC_Q5_1;
    const int size = five ? (asym ? QC_Q5_1_BYTES : QC_Q5_0_BYTES) : (asym ? QC_Q4_1_BYTES : QC_Q4_0_BYTES);
    for (int64_t ib = 0; ib < cols / QC_Q4_0_BLOCK; ib++, x += QC_Q4_0_BLOCK, qw += QC_Q4_0_BLOCK, b += size) {
        float w[32]; uint8_t L[32];
        importance(x, qw, sigma2, 32, w);
        if (asym) {
            float m;
            put16(b, qc_fit_scale_min(32, five ? 31 : 15, x, w, L, &m, -0.9f, 0.05f, 36));
            put16(b + 2, -m);
        } else {
            put16(b, qc_fit_sym(32, five ? 16 : 8, x, w, (int8_t *)L));
        }
        uint8_t *qs = b + size - 16;
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            qs[j] = (uint8_t)((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4));
            qh |= ((uint32_t)(L[j] >> 4) & 1u) << j;
            qh |= ((uint32_t)(L[j + 16] >> 4) & 1u) << (j + 16);
        }
        if (five) memcpy(b + 2 + 2 * asym, &qh, 4);
    }
}

/* Q2_K: scale and min per 16 values (4-bit each on two f16 super-block scales) */
static void q_q2_k_w(const float *x, uint8_t *b, int64_t nb, const float *qw) {
    for (int64_t i = 0; i < nb; i++, x += QC_Q2_K_BLOCK, qw += QC_Q2_K_BLOCK, b += QC_Q2_K_BYTES) {
        uint8_t L[256], Ls[16], Lm[16]; float w[16], sw[16], scales[16], mins[16];
        const float sigma2 = sum_sq(x, QC_QK_K) / QC_QK_K;
        for (int j = 0; j < 16; j++) {
            importance(x + 16 * j, qw + 16 * j, sigma2, 16, w);
            sw[j] = 0;
            for (int l = 0; l < 16; l++) sw[j] += w[l];
            scales[j] = qc_fit_scale_min(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], -0.9f, 0.05f, 36);
        }
        put16(b + 80, qc_fit_qp(16, 15, scales, Ls, sw));
        put16(b + 82, qc_fit_qp(16, 15, mins, Lm, sw));
        const float dm = h2f(rd16(b + 80)), mm = h2f(rd16(b + 82));
        for (int j = 0; j < 16; j++) {
            b[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
            const float d = dm * (b[j] & 0xF);
            if (!d) continue;
            const float m = mm * (b[j] >> 4);
            for (int l = 0; l < 16; l++) L[16 * j + l] = (uint8_t)clampi(rnd((x[16 * j + l] + m) / d), 0, 3);
        }
        qc_pack_2bit(L, b + 16);
    }
}

/* Q3_K: signed 6-bit scale per 16 values on one f16 super-block scale */
static void q_q3_k_w(const float *x, uint8_t *b, int64_t nb, const float *qw) {
    for (int64_t i = 0; i < nb; i++, x += QC_Q3_K_BLOCK, qw += QC_Q3_K_BLOCK, b += QC_Q3_K_BYTES) {
        int8_t L[256], Ls[16]; float w[16], sw[16], scales[16];
        const float sigma2 = 2 * sum_sq(x, QC_QK_K) / QC_QK_K;
        for (int j = 0; j < 16; j++) {
            importance(x + 16 * j, qw + 16 * j, sigma2, 16, w);
            sw[j] = 0;
            for (int l = 0; l < 16; l++) sw[j] += w[l];
            scales[j] = qc_fit_sym(16, 4, x + 16 * j, w, L + 16 * j);
        }
        memset(b, 0, QC_Q3_K_BYTES);
        uint8_t *sc = b + 96;
        const float d_block = qc_fit_sym(16, 32, scales, sw, Ls);
        for (int j = 0; j < 16; j++) {  /* 6 bits: low nibble in bytes 0-7, high pair in bytes 8-11 */
            sc[j % 8] |= (uint8_t)((Ls[j] & 0xF) << (j < 8 ? 0 : 4));
            sc[8 + j % 4] |= (uint8_t)((Ls[j] >> 4) << (2 * (j / 4)));
        }
        put16(b + 108, d_block);
        const float d0 = h2f(rd16(b + 108));
        for (int j = 0; j < 16; j++) {
            const int s = (((sc[j % 8] >> (j < 8 ? 0 : 4)) & 0xF) | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
            const float d = d0 * s;
            if (!d) continue;
            for (int l = 0; l < 16; l++) L[16 * j + l] = (int8_t)(clampi(rnd(x[16 * j + l] / d), -4, 3) + 4);
        }
        uint8_t *hm = b;  /* bit k of hm[l] is the high bit of value 32 k + l */
        uint8_t U[256];
        for (int j = 0; j < 256; j++) {
            U[j] = (uint8_t)L[j];
            if (U[j] > 3) { hm[j % 32] |= (uint8_t)(1u << (j / 32)); U[j] -= 4; }
        }
        qc_pack_2bit(U, b + 32);
    }
}

/* Q4_K / Q5_K: 6-bit scale and min per 32 values on two f16 super-block scales */
static void q_k45_w(int five, const float *x, uint8_t *b, int64_t nb, const float *qw) {
    const int nmax = five ? 31 : 15, size = five ? QC_Q5_K_BYTES : QC_Q4_K_BYTES;
    for (int64_t i = 0; i < nb; i++, x += QC_QK_K, qw += QC_QK_K, b += size) {
        uint8_t L[256], Ls[8], Lm[8]; float w[32], sw[8], scales[8], mins[8];
        const float sigma2 = 2 * sum_sq(x, QC_QK_K) / QC_QK_K;
        for (int j = 0; j < 8; j++) {
            importance(x + 32 * j, qw + 32 * j, sigma2, 32, w);
            sw[j] = 0;
            for (int l = 0; l < 32; l++) sw[j] += w[l];
            scales[j] = qc_fit_scale_min(32, nmax, x + 32 * j, w, L + 32 * j, &mins[j], -0.9f, 0.05f, 36);
        }
        memset(b, 0, size);
        put16(b, qc_fit_qp(8, 63, scales, Ls, sw));
        put16(b + 2, qc_fit_qp(8, 63, mins, Lm, sw));
        uint8_t *sc = b + 4;
        for (int j = 0; j < 8; j++) qc_pack_scale_min_k4(sc, j, Ls[j] < 63 ? Ls[j] : 63, Lm[j] < 63 ? Lm[j] : 63);
        const float d0 = h2f(rd16(b)), m0 = h2f(rd16(b + 2));
        for (int j = 0; j < 8; j++) {
            uint8_t s, m; scale_min_k4(j, sc, &s, &m);
            const float d = d0 * s;
            if (!d) continue;
            const float dm = m0 * m;
            for (int l = 0; l < 32; l++) L[32 * j + l] = (uint8_t)clampi(rnd((x[32 * j + l] + dm) / d), 0, nmax);
        }
        qc_pack_k45(five, L, b);
    }
}

/* ---- IQ4_NL / IQ4_XS: 4-bit indices into a fixed non-linear grid ---- */
static const int8_t IQ4_GRID[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* index of the grid value nearest v (the lower one on ties) */
static int nearest_iq4(float v) {
    if (v <= IQ4_GRID[0]) return 0;
    if (v >= IQ4_GRID[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) { const int mid = (lo + hi) / 2; if (v < IQ4_GRID[mid]) hi = mid; else lo = mid; }
    return v - IQ4_GRID[hi - 1] < IQ4_GRID[hi] - v ? hi - 1 : hi;
}

#if defined(__x86_64__)
static int has_avx2(void) {
    static int v = -1;
    if (v < 0) { __builtin_cpu_init(); v = __builtin_cpu_supports("avx2") ? 1 : 0; }
    return v;
}

/* nearest_iq4(id * x[j]) for 32 values, 8 at a time: lo = how many of grid values 1..14 are <= v (the binary
 * search's lower end), then the same float comparison of v - g[lo] with g[lo + 1] - v; NaN gives 15, as the
 * binary search does */
__attribute__((target("avx2"))) static void nearest_iq4_32_avx2(const float *x, float id, uint8_t *L) {
    float g[16];
    for (int k = 0; k < 16; k++) g[k] = IQ4_GRID[k];
    const __m256 low = _mm256_loadu_ps(g), high = _mm256_loadu_ps(g + 8), s = _mm256_set1_ps(id);
    const __m256i eight = _mm256_set1_epi32(8), one = _mm256_set1_epi32(1), fifteen = _mm256_set1_epi32(15);
    for (int j = 0; j < 32; j += 8) {
        const __m256 v = _mm256_mul_ps(s, _mm256_loadu_ps(x + j));
        __m256i lo = _mm256_setzero_si256();
        for (int k = 1; k < 15; k++)
            lo = _mm256_sub_epi32(lo, _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_set1_ps(g[k]), _CMP_GE_OQ)));
        const __m256i hi = _mm256_add_epi32(lo, one);
        const __m256 glo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, lo), _mm256_permutevar8x32_ps(high, lo),
                                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(eight, lo) ^ _mm256_set1_epi32(-1)));
        const __m256 ghi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, hi), _mm256_permutevar8x32_ps(high, hi),
                                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(eight, hi) ^ _mm256_set1_epi32(-1)));
        const __m256 pick_lo = _mm256_cmp_ps(_mm256_sub_ps(v, glo), _mm256_sub_ps(ghi, v), _CMP_LT_OQ);
        __m256i idx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(hi), _mm256_castsi256_ps(lo), pick_lo));
        idx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(idx), _mm256_castsi256_ps(fifteen),
                                                   _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        int32_t out[8];
        _mm256_storeu_si256((__m256i *)out, idx);
        for (int i = 0; i < 8; i++) L[j + i] = (uint8_t)out[i];
    }
}
#endif

/* L[j] = nearest_iq4(id * x[j]) for one 32-value sub-block */
static void nearest_iq4_32(const float *x, float id, uint8_t *L) {
#if defined(__x86_64__)
    if (has_avx2()) { nearest_iq4_32_avx2(x, id, L); return; }
#endif
    for (int j = 0; j < 32; j++) L[j] = (uint8_t)nearest_iq4(id * x[j]);
}

/* weighted sums of one candidate inverse scale: sum w q x and sum w q^2 over the nearest grid values */
static void iq4_sums(const float *x, const float *w, float id, uint8_t *L, float *sqx, float *sq2) {
    uint8_t own[32];
    if (!L) L = own;
    nearest_iq4_32(x, id, L);
    float a = 0, c = 0;
    for (int j = 0; j < 32; j++) {
        const float q = IQ4_GRID[L[j]];
        a += w[j] * q * x[j]; c += w[j] * q * q;
    }
    *sqx = a; *sq2 = c;
}

/* One IQ4 super-block of n values (32: IQ4_NL, 256: IQ4_XS, 6-bit sub-block scales) into d, scales, qs.
 * Each 32-value sub-block tries 15 grid scalings around the largest value and keeps the one with the best
 * weighted least-squares scale; IQ4_XS then codes the sub-block scales on the super-block's. */
static void iq4_block(int n, const float *x, const float *qw, uint8_t *dh, uint8_t *sh, uint8_t *sl, uint8_t *qs) {
    float sigma2 = 0, scales[8], max_scale = 0, amax_scale = 0, w[32];
    uint8_t L[256];
    for (int j = 0; j < n; j++) sigma2 += x[j] * x[j];
    sigma2 *= 2.f / n;
    memset(qs, 0, n / 2);
    put16(dh, 0.f);
    for (int ib = 0; ib < n / 32; ib++) {
        const float *xb = x + 32 * ib;
        if (qw) importance(xb, qw + 32 * ib, sigma2, 32, w);
        else for (int j = 0; j < 32; j++) w[j] = xb[j] * xb[j];
        float amax = 0, max = 0;
        for (int j = 0; j < 32; j++) { const float a = fabsf(xb[j]); if (a > amax) { amax = a; max = xb[j]; } }
        if (amax < 1e-15f) { scales[ib] = 0; continue; }
        float sqx, sq2;
        iq4_sums(xb, w, 1 / (-max / IQ4_GRID[0]), L + 32 * ib, &sqx, &sq2);
        float d = sq2 > 0 ? sqx / sq2 : 0.f, best = d * sqx;
        for (int t = -7; t <= 7; t++) {
            iq4_sums(xb, w, (t + IQ4_GRID[0]) / max, NULL, &sqx, &sq2);
            if (sq2 > 0 && sqx * sqx > best * sq2) { d = sqx / sq2; best = d * sqx; }
        }
        scales[ib] = d;
        if (fabsf(d) > amax_scale) { amax_scale = fabsf(d); max_scale = d; }
    }
    if (n > 32) {
        uint16_t h = 0;
        const float d = -max_scale / 32, id = d ? 1 / d : 0.f;
        put16(dh, d);
        for (int ib = 0; ib < n / 32; ib++) {
            const int l = clampi(rnd(id * scales[ib]), -32, 31);
            const float dl = d * l, idl = dl ? 1 / dl : 0.f;
            nearest_iq4_32(x + 32 * ib, idl, L + 32 * ib);
            const int u = l + 32;
            if (ib % 2 == 0) sl[ib / 2] = (uint8_t)(u & 0xF);
            else sl[ib / 2] |= (uint8_t)((u & 0xF) << 4);
            h |= (uint16_t)((u >> 4) << (2 * ib));
        }
        memcpy(sh, &h, 2);
    } else {
        put16(dh, scales[0]);
        const float id = scales[0] ? 1 / scales[0] : 0;
        nearest_iq4_32(x, id, L);
    }
    for (int i = 0; i < n / 32; i++)
        for (int j = 0; j < 16; j++) qs[16 * i + j] = (uint8_t)(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
}

/* Encode rows [rows, cols] of float32 into GGML type `type` (GGMLQuantizationType id) with importance
 * weights imatrix [cols] (NULL: IQ4 and the i-quants llama.cpp allows without one). Returns 0, or -1 for a type this
 * file does not handle (the caller then uses qc_quant: Q8_0, float types). */
int qc_quant_w(int type, const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    const int64_t nk = cols / QC_QK_K;
    switch (type) {  /* the lattice i-quants (iq.h), whole rows at a time */
        case QC_IQ2_XXS: return qc_quant_iq2_xxs(x, out, rows, cols, imatrix);
        case QC_IQ2_XS: return qc_quant_iq2_xs(x, out, rows, cols, imatrix);
        case QC_IQ2_S: return qc_quant_iq2_s(x, out, rows, cols, imatrix);
        case QC_IQ3_XXS: return qc_quant_iq3_xxs(x, out, rows, cols, imatrix);
        case QC_IQ3_S: return qc_quant_iq3_s(x, out, rows, cols, imatrix);
        case QC_IQ1_S: return qc_quant_iq1_s(x, out, rows, cols, imatrix);
        case QC_IQ1_M: return qc_quant_iq1_m(x, out, rows, cols, imatrix);
        default: break;
    }
    if (!imatrix && type != QC_IQ4_NL && type != QC_IQ4_XS) return -1;
    for (int64_t r = 0; r < rows; r++, x += cols) {
        switch (type) {
            case QC_Q4_0: case QC_Q4_1: case QC_Q5_0: case QC_Q5_1: {
                const int64_t size = type == QC_Q4_0 ? QC_Q4_0_BYTES : type == QC_Q4_1 ? QC_Q4_1_BYTES
                                   : type == QC_Q5_0 ? QC_Q5_0_BYTES : QC_Q5_1_BYTES;
                q_legacy_w(type, x, out + r * (cols / QC_Q4_0_BLOCK) * size, cols, imatrix);
                break;
            }
            case QC_Q2_K: q_q2_k_w(x, out + r * nk * QC_Q2_K_BYTES, nk, imatrix); break;
            case QC_Q3_K: q_q3_k_w(x, out + r * nk * QC_Q3_K_BYTES, nk, imatrix); break;
            case QC_Q4_K: q_k45_w(0, x, out + r * nk * QC_Q4_K_BYTES, nk, imatrix); break;
            case QC_Q5_K: q_k45_w(1, x, out + r * nk * QC_Q5_K_BYTES, nk, imatrix); break;
            case QC_Q6_K: qc_q6k(x, out + r * nk * QC_Q6_K_BYTES, nk, imatrix); break;
            case QC_IQ4_NL: {  /* d, qs[16] */
                const int64_t n = QC_IQ4_NL_BLOCK, sz = QC_IQ4_NL_BYTES;
                uint8_t *b = out + r * (cols / n) * sz;
                for (int64_t ib = 0; ib < cols / n; ib++)
                    iq4_block(n, x + n * ib, imatrix ? imatrix + n * ib : NULL, b + sz * ib, NULL, NULL, b + sz * ib + 2);
                break;
            }
            case QC_IQ4_XS: {  /* d, scales_h (u16), scales_l[4], qs[128] */
                const int64_t n = QC_IQ4_XS_BLOCK;
                uint8_t *b = out + r * nk * QC_IQ4_XS_BYTES;
                for (int64_t ib = 0; ib < nk; ib++, b += QC_IQ4_XS_BYTES)
                    iq4_block(n, x + n * ib, imatrix ? imatrix + n * ib : NULL, b, b + 2, b + 4, b + 8);
                break;
            }
            default: return -1;
        }
    }
    return 0;
}
