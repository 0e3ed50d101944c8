/* The GGML-type kernels of _dot.c for one vector width: included by _dot.c once per width with QC_DOT_PASS set
 * (8: AVX2, 16: AVX-512), so it has no include guard; it includes _dot.h again for that width's primitives
 * (V*, QC_F(name)).
 * Block decoders give the values of formats/ggml/blocks.h (EX: bit for bit, tests/test_codecs.py). */
#include "_dot.h"
#undef H2F
#undef QC_MAD
#define H2F(p) _cvtsh_ss(rd16(p))
/* q * d + m: exactly as the row dequantisers (two roundings) when EX, else one FMA (products: float32
 * rounding either way, one instruction less per vector) */
#define QC_MAD(q, d, m, EX) ((EX) ? VADD(VMUL((q), (d)), (m)) : VFMA((q), (d), (m)))

/* 32 signed bytes: values 0..15 * d0, 16..31 * d1 */
QC_TGT static QC_INL void QC_F(st_s32)(float *y, __m256i q, VF d0, VF d1) {
    const __m128i l = _mm256_castsi256_si128(q), h = _mm256_extracti128_si256(q, 1);
    for (int k = 0; k < 16 / VN; k++) {
        VST(y + k * VN, VMUL(VCVT(VI8X(l, k)), d0));
        VST(y + 16 + k * VN, VMUL(VCVT(VI8X(h, k)), d1));
    }
}
/* 32 unsigned bytes: q * d + m (a - m is exactly a + (-m): callers pass -m for the "d * q - m" types) */
QC_TGT static QC_INL void QC_F(st_u32)(float *y, __m256i q, VF d, VF m, const int ex) {
    const __m128i l = _mm256_castsi256_si128(q), h = _mm256_extracti128_si256(q, 1);
    for (int k = 0; k < 16 / VN; k++) {
        VST(y + k * VN, QC_MAD(VCVT(VU8X(l, k)), d, m, ex));
        VST(y + 16 + k * VN, QC_MAD(VCVT(VU8X(h, k)), d, m, ex));
    }
}
/* bit j of qh (j = 0..31) -> 0x10 in byte j */
QC_TGT static QC_INL __m256i QC_F(bits16)(uint32_t qh) {
    const __m256i idx = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), idx), sel);
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, sel), _mm256_set1_epi8(0x10));
}
/* the 32 nibbles of a 32-value block (low nibbles are values 0..15) as bytes in value order */
QC_TGT static QC_INL __m256i QC_F(nib32)(const uint8_t *q) {
    const __m128i v = _mm_loadu_si128((const __m128i *)q), m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}
QC_TGT static QC_INL __m256i QC_F(lo4)(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
QC_TGT static QC_INL __m256i QC_F(hi4)(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }

/* Block decoders: one block -> y; EX: exactly blocks.h's values (else asymmetric types use an FMA) */
QC_TGT static QC_INL void QC_F(bq8_0)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j;
    (void)ex;
    const VF d = VSET1(H2F((b)));
    for (int k = 0; k < 32 / VN; k++) VST(y + k * VN, VMUL(VCVT(VI8(b + 2 + k * VN)), d));
}
QC_TGT static QC_INL void QC_F(bq4_0)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j;
    (void)ex;  /* fma(q, d, -8d) rounds the exact (q - 8) * d once: the same value as (q - 8) * d */
    const float df = H2F((b));
    const VF d = VSET1(df), m = VSET1(-8.0f * df);
    for (int k = 0; k < 16 / VN; k++) {
        const VI i = VU8(b + 2 + k * VN);
        VST(y + k * VN, VFMA(VCVT(VIAND(i, 15)), d, m));
        VST(y + 16 + k * VN, VFMA(VCVT(VISRL(i, 4)), d, m));
    }
}
QC_TGT static QC_INL void QC_F(bq4_1)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j;
    const VF d = VSET1(H2F((b))), m = VSET1(H2F((b + 2)));
    for (int k = 0; k < 16 / VN; k++) {
        const VI i = VU8(b + 4 + k * VN);
        VST(y + k * VN, QC_MAD(VCVT(VIAND(i, 15)), d, m, ex));
        VST(y + 16 + k * VN, QC_MAD(VCVT(VISRL(i, 4)), d, m, ex));
    }
}
QC_TGT static QC_INL void QC_F(bq5_0)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
#if QC_DOT_PASS == 16  /* fifth bits through mask registers; fma(q, d, -16d) = (q - 16) * d exactly */
    const float df = H2F((b));
    const VF d = VSET1(df), m = VSET1(-16.0f * df);
    const uint32_t qh = rd32(b + 2);
    const VI i = VU8(b + 6), h = _mm512_set1_epi32(16);
    VST(y, VFMA(VCVT(_mm512_mask_or_epi32(VIAND(i, 15), (__mmask16)qh, VIAND(i, 15), h)), d, m));
    VST(y + 16, VFMA(VCVT(_mm512_mask_or_epi32(VISRL(i, 4), (__mmask16)(qh >> 16), VISRL(i, 4), h)), d, m));
