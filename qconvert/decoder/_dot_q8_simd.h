/* The SIMD kernels of _dot_q8.c, included there once per instruction set with QC_Q8_PASS set (1: AVX2, 2:
 * AVX2 with AVX-512 VL / BW / VNNI on 256-bit vectors), names suffixed by Q8F. The same 8 integer lanes per
 * block as its portable code (lane l: the products at positions 4l .. 4l + 3 of every 32 values), made with
 * _mm256_maddubs_epi16 then _mm256_madd_epi16 (pass 2: _mm256_dpbusd_epi32 / _mm256_dpwssd_epi32) on |w| against
 * sign(w) * a or on unsigned codes, then the same fused float32 steps, so every row equals the portable result
 * and llama.cpp's bit for bit (tests/test_q8.py). No product can saturate: maddubs only sees weight codes of
 * magnitude at most 128 against activation codes of at most 127; dpbusd has no intermediate rounding. */
#undef Q8F
#undef QC_Q8T
#undef Q8_DPU
#undef Q8_DPW
#define Q8F_(n, p) n##_p##p
#define Q8F_X(n, p) Q8F_(n, p)
#define Q8F(n) Q8F_X(n, QC_Q8_PASS)
#if QC_Q8_PASS == 1
#define QC_Q8T __attribute__((target("avx2,fma,f16c")))
/* acc + the 8 int32 sums of 4 products u * a (u unsigned, a signed bytes), and acc + p16 . s16 pairs */
#define Q8_DPU(acc, u, a) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (a)), _mm256_set1_epi16(1)))
#define Q8_DPW(acc, p, s) _mm256_add_epi32((acc), _mm256_madd_epi16((p), (s)))
#else
#define QC_Q8T __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define Q8_DPU(acc, u, a) _mm256_dpbusd_epi32((acc), (u), (a))
#define Q8_DPW(acc, p, s) _mm256_dpwssd_epi32((acc), (p), (s))
#endif

#ifndef QC_Q8_SIGNS
#define QC_Q8_SIGNS
static uint64_t q8_signs64[128];  /* gguf-py's ksigns as 8 bytes of +1 / -1 */
static int q8_have_signs;
static void q8_make_signs(void) {
    const uint8_t *ks = qc_iq_signs_of();
    for (int i = 0; i < 128; i++) {
        uint64_t v = 0;
        for (int j = 0; j < 8; j++) v |= (uint64_t)((ks[i] >> j) & 1 ? 0xFF : 0x01) << (8 * j);
        q8_signs64[i] = v;
    }
    __atomic_store_n(&q8_have_signs, 1, __ATOMIC_RELEASE);
}
#endif

QC_Q8T static QC_INL __m256i Q8F(q8_nib32)(const uint8_t *q) {  /* low nibbles are values 0..15 */
    const __m128i v = _mm_loadu_si128((const __m128i *)q), m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}
QC_Q8T static QC_INL __m256i Q8F(q8_hbit)(uint32_t qh) {  /* bit j of qh -> 0x10 in byte j */
    const __m256i idx = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), idx), sel);
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, sel), _mm256_set1_epi8(0x10));
}
/* 8 int32 partial sums of w . a for 32 signed weight codes (|w| as unsigned, its sign moved onto a), each
 * pair of products times scale16 */
QC_Q8T static QC_INL __m256i Q8F(q8_dot_s8)(__m256i w, __m256i a, __m256i scale16) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)), scale16);
}
/* acc + the same for unsigned weight codes w */
QC_Q8T static QC_INL __m256i Q8F(q8_dot_u8)(__m256i acc, __m256i w, const int8_t *a, __m256i scale16) {
    return Q8_DPW(acc, _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)a)), scale16);
}
QC_Q8T static QC_INL __m256i Q8F(q8_iq4)(const uint8_t *q) {
    const __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)QC_KV_IQ4));
    return _mm256_shuffle_epi8(tbl, Q8F(q8_nib32)(q));
}

