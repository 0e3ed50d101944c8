/* IQ1_S and IQ1_M encoders (iq.h): ggml-quants.c's quantize_iq1_s / quantize_iq1_m, bit for bit
 * (tests/test_iquants.py against ggml_quantize_chunk).
 *
 * A super-block of 256 values splits into blocks of 32 (IQ1_S) or 16 (IQ1_M); each block's values are
 * s * (l + delta), l in {-1, 0, 1}, delta = +-1/8 per block (IQ1_S) or per half of 8 (IQ1_M), and each group
 * of 8 levels is a point of the 2048-point grid (qc_iq_table_get(QC_IQ1_S): `pos` is 2 * level index + 1).
 * With weights w_j (imatrix_j * sqrt(sigma2 + x_j^2), sigma2 twice the super-block's mean square; IQ1_M
 * without an imatrix: x_j^2) the block search is exhaustive: sort the values ascending, and every pair of
 * cut points (i1 <= i2) of the sorted order gives levels -1 / 0 / 1 and, per delta choice, the weighted
 * least-squares scale from prefix sums; the largest sumqx^2 / sumq2 wins, the first one on ties, in ggml's
 * candidate order. A group of 8 levels off the grid takes the neighbour of least weighted squared error.
 *
 * The float operations are ggml's, in ggml's order. ggml sorts with qsort, which glibc runs as a merge
 * sort (stable) on arrays this small: ties keep index order, as the stable insertion sort here does.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "encode.h"
#include "types.h"
#include "iq.h"

#define DELTA 0.125f  /* ggml-common.h's IQ1S_DELTA and IQ1M_DELTA */
static const float XP[3] = {-1 + DELTA, DELTA, 1 + DELTA}, XM[3] = {-1 - DELTA, -DELTA, 1 - DELTA};
/* ggml's IQ1_M coefficients xp0^2 - xp1^2, xp1^2 - xp2^2, xm0^2 - xm1^2, xm1^2 - xm2^2 (exact in float) */
static const float CST[4] = {(-1 + DELTA) * (-1 + DELTA) - DELTA * DELTA, DELTA * DELTA - (1 + DELTA) * (1 + DELTA),
                             (-1 - DELTA) * (-1 - DELTA) - DELTA * DELTA, DELTA * DELTA - (1 - DELTA) * (1 - DELTA)};

static inline float fmax_ggml(float a, float b) { return a > b ? a : b; }

/* The cut search's best candidate so far (consider() below is ggml's test and update) */
typedef struct { float best, scale; int b1, b2, k, found; } best_t;

typedef struct {
    const qc_iq_table *t;
    int32_t key[2048];  /* grid point -> its 8 level indices (0, 1, 2), 2 bits each */
    /* the searches, plain or AVX2 (the same float operations, 8 candidates at a time) */
    void (*dist)(const int32_t *key, const uint16_t *nb, int n, float e[8][4], float *d2);
    void (*search_s)(const float *sx, const float *sw, best_t *r);
    void (*search_m)(float px[2][24], float pw[2][24], best_t *r);
} iq1_ctx;

/* 0 when ggml skips the block (max |x| below eps, its GROUP_MAX_EPS_IQ1_*), else 1 with order[] = 0 .. n-1
 * sorted by x ascending, equal values in index order */
static int sorted_block(const float *x, int n, float eps, int *order) {
    float max = fabsf(x[0]);
    for (int i = 1; i < n; i++) max = fmax_ggml(max, fabsf(x[i]));
    if (max < eps) return 0;
    for (int j = 0; j < n; j++) {
        int k = j;
        while (k > 0 && x[order[k - 1]] > x[j]) { order[k] = order[k - 1]; k--; }
        order[k] = j;
    }
    return 1;
}

