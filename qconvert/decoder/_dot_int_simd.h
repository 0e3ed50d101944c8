/* The int-code kernels of _dot_int.c for one vector width: included by _dot_int.c once per width with
 * QC_DOT_PASS set (8: AVX2, 16: AVX-512), so it has no include guard; it includes _dot.h again for that
 * width's primitives (V*, QC_F(name)). Uses _dot_int.c's imat, group_sm, unpack_codes, decode_scalar and
 * QC_INT_ROW. */
#include "_dot.h"
/* VN codes (int32 lanes) -> VN values q * s + o; EX: exactly dequant_rows's (symmetric codes always are) */
QC_TGT static QC_INL void QC_F(cv)(float *out, VI q, VF s, VF o, const int sym, const int ex) {
    const VF f = VCVT(q);
    VST(out, (sym || !ex) ? VFMA(f, s, o) : VADD(VMUL(f, s), o));
}
/* codes stored one per byte at p[0 .. n) -> out */
QC_TGT static QC_INL void QC_F(bytes)(const imat *m, const uint8_t *p, int64_t n, float s, float o, const int ex,
                                      float *out) {
    const VF sv = VSET1(s), ov = VSET1(o);
    const int sym = m->offsets == NULL;
    int64_t i = 0;
    for (; i + VN <= n; i += VN) QC_F(cv)(out + i, VU8(p + i), sv, ov, sym, ex);
    for (; i < n; i++) out[i] = wval(m, (float)p[i], s, o);
}
/* 4-bit codes starting at an even column, p = their first byte -> out */
QC_TGT static QC_INL void QC_F(nibs)(const imat *m, const uint8_t *p, int64_t n, float s, float o, const int ex,
                                     float *out) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const VF sv = VSET1(s), ov = VSET1(o);
    const int sym = m->offsets == NULL;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(p + i / 2));
        const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        const __m128i a = _mm_unpacklo_epi8(lo, hi), b = _mm_unpackhi_epi8(lo, hi);
        for (int k = 0; k < 16 / VN; k++) {
            QC_F(cv)(out + i + k * VN, VU8X(a, k), sv, ov, sym, ex);
            QC_F(cv)(out + i + 16 + k * VN, VU8X(b, k), sv, ov, sym, ex);
        }
    }
    for (; i < n; i++) out[i] = wval(m, (float)((p[i / 2] >> (4 * (i & 1))) & 15), s, o);
}
/* VN bit-packed codes from column c (a multiple of VN) of a row; reads VBITS_BYTES bytes from the codes' first
 * byte: the caller makes sure those lie in the row (codes_safe copies the row's last bytes first) */
QC_TGT static QC_INL VI QC_F(codes)(const imat *m, const uint8_t *row, int64_t c) {
    return VBITS(row + c / 8 * m->bits, VLDI(m->pidx), VLDI(m->psh), (1 << m->bits) - 1);
}
QC_TGT static QC_INL VI QC_F(codes_safe)(const imat *m, const uint8_t *row, int64_t c) {
    const int64_t o0 = c / 8 * m->bits;
    if (o0 + VBITS_BYTES <= m->packed_rb) return QC_F(codes)(m, row, c);
    uint8_t tmp[16] = {0};
    for (int64_t i = 0; o0 + i < m->packed_rb && i < 16; i++) tmp[i] = row[o0 + i];
    return VBITS(tmp, VLDI(m->pidx), VLDI(m->psh), (1 << m->bits) - 1);
}
/* codes [c, c + n) of row r (one group piece) -> out */
QC_TGT static QC_INL void QC_F(decode)(const imat *m, int64_t r, int64_t c, int64_t n, float s, float o, float *out,
                                       const int ex) {
    const uint8_t *row = m->codes + r * m->rb;
    if (m->mode == 0) { QC_F(bytes)(m, row + c, n, s, o, ex, out); return; }
    if (m->mode == 1 && (c & 1) == 0) { QC_F(nibs)(m, row + c / 2, n, s, o, ex, out); return; }
    if (m->mode == 2) {
        int64_t i = 0;
        if (c % VN == 0) {
            const VF sv = VSET1(s), ov = VSET1(o);
            for (; i + VN <= n; i += VN) QC_F(cv)(out + i, QC_F(codes_safe)(m, row, c + i), sv, ov, m->offsets == NULL, ex);
        }
        uint8_t q[QC_CHUNK];
        unpack_codes(m, row, c + i, n - i, q);
        QC_F(bytes)(m, q, n - i, s, o, ex, out + i);
        return;
    }
    decode_scalar(m, r, c, n, s, o, out);
}
#define QC_DEC_DOT(M, R, C, N, S, O, DST) QC_F(decode)((M), (R), (C), (N), (S), (O), (DST), 0)
#define QC_DEC_EXACT(M, R, C, N, S, O, DST) QC_F(decode)((M), (R), (C), (N), (S), (O), (DST), 1)

