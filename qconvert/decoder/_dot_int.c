/* Matrix products and row dequantisation straight from formats/int4/layout.py's stored codes (docs/int4-format.md).
 * Part of qconvert.decoder._kernels, called through ctypes (qconvert/decoder/products.py); engine in _dot.h.
 *
 * A matrix [rows, cols] is: codes, row r at codes + r * code_row_bytes, either bit-packed as layout.py `pack`
 * (8 codes in `bits` bytes, little-endian; 4 bits: two per byte, even column in the low nibble) or, for
 * version-1 files with bits != 4, one code per byte; scales / offsets [rows, G] (G = ceil(cols / group),
 * the last group may be shorter), row-major: f16 (raw uint16) when steps is NULL, else 8-bit codes (scales
 * uint8 when asymmetric, int8 when symmetric; offsets int8) with steps [rows, 2] f16 (scale step, offset step):
 * scale = float(step) * float(code). offsets NULL = symmetric: w = s * (q - 2^(bits-1)); else w = s * q + m.
 * `flags`: 1 = version-1 codes, one per byte (bits != 4); 2 = integer zero points: offsets are the zeros z,
 * `bits` wide, bit-packed per row as the codes are ([rows, ceil(G * bits / 8)] bytes; layout version 3
 * `W.zeros`, either scale form), and m = z * -s (exact: s has at most 19 significant bits).
 * Values are exactly formats/int4/layout.py dequant_rows's (same float32 operations in the same order).
 * Like _dot.c, the kernels of each vector width are in a header, _dot_int_simd.h, included below once per
 * width (QC_DOT_PASS); this file holds the portable code, the dispatch and the public functions. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "_dot.h"

typedef struct {
    const uint8_t *codes; int64_t rb, cols, G, packed_rb;
    const void *scales, *offsets; const uint16_t *steps;
    int bits, group, mode;  /* mode: 0 one code per byte, 1 two 4-bit codes per byte, 2 bit-packed */
    int perm;               /* the product kernels read a reordered x (see int_dot) */
    int zint;               /* offsets are bit-packed integer zeros: m = z * -s (flags & 2) */
    int64_t zrb;            /* ... their bytes per row */
    float *S, *O;           /* product kernels: the row's per-32-column scales / offsets (see int_rows) */
    uint8_t pidx[64];       /* bit-packed codes: bytes of code i (i < 16) into dword lane i ... */
    int32_t psh[16];        /* ... and its shift there */
    float half;             /* 2^(bits-1) */
} imat;

static imat make_imat(const uint8_t *codes, int64_t code_row_bytes, const void *scales, const void *offsets,
                      const uint16_t *steps, int bits, int group, int flags, int64_t cols) {
    const int one_per_byte = flags & 1;
    imat m;
    memset(&m, 0, sizeof m);
    m.codes = codes, m.rb = code_row_bytes, m.cols = cols, m.G = (cols + group - 1) / group;
    m.packed_rb = (cols * bits + 7) / 8, m.scales = scales, m.offsets = offsets, m.steps = steps;
    m.bits = bits, m.group = group, m.half = (float)(1 << (bits - 1)), m.zint = (flags & 2) != 0 && offsets;
    m.zrb = (m.G * bits + 7) / 8;
    m.mode = (bits == 8 || one_per_byte) ? 0 : bits == 4 ? 1 : 2;
    for (int i = 0; i < 16; i++) {  /* lane i sits in 128-bit lane i / 4, which holds a copy of the bytes */
        const int lo = (i * bits) >> 3;
        m.pidx[4 * i] = (uint8_t)lo, m.pidx[4 * i + 1] = (uint8_t)(lo + 1), m.pidx[4 * i + 2] = 0x80;
        m.pidx[4 * i + 3] = 0x80, m.psh[i] = (i * bits) & 7;
    }
    return m;
}

