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

#define QC_ATTN_SPLIT (1 << 16)  /* multiply-adds of a step's attention below which one thread does it all */

#define PTR(T, v) ((T)(intptr_t)(v))

/* y = x @ W.T for one row x of `cols` values: each stacked part writes its rows of y */
static int product(const int64_t *m, const float *x, int64_t cols, float *y, int threads) {
    for (int64_t i = 0, r = 0; i < m[0]; i++) {
        const int64_t *p = m + 1 + i * QC_PART_WORDS;
        const int64_t rows = p[P_ROWS];
        const int t = threads < p[P_MAX_THREADS] ? threads : (int)p[P_MAX_THREADS];
        const int rc = p[P_IS_INT]
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

static float dot_portable(const float *a, const float *b, int64_t n) {
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}
#ifdef QC_X86
/* the same sum as dot_portable, eight lanes at a time (the lanes' partial sums combined in the same order) */
__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) s = _mm256_add_ps(s, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    float l[8];
    _mm256_storeu_ps(l, s);
    for (; i < n; i++) l[0] += a[i] * b[i];
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}
#endif
static float dot(const float *a, const float *b, int64_t n) {
#ifdef QC_X86
    if (has_f16c()) return dot_avx2(a, b, n);
#endif
    return dot_portable(a, b, n);
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
        for (int64_t s = 0; s < S; s++) p[s] = dot(qh, K + s * hd, hd);
        qc_softmax_causal(p, 0, 1, S, 1, c->pos);
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int64_t s = 0; s < S; s++) {
            const float w = p[s], *vs = V + s * hd;
            for (int64_t i = 0; i < hd; i++) o[i] += w * vs[i];
        }
    }
}

/* Decoder layer on the hidden state x [hidden] of the token at position `pos` (in place). K / V caches
 * [kv_heads, max_len, hd]: this token's key and value are written at `pos`, then it attends to 0..pos.
 * cos / sin: the rotary tables of the position [hd]. scratch: qc_decode_scratch(L, max_len) floats.
 * The products and the attention heads are split over `threads` by rows; the rest runs on the caller.
 * Returns 0, or -1 when a product's storage type has no C kernel. */
int qc_decode_layer(const int64_t *L, float *x, float *kc, float *vc, int64_t max_len, int64_t pos,
                    const float *cos, const float *sin, float eps, int threads, float *scratch) {
    const int64_t H = L[L_HIDDEN], nh = L[L_HEADS], nkv = L[L_KV_HEADS], hd = L[L_HEAD_DIM], F = L[L_FFN];
    const int64_t *mats = L + L_MATS, S = pos + 1;
    float *xn = scratch, *qkv = xn + H, *att = qkv + (nh + 2 * nkv) * hd, *y = att + nh * hd;
    float *gu = y + H, *act = gu + 2 * F, *p = act + F;
    float *q = qkv, *k = q + nh * hd, *v = k + nkv * hd;

    rms_norm(x, PTR(const float *, L[L_LN1]), H, eps, xn);
    if (product(mats + M_QKV * QC_MAT_WORDS, xn, H, qkv, threads)) return -1;
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
    if (product(mats + M_O * QC_MAT_WORDS, att, nh * hd, y, threads)) return -1;
    for (int64_t i = 0; i < H; i++) x[i] += y[i];

    rms_norm(x, PTR(const float *, L[L_LN2]), H, eps, xn);
    if (product(mats + M_GATE_UP * QC_MAT_WORDS, xn, H, gu, threads)) return -1;
    qc_silu_mul(gu, 0, gu + F, 0, F, act, 0, 1);
    if (product(mats + M_DOWN * QC_MAT_WORDS, act, F, y, threads)) return -1;
    for (int64_t i = 0; i < H; i++) x[i] += y[i];
    return 0;
}

/* floats of scratch qc_decode_layer needs for layer L with a cache of max_len positions */
int64_t qc_decode_scratch(const int64_t *L, int64_t max_len) {
    const int64_t H = L[L_HIDDEN], hd = L[L_HEAD_DIM];
    return 2 * H + (2 * L[L_HEADS] + 2 * L[L_KV_HEADS]) * hd + 3 * L[L_FFN] + L[L_HEADS] * max_len;
}
