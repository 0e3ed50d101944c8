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

static inline float fmax_ggml(float a, float b) { return a > b ? a : b; }

typedef struct {
    const qc_iq_table *t;
    int32_t key[2048];  /* grid point -> its 8 level indices (0, 1, 2), 2 bits each */
    int simd;           /* the AVX2 paths: the same float operations, 8 candidates at a time */
} iq1_ctx;

static void ctx_init(iq1_ctx *c, const qc_iq_table *t) {
    c->t = t;
    for (int j = 0; j < t->size; j++) {
        int k = 0;
        for (int i = 0; i < 8; i++) k |= ((t->pos[8 * j + i] - 1) / 2) << 2 * i;
        c->key[j] = k;
    }
#ifdef QC_X86
    c->simd = has_f16c();
#else
    c->simd = 0;
#endif
}

/* order[] = 0 .. n-1 sorted by x ascending, equal values in index order */
static void sort_index(const float *x, int n, int *order) {
    for (int j = 0; j < n; j++) {
        int k = j;
        while (k > 0 && x[order[k - 1]] > x[j]) { order[k] = order[k - 1]; k--; }
        order[k] = j;
    }
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
 * the first on ties (ggml's iq1_find_best_neighbour2; e[i][l] is its term w * diff * diff). Where every
 * distance overflows (|x| beyond ~1e13) ggml's fallback scan reads x by grid number, past the block, and
 * aborts if that finds nothing; here the fallback scans the grid with x by position and, failing too, takes
 * the first neighbour. */
static int best_neighbour(const iq1_ctx *c, const uint16_t *nb, const float *x, const float *w, float scale,
                          const float *xx) {
    float e[8][4], d2[2048 + 8], best = FLT_MAX;
    for (int i = 0; i < 8; i++) {
        for (int l = 0; l < 3; l++) {
            const float diff = scale * xx[l] - x[i];
            e[i][l] = w[i] * diff * diff;
        }
        e[i][3] = 0;
    }
    const int n = nb[0];
    int found = -1;
#ifdef QC_X86
    if (c->simd) distances_avx2(c->key, nb + 1, n, e, d2);
    else
#endif
    distances(c->key, nb + 1, n, e, d2);
    for (int j = 0; j < n; j++)
        if (d2[j] < best) { best = d2[j]; found = nb[1 + j]; }
    for (int p = 0; found < 0 && p < c->t->size; p++) {
        const uint16_t one = (uint16_t)p;
        distances(c->key, &one, 1, e, d2);
        if (d2[0] < best) { best = d2[0]; found = p; }
    }
    return found >= 0 ? found : nb[1];
}

/* grid number of the group of 8 levels L (0, 1, 2), or its best neighbour; *off set when off the grid */
static int group_index(const iq1_ctx *c, const int8_t *L, const float *x, const float *w, float scale,
                       const float *xx, int *off) {
    int u = 0;
    for (int j = 0; j < 8; j++) u |= L[j] << 2 * j;
    const int g = c->t->map[u];
    if (g >= 0) return g;
    *off = 1;
    return best_neighbour(c, c->t->neighbours - g - 1, x, w, scale, xx);
}

/* ---- IQ1_S ---- */

/* the best cuts and delta sign of a block of 32 from prefix sums sx, sw [33] (ggml's double loop: per cut
 * pair, +delta then -delta); returns 0 when no candidate has sumq2 > 0 */
static int search_s(const float *sx, const float *sw, int *b1, int *b2, int *shift, float *scale) {
    enum { N = 32 };
    float best = -FLT_MAX;
    int found = 0;
    for (int i1 = 0; i1 <= N; i1++)
        for (int i2 = i1; i2 <= N; i2++) {
            const float a = sx[i1], b = sx[i2] - sx[i1], c = sx[N] - sx[i2];
            const float wa = sw[i1], wb = sw[i2] - sw[i1], wc = sw[N] - sw[i2];
            for (int s = 0; s < 2; s++) {
                const float *v = s ? XM : XP;
                const float qx = a * v[0] + b * v[1] + c * v[2];
                const float q2 = wa * v[0] * v[0] + wb * v[1] * v[1] + wc * v[2] * v[2];
                if (q2 > 0 && qx * qx > best * q2) {
                    *scale = qx / q2; best = *scale * qx;
                    *b1 = i1; *b2 = i2; *shift = s ? -1 : 1; found = 1;
                }
            }
        }
    return found;
}

#ifdef QC_X86
#define SET1 _mm256_set1_ps
#define ADD _mm256_add_ps
#define SUB _mm256_sub_ps
#define MUL _mm256_mul_ps
/* lanes whose candidate passes ggml's test (sumq2 > 0 && sumqx^2 > best * sumq2) */
#define PASS(qx2, q2, B) _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(q2, _mm256_setzero_ps(), _CMP_GT_OQ), \
                                                          _mm256_cmp_ps(qx2, MUL(B, q2), _CMP_GT_OQ)))
