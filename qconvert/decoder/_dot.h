/* Shared engine of the matrix-product kernels (_dot.c + _dot_simd.h: float and GGML types, _dot_int.c +
 * _dot_int_simd.h: int codes), all in qconvert.decoder._kernels.
 *
 * A product y[t, r] = sum_c W[r, c] * x[t, c] walks a row of W a chunk (up to QC_CHUNK values: blocks or
 * groups) at a time: the chunk is dequantised into a float buffer that stays in L1 (exactly the values the
 * row dequantisers give), then multiplied into float32 accumulators for every row t of x. The row kernels
 * are instantiated for each tile width T = 1..QC_TILE (always-inline + constant T) so the accumulators stay
 * in registers; wider x runs in tiles. Nothing quantises x: the maths is float32, dequantise-then-multiply.
 *
 * The SIMD part is written once over a vector width: a *_simd.h file, included with QC_DOT_PASS set (8: AVX2,
 * 16: AVX-512), includes this header again to get that width's primitives (V*) and engine, named QC_F(name). */
#ifndef QC_DOT_H
#define QC_DOT_H
#include <stdint.h>
#include "half.h"

#define QC_TILE 8      /* rows of x per pass over W */
#define QC_CHUNK 256   /* values dequantised at a time */
#define QC_INL inline __attribute__((always_inline))
#define QC_ALIGN __attribute__((aligned(64)))

int qc_dot_isa(void);  /* _dot.c: 0 portable, 1 AVX2, 2 AVX-512 */
int qc_dot_ggml(int type, const uint8_t *W, int64_t row_bytes, const float *x, int64_t T, int64_t cols,
                float *y, int64_t ldy, int64_t r0, int64_t r1);  /* _dot.c */
int qc_dot_int(const uint8_t *codes, int64_t code_row_bytes, const void *scales, const void *offsets,
               const uint16_t *steps, int bits, int group, int flags, const float *x, int64_t T,
               int64_t cols, float *y, int64_t ldy, int64_t r0, int64_t r1);  /* _dot_int.c */
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* software prefetch of the row QC_PF_BYTES ahead of row r (rows of rb bytes from base, rows < r1). Rule: the
 * kernels that decode between loads (GGML blocks, the int codes' 64-column path) prefetch, since on matrices
 * larger than the caches they would otherwise wait on memory; plain F32 / F16 / BF16 rows do not (a pure
 * stream, which the hardware prefetcher serves better alone). scripts/bench_codecs.py measures both on a
 * matrix above the caches (--shapes 151936x896). */
#define QC_PF_BYTES 4096
static QC_INL void prefetch_row(const uint8_t *base, int64_t rb, int64_t r, int64_t r1) {
    const int64_t ahead = rb >= QC_PF_BYTES ? 1 : QC_PF_BYTES / rb;
    if (r + ahead < r1)
        for (int64_t o = 0; o < rb; o += 64) __builtin_prefetch(base + (r + ahead) * rb + o, 0, 3);
}

/* portable: acc[t] += sum_i w[i] * x[t * cols + i] */
static QC_INL void dot_buf_scalar(const float *w, int64_t n, const float *x, int64_t cols, float *acc, int64_t T) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * cols;
        float a = 0.0f;
        for (int64_t i = 0; i < n; i++) a += w[i] * xt[i];
        acc[t] += a;
    }
}

/* Runs KERNEL(args..., x_tile, y_tile, tt) over x in tiles of QC_TILE rows; tt is a constant in every case. */
#define QC_TILED(KERNEL, T, X, XSTEP, Y, YSTEP, ...)                                              \
    for (int64_t t0_ = 0; t0_ < (T); t0_ += QC_TILE) {                                            \
        const int64_t tt_ = (T) - t0_ < QC_TILE ? (T) - t0_ : QC_TILE;                            \
        const float *x_ = (X) + t0_ * (XSTEP); float *y_ = (Y) + t0_ * (YSTEP);                   \
        switch (tt_) {                                                                            \
            case 1: KERNEL(__VA_ARGS__, x_, y_, 1); break;                                        \
            case 2: KERNEL(__VA_ARGS__, x_, y_, 2); break;                                        \
            case 3: KERNEL(__VA_ARGS__, x_, y_, 3); break;                                        \
            case 4: KERNEL(__VA_ARGS__, x_, y_, 4); break;                                        \
            case 5: KERNEL(__VA_ARGS__, x_, y_, 5); break;                                        \
            case 6: KERNEL(__VA_ARGS__, x_, y_, 6); break;                                        \
            case 7: KERNEL(__VA_ARGS__, x_, y_, 7); break;                                        \
            default: KERNEL(__VA_ARGS__, x_, y_, 8); break;                                       \
        }                                                                                         \
    }
/* independent accumulators per row of x: enough FMA chains in flight to hide the FMA latency */
#define QC_NA(T) ((T) == 1 ? 4 : (T) <= 4 ? 2 : 1)
#define QC_CAT2(a, b) a##_w##b
#define QC_CAT(a, b) QC_CAT2(a, b)
#endif /* QC_DOT_H */

