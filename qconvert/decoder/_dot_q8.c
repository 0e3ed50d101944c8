/* Decoding products on 8-bit activations, as llama.cpp's CPU backend computes them: the row x is rounded to
 * llama.cpp's activation blocks (ggml-cpu's vec_dot_type of the weight type: Q8_0 per 32 values for Q4_0,
 * Q5_0, Q8_0 and IQ4_NL; Q8_K per 256 for the K-quants, IQ4_XS, IQ2_XXS and IQ3_XXS), then each row is
 * summed as llama.cpp sums it (ggml-cpu/arch/x86/quants.c, ggml_vec_dot_<type>_q8_0 / _q8_K): exact integer
 * lanes, fused float32 steps, the same final additions, so each product equals llama.cpp's bit for bit. Part
 * of qconvert.decoder._kernels; products.py and _step.c call qc_matmul_q8 for one row of x when a decoder runs
 * with `activations = "q8"` (`qconvert generate --activations q8`; by default, and in logits / verify, the
 * float32 products of _dot.c run).
 *
 * The rounding of x is llama.cpp's: Q8_0 (ggml-cpu/arch/x86/quants.c quantize_row_q8_0): d = amax / 127 kept as
 * f16, codes round-half-even(x * 127 / amax); Q8_K (ggml-quants.c quantize_row_q8_K_ref): the value of largest
 * magnitude m, codes nearest(-127 / m * x) capped at 127, d = 1 / (-127 / m), sums of 16 codes.
 * tests/test_q8.py checks the codes against that rule, every row against llama.cpp's own vec_dot
 * (qconvert.testing.ggml_cpu), and the portable code, the AVX2 and the AVX-512 VNNI kernels (_dot_q8_simd.h)
 * against each other on any thread count. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "_dot.h"
#include "blocks.h"
#include "iq_blocks.h"
#include "types.h"

const int8_t *qc_iq_grid_of(int type);  /* _dot.c: the grids native.py registers */
const uint8_t *qc_iq_signs_of(void);
void qc_parallel(void (*fn)(const void *ctx, int64_t a, int64_t b), const void *ctx, int64_t n, int threads);

enum { ACT_NONE, ACT_Q8_0, ACT_Q8_K };
#define QC_Q8_NT 4  /* tokens that share each decoded weight block in a product over several (_dot_q8_simd.h) */

/* the activation blocks of weight type `type` (llama.cpp's vec_dot_type), ACT_NONE without a kernel here */
static int act_kind(int type) {
    switch (type) {
        case QC_Q4_0: case QC_Q5_0: case QC_Q8_0: case QC_IQ4_NL: return ACT_Q8_0;
        case QC_Q4_K: case QC_Q5_K: case QC_Q6_K: case QC_IQ4_XS: return ACT_Q8_K;
        case QC_IQ2_XXS: case QC_IQ3_XXS: return qc_iq_grid_of(type) && qc_iq_signs_of() ? ACT_Q8_K : ACT_NONE;
        default: return ACT_NONE;
    }
}

static int block_bytes(int type) {
    int bb = 0;
    switch (type) {
        case QC_Q4_0: return QC_Q4_0_BYTES;
        case QC_Q5_0: return QC_Q5_0_BYTES;
        case QC_Q8_0: return QC_Q8_0_BYTES;
        case QC_Q4_K: return QC_Q4_K_BYTES;
        case QC_Q5_K: return QC_Q5_K_BYTES;
        case QC_Q6_K: return QC_Q6_K_BYTES;
        default: iq_block_shape(type, &bb); return bb;
    }
}

/* one row of activations: codes q, per block scale d (Q8_0: per 32, its f16 value; Q8_K: per 256) and, for
 * Q8_K, the sums bs of every 16 codes */
typedef struct { int kind; int64_t cols; float *d; int8_t *q; int16_t *bs; } qc_act;

static QC_INL float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }  /* |v| < 2^22 */