/* llama.cpp's sum of 8 float lanes (hsum_float_8): (v0 + v4) + (v2 + v6), then + ((v1 + v5) + (v3 + v7)) */
QC_Q8T static QC_INL float Q8F(q8_hsum8)(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}
/* a Q8_0-activation block's 32 codes as signed values (codes32's) */
QC_Q8T static QC_INL __m256i Q8F(q8_codes32)(const int type, const uint8_t *b) {
    switch (type) {
        case QC_Q8_0: return _mm256_loadu_si256((const __m256i *)(b + 2));
        case QC_Q4_0: return _mm256_sub_epi8(Q8F(q8_nib32)(b + 2), _mm256_set1_epi8(8));
        case QC_Q5_0:
#if QC_Q8_PASS == 2
        {
            const __m256i n = Q8F(q8_nib32)(b + 6);
            return _mm256_sub_epi8(_mm256_mask_add_epi8(n, (__mmask32)rd32(b + 2), n, _mm256_set1_epi8(16)), _mm256_set1_epi8(16));
        }
#else
            return _mm256_sub_epi8(_mm256_or_si256(Q8F(q8_nib32)(b + 6), Q8F(q8_hbit)(rd32(b + 2))), _mm256_set1_epi8(16));
#endif
        default: return Q8F(q8_iq4)(b + 2);
    }
}
/* Up to QC_Q8_NT tokens share each decoded weight block: token t's activations are a[t] (one qc_act each) and
 * its row result out[t]; every token's float32 steps are those of a single token, so the result of a token
 * does not depend on how many share the call. */
