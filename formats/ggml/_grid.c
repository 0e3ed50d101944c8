/* Fixed block scales, free codes (GPTQ on GGML grids, qconvert/quant/gptq_ggml.py), in formats.ggml._kernels
 * (bound in formats/ggml/codec.py: block_grid, pack_codes).
 * Every type here decodes as value = d * G(L) + m per sub-block, with L the stored code: G(L) = L for the
 * affine types (L in 0..nmax), the IQ4 grid for IQ4_NL / IQ4_XS. qc_grid reads (d, m) of every sub-block;
 * qc_pack_codes writes new codes into blocks whose scale bytes it keeps. Q8_0 codes are stored + 128. */
#define QC_GGML_ENCODERS  /* encode.h: this library's shared encoder functions */
#include <stdint.h>
#include <string.h>
#include "half.h"
#include "encode.h"
#include "types.h"

typedef struct { int block, sub, size, nmax; } grid_info;  /* values and bytes per block, values per sub-block */
#define QC_GRID(T, SUB, NMAX) case QC_##T: *g = (grid_info){QC_##T##_BLOCK, (SUB), QC_##T##_BYTES, (NMAX)}; return 0;
static int info_of(int type, grid_info *g) {
    switch (type) {
        QC_GRID(Q4_0, 32, 15) QC_GRID(Q4_1, 32, 15) QC_GRID(Q5_0, 32, 31) QC_GRID(Q5_1, 32, 31)
        QC_GRID(Q8_0, 32, 255) QC_GRID(Q2_K, 16, 3) QC_GRID(Q3_K, 16, 7) QC_GRID(Q4_K, 32, 15)
        QC_GRID(Q5_K, 32, 31) QC_GRID(Q6_K, 16, 63) QC_GRID(IQ4_NL, 32, 15) QC_GRID(IQ4_XS, 32, 15)
        default: return -1;
    }
}
#undef QC_GRID

/* sub-block parameters of nb blocks: d[nb * subs], m[nb * subs]; returns subs per block, or -1 */
int qc_grid(int type, const uint8_t *b, int64_t nb, float *d, float *m) {
    grid_info g;
    if (info_of(type, &g)) return -1;
    const int64_t per = g.block / g.sub;
    for (int64_t i = 0; i < nb; i++, b += g.size, d += per, m += per) {
        switch (type) {
            case QC_Q4_0: d[0] = h2f(rd16(b)); m[0] = -8 * d[0]; break;
            case QC_Q5_0: d[0] = h2f(rd16(b)); m[0] = -16 * d[0]; break;
            case QC_Q8_0: d[0] = h2f(rd16(b)); m[0] = -128 * d[0]; break;
            case QC_Q4_1: case QC_Q5_1: d[0] = h2f(rd16(b)); m[0] = h2f(rd16(b + 2)); break;
            case QC_IQ4_NL: d[0] = h2f(rd16(b)); m[0] = 0; break;
            case QC_Q2_K: {
                const float D = h2f(rd16(b + 80)), M = h2f(rd16(b + 82));
                for (int j = 0; j < 16; j++) { d[j] = D * (b[j] & 0xF); m[j] = -M * (b[j] >> 4); }
                break;
            }
            case QC_Q3_K: {
                const float D = h2f(rd16(b + 108)); const uint8_t *sc = b + 96;
                for (int j = 0; j < 16; j++) {
                    const int s = (((sc[j % 8] >> (j < 8 ? 0 : 4)) & 0xF) | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
                    d[j] = D * s; m[j] = -4 * d[j];
                }
                break;
            }
            case QC_Q4_K: case QC_Q5_K: {
                const float D = h2f(rd16(b)), M = h2f(rd16(b + 2));
                for (int j = 0; j < 8; j++) { uint8_t s, mm; scale_min_k4(j, b + 4, &s, &mm); d[j] = D * s; m[j] = -M * mm; }
                break;
            }
            case QC_Q6_K: {
                const float D = h2f(rd16(b + 208));
                for (int j = 0; j < 16; j++) { d[j] = D * ((const int8_t *)(b + 192))[j]; m[j] = -32 * d[j]; }
                break;
            }
            case QC_IQ4_XS: {
                const float D = h2f(rd16(b)); const uint16_t sh = rd16(b + 2);
                for (int j = 0; j < 8; j++) {
                    const int ls = ((b[4 + j / 2] >> (4 * (j % 2))) & 0xF) | (((sh >> (2 * j)) & 3) << 4);
                    d[j] = D * (ls - 32); m[j] = 0;
                }
                break;
            }
        }
    }
    return (int)per;
}

/* write codes L (one per value, in order) into nb blocks, keeping their scale bytes */
int qc_pack_codes(int type, uint8_t *b, int64_t nb, const uint8_t *L) {
    grid_info g;
    if (info_of(type, &g)) return -1;
    const int vals = g.block;
    for (int64_t i = 0; i < nb; i++, b += g.size, L += vals) {
        switch (type) {
            case QC_Q4_0: case QC_Q4_1: case QC_Q5_0: case QC_Q5_1: case QC_IQ4_NL: {
                const int asym = type == QC_Q4_1 || type == QC_Q5_1, five = type == QC_Q5_0 || type == QC_Q5_1;
                uint8_t *qs = b + g.size - 16; uint32_t qh = 0;
                for (int j = 0; j < 16; j++) {
                    qs[j] = (uint8_t)((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4));
                    qh |= ((uint32_t)(L[j] >> 4) & 1u) << j;
                    qh |= ((uint32_t)(L[j + 16] >> 4) & 1u) << (j + 16);
                }
                if (five) memcpy(b + 2 + 2 * asym, &qh, 4);
                break;
            }
            case QC_Q8_0: for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(L[j] - 128); break;
            case QC_Q2_K: qc_pack_2bit(L, b + 16); break;
            case QC_Q3_K: {
                uint8_t U[256];
                memset(b, 0, 32);
                for (int j = 0; j < 256; j++) {
                    U[j] = L[j];
                    if (U[j] > 3) { b[j % 32] |= (uint8_t)(1u << (j / 32)); U[j] -= 4; }
                }
                qc_pack_2bit(U, b + 32);
                break;
            }
            case QC_Q4_K: case QC_Q5_K: if (type == QC_Q5_K) memset(b + 16, 0, 32); qc_pack_k45(type == QC_Q5_K, L, b); break;
            case QC_Q6_K: qc_pack_q6k(L, b); break;
            case QC_IQ4_XS:
                for (int k = 0; k < 8; k++)
                    for (int j = 0; j < 16; j++) b[8 + 16 * k + j] = (uint8_t)(L[32 * k + j] | (L[32 * k + 16 + j] << 4));
                break;
        }
    }
    return 0;
}