#else
    const VF d = VSET1(H2F((b)));
    const __m256i q = _mm256_or_si256(QC_F(nib32)(b + 6), QC_F(bits16)(rd32(b + 2)));
    QC_F(st_s32)(y, _mm256_sub_epi8(q, _mm256_set1_epi8(16)), d, d);
#endif
}
QC_TGT static QC_INL void QC_F(bq5_1)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j;
#if QC_DOT_PASS == 16
    const VF d = VSET1(H2F((b))), m = VSET1(H2F((b + 2)));
    const uint32_t qh = rd32(b + 4);
    const VI i = VU8(b + 8), h = _mm512_set1_epi32(16);
    VST(y, QC_MAD(VCVT(_mm512_mask_or_epi32(VIAND(i, 15), (__mmask16)qh, VIAND(i, 15), h)), d, m, ex));
    VST(y + 16, QC_MAD(VCVT(_mm512_mask_or_epi32(VISRL(i, 4), (__mmask16)(qh >> 16), VISRL(i, 4), h)), d, m, ex));
#else
    const __m256i q = _mm256_or_si256(QC_F(nib32)(b + 8), QC_F(bits16)(rd32(b + 4)));
    QC_F(st_u32)(y, q, VSET1(H2F((b))), VSET1(H2F((b + 2))), ex);
#endif
}
/* K-quants decode in parts of 64 values (part j of the super-block) */
QC_TGT static QC_INL void QC_F(bq4_k)(const uint8_t *b, int j, float *y, const int ex) {
    const float d = H2F((b)), dmin = H2F((b + 2));
    const uint8_t *sc = b + 4, *q = b + 16 + 32 * j;
    uint8_t s, m;
    scale_min_k4(2 * j, sc, &s, &m); const VF d1 = VSET1(d * s), m1 = VSET1(-(dmin * m));
    scale_min_k4(2 * j + 1, sc, &s, &m); const VF d2 = VSET1(d * s), m2 = VSET1(-(dmin * m));
    for (int k = 0; k < 32 / VN; k++) {
        const VI i = VU8(q + k * VN);
        VST(y + k * VN, QC_MAD(VCVT(VIAND(i, 15)), d1, m1, ex));
        VST(y + 32 + k * VN, QC_MAD(VCVT(VISRL(i, 4)), d2, m2, ex));
    }
}
QC_TGT static QC_INL void QC_F(bq5_k)(const uint8_t *b, int j, float *y, const int ex) {
    const float d = H2F((b)), dmin = H2F((b + 2));
    const uint8_t *sc = b + 4;
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16)), h16 = _mm256_set1_epi8(16);
    const __m256i v = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * j));
    const __m256i u1 = _mm256_set1_epi8((char)(1 << (2 * j))), u2 = _mm256_set1_epi8((char)(1 << (2 * j + 1)));
    const __m256i h1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, u1), u1), h16);
    const __m256i h2 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, u2), u2), h16);
    uint8_t s, m;
    scale_min_k4(2 * j, sc, &s, &m);
    QC_F(st_u32)(y, _mm256_or_si256(QC_F(lo4)(v), h1), VSET1(d * s), VSET1(-(dmin * m)), ex);
    scale_min_k4(2 * j + 1, sc, &s, &m);
    QC_F(st_u32)(y + 32, _mm256_or_si256(QC_F(hi4)(v), h2), VSET1(d * s), VSET1(-(dmin * m)), ex);
}
/* part j: half n = j / 2 of the super-block; j even: values 0..63 of it (low nibbles, qh bits 0-3), odd:
 * values 64..127 (high nibbles, qh bits 4-7) */