/* search_s over 8 values of i2 at a time: lanes pass the test with the best score so far; the first passing
 * lane's candidates are tried in ggml's order, and the lanes after it are tested again with the new best.
 * sx, sw are padded to 40 (lanes past i2 = 32 are masked). */
__attribute__((target("avx2"))) static int search_s_avx2(const float *sx, const float *sw, int *b1, int *b2, int *shift,
                                                        float *scale) {
    enum { N = 32 };
    const __m256 SN = SET1(sx[N]), WN = SET1(sw[N]), p1 = SET1(XP[1]), p2 = SET1(XP[2]), m1 = SET1(XM[1]),
                 m2 = SET1(XM[2]);
    float best = -FLT_MAX, v[4][8];
    int found = 0;
    for (int i1 = 0; i1 <= N; i1++) {
        const __m256 A = SET1(sx[i1]), WA = SET1(sw[i1]), ap = SET1(sx[i1] * XP[0]), am = SET1(sx[i1] * XM[0]);
        const __m256 wap = SET1(sw[i1] * XP[0] * XP[0]), wam = SET1(sw[i1] * XM[0] * XM[0]);
        for (int i2 = i1; i2 <= N; i2 += 8) {
            const __m256 S = _mm256_loadu_ps(sx + i2), W = _mm256_loadu_ps(sw + i2);
            const __m256 b = SUB(S, A), c = SUB(SN, S), wb = SUB(W, WA), wc = SUB(WN, W);
            const __m256 qp = ADD(ADD(ap, MUL(b, p1)), MUL(c, p2)), qm = ADD(ADD(am, MUL(b, m1)), MUL(c, m2));
            const __m256 q2p = ADD(ADD(wap, MUL(MUL(wb, p1), p1)), MUL(MUL(wc, p2), p2));
            const __m256 q2m = ADD(ADD(wam, MUL(MUL(wb, m1), m1)), MUL(MUL(wc, m2), m2));
            const __m256 xp = MUL(qp, qp), xm = MUL(qm, qm);
            int live = N + 1 - i2 >= 8 ? 0xff : (1 << (N + 1 - i2)) - 1, stored = 0;
            for (;;) {
                const __m256 B = SET1(best);
                const int pass = (PASS(xp, q2p, B) | PASS(xm, q2m, B)) & live;
                if (!pass) break;
                if (!stored) {
                    _mm256_storeu_ps(v[0], qp); _mm256_storeu_ps(v[1], q2p);
                    _mm256_storeu_ps(v[2], qm); _mm256_storeu_ps(v[3], q2m);
                    stored = 1;
                }
                const int l = __builtin_ctz((unsigned)pass);
                for (int s = 0; s < 2; s++) {
                    const float qx = v[2 * s][l], q2 = v[2 * s + 1][l];
                    if (q2 > 0 && qx * qx > best * q2) {
                        *scale = qx / q2; best = *scale * qx;
                        *b1 = i1; *b2 = i2 + l; *shift = s ? -1 : 1; found = 1;
                    }
                }
                live &= ~((2 << l) - 1);
            }
        }
    }
    return found;
}
#endif