/* d2[j] = sum_i e[i][level i of grid point nb[j]], summed in i order */
static void distances(const int32_t *key, const uint16_t *nb, int n, float e[8][4], float *d2) {
    for (int j = 0; j < n; j++) {
        const int32_t k = key[nb[j]];
        float s = 0;
        for (int i = 0; i < 8; i++) s += e[i][(k >> 2 * i) & 3];
        d2[j] = s;
    }
}
#ifdef QC_X86
__attribute__((target("avx2"))) static void distances_avx2(const int32_t *key, const uint16_t *nb, int n, float e[8][4],
                                                          float *d2) {
    __m256 T[8];
    for (int i = 0; i < 8; i++) T[i] = _mm256_setr_ps(e[i][0], e[i][1], e[i][2], 0, 0, 0, 0, 0);
    const __m256i three = _mm256_set1_epi32(3);
    for (int j = 0; j < n; j += 8) {
        uint16_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const uint16_t *p = nb + j;
        if (n - j < 8) { memcpy(tail, p, 2 * (size_t)(n - j)); p = tail; }
        __m256i k = _mm256_i32gather_epi32(key, _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 4);
        __m256 s = _mm256_setzero_ps();
        for (int i = 0; i < 8; i++, k = _mm256_srli_epi32(k, 2))
            s = _mm256_add_ps(s, _mm256_permutevar8x32_ps(T[i], _mm256_and_si256(k, three)));
        _mm256_storeu_ps(d2 + j, s);
    }
}
#endif

/* the grid point (of the neighbours nb of an off-grid group) of least sum_i w_i (scale * xx[level_i] - x_i)^2,
 * the first on ties (ggml's iq1_find_best_neighbour2; e[i][l] is its term w * diff * diff). Where no distance
 * is below FLT_MAX (they overflow for |x| beyond ~1e13) ggml falls back to a scan that reads x by grid
 * number, past the block, and aborts if that finds nothing: here that case takes the first neighbour. */
static int best_neighbour(const iq1_ctx *c, const uint16_t *nb, const float *x, const float *w, float scale,
                          const float *xx) {
    float e[8][4], d2[2048 + 8], best = FLT_MAX;
    for (int i = 0; i < 8; i++)
        for (int l = 0; l < 4; l++) {
            const float diff = l < 3 ? scale * xx[l] - x[i] : 0;
            e[i][l] = w[i] * diff * diff;
        }
    const int n = nb[0];
    int found = nb[1];
    c->dist(c->key, nb + 1, n, e, d2);
    for (int j = 0; j < n; j++)
        if (d2[j] < best) { best = d2[j]; found = nb[1 + j]; }
    return found;
}

/* Levels L (0, 1, 2) of a block from its best cuts (the sorted order's first b1 values -1, up to b2 0, the
 * rest 1), negated when the scale is negative (*flip set); returns |scale| */
static float cut_levels(const best_t *r, const int *order, int n, int8_t *L, int *flip) {
    for (int j = 0; j < n; j++) L[order[j]] = (int8_t)(j < r->b1 ? 0 : j < r->b2 ? 1 : 2);
    *flip = r->scale < 0;
    if (!*flip) return r->scale;
    for (int j = 0; j < n; j++) L[j] = (int8_t)(2 - L[j]);
    return -r->scale;
}

/* index[g] = the grid number of group g (of ng) of 8 levels, or its best neighbour, with xx[g] the group's
 * delta levels; when a group is off the grid the scale is refit to the chosen points (ggml's order) */
static float fit_groups(const iq1_ctx *c, const int8_t *L, int ng, const float *const *xx, const float *xb,
                        const float *wb, float scale, int *index) {
    int off = 0;
    for (int g = 0; g < ng; g++) {
        int u = 0;
        for (int j = 0; j < 8; j++) u |= L[8 * g + j] << 2 * j;
        index[g] = c->t->map[u];
        if (index[g] >= 0) continue;
        off = 1;
        index[g] = best_neighbour(c, c->t->neighbours - index[g] - 1, xb + 8 * g, wb + 8 * g, scale, xx[g]);
    }
    if (!off) return scale;
    float sumqx = 0, sumq2 = 0;
    for (int g = 0; g < ng; g++) {
        const uint8_t *p = c->t->pos + 8 * index[g];
        for (int j = 0; j < 8; j++) {
            const float w = wb[8 * g + j], q = xx[g][(p[j] - 1) / 2];
            sumqx += w * q * xb[8 * g + j];
            sumq2 += w * q * q;
        }
    }
    return sumqx > 0 && sumq2 > 0 ? sumqx / sumq2 : scale;
}

/* ggml's test and update of one candidate, in ggml's operations */
static inline void consider(best_t *r, float qx, float q2, int i1, int i2, int k) {
    if (q2 > 0 && qx * qx > r->best * q2) {
        r->scale = qx / q2; r->best = r->scale * qx;
        r->b1 = i1; r->b2 = i2; r->k = k; r->found = 1;
    }
}

