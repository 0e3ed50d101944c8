/* IQ3_XXS and IQ3_S encoders (iq.h): bit-identical to ggml-quants.c's quantize_iq3_xxs / quantize_iq3_s
 * (tests/test_iquants.py compares the bytes with ggml_quantize_chunk's).
 *
 * A super-block of 256 values is cut into 8 groups of 32; a group is fitted as scale * q with q a grid point
 * (4 odd levels 1 .. 15) per 4 values after the signs are folded out:
 *   - weights: imatrix[j] * sqrt(sigma2 + x^2) with sigma2 = 2 * mean(x^2) over the super-block, else x^2;
 *   - scale search: for each of `nsteps` trial inverse scales (15 + 0.2 s) / max, every 4 values round to
 *     levels; a point off the grid goes to its nearest listed neighbour (squared distance at that scale,
 *     weighted by sqrt(weight));
 *     the trial whose least-squares scale explains the most (sumqx^2 / sumq2) wins;
 *   - refit: when the winner used neighbours, the groups (IQ3_XXS: those off the grid; IQ3_S: all) are
 *     re-rounded at the winning scale and the least-squares scale recomputed;
 *   - the super-block scale d = max(group scale) / 31 (stored times a fudge factor), each group's scale a
 *     4-bit l with scale ~ d (2 l + 1).
 * IQ3_XXS stores 7 sign bits per 8 values (an odd count of negatives flips the least important value, so the
 * parity decoder recovers the eighth); IQ3_S stores all 8, plus a ninth index bit per grid number.
 * Every floating-point expression keeps ggml's operation order (build with -fno-fast-math). */
#include <float.h>
#include "types.h"
#include "iq.h"
#include "encode.h"

#ifdef __SSE2__
#include <emmintrin.h>
#endif

typedef struct {
    const int *map;
    const uint16_t *nb;
    float (*gf)[4];         /* [size][4] the grid's odd levels 1 .. 15 as floats */
    int nsteps, refit_all;
} fitter;

/* one group of 32: sign-folded values, weights, sqrt(weights); xt: the values component-major (xt[c][k] is
 * value c of 4-value set k); xr, war: each value and sqrt(weight) repeated 4 times (vector broadcasts) */
typedef struct {
    float xv[32], w[32], wa[32], xt[4][8], xr[32][4], war[32][4];
} group;

/* the packed level keys u[8] (3 bits per value) of the 8 sets at inverse scale id: each level
 * nearest_int(0.5 (id x - 1)) clamped to 0 .. 7 (rnd's integer steps in the SSE2 path too) */
static void keys(const group *g, float id, int *u) {
#ifdef __SSE2__
    const __m128 vid = _mm_set1_ps(id), one = _mm_set1_ps(1), half = _mm_set1_ps(0.5f);
    const __m128 magic = _mm_set1_ps(12582912.f);
    const __m128i mant = _mm_set1_epi32(0x007fffff), bias = _mm_set1_epi32(0x00400000);
    const __m128i zero = _mm_setzero_si128(), seven = _mm_set1_epi32(7);
    for (int h = 0; h < 8; h += 4) {
        __m128i acc = zero;
        for (int c = 0; c < 4; c++) {
            const __m128 v = _mm_mul_ps(half, _mm_sub_ps(_mm_mul_ps(vid, _mm_loadu_ps(g->xt[c] + h)), one));
            __m128i l = _mm_sub_epi32(_mm_and_si128(_mm_castps_si128(_mm_add_ps(v, magic)), mant), bias);
            l = _mm_andnot_si128(_mm_cmplt_epi32(l, zero), l);
            const __m128i big = _mm_cmpgt_epi32(l, seven);
            l = _mm_or_si128(_mm_andnot_si128(big, l), _mm_and_si128(big, seven));
            acc = _mm_or_si128(acc, _mm_sll_epi32(l, _mm_cvtsi32_si128(3 * c)));
        }
        _mm_storeu_si128((__m128i *)(u + h), acc);
    }
#else
    for (int k = 0; k < 8; k++) {
        u[k] = 0;
        for (int c = 0; c < 4; c++) u[k] |= clampi(rnd(0.5f * (id * g->xv[4 * k + c] - 1)), 0, 7) << (3 * c);
    }
#endif
}

