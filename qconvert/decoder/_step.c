/* One decoding step of a dense Qwen2 layer in C: the same float32 maths as NumpyDecoder.layer for a single
 * token (qconvert/decoder/numpy_backend.py), in one call instead of some forty numpy operations. Part of
 * qconvert.decoder._kernels, called through ctypes by qconvert/decoder/step.py.
 *
 *   h = x + o_proj(attention(rope(q), rope(k), v))   with q, k, v = qkv_proj(rms_norm(x)) + biases
 *   x' = h + down_proj(silu(gate) * up)               with gate, up = gate_up_proj(rms_norm(h))
 *
 * The products are qc_matmul_ggml / qc_matmul_int (_dot_par.c) and the attention heads qc_parallel's, split
 * over `threads` by rows; the rest runs on the calling thread, so the result does not depend on the thread
 * count (tests/test_step.py). The softmax
 * and silu are _kernels.c's, as the numpy path uses them; the dot products of attention are summed in
 * another order than BLAS's, so logits agree with the numpy path to float32 rounding (tests/test_step.py).
 *
 * A layer is described by an int64 array (step.py `layer_words`, whose names these offsets follow):
 * sizes, then pointers (norm weights, biases or 0), then four matrices (qkv, o, gate_up, down), each its
 * part count and up to QC_PARTS parts of QC_PART_WORDS words: the stacked tensors of one product. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "_dot.h"

#define QC_PARTS 3
#define QC_PART_WORDS 12
#define QC_MAT_WORDS (1 + QC_PARTS * QC_PART_WORDS)
enum { L_HIDDEN, L_HEADS, L_KV_HEADS, L_HEAD_DIM, L_FFN, L_LN1, L_LN2, L_QB, L_KB, L_VB, L_MATS };
enum { P_IS_INT, P_TYPE, P_BITS, P_GROUP, P_FLAGS, P_ROWS, P_MAX_THREADS, P_W, P_RB, P_SCALES, P_OFFSETS, P_STEPS };
enum { M_QKV, M_O, M_GATE_UP, M_DOWN };

int qc_matmul_ggml(int type, const uint8_t *W, int64_t row_bytes, const float *x, int64_t T, int64_t cols,
                   float *y, int64_t ldy, int64_t r0, int64_t r1, int threads);
int qc_matmul_int(const uint8_t *codes, int64_t code_row_bytes, const void *scales, const void *offsets,
                  const uint16_t *steps, int bits, int group, int flags, const float *x, int64_t T,
                  int64_t cols, float *y, int64_t ldy, int64_t r0, int64_t r1, int threads);
void qc_softmax_causal(float *x, int64_t r0, int64_t r1, int64_t S, int64_t b, int64_t pos0);
void qc_silu_mul(const float *G, int64_t ldg, const float *U, int64_t ldu, int64_t f, float *out, int64_t r0,
                 int64_t r1);
void qc_parallel(void (*fn)(const void *ctx, int64_t a, int64_t b), const void *ctx, int64_t n, int threads);
int qc_q8_supports(int type);
int qc_matmul_q8(int type, const uint8_t *W, int64_t row_bytes, const float *x, int64_t T, int64_t cols, float *y,
                 int64_t ldy, int64_t r0, int64_t r1, int threads);

#define QC_ATTN_SPLIT (1 << 16)  /* multiply-adds of a step's attention below which one thread does it all */

#define PTR(T, v) ((T)(intptr_t)(v))

/* y = x @ W.T for one row x of `cols` values: each stacked part writes its rows of y. q8: on 8-bit
 * activations where the part's type has such a kernel (_dot_q8.c), else float32 */
static int product(const int64_t *m, const float *x, int64_t cols, float *y, int threads, int q8) {
    for (int64_t i = 0, r = 0; i < m[0]; i++) {
        const int64_t *p = m + 1 + i * QC_PART_WORDS;
        const int64_t rows = p[P_ROWS];
        const int t = threads < p[P_MAX_THREADS] ? threads : (int)p[P_MAX_THREADS];
        const int rc = q8 && !p[P_IS_INT] && qc_q8_supports((int)p[P_TYPE])
            ? qc_matmul_q8((int)p[P_TYPE], PTR(const uint8_t *, p[P_W]), p[P_RB], x, 1, cols, y + r, rows, 0, rows, t)
            : p[P_IS_INT]
            ? qc_matmul_int(PTR(const uint8_t *, p[P_W]), p[P_RB], PTR(const void *, p[P_SCALES]),
                            PTR(const void *, p[P_OFFSETS]), PTR(const uint16_t *, p[P_STEPS]), (int)p[P_BITS],
                            (int)p[P_GROUP], (int)p[P_FLAGS], x, 1, cols, y + r, rows, 0, rows, t)
            : qc_matmul_ggml((int)p[P_TYPE], PTR(const uint8_t *, p[P_W]), p[P_RB], x, 1, cols, y + r, rows,
                             0, rows, t);
        if (rc) return rc;
        r += rows;
    }
    return 0;
}