/* the row's steps (8-bit scale codes; unused with f16 scales) */
static QC_INL void row_steps(const imat *m, int64_t r, float *ds, float *dm) {
    *ds = m->steps ? h2f(m->steps[2 * r]) : 0.0f;
    *dm = m->steps ? h2f(m->steps[2 * r + 1]) : 0.0f;
}
/* the integer zero of group g of row r (zint) */
static QC_INL float zero_at(const imat *m, int64_t r, int64_t g) {
    const uint8_t *zr = (const uint8_t *)m->offsets + r * m->zrb;
    const int64_t bit = g * m->bits, o0 = bit >> 3;
    uint32_t v = zr[o0];
    if (o0 + 1 < m->zrb) v |= (uint32_t)zr[o0 + 1] << 8;
    return (float)((v >> (bit & 7)) & ((1u << m->bits) - 1));
}
/* scale s and offset o of group g of row r: w = s * q + o (asymmetric); symmetric: o = -2^(bits-1) * s
 * (exact), w = (q - 2^(bits-1)) * s, which one FMA q * s + o rounds to the same value */
static QC_INL void group_sm(const imat *m, int64_t r, int64_t g, float ds, float dm, float *s, float *o) {
    const int64_t i = r * m->G + g;
    if (m->steps == NULL) {
        *s = h2f(((const uint16_t *)m->scales)[i]);
        *o = m->zint ? zero_at(m, r, g) * -*s : m->offsets ? h2f(((const uint16_t *)m->offsets)[i]) : -m->half * *s;
    } else if (m->offsets) {
        *s = (float)((const uint8_t *)m->scales)[i] * ds;
        *o = m->zint ? zero_at(m, r, g) * -*s : (float)((const int8_t *)m->offsets)[i] * dm;
    } else {
        *s = (float)((const int8_t *)m->scales)[i] * ds;
        *o = -m->half * *s;
    }
}

/* codes [c, c + n) of a bit-packed row -> bytes */
static QC_INL void unpack_codes(const imat *m, const uint8_t *row, int64_t c, int64_t n, uint8_t *dst) {
    const int b = m->bits;
    const uint32_t mask = (1u << b) - 1;
    if (c % 8 == 0) {
        for (int64_t j = 0; j < n; j += 8) {
            const int64_t o0 = (c + j) / 8 * b;
            uint64_t v = 0;
            for (int k = 0; k < b && o0 + k < m->packed_rb; k++) v |= (uint64_t)row[o0 + k] << (8 * k);
            const int64_t e = n - j < 8 ? n - j : 8;
            for (int64_t k = 0; k < e; k++) dst[j + k] = (uint8_t)((v >> (k * b)) & mask);
        }
        return;
    }
    for (int64_t j = 0; j < n; j++) {
        const int64_t bit = (c + j) * b, o0 = bit >> 3;
        uint32_t v = row[o0];
        if (o0 + 1 < m->packed_rb) v |= (uint32_t)row[o0 + 1] << 8;
        dst[j] = (uint8_t)((v >> (bit & 7)) & mask);
    }
}

static QC_INL float wval(const imat *m, float q, float s, float o) { return m->offsets ? q * s + o : (q - m->half) * s; }

/* portable: codes [c, c + n) of row r (n <= QC_CHUNK) -> out, with the group's s, o */
static QC_INL void decode_scalar(const imat *m, int64_t r, int64_t c, int64_t n, float s, float o, float *out) {
    const uint8_t *row = m->codes + r * m->rb;
    uint8_t q[QC_CHUNK];
    if (m->mode == 0) for (int64_t i = 0; i < n; i++) q[i] = row[c + i];
    else if (m->mode == 1) for (int64_t i = 0; i < n; i++) q[i] = (row[(c + i) >> 1] >> (4 * ((c + i) & 1))) & 15;
    else unpack_codes(m, row, c, n, q);
    for (int64_t i = 0; i < n; i++) out[i] = wval(m, (float)q[i], s, o);
}

/* Walks row r a chunk (about QC_CHUNK values, whole group pieces) at a time: DECODE(m, r, c, n, s, o, dst)
 * for each group piece [c, c + n) of the chunk starting at column c0, dst = BUF + (c - c0), then
 * CONSUME(c0, n_chunk). BUF may use c0 (e.g. `out + c0` to write a whole row). */