/* ---- one vector width: primitives and engine (re-included per pass) ---- */
#if defined(QC_DOT_PASS) && defined(QC_X86)
#undef QC_F
#undef QC_TGT
#undef VF
#undef VI
#undef VN
#undef VLD
#undef VST
#undef VSET1
#undef VZERO
#undef VADD
#undef VSUB
#undef VMUL
#undef VFMA
#undef VCVT
#undef VU8
#undef VI8
#undef VU8X
#undef VI8X
#undef VIAND
#undef VISRL
#undef VISUB
#undef VISRLV
#undef VIADD
#undef VISLL
#undef VBF16
#undef VF16
#undef VHSUM
#undef VPERM
#undef VLDI
#undef VBITS
#undef VBITS_BYTES
#define QC_F(name) QC_CAT(name, QC_DOT_PASS)
#if QC_DOT_PASS == 8
#define QC_TGT __attribute__((target("avx2,fma,f16c")))
#define VF __m256
#define VI __m256i
#define VN 8
#define VLD(p) _mm256_loadu_ps(p)
#define VST(p, v) _mm256_storeu_ps((p), (v))
#define VSET1(f) _mm256_set1_ps(f)
#define VZERO() _mm256_setzero_ps()
#define VADD(a, b) _mm256_add_ps((a), (b))
#define VSUB(a, b) _mm256_sub_ps((a), (b))
#define VMUL(a, b) _mm256_mul_ps((a), (b))
#define VFMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define VCVT(i) _mm256_cvtepi32_ps(i)
#define VU8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))   /* VN bytes -> int32 */
#define VI8(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define VU8X(x, k) _mm256_cvtepu8_epi32((k) ? _mm_srli_si128((x), 8) : (x))   /* bytes k*VN.. of an xmm */
#define VI8X(x, k) _mm256_cvtepi8_epi32((k) ? _mm_srli_si128((x), 8) : (x))
#define VIAND(i, m) _mm256_and_si256((i), _mm256_set1_epi32(m))
#define VISRL(i, k) _mm256_srli_epi32((i), (k))
#define VISUB(i, k) _mm256_sub_epi32((i), _mm256_set1_epi32(k))
#define VISRLV(i, k) _mm256_srl_epi32((i), _mm_cvtsi32_si128(k))                 /* shift by a variable */
#define VIADD(a, b) _mm256_add_epi32((a), (b))
#define VISLL(i, k) _mm256_slli_epi32((i), (k))
#define VBF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define VF16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define VHSUM(v) QC_F(hsum)(v)
#define VPERM(v, idx) _mm256_permutevar8x32_ps((v), (idx))   /* lane i = v[idx[i]] */
#define VLDI(p) _mm256_loadu_si256((const __m256i *)(p))
/* VN b-bit codes from 8 bytes at p (code i at bits i*b..), given the byte-pair table and shifts */
#define VBITS(p, idx, sh, mask) _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(                     \
    _mm256_set1_epi64x((long long)rd64(p)), (idx)), (sh)), _mm256_set1_epi32(mask))
#define VBITS_BYTES 8
QC_TGT static QC_INL float QC_F(hsum)(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
#else
#define QC_TGT __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#define VF __m512
#define VI __m512i
#define VN 16
#define VLD(p) _mm512_loadu_ps(p)
#define VST(p, v) _mm512_storeu_ps((p), (v))
#define VSET1(f) _mm512_set1_ps(f)
#define VZERO() _mm512_setzero_ps()
#define VADD(a, b) _mm512_add_ps((a), (b))
#define VSUB(a, b) _mm512_sub_ps((a), (b))
#define VMUL(a, b) _mm512_mul_ps((a), (b))
#define VFMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define VCVT(i) _mm512_cvtepi32_ps(i)
#define VU8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define VI8(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define VU8X(x, k) _mm512_cvtepu8_epi32(x)
#define VI8X(x, k) _mm512_cvtepi8_epi32(x)
#define VIAND(i, m) _mm512_and_si512((i), _mm512_set1_epi32(m))
#define VISRL(i, k) _mm512_srli_epi32((i), (k))
#define VISUB(i, k) _mm512_sub_epi32((i), _mm512_set1_epi32(k))
#define VISRLV(i, k) _mm512_srl_epi32((i), _mm_cvtsi32_si128(k))
#define VIADD(a, b) _mm512_add_epi32((a), (b))
#define VISLL(i, k) _mm512_slli_epi32((i), (k))
#define VBF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define VF16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define VHSUM(v) _mm512_reduce_add_ps(v)
#define VPERM(v, idx) _mm512_permutexvar_ps((idx), (v))
#define VLDI(p) _mm512_loadu_si512((const void *)(p))
#define VBITS(p, idx, sh, mask) _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(                     \
    _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p))), (idx)), (sh)), _mm512_set1_epi32(mask))