QC_TGT static QC_INL void QC_F(bq6_k)(const uint8_t *b, int j, float *y, const int ex) {
    (void)ex;
    const int n = j >> 1;
    const uint8_t *ql = b + 64 * n;
    const int8_t *sc = (const int8_t *)(b + 192) + 8 * n + 4 * (j & 1);
    const float d = H2F((b + 208));
    const __m256i m4 = _mm256_set1_epi8(0x0F), m32 = _mm256_set1_epi8(32);
    const __m256i a = _mm256_loadu_si256((const __m256i *)ql), c = _mm256_loadu_si256((const __m256i *)(ql + 32));
    const __m256i h = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n));
    __m256i q1, q2;
    if ((j & 1) == 0) {
        q1 = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(0x03)), 4));
        q2 = _mm256_or_si256(_mm256_and_si256(c, m4), _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(0x0C)), 2));
    } else {
        q1 = _mm256_or_si256(QC_F(hi4)(a), _mm256_and_si256(h, _mm256_set1_epi8(0x30)));
        q2 = _mm256_or_si256(QC_F(hi4)(c), _mm256_srli_epi16(_mm256_and_si256(h, _mm256_set1_epi8((char)0xC0)), 2));
    }
    QC_F(st_s32)(y, _mm256_sub_epi8(q1, m32), VSET1(d * sc[0]), VSET1(d * sc[1]));
    QC_F(st_s32)(y + 32, _mm256_sub_epi8(q2, m32), VSET1(d * sc[2]), VSET1(d * sc[3]));
}
/* part j of a Q2_K super-block: half n = j / 2, 2-bit fields 2 (j % 2) and 2 (j % 2) + 1, 16 values per scale */
QC_TGT static QC_INL void QC_F(bq2_k)(const uint8_t *b, int j, float *y, const int ex) {
    const float d = H2F((b + 80)), dmin = H2F((b + 82));
    const int n = j >> 1;
    for (int ii = 0; ii < 2; ii++) {
        const int i = 2 * (j & 1) + ii;
        for (int hh = 0; hh < 2; hh++) {
            const uint8_t s = b[8 * n + 2 * i + hh];
            const VF dl = VSET1(d * (s & 0xF)), ml = VSET1(-(dmin * (s >> 4)));
            for (int k = 0; k < 16 / VN; k++) {
                const VI q = VIAND(VISRLV(VU8(b + 16 + 32 * n + 16 * hh + k * VN), 2 * i), 3);
                VST(y + 32 * ii + 16 * hh + k * VN, QC_MAD(VCVT(q), dl, ml, ex));
            }
        }
    }
}
/* part j of a Q3_K super-block: half n = j / 2, 2-bit fields 2 (j % 2) and 2 (j % 2) + 1 with their high bits */
QC_TGT static QC_INL void QC_F(bq3_k)(const uint8_t *b, int j, float *y, const int ex) {
    (void)ex;
    const uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
    uint32_t aux[4];
    memcpy(aux, b + 96, 12);
    const uint32_t tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    const int8_t *scales = (const int8_t *)aux;
    const float d_all = H2F((b + 108));
    const int n = j >> 1;
    for (int ii = 0; ii < 2; ii++) {
        const int sj = 2 * (j & 1) + ii;
        for (int hh = 0; hh < 2; hh++) {
            const VF dl = VSET1(d_all * (scales[8 * n + 2 * sj + hh] - 32));
            for (int k = 0; k < 16 / VN; k++) {
                const VI q = VIAND(VISRLV(VU8(b + 32 + 32 * n + 16 * hh + k * VN), 2 * sj), 3);
                const VI h = VIAND(VISRLV(VU8(b + 16 * hh + k * VN), 4 * n + sj), 1);  /* 1: no -4 */
                VST(y + 32 * ii + 16 * hh + k * VN, VMUL(VCVT(VISUB(VIADD(q, VISLL(h, 2)), 4)), dl));
            }
        }
    }
}