static void superblock_s(const iq1_ctx *c, const float *xbl, const float *qw, uint8_t *y) {
    enum { B = 32, NB = QC_QK_K / B };
    float scales[NB], weight[B], sx[B + 8], sw[B + 8];  /* padded for search_s_avx2 */
    int8_t L[B], shifts[NB];
    int order[B];
    memset(y, 0, QC_IQ1_S_BYTES);
    uint8_t *qs = y + 2, *qh = y + 2 + QC_QK_K / 8;
    float sumx2 = 0, max_scale = 0;
    for (int i = 0; i < QC_QK_K; i++) sumx2 += xbl[i] * xbl[i];
    const float sigma2 = 2 * sumx2 / QC_QK_K;
    for (int ib = 0; ib < NB; ib++) {
        const float *xb = xbl + B * ib, *w8 = qw + B * ib;
        scales[ib] = 0; shifts[ib] = 1;
        for (int i = 0; i < B; i++) weight[i] = w8[i] * sqrtf(sigma2 + xb[i] * xb[i]);
        float max = fabsf(xb[0]);
        for (int i = 1; i < B; i++) max = fmax_ggml(max, fabsf(xb[i]));
        if (max < 1e-12f) continue;  /* ggml's GROUP_MAX_EPS_IQ1_S */
        sort_index(xb, B, order);
        memset(sx, 0, sizeof sx); memset(sw, 0, sizeof sw);
        for (int j = 0; j < B; j++) {
            const int i = order[j];
            sx[j + 1] = sx[j] + weight[i] * xb[i];
            sw[j + 1] = sw[j] + weight[i];
        }
        int b1 = 0, b2 = 0, shift = 1;
        float scale = 0;
#ifdef QC_X86
        if (c->simd ? !search_s_avx2(sx, sw, &b1, &b2, &shift, &scale) : !search_s(sx, sw, &b1, &b2, &shift, &scale))
            continue;
#else
        if (!search_s(sx, sw, &b1, &b2, &shift, &scale)) continue;
#endif
        for (int j = 0; j < B; j++) L[order[j]] = (int8_t)(j < b1 ? 0 : j < b2 ? 1 : 2);
        if (scale < 0) {
            for (int j = 0; j < B; j++) L[j] = (int8_t)(2 - L[j]);
            scale = -scale; shift = -shift;
        }
        const float *xx = shift == 1 ? XP : XM;
        int off = 0, index[B / 8];
        for (int k = 0; k < B / 8; k++) index[k] = group_index(c, L + 8 * k, xb + 8 * k, weight + 8 * k, scale, xx, &off);
        if (off) {
            float sumqx = 0, sumq2 = 0;
            for (int k = 0; k < B / 8; k++) {
                const uint8_t *g = c->t->pos + 8 * index[k];
                for (int j = 0; j < 8; j++) {
                    const float w = weight[8 * k + j], q = xx[(g[j] - 1) / 2];
                    sumqx += w * q * xb[8 * k + j];
                    sumq2 += w * q * q;
                }
            }
            if (sumqx > 0 && sumq2 > 0) scale = sumqx / sumq2;
        }
        uint16_t h = 0;
        for (int k = 0; k < B / 8; k++) {
            qs[(B / 8) * ib + k] = (uint8_t)(index[k] & 255);
            h |= (uint16_t)((index[k] >> 8) << 3 * k);
        }
        memcpy(qh + 2 * ib, &h, 2);
        scales[ib] = scale; shifts[ib] = (int8_t)shift;
        max_scale = fmax_ggml(max_scale, scale);
    }
    if (!max_scale) return;
    const float d = max_scale / 15, id = 1 / d;
    put16(y, d * 1.125f);  /* ggml's fudge factor */
    for (int ib = 0; ib < NB; ib++) {
        int l = clampi(rnd(0.5f * (id * scales[ib] - 1)), 0, 7);
        if (shifts[ib] == -1) l |= 8;
        uint16_t h;
        memcpy(&h, qh + 2 * ib, 2);
        h |= (uint16_t)(l << 12);
        memcpy(qh + 2 * ib, &h, 2);
    }
}

