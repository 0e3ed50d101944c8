/* The i-quant, ternary and MXFP4 kernels of _dot.c for one vector width: included by _dot_simd.h once per width
 * (no include guard), after its QC_BLOCK_ROWS. A block is decoded whole into the row kernel's L1 buffer with
 * 8-lane AVX2 operations (both widths' targets have AVX2), then multiplied at the pass's width.
 *
 * Each decoder gives exactly the values of formats/ggml/iq_blocks.h (the same float operations in the same order;
 * a sign is applied as a flip of the sign bit, as -v is), so qc_dequant_ggml equals formats.ggml.codec.to_f32
 * bit for bit (tests/test_iq_decode.py). The grids are _dot.c's registered copies (iq_grids, iq_ksigns). */

/* sign bit set in lane j where bit j of s is set (bit j shifted up to bit 31) */
QC_TGT static QC_INL __m256 QC_F(sgn8)(unsigned s) {
    const __m256i up = _mm256_sllv_epi32(_mm256_set1_epi32((int)s), _mm256_set_epi32(24, 25, 26, 27, 28, 29, 30, 31));
    return _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(INT32_MIN)));
}
/* 8 signed bytes (low half of x) as floats */
QC_TGT static QC_INL __m256 QC_F(i8f)(__m128i x) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x)); }
/* 16 signed bytes x, times d, to y (one 512-bit conversion in the AVX-512 pass) */
QC_TGT static QC_INL void QC_F(st_i8x16)(float *y, __m128i x, float d) {
#if QC_DOT_PASS == 16
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x))));
#else
    const __m256 dv = _mm256_set1_ps(d);
    _mm256_storeu_ps(y, _mm256_mul_ps(dv, QC_F(i8f)(x)));
    _mm256_storeu_ps(y + 8, _mm256_mul_ps(dv, QC_F(i8f)(_mm_srli_si128(x, 8))));
#endif
}
/* 16 values at y from two 8-lane halves, in one store of the pass's width: a later load of the same width then
 * reads what one store wrote (the store-to-load forwarding a 512-bit load across two 256-bit stores misses) */
QC_TGT static QC_INL void QC_F(st16)(float *y, __m256 a, __m256 b) {
#if QC_DOT_PASS == 16
    _mm512_storeu_ps(y, _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)),
                                                            _mm256_castps_pd(b), 1)));
#else
    _mm256_storeu_ps(y, a);
    _mm256_storeu_ps(y + 8, b);
#endif
}
/* db * grid values g, negated where bit j of s is set */
QC_TGT static QC_INL __m256 QC_F(sgv)(__m256 db, __m128i g, unsigned s) {
    return _mm256_xor_ps(_mm256_mul_ps(db, QC_F(i8f)(g)), QC_F(sgn8)(s));
}
QC_TGT static QC_INL __m128i QC_F(pt8)(const int8_t *g) { return _mm_loadl_epi64((const __m128i *)g); }
QC_TGT static QC_INL __m128i QC_F(pt44)(const int8_t *grid, int a, int c) {  /* two width-4 points */
    return _mm_unpacklo_epi32(_mm_cvtsi32_si128((int)rd32((const uint8_t *)grid + 4 * a)),
                              _mm_cvtsi32_si128((int)rd32((const uint8_t *)grid + 4 * c)));
}
/* 16 values: db * grid values g0 | g1, negated where bit j of s0 | s1 is set (one 512-bit pass in AVX-512) */
QC_TGT static QC_INL void QC_F(sg16)(float *y, __m256 db, __m128i g0, unsigned s0, __m128i g1, unsigned s1) {
#if QC_DOT_PASS == 16
    const __m512 v = _mm512_mul_ps(_mm512_broadcastss_ps(_mm256_castps256_ps128(db)),
                                   _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpacklo_epi64(g0, g1))));
    const __m512i u = _mm512_castps_si512(v);
    _mm512_storeu_ps(y, _mm512_castsi512_ps(_mm512_mask_xor_epi32(u, (__mmask16)(s0 | s1 << 8), u,
                                                                  _mm512_set1_epi32(INT32_MIN))));
