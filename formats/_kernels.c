/* Element-wise kernels for qconvert's (de)quantisation glue, called through ctypes.
 *
 * Float conversions are bit-exact with round-to-nearest-even (the same results as numpy's casts);
 * GGML block decoders follow the block layouts documented in ggml (ggml-common.h) and produce the
 * same float32 values as the gguf package's dequantize. Every function works on contiguous buffers
 * and holds no state, so callers may run them on several threads at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#include "_half.h"

#ifdef QC_X86
__attribute__((target("avx,f16c"))) static void f32_to_f16_f16c(const float *s, uint16_t *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) d[i] = f2h(s[i]);
}
__attribute__((target("avx,f16c"))) static void f16_to_f32_f16c(const uint16_t *s, float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (; i < n; i++) d[i] = h2f(s[i]);
}
__attribute__((target("avx2,f16c"))) static void bf16_to_f16_f16c(const uint16_t *s, uint16_t *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i))), 16);
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_castsi256_ps(w), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) d[i] = f2h(bits_f32((uint32_t)s[i] << 16));
}
#endif

void qc_f16_to_f32(const uint16_t *s, float *d, int64_t n) {
#ifdef QC_X86
    if (has_f16c()) { f16_to_f32_f16c(s, d, n); return; }
#endif
    for (int64_t i = 0; i < n; i++) d[i] = h2f(s[i]);
}
void qc_f32_to_f16(const float *s, uint16_t *d, int64_t n) {
#ifdef QC_X86
    if (has_f16c()) { f32_to_f16_f16c(s, d, n); return; }
#endif
    for (int64_t i = 0; i < n; i++) d[i] = f2h(s[i]);
}
void qc_bf16_to_f32(const uint16_t *s, float *d, int64_t n) { for (int64_t i = 0; i < n; i++) d[i] = bits_f32((uint32_t)s[i] << 16); }
void qc_f32_to_bf16(const float *s, uint16_t *d, int64_t n) { for (int64_t i = 0; i < n; i++) d[i] = f2bf(s[i]); }
void qc_bf16_to_f16(const uint16_t *s, uint16_t *d, int64_t n) {
#ifdef QC_X86
    if (has_f16c()) { bf16_to_f16_f16c(s, d, n); return; }
#endif
    for (int64_t i = 0; i < n; i++) d[i] = f2h(bits_f32((uint32_t)s[i] << 16));
}
void qc_f16_to_bf16(const uint16_t *s, uint16_t *d, int64_t n) { for (int64_t i = 0; i < n; i++) d[i] = f2bf(h2f(s[i])); }


/* ---- 32-value blocks ---- */
static void deq_q8_0(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 34, y += 32) {
        const float d = h2f(rd16(b)); const int8_t *q = (const int8_t *)(b + 2);
        for (int j = 0; j < 32; j++) y[j] = q[j] * d;
    }
}
static void deq_q4_0(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 18, y += 32) {
        const float d = h2f(rd16(b)); const uint8_t *q = b + 2;
        for (int j = 0; j < 16; j++) { y[j] = ((q[j] & 0xF) - 8) * d; y[j + 16] = ((q[j] >> 4) - 8) * d; }
    }
}
static void deq_q4_1(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 20, y += 32) {
        const float d = h2f(rd16(b)), m = h2f(rd16(b + 2)); const uint8_t *q = b + 4;
        for (int j = 0; j < 16; j++) { y[j] = (q[j] & 0xF) * d + m; y[j + 16] = (q[j] >> 4) * d + m; }
    }
}
static void deq_q5_0(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 22, y += 32) {
        const float d = h2f(rd16(b)); const uint32_t qh = rd32(b + 2); const uint8_t *q = b + 6;
        for (int j = 0; j < 16; j++) {
            const int x0 = (q[j] & 0xF) | (((qh >> j) & 1) << 4);
            const int x1 = (q[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            y[j] = (x0 - 16) * d; y[j + 16] = (x1 - 16) * d;
        }
    }
}
static void deq_q5_1(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 24, y += 32) {
        const float d = h2f(rd16(b)), m = h2f(rd16(b + 2)); const uint32_t qh = rd32(b + 4); const uint8_t *q = b + 8;
        for (int j = 0; j < 16; j++) {
            const int x0 = (q[j] & 0xF) | (((qh >> j) & 1) << 4);
            const int x1 = (q[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            y[j] = x0 * d + m; y[j + 16] = x1 * d + m;
        }
    }
}
/* ---- 256-value K blocks ---- */
static void deq_q4_k(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 144) {
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
static void deq_q5_k(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 176) {
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
static void deq_q6_k(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 210) {
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
static void deq_q2_k(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 84) {
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
static void deq_q3_k(const uint8_t *b, float *y, int64_t nb) {
    const uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
    for (int64_t i = 0; i < nb; i++, b += 110) {
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
int qc_dequant(int type, const uint8_t *src, float *dst, int64_t n_blocks) {
    switch (type) {
        case 2: deq_q4_0(src, dst, n_blocks); return 0;
        case 3: deq_q4_1(src, dst, n_blocks); return 0;
        case 6: deq_q5_0(src, dst, n_blocks); return 0;
        case 7: deq_q5_1(src, dst, n_blocks); return 0;
        case 8: deq_q8_0(src, dst, n_blocks); return 0;
        case 10: deq_q2_k(src, dst, n_blocks); return 0;
        case 11: deq_q3_k(src, dst, n_blocks); return 0;
        case 12: deq_q4_k(src, dst, n_blocks); return 0;
        case 13: deq_q5_k(src, dst, n_blocks); return 0;
        case 14: deq_q6_k(src, dst, n_blocks); return 0;
        default: return -1;
    }
}

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_kernels",
    "C kernels for qconvert, called through ctypes (see formats/kernels.py).", -1, NULL};
PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&moddef); }

/* int4 layout bit packing (formats/int4.py: pack / unpack): every 8 codes of a row fill `bits` bytes,
 * little-endian, code k at bits k*bits..; a row is padded with zero codes to a multiple of 8 and stored in
 * ceil(cols * bits / 8) bytes. */
void qc_pack_bits(const uint8_t *q, int64_t rows, int64_t cols, int bits, uint8_t *out) {
    const int64_t rb = (cols * bits + 7) / 8;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *c = q + r * cols;
        uint8_t *o = out + r * rb;
        for (int64_t j = 0; j < cols; j += 8) {
            uint64_t v = 0;
            const int n = cols - j < 8 ? (int)(cols - j) : 8;
            for (int k = 0; k < n; k++) v |= (uint64_t)c[j + k] << (k * bits);
            const int64_t o0 = j / 8 * bits;
            for (int b = 0; b < bits && o0 + b < rb; b++) o[o0 + b] = (uint8_t)(v >> (8 * b));
        }
    }
}

void qc_unpack_bits(const uint8_t *in, int64_t rows, int64_t cols, int bits, uint8_t *q) {
    const int64_t rb = (cols * bits + 7) / 8;
    const uint64_t mask = (1u << bits) - 1;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *s = in + r * rb;
        uint8_t *c = q + r * cols;
        for (int64_t j = 0; j < cols; j += 8) {
            uint64_t v = 0;
            const int64_t o0 = j / 8 * bits;
            for (int b = 0; b < bits && o0 + b < rb; b++) v |= (uint64_t)s[o0 + b] << (8 * b);
            const int n = cols - j < 8 ? (int)(cols - j) : 8;
            for (int k = 0; k < n; k++) c[j + k] = (uint8_t)((v >> (k * bits)) & mask);
        }
    }
}