int qc_quant_iq1_s(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    const qc_iq_table *t = qc_iq_table_get(QC_IQ1_S);
    if (!t || !t->map || !imatrix || cols % QC_QK_K) return -1;
    const int64_t nb = cols / QC_QK_K;
    iq1_ctx c;
    ctx_init(&c, t);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nb; b++)
            superblock_s(&c, x + r * cols + QC_QK_K * b, imatrix + QC_QK_K * b, out + (r * nb + b) * QC_IQ1_S_BYTES);
    return 0;
}

/* ---- IQ1_M ---- */

/* the best cuts and delta signs (k: bit 1 = first half -delta, bit 0 = second half -delta) of a block of 16
 * from the per-half prefix sums px, pw [2][17] (ggml's double loop: per cut pair, k = 0 .. 3) */
static int search_m(float px[2][17], float pw[2][17], int *b1, int *b2, int *bk, float *scale) {
    enum { N = 16 };
    const float txs[2] = {px[0][N], px[1][N]}, tws[2] = {pw[0][N], pw[1][N]};
    const float p2 = XP[2], m2 = XM[2];
    const float cp1 = XP[0] * XP[0] - XP[1] * XP[1], cp2 = XP[1] * XP[1] - XP[2] * XP[2];
    const float cm1 = XM[0] * XM[0] - XM[1] * XM[1], cm2 = XM[1] * XM[1] - XM[2] * XM[2];
    float best = -FLT_MAX;
    int found = 0;
    for (int i1 = 0; i1 <= N; i1++)
        for (int i2 = i1; i2 <= N; i2++) {
            float qxp[2], qxm[2], q2p[2], q2m[2], qx[4], q2[4];
            for (int h = 0; h < 2; h++) {
                const float s = px[h][i1] + px[h][i2];
                qxp[h] = txs[h] * p2 - s;
                qxm[h] = txs[h] * m2 - s;
                q2p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
                q2m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
            }
            qx[0] = qxp[0] + qxp[1]; qx[1] = qxp[0] + qxm[1]; qx[2] = qxm[0] + qxp[1]; qx[3] = qxm[0] + qxm[1];
            q2[0] = q2p[0] + q2p[1]; q2[1] = q2p[0] + q2m[1]; q2[2] = q2m[0] + q2p[1]; q2[3] = q2m[0] + q2m[1];
            for (int k = 0; k < 4; k++)
                if (q2[k] > 0 && qx[k] * qx[k] > best * q2[k]) {
                    *scale = qx[k] / q2[k]; best = *scale * qx[k];
                    *b1 = i1; *b2 = i2; *bk = k; found = 1;
                }
        }
    return found;
}

/* delta levels of half k of a block with sign choice `shift` (search_m's k) */
static inline const float *half_levels(int shift, int k) { return (k ? shift % 2 == 0 : shift < 2) ? XP : XM; }