/* S[k], O[k] (as group_sm) of the group holding columns c + 32k .. c + 32k + 31, k < nh (groups of a
 * multiple of 32 columns, c a multiple of 32) */
QC_TGT __attribute__((noinline)) static void QC_F(fill_halves)(const imat *m, int64_t r, int64_t c, int nh, float ds, float dm, float *S, float *O) {
    int64_t g = c / m->group, gend = (g + 1) * m->group;
    const int64_t base = r * m->G;
    const float nh2 = -m->half;
    int k = 0;
    const int j = m->group / 32;  /* halves per group */
    if ((j & (j - 1)) == 0 && j <= VN && c % m->group == 0 && !m->zint) {  /* VN halves (VN / j groups) at a time */
        int32_t id[VN];
        const int sh = __builtin_ctz((unsigned)j);
        for (int i = 0; i < VN; i++) id[i] = i >> sh;
        const VI idx = VLDI(id);
        const VF dsv = VSET1(ds), dmv = VSET1(dm), hv = VSET1(nh2);
        for (; k < nh; k += VN, g += VN / j) {  /* VN groups read (zeros past the row's end), VN / j used */
            const int64_t left = m->G - g;
            const void *sp, *op;
            uint16_t ts[VN], to[VN];
            const size_t es = m->steps ? 1 : 2;
            if (left >= VN) {
                sp = (const uint8_t *)m->scales + (base + g) * es;
                op = m->offsets ? (const uint8_t *)m->offsets + (base + g) * es : NULL;
            } else {  /* copy what is left of the row: never read past the arrays (memcpy: this function
                       * is not inlined and runs before the kernel's accumulators are live) */
                memset(ts, 0, sizeof ts); memset(to, 0, sizeof to);
                memcpy(ts, (const uint8_t *)m->scales + (base + g) * es, (size_t)left * es);
                if (m->offsets) memcpy(to, (const uint8_t *)m->offsets + (base + g) * es, (size_t)left * es);
                sp = ts, op = m->offsets ? (const void *)to : NULL;
            }
            VF sv, ov;
            if (m->steps == NULL) {
                sv = VF16(sp);
                ov = op ? VF16(op) : VMUL(sv, hv);
            } else if (op) {
                sv = VMUL(VCVT(VU8(sp)), dsv);
                ov = VMUL(VCVT(VI8(op)), dmv);
            } else {
                sv = VMUL(VCVT(VI8(sp)), dsv);
                ov = VMUL(sv, hv);
            }
            VST(S + k, VPERM(sv, idx)); VST(O + k, VPERM(ov, idx));
        }
        return;
    }
#define QC_HALVES(SC, OF)                                                                           \
    for (; k < nh; k++) {                                                                           \
        if (c + 32 * k >= gend) { g++; gend += m->group; }                                          \
        S[k] = (SC); O[k] = (OF);                                                                   \
    }
    if (m->zint) {  /* once per row: the scalar path is enough */
        if (m->steps == NULL) {
            const uint16_t *sc = (const uint16_t *)m->scales + base;
            QC_HALVES(_cvtsh_ss(sc[g]), zero_at(m, r, g) * -S[k])
        } else {
            const uint8_t *sc = (const uint8_t *)m->scales + base;
            QC_HALVES((float)sc[g] * ds, zero_at(m, r, g) * -S[k])
        }
    } else if (m->steps == NULL) {
        const uint16_t *sc = (const uint16_t *)m->scales + base, *of = (const uint16_t *)m->offsets + base;
        if (m->offsets) QC_HALVES(_cvtsh_ss(sc[g]), _cvtsh_ss(of[g]))
        else QC_HALVES(_cvtsh_ss(sc[g]), nh2 * S[k])
    } else if (m->offsets) {
        const uint8_t *sc = (const uint8_t *)m->scales + base; const int8_t *of = (const int8_t *)m->offsets + base;
        QC_HALVES((float)sc[g] * ds, (float)of[g] * dm)
    } else {
        const int8_t *sc = (const int8_t *)m->scales + base;
        QC_HALVES((float)sc[g] * ds, nh2 * S[k])
    }
#undef QC_HALVES
}

