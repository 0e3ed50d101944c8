/* Matrix-vector kernel for the decoders: 16-bit float weights, float32 maths. Called through ctypes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "../../formats/_half.h"

/* y[t, r] = sum_c W[r, c] * x[t, c] for rows [r0, r1): W stored as bf16 (wt = 0) or f16 (wt = 1),
 * x and y float32, accumulation in float32. Used for decoding, where reading 16-bit weights halves
 * the memory traffic of a float32 matrix-vector product while computing the same float32 maths. */
static inline float dot_scalar(int wt, const uint16_t *w, const float *x, int64_t n) {
    float acc = 0.0f;
    for (int64_t c = 0; c < n; c++) acc += (wt ? h2f(w[c]) : bits_f32((uint32_t)w[c] << 16)) * x[c];
    return acc;
}
#ifdef QC_X86
__attribute__((target("avx2,fma,f16c"))) static void matvec16_avx2(int wt, const uint16_t *W, const float *x, float *y,
                                                                   int64_t r0, int64_t r1, int64_t cols, int64_t T) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *w = W + r * cols;
        for (int64_t t = 0; t < T; t++) {
            const float *xt = x + t * cols;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            int64_t c = 0;
            for (; c + 32 <= cols; c += 32) {
                __m256 w0, w1, w2, w3;
                if (wt) {
                    w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + c)));
                    w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + c + 8)));
                    w2 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + c + 16)));
                    w3 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + c + 24)));
                } else {
                    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + c))), 16));
                    w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + c + 8))), 16));
                    w2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + c + 16))), 16));
                    w3 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + c + 24))), 16));
                }
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt + c), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + c + 8), a1);
                a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xt + c + 16), a2);
                a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xt + c + 24), a3);
            }
            __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
            float acc = _mm_cvtss_f32(h);
            for (; c < cols; c++) acc += (wt ? h2f(w[c]) : bits_f32((uint32_t)w[c] << 16)) * xt[c];
            y[t * (r1 - r0) + (r - r0)] = acc;
        }
    }
}
#endif
/* y is laid out [T, r1 - r0] (the caller's slice of output rows). */
void qc_matvec16(int wt, const uint16_t *W, const float *x, float *y, int64_t r0, int64_t r1, int64_t cols, int64_t T) {
#ifdef QC_X86
    if (has_f16c()) { matvec16_avx2(wt, W, x, y, r0, r1, cols, T); return; }
#endif
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < T; t++) y[t * (r1 - r0) + (r - r0)] = dot_scalar(wt, W + r * cols, x + t * cols, cols);
}

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_matvec",
    "Decoder matvec kernel, called through ctypes (see qconvert/decoder/matvec.py).", -1, NULL};
PyMODINIT_FUNC PyInit__matvec(void) { return PyModule_Create(&moddef); }