static void superblock_m(const iq1_ctx *c, const float *xbl, const float *qw, uint8_t *y) {
    enum { B = 16, NB = QC_QK_K / B };
    static const uint8_t masks[4] = {0x00, 0x80, 0x08, 0x88};
    float scales[NB], weight[QC_QK_K], px[2][B + 1], pw[2][B + 1];
    int8_t L[B], shifts[NB];
    int order[B], index[QC_QK_K / 8];
    memset(y, 0, QC_IQ1_M_BYTES);
    uint8_t *qs = y, *qh = y + QC_QK_K / 8, *sc = y + QC_QK_K / 8 + QC_QK_K / 16;
    float sumx2 = 0, max_scale = 0;
    for (int i = 0; i < QC_QK_K; i++) sumx2 += xbl[i] * xbl[i];
    const float sigma2 = 2 * sumx2 / QC_QK_K;
    for (int i = 0; i < QC_QK_K; i++) weight[i] = qw ? qw[i] * sqrtf(sigma2 + xbl[i] * xbl[i]) : xbl[i] * xbl[i];
    memset(index, 0, sizeof index);
    for (int ib = 0; ib < NB; ib++) {
        const float *xb = xbl + B * ib, *wb = weight + B * ib;
        scales[ib] = 0; shifts[ib] = 0;
        float max = fabsf(xb[0]);
        for (int i = 1; i < B; i++) max = fmax_ggml(max, fabsf(xb[i]));
        if (max < 1e-7f) continue;  /* ggml's GROUP_MAX_EPS_IQ1_M */
        sort_index(xb, B, order);
        px[0][0] = px[1][0] = pw[0][0] = pw[1][0] = 0;
        for (int j = 0; j < B; j++) {
            const int i = order[j], h = i < B / 2 ? 0 : 1;
            px[h][j + 1] = px[h][j] + wb[i] * xb[i]; px[1 - h][j + 1] = px[1 - h][j];
            pw[h][j + 1] = pw[h][j] + wb[i]; pw[1 - h][j + 1] = pw[1 - h][j];
        }
        int b1 = 0, b2 = 0, k4 = 0;
        float scale = 0;
        if (!search_m(px, pw, &b1, &b2, &k4, &scale)) continue;
        for (int j = 0; j < B; j++) L[order[j]] = (int8_t)(j < b1 ? 0 : j < b2 ? 1 : 2);
        if (scale < 0) {
            for (int j = 0; j < B; j++) L[j] = (int8_t)(2 - L[j]);
            scale = -scale; k4 = 3 - k4;
        }
        int off = 0;
        int *idx = index + 2 * ib;
        for (int k = 0; k < 2; k++)
            idx[k] = group_index(c, L + 8 * k, xb + 8 * k, wb + 8 * k, scale, half_levels(k4, k), &off);
        if (off) {
            float sumqx = 0, sumq2 = 0;
            for (int k = 0; k < 2; k++) {
                const float *xx = half_levels(k4, k);
                const uint8_t *g = c->t->pos + 8 * idx[k];
                for (int j = 0; j < 8; j++) {
                    const float w = wb[8 * k + j], q = xx[(g[j] - 1) / 2];
                    sumqx += w * q * xb[8 * k + j];
                    sumq2 += w * q * q;
                }
            }
            if (sumqx > 0 && sumq2 > 0) scale = sumqx / sumq2;
        }
        qs[2 * ib] = (uint8_t)(idx[0] & 255);
        qs[2 * ib + 1] = (uint8_t)(idx[1] & 255);
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
    s4[0] |= (uint16_t)((h & 0x000f) << 12);
    s4[1] |= (uint16_t)((h & 0x00f0) << 8);
    s4[2] |= (uint16_t)((h & 0x0f00) << 4);
    s4[3] |= (uint16_t)(h & 0xf000);
    memcpy(sc, s4, sizeof s4);
}

int qc_quant_iq1_m(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    const qc_iq_table *t = qc_iq_table_get(QC_IQ1_M);
    if (!t || !t->map || cols % QC_QK_K) return -1;
    const int64_t nb = cols / QC_QK_K;
    iq1_ctx c;
    ctx_init(&c, t);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nb; b++)
            superblock_m(&c, x + r * cols + QC_QK_K * b, imatrix ? imatrix + QC_QK_K * b : NULL,
                         out + (r * nb + b) * QC_IQ1_M_BYTES);
    return 0;
}