/* row_q8_0_portable's steps */
QC_Q8T static QC_INL void Q8F(row_q8_0_t)(const int type, const int bb, const uint8_t *p, const qc_act *a, const int nt,
                                          float *out) {
    const int64_t nb = a[0].cols / 32;
    __m256 acc0[QC_Q8_NT], acc1[QC_Q8_NT];
    for (int t = 0; t < nt; t++) acc0[t] = acc1[t] = _mm256_setzero_ps();
    const int pairs = type == QC_IQ4_NL;
    const int64_t nv = pairs ? nb & ~(int64_t)1 : nb;
    for (int64_t k = 0; k < nv; k++, p += bb) {
        const __m256i w = Q8F(q8_codes32)(type, p), aw = _mm256_sign_epi8(w, w);
        const float dw = h2f(rd16(p));
        for (int t = 0; t < nt; t++) {
            const __m256i av = _mm256_loadu_si256((const __m256i *)(a[t].q + 32 * k));
            const __m256 l = _mm256_cvtepi32_ps(Q8_DPU(_mm256_setzero_si256(), aw, _mm256_sign_epi8(av, w)));
            const __m256 d = _mm256_set1_ps(dw * a[t].d[k]);
            if (pairs && (k & 1)) acc1[t] = _mm256_fmadd_ps(d, l, acc1[t]);
            else acc0[t] = _mm256_fmadd_ps(d, l, acc0[t]);
        }
    }
    for (int t = 0; t < nt; t++) {
        float sum = Q8F(q8_hsum8)(_mm256_add_ps(acc0[t], acc1[t]));
        if (nv < nb) {
            int8_t w[32];
            codes32(type, p, w);
            int32_t s = 0;
            for (int i = 0; i < 32; i++) s += w[i] * a[t].q[32 * nv + i];
            sum = fmaf(a[t].d[nv] * h2f(rd16(p)), (float)s, sum);
        }
        out[t] = sum;
    }
}
#undef Q8_ROWS
#define Q8_ROWS(F, T)                                                                                   \
    if (nt == 1) Q8F(F)(QC_##T, bb, p, a, 1, out); else Q8F(F)(QC_##T, bb, p, a, QC_Q8_NT, out); \
    break;
/* nt is 1 or QC_Q8_NT */
QC_Q8T static void Q8F(row_q8_0_simd)(int type, int bb, const uint8_t *p, const qc_act *a, int nt, float *out) {
    switch (type) {
        case QC_Q8_0: Q8_ROWS(row_q8_0_t, Q8_0)
        case QC_Q4_0: Q8_ROWS(row_q8_0_t, Q4_0)
        case QC_Q5_0: Q8_ROWS(row_q8_0_t, Q5_0)
        default: Q8_ROWS(row_q8_0_t, IQ4_NL)
    }
}

/* kblock_portable's lanes, mins and scales of super-block k, for each of nt tokens */
QC_Q8T static QC_INL void Q8F(kblock_t)(const int type, const uint8_t *b, const qc_act *a, const int nt, const int64_t k,
                                        __m256i *acc, qc_kblock *o) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_si256();
#define Q8_Q(t) (a[t].q + 256 * k)
#define Q8_BS(t) (a[t].bs + 16 * k)
    if (type == QC_Q4_K || type == QC_Q5_K) {
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16)), h16 = _mm256_set1_epi8(16);
        const uint8_t *qs = b + (type == QC_Q5_K ? 48 : 16);
        for (int jj = 0; jj < 4; jj++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * jj));
            __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            if (type == QC_Q5_K) {
                const __m256i u1 = _mm256_set1_epi8((char)(1 << (2 * jj))), u2 = _mm256_set1_epi8((char)(1 << (2 * jj + 1)));
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, u1), u1), h16));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, u2), u2), h16));
            }
            uint8_t s0, m0, s1, m1;
            scale_min_k4(2 * jj, b + 4, &s0, &m0);
            scale_min_k4(2 * jj + 1, b + 4, &s1, &m1);
            const __m256i v0 = _mm256_set1_epi16(s0), v1 = _mm256_set1_epi16(s1);
            for (int t = 0; t < nt; t++) {
                const int16_t *bs = Q8_BS(t);
                o[t].mins[jj] = m0 * (bs[4 * jj] + bs[4 * jj + 1]) + m1 * (bs[4 * jj + 2] + bs[4 * jj + 3]);
                acc[t] = Q8F(q8_dot_u8)(acc[t], lo, Q8_Q(t) + 64 * jj, v0);
                acc[t] = Q8F(q8_dot_u8)(acc[t], hi, Q8_Q(t) + 64 * jj + 32, v1);
            }
        }
        const float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2));
        for (int t = 0; t < nt; t++) o[t].d = a[t].d[k] * d, o[t].dmin = -a[t].d[k] * dmin;
    } else if (type == QC_Q6_K) {
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int n = 0; n < 2; n++) {
            const uint8_t *ql = b + 64 * n;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)ql), x1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n));
            __m256i c[4];
            c[0] = _mm256_or_si256(_mm256_and_si256(x0, m4), _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(0x03)), 4));
            c[1] = _mm256_or_si256(_mm256_and_si256(x1, m4), _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(0x0C)), 2));
            c[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(x0, 4), m4), _mm256_and_si256(h, _mm256_set1_epi8(0x30)));
            c[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(x1, 4), m4),
                                   _mm256_srli_epi16(_mm256_and_si256(h, _mm256_set1_epi8((char)0xC0)), 2));
            for (int j = 0; j < 4; j++) {
                const __m256i sv = _mm256_set_m128i(_mm_set1_epi16(sc[8 * n + 2 * j + 1]), _mm_set1_epi16(sc[8 * n + 2 * j]));
                for (int t = 0; t < nt; t++) acc[t] = Q8F(q8_dot_u8)(acc[t], c[j], Q8_Q(t) + 128 * n + 32 * j, sv);
            }
        }
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
        const float d = h2f(rd16(b + 208));
        for (int t = 0; t < nt; t++) {
            const __m256i off = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)Q8_BS(t)), sc16);
            acc[t] = _mm256_sub_epi32(acc[t], _mm256_slli_epi32(off, 5));
            o[t].d = a[t].d[k] * d;
        }
    } else if (type == QC_IQ4_XS) {
        const uint16_t sh = rd16(b + 2);
        for (int ib = 0; ib < 8; ib++) {
            const int ls = ((b[4 + ib / 2] >> (4 * (ib & 1))) & 15) | (((sh >> (2 * ib)) & 3) << 4);
            const __m256i w = Q8F(q8_iq4)(b + 8 + 16 * ib), aw = _mm256_sign_epi8(w, w), sv = _mm256_set1_epi16((short)(ls - 32));
            for (int t = 0; t < nt; t++) {
                const __m256i av = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(Q8_Q(t) + 32 * ib)), w);
                acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, av), sv));
            }
        }
        const float d = h2f(rd16(b));
        for (int t = 0; t < nt; t++) o[t].d = d * a[t].d[k];
    } else {
        const int8_t *grid = qc_iq_grid_of(type);
        const int three = type == QC_IQ3_XXS;
        for (int ib = 0; ib < 8; ib++) {
            const uint8_t *qi = b + 2 + 8 * ib;
            const uint32_t aux = rd32(three ? b + 66 + 4 * ib : qi + 4);
            const __m256i w = three
                ? _mm256_setr_epi32((int)rd32((const uint8_t *)grid + 4 * qi[0]), (int)rd32((const uint8_t *)grid + 4 * qi[1]),
                                    (int)rd32((const uint8_t *)grid + 4 * qi[2]), (int)rd32((const uint8_t *)grid + 4 * qi[3]),
                                    (int)rd32((const uint8_t *)grid + 4 * qi[4]), (int)rd32((const uint8_t *)grid + 4 * qi[5]),
                                    (int)rd32((const uint8_t *)grid + 4 * qi[6]), (int)rd32((const uint8_t *)grid + 4 * qi[7]))
                : _mm256_setr_epi64x((long long)rd64((const uint8_t *)grid + 8 * qi[0]), (long long)rd64((const uint8_t *)grid + 8 * qi[1]),
                                     (long long)rd64((const uint8_t *)grid + 8 * qi[2]), (long long)rd64((const uint8_t *)grid + 8 * qi[3]));
            const __m256i sg = _mm256_setr_epi64x((long long)q8_signs64[aux & 127], (long long)q8_signs64[(aux >> 7) & 127],
                                                  (long long)q8_signs64[(aux >> 14) & 127], (long long)q8_signs64[(aux >> 21) & 127]);
            const __m256i sv = _mm256_set1_epi16((short)(2 * (aux >> 28) + 1));
            for (int t = 0; t < nt; t++) {
                const __m256i av = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(Q8_Q(t) + 32 * ib)), sg);
                acc[t] = Q8_DPW(acc[t], _mm256_maddubs_epi16(w, av), sv);
            }
        }
        const float d = h2f(rd16(b));
        for (int t = 0; t < nt; t++) o[t].d = d * a[t].d[k];
    }