/* Row kernels of one block type of BV values in BB bytes, decoded in NP parts of BV / NP values. Products:
 * U parts at a time (enough vectors for the tile's accumulator chains) are dequantised into buf and
 * multiplied into the accumulators of the tile's T rows of x; with constant sizes the compiler keeps those
 * values in registers. NAME_deq writes rows of values. */
#define QC_BLOCK_ROWS(NAME, BV, BB, NP, DEQ)                                                                \
    QC_TGT static QC_INL void QC_F(NAME##_k)(const uint8_t *W, int64_t rb, int64_t cols, int64_t r0,       \
                                             int64_t r1, int64_t ldy, const float *x, float *y, const int T) { \
        enum { PV = BV / NP };                                                                              \
        const int U = NP > 1 || BV >= VN * QC_NA(T) ? 1 : VN * QC_NA(T) / BV;                               \
        QC_ALIGN float buf[PV >= 64 ? PV : 64];                                                             \
        for (int64_t r = r0; r < r1; r++) {                                                                 \
            QC_ACC_DECL                                                                                     \
            const uint8_t *p = W + r * rb;                                                                  \
            prefetch_row(W, rb, r, r1);                                                                     \
            int64_t c = 0;                                                                                  \
            for (; c + U * BV <= cols; c += U * BV, p += U * BB)                                            \
                for (int j = 0; j < NP; j++) {                                                              \
                    for (int u = 0; u < U; u++) QC_F(DEQ)(p + u * BB, j, buf + u * PV, 0);                  \
                    QC_DOT_BUF(buf, U * PV, x + c + j * PV, cols);                                          \
                }                                                                                           \
            for (; c < cols; c += BV, p += BB)                                                              \
                for (int j = 0; j < NP; j++) {                                                              \
                    QC_F(DEQ)(p, j, buf, 0);                                                                \
                    QC_DOT_BUF(buf, PV, x + c + j * PV, cols);                                              \
                }                                                                                           \
            QC_ACC_STORE(y + (r - r0), ldy)                                                                 \
        }                                                                                                   \
    }                                                                                                       \
    QC_TGT static void QC_F(NAME)(const uint8_t *W, int64_t rb, const float *x, int64_t T, int64_t cols,  \
                                  float *y, int64_t ldy, int64_t r0, int64_t r1) {                         \
        QC_TILED(QC_F(NAME##_k), T, x, cols, y, ldy, W, rb, cols, r0, r1, ldy)                              \
    }                                                                                                       \
    QC_TGT static void QC_F(NAME##_deq)(const uint8_t *W, int64_t rb, int64_t cols, int64_t r0, int64_t r1, \
                                        float *out) {                                                       \
        for (int64_t r = r0; r < r1; r++) {                                                                 \
            const uint8_t *p = W + r * rb; float *o = out + (r - r0) * cols;                                \
            for (int64_t c = 0; c < cols; c += BV, p += BB)                                                 \
                for (int j = 0; j < NP; j++) QC_F(DEQ)(p, j, o + c + j * (BV / NP), 1);                            \
        }                                                                                                   \
    }
QC_BLOCK_ROWS(rows_q8_0, QC_Q8_0_BLOCK, QC_Q8_0_BYTES, 1, bq8_0)
QC_BLOCK_ROWS(rows_q4_0, QC_Q4_0_BLOCK, QC_Q4_0_BYTES, 1, bq4_0)
QC_BLOCK_ROWS(rows_q4_1, QC_Q4_1_BLOCK, QC_Q4_1_BYTES, 1, bq4_1)
QC_BLOCK_ROWS(rows_q5_0, QC_Q5_0_BLOCK, QC_Q5_0_BYTES, 1, bq5_0)
QC_BLOCK_ROWS(rows_q5_1, QC_Q5_1_BLOCK, QC_Q5_1_BYTES, 1, bq5_1)
QC_BLOCK_ROWS(rows_q2_k, QC_Q2_K_BLOCK, QC_Q2_K_BYTES, 4, bq2_k)
QC_BLOCK_ROWS(rows_q3_k, QC_Q3_K_BLOCK, QC_Q3_K_BYTES, 4, bq3_k)
QC_BLOCK_ROWS(rows_q4_k, QC_Q4_K_BLOCK, QC_Q4_K_BYTES, 4, bq4_k)
QC_BLOCK_ROWS(rows_q5_k, QC_Q5_K_BLOCK, QC_Q5_K_BYTES, 4, bq5_k)
QC_BLOCK_ROWS(rows_q6_k, QC_Q6_K_BLOCK, QC_Q6_K_BYTES, 4, bq6_k)
#include "_dot_iq_simd.h"

/* ---- float rows: converted in registers, no buffer ---- */
QC_TGT static QC_INL VF QC_F(ldv)(int type, const uint8_t *p) {
    return type == QC_F32 ? VLD((const float *)p) : type == QC_F16 ? VF16(p) : VBF16(p);
}
QC_TGT static QC_INL void QC_F(float_k)(int type, const uint8_t *W, int64_t rb, int64_t cols, int64_t r0,
                                        int64_t r1, int64_t ldy, const float *x, float *y, const int T) {
    const int es = type == QC_F32 ? 4 : 2, na = QC_NA(T);
    for (int64_t r = r0; r < r1; r++) {
        QC_ACC_DECL
        const uint8_t *p = W + r * rb;  /* no software prefetch for plain streams (see prefetch_row) */
        int64_t i = 0;
        for (; i + VN * na <= cols; i += VN * na) {
            { const VF w0 = QC_F(ldv)(type, p + i * es); QC_FMAV(0, w0, x, cols, i) }
            if (na > 1) { const VF w1 = QC_F(ldv)(type, p + (i + VN) * es); QC_FMAV(1, w1, x, cols, i + VN) }
            if (na > 2) {
                const VF w2 = QC_F(ldv)(type, p + (i + 2 * VN) * es); QC_FMAV(2, w2, x, cols, i + 2 * VN)
                const VF w3 = QC_F(ldv)(type, p + (i + 3 * VN) * es); QC_FMAV(3, w3, x, cols, i + 3 * VN)
            }
        }
        for (; i + VN <= cols; i += VN) { const VF w0 = QC_F(ldv)(type, p + i * es); QC_FMAV(0, w0, x, cols, i) }
        for (; i < cols; i++) {
            const float w = ld_float(type, p + i * es);
            QC_TL1(0, w, x, cols, i) QC_TL1(1, w, x, cols, i) QC_TL1(2, w, x, cols, i) QC_TL1(3, w, x, cols, i)
            QC_TL1(4, w, x, cols, i) QC_TL1(5, w, x, cols, i) QC_TL1(6, w, x, cols, i) QC_TL1(7, w, x, cols, i)
        }
        QC_ACC_STORE(y + (r - r0), ldy)
    }
}
#define QC_FLOAT_ROWS(NAME, TYPE)                                                                           \
    QC_TGT static QC_INL void QC_F(NAME##_k)(const uint8_t *W, int64_t rb, int64_t cols, int64_t r0,       \
                                             int64_t r1, int64_t ldy, const float *x, float *y, const int T) { \
        QC_F(float_k)(TYPE, W, rb, cols, r0, r1, ldy, x, y, T);                                             \
    }                                                                                                       \
    QC_TGT static void QC_F(NAME)(const uint8_t *W, int64_t rb, const float *x, int64_t T, int64_t cols,  \
                                  float *y, int64_t ldy, int64_t r0, int64_t r1) {                         \
        QC_TILED(QC_F(NAME##_k), T, x, cols, y, ldy, W, rb, cols, r0, r1, ldy)                              \
    }
QC_FLOAT_ROWS(rows_f32, QC_F32)
QC_FLOAT_ROWS(rows_f16, QC_F16)
QC_FLOAT_ROWS(rows_bf16, QC_BF16)

/* this width's product kernel of a type, and its row dequantiser (NULL for the float types) */
static dot_fn QC_F(pick)(int type, deq_fn *deq) {
    switch (type) {
        case QC_F32: *deq = NULL; return QC_F(rows_f32);
        case QC_F16: *deq = NULL; return QC_F(rows_f16);
        case QC_BF16: *deq = NULL; return QC_F(rows_bf16);
#define QC_PICK(T, t) case QC_##T: *deq = QC_F(rows_##t##_deq); return QC_F(rows_##t);
        QC_DOT_BLOCK_TYPES(QC_PICK)
#undef QC_PICK
        default: return QC_F(pick_iq)(type, deq);
    }
}
#undef QC_BLOCK_ROWS
#undef QC_FLOAT_ROWS

