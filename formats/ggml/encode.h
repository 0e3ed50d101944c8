/* Helpers shared by the GGML block encoders (formats/ggml/_encode.c: plain; _encode_w.c: importance-weighted
 * and IQ4; _grid.c: code packing) and the int4 group search (qconvert/quant/_kernels.c). The static inline
 * ones are compiled into each library that includes this header. */
#ifndef QC_ENCODE_H
#define QC_ENCODE_H
#include <stdint.h>
#include <string.h>
#include <math.h>
#include "half.h"

static inline void put16(uint8_t *p, float v) { const uint16_t h = f2h(v); memcpy(p, &h, 2); }
/* round half to even for |v| < 2^22: adding 1.5 * 2^23 leaves the integer in the mantissa */
static inline int rnd(float v) {
    const float t = v + 12582912.f;
    int32_t i; memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}
static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

#ifdef QC_GGML_ENCODERS
/* Defined in _encode.c, for the files of formats.ggml._kernels only (they #define QC_GGML_ENCODERS): another
 * library that includes this header gets the static inline helpers alone, so it cannot call into this one. */
float qc_fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L, float *m_out,
                       float rmin, float rdelta, int nstep);
void qc_pack_scale_min_k4(uint8_t *sc, int j, int ls, int lm);
void qc_pack_2bit(const uint8_t *L, uint8_t *qs);
void qc_pack_k45(int five, const uint8_t *L, uint8_t *b);
void qc_pack_q6k(const uint8_t *L, uint8_t *b);
void qc_q6k(const float *x, uint8_t *b, int64_t nb, const float *qw);
#endif
/* symmetric: x ~ scale * (L - nmax), L in [0, 2 nmax - 1], weights w (NULL: x^2): the scale from the value
 * of largest magnitude, then 18 nearby grids, each with its weighted least-squares scale; the grid with the
 * largest explained sum wins. Same operation order as ggml's make_qx_quants (bit-identical results); each
 * grid's codes are rounded in a loop of their own (which the compiler vectorises), then summed in index order.
 * n <= 256. */
static inline float qc_fit_sym(int n, int nmax, const float *x, const float *w, int8_t *L) {
    float amax = 0, max = 0, wx[256];
    int l[256];
    for (int i = 0; i < n; i++) { const float a = fabsf(x[i]); if (a > amax) { amax = a; max = x[i]; } }
    if (amax < 1e-15f) { memset(L, 0, n); return 0.0f; }
    for (int i = 0; i < n; i++) wx[i] = w ? w[i] : x[i] * x[i];
    float is = -nmax / max, sxl = 0, sl2 = 0;
    for (int i = 0; i < n; i++) l[i] = clampi(rnd(is * x[i]), -nmax, nmax - 1);
    for (int i = 0; i < n; i++) {
        L[i] = (int8_t)(l[i] + nmax);
        sxl += wx[i] * x[i] * l[i]; sl2 += wx[i] * l[i] * l[i];
    }
    float scale = sl2 ? sxl / sl2 : 0.0f, best = scale * sxl;
    for (int k = -9; k <= 9; k++) {
        if (!k) continue;
        is = -(nmax + 0.1f * k) / max;
        sxl = sl2 = 0;
        for (int i = 0; i < n; i++) l[i] = clampi(rnd(is * x[i]), -nmax, nmax - 1);
        for (int i = 0; i < n; i++) { sxl += wx[i] * x[i] * l[i]; sl2 += wx[i] * l[i] * l[i]; }
        if (sl2 > 0 && sxl * sxl > best * sl2) {
            for (int i = 0; i < n; i++) L[i] = (int8_t)(l[i] + nmax);
            scale = sxl / sl2; best = scale * sxl;
        }
    }
    return scale;
}

/* weighted fit of the scale of non-negative values, as ggml's make_qp_quants: x ~ scale * L, L in [0, nmax]
 * (a negative rounding wraps in the uint8 L, and the maximum is taken as ggml's MAX(max, x) is, NaN included) */
static inline float qc_fit_qp(int n, int nmax, const float *x, uint8_t *L, const float *w) {
    float max = 0;
    for (int i = 0; i < n; i++) max = max > x[i] ? max : x[i];
    if (max < 1e-15f) { memset(L, 0, n); return 0.0f; }
    float iscale = nmax / max;
    for (int i = 0; i < n; i++) L[i] = (uint8_t)rnd(iscale * x[i]);
    float scale = 1 / iscale, best = 0;
    for (int i = 0; i < n; i++) { const float d = x[i] - scale * L[i]; best += w[i] * d * d; }
    for (int k = -4; k <= 4; k++) {
        if (!k) continue;
        const float is = (0.1f * k + nmax) / max, sc = 1 / is;
        float mse = 0;
        for (int i = 0; i < n; i++) {
            int l = rnd(is * x[i]); l = l < nmax ? l : nmax;
            const float d = x[i] - sc * l;
            mse += w[i] * d * d;
        }
        if (mse < best) { best = mse; iscale = is; }
    }
    float slx = 0, sl2 = 0;
    for (int i = 0; i < n; i++) {
        int l = rnd(iscale * x[i]); l = l < nmax ? l : nmax;
        L[i] = (uint8_t)l;
        slx += w[i] * x[i] * l; sl2 += w[i] * l * l;
    }
    for (int it = 0; it < 5; it++) {  /* move single codes while that raises slx^2 / sl2 */
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float a = slx - w[i] * x[i] * L[i], c = sl2 - w[i] * L[i] * L[i];
            if (a > 0 && c > 0) {
                int l = rnd(x[i] * c / a); l = l < nmax ? l : nmax;
                if (l != L[i]) {
                    a += w[i] * x[i] * l; c += w[i] * l * l;
                    if (a * a * sl2 > slx * slx * c) { L[i] = (uint8_t)l; slx = a; sl2 = c; changed++; }
                }
            }
        }
        if (!changed) break;
    }
    return sl2 > 0.0f ? slx / sl2 : 0.0f;
}
#endif