/* 32 codes from column c (a multiple of 32) of a row -> out; mode 0: one per byte, 2: bit-packed, 3: 4-bit
 * codes with x permuted to match: out = the 16 even columns, then the 16 odd ones (low nibbles, then high) */
QC_TGT static QC_INL void QC_F(dec32)(const imat *m, const uint8_t *row, int64_t c, float s, float o, float *out,
                                      const int mode) {
    const VF sv = VSET1(s), ov = VSET1(o);
    const int sym = m->offsets == NULL;
    if (mode == 3) {
        for (int k = 0; k < 16 / VN; k++) {
            const VI i = VU8(row + c / 2 + k * VN);
            QC_F(cv)(out + k * VN, VIAND(i, 15), sv, ov, sym, 0);
            QC_F(cv)(out + 16 + k * VN, VISRL(i, 4), sv, ov, sym, 0);
        }
        return;
    }
    for (int k = 0; k < 32 / VN; k++)
        QC_F(cv)(out + k * VN, mode == 2 ? QC_F(codes)(m, row, c + k * VN) : VU8(row + c + k * VN), sv, ov, sym, 0);
}

/* product kernel for a tile of T rows of x, groups of any size: chunk by chunk */
QC_TGT static QC_INL void QC_F(int_generic)(const imat *m, int64_t r0, int64_t r1, int64_t ldy, const float *x,
                                            float *y, const int T) {
    QC_ALIGN float buf[QC_CHUNK];
    for (int64_t r = r0; r < r1; r++) {
        QC_ACC_DECL
#define QC_VDOT(C0, NB) QC_DOT_BUF(buf, (NB), x + (C0), m->cols)
        QC_INT_ROW(m, r, buf, QC_DEC_DOT, QC_VDOT)
#undef QC_VDOT
        QC_ACC_STORE(y + (r - r0), ldy)
    }
}
/* product kernel for groups of a multiple of 32 columns (m->S set): 64 columns (two halves of 32, each inside
 * one group, their scales / offsets from fill_halves) at a time, then the rest of the row piece by piece.
 * mode 0: one code per byte, 2: bit-packed, 3: 4-bit codes against the reordered x (see int_dot) */
QC_TGT static QC_INL void QC_F(int_fast)(const imat *m, int64_t r0, int64_t r1, int64_t ldy, const float *x, float *y,
                                         const int T, const int mode) {
    QC_ALIGN float buf[QC_CHUNK];
    const int64_t cols = m->cols, grp = m->group;
    float *S = m->S, *O = m->O;
    for (int64_t r = r0; r < r1; r++) {
        float ds, dm;
        row_steps(m, r, &ds, &dm);
        int64_t end = cols / 64 * 64;
        if (mode == 2)  /* the 64-column path reads VBITS_BYTES from each chunk's first byte: keep those in the row */
            while (end > 0 && (end - VN) / 8 * m->bits + VBITS_BYTES > m->packed_rb) end -= 64;
        QC_F(fill_halves)(m, r, 0, (int)(end / 32), ds, dm, S, O);  /* a call: before the accumulators live */
        QC_ACC_DECL
        const uint8_t *row = m->codes + r * m->rb;
        prefetch_row(m->codes, m->rb, r, r1);
        for (int64_t c = 0; c < end; c += 64) {
            const int64_t h = c >> 5;
            QC_F(dec32)(m, row, c, S[h], O[h], buf, mode);
            QC_F(dec32)(m, row, c + 32, S[h + 1], O[h + 1], buf + 32, mode);
            QC_DOT_BUF(buf, 64, x + c, cols);
        }
        int64_t nb = 0;
        for (int64_t c1 = end; c1 < cols;) {
            const int64_t g = c1 / grp, ge = (g + 1) * grp < cols ? (g + 1) * grp : cols;
            float s, o;
            group_sm(m, r, g, ds, dm, &s, &o);
            QC_F(decode)(m, r, c1, ge - c1, s, o, buf + nb, 0);
            nb += ge - c1, c1 = ge;
        }
        QC_DOT_BUF(buf, nb, x + end, cols);
        QC_ACC_STORE(y + (r - r0), ldy)
    }
}
/* one function per (T, path): each instance's accumulators get the registers to themselves */
typedef void (*QC_F(rows_fn))(const imat *, int64_t, int64_t, int64_t, const float *, float *);
#define QC_INT_INST(TT)                                                                                \
    QC_TGT __attribute__((noinline)) static void QC_F(int_gen_##TT)(                                    \
        const imat *m, int64_t r0, int64_t r1, int64_t ldy, const float *x, float *y) {                \
        QC_F(int_generic)(m, r0, r1, ldy, x, y, TT);                                                   \
    }                                                                                                  \
    QC_TGT __attribute__((noinline)) static void QC_F(int_bytes_##TT)(                                  \
        const imat *m, int64_t r0, int64_t r1, int64_t ldy, const float *x, float *y) {                \
        QC_F(int_fast)(m, r0, r1, ldy, x, y, TT, 0);                                                   \
    }                                                                                                  \
    QC_TGT __attribute__((noinline)) static void QC_F(int_bits_##TT)(                                   \
        const imat *m, int64_t r0, int64_t r1, int64_t ldy, const float *x, float *y) {                \
        QC_F(int_fast)(m, r0, r1, ldy, x, y, TT, 2);                                                   \
    }                                                                                                  \
    QC_TGT __attribute__((noinline)) static void QC_F(int_nibs_##TT)(                                   \
        const imat *m, int64_t r0, int64_t r1, int64_t ldy, const float *x, float *y) {                \
        QC_F(int_fast)(m, r0, r1, ldy, x, y, TT, 3);                                                   \
    }
