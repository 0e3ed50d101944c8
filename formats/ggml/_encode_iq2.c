/* IQ2_XXS and IQ2_XS encoders (iq.h): 8 values at a time as one point of the E8-style grid (kgrid_q2xs: 256 /
 * 512 points of odd magnitudes 1, 3, 5) times a sub-block scale, with 7 stored sign bits (the eighth is fixed by
 * even parity). Both need an importance matrix, as llama.cpp does.
 *
 * The searches and their float operation order are those of ggml-quants.c's quantize_row_iq2_xxs_impl /
 * quantize_row_iq2_xs_impl (with iq2_find_best_neighbour and make_qp_quants), so the bytes equal
 * ggml_quantize_chunk's (tests/test_iquants.py).
 *
 * Block layouts (little-endian):
 *   IQ2_XXS, 66 bytes: f16 d; per 32 values two uint32: four grid numbers (8 bits each), then four 7-bit sign
 *            groups and a 4-bit scale s (bits 28..31); sub-block scale d * (0.5 + s) / 4 in the decoder.
 *   IQ2_XS,  74 bytes: f16 d; per 8 values one uint16: a 9-bit grid number and 7 sign bits; then 4-bit scales
 *            of the 16-value sub-blocks, two per byte (low nibble first).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#define QC_GGML_ENCODERS  /* encode.h: this library's shared encoder functions */
#include "encode.h"
#include "types.h"
#include "iq.h"

#define MAXF(a, b) ((a) > (b) ? (a) : (b))  /* the operand order of ggml's MAX matters for NaN */

/* the grid, map and neighbour lists of `type`, or 0 when codec.py has not prepared them */
typedef struct { const uint64_t *grid; const uint8_t *pos; const int *map; const uint16_t *nb; } lookup;

static int get_lookup(int type, lookup *lk) {
    const qc_iq_table *t = qc_iq_table_get(type);
    if (!t || !t->map || !t->neighbours || t->width != 8) return 0;
    lk->grid = (const uint64_t *)(const void *)t->pos;  /* ggml's kgrid_q2xs */
    lk->pos = t->pos; lk->map = t->map; lk->nb = t->neighbours;
    return 1;
}

/* codes of grid point g: (pos - 1) / 2, in 0 .. 2 */
static inline void point_codes(const lookup *lk, int g, int8_t *L) {
    for (int i = 0; i < 8; i++) L[i] = (int8_t)((lk->pos[8 * g + i] - 1) / 2);
}

/* The map key of 8 codes in 0 .. 2 (two bits each) */
static inline int key8(const int8_t *L) {
    int u = 0;
    for (int i = 0; i < 8; i++) u |= L[i] << 2 * i;
    return u;
}

/* Off-grid key u: of its neighbour list, the point nearest to x in sum_i w_i (scale * pos_i - x_i)^2 (the
 * first one on ties); its codes into L, its number returned (iq2_find_best_neighbour). Each term depends only
 * on (i, pos_i), so the 24 possible terms are computed once, each as ggml computes it, into t[8 i + pos], and
 * every neighbour's sum adds its 8 terms in ggml's order: the same floats. */
#ifdef QC_X86
static int has_avx2(void) {
    static int v = -1;
    if (v < 0) { __builtin_cpu_init(); v = __builtin_cpu_supports("avx2") ? 1 : 0; }
    return v;
}

/* 8 neighbours at once, one per lane: lane l's index dword holds pos bytes 0..3 (or 4..7) of point l, shifted
 * so that the low 3 bits are pos_i, which picks the term from t's row i (vpermps); the lanes' sums then go
 * through the scalar comparison in list order. Adds only (no FMA in this target): the same floats. */