#ifdef QC_X86
#define SET1 _mm256_set1_ps
#define ADD _mm256_add_ps
#define SUB _mm256_sub_ps
#define MUL _mm256_mul_ps
/* Candidates k < nc (qx[k], q2[k]) for i2 + lane, lanes in `live`: a lane passes when one of its candidates
 * passes ggml's test against the best so far; the first passing lane's candidates are considered in ggml's
 * order, then the lanes after it are tested again with the new best. Same result as one at a time. */
__attribute__((target("avx2"))) static inline void scan8(const __m256 *qx, const __m256 *q2, int nc, int live, int i1,
                                                        int i2, best_t *r) {
    const __m256 zero = _mm256_setzero_ps();
    __m256 xx[4], pos[4];
    float v[8][8];
    for (int k = 0; k < nc; k++) { xx[k] = MUL(qx[k], qx[k]); pos[k] = _mm256_cmp_ps(q2[k], zero, _CMP_GT_OQ); }
    for (;;) {
        const __m256 B = SET1(r->best);
        __m256 any = zero;
        for (int k = 0; k < nc; k++) any = _mm256_or_ps(any, _mm256_and_ps(pos[k], _mm256_cmp_ps(xx[k], MUL(B, q2[k]), _CMP_GT_OQ)));
        int pass = _mm256_movemask_ps(any);
        if (!(pass &= live)) return;
        for (int k = 0; k < nc; k++) { _mm256_storeu_ps(v[2 * k], qx[k]); _mm256_storeu_ps(v[2 * k + 1], q2[k]); }
        const int l = __builtin_ctz((unsigned)pass);
        for (int k = 0; k < nc; k++) consider(r, v[2 * k][l], v[2 * k + 1][l], i1, i2 + l, k);
        live &= ~((2 << l) - 1);
    }
}
#endif

/* ---- IQ1_S ---- */

#ifdef QC_X86
/* search_s, 8 values of i2 at a time (the same operations per candidate) */
__attribute__((target("avx2"))) static void search_s_avx2(const float *sx, const float *sw, best_t *r) {
    enum { N = 32 };
    const __m256 SN = SET1(sx[N]), WN = SET1(sw[N]), p1 = SET1(XP[1]), p2 = SET1(XP[2]), m1 = SET1(XM[1]),
                 m2 = SET1(XM[2]);
    for (int i1 = 0; i1 <= N; i1++) {
        const __m256 A = SET1(sx[i1]), WA = SET1(sw[i1]), ap = SET1(sx[i1] * XP[0]), am = SET1(sx[i1] * XM[0]);
        const __m256 wap = SET1(sw[i1] * XP[0] * XP[0]), wam = SET1(sw[i1] * XM[0] * XM[0]);
        for (int i2 = i1; i2 <= N; i2 += 8) {
            const __m256 S = _mm256_loadu_ps(sx + i2), W = _mm256_loadu_ps(sw + i2);
            const __m256 b = SUB(S, A), c = SUB(SN, S), wb = SUB(W, WA), wc = SUB(WN, W);
            const __m256 qx[2] = {ADD(ADD(ap, MUL(b, p1)), MUL(c, p2)), ADD(ADD(am, MUL(b, m1)), MUL(c, m2))};
            const __m256 q2[2] = {ADD(ADD(wap, MUL(MUL(wb, p1), p1)), MUL(MUL(wc, p2), p2)),
                                  ADD(ADD(wam, MUL(MUL(wb, m1), m1)), MUL(MUL(wc, m2), m2))};
            scan8(qx, q2, 2, N + 1 - i2 >= 8 ? 0xff : (1 << (N + 1 - i2)) - 1, i1, i2, r);
        }
    }
}
#endif

/* the best cuts and delta sign (k = 1: -delta) of a block of 32 from prefix sums sx, sw [33 used, padded to
 * 40] (ggml's double loop: per cut pair, +delta then -delta); r->found = 0 when no candidate has sumq2 > 0 */
