/* The GGML types qconvert's C code handles, in one table: X(NAME, id, values per block, bytes per block).
 * The id is gguf-py's GGMLQuantizationType value; the block bytes are spelled as the sum of the block's
 * fields in their storage order (ggml-common.h; QC_QK_K = 256 values per K super-block), so the terms'
 * running sums are the field offsets. tests/test_kernels.py checks every row against gguf-py's
 * GGML_QUANT_SIZES through qc_type_size (formats/ggml/_kernels.c).
 *
 * Generated names, for every row: QC_<NAME> (the id), QC_<NAME>_BLOCK (values), QC_<NAME>_BYTES (bytes). */
#ifndef QC_TYPES_H
#define QC_TYPES_H

#define QC_QK_K 256

#define QC_GGML_TYPES(X)                                                                               \
    X(F32,    0,  1, 4)                                                                                \
    X(F16,    1,  1, 2)                                                                                \
    X(Q4_0,   2,  32, 2 + 16)                        /* d, qs */                                       \
    X(Q4_1,   3,  32, 2 + 2 + 16)                    /* d, m, qs */                                    \
    X(Q5_0,   6,  32, 2 + 4 + 16)                    /* d, qh, qs */                                   \
    X(Q5_1,   7,  32, 2 + 2 + 4 + 16)                /* d, m, qh, qs */                                \
    X(Q8_0,   8,  32, 2 + 32)                        /* d, qs */                                       \
    X(Q2_K,   10, QC_QK_K, QC_QK_K / 16 + QC_QK_K / 4 + 2 + 2)          /* scales, qs, d, dmin */      \
    X(Q3_K,   11, QC_QK_K, QC_QK_K / 8 + QC_QK_K / 4 + 12 + 2)          /* hmask, qs, scales, d */     \
    X(Q4_K,   12, QC_QK_K, 2 + 2 + 12 + QC_QK_K / 2)                    /* d, dmin, scales, qs */      \
    X(Q5_K,   13, QC_QK_K, 2 + 2 + 12 + QC_QK_K / 8 + QC_QK_K / 2)      /* d, dmin, scales, qh, qs */  \
    X(Q6_K,   14, QC_QK_K, QC_QK_K / 2 + QC_QK_K / 4 + QC_QK_K / 16 + 2) /* ql, qh, scales, d */       \
    X(IQ2_XXS, 16, QC_QK_K, 2 + QC_QK_K / 4)                           /* d, qs (u16) */              \
    X(IQ2_XS, 17, QC_QK_K, 2 + QC_QK_K / 4 + QC_QK_K / 32)              /* d, qs (u16), scales */      \
    X(IQ3_XXS, 18, QC_QK_K, 2 + 3 * QC_QK_K / 8)                        /* d, qs */                    \
    X(IQ1_S,  19, QC_QK_K, 2 + QC_QK_K / 8 + QC_QK_K / 16)              /* d, qs, qh (u16) */          \
    X(IQ4_NL, 20, 32, 2 + 16)                        /* d, qs */                                       \
    X(IQ3_S,  21, QC_QK_K, 2 + QC_QK_K / 4 + QC_QK_K / 32 + QC_QK_K / 8 + QC_QK_K / 64)  /* d, qs, qh, signs, scales */ \
    X(IQ2_S,  22, QC_QK_K, 2 + QC_QK_K / 4 + QC_QK_K / 32 + QC_QK_K / 32)  /* d, qs, qh, scales */        \
    X(IQ4_XS, 23, QC_QK_K, 2 + 2 + QC_QK_K / 64 + QC_QK_K / 2)          /* d, scales_h, scales_l, qs */ \
    X(IQ1_M,  29, QC_QK_K, QC_QK_K / 8 + QC_QK_K / 16 + QC_QK_K / 32)   /* qs, qh, scales */           \
    X(BF16,   30, 1, 2)                                                                                \
    X(TQ1_0,  34, QC_QK_K, (QC_QK_K - 4 * QC_QK_K / 64) / 5 + QC_QK_K / 64 + 2)  /* qs, qh, d */         \
    X(TQ2_0,  35, QC_QK_K, QC_QK_K / 4 + 2)                             /* qs, d */                    \
    X(MXFP4,  39, 32, 1 + 16)                        /* e (E8M0), qs */

enum {
#define QC_TYPE_NAMES(NAME, ID, BLOCK, BYTES) QC_##NAME = (ID), QC_##NAME##_BLOCK = (BLOCK), QC_##NAME##_BYTES = (BYTES),
    QC_GGML_TYPES(QC_TYPE_NAMES)
#undef QC_TYPE_NAMES
};

#endif
