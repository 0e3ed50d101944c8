/* The i-quants' grids (codebooks) and the quantiser's lookup over them, shared by the files of
 * formats.ggml._kernels (_iq_tables.c builds them; _encode_iq*.c encode, the decoders read `values`).
 *
 * A grid is a list of `size` points of `width` values (8 for IQ1 / IQ2, 4 for IQ3), each value one of a few
 * levels. gguf-py (gguf/quants.py) holds every grid as level indices; formats/ggml/codec.py registers them
 * here at load (qc_iq_register). From those:
 *   values      [size][width] the levels as ggml-common.h's iq*_grid stores them (one byte each: viewed as
 *               uint64_t for width 8, uint32_t for width 4, it is that table);
 *   pos         [size][width] the quantiser's odd-integer grid, 2 * index + 1 (ggml-quants.c's kgrid_q2xs /
 *               kgrid_q3xs);
 *   map         [map_size] a point's packed indices (index k at bit bits * k) -> its grid number, or for a
 *               point off the grid -(1 + offset) into `neighbours`;
 *   neighbours  at offset: a count n, then n grid numbers: the grid points nearest to the point in squared
 *               distance, ordered by (distance, grid number), over the `nwant` smallest distinct distances.
 * This is the lookup that ggml-quants.c's iq2xs_init_impl / iq3xs_init_impl build (tests/test_iquants.py
 * proves it through the encoders' bytes, equal to ggml_quantize_chunk's).
 */
#ifndef QC_IQ_H
#define QC_IQ_H
#include <stdint.h>

typedef struct {
    int size, width, bits, nwant, map_size;
    uint8_t *values;
    uint8_t *pos;
    int *map;
    uint16_t *neighbours;
} qc_iq_table;

/* the table of type `type` (GGMLQuantizationType id; IQ1_S and IQ1_M share one) once registered, else NULL;
 * `map` and `neighbours` are NULL until qc_iq_prepare(type) has run */
const qc_iq_table *qc_iq_table_get(int type);
int qc_iq_register(int type, const uint8_t *indices, const int8_t *values, int64_t points);
int qc_iq_prepare(int type);

/* gguf-py's ksigns_iq2xs: 7 sign bits -> 8 sign bits with even parity (registered by codec.py) */
extern uint8_t qc_iq_ksigns[128];
int qc_iq_register_signs(const uint8_t *ksigns);

/* The encoders of the lattice i-quants, rows [rows, cols] of float32 (cols a multiple of 256) with importance
 * weights imatrix [cols] (NULL where llama.cpp allows none): 0, or -1 when the type's table is not prepared
 * or (for the types llama.cpp refuses without one) imatrix is NULL. */
int qc_quant_iq2_xxs(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix);
int qc_quant_iq2_xs(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix);
int qc_quant_iq2_s(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix);
int qc_quant_iq3_xxs(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix);
int qc_quant_iq3_s(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix);
int qc_quant_iq1_s(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix);
int qc_quant_iq1_m(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix);
#endif