__attribute__((target("avx2"))) static int nearest_avx2(const uint64_t *grid, const uint16_t *list, int n,
                                                          const float *x, const float *w, float scale) {
    const __m256 vx = _mm256_loadu_ps(x), vw = _mm256_loadu_ps(w);
    __m256 term[3], row[8];  /* term[c]: the 8 terms at pos 2 c + 1; row[i]: coordinate i's at lanes 1, 3, 5 */
    for (int c = 0; c < 3; c++) {
        const __m256 diff = _mm256_sub_ps(_mm256_set1_ps(scale * (float)(2 * c + 1)), vx);
        term[c] = _mm256_mul_ps(_mm256_mul_ps(vw, diff), diff);
    }
    for (int i = 0; i < 8; i++) {
        const __m256i at = _mm256_set1_epi32(i);
        const __m256 t1 = _mm256_permutevar8x32_ps(term[0], at), t3 = _mm256_permutevar8x32_ps(term[1], at);
        row[i] = _mm256_blend_ps(_mm256_blend_ps(t1, t3, 0x08), _mm256_permutevar8x32_ps(term[2], at), 0x20);
    }
    float best = FLT_MAX;
    int g = list[0];
    for (int j = 0; j < n; j += 8) {
        const int r = n - j < 8 ? n - j : 8;
        int id[8];
        for (int l = 0; l < 8; l++) id[l] = list[j + (l < r ? l : r - 1)];
        const __m256 a = _mm256_castsi256_ps(_mm256_set_epi64x((long long)grid[id[5]], (long long)grid[id[4]],
                                                               (long long)grid[id[1]], (long long)grid[id[0]]));
        const __m256 b = _mm256_castsi256_ps(_mm256_set_epi64x((long long)grid[id[7]], (long long)grid[id[6]],
                                                               (long long)grid[id[3]], (long long)grid[id[2]]));
        __m256i lo = _mm256_castps_si256(_mm256_shuffle_ps(a, b, 0x88));  /* bytes 0..3 of points 0..7 */
        __m256i hi = _mm256_castps_si256(_mm256_shuffle_ps(a, b, 0xDD));  /* bytes 4..7 */
        __m256 d = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++, lo = _mm256_srli_epi32(lo, 8))
            d = _mm256_add_ps(d, _mm256_permutevar8x32_ps(row[i], lo));
        for (int i = 4; i < 8; i++, hi = _mm256_srli_epi32(hi, 8))
            d = _mm256_add_ps(d, _mm256_permutevar8x32_ps(row[i], hi));
        const int m = _mm256_movemask_ps(_mm256_cmp_ps(d, _mm256_set1_ps(best), _CMP_LT_OQ)) & ((1 << r) - 1);
        if (!m) continue;
        float s[8];
        _mm256_storeu_ps(s, d);
        for (int l = 0; l < r; l++)
            if (s[l] < best) { best = s[l]; g = id[l]; }
    }
    return g;
}
#endif

static int best_neighbour(const lookup *lk, int u, const float *x, const float *w, float scale, int8_t *L) {
    const uint16_t *nb = lk->nb - lk->map[u] - 1;
    const int n = nb[0];
    int g;
#ifdef QC_X86
    if (has_avx2()) g = nearest_avx2(lk->grid, nb + 1, n, x, w, scale);
    else
#endif
    {
        float t[62], best = FLT_MAX;  /* t[8 i + pos]: only those 24 are read */
        for (int p = 1; p <= 5; p += 2) {
            const float s = scale * (float)p;
            for (int i = 0; i < 8; i++) {
                const float diff = s - x[i];
                t[8 * i + p] = w[i] * diff * diff;
            }
        }
        g = nb[1];
        for (int j = 1; j <= n; j++) {
            const uint8_t *p = lk->pos + 8 * nb[j];
            float d2 = 0;
            for (int i = 0; i < 8; i++) d2 += t[8 * i + p[i]];
            if (d2 < best) { best = d2; g = nb[j]; }
        }
    }
    point_codes(lk, g, L);
    return g;
}

/* 8 codes of x at inverse scale id: round (id x - 1) / 2 into 0 .. 2 */
static inline int round8(const float *x, float id, int8_t *L) {
    for (int i = 0; i < 8; i++) L[i] = (int8_t)clampi(rnd(0.5f * (id * x[i] - 1)), 0, 2);
    return key8(L);
}

/* The codes L of the groups of 8 in `todo` (bit k: group k, at most 4 groups) at inverse scale id: rounded,
 * and where that is off the grid the best neighbour at `scale` (the groups are independent, so all are
 * rounded first and their neighbour lists fetched ahead). Bit k of the result: group k rounded onto the grid. */
static unsigned quant_groups(const lookup *lk, const float *xv, const float *wa, float id, float scale,
                             unsigned todo, int8_t *L) {
    int u[4];
    unsigned on = 0;
    for (int k = 0; k < 4; k++) {
        if (!(todo >> k & 1)) continue;
        u[k] = round8(xv + 8 * k, id, L + 8 * k);
        const int m = lk->map[u[k]];
        if (m >= 0) on |= 1u << k;
#ifdef __GNUC__
        else __builtin_prefetch(lk->nb - m - 1);
#endif
    }
    for (int k = 0; k < 4; k++)
        if ((todo & ~on) >> k & 1) best_neighbour(lk, u[k], xv + 8 * k, wa + 8 * k, scale, L + 8 * k);
    return on;
}

/* Folds the signs of n values (groups of 8) into magnitudes xv with 7 stored bits per group: a group with an
 * odd count of negatives keeps the sign of its value of least w x^2 (the first on ties) and that value is
 * stored negated instead. */
