/* IQ2_S encoder (iq.h): bit-identical to ggml-quants.c's quantize_iq2_s (what ggml_quantize_chunk runs for
 * IQ2_S, with or without quant_weights), checked by tests/test_iquants.py against ggml_quantize_chunk.
 *
 * Block of 256 (82 bytes): d (f16), qs[32] grid numbers' low bytes, signs[32] (one byte per 8 values),
 * qh[8] the grid numbers' bits 8-9 (2 bits per group of 8), scales[8] (4 bits per 16 values).
 * Each 16 values: magnitudes |x| ~ s * g with g a point of the 1024-point grid (levels 1, 3, 5), signs free.
 * The scale search tries 19 inverse scales (5 + 0.1 k) / max, k = -9 .. 9, rounds each group of 8 to levels,
 * replaces a point off the grid by its weighted-nearest neighbour in the table, and keeps the candidate with
 * the largest sumqx^2 / sumq2; groups that came off the grid are then re-fitted once at the chosen scale.
 * Every float sum runs in ggml's order (build -fno-fast-math), so the bytes match. */
#include <float.h>
#include <stdlib.h>
#include "types.h"
#include "iq.h"
#include "encode.h"
#ifdef __SSE2__
#include <emmintrin.h>
#endif

enum { IQ2S_QMAX = 3, IQ2S_BYTES = 2 + QC_QK_K / 4 + QC_QK_K / 32 + QC_QK_K / 32 };
#define IQ2S_EPS 1e-8f  /* ggml's GROUP_MAX_EPS_IQ2_S */

/* level indices (0..2) of the 8 values of xv at inverse scale id, and their packed map key (index i at bit
 * 2 i); the SSE2 form does the same float operations per lane */
static inline int iq2s_levels(const float *xv, float id, int8_t *L) {
#ifdef __SSE2__
    const __m128 vid = _mm_set1_ps(id), one = _mm_set1_ps(1.0f), half = _mm_set1_ps(0.5f);
    const __m128 magic = _mm_set1_ps(12582912.f);
    const __m128i mant = _mm_set1_epi32(0x007fffff), bias = _mm_set1_epi32(0x00400000), two = _mm_set1_epi32(2);
    __m128i l[2];
    for (int h = 0; h < 2; h++) {
        const __m128 v = _mm_mul_ps(half, _mm_sub_ps(_mm_mul_ps(vid, _mm_loadu_ps(xv + 4 * h)), one));
        __m128i r = _mm_sub_epi32(_mm_and_si128(_mm_castps_si128(_mm_add_ps(v, magic)), mant), bias);
        r = _mm_andnot_si128(_mm_cmplt_epi32(r, _mm_setzero_si128()), r);
        const __m128i big = _mm_cmpgt_epi32(r, two);
        l[h] = _mm_or_si128(_mm_and_si128(big, two), _mm_andnot_si128(big, r));
    }
    const __m128i b = _mm_packus_epi16(_mm_packs_epi32(l[0], l[1]), _mm_setzero_si128());
    _mm_storel_epi64((__m128i *)L, b);
    uint64_t k = (uint64_t)_mm_cvtsi128_si64(b);  /* byte i = level i: fold to 2 bits each */
    k = (k | k >> 6) & 0x000F000F000F000Full;
    k = (k | k >> 12) & 0x000000FF000000FFull;
    return (int)((k | k >> 24) & 0xFFFF);
#else
    int key = 0;
    for (int i = 0; i < 8; i++) {
        const int l = clampi(rnd(0.5f * (id * xv[i] - 1)), 0, IQ2S_QMAX - 1);
        L[i] = (int8_t)l;
        key |= l << (2 * i);
    }
    return key;
#endif
}

/* the encoder's view of the grid: the table, and for each grid point and position i the index 8 l + i of
 * its term in the distance table e below (l its level index) */
typedef struct {
    const qc_iq_table *t;
    uint8_t off[1024][8];
} iq2s_grid;