/* nearest of the listed grid points to set k at scale s: the distance sum_c wa_c (s g_c - x_c)^2
 * accumulated in c order, the first point of least distance; the list's first point when no distance
 * compares below FLT_MAX (ggml aborts there: only non-finite input reaches it).
 * The SSE2 path takes four points at a time, one per lane (the same operations per point), keeping per lane
 * the first least distance and its list position; the least distance at the smallest position is the
 * scan's answer. */
static int nearest(const fitter *f, const group *g, int k, const uint16_t *list, float s) {
    const int n = list[0];
#ifdef __SSE2__
    const float (*xr)[4] = g->xr + 4 * k, (*wr)[4] = g->war + 4 * k;
    const __m128 vs = _mm_set1_ps(s), vn = _mm_set1_ps((float)n), step = _mm_set1_ps(4);
    const __m128 x0 = _mm_loadu_ps(xr[0]), x1 = _mm_loadu_ps(xr[1]), x2 = _mm_loadu_ps(xr[2]);
    const __m128 x3 = _mm_loadu_ps(xr[3]), w0 = _mm_loadu_ps(wr[0]), w1 = _mm_loadu_ps(wr[1]);
    const __m128 w2 = _mm_loadu_ps(wr[2]), w3 = _mm_loadu_ps(wr[3]);
    __m128 best = _mm_set1_ps(FLT_MAX), at = _mm_set1_ps(1), pj = _mm_setr_ps(1, 2, 3, 4);
    for (int j = 1; j <= n; j += 4, pj = _mm_add_ps(pj, step)) {
        const int p1 = j + 1 < n ? j + 1 : n, p2 = j + 2 < n ? j + 2 : n, p3 = j + 3 < n ? j + 3 : n;
        __m128 g0 = _mm_loadu_ps(f->gf[list[j]]), g1 = _mm_loadu_ps(f->gf[list[p1]]);
        __m128 g2 = _mm_loadu_ps(f->gf[list[p2]]), g3 = _mm_loadu_ps(f->gf[list[p3]]);
        _MM_TRANSPOSE4_PS(g0, g1, g2, g3);
        const __m128 e0 = _mm_sub_ps(_mm_mul_ps(vs, g0), x0), e1 = _mm_sub_ps(_mm_mul_ps(vs, g1), x1);
        const __m128 e2 = _mm_sub_ps(_mm_mul_ps(vs, g2), x2), e3 = _mm_sub_ps(_mm_mul_ps(vs, g3), x3);
        __m128 d2 = _mm_add_ps(_mm_setzero_ps(), _mm_mul_ps(_mm_mul_ps(w0, e0), e0));
        d2 = _mm_add_ps(d2, _mm_mul_ps(_mm_mul_ps(w1, e1), e1));
        d2 = _mm_add_ps(d2, _mm_mul_ps(_mm_mul_ps(w2, e2), e2));
        d2 = _mm_add_ps(d2, _mm_mul_ps(_mm_mul_ps(w3, e3), e3));
        const __m128 lt = _mm_cmplt_ps(d2, best);
        best = _mm_or_ps(_mm_and_ps(lt, d2), _mm_andnot_ps(lt, best));
        at = _mm_or_ps(_mm_and_ps(lt, _mm_min_ps(pj, vn)), _mm_andnot_ps(lt, at));
    }
    __m128 m = _mm_min_ps(best, _mm_shuffle_ps(best, best, _MM_SHUFFLE(2, 3, 0, 1)));
    m = _mm_min_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m128 eq = _mm_cmpeq_ps(best, m);
    __m128 p = _mm_or_ps(_mm_and_ps(eq, at), _mm_andnot_ps(eq, vn));
    p = _mm_min_ps(p, _mm_shuffle_ps(p, p, _MM_SHUFFLE(2, 3, 0, 1)));
    p = _mm_min_ps(p, _mm_shuffle_ps(p, p, _MM_SHUFFLE(1, 0, 3, 2)));
    return list[(int)_mm_cvtss_f32(p)];
#else
    const float *x = g->xv + 4 * k, *w = g->wa + 4 * k;
    float best = FLT_MAX;
    int at = list[1];
    for (int j = 1; j <= n; j++) {
        const float *q = f->gf[list[j]];
        float d2 = 0;
        for (int c = 0; c < 4; c++) { const float e = s * q[c] - x[c]; d2 += w[c] * e * e; }
        if (d2 < best) { best = d2; at = list[j]; }
    }
    return at;
#endif
}

