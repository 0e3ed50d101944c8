/* Block decoders of the GGML types a published GGUF uses beyond blocks.h's: the i-quants (IQ1_S, IQ1_M, IQ2_XXS,
 * IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS), the ternary TQ1_0 / TQ2_0 and MXFP4. One block -> float32 in
 * the operations and order of gguf-py's dequantize (gguf/quants.py), so the values are bit for bit its values
 * (tests/test_iq_decode.py); block layouts as ggml-common.h documents them.
 *
 * Static inline and state-free: every library that decodes includes this header (formats.ggml._kernels,
 * qconvert.decoder._kernels), each passing the grid it holds: `grid` is the type's points as ggml stores them
 * ([size][width] signed bytes: iq.h's `values`), `ksigns` gguf-py's 128-entry sign table. */
#ifndef QC_IQ_BLOCKS_H
#define QC_IQ_BLOCKS_H
#include <stdint.h>
#include "half.h"
#include "types.h"

/* the non-linear 4-bit levels of IQ4_NL / IQ4_XS, and MXFP4's E2M1 values doubled (gguf-py's kvalues) */
static const int8_t QC_KV_IQ4[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const int8_t QC_KV_MXFP4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
#define QC_IQ1_DELTA 0.125f

/* 8 values: db * grid point g, negated (the sign bit flipped, as -v does) where bit j of `signs` is set; no
 * branch on signs the data sets at random */
static inline void iqb_signed8(float *y, float db, const int8_t *g, unsigned signs) {
    for (int j = 0; j < 8; j++) y[j] = bits_f32(f32_bits(db * g[j]) ^ (((signs >> j) & 1u) << 31));
}
/* the f16 scale of the i-quant "0.5 + s" sub-block rule: d * (0.5 + s) * k */
static inline float iqb_half_scale(float d, unsigned s, float k) { return d * (0.5f + (float)s) * k; }

static inline void iqb_iq2_xxs(const uint8_t *b, float *y, const int8_t *grid, const uint8_t *ksigns) {
    const float d = h2f(rd16(b));
    for (int ib = 0; ib < 8; ib++, y += 32) {
        const uint8_t *q = b + 2 + 8 * ib;
        const uint32_t aux = rd32(q + 4);
        const float db = iqb_half_scale(d, aux >> 28, 0.25f);
        for (int l = 0; l < 4; l++) iqb_signed8(y + 8 * l, db, grid + 8 * q[l], ksigns[(aux >> (7 * l)) & 127]);
    }
}
static inline void iqb_iq2_xs(const uint8_t *b, float *y, const int8_t *grid, const uint8_t *ksigns) {
    const float d = h2f(rd16(b));
    const uint8_t *sc = b + 66;
    for (int i = 0; i < 32; i++, y += 8) {
        const uint16_t q = rd16(b + 2 + 2 * i);
        const float db = iqb_half_scale(d, (sc[i / 4] >> (4 * ((i / 2) & 1))) & 0xF, 0.25f);
        iqb_signed8(y, db, grid + 8 * (q & 511), ksigns[q >> 9]);
    }
}
static inline void iqb_iq2_s(const uint8_t *b, float *y, const int8_t *grid) {
    const float d = h2f(rd16(b));
    const uint8_t *qs = b + 2, *signs = b + 34, *qh = b + 66, *sc = b + 74;
    for (int i = 0; i < 32; i++, y += 8) {
        const int idx = qs[i] | (((qh[i / 4] >> (2 * (i & 3))) & 3) << 8);
        const float db = iqb_half_scale(d, (sc[i / 4] >> (4 * ((i / 2) & 1))) & 0xF, 0.25f);
        iqb_signed8(y, db, grid + 8 * idx, signs[i]);
    }
}
/* width-4 grids: two points make 8 values */
static inline void iqb_pair4(float *y, float db, const int8_t *grid, int a, int c, unsigned signs) {
    int8_t g[8];
    for (int j = 0; j < 4; j++) { g[j] = grid[4 * a + j]; g[4 + j] = grid[4 * c + j]; }
    iqb_signed8(y, db, g, signs);
}
static inline void iqb_iq3_xxs(const uint8_t *b, float *y, const int8_t *grid, const uint8_t *ksigns) {
    const float d = h2f(rd16(b));
    const uint8_t *qs = b + 2;
    for (int ib = 0; ib < 8; ib++, y += 32) {
        const uint32_t aux = rd32(b + 66 + 4 * ib);
        const float db = iqb_half_scale(d, aux >> 28, 0.5f);
        for (int l = 0; l < 4; l++)
            iqb_pair4(y + 8 * l, db, grid, qs[8 * ib + 2 * l], qs[8 * ib + 2 * l + 1], ksigns[(aux >> (7 * l)) & 127]);
    }
}
static inline void iqb_iq3_s(const uint8_t *b, float *y, const int8_t *grid) {
    const float d = h2f(rd16(b));
    const uint8_t *qs = b + 2, *qh = b + 66, *signs = b + 74, *sc = b + 106;
    for (int i = 0; i < 32; i++, y += 8) {  /* 8 values: grid entries 2i, 2i + 1 */
        const float db = d * (float)(1 + 2 * ((sc[i / 8] >> (4 * ((i / 4) & 1))) & 0xF));
        const int a = qs[2 * i] | (((qh[i / 4] >> (2 * (i & 3))) & 1) << 8);
        const int c = qs[2 * i + 1] | (((qh[i / 4] >> (2 * (i & 3) + 1)) & 1) << 8);
        iqb_pair4(y, db, grid, a, c, signs[i]);
    }
}
/* 8 values dl * (grid point + delta) */
static inline void iqb_shift8(float *y, float dl, const int8_t *g, float delta) {
    for (int j = 0; j < 8; j++) y[j] = dl * ((float)g[j] + delta);
}
static inline void iqb_iq1_s(const uint8_t *b, float *y, const int8_t *grid) {
    const float d = h2f(rd16(b));
    const uint8_t *qs = b + 2;
    for (int ib = 0; ib < 8; ib++) {
        const uint16_t h = rd16(b + 34 + 2 * ib);
        const float dl = d * (float)(2 * ((h >> 12) & 7) + 1), delta = h & 0x8000 ? -QC_IQ1_DELTA : QC_IQ1_DELTA;
        for (int l = 0; l < 4; l++, y += 8)
            iqb_shift8(y, dl, grid + 8 * (qs[4 * ib + l] | (((h >> (3 * l)) & 7) << 8)), delta);
    }
}
static inline float iqb_iq1_m_d(const uint8_t *b) {  /* the f16 scale, spread over the top nibbles of scales */
    const uint16_t s0 = rd16(b + 48), s1 = rd16(b + 50), s2 = rd16(b + 52), s3 = rd16(b + 54);
    return h2f((uint16_t)((s0 >> 12) | ((s1 >> 8) & 0xF0) | ((s2 >> 4) & 0xF00) | (s3 & 0xF000)));
}
static inline void iqb_iq1_m(const uint8_t *b, float *y, const int8_t *grid) {
    const float d = iqb_iq1_m_d(b);
    const uint8_t *qs = b, *qh = b + 32;
    for (int i = 0; i < 32; i++, y += 8) {  /* grid entry i; its 3-bit scale is number i / 2 */
        const int s = i / 2;
        const float dl = d * (float)(2 * ((rd16(b + 48 + 2 * (s / 4)) >> (3 * (s & 3))) & 7) + 1);
        const unsigned h = (qh[i / 2] >> (4 * (i & 1))) & 0xF;
        iqb_shift8(y, dl, grid + 8 * (qs[i] | ((h & 7) << 8)), h & 8 ? -QC_IQ1_DELTA : QC_IQ1_DELTA);
    }
}
static inline void iqb_iq4_nl(const uint8_t *b, float *y) {
    const float d = h2f(rd16(b));
    for (int j = 0; j < 16; j++) { y[j] = d * QC_KV_IQ4[b[2 + j] & 0xF]; y[j + 16] = d * QC_KV_IQ4[b[2 + j] >> 4]; }
}
static inline void iqb_iq4_xs(const uint8_t *b, float *y) {
    const float d = h2f(rd16(b));
    const uint16_t sh = rd16(b + 2);
    for (int ib = 0; ib < 8; ib++, y += 32) {
        const int ls = ((b[4 + ib / 2] >> (4 * (ib & 1))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4);
        const float dl = d * (float)(ls - 32);
        const uint8_t *q = b + 8 + 16 * ib;
        for (int j = 0; j < 16; j++) { y[j] = dl * QC_KV_IQ4[q[j] & 0xF]; y[j + 16] = dl * QC_KV_IQ4[q[j] >> 4]; }
    }
}
/* base-3 digit n of byte q (the digits' value v scaled to q = ceil(v * 256 / 243)), minus 1:
 * ((q * 3^n mod 256) * 3) >> 8 - 1 */
static inline float iqb_trit(uint8_t q, uint8_t pow3) { return (float)(((((uint8_t)(q * pow3)) * 3) >> 8) - 1); }
static inline void iqb_tq1_0(const uint8_t *b, float *y) {
    static const uint8_t P3[5] = {1, 3, 9, 27, 81};
    const float d = h2f(rd16(b + 52));
    for (int n = 0; n < 5; n++) for (int m = 0; m < 32; m++) *y++ = d * iqb_trit(b[m], P3[n]);
    for (int n = 0; n < 5; n++) for (int m = 0; m < 16; m++) *y++ = d * iqb_trit(b[32 + m], P3[n]);
    for (int n = 0; n < 4; n++) for (int m = 0; m < 4; m++) *y++ = d * iqb_trit(b[48 + m], P3[n]);
}
static inline void iqb_tq2_0(const uint8_t *b, float *y) {
    const float d = h2f(rd16(b + 64));
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 4; l++)
            for (int m = 0; m < 32; m++) *y++ = d * (float)(((b[32 * h + m] >> (2 * l)) & 3) - 1);
}
/* E8M0 exponent -> 2^(e - 128) as float32 (half the block scale 2^(e - 127), as the doubled kvalues need) */
static inline float iqb_e8m0_half(uint8_t e) { return bits_f32(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23); }
static inline void iqb_mxfp4(const uint8_t *b, float *y) {
    const float d = iqb_e8m0_half(b[0]);
    for (int j = 0; j < 16; j++) { y[j] = d * QC_KV_MXFP4[b[1 + j] & 0xF]; y[j + 16] = d * QC_KV_MXFP4[b[1 + j] >> 4]; }
}

/* 1 when type's blocks index a grid (and, for IQ2_XXS / IQ2_XS / IQ3_XXS, the sign table) */
static inline int iq_needs_grid(int type) {
    return type == QC_IQ2_XXS || type == QC_IQ2_XS || type == QC_IQ2_S || type == QC_IQ3_XXS || type == QC_IQ3_S ||
           type == QC_IQ1_S || type == QC_IQ1_M;
}
/* values and bytes per block of the types here; 0 for other types */
static inline int iq_block_shape(int type, int *bytes) {
#define QC_IQ_SHAPE(T) case QC_##T: *bytes = QC_##T##_BYTES; return QC_##T##_BLOCK;
    switch (type) {
        QC_IQ_SHAPE(IQ2_XXS) QC_IQ_SHAPE(IQ2_XS) QC_IQ_SHAPE(IQ2_S) QC_IQ_SHAPE(IQ3_XXS) QC_IQ_SHAPE(IQ3_S)
        QC_IQ_SHAPE(IQ1_S) QC_IQ_SHAPE(IQ1_M) QC_IQ_SHAPE(IQ4_NL) QC_IQ_SHAPE(IQ4_XS) QC_IQ_SHAPE(TQ1_0)
        QC_IQ_SHAPE(TQ2_0) QC_IQ_SHAPE(MXFP4)
        default: *bytes = 0; return 0;
    }
#undef QC_IQ_SHAPE
}
/* n_blocks blocks of `type` -> float32; 0, or -1 for a type not here or a grid type without its grid / signs */
static inline int iq_dequant(int type, const uint8_t *src, float *dst, int64_t n_blocks, const int8_t *grid,
                             const uint8_t *ksigns) {
    int bytes;
    const int values = iq_block_shape(type, &bytes);
    if (!values || (iq_needs_grid(type) && (!grid || !ksigns))) return -1;
    for (int64_t i = 0; i < n_blocks; i++, src += bytes, dst += values) {
        switch (type) {
            case QC_IQ2_XXS: iqb_iq2_xxs(src, dst, grid, ksigns); break;
            case QC_IQ2_XS: iqb_iq2_xs(src, dst, grid, ksigns); break;
            case QC_IQ2_S: iqb_iq2_s(src, dst, grid); break;
            case QC_IQ3_XXS: iqb_iq3_xxs(src, dst, grid, ksigns); break;
            case QC_IQ3_S: iqb_iq3_s(src, dst, grid); break;
            case QC_IQ1_S: iqb_iq1_s(src, dst, grid); break;
            case QC_IQ1_M: iqb_iq1_m(src, dst, grid); break;
            case QC_IQ4_NL: iqb_iq4_nl(src, dst); break;
            case QC_IQ4_XS: iqb_iq4_xs(src, dst); break;
            case QC_TQ1_0: iqb_tq1_0(src, dst); break;
            case QC_TQ2_0: iqb_tq2_0(src, dst); break;
            default: iqb_mxfp4(src, dst); break;
        }
    }
    return 0;
}
#endif