QC_INT_INST(1) QC_INT_INST(2) QC_INT_INST(3) QC_INT_INST(4) QC_INT_INST(5) QC_INT_INST(6) QC_INT_INST(7) QC_INT_INST(8)
#define QC_INT_ROW4(TT) {QC_F(int_gen_##TT), QC_F(int_bytes_##TT), QC_F(int_bits_##TT), QC_F(int_nibs_##TT)}
QC_TGT static QC_INL void QC_F(int_k)(const imat *m, int64_t r0, int64_t r1, int64_t ldy, const float *x, float *y,
                                      const int T) {
    static const QC_F(rows_fn) tab[8][4] = {QC_INT_ROW4(1), QC_INT_ROW4(2), QC_INT_ROW4(3), QC_INT_ROW4(4),
                                            QC_INT_ROW4(5), QC_INT_ROW4(6), QC_INT_ROW4(7), QC_INT_ROW4(8)};
    const int path = !m->S ? 0 : m->mode == 0 ? 1 : m->mode == 2 ? 2 : 3;
    tab[T - 1][path](m, r0, r1, ldy, x, y);
}
#undef QC_INT_INST
#undef QC_INT_ROW4

/* 4-bit codes in groups of a multiple of 32: the kernels read x with every 32 columns of each whole 64-column
 * unit reordered as the codes' nibbles come (even columns, then odd ones), so no shuffle per weight */
QC_TGT static void QC_F(int_dot)(const imat *m0, const float *x, int64_t T, float *y, int64_t ldy, int64_t r0, int64_t r1) {
    imat mm = *m0;
    const imat *m = &mm;
    const int64_t cols = m->cols, units = m->mode == 1 && m->group % 32 == 0 ? cols / 64 * 64 : 0;
    float *xp = units ? malloc((size_t)(T * cols) * sizeof(float)) : NULL;
    float *so = m->group % 32 == 0 ? malloc((size_t)(2 * (cols / 32 + VN)) * sizeof(float)) : NULL;
    if (so) mm.S = so, mm.O = so + cols / 32 + VN;  /* else the kernels take the chunked path */
    if (xp) {
        for (int64_t t = 0; t < T; t++) {
            const float *xs = x + t * cols;
            float *xd = xp + t * cols;
            for (int64_t c = 0; c < units; c += 32)
                for (int j = 0; j < 16; j++) { xd[c + j] = xs[c + 2 * j]; xd[c + 16 + j] = xs[c + 2 * j + 1]; }
            memcpy(xd + units, xs + units, (size_t)(cols - units) * sizeof(float));
        }
        mm.perm = 1;
    }
    if (m->mode == 1 && !(xp && so)) {  /* 4-bit codes take the 64-column path only with the reordered x */
        free(xp), free(so);
        xp = so = NULL;
        mm.perm = 0, mm.S = mm.O = NULL;
    }
    QC_TILED(QC_F(int_k), T, xp ? xp : x, cols, y, ldy, m, r0, r1, ldy)
    free(xp);
    free(so);
}
QC_TGT static void QC_F(int_deq)(const imat *m, int64_t r0, int64_t r1, float *out) {
#define QC_NOTHING(C0, NB) (void)0
    for (int64_t r = r0; r < r1; r++) { float *dst = out + (r - r0) * m->cols; QC_INT_ROW(m, r, dst + c0, QC_DEC_EXACT, QC_NOTHING) }
#undef QC_NOTHING
#undef QC_DEC_DOT
#undef QC_DEC_EXACT
}