static void quantize_q8_0(const float *x, int64_t cols, qc_act *a) {
    for (int64_t b = 0; b < cols / 32; b++) {
        const float *v = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) { const float f = v[i] < 0 ? -v[i] : v[i]; if (f > amax) amax = f; }
        a->d[b] = h2f(f2h(amax / 127.0f));
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < 32; i++) a->q[32 * b + i] = (int8_t)(int)round_even(v[i] * id);
    }
}
static void quantize_q8_k(const float *x, int64_t cols, qc_act *a) {
    for (int64_t b = 0; b < cols / 256; b++) {
        const float *v = x + 256 * b;
        int8_t *q = a->q + 256 * b;
        float amax = 0.0f, m = 0.0f;
        for (int i = 0; i < 256; i++) { const float f = v[i] < 0 ? -v[i] : v[i]; if (f > amax) { amax = f; m = v[i]; } }
        if (amax == 0.0f) {
            a->d[b] = 0.0f;
            memset(q, 0, 256);
        } else {
            const float iscale = -127.0f / m;
            for (int i = 0; i < 256; i++) { const int c = (int)round_even(iscale * v[i]); q[i] = (int8_t)(c > 127 ? 127 : c); }
            a->d[b] = 1.0f / iscale;
        }
        for (int j = 0; j < 16; j++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += q[16 * j + i];
            a->bs[16 * b + j] = (int16_t)s;
        }
    }
}

/* ---- llama.cpp's float32 steps (ggml-cpu/arch/x86/quants.c, ggml_vec_dot_<type>_q8_0 / _q8_K, AVX2) ----
 * Every block (Q8_0 activations) or super-block (Q8_K) gives 8 exact int32 lane sums: lane l holds the
 * products of the values v with (v mod 32) / 4 == l, times their sub-block scales. Each lane is added into
 * a float32 lane by one fused multiply-add with the block's scale d; the 8 lanes are summed as hsum8 does.
 * Q4_K adds its mins through 4 more lanes, Q5_K through one float; IQ4_NL keeps even and odd blocks in two
 * accumulators. The SIMD kernels (_dot_q8_simd.h) make the same lanes with vector instructions. */
static float hsum8(const float *v) {
    const float r0 = v[4] + v[0], r1 = v[5] + v[1], r2 = v[6] + v[2], r3 = v[7] + v[3];
    return (r0 + r2) + (r1 + r3);
}
static void lanes_fma(float *acc, float d, const int32_t *lane) {
    for (int l = 0; l < 8; l++) acc[l] = fmaf(d, (float)lane[l], acc[l]);
}
/* lane[l] += scale * (the products of w and a at 32-value positions 4l .. 4l + 3) */
static void lanes32(int32_t *lane, const int8_t *w, const int8_t *a, int scale) {
    for (int l = 0; l < 8; l++) {
        int32_t s = 0;
        for (int i = 4 * l; i < 4 * l + 4; i++) s += w[i] * a[i];
        lane[l] += scale * s;
    }
}