static void fold_signs(const float *x, const float *w, int n, float *xv, uint8_t *signs) {
    for (int k = 0; k < n / 8; k++) {
        const float *xb = x + 8 * k;
        float *v = xv + 8 * k;
        int odd = 0;
        unsigned s = 0;
        for (int i = 0; i < 8; i++) {
            if (xb[i] >= 0) v[i] = xb[i];
            else { v[i] = -xb[i]; odd ^= 1; s |= 1u << i; }
        }
        if (odd) {
            int imin = 0;
            float min = w[8 * k] * xb[0] * xb[0];
            for (int i = 1; i < 8; i++) {
                const float a = w[8 * k + i] * xb[i] * xb[i];
                if (a < min) { min = a; imin = i; }
            }
            v[imin] = -v[imin];
            s ^= 1u << imin;
        }
        signs[k] = (uint8_t)(s & 127);
    }
}

/* the weighted least-squares sums of x against pos = 2 L + 1 */
static inline void fit_sums(int n, const float *w, const float *x, const int8_t *L, float *sqx, float *sq2) {
    float a = 0, b = 0;
    for (int i = 0; i < n; i++) {
        const float q = (float)(2 * L[i] + 1);
        a += w[i] * x[i] * q;
        b += w[i] * q * q;
    }
    *sqx = a; *sq2 = b;
}

/* sigma2 of a super-block's 256 values (both types) */
static float block_sigma2(const float *x) {
    float s = 0;
    for (int i = 0; i < 256; i++) s += x[i] * x[i];
    return s / 256;
}

/* The 4-bit code of a sub-block scale against d = max_scale / 31 */
static inline int scale_code(float id, float scale) { return clampi(rnd(0.5f * (id * scale - 1)), 0, 15); }

/* One IQ2_XXS sub-block of 32: its scale (0: all codes zero) and its two uint32 words in q (zero stays zero
 * for a sub-block with no scale). Start from make_qp_quants' scale, try 13 grids around it (each point off
 * the grid moved to its best neighbour), keep the largest explained sum, then requantize at that scale. */
