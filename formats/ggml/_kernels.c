/* Element-wise kernels of formats.ggml._kernels (bound in formats/ggml/codec.py), called through ctypes;
 * the block encoders are in _encode.c / _encode_w.c, the sub-block grids in _grid.c.
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

#include "half.h"
#include "blocks.h"
#include "iq_blocks.h"
#include "iq.h"
#include "types.h"

#ifdef QC_X86
__attribute__((target("avx,f16c"))) static void f32_to_f16_f16c(const float *s, uint16_t *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) d[i] = f2h(s[i]);
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

void qc_f16_to_f32(const uint16_t *s, float *d, int64_t n) { f16_row_to_f32(s, d, n); }
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


/* values and bytes per block of GGML type `type` (GGMLQuantizationType value) from types.h's table:
 * 0, or -1 (nothing written) for a type the C code does not handle */
int qc_type_size(int type, int64_t *block, int64_t *bytes) {
    switch (type) {
#define QC_TYPE_CASE(NAME, ID, BLOCK, BYTES) case QC_##NAME: *block = QC_##NAME##_BLOCK; *bytes = QC_##NAME##_BYTES; return 0;
        QC_GGML_TYPES(QC_TYPE_CASE)
#undef QC_TYPE_CASE
        default: return -1;
    }
}

/* type ids are GGMLQuantizationType values; returns 0 on success, -1 for an unhandled type (or an i-quant whose
 * grid formats/ggml/codec.py has not registered). blocks.h decodes the affine and K types, iq_blocks.h the rest
 * with the grids of iq.h. */
int qc_dequant(int type, const uint8_t *src, float *dst, int64_t n_blocks) {
    if (ggml_dequant(type, src, dst, n_blocks) == 0) return 0;
    const qc_iq_table *t = qc_iq_table_get(type);
    const uint8_t *signs = qc_iq_ksigns[127] ? qc_iq_ksigns : NULL;  /* entry 127 is 0xFF once registered */
    return iq_dequant(type, src, dst, n_blocks, t ? (const int8_t *)t->values : NULL, signs);
}

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_kernels",
    "C kernels for qconvert, called through ctypes (see formats/ggml/codec.py).", -1, NULL};
PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&moddef); }

/* int4 layout bit packing (formats/int4/layout.py: pack / unpack): every 8 codes of a row fill `bits` bytes,
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
