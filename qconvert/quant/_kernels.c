/* int4 group-wise quantisation and GPTQ's column sweep, called through ctypes (qconvert/quant/native.py).
 * The symmetric scale search is the GGML encoders' (formats/ggml/encode.h: qc_fit_sym). */
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "half.h"
#include "encode.h"

/* ---- group-wise quantisation for the int4 layout (see docs/int4-format.md) ----
 * Rows of `cols` values are cut into groups of `group` (the last one may be shorter). Asymmetric:
 * x ~ scale * q + offset, q in [0, 2^bits - 1]; symmetric: x ~ scale * (q - 2^(bits-1)) with a signed scale.
 * method 0 (rtn): scale and offset from the group's min / max. method 1 (search): the weighted
 * least-squares search of the K-quants over candidate scales. Scale and offset are rounded to f16 and
 * the values re-quantised with the rounded pair, so what is stored is what was optimised for. */
/* Same search as qc_fit_scale_min (formats/ggml/_encode.c; x ~ scale * L + offset, offset <= 0), but each
 * candidate costs one pass: the weighted error follows from the sums,
 * err = s^2 Sll + 2 s m Sl - 2 s Slx + m^2 Sw - 2 m Sx + Sxx. */
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

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_kernels",
    "int4 group search and GPTQ sweep (ctypes entry points)", -1, NULL};
PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&moddef); }