static void search_s(const float *sx, const float *sw, best_t *r) {
    enum { N = 32 };
    for (int i1 = 0; i1 <= N; i1++)
        for (int i2 = i1; i2 <= N; i2++) {
            const float a = sx[i1], b = sx[i2] - sx[i1], c = sx[N] - sx[i2];
            const float wa = sw[i1], wb = sw[i2] - sw[i1], wc = sw[N] - sw[i2];
            for (int k = 0; k < 2; k++) {
                const float *v = k ? XM : XP;
                consider(r, a * v[0] + b * v[1] + c * v[2], wa * v[0] * v[0] + wb * v[1] * v[1] + wc * v[2] * v[2],
                         i1, i2, k);
            }
        }
}

static void superblock_s(const iq1_ctx *c, const float *xbl, const float *qw, uint8_t *y) {
    enum { B = 32, NB = QC_QK_K / B };
    float scales[NB], weight[B], sx[B + 8], sw[B + 8];  /* padded for search_s_avx2 */
    int8_t L[B], shifts[NB];
    int order[B];
    memset(y, 0, QC_IQ1_S_BYTES);
    uint8_t *qs = y + 2;
    uint16_t qh[NB] = {0};
    float sumx2 = 0, max_scale = 0;
    for (int i = 0; i < QC_QK_K; i++) sumx2 += xbl[i] * xbl[i];
    const float sigma2 = 2 * sumx2 / QC_QK_K;
    for (int ib = 0; ib < NB; ib++) {
        const float *xb = xbl + B * ib, *w8 = qw + B * ib;
        scales[ib] = 0; shifts[ib] = 1;
        for (int i = 0; i < B; i++) weight[i] = w8[i] * sqrtf(sigma2 + xb[i] * xb[i]);
        if (!sorted_block(xb, B, 1e-12f, order)) continue;
        memset(sx, 0, sizeof sx); memset(sw, 0, sizeof sw);
        for (int j = 0; j < B; j++) {
            const int i = order[j];
            sx[j + 1] = sx[j] + weight[i] * xb[i];
            sw[j + 1] = sw[j] + weight[i];
        }
        best_t r = {-FLT_MAX, 0, 0, 0, 0, 0};
        c->search_s(sx, sw, &r);
        if (!r.found) continue;
        int flip, index[B / 8];
        const float scale0 = cut_levels(&r, order, B, L, &flip);
        const int shift = (r.k ? -1 : 1) * (flip ? -1 : 1);
        const float *v = shift == 1 ? XP : XM, *xx[B / 8] = {v, v, v, v};
        const float scale = fit_groups(c, L, B / 8, xx, xb, weight, scale0, index);
        for (int k = 0; k < B / 8; k++) {
            qs[(B / 8) * ib + k] = (uint8_t)(index[k] & 255);
            qh[ib] |= (uint16_t)((index[k] >> 8) << 3 * k);
        }
        scales[ib] = scale; shifts[ib] = (int8_t)shift;
        max_scale = fmax_ggml(max_scale, scale);
    }
    if (max_scale) {
        const float d = max_scale / 15, id = 1 / d;
        put16(y, d * 1.125f);  /* ggml's fudge factor */
        for (int ib = 0; ib < NB; ib++)
            qh[ib] |= (uint16_t)((clampi(rnd(0.5f * (id * scales[ib] - 1)), 0, 7) | (shifts[ib] == -1 ? 8 : 0)) << 12);
    }
    memcpy(y + 2 + QC_QK_K / 8, qh, sizeof qh);
}

/* ---- IQ1_M ---- */