#else
    QC_F(st16)(y, QC_F(sgv)(db, g0, s0), QC_F(sgv)(db, g1, s1));
#endif
}
/* dl * (grid values g + delta), delta = +-QC_IQ1_DELTA (0x3E000000) with sign bit `neg` (0 or 1u << 31): no branch
 * on a sign the data sets at random */
QC_TGT static QC_INL __m256 QC_F(shv)(__m256 dl, __m128i g, uint32_t neg) {
    const __m256 delta = _mm256_castsi256_ps(_mm256_set1_epi32((int)(0x3E000000u | neg)));
    return _mm256_mul_ps(dl, _mm256_add_ps(QC_F(i8f)(g), delta));
}

/* 16 values: dl * (grid values g0 | g1 + delta), the deltas' signs n0, n1 (as shv) */
QC_TGT static QC_INL void QC_F(sh16)(float *y, __m256 dl, __m128i g0, uint32_t n0, __m128i g1, uint32_t n1) {
#if QC_DOT_PASS == 16
    const __m512i dd = _mm512_inserti64x4(_mm512_set1_epi32((int)(0x3E000000u | n0)),
                                          _mm256_set1_epi32((int)(0x3E000000u | n1)), 1);
    const __m512 g = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpacklo_epi64(g0, g1)));
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_broadcastss_ps(_mm256_castps256_ps128(dl)),
                                      _mm512_add_ps(g, _mm512_castsi512_ps(dd))));
#else
    QC_F(st16)(y, QC_F(shv)(dl, g0, n0), QC_F(shv)(dl, g1, n1));
