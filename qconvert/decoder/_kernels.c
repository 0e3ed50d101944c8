/* The decoder's C library (qconvert.decoder._kernels, bound in qconvert/decoder/native.py): the fused
 * element-wise ops here, the products over stored matrices in _dot.c, _dot_int.c and _dot_par.c. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include "half.h"

/* ---- element-wise kernels for prefill: exp-based ops fused into one pass over memory ---- */
/* exp(x) for float32 (exp8) with the classic range reduction x = n ln2 + r, |r| <= ln2/2, and a degree-6
 * polynomial for exp(r); inputs are clamped to [-87.3, 88.7]. Its softmax and silu stay within the float64
 * tolerances tests/test_decoder.py checks (test_fused_softmax_and_silu_kernels_match_float64). */
static inline float exp_scalar(float x) { return expf(x); }
#ifdef QC_X86
__attribute__((target("avx2,fma"))) static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
__attribute__((target("avx2,fma"))) static float hsum8(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
__attribute__((target("avx2,fma"))) static void softmax_row_avx2(float *x, int64_t n) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(x + c));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float m = _mm_cvtss_f32(h);
    for (int64_t k = c; k < n; k++) m = x[k] > m ? x[k] : m;
    __m256 mv = _mm256_set1_ps(m), s8 = _mm256_setzero_ps();
    for (c = 0; c + 8 <= n; c += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + c), mv));
        _mm256_storeu_ps(x + c, e);
        s8 = _mm256_add_ps(s8, e);
    }
    float s = hsum8(s8);
    for (; c < n; c++) { x[c] = expf(x[c] - m); s += x[c]; }
    __m256 inv = _mm256_set1_ps(1.0f / s);
    for (c = 0; c + 8 <= n; c += 8) _mm256_storeu_ps(x + c, _mm256_mul_ps(_mm256_loadu_ps(x + c), inv));
    for (; c < n; c++) x[c] *= 1.0f / s;
}
__attribute__((target("avx2,fma"))) static void silu_mul_avx2(const float *g, const float *u, float *out, int64_t n) {
    int64_t c = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; c + 8 <= n; c += 8) {
        __m256 gv = _mm256_loadu_ps(g + c);
        __m256 d = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
        _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_div_ps(gv, d), _mm256_loadu_ps(u + c)));
    }
    for (; c < n; c++) out[c] = g[c] / (1.0f + expf(-g[c])) * u[c];
}
#endif
static void softmax_row(float *x, int64_t n) {
#ifdef QC_X86
    if (has_f16c()) { softmax_row_avx2(x, n); return; }
#endif
    float m = -INFINITY, s = 0.0f;
    for (int64_t c = 0; c < n; c++) m = x[c] > m ? x[c] : m;
    for (int64_t c = 0; c < n; c++) { x[c] = exp_scalar(x[c] - m); s += x[c]; }
    for (int64_t c = 0; c < n; c++) x[c] *= 1.0f / s;
}

/* Causal softmax in place over rows [r0, r1) of x [rows, S]: row r is the query at absolute position
 * pos0 + (r % b) and sees keys 0..pos0 + (r % b); later keys get probability 0. */
void qc_softmax_causal(float *x, int64_t r0, int64_t r1, int64_t S, int64_t b, int64_t pos0) {
    for (int64_t r = r0; r < r1; r++) {
        float *row = x + r * S;
        int64_t n = pos0 + (r % b) + 1;
        if (n > S) n = S;
        softmax_row(row, n);
        memset(row + n, 0, (size_t)(S - n) * sizeof(float));
    }
}

/* out[r, :] = silu(G[r, :f]) * U[r, :f] for rows [r0, r1); G, U have row strides ldg, ldu, out has f. */
void qc_silu_mul(const float *G, int64_t ldg, const float *U, int64_t ldu, int64_t f, float *out, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float *g = G + r * ldg, *u = U + r * ldu;
        float *o = out + r * f;
#ifdef QC_X86
        if (has_f16c()) { silu_mul_avx2(g, u, o, f); continue; }
#endif
        for (int64_t c = 0; c < f; c++) o[c] = g[c] / (1.0f + exp_scalar(-g[c])) * u[c];
    }
}

/* ---- bfloat16 copies for the products of a prompt in the q8 mode (products.py _product_bf16) ---- */
/* dst[i] = bfloat16(src[i]), rounded to nearest, ties to even (finite values; NaN stays NaN) */
#ifdef QC_X86
#define QC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QC_CLONES
#endif
QC_CLONES void qc_f32_to_bf16(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, src + i, 4);
        dst[i] = (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? (u >> 16) | 0x40 : (u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
    }
}
/* dst[r * ldd + c] = float(src[r * lds + c]) for rows [0, rows) and cols [0, cols) */
QC_CLONES void qc_bf16_to_f32(const uint16_t *src, int64_t lds, int64_t rows, int64_t cols, float *dst, int64_t ldd) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            const uint32_t u = (uint32_t)src[r * lds + c] << 16;
            memcpy(dst + r * ldd + c, &u, 4);
        }
}

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_kernels",
    "qconvert decoder kernels (ctypes entry points, see qconvert/decoder/native.py)", -1, NULL};
PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&moddef); }