static float xxs_sub(const lookup *lk, const float *xb, const float *qw, float sigma2, uint32_t *q) {
    float w[32], wa[32], xv[32];
    int8_t L[32], La[32];
    uint8_t signs[4];
    for (int i = 0; i < 32; i++) w[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    for (int i = 0; i < 32; i++) wa[i] = sqrtf(w[i]);
    fold_signs(xb, w, 32, xv, signs);
    float max = xv[0];
    for (int i = 1; i < 32; i++) max = MAXF(max, xv[i]);
    if (max < 1e-15f) return 0;
    float scale = qc_fit_qp(32, 4, xv, (uint8_t *)L, w);
    const float eff_max = scale * 3;
    if (eff_max <= 0) return 0;
    float best = 0;
    for (int is = -6; is <= 6; is++) {
        const float id = (5 + is * 0.1f) / eff_max, this_scale = 1 / id;
        quant_groups(lk, xv, wa, id, this_scale, 15, La);
        float sqx, sq2;
        fit_sums(32, w, xv, La, &sqx, &sq2);
        if (sq2 > 0 && sqx * sqx > best * sq2) {
            scale = sqx / sq2; best = scale * sqx;
            memcpy(L, La, 32);
        }
    }
    if (scale > 0) {
        const float id = 1 / scale;
        quant_groups(lk, xv, wa, id, scale, 15, L);
        float sqx, sq2;
        fit_sums(32, w, xv, L, &sqx, &sq2);
        if (sq2 > 0) scale = sqx / sq2;
    }
    if (scale < 0) {  /* the scale is stored unsigned: flip the signs instead */
        scale = -scale;
        for (int k = 0; k < 4; k++) signs[k] = (uint8_t)(~signs[k] & 127);
    }
    for (int k = 0; k < 4; k++) {
        const int g = lk->map[key8(L + 8 * k)];
        if (g < 0) return NAN;  /* unreachable: every code group above is a grid point */
        q[0] |= (uint32_t)g << 8 * k;
        q[1] |= (uint32_t)signs[k] << 7 * k;
    }
    return scale;
}

/* One IQ2_XS sub-block of 16 into its two uint16 words; returns its scale. Start from max / 5, try 19 grids
 * around it, keep the largest explained sum, then requantize at that scale only the halves whose rounding
 * was off the grid. */
static float xs_sub(const lookup *lk, const float *xb, const float *qw, float sigma2, uint16_t *q) {
    float w[16], wa[16], xv[16];
    int8_t L[16], La[16];
    uint8_t signs[2];
    unsigned on = 3;  /* bit k: group k of the kept codes was rounded onto the grid */
    for (int i = 0; i < 16; i++) w[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    for (int i = 0; i < 16; i++) wa[i] = sqrtf(w[i]);
    fold_signs(xb, w, 16, xv, signs);
    float max = xv[0];
    for (int i = 1; i < 16; i++) max = MAXF(max, xv[i]);
    memset(L, 0, 16);
    if (max < 1e-15f) return 0;
    float best = 0, scale = max / 5;
    for (int is = -9; is <= 9; is++) {
        const float id = (5 + is * 0.1f) / max, this_scale = 1 / id;
        const unsigned on_a = quant_groups(lk, xv, wa, id, this_scale, 3, La);
        float sqx, sq2;
        fit_sums(16, w, xv, La, &sqx, &sq2);
        if (sq2 > 0 && sqx * sqx > best * sq2) {
            scale = sqx / sq2; best = scale * sqx;
            memcpy(L, La, 16);
            on = on_a;
        }
    }
    if (on != 3 && scale > 0) {
        quant_groups(lk, xv, wa, 1 / scale, scale, 3 & ~on, L);
        float sqx, sq2;
        fit_sums(16, w, xv, L, &sqx, &sq2);
        if (sq2 > 0) scale = sqx / sq2;
    }
    if (scale < 0) {
        scale = -scale;
        for (int k = 0; k < 2; k++) signs[k] = (uint8_t)(~signs[k] & 127);
    }
    for (int k = 0; k < 2; k++) {
        const int g = lk->map[key8(L + 8 * k)];
        if (g < 0) return NAN;  /* unreachable: every code group above is a grid point */
        q[k] = (uint16_t)(g | signs[k] << 9);
    }
    return scale;
}

int qc_quant_iq2_xxs(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    lookup lk;
    if (!imatrix || cols % 256 || !get_lookup(QC_IQ2_XXS, &lk)) return -1;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t ibl = 0; ibl < cols / 256; ibl++, x += 256, out += QC_IQ2_XXS_BYTES) {
            const float *qw = imatrix + 256 * ibl;
            const float sigma2 = block_sigma2(x);
            uint32_t q[16];
            float scales[8], max_scale = 0;
            memset(q, 0, sizeof q);
            for (int ib = 0; ib < 8; ib++) {
                scales[ib] = xxs_sub(&lk, x + 32 * ib, qw + 32 * ib, sigma2, q + 2 * ib);
                if (!(scales[ib] >= 0)) return -1;  /* NaN: ggml asserts here */
                max_scale = MAXF(max_scale, scales[ib]);
            }
            memset(out, 0, QC_IQ2_XXS_BYTES);
            if (!max_scale) continue;
            const float d = max_scale / 31, id = 1 / d;
            put16(out, d);
            for (int ib = 0; ib < 8; ib++) q[2 * ib + 1] |= (uint32_t)scale_code(id, scales[ib]) << 28;
            for (int i = 0; i < 16; i++)
                for (int b = 0; b < 4; b++) out[2 + 4 * i + b] = (uint8_t)(q[i] >> 8 * b);
        }
    }
    return 0;
}

int qc_quant_iq2_xs(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    lookup lk;
    if (!imatrix || cols % 256 || !get_lookup(QC_IQ2_XS, &lk)) return -1;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t ibl = 0; ibl < cols / 256; ibl++, x += 256, out += QC_IQ2_XS_BYTES) {
            const float *qw = imatrix + 256 * ibl;
            const float sigma2 = block_sigma2(x);
            uint16_t q[32];
            float scales[16], max_scale = 0;
            memset(q, 0, sizeof q);
            for (int ib = 0; ib < 16; ib++) {
                scales[ib] = xs_sub(&lk, x + 16 * ib, qw + 16 * ib, sigma2, q + 2 * ib);
                if (!(scales[ib] >= 0)) return -1;  /* NaN: ggml asserts here */
                max_scale = MAXF(max_scale, scales[ib]);
            }
            memset(out, 0, QC_IQ2_XS_BYTES);
            if (!max_scale) continue;
            const float d = max_scale / 31, id = 1 / d;
            put16(out, d);
            for (int i = 0; i < 32; i++) { out[2 + 2 * i] = (uint8_t)q[i]; out[3 + 2 * i] = (uint8_t)(q[i] >> 8); }
            for (int ib = 0; ib < 16; ib++) out[66 + ib / 2] |= (uint8_t)(scale_code(id, scales[ib]) << 4 * (ib % 2));
        }
    }
    return 0;
}