#endif
}
QC_TGT static QC_INL void QC_F(bi2xxs)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
    const float d = H2F(b);
    const int8_t *grid = iq_grids[0];
    for (int ib = 0; ib < 8; ib++, y += 32) {
        const uint8_t *q = b + 2 + 8 * ib;
        const uint32_t aux = rd32(q + 4);
        const __m256 db = _mm256_set1_ps(iqb_half_scale(d, aux >> 28, 0.25f));
        for (int l = 0; l < 4; l += 2)
            QC_F(sg16)(y + 8 * l, db, QC_F(pt8)(grid + 8 * q[l]), iq_ksigns[(aux >> (7 * l)) & 127],
                       QC_F(pt8)(grid + 8 * q[l + 1]), iq_ksigns[(aux >> (7 * l + 7)) & 127]);
    }
}
QC_TGT static QC_INL void QC_F(bi2xs)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
    const float d = H2F(b);
    const int8_t *grid = iq_grids[1];
    for (int i = 0; i < 32; i += 2, y += 16) {  /* entries i, i + 1 share a scale */
        const __m256 db = _mm256_set1_ps(iqb_half_scale(d, (b[66 + i / 4] >> (4 * ((i / 2) & 1))) & 0xF, 0.25f));
        const uint16_t q0 = rd16(b + 2 + 2 * i), q1 = rd16(b + 4 + 2 * i);
        QC_F(sg16)(y, db, QC_F(pt8)(grid + 8 * (q0 & 511)), iq_ksigns[q0 >> 9],
                   QC_F(pt8)(grid + 8 * (q1 & 511)), iq_ksigns[q1 >> 9]);
    }
}
QC_TGT static QC_INL void QC_F(bi2s)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
    const float d = H2F(b);
    const int8_t *grid = iq_grids[2];
    const uint8_t *qs = b + 2, *signs = b + 34, *qh = b + 66, *sc = b + 74;
    for (int i = 0; i < 32; i += 2, y += 16) {
        const unsigned h = qh[i / 4] >> (2 * (i & 3));
        const __m256 db = _mm256_set1_ps(iqb_half_scale(d, (sc[i / 4] >> (4 * ((i / 2) & 1))) & 0xF, 0.25f));
        QC_F(sg16)(y, db, QC_F(pt8)(grid + 8 * (qs[i] | ((h & 3) << 8))), signs[i],
                   QC_F(pt8)(grid + 8 * (qs[i + 1] | (((h >> 2) & 3) << 8))), signs[i + 1]);
    }
}
QC_TGT static QC_INL void QC_F(bi3xxs)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
    const float d = H2F(b);
    const int8_t *grid = iq_grids[3];
    for (int ib = 0; ib < 8; ib++, y += 32) {
        const uint8_t *q = b + 2 + 8 * ib;
        const uint32_t aux = rd32(b + 66 + 4 * ib);
        const __m256 db = _mm256_set1_ps(iqb_half_scale(d, aux >> 28, 0.5f));
        for (int l = 0; l < 4; l += 2) {
            const unsigned s0 = iq_ksigns[(aux >> (7 * l)) & 127], s1 = iq_ksigns[(aux >> (7 * l + 7)) & 127];
            QC_F(sg16)(y + 8 * l, db, QC_F(pt44)(grid, q[2 * l], q[2 * l + 1]), s0,
                       QC_F(pt44)(grid, q[2 * l + 2], q[2 * l + 3]), s1);
        }
    }
}
QC_TGT static QC_INL void QC_F(bi3s)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
    const float d = H2F(b);
    const int8_t *grid = iq_grids[4];
    const uint8_t *qs = b + 2, *qh = b + 66, *signs = b + 74, *sc = b + 106;
    for (int ib = 0; ib < 8; ib++) {  /* 32 values: grid entries 8 ib .. 8 ib + 7, high bits qh[ib] */
        const __m256 db = _mm256_set1_ps(d * (float)(1 + 2 * ((sc[ib / 2] >> (4 * (ib & 1))) & 0xF)));
        const unsigned h = qh[ib];
        const uint8_t *q = qs + 8 * ib;
        for (int k = 0; k < 8; k += 4, y += 16) {
#define QC_E3(n) (q[k + (n)] | (((h >> (k + (n))) & 1) << 8))  /* grid entry 8 ib + k + n */
            const __m128i g0 = QC_F(pt44)(grid, QC_E3(0), QC_E3(1)), g1 = QC_F(pt44)(grid, QC_E3(2), QC_E3(3));
#undef QC_E3
            QC_F(sg16)(y, db, g0, signs[4 * ib + k / 2], g1, signs[4 * ib + k / 2 + 1]);
        }
    }
}
QC_TGT static QC_INL void QC_F(bi1s)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
    const float d = H2F(b);
    const int8_t *grid = iq_grids[5];
    const uint8_t *qs = b + 2;
    for (int ib = 0; ib < 8; ib++) {
        const uint16_t h = rd16(b + 34 + 2 * ib);
        const __m256 dl = _mm256_set1_ps(d * (float)(2 * ((h >> 12) & 7) + 1));
        const uint32_t neg = (uint32_t)(h & 0x8000) << 16;
        for (int l = 0; l < 4; l += 2, y += 16) {
            const int a = qs[4 * ib + l] | (((h >> (3 * l)) & 7) << 8);
            const int c = qs[4 * ib + l + 1] | (((h >> (3 * l + 3)) & 7) << 8);
            QC_F(sh16)(y, dl, QC_F(pt8)(grid + 8 * a), neg, QC_F(pt8)(grid + 8 * c), neg);
        }
    }
}
QC_TGT static QC_INL void QC_F(bi1m)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
    const float d = iqb_iq1_m_d(b);
    const int8_t *grid = iq_grids[5];
    for (int i = 0; i < 32; i += 2, y += 16) {  /* entries i, i + 1 share 3-bit scale i / 2 and byte qh[i / 2] */
        const int s = i / 2;
        const __m256 dl = _mm256_set1_ps(d * (float)(2 * ((rd16(b + 48 + 2 * (s / 4)) >> (3 * (s & 3))) & 7) + 1));
        const uint32_t h = b[32 + s];
        QC_F(sh16)(y, dl, QC_F(pt8)(grid + 8 * (b[i] | ((h & 7) << 8))), (h & 8) << 28,
                   QC_F(pt8)(grid + 8 * (b[i + 1] | (((h >> 4) & 7) << 8))), (h & 0x80) << 24);
    }
}
/* 32 values from 16 bytes of nibbles through a 16-entry table: y[k] = d * T[lo nibble k], y[16 + k] = d * T[hi] */
QC_TGT static QC_INL void QC_F(nib_lut)(float *y, const uint8_t *q, float d, __m128i table) {
    const __m128i v = _mm_loadu_si128((const __m128i *)q), m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(v, m));
    const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(v, 4), m));
    QC_F(st_i8x16)(y, lo, d);
    QC_F(st_i8x16)(y + 16, hi, d);
}
QC_TGT static QC_INL void QC_F(bi4nl)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
    QC_F(nib_lut)(y, b + 2, H2F(b), _mm_loadu_si128((const __m128i *)QC_KV_IQ4));
}
QC_TGT static QC_INL void QC_F(bi4xs)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
    const float d = H2F(b);
    const uint16_t sh = rd16(b + 2);
    const __m128i table = _mm_loadu_si128((const __m128i *)QC_KV_IQ4);
    for (int ib = 0; ib < 8; ib++, y += 32) {
        const int ls = ((b[4 + ib / 2] >> (4 * (ib & 1))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4);
        QC_F(nib_lut)(y, b + 8 + 16 * ib, d * (float)(ls - 32), table);
    }
}
QC_TGT static QC_INL void QC_F(bmxfp4)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
    QC_F(nib_lut)(y, b + 1, iqb_e8m0_half(b[0]), _mm_loadu_si128((const __m128i *)QC_KV_MXFP4));
}
QC_TGT static QC_INL void QC_F(btq2)(const uint8_t *b, int j, float *y, const int ex) {
    (void)j; (void)ex;
    const float d = H2F(b + 64);
    for (int h = 0; h < 2; h++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b + 32 * h));
        for (int l = 0; l < 4; l++, y += 32) {
            const __m256i q = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 2 * l), _mm256_set1_epi8(3)),
                                              _mm256_set1_epi8(1));
            const __m128i a = _mm256_castsi256_si128(q), c = _mm256_extracti128_si256(q, 1);
            QC_F(st_i8x16)(y, a, d);
            QC_F(st_i8x16)(y + 16, c, d);
        }
    }
}
QC_TGT static QC_INL void QC_F(btq1)(const uint8_t *b, int j, float *y, const int ex) {  /* base-3 digits: scalar */
    (void)j; (void)ex;
    iqb_tq1_0(b, y);
}