#define VBITS_BYTES 16
#endif

/* The accumulators of a kernel instance are named variables (a<t>_<k>: row t of the x tile, chain k < QC_NA(T);
 * tl<t>: scalar tails), so they always live in registers; the macros below need the kernel's constant T. */
#define QC_Z4(t) a##t##_0 = VZERO(), a##t##_1 = VZERO(), a##t##_2 = VZERO(), a##t##_3 = VZERO()
#define QC_ACC_DECL                                                                                 \
    VF QC_Z4(0), QC_Z4(1), QC_Z4(2), QC_Z4(3), QC_Z4(4), QC_Z4(5), QC_Z4(6), QC_Z4(7);              \
    float tl0 = 0.0f, tl1 = 0.0f, tl2 = 0.0f, tl3 = 0.0f, tl4 = 0.0f, tl5 = 0.0f, tl6 = 0.0f, tl7 = 0.0f;
#define QC_FMA1(t, k, WV, X, COLS, OFF)                                                             \
    if ((t) < T) a##t##_##k = VFMA((WV), VLD((X) + (t) * (COLS) + (OFF)), a##t##_##k);
/* every row's chain k += WV * x[t, OFF: OFF + VN] */
#define QC_FMAV(k, WV, X, COLS, OFF)                                                                \
    { QC_FMA1(0, k, WV, X, COLS, OFF) QC_FMA1(1, k, WV, X, COLS, OFF) QC_FMA1(2, k, WV, X, COLS, OFF)  \
      QC_FMA1(3, k, WV, X, COLS, OFF) QC_FMA1(4, k, WV, X, COLS, OFF) QC_FMA1(5, k, WV, X, COLS, OFF)  \
      QC_FMA1(6, k, WV, X, COLS, OFF) QC_FMA1(7, k, WV, X, COLS, OFF) }
#define QC_TL1(t, W, X, COLS, I) if ((t) < T) tl##t += (W) * (X)[(t) * (COLS) + (I)];
/* accumulators += w[0:n] . x[t, 0:n] for weights in an (L1) buffer; any n */
#define QC_DOT_BUF(W, N, X, COLS) do {                                                              \
        const float *w_ = (W), *x_ = (X);                                                           \
        const int64_t n_ = (N), c_ = (COLS);                                                        \
        int64_t i_ = 0;                                                                             \
        for (; i_ + VN * QC_NA(T) <= n_; i_ += VN * QC_NA(T)) {                                     \
            { const VF w0_ = VLD(w_ + i_); QC_FMAV(0, w0_, x_, c_, i_) }                            \
            if (QC_NA(T) > 1) { const VF w1_ = VLD(w_ + i_ + VN); QC_FMAV(1, w1_, x_, c_, i_ + VN) } \
            if (QC_NA(T) > 2) {                                                                     \
                const VF w2_ = VLD(w_ + i_ + 2 * VN); QC_FMAV(2, w2_, x_, c_, i_ + 2 * VN)          \
                const VF w3_ = VLD(w_ + i_ + 3 * VN); QC_FMAV(3, w3_, x_, c_, i_ + 3 * VN)          \
            }                                                                                       \
        }                                                                                           \
        for (; i_ + VN <= n_; i_ += VN) { const VF w0_ = VLD(w_ + i_); QC_FMAV(0, w0_, x_, c_, i_) } \
        for (; i_ < n_; i_++) {                                                                     \
            QC_TL1(0, w_[i_], x_, c_, i_) QC_TL1(1, w_[i_], x_, c_, i_) QC_TL1(2, w_[i_], x_, c_, i_) \
            QC_TL1(3, w_[i_], x_, c_, i_) QC_TL1(4, w_[i_], x_, c_, i_) QC_TL1(5, w_[i_], x_, c_, i_) \
            QC_TL1(6, w_[i_], x_, c_, i_) QC_TL1(7, w_[i_], x_, c_, i_)                             \
        }                                                                                           \
    } while (0)
#define QC_ST1(t, Y, LDY)                                                                           \
    if ((t) < T) {                                                                                  \
        VF s_ = a##t##_0;                                                                           \
        if (QC_NA(T) > 1) s_ = VADD(s_, a##t##_1);                                                  \
        if (QC_NA(T) > 2) s_ = VADD(s_, VADD(a##t##_2, a##t##_3));                                  \
        (Y)[(t) * (LDY)] = VHSUM(s_) + tl##t;                                                       \
    }
/* y[t * ldy] = total of row t's accumulators */
#define QC_ACC_STORE(Y, LDY)                                                                        \
    { QC_ST1(0, Y, LDY) QC_ST1(1, Y, LDY) QC_ST1(2, Y, LDY) QC_ST1(3, Y, LDY)                        \
      QC_ST1(4, Y, LDY) QC_ST1(5, Y, LDY) QC_ST1(6, Y, LDY) QC_ST1(7, Y, LDY) }
#endif
