/* GGML block decoders, bit-identical to ggml's dequantize_row_* (tests/test_kernels.py): one block type ->
 * float32, in the same operations and order, so every library that includes this header (formats.ggml._kernels,
 * qconvert.decoder._kernels) produces the same values. */
#ifndef QC_BLOCKS_H
#define QC_BLOCKS_H
#include <stdint.h>
#include <string.h>
#include "half.h"
#include "types.h"

/* ---- 32-value blocks ---- */
static inline void deq_q8_0(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += QC_Q8_0_BYTES, y += QC_Q8_0_BLOCK) {
        const float d = h2f(rd16(b)); const int8_t *q = (const int8_t *)(b + 2);
        for (int j = 0; j < 32; j++) y[j] = q[j] * d;
    }
}
static inline void deq_q4_0(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += QC_Q4_0_BYTES, y += QC_Q4_0_BLOCK) {
        const float d = h2f(rd16(b)); const uint8_t *q = b + 2;
        for (int j = 0; j < 16; j++) { y[j] = ((q[j] & 0xF) - 8) * d; y[j + 16] = ((q[j] >> 4) - 8) * d; }
    }
}
static inline void deq_q4_1(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += QC_Q4_1_BYTES, y += QC_Q4_1_BLOCK) {
        const float d = h2f(rd16(b)), m = h2f(rd16(b + 2)); const uint8_t *q = b + 4;
        for (int j = 0; j < 16; j++) { y[j] = (q[j] & 0xF) * d + m; y[j + 16] = (q[j] >> 4) * d + m; }
    }
}
static inline void deq_q5_0(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += QC_Q5_0_BYTES, y += QC_Q5_0_BLOCK) {
        const float d = h2f(rd16(b)); const uint32_t qh = rd32(b + 2); const uint8_t *q = b + 6;
        for (int j = 0; j < 16; j++) {
            const int x0 = (q[j] & 0xF) | (((qh >> j) & 1) << 4);
            const int x1 = (q[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            y[j] = (x0 - 16) * d; y[j + 16] = (x1 - 16) * d;
        }
    }
}
static inline void deq_q5_1(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += QC_Q5_1_BYTES, y += QC_Q5_1_BLOCK) {
        const float d = h2f(rd16(b)), m = h2f(rd16(b + 2)); const uint32_t qh = rd32(b + 4); const uint8_t *q = b + 8;
        for (int j = 0; j < 16; j++) {
            const int x0 = (q[j] & 0xF) | (((qh >> j) & 1) << 4);
            const int x1 = (q[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            y[j] = x0 * d + m; y[j + 16] = x1 * d + m;
        }
    }
}
/* ---- 256-value K blocks ---- */
static inline void deq_q4_k(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += QC_Q4_K_BYTES) {
        const float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2)); const uint8_t *sc = b + 4, *q = b + 16;
        int is = 0; uint8_t s, m;
        for (int j = 0; j < 256; j += 64, q += 32) {
            scale_min_k4(is++, sc, &s, &m); const float d1 = d * s, m1 = dmin * m;
            scale_min_k4(is++, sc, &s, &m); const float d2 = d * s, m2 = dmin * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
        }
    }
}
static inline void deq_q5_k(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += QC_Q5_K_BYTES) {
        const float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2)); const uint8_t *sc = b + 4, *qh = b + 16, *q = b + 48;
        int is = 0; uint8_t s, m, u1 = 1, u2 = 2;
        for (int j = 0; j < 256; j += 64, q += 32, u1 <<= 2, u2 <<= 2) {
            scale_min_k4(is++, sc, &s, &m); const float d1 = d * s, m1 = dmin * m;
            scale_min_k4(is++, sc, &s, &m); const float d2 = d * s, m2 = dmin * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * ((q[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * ((q[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
    }
}
static inline void deq_q6_k(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += QC_Q6_K_BYTES) {
        const uint8_t *ql = b, *qh = b + 128; const int8_t *sc = (const int8_t *)(b + 192);
        const float d = h2f(rd16(b + 208));
        for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8, y += 128) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * sc[is] * q1; y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3; y[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}
static inline void deq_q2_k(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += QC_Q2_K_BYTES) {
        const uint8_t *sc = b, *q = b + 16; const float d = h2f(rd16(b + 80)), dmin = h2f(rd16(b + 82));
        int is = 0;
        for (int n = 0; n < 256; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                uint8_t s = sc[is++]; float dl = d * (s & 0xF), ml = dmin * (s >> 4);
                for (int l = 0; l < 16; l++) *y++ = dl * ((q[l] >> shift) & 3) - ml;
                s = sc[is++]; dl = d * (s & 0xF); ml = dmin * (s >> 4);
                for (int l = 0; l < 16; l++) *y++ = dl * ((q[l + 16] >> shift) & 3) - ml;
            }
        }
    }
}
static inline void deq_q3_k(const uint8_t *b, float *y, int64_t nb) {
    const uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
    for (int64_t i = 0; i < nb; i++, b += QC_Q3_K_BYTES) {
        const uint8_t *hm = b, *q = b + 32, *scr = b + 96; const float d_all = h2f(rd16(b + 108));
        uint32_t aux[4]; memcpy(aux, scr, 12);
        const uint32_t tmp = aux[2];
        aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
        aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
        aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
        aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
        const int8_t *scales = (const int8_t *)aux;
        int is = 0; uint8_t m = 1;
        for (int n = 0; n < 256; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                float dl = d_all * (scales[is++] - 32);
                for (int l = 0; l < 16; l++) *y++ = dl * ((int8_t)((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
                dl = d_all * (scales[is++] - 32);
                for (int l = 0; l < 16; l++) *y++ = dl * ((int8_t)((q[l + 16] >> shift) & 3) - ((hm[l + 16] & m) ? 0 : 4));
            }
        }
    }
}

/* type ids are GGMLQuantizationType values; returns 0 on success, -1 for an unhandled type */
static inline int ggml_dequant(int type, const uint8_t *src, float *dst, int64_t n_blocks) {
    switch (type) {
        case QC_Q4_0: deq_q4_0(src, dst, n_blocks); return 0;
        case QC_Q4_1: deq_q4_1(src, dst, n_blocks); return 0;
        case QC_Q5_0: deq_q5_0(src, dst, n_blocks); return 0;
        case QC_Q5_1: deq_q5_1(src, dst, n_blocks); return 0;
        case QC_Q8_0: deq_q8_0(src, dst, n_blocks); return 0;
        case QC_Q2_K: deq_q2_k(src, dst, n_blocks); return 0;
        case QC_Q3_K: deq_q3_k(src, dst, n_blocks); return 0;
        case QC_Q4_K: deq_q4_k(src, dst, n_blocks); return 0;
        case QC_Q5_K: deq_q5_k(src, dst, n_blocks); return 0;
        case QC_Q6_K: deq_q6_k(src, dst, n_blocks); return 0;
        default: return -1;
    }
}
#endif