/* out = x / sqrt(mean(x^2) + eps) * w (the mean summed in double, then rounded: numpy's pairwise float32
 * sum lies within float32 rounding of it) */
static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)(x[i] * x[i]);
    const float r = sqrtf((float)(s / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] / r * w[i];
}

/* rotate-half RoPE of `heads` vectors of hd values: x * cos + rotate_half(x) * sin */
static void rope(float *x, int64_t heads, int64_t hd, const float *cos, const float *sin) {
    const int64_t half = hd / 2;
    for (int64_t h = 0; h < heads; h++, x += hd)
        for (int64_t i = 0; i < half; i++) {
            const float a = x[i], b = x[i + half];
            x[i] = a * cos[i] + (-b) * sin[i];
            x[i + half] = b * cos[i + half] + a * sin[i + half];
        }
}

/* Attention of one query head: scores p[s] = q . K[s] for keys s < S, and o = sum_s p[s] V[s] (rows of hd
 * floats). Portable C, and AVX2 + FMA (four keys at a time for the scores, hd in registers for o) where the
 * product kernels use AVX2 or AVX-512 (qc_dot_isa, which tests can lower: set_isa in native.py); each is
 * one fixed order of float32 operations, so a head's result does not depend on which thread runs it. */
static void scores_portable(const float *q, const float *K, int64_t S, int64_t hd, float *p) {
    for (int64_t s = 0; s < S; s++) {
        float a = 0.0f;
        for (int64_t i = 0; i < hd; i++) a += q[i] * K[s * hd + i];
        p[s] = a;
    }
}
static void pv_portable(const float *p, const float *V, int64_t S, int64_t hd, float *o) {
    memset(o, 0, (size_t)hd * sizeof(float));
    for (int64_t s = 0; s < S; s++)
        for (int64_t i = 0; i < hd; i++) o[i] += p[s] * V[s * hd + i];
}
#ifdef QC_X86
__attribute__((target("avx2,fma"))) static void scores_avx2(const float *q, const float *K, int64_t S, int64_t hd,
                                                            float *p) {
    int64_t s = 0;
    if (hd % 8 == 0)
        for (; s + 4 <= S; s += 4) {
            const float *k = K + s * hd;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t i = 0; i < hd; i += 8) {
                const __m256 qv = _mm256_loadu_ps(q + i);
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + hd + i), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * hd + i), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * hd + i), a3);
            }
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            _mm_storeu_ps(p + s, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        }
    scores_portable(q, K + s * hd, S - s, hd, p + s);
}
__attribute__((target("avx2,fma"))) static void pv_avx2(const float *p, const float *V, int64_t S, int64_t hd,
                                                        float *o) {
    int64_t d = 0;
    for (; d + 64 <= hd; d += 64) {
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int64_t s = 0; s < S; s++) {
            const __m256 w = _mm256_set1_ps(p[s]);
            const float *v = V + s * hd + d;
            for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * j), a[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(o + d + 8 * j, a[j]);
    }
    for (; d + 8 <= hd; d += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t s = 0; s < S; s++) a = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), _mm256_loadu_ps(V + s * hd + d), a);
        _mm256_storeu_ps(o + d, a);
    }
    for (; d < hd; d++) {
        float a = 0.0f;
        for (int64_t s = 0; s < S; s++) a += p[s] * V[s * hd + d];
        o[d] = a;
    }
}
#endif
static void scores(const float *q, const float *K, int64_t S, int64_t hd, float *p) {
#ifdef QC_X86
    if (qc_dot_isa() >= 1) { scores_avx2(q, K, S, hd, p); return; }
#endif
    scores_portable(q, K, S, hd, p);
}
static void pv(const float *p, const float *V, int64_t S, int64_t hd, float *o) {
#ifdef QC_X86
    if (qc_dot_isa() >= 1) { pv_avx2(p, V, S, hd, o); return; }
#endif
    pv_portable(p, V, S, hd, o);
}

/* one query's attention over keys 0..pos, for heads [a, b) (each head's result is computed the same way
 * whatever range holds it: thread-count independent) */
typedef struct {
    float *q; const float *kc, *vc; float *out, *p;  /* p: max_len scores per head */
    int64_t max_len, hd, g, pos; float scale;
} qc_attention;