#undef Q8_Q
#undef Q8_BS
}
/* row_q8_k_portable's steps */
QC_Q8T static QC_INL void Q8F(row_q8_k_t)(const int type, const int bb, const uint8_t *p, const qc_act *a, const int nt,
                                          float *out) {
    __m256 acc[QC_Q8_NT];
    __m128 accm[QC_Q8_NT];
    float summs[QC_Q8_NT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps(), accm[t] = _mm_setzero_ps(), summs[t] = 0.0f;
    qc_kblock o[QC_Q8_NT];
    __m256i lanes[QC_Q8_NT];
    for (int64_t k = 0; k < a[0].cols / 256; k++, p += bb) {
        Q8F(kblock_t)(type, p, a, nt, k, lanes, o);
        for (int t = 0; t < nt; t++) {
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(o[t].d), _mm256_cvtepi32_ps(lanes[t]), acc[t]);
            if (type == QC_Q4_K)
                accm[t] = _mm_fmadd_ps(_mm_set1_ps(o[t].dmin), _mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)o[t].mins)), accm[t]);
            if (type == QC_Q5_K)
                summs[t] = fmaf(o[t].dmin, (float)(o[t].mins[0] + o[t].mins[1] + o[t].mins[2] + o[t].mins[3]), summs[t]);
        }
    }
    for (int t = 0; t < nt; t++) {
        float v[8], m[4];
        _mm256_storeu_ps(v, acc[t]);
        _mm_storeu_ps(m, accm[t]);
        out[t] = kfinish(type, v, m, summs[t]);
    }
}
/* nt is 1 or QC_Q8_NT */
QC_Q8T static void Q8F(row_q8_k_simd)(int type, int bb, const uint8_t *p, const qc_act *a, int nt, float *out) {
    switch (type) {
        case QC_Q4_K: Q8_ROWS(row_q8_k_t, Q4_K)
        case QC_Q5_K: Q8_ROWS(row_q8_k_t, Q5_K)
        case QC_Q6_K: Q8_ROWS(row_q8_k_t, Q6_K)
        case QC_IQ4_XS: Q8_ROWS(row_q8_k_t, IQ4_XS)
        case QC_IQ2_XXS: Q8_ROWS(row_q8_k_t, IQ2_XXS)
        default: Q8_ROWS(row_q8_k_t, IQ3_XXS)
    }
}
