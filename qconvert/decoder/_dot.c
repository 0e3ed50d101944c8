/* Matrix products and row dequantisation straight from stored bytes: F32, F16, BF16 and the GGML block
 * types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K; the i-quants, TQ1_0, TQ2_0 and MXFP4 of
 * formats/ggml/iq_blocks.h, with the grids qconvert/decoder/native.py registers at load). Part of
 * qconvert.decoder._kernels, called through ctypes (qconvert/decoder/products.py). Int codes of formats/int4/layout.py are in _dot_int.c; the shared engine in
 * _dot.h.
 *
 * W is [rows, cols] with row r at W + r * row_bytes (whole blocks per row for the block types). Block
 * decoders produce exactly the float32 values of formats/ggml/blocks.h's (same operations in the same
 * order), so qc_dequant_ggml equals formats.ggml.codec.to_f32 bit for bit (tests/test_codecs.py) and a
 * product equals dequantise-then-multiply up to float32 summation order. x is never quantised.
 *
 * The kernels of each vector width are in _dot_simd.h, included below once per width with QC_DOT_PASS set
 * (AVX2 and AVX-512); this file holds the portable code, the dispatch and the public functions. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "_dot.h"
#include "blocks.h"
#include "iq_blocks.h"
#include "types.h"


typedef void (*dot_fn)(const uint8_t *, int64_t, const float *, int64_t, int64_t, float *, int64_t, int64_t, int64_t);
typedef void (*deq_fn)(const uint8_t *, int64_t, int64_t, int64_t, int64_t, float *);

/* The block types these kernels run: X(NAME, name), the GGML type (types.h) and its kernels' name */
#define QC_DOT_BLOCK_TYPES(X) X(Q4_0, q4_0) X(Q4_1, q4_1) X(Q5_0, q5_0) X(Q5_1, q5_1) X(Q8_0, q8_0) \
    X(Q2_K, q2_k) X(Q3_K, q3_k) X(Q4_K, q4_k) X(Q5_K, q5_k) X(Q6_K, q6_k)

/* ---- the i-quants' grids, this library's own copy (no C library calls into another's) ---- */
static int8_t *iq_grids[6];  /* IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S (IQ1_M shares it) */
static uint8_t iq_ksigns[128];
static int iq_have_signs;
static int8_t **grid_slot(int type, int64_t *n) {
    switch (type) {
        case QC_IQ2_XXS: *n = 256 * 8; return &iq_grids[0];
        case QC_IQ2_XS: *n = 512 * 8; return &iq_grids[1];
        case QC_IQ2_S: *n = 1024 * 8; return &iq_grids[2];
        case QC_IQ3_XXS: *n = 256 * 4; return &iq_grids[3];
        case QC_IQ3_S: *n = 512 * 4; return &iq_grids[4];
        case QC_IQ1_S: case QC_IQ1_M: *n = 2048 * 8; return &iq_grids[5];
        default: *n = 0; return NULL;
    }
}
/* The grid of an i-quant: its points' values as ggml stores them, n = points * width signed bytes (gguf-py's
 * grid, passed by native.py at load). 0, or -1 for a type without a grid or a wrong size. Once per type. */
int qc_dot_iq_register(int type, const int8_t *values, int64_t n) {
    int64_t want;
    int8_t **slot = grid_slot(type, &want);
    if (!slot || n != want) return -1;
    if (*slot) return 0;
    int8_t *g = malloc((size_t)n);
    if (!g) return -1;
    memcpy(g, values, (size_t)n);
    *slot = g;
    return 0;
}
/* gguf-py's ksigns_iq2xs (7 sign bits -> 8 with even parity) */
int qc_dot_iq_register_signs(const uint8_t *ksigns) { memcpy(iq_ksigns, ksigns, 128); iq_have_signs = 1; return 0; }
static const int8_t *iq_grid(int type) { int64_t n; int8_t **s = grid_slot(type, &n); return s ? *s : NULL; }
static const uint8_t *iq_signs(void) { return iq_have_signs ? iq_ksigns : NULL; }
/* the same tables for _dot_q8.c (NULL until registered) */
const int8_t *qc_iq_grid_of(int type) { return iq_grid(type); }
const uint8_t *qc_iq_signs_of(void) { return iq_signs(); }

/* values and bytes per block of a block type; 0 for other types (and for an i-quant whose grid is missing) */
static int block_shape(int type, int *bytes) {
    switch (type) {
#define QC_SHAPE(T, t) case QC_##T: *bytes = QC_##T##_BYTES; return QC_##T##_BLOCK;
        QC_DOT_BLOCK_TYPES(QC_SHAPE)
#undef QC_SHAPE
        default:
            if (iq_needs_grid(type) && (!iq_grid(type) || !iq_signs())) { *bytes = 0; return 0; }
            return iq_block_shape(type, bytes);
    }
}
static int known(int type) {
    int bb;
    return type == QC_F32 || type == QC_F16 || type == QC_BF16 || block_shape(type, &bb);
}
/* one block's values (blocks.h, iq_blocks.h) */
static void deq_block(int type, const uint8_t *p, float *y, int64_t nb) {
    if (ggml_dequant(type, p, y, nb)) iq_dequant(type, p, y, nb, iq_grid(type), iq_signs());
}