/* the 32 codes of a Q8_0-activation block type, as signed values */
static void codes32(int type, const uint8_t *b, int8_t *w) {
    switch (type) {
        case QC_Q8_0: memcpy(w, b + 2, 32); break;
        case QC_Q4_0: for (int j = 0; j < 16; j++) { w[j] = (int8_t)((b[2 + j] & 15) - 8); w[j + 16] = (int8_t)((b[2 + j] >> 4) - 8); } break;
        case QC_Q5_0: {
            const uint32_t qh = rd32(b + 2);
            for (int j = 0; j < 16; j++) {
                w[j] = (int8_t)(((b[6 + j] & 15) | (((qh >> j) & 1) << 4)) - 16);
                w[j + 16] = (int8_t)(((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
            }
            break;
        }
        default: for (int j = 0; j < 16; j++) { w[j] = QC_KV_IQ4[b[2 + j] & 15]; w[j + 16] = QC_KV_IQ4[b[2 + j] >> 4]; }
    }
}
static float row_q8_0_portable(int type, int bb, const uint8_t *p, const qc_act *a) {
    const int64_t nb = a->cols / 32;
    float acc[2][8] = {{0.0f}};
    int8_t w[32];
    const int pairs = type == QC_IQ4_NL;  /* even blocks into acc[0], odd into acc[1]; an odd last block apart */
    const int64_t nv = pairs ? nb & ~(int64_t)1 : nb;
    for (int64_t k = 0; k < nv; k++, p += bb) {
        int32_t lane[8] = {0};
        codes32(type, p, w);
        lanes32(lane, w, a->q + 32 * k, 1);
        lanes_fma(acc[pairs & k], h2f(rd16(p)) * a->d[k], lane);
    }
    for (int l = 0; l < 8; l++) acc[0][l] = acc[0][l] + acc[1][l];
    float sum = hsum8(acc[0]);
    if (nv < nb) {
        codes32(type, p, w);
        int32_t s = 0;
        for (int i = 0; i < 32; i++) s += w[i] * a->q[32 * nv + i];
        sum = fmaf(a->d[nv] * h2f(rd16(p)), (float)s, sum);
    }
    return sum;
}

/* one Q8_K super-block: its 8 lanes, the block scale d (and dmin, times -d_a), and for Q4_K / Q5_K the
 * products of the mins with the activation sums of 32 values, in pairs (m0 s0 + m1 s1, ...) */
typedef struct { int32_t lane[8], mins[4]; float d, dmin; } qc_kblock;

static void kblock_portable(int type, const uint8_t *b, const int8_t *q, const int16_t *bs, float da, qc_kblock *o) {
    memset(o, 0, sizeof *o);
    int8_t w[32];
    if (type == QC_Q4_K || type == QC_Q5_K) {
        const int five = type == QC_Q5_K;
        const uint8_t *qs = b + (five ? 48 : 16), *qh = b + 16;
        for (int j = 0; j < 8; j++) {
            uint8_t s, m;
            scale_min_k4(j, b + 4, &s, &m);
            for (int i = 0; i < 32; i++) {
                int v = (qs[32 * (j / 2) + i] >> (4 * (j & 1))) & 15;
                if (five) v |= ((qh[i] >> j) & 1) << 4;
                w[i] = (int8_t)v;
            }
            lanes32(o->lane, w, q + 32 * j, s);
            o->mins[j / 2] += m * (bs[2 * j] + bs[2 * j + 1]);
        }
        o->d = da * h2f(rd16(b)), o->dmin = -da * h2f(rd16(b + 2));
    } else if (type == QC_Q6_K) {
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int n = 0; n < 2; n++) {
            const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
            for (int c = 0; c < 4; c++) {  /* values 128 n + 32 c + i; scales per 16 */
                for (int i = 0; i < 32; i++)
                    w[i] = (int8_t)(((ql[i + 32 * (c & 1)] >> (4 * (c >> 1))) & 15) | (((qh[i] >> (2 * c)) & 3) << 4));
                const int8_t *qq = q + 128 * n + 32 * c;
                int32_t lo[8] = {0}, hi[8] = {0};
                lanes32(lo, w, qq, sc[8 * n + 2 * c]);
                lanes32(hi, w, qq, sc[8 * n + 2 * c + 1]);
                for (int l = 0; l < 8; l++) o->lane[l] += l < 4 ? lo[l] : hi[l];
            }
        }
        for (int l = 0; l < 8; l++) o->lane[l] -= 32 * (sc[2 * l] * bs[2 * l] + sc[2 * l + 1] * bs[2 * l + 1]);
        o->d = da * h2f(rd16(b + 208));
    } else if (type == QC_IQ4_XS) {
        const uint16_t sh = rd16(b + 2);
        for (int ib = 0; ib < 8; ib++) {
            const int ls = ((b[4 + ib / 2] >> (4 * (ib & 1))) & 15) | (((sh >> (2 * ib)) & 3) << 4);
            for (int j = 0; j < 16; j++) { w[j] = QC_KV_IQ4[b[8 + 16 * ib + j] & 15]; w[j + 16] = QC_KV_IQ4[b[8 + 16 * ib + j] >> 4]; }
            lanes32(o->lane, w, q + 32 * ib, ls - 32);
        }
        o->d = h2f(rd16(b)) * da;
    } else {  /* IQ2_XXS, IQ3_XXS: value = d (2 s + 1) / 8 (or / 4) * grid * sign; the 1/8 (1/4) after hsum8 */
        const int8_t *grid = qc_iq_grid_of(type);
        const uint8_t *ks = qc_iq_signs_of();
        const int three = type == QC_IQ3_XXS;
        for (int ib = 0; ib < 8; ib++) {
            const uint32_t aux = rd32(three ? b + 66 + 4 * ib : b + 6 + 8 * ib);
            for (int l = 0; l < 4; l++) {
                const unsigned sg = ks[(aux >> (7 * l)) & 127];
                for (int j = 0; j < 8; j++) {
                    const int g = three ? grid[4 * b[2 + 8 * ib + 2 * l + j / 4] + (j & 3)] : grid[8 * b[2 + 8 * ib + l] + j];
                    w[8 * l + j] = (int8_t)((sg >> j) & 1 ? -g : g);
                }
            }
            lanes32(o->lane, w, q + 32 * ib, (int)(2 * (aux >> 28) + 1));
        }
        o->d = h2f(rd16(b)) * da;
    }
}
/* the row's sum from its super-blocks' float lanes (and Q4_K's min lanes, Q5_K's min sum) */
static float kfinish(int type, const float *acc, const float *accm, float summs) {
    const float s = hsum8(acc);
    switch (type) {
        case QC_Q4_K: return s + ((accm[0] + accm[2]) + (accm[1] + accm[3]));
        case QC_Q5_K: return s + summs;
        case QC_IQ2_XXS: return 0.125f * s;
        case QC_IQ3_XXS: return 0.25f * s;
        default: return s;
    }
}
static float row_q8_k_portable(int type, int bb, const uint8_t *p, const qc_act *a) {
    float acc[8] = {0.0f}, accm[4] = {0.0f}, summs = 0.0f;
    qc_kblock o;
    for (int64_t k = 0; k < a->cols / 256; k++, p += bb) {
        kblock_portable(type, p, a->q + 256 * k, a->bs + 16 * k, a->d[k], &o);
        lanes_fma(acc, o.d, o.lane);
        if (type == QC_Q4_K)
            for (int i = 0; i < 4; i++) accm[i] = fmaf(o.dmin, (float)o.mins[i], accm[i]);
        if (type == QC_Q5_K) summs = fmaf(o.dmin, (float)(o.mins[0] + o.mins[1] + o.mins[2] + o.mins[3]), summs);
    }
    return kfinish(type, acc, accm, summs);
}

#ifdef QC_X86
#define QC_Q8_PASS 1
#include "_dot_q8_simd.h"
#undef QC_Q8_PASS
#define QC_Q8_PASS 2
#include "_dot_q8_simd.h"
#undef QC_Q8_PASS
/* 0 portable, 1 AVX2, 2 AVX2 + AVX-512 VL / BW / VNNI: the best the CPU has up to qc_dot_isa's level */
static int q8_level(void) {
    static int vnni = -1;
    if (vnni < 0) vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw");
    const int isa = qc_dot_isa();
    return isa >= 2 && vnni ? 2 : isa >= 1 ? 1 : 0;
}
#endif

/* ---- threads: rows of one product over qc_parallel's workers ---- */
typedef struct { int type, bb, level; const uint8_t *W; int64_t rb; const qc_act *a; int64_t T; float *y; int64_t ldy; } qc_q8_job;

/* out[t] = row p against tokens a[0 .. nt) (nt 1 or QC_Q8_NT) */
static void q8_row(const qc_q8_job *j, const uint8_t *p, const qc_act *a, int nt, float *out) {
    const int k0 = a->kind == ACT_Q8_0;
#ifdef QC_X86
    if (j->level == 2) { (k0 ? row_q8_0_simd_p2 : row_q8_k_simd_p2)(j->type, j->bb, p, a, nt, out); return; }
    if (j->level == 1) { (k0 ? row_q8_0_simd_p1 : row_q8_k_simd_p1)(j->type, j->bb, p, a, nt, out); return; }
#endif
    for (int t = 0; t < nt; t++) out[t] = k0 ? row_q8_0_portable(j->type, j->bb, p, a + t) : row_q8_k_portable(j->type, j->bb, p, a + t);
}

static void q8_rows(const void *ctx, int64_t r0, int64_t r1) {
    const qc_q8_job *j = ctx;
    float v[QC_Q8_NT];
    for (int64_t r = r0; r < r1; r++) {
        prefetch_row(j->W, j->rb, r, r1);
        for (int64_t t = 0; t < j->T;) {
            const int nt = j->T - t >= QC_Q8_NT ? QC_Q8_NT : 1;
            q8_row(j, j->W + r * j->rb, j->a + t, nt, v);
            for (int i = 0; i < nt; i++) j->y[(t + i) * j->ldy + r] = v[i];
            t += nt;
        }
    }
}

static __thread struct { int64_t cap; void *mem; } act_buf;

/* 1 when qc_matmul_q8 has a kernel for GGML type `type` (cols a whole number of its blocks), else 0 */
int qc_q8_supports(int type) { return act_kind(type) != ACT_NONE; }

/* y[t * ldy + r - r0] = W[r] . q8(x[t]) for rows [r0, r1) of W (GGML type `type`, rows of row_bytes) and the
 * T rows of x (`cols` values each, contiguous; a decoding step's few), each rounded to llama.cpp's activation
 * blocks for the type; `threads` threads. Each token's result is the one-token product's, bit for bit. 0, or -1 for a type
 * without a kernel here (qc_q8_supports) or cols not whole blocks, -2 out of memory. */
int qc_matmul_q8(int type, const uint8_t *W, int64_t row_bytes, const float *x, int64_t T, int64_t cols, float *y,
                 int64_t ldy, int64_t r0, int64_t r1, int threads) {
    const int kind = act_kind(type);
    const int64_t blk = kind == ACT_Q8_K ? 256 : 32;
    if (kind == ACT_NONE || cols % blk) return -1;
    if (T <= 0 || r1 <= r0) return 0;
    const int bb = block_bytes(type);
    const int64_t per = cols + 4 * (cols / blk) + 2 * (cols / 16);  /* q, d, bs of one token */
    const int64_t need = T * ((int64_t)sizeof(qc_act) + per) + 64;
    if (act_buf.cap < need) {
        void *m = realloc(act_buf.mem, (size_t)need);
        if (!m) return -2;
        act_buf.mem = m, act_buf.cap = need;
    }
#ifdef QC_X86
    if ((type == QC_IQ2_XXS || type == QC_IQ3_XXS) && !__atomic_load_n(&q8_have_signs, __ATOMIC_ACQUIRE)) q8_make_signs();
#endif
    qc_act *a = act_buf.mem;
    float *d = (float *)(a + T);
    int16_t *bs = (int16_t *)(d + T * (cols / blk));
    int8_t *q = (int8_t *)(bs + T * (cols / 16));
    for (int64_t t = 0; t < T; t++) {
        a[t] = (qc_act){kind, cols, d + t * (cols / blk), q + t * cols, bs + t * (cols / 16)};
        (kind == ACT_Q8_K ? quantize_q8_k : quantize_q8_0)(x + t * cols, cols, a + t);
    }
#ifdef QC_X86
    const int level = q8_level();
#else
    const int level = 0;
#endif
    const qc_q8_job j = {type, bb, level, W + r0 * row_bytes, row_bytes, a, T, y, ldy};
    qc_parallel(q8_rows, &j, r1 - r0, threads);
    return 0;
}

/* the activation codes and scales of x as qc_matmul_q8 makes them, for tests: q [cols] int8, d [blocks]
 * float32 and, for Q8_K, bs [cols / 16] int16. Returns the block size (32 or 256), or -1 */
int qc_q8_quantize(int type, const float *x, int64_t cols, int8_t *q, float *d, int16_t *bs) {
    const int kind = act_kind(type);
    const int64_t blk = kind == ACT_Q8_K ? 256 : 32;
    if (kind == ACT_NONE || cols % blk) return -1;
    qc_act a = {kind, cols, d, q, bs};
    (kind == ACT_Q8_K ? quantize_q8_k : quantize_q8_0)(x, cols, &a);
    return (int)blk;
}