static void attend(const void *ctx, int64_t a, int64_t b) {
    const qc_attention *c = ctx;
    const int64_t hd = c->hd, S = c->pos + 1;
    for (int64_t h = a; h < b; h++) {
        const int64_t j = h / c->g;  /* the kv head this query head shares */
        const float *K = c->kc + j * c->max_len * hd, *V = c->vc + j * c->max_len * hd;
        float *qh = c->q + h * hd, *o = c->out + h * hd, *p = c->p + h * c->max_len;
        for (int64_t i = 0; i < hd; i++) qh[i] *= c->scale;
        scores(qh, K, S, hd, p);
        qc_softmax_causal(p, 0, 1, S, 1, c->pos);
        pv(p, V, S, hd, o);
    }
}

/* Decoder layer on the hidden state x [hidden] of the token at position `pos` (in place). K / V caches
 * [kv_heads, max_len, hd]: this token's key and value are written at `pos`, then it attends to 0..pos.
 * cos / sin: the rotary tables of the position [hd]. scratch: qc_decode_scratch(L, max_len) floats.
 * The products and the attention heads are split over `threads` by rows; the rest runs on the caller.
 * Returns 0, -1 when a product's storage type has no C kernel, or -2 when a product found no memory. */
int qc_decode_layer(const int64_t *L, float *x, float *kc, float *vc, int64_t max_len, int64_t pos,
                    const float *cos, const float *sin, float eps, int threads, int q8, float *scratch) {
    const int64_t H = L[L_HIDDEN], nh = L[L_HEADS], nkv = L[L_KV_HEADS], hd = L[L_HEAD_DIM], F = L[L_FFN];
    const int64_t *mats = L + L_MATS, S = pos + 1;
    float *xn = scratch, *qkv = xn + H, *att = qkv + (nh + 2 * nkv) * hd, *y = att + nh * hd;
    float *gu = y + H, *act = gu + 2 * F, *p = act + F;
    float *q = qkv, *k = q + nh * hd, *v = k + nkv * hd;

    rms_norm(x, PTR(const float *, L[L_LN1]), H, eps, xn);
    int rc = product(mats + M_QKV * QC_MAT_WORDS, xn, H, qkv, threads, q8);
    if (rc) return rc;
    const float *qb = PTR(const float *, L[L_QB]), *kb = PTR(const float *, L[L_KB]), *vb = PTR(const float *, L[L_VB]);
    if (qb) for (int64_t i = 0; i < nh * hd; i++) q[i] += qb[i];
    if (kb) for (int64_t i = 0; i < nkv * hd; i++) k[i] += kb[i];
    if (vb) for (int64_t i = 0; i < nkv * hd; i++) v[i] += vb[i];
    rope(q, nh, hd, cos, sin);
    rope(k, nkv, hd, cos, sin);
    for (int64_t j = 0; j < nkv; j++) {
        memcpy(kc + (j * max_len + pos) * hd, k + j * hd, (size_t)hd * sizeof(float));
        memcpy(vc + (j * max_len + pos) * hd, v + j * hd, (size_t)hd * sizeof(float));
    }
    const qc_attention a = {q, kc, vc, att, p, max_len, hd, nh / nkv, pos, (float)(1.0 / sqrt((double)hd))};
    const int64_t work = nh * S * hd;  /* the heads go to several threads only when they outweigh a hand-over */
    qc_parallel(attend, &a, nh, work >= QC_ATTN_SPLIT ? threads : 1);
    if ((rc = product(mats + M_O * QC_MAT_WORDS, att, nh * hd, y, threads, q8))) return rc;
    for (int64_t i = 0; i < H; i++) x[i] += y[i];

    rms_norm(x, PTR(const float *, L[L_LN2]), H, eps, xn);
    if ((rc = product(mats + M_GATE_UP * QC_MAT_WORDS, xn, H, gu, threads, q8))) return rc;
    qc_silu_mul(gu, 0, gu + F, 0, F, act, 0, 1);
    if ((rc = product(mats + M_DOWN * QC_MAT_WORDS, act, F, y, threads, q8))) return rc;
    for (int64_t i = 0; i < H; i++) x[i] += y[i];
    return 0;
}

/* floats of scratch qc_decode_layer needs for layer L with a cache of max_len positions */
int64_t qc_decode_scratch(const int64_t *L, int64_t max_len) {
    const int64_t H = L[L_HIDDEN], hd = L[L_HEAD_DIM];
    return 2 * H + (2 * L[L_HEADS] + 2 * L[L_KV_HEADS]) * hd + 3 * L[L_FFN] + L[L_HEADS] * max_len;
}