#ifdef QC_X86
/* search_m, 8 values of i2 at a time (the same operations per candidate) */
__attribute__((target("avx2"))) static void search_m_avx2(float px[2][24], float pw[2][24], best_t *r) {
    enum { N = 16 };
    const __m256 C2p = SET1(CST[1]), C2m = SET1(CST[3]);
    for (int i1 = 0; i1 <= N; i1++) {
        __m256 P1[2], Q1p[2], Q1m[2];
        for (int h = 0; h < 2; h++) {
            P1[h] = SET1(px[h][i1]);
            Q1p[h] = SET1(pw[h][N] * XP[2] * XP[2] + pw[h][i1] * CST[0]);
            Q1m[h] = SET1(pw[h][N] * XM[2] * XM[2] + pw[h][i1] * CST[2]);
        }
        for (int i2 = i1; i2 <= N; i2 += 8) {
            __m256 qxp[2], qxm[2], q2p[2], q2m[2];
            for (int h = 0; h < 2; h++) {
                const __m256 sum = ADD(P1[h], _mm256_loadu_ps(px[h] + i2)), w2 = _mm256_loadu_ps(pw[h] + i2);
                qxp[h] = SUB(SET1(px[h][N] * XP[2]), sum); qxm[h] = SUB(SET1(px[h][N] * XM[2]), sum);
                q2p[h] = ADD(Q1p[h], MUL(w2, C2p)); q2m[h] = ADD(Q1m[h], MUL(w2, C2m));
            }
            const __m256 qx[4] = {ADD(qxp[0], qxp[1]), ADD(qxp[0], qxm[1]), ADD(qxm[0], qxp[1]), ADD(qxm[0], qxm[1])};
            const __m256 q2[4] = {ADD(q2p[0], q2p[1]), ADD(q2p[0], q2m[1]), ADD(q2m[0], q2p[1]), ADD(q2m[0], q2m[1])};
            scan8(qx, q2, 4, N + 1 - i2 >= 8 ? 0xff : (1 << (N + 1 - i2)) - 1, i1, i2, r);
        }
    }
}
#endif

/* the best cuts and delta signs (k: bit 1 = first half -delta, bit 0 = second half -delta) of a block of 16
 * from the per-half prefix sums px, pw [2][17 used, padded to 24] (ggml's double loop: per cut pair,
 * k = 0 .. 3, with ggml's collapsed sums: per half, sumqx = T v2 - S_i1 - S_i2) */
static void search_m(float px[2][24], float pw[2][24], best_t *r) {
    enum { N = 16 };
    for (int i1 = 0; i1 <= N; i1++)
        for (int i2 = i1; i2 <= N; i2++) {
            float qxp[2], qxm[2], q2p[2], q2m[2];
            for (int h = 0; h < 2; h++) {
                const float s = px[h][i1] + px[h][i2];
                qxp[h] = px[h][N] * XP[2] - s;
                qxm[h] = px[h][N] * XM[2] - s;
                q2p[h] = pw[h][N] * XP[2] * XP[2] + pw[h][i1] * CST[0] + pw[h][i2] * CST[1];
                q2m[h] = pw[h][N] * XM[2] * XM[2] + pw[h][i1] * CST[2] + pw[h][i2] * CST[3];
            }
            consider(r, qxp[0] + qxp[1], q2p[0] + q2p[1], i1, i2, 0);
            consider(r, qxp[0] + qxm[1], q2p[0] + q2m[1], i1, i2, 1);
            consider(r, qxm[0] + qxp[1], q2m[0] + q2p[1], i1, i2, 2);
            consider(r, qxm[0] + qxm[1], q2m[0] + q2m[1], i1, i2, 3);
        }
}

/* delta levels of half k of a block with sign choice `shift` (search_m's k) */
static inline const float *half_levels(int shift, int k) { return (k ? shift % 2 == 0 : shift < 2) ? XP : XM; }

