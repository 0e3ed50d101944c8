/* IQ3_XXS and IQ3_S encoders (iq.h): bit-identical to ggml-quants.c's quantize_iq3_xxs / quantize_iq3_s
 * (tests/test_iquants.py compares the bytes with ggml_quantize_chunk's).
 *
 * A super-block of 256 values is cut into 8 groups of 32; a group is fitted as scale * q with q a grid point
 * (4 odd levels 1 .. 15) per 4 values after the signs are folded out:
 *   - weights: imatrix[j] * sqrt(sigma2 + x^2) with sigma2 = 2 * mean(x^2) over the super-block, else x^2;
 *   - scale search: for each of `nsteps` trial inverse scales (15 + 0.2 s) / max, every 4 values round to
 *     levels; a point off the grid goes to its nearest listed neighbour (weighted distance at that scale);
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

typedef struct {
    const int *map;
    const uint16_t *nb;
    const uint8_t *pos;     /* [size][4] odd levels 1 .. 15 */
    float (*gf)[4];         /* the same as floats */
    int nsteps, refit_all;
} fitter;

/* nearest of the listed grid points to x (weights w) at scale s, first on ties; the list's first point when
 * no distance compares below FLT_MAX (ggml aborts there: only non-finite input reaches it) */
static int best_neighbour(const fitter *f, const uint16_t *list, const float *x, const float *w, float s) {
    const int n = list[0];
    float best = FLT_MAX;
    int at = list[1];
    for (int j = 1; j <= n; j++) {
        const float *g = f->gf[list[j]];
        const float e0 = s * g[0] - x[0], e1 = s * g[1] - x[1], e2 = s * g[2] - x[2], e3 = s * g[3] - x[3];
        float d2 = 0;
        d2 += w[0] * e0 * e0;
        d2 += w[1] * e1 * e1;
        d2 += w[2] * e2 * e2;
        d2 += w[3] * e3 * e3;
        if (d2 < best) { best = d2; at = list[j]; }
    }
    return at;
}

/* grid number of the 4 values x at inverse scale id (scale s for the neighbour search); *on: on the grid */
static inline int round_group(const fitter *f, const float *x, const float *wa, float id, float s, int *on) {
    int u = 0;
    for (int i = 0; i < 4; i++) u |= clampi(rnd(0.5f * (id * x[i] - 1)), 0, 7) << (3 * i);
    const int g = f->map[u];
    *on = g >= 0;
    return g >= 0 ? g : best_neighbour(f, f->nb - g - 1, x, wa, s);
}

static inline void put_q(const fitter *f, int g, float *q) {
    const uint8_t *p = f->pos + 4 * g;
    q[0] = p[0]; q[1] = p[1]; q[2] = p[2]; q[3] = p[3];
}

/* the group's scale (max > 0 given) and grid numbers idx[8]; xv sign-folded values, w weights, wa sqrt(w) */
static float fit_group(const fitter *f, const float *xv, const float *w, const float *wa, float max,
                       int init_on, uint16_t *idx) {
    float q[32], qa[32], best = 0, scale = max / 15;
    int on[8], on_aux[8];
    for (int k = 0; k < 8; k++) { on[k] = init_on; idx[k] = (uint16_t)f->map[0]; }
    for (int k = 0; k < 32; k++) q[k] = 1;
    const int half = f->nsteps / 2;
    for (int is = -half; is <= half; is++) {
        const float id = (15 + is * 0.2f) / max, s = 1 / id;
        uint16_t ia[8];
        for (int k = 0; k < 8; k++) {
            ia[k] = (uint16_t)round_group(f, xv + 4 * k, wa + 4 * k, id, s, &on_aux[k]);
            put_q(f, ia[k], qa + 4 * k);
        }
        float sumqx = 0, sumq2 = 0;
        for (int i = 0; i < 32; i++) { sumqx += w[i] * xv[i] * qa[i]; sumq2 += w[i] * qa[i] * qa[i]; }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2; best = scale * sumqx;
            memcpy(q, qa, sizeof q);
            memcpy(idx, ia, sizeof ia);
            memcpy(on, on_aux, sizeof on);
        }
    }
    int off = 0;
    for (int k = 0; k < 8; k++) off += !on[k];
    if (off > 0 && scale > 0) {
        const float id = 1 / scale;
        for (int k = 0; k < 8; k++) {
            if (on[k] && !f->refit_all) continue;
            int dummy;
            idx[k] = (uint16_t)round_group(f, xv + 4 * k, wa + 4 * k, id, scale, &dummy);
            put_q(f, idx[k], q + 4 * k);
        }
        float sumqx = 0, sumq2 = 0;
        for (int i = 0; i < 32; i++) { sumqx += w[i] * xv[i] * q[i]; sumq2 += w[i] * q[i] * q[i]; }
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    return scale;
}

/* weights of the 32 values xb (column offset col within the row) and their square roots */
static void group_weights(const float *xb, const float *imatrix, float sigma2, float *w, float *wa) {
    if (imatrix) for (int i = 0; i < 32; i++) w[i] = imatrix[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    else for (int i = 0; i < 32; i++) w[i] = xb[i] * xb[i];
    for (int i = 0; i < 32; i++) wa[i] = sqrtf(w[i]);
}

static float block_sigma2(const float *x) {
    float s = 0;
    for (int i = 0; i < QC_QK_K; i++) s += x[i] * x[i];
    return 2 * s / QC_QK_K;
}

static int setup(fitter *f, int type, float (*gf)[4], int nsteps, int refit_all) {
    const qc_iq_table *t = qc_iq_table_get(type);
    if (!t || !t->map || !t->neighbours) return -1;
    f->map = t->map; f->nb = t->neighbours; f->pos = t->pos; f->gf = gf;
    f->nsteps = nsteps; f->refit_all = refit_all;
    for (int j = 0; j < t->size; j++)
        for (int i = 0; i < 4; i++) gf[j][i] = t->pos[4 * j + i];
    return 0;
}

/* block_iq3_xxs: d (f16), 64 grid numbers, 8 x uint32 (4 x 7 sign bits, 4-bit group scale at bit 28) */
static void iq3_xxs_block(const fitter *f, const float *x, const float *im, uint8_t *b) {
    float scales[8], w[32], wa[32], xv[32], max_scale = 0;
    uint8_t q3[96];
    uint32_t ss[8];
    memset(q3, 0, sizeof q3);
    memset(ss, 0, sizeof ss);
    const float sigma2 = block_sigma2(x);
    for (int ib = 0; ib < 8; ib++) {
        const float *xb = x + 32 * ib;
        group_weights(xb, im ? im + 32 * ib : NULL, sigma2, w, wa);
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
        float scale = fit_group(f, xv, w, wa, max, 1, idx);
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
    float scales[8], w[32], wa[32], xv[32], max_scale = 0;
    memset(b, 0, QC_IQ3_S_BYTES);
    uint8_t *qs = b + 2, *qh = b + 66, *sg = b + 74, *sc = b + 106;
    const float sigma2 = block_sigma2(x);
    for (int ib = 0; ib < 8; ib++) {
        const float *xb = x + 32 * ib;
        group_weights(xb, im ? im + 32 * ib : NULL, sigma2, w, wa);
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
        float scale = fit_group(f, xv, w, wa, max, 0, idx);
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