/* the neighbour in list nb (count, then grid numbers) nearest to xv at `scale` in sum w (s g - x)^2, the first
 * of equals; its level indices into L (ggml's iq2_find_best_neighbour). The terms w (s g - x)^2 take 3 values
 * per position (g = 1, 3, 5), computed once each as ggml computes them and then summed in its order. */
static int iq2s_nearest(const iq2s_grid *G, const uint16_t *nb, const float *xv, const float *w, float scale,
                        int8_t *L) {
    float e[24];
    for (int l = 0; l < 3; l++) {
        const float s = scale * (float)(2 * l + 1);
        for (int i = 0; i < 8; i++) {
            const float diff = s - xv[i];
            e[8 * l + i] = w[i] * diff * diff;
        }
    }
    const int n = nb[0];
    float best = FLT_MAX;
    int pick = -1;
    for (int j = 1; j <= n; j++) {
        const uint8_t *o = G->off[nb[j]];
        float d2 = 0;
        for (int i = 0; i < 8; i++) d2 += e[o[i]];
        if (d2 < best) { best = d2; pick = nb[j]; }
    }
    if (pick < 0) pick = nb[1];  /* d2 NaN for every neighbour: ggml asserts; keep the first */
    for (int i = 0; i < 8; i++) L[i] = (int8_t)(G->off[pick][i] >> 3);
    return pick;
}

/* rounds a group of 8 values at inverse scale id; a point off the grid goes to its nearest neighbour at
 * `scale`. Returns 1 when the rounded point was on the grid. */
static inline int iq2s_group(const iq2s_grid *G, const float *xv, const float *w, float id, float scale,
                             int8_t *L) {
    const int key = iq2s_levels(xv, id, L);
    const int g = G->t->map[key];
    if (g >= 0) return 1;
    iq2s_nearest(G, G->t->neighbours + (-g - 1), xv, w, scale, L);
    return 0;
}

/* sum w x q and sum w q^2 over 16 values, q = 2 L + 1, from the per-level terms wxq = (w x) q, wq2 = (w q) q */
static inline void iq2s_sums(const float (*wxq)[4], const float (*wq2)[4], const int8_t *L, float *sqx, float *sq2) {
    float a = 0, b = 0;
    for (int i = 0; i < 16; i++) { a += wxq[i][L[i]]; b += wq2[i][L[i]]; }
    *sqx = a; *sq2 = b;
}