#define QC_DOT_IQ_TYPES(X) X(IQ2_XXS, bi2xxs) X(IQ2_XS, bi2xs) X(IQ2_S, bi2s) X(IQ3_XXS, bi3xxs) X(IQ3_S, bi3s) \
    X(IQ1_S, bi1s) X(IQ1_M, bi1m) X(IQ4_NL, bi4nl) X(IQ4_XS, bi4xs) X(MXFP4, bmxfp4) X(TQ2_0, btq2) X(TQ1_0, btq1)
#define QC_IQ_ROWS(T, dec) QC_BLOCK_ROWS(rows_##dec, QC_##T##_BLOCK, QC_##T##_BYTES, 1, dec)
QC_DOT_IQ_TYPES(QC_IQ_ROWS)
#undef QC_IQ_ROWS

/* this width's product kernel and row dequantiser of a type here; NULL for other types */
static dot_fn QC_F(pick_iq)(int type, deq_fn *deq) {
    switch (type) {
#define QC_PICK_IQ(T, dec) case QC_##T: *deq = QC_F(rows_##dec##_deq); return QC_F(rows_##dec);
        QC_DOT_IQ_TYPES(QC_PICK_IQ)
#undef QC_PICK_IQ
        default: *deq = NULL; return NULL;
    }
}
#undef QC_DOT_IQ_TYPES