enum { MAXT = 32 };  /* trial scales, at most (IQ3_XXS: 31, IQ3_S: 19) */

/* for each set k with want[k], at inverse scale id (scale s for the neighbour search): its grid number into
 * idx[k], whether the rounded point was on the grid into on[k], the point's odd levels into
 * q[stride * (4 k + c)] */
static void round_sets(const fitter *f, const group *g, float id, float s, const unsigned char *want,
                       uint16_t *idx, unsigned char *on, float *q, int stride) {
    int u[8];
    keys(g, id, u);
    for (int k = 0; k < 8; k++) {
        if (!want[k]) continue;
        int gi = f->map[u[k]];
        on[k] = gi >= 0;
        if (gi < 0) gi = nearest(f, g, k, f->nb - gi - 1, s);
        idx[k] = (uint16_t)gi;
        for (int c = 0; c < 4; c++) q[(4 * k + c) * stride] = f->gf[gi][c];
    }
}

/* the group's scale (its largest folded value max > 0 given) and grid numbers idx[8]. All trials are
 * rounded first (qt[value][trial]); their sums then run across trials side by side, each trial's in value
 * order (ggml's), and the winner is picked in trial order as ggml does. */
static float fit_group(const fitter *f, const group *g, float max, int init_on, uint16_t *idx) {
    static const unsigned char all[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    float qt[32][MAXT], wx[32], q[32], sx[MAXT], s2[MAXT], best = 0, scale = max / 15;
    uint16_t it[MAXT][8];
    unsigned char ont[MAXT][8], on[8], redo[8];
    const float *w = g->w, *xv = g->xv;
    const int nt = f->nsteps, half = nt / 2;
    for (int t = 0; t < nt; t++) {
        const float id = (15 + (t - half) * 0.2f) / max;
        round_sets(f, g, id, 1 / id, all, it[t], ont[t], &qt[0][t], MAXT);
    }
    for (int i = 0; i < 32; i++) wx[i] = w[i] * xv[i];
    for (int t = 0; t < nt; t++) sx[t] = s2[t] = 0;
    for (int i = 0; i < 32; i++) {
        const float a = wx[i], b = w[i];
        for (int t = 0; t < nt; t++) { sx[t] += a * qt[i][t]; s2[t] += b * qt[i][t] * qt[i][t]; }
    }
    int win = -1;
    for (int t = 0; t < nt; t++)
        if (s2[t] > 0 && sx[t] * sx[t] > best * s2[t]) { scale = sx[t] / s2[t]; best = scale * sx[t]; win = t; }
    if (win >= 0) {
        for (int i = 0; i < 32; i++) q[i] = qt[i][win];
        memcpy(idx, it[win], 8 * sizeof *idx);
        memcpy(on, ont[win], sizeof on);
    } else {  /* no trial fitted (all weights 0): levels 0, grid point 0 in both grids */
        for (int i = 0; i < 32; i++) q[i] = 1;
        for (int k = 0; k < 8; k++) { idx[k] = (uint16_t)f->map[0]; on[k] = (unsigned char)init_on; }
    }
    int off = 0;
    for (int k = 0; k < 8; k++) { off += !on[k]; redo[k] = (unsigned char)(f->refit_all || !on[k]); }
    if (off > 0 && scale > 0) {
        round_sets(f, g, 1 / scale, scale, redo, idx, on, q, 1);
        float sumqx = 0, sumq2 = 0;
        for (int i = 0; i < 32; i++) { sumqx += w[i] * xv[i] * q[i]; sumq2 += w[i] * q[i] * q[i]; }
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    return scale;
}

/* the group of the 32 values xb: weights imatrix * sqrt(sigma2 + x^2) (else x^2) and their square roots;
 * xv (the folded values) is set by the caller, then group_layout fills the other views */
static void group_weights(group *g, const float *xb, const float *imatrix, float sigma2) {
    if (imatrix) for (int i = 0; i < 32; i++) g->w[i] = imatrix[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    else for (int i = 0; i < 32; i++) g->w[i] = xb[i] * xb[i];
    for (int i = 0; i < 32; i++) g->wa[i] = sqrtf(g->w[i]);
}

static void group_layout(group *g) {
    for (int i = 0; i < 32; i++) {
        g->xt[i % 4][i / 4] = g->xv[i];
        for (int l = 0; l < 4; l++) { g->xr[i][l] = g->xv[i]; g->war[i][l] = g->wa[i]; }
    }
}

static float block_sigma2(const float *x) {
    float s = 0;
    for (int i = 0; i < QC_QK_K; i++) s += x[i] * x[i];
    return 2 * s / QC_QK_K;
}

static int setup(fitter *f, int type, float (*gf)[4], int nsteps, int refit_all) {
    const qc_iq_table *t = qc_iq_table_get(type);
    if (!t || !t->map || !t->neighbours) return -1;
    f->map = t->map; f->nb = t->neighbours; f->gf = gf;
    f->nsteps = nsteps; f->refit_all = refit_all;
    for (int j = 0; j < t->size; j++)
        for (int i = 0; i < 4; i++) gf[j][i] = t->pos[4 * j + i];
    return 0;
}

/* block_iq3_xxs: d (f16), 64 grid numbers, 8 x uint32 (4 x 7 sign bits, 4-bit group scale at bit 28) */
static void iq3_xxs_block(const fitter *f, const float *x, const float *im, uint8_t *b) {
    float scales[8], max_scale = 0;
    group g;
    float *xv = g.xv;
    const float *w = g.w;
    uint8_t q3[96];
    uint32_t ss[8];
    memset(q3, 0, sizeof q3);
    memset(ss, 0, sizeof ss);
    const float sigma2 = block_sigma2(x);
    for (int ib = 0; ib < 8; ib++) {
        const float *xb = x + 32 * ib;
        group_weights(&g, xb, im ? im + 32 * ib : NULL, sigma2);
        uint32_t signs[4];
        for (int k = 0; k < 4; k++) {
            int nflip = 0;
            uint32_t s = 0;
            for (int i = 0; i < 8; i++) {
                const float v = xb[8 * k + i];
                if (v >= 0) xv[8 * k + i] = v;
                else { xv[8 * k + i] = -v; nflip++; s |= 1u << i; }
            }
            if (nflip % 2) {  /* flip the value of least weight * x^2 (the first such) back */
                int imin = 0;
                float min = w[8 * k] * xb[8 * k] * xb[8 * k];
                for (int i = 1; i < 8; i++) {
                    const float a = w[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                    if (a < min) { min = a; imin = i; }
                }
                xv[8 * k + imin] = -xv[8 * k + imin];
                s ^= 1u << imin;
            }
            signs[k] = s & 127;
        }
        float max = xv[0];
        for (int i = 1; i < 32; i++) max = max > xv[i] ? max : xv[i];
        if (max < 1e-8f) { scales[ib] = 0; continue; }
        uint16_t idx[8];
        group_layout(&g);
        float scale = fit_group(f, &g, max, 1, idx);
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 4; k++) signs[k] = ~signs[k] & 127;
        }
        for (int k = 0; k < 8; k++) q3[8 * ib + k] = (uint8_t)idx[k];
        ss[ib] = signs[0] | signs[1] << 7 | signs[2] << 14 | signs[3] << 21;
        scales[ib] = scale;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (!max_scale) { memset(b, 0, QC_IQ3_XXS_BYTES); return; }
    const float d = max_scale / 31, id = 1 / d;
    put16(b, d * 1.0125f);
    for (int ib = 0; ib < 8; ib++)
        ss[ib] |= (uint32_t)clampi(rnd(0.5f * (id * scales[ib] - 1)), 0, 15) << 28;
    memcpy(b + 2, q3, 64);
    for (int ib = 0; ib < 8; ib++)
        for (int j = 0; j < 4; j++) b[66 + 4 * ib + j] = (uint8_t)(ss[ib] >> (8 * j));
}

/* block_iq3_s: d (f16), qs[64] low index bytes, qh[8] ninth bits, signs[32], scales[4] (two 4-bit per byte).
 * As in ggml, an all-zero group does not advance the qs / signs cursors (qh stays indexed by group). */
static void iq3_s_block(const fitter *f, const float *x, const float *im, uint8_t *b) {
    float scales[8], max_scale = 0;
    group g;
    float *xv = g.xv;
    memset(b, 0, QC_IQ3_S_BYTES);
    uint8_t *qs = b + 2, *qh = b + 66, *sg = b + 74, *sc = b + 106;
    const float sigma2 = block_sigma2(x);
    for (int ib = 0; ib < 8; ib++) {
        const float *xb = x + 32 * ib;
        group_weights(&g, xb, im ? im + 32 * ib : NULL, sigma2);
        uint8_t signs[4];
        for (int k = 0; k < 4; k++) {
            unsigned s = 0;
            for (int i = 0; i < 8; i++) {
                const float v = xb[8 * k + i];
                if (v >= 0) xv[8 * k + i] = v;
                else { xv[8 * k + i] = -v; s |= 1u << i; }
            }
            signs[k] = (uint8_t)s;
        }
        float max = xv[0];
        for (int i = 1; i < 32; i++) max = max > xv[i] ? max : xv[i];
        if (!max) { scales[ib] = 0; continue; }
        uint16_t idx[8];
        group_layout(&g);
        float scale = fit_group(f, &g, max, 0, idx);
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 4; k++) signs[k] = (uint8_t)~signs[k];
        }
        for (int k = 0; k < 8; k++) {
            qs[k] = (uint8_t)(idx[k] & 255);
            qh[ib] |= (uint8_t)((idx[k] >> 8) << k);
        }
        qs += 8;
        memcpy(sg, signs, 4);
        sg += 4;
        scales[ib] = scale;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (!max_scale) return;
    const float d = max_scale / 31, id = 1 / d;
    put16(b, d * 1.033f);
    for (int ib = 0; ib < 8; ib += 2) {
        const int l1 = clampi(rnd(0.5f * (id * scales[ib] - 1)), 0, 15);
        const int l2 = clampi(rnd(0.5f * (id * scales[ib + 1] - 1)), 0, 15);
        sc[ib / 2] = (uint8_t)(l1 | l2 << 4);
    }
}

int qc_quant_iq3_xxs(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    fitter f;
    float gf[256][4];
    if (cols % QC_QK_K || setup(&f, QC_IQ3_XXS, gf, 31, 0)) return -1;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < cols; j += QC_QK_K, out += QC_IQ3_XXS_BYTES)
            iq3_xxs_block(&f, x + r * cols + j, imatrix ? imatrix + j : NULL, out);
    return 0;
}

int qc_quant_iq3_s(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    fitter f;
    float gf[512][4];
    if (cols % QC_QK_K || setup(&f, QC_IQ3_S, gf, 19, 1)) return -1;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < cols; j += QC_QK_K, out += QC_IQ3_S_BYTES)
            iq3_s_block(&f, x + r * cols + j, imatrix ? imatrix + j : NULL, out);
    return 0;
}