/* one super-block of 256 values xbl (importance qw or NULL) into b */
static void iq2s_block(const iq2s_grid *G, const float *xbl, const float *qw, uint8_t *b) {
    uint8_t *qs = b + 2, *signs = b + 2 + QC_QK_K / 8, *qh = b + 2 + QC_QK_K / 4, *sc = qh + QC_QK_K / 32;
    memset(b, 0, IQ2S_BYTES);
    float scales[QC_QK_K / 16], w[16], sw[16], xv[16];
    int8_t L[16], La[16];
    float sumx2 = 0;
    for (int i = 0; i < QC_QK_K; i++) sumx2 += xbl[i] * xbl[i];
    const float sigma2 = 2 * sumx2 / QC_QK_K;
    float max_scale = 0;
    for (int ib = 0; ib < QC_QK_K / 16; ib++) {
        const float *xb = xbl + 16 * ib;
        if (qw) for (int i = 0; i < 16; i++) w[i] = qw[16 * ib + i] * sqrtf(sigma2 + xb[i] * xb[i]);
        else for (int i = 0; i < 16; i++) w[i] = 0.25f * sigma2 + xb[i] * xb[i];
        for (int i = 0; i < 16; i++) sw[i] = sqrtf(w[i]);
        uint8_t sg[2] = {0, 0};
        for (int i = 0; i < 16; i++) {
            const int neg = !(xb[i] >= 0);  /* NaN counts as negative, as in ggml */
            xv[i] = neg ? -xb[i] : xb[i];
            sg[i >> 3] |= (uint8_t)(neg << (i & 7));
        }
        float wxq[16][4], wq2[16][4];
        for (int i = 0; i < 16; i++) {
            const float wx = w[i] * xv[i];
            for (int l = 0; l < 3; l++) {
                const float q = (float)(2 * l + 1);
                wxq[i][l] = wx * q;
                wq2[i][l] = w[i] * q * q;
            }
        }
        float max = xv[0];
        for (int i = 1; i < 16; i++) max = max > xv[i] ? max : xv[i];
        memset(L, 0, 16);
        if (max < IQ2S_EPS) { scales[ib] = 0; continue; }
        float best = 0, scale = max / (2 * IQ2S_QMAX - 1);
        int on[2] = {1, 1};
        for (int k = -9; k <= 9; k++) {
            const float id = (2 * IQ2S_QMAX - 1 + k * 0.1f) / max, this_scale = 1 / id;
            int on_a[2];
            for (int h = 0; h < 2; h++) on_a[h] = iq2s_group(G, xv + 8 * h, sw + 8 * h, id, this_scale, La + 8 * h);
            float sqx, sq2;
            iq2s_sums(wxq, wq2, La, &sqx, &sq2);
            if (sq2 > 0 && sqx * sqx > best * sq2) {
                scale = sqx / sq2; best = scale * sqx;
                memcpy(L, La, 16);
                on[0] = on_a[0]; on[1] = on_a[1];
            }
        }
        if ((!on[0] || !on[1]) && scale > 0) {  /* re-fit the groups that came off the grid */
            const float id = 1 / scale;
            for (int h = 0; h < 2; h++)
                if (!on[h]) iq2s_group(G, xv + 8 * h, sw + 8 * h, id, scale, L + 8 * h);
            float sqx, sq2;
            iq2s_sums(wxq, wq2, L, &sqx, &sq2);
            if (sq2 > 0) scale = sqx / sq2;
        }
        if (scale < 0) { scale = -scale; sg[0] = (uint8_t)~sg[0]; sg[1] = (uint8_t)~sg[1]; }
        for (int h = 0; h < 2; h++) {
            int key = 0;
            for (int i = 0; i < 8; i++) key |= L[8 * h + i] << (2 * i);
            const int g = G->t->map[key] < 0 ? 0 : G->t->map[key];  /* always on the grid here (ggml aborts if not) */
            const int i8 = 2 * ib + h;
            qs[i8] = (uint8_t)(g & 255);
            qh[i8 / 4] |= (uint8_t)((g >> 8) << (2 * (i8 % 4)));
            signs[i8] = sg[h];
        }
        scales[ib] = scale;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (!max_scale) return;
    const float d = max_scale / 31, id = 1 / d;
    put16(b, d * 0.9875f);
    for (int ib = 0; ib < QC_QK_K / 16; ib++) {
        const int l = clampi(rnd(0.5f * (id * scales[ib] - 1)), 0, 15);
        sc[ib / 2] |= (uint8_t)(ib % 2 ? l << 4 : l);
    }
}

int qc_quant_iq2_s(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    const qc_iq_table *t = qc_iq_table_get(QC_IQ2_S);
    if (!t || !t->map || !t->neighbours || cols % QC_QK_K) return -1;
    if (t->size != 1024 || t->width != 8) return -1;
    iq2s_grid *G = malloc(sizeof *G);  /* each call its own: callers may encode from several threads */
    if (!G) return -1;
    G->t = t;
    for (int j = 0; j < 1024; j++)
        for (int i = 0; i < 8; i++) G->off[j][i] = (uint8_t)(8 * (t->pos[8 * j + i] >> 1) + i);
    const int64_t nb = cols / QC_QK_K;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < nb; i++)
            iq2s_block(G, x + r * cols + i * QC_QK_K, imatrix ? imatrix + i * QC_QK_K : NULL,
                       out + (r * nb + i) * IQ2S_BYTES);
    free(G);
    return 0;
}