static void superblock_m(const iq1_ctx *c, const float *xbl, const float *qw, uint8_t *y) {
    enum { B = 16, NB = QC_QK_K / B };
    static const uint8_t masks[4] = {0x00, 0x80, 0x08, 0x88};
    float scales[NB], weight[QC_QK_K], px[2][B + 8], pw[2][B + 8];  /* padded for search_m_avx2 */
    int8_t L[B], shifts[NB];
    int order[B], index[QC_QK_K / 8] = {0};
    memset(y, 0, QC_IQ1_M_BYTES);
    uint8_t *qs = y, *qh = y + QC_QK_K / 8, *sc = y + QC_QK_K / 8 + QC_QK_K / 16;
    float sumx2 = 0, max_scale = 0;
    for (int i = 0; i < QC_QK_K; i++) sumx2 += xbl[i] * xbl[i];
    const float sigma2 = 2 * sumx2 / QC_QK_K;
    for (int i = 0; i < QC_QK_K; i++) weight[i] = qw ? qw[i] * sqrtf(sigma2 + xbl[i] * xbl[i]) : xbl[i] * xbl[i];
    for (int ib = 0; ib < NB; ib++) {
        const float *xb = xbl + B * ib, *wb = weight + B * ib;
        scales[ib] = 0; shifts[ib] = 0;
        if (!sorted_block(xb, B, 1e-7f, order)) continue;
        memset(px, 0, sizeof px); memset(pw, 0, sizeof pw);
        for (int j = 0; j < B; j++) {
            const int i = order[j], h = i < B / 2 ? 0 : 1;
            px[h][j + 1] = px[h][j] + wb[i] * xb[i]; px[1 - h][j + 1] = px[1 - h][j];
            pw[h][j + 1] = pw[h][j] + wb[i]; pw[1 - h][j + 1] = pw[1 - h][j];
        }
        best_t r = {-FLT_MAX, 0, 0, 0, 0, 0};
        c->search_m(px, pw, &r);
        if (!r.found) continue;
        int flip;
        const float scale0 = cut_levels(&r, order, B, L, &flip);
        const int k4 = flip ? 3 - r.k : r.k;
        int *idx = index + 2 * ib;
        const float *xx[2] = {half_levels(k4, 0), half_levels(k4, 1)};
        const float scale = fit_groups(c, L, 2, xx, xb, wb, scale0, idx);
        for (int k = 0; k < 2; k++) qs[2 * ib + k] = (uint8_t)(idx[k] & 255);
        qh[ib] = (uint8_t)((idx[0] >> 8) | ((idx[1] >> 8) << 4));
        scales[ib] = scale; shifts[ib] = (int8_t)k4;
        max_scale = fmax_ggml(max_scale, scale);
    }
    if (!max_scale) return;
    float d = max_scale / 15, sumqx = 0, sumq2 = 0;
    const float id = 1 / d;
    uint16_t s4[4] = {0, 0, 0, 0};
    for (int ib = 0; ib < NB; ib++) {
        const int l = clampi(rnd(0.5f * (id * scales[ib] - 1)), 0, 7);
        s4[ib / 4] |= (uint16_t)(l << 3 * (ib % 4));
        qh[ib] |= masks[shifts[ib]];
        for (int k = 0; k < 2; k++) {  /* a skipped block reads grid point 0, as ggml's zeroed bytes do */
            const float *xx = half_levels(shifts[ib], k);
            const uint8_t *g = c->t->pos + 8 * index[2 * ib + k];
            const float *xb = xbl + B * ib + 8 * k, *wb = weight + B * ib + 8 * k;
            for (int j = 0; j < 8; j++) {
                const float q = xx[(g[j] - 1) / 2] * (2 * l + 1);
                sumqx += wb[j] * q * xb[j];
                sumq2 += wb[j] * q * q;
            }
        }
    }
    if (sumq2 > 0) d = sumqx / sumq2;
    const uint16_t h = f2h(d * 1.1125f);  /* ggml's fudge factor */
    for (int i = 0; i < 4; i++) s4[i] |= (uint16_t)(((h >> 4 * i) & 0xf) << 12);  /* the scale's nibbles on top */
    memcpy(sc, s4, sizeof s4);
}

/* rows of whole super-blocks, each by f; the imatrix (NULL: none) applies to every row alike */
static int quant_rows(int type, void (*f)(const iq1_ctx *, const float *, const float *, uint8_t *), int64_t bytes,
                      const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    const qc_iq_table *t = qc_iq_table_get(type);
    if (!t || !t->map || t->size != 2048 || cols % QC_QK_K) return -1;
    const int64_t nb = cols / QC_QK_K;
    iq1_ctx c = {t, {0}, distances, search_s, search_m};
    for (int j = 0; j < 8 * t->size; j++) c.key[j / 8] |= ((t->pos[j] - 1) / 2) << 2 * (j % 8);
#ifdef QC_X86
    if (has_f16c()) { c.dist = distances_avx2; c.search_s = search_s_avx2; c.search_m = search_m_avx2; }
#endif
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nb; b++)
            f(&c, x + r * cols + QC_QK_K * b, imatrix ? imatrix + QC_QK_K * b : NULL, out + (r * nb + b) * bytes);
    return 0;
}

int qc_quant_iq1_s(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    return imatrix ? quant_rows(QC_IQ1_S, superblock_s, QC_IQ1_S_BYTES, x, out, rows, cols, imatrix) : -1;
}
int qc_quant_iq1_m(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    return quant_rows(QC_IQ1_M, superblock_m, QC_IQ1_M_BYTES, x, out, rows, cols, imatrix);
}