#define QC_INT_ROW(M, R, BUF, DECODE, CONSUME) {                                                    \
        float ds_, dm_, s_, o_;                                                                     \
        row_steps((M), (R), &ds_, &dm_);                                                            \
        int64_t g_ = 0, ge_ = (M)->group < (M)->cols ? (M)->group : (M)->cols;                      \
        group_sm((M), (R), 0, ds_, dm_, &s_, &o_);                                                  \
        for (int64_t c0 = 0; c0 < (M)->cols;) {                                                     \
            int64_t nb = 0;                                                                         \
            while (nb < QC_CHUNK && c0 + nb < (M)->cols) {                                          \
                const int64_t c = c0 + nb;                                                          \
                if (c == ge_) {                                                                     \
                    ge_ = ge_ + (M)->group < (M)->cols ? ge_ + (M)->group : (M)->cols;              \
                    group_sm((M), (R), ++g_, ds_, dm_, &s_, &o_);                                   \
                }                                                                                   \
                const int64_t n = ge_ - c < QC_CHUNK - nb ? ge_ - c : QC_CHUNK - nb;                \
                DECODE((M), (R), c, n, s_, o_, (BUF) + nb);                                         \
                nb += n;                                                                            \
            }                                                                                       \
            CONSUME(c0, nb);                                                                        \
            c0 += nb;                                                                               \
        }                                                                                           \
    }

#ifdef QC_X86
#define QC_DOT_PASS 8
#include "_dot_int_simd.h"
#undef QC_DOT_PASS
#define QC_DOT_PASS 16
#include "_dot_int_simd.h"
#undef QC_DOT_PASS
#endif

static int bad_args(int bits, int group) { return bits < 2 || bits > 8 || group < 1; }

/* y[t * ldy + (r - r0)] = sum_c W[r, c] * x[t * cols + c] for r in [r0, r1), t < T, W the int-code matrix
 * described at the top of this file. Returns 0, or -1 for bits outside 2..8 or a group < 1. */
int qc_dot_int(const uint8_t *codes, int64_t code_row_bytes, const void *scales, const void *offsets,
               const uint16_t *steps, int bits, int group, int flags, const float *x, int64_t T,
               int64_t cols, float *y, int64_t ldy, int64_t r0, int64_t r1) {
    if (bad_args(bits, group)) return -1;
    const imat m = make_imat(codes, code_row_bytes, scales, offsets, steps, bits, group, flags, cols);
#ifdef QC_X86
    const int isa = qc_dot_isa();
    if (isa) { (isa == 2 ? int_dot_w16 : int_dot_w8)(&m, x, T, y, ldy, r0, r1); return 0; }
#endif
    float buf[QC_CHUNK], acc[QC_TILE];
    for (int64_t t0 = 0; t0 < T; t0 += QC_TILE) {
        const int64_t tt = T - t0 < QC_TILE ? T - t0 : QC_TILE;
        for (int64_t r = r0; r < r1; r++) {
            for (int64_t t = 0; t < tt; t++) acc[t] = 0.0f;
#define QC_SCALAR_DOT(C0, NB) dot_buf_scalar(buf, (NB), x + t0 * cols + (C0), cols, acc, tt)
            QC_INT_ROW(&m, r, buf, decode_scalar, QC_SCALAR_DOT)
#undef QC_SCALAR_DOT
            for (int64_t t = 0; t < tt; t++) y[(t0 + t) * ldy + (r - r0)] = acc[t];
        }
    }
    return 0;
}

/* out[(r - r0) * cols + c] = W[r, c] for r in [r0, r1): bit-identical to formats/int4/layout.py dequant_rows.
 * Same matrix arguments as qc_dot_int; returns 0, or -1 for bad bits / group. */
int qc_dequant_int(const uint8_t *codes, int64_t code_row_bytes, const void *scales, const void *offsets,
                   const uint16_t *steps, int bits, int group, int flags, int64_t cols, int64_t r0,
                   int64_t r1, float *out) {
    if (bad_args(bits, group)) return -1;
    const imat m = make_imat(codes, code_row_bytes, scales, offsets, steps, bits, group, flags, cols);
#ifdef QC_X86
    const int isa = qc_dot_isa();
    if (isa) { (isa == 2 ? int_deq_w16 : int_deq_w8)(&m, r0, r1, out); return 0; }
#endif
#define QC_NOTHING(C0, NB) (void)0
    for (int64_t r = r0; r < r1; r++) { float *dst = out + (r - r0) * cols; QC_INT_ROW(&m, r, dst + c0, decode_scalar, QC_NOTHING) }
#undef QC_NOTHING
    return 0;
}