static float ld_float(int type, const uint8_t *p) {
    if (type == QC_F32) { float f; memcpy(&f, p, 4); return f; }
    return type == QC_F16 ? h2f(rd16(p)) : bits_f32((uint32_t)rd16(p) << 16);
}

/* Instruction set of the kernels: the best this CPU has, or what qc_dot_set_isa forced (for tests). */
static int isa_forced = -1;
/* Force the kernels' instruction set: 0 portable C, 1 AVX2, 2 AVX-512, -1 automatic (the default).
 * A level the CPU lacks falls back to the best it has. Returns the level now in use. */
int qc_dot_set_isa(int level) { isa_forced = level; return qc_dot_isa(); }
/* Instruction set in use: 0 portable, 1 AVX2 + FMA + F16C, 2 AVX-512F + BW (with those). */
int qc_dot_isa(void) {
    int best = 0;
#ifdef QC_X86
    static int cpu = -1;
    if (cpu < 0) cpu = !has_f16c() ? 0 : __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? 2 : 1;
    best = cpu;
#endif
    return isa_forced >= 0 && isa_forced < best ? isa_forced : best;
}

/* ---- portable path: one block at a time through deq_block, scalar dot ---- */
static void dot_ggml_scalar(int type, const uint8_t *W, int64_t rb, const float *x, int64_t T, int64_t cols,
                            float *y, int64_t ldy, int64_t r0, int64_t r1) {
    int bb, bv = block_shape(type, &bb);
    const int fl = bv == 0, es = type == QC_F32 ? 4 : 2;
    float buf[QC_QK_K], acc[QC_TILE];
    if (fl) bv = QC_QK_K;
    for (int64_t t0 = 0; t0 < T; t0 += QC_TILE) {
        const int64_t tt = T - t0 < QC_TILE ? T - t0 : QC_TILE;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *p = W + r * rb;
            for (int64_t t = 0; t < tt; t++) acc[t] = 0.0f;
            for (int64_t c = 0; c < cols; c += bv) {
                const int64_t n = cols - c < bv ? cols - c : bv;
                if (fl) for (int64_t i = 0; i < n; i++) buf[i] = ld_float(type, p + (c + i) * es);
                else { deq_block(type, p, buf, 1); p += bb; }
                dot_buf_scalar(buf, n, x + t0 * cols + c, cols, acc, tt);
            }
            for (int64_t t = 0; t < tt; t++) y[(t0 + t) * ldy + (r - r0)] = acc[t];
        }
    }
}

#ifdef QC_X86
#define QC_DOT_PASS 8
#include "_dot_simd.h"
#undef QC_DOT_PASS
#define QC_DOT_PASS 16
#include "_dot_simd.h"
#undef QC_DOT_PASS
#endif

/* y[t * ldy + (r - r0)] = sum_c W[r, c] * x[t * cols + c] for r in [r0, r1), t < T; W of GGML type `type`
 * (GGMLQuantizationType value: QC_F32, QC_F16, QC_BF16 or a QC_DOT_BLOCK_TYPES type), row r at W + r * row_bytes.
 * Returns 0, or -1 for a type it does not know. Thread-safe; callers split [r0, r1) over threads. */
int qc_dot_ggml(int type, const uint8_t *W, int64_t row_bytes, const float *x, int64_t T, int64_t cols,
                float *y, int64_t ldy, int64_t r0, int64_t r1) {
    if (!known(type)) return -1;
#ifdef QC_X86
    deq_fn deq;
    const int isa = qc_dot_isa();
    if (isa) { (isa == 2 ? pick_w16 : pick_w8)(type, &deq)(W, row_bytes, x, T, cols, y, ldy, r0, r1); return 0; }
#endif
    dot_ggml_scalar(type, W, row_bytes, x, T, cols, y, ldy, r0, r1);
    return 0;
}

/* out[(r - r0) * cols + c] = W[r, c] as float32 for r in [r0, r1): the values of blocks.h / to_f32.
 * Returns 0, or -1 for an unknown type. */
int qc_dequant_ggml(int type, const uint8_t *W, int64_t row_bytes, int64_t cols, int64_t r0, int64_t r1, float *out) {
    if (!known(type)) return -1;
    int bb, bv = block_shape(type, &bb);
#ifdef QC_X86
    deq_fn deq = NULL;
    const int isa = qc_dot_isa();
    if (isa) (isa == 2 ? pick_w16 : pick_w8)(type, &deq);
    if (deq) { deq(W, row_bytes, cols, r0, r1, out); return 0; }
#endif
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *p = W + r * row_bytes;
        float *o = out + (r - r0) * cols;
        if (bv) deq_block(type, p, o, cols / bv);
        else if (type == QC_F32) memcpy(o, p, (size_t)cols * 4);
        else if (type == QC_F16) f16_row_to_f32((const uint16_t *)p, o, cols);  /* rows are 2-byte aligned */
        else for (int64_t c = 0; c < cols; c++) o[c] = ld_float(type, p + 2 * c);
    }
    return 0;
}

