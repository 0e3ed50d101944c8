/* GGML block encoders with an importance matrix (per input column: the mean squared activation over
 * calibration text, formats/gguf/imatrix.py), and the non-linear 4-bit types IQ4_NL / IQ4_XS.
 *
 * With an importance matrix every block's fit minimises sum_j w_j (x_j - q_j)^2 with, for column j,
 * w_j = imatrix_j * sqrt(sigma2 + x_j^2) (sigma2: the mean square of the row, or twice that of the
 * super-block for the K-quants; Q6_K uses imatrix_j as it is). The searches and their float operation
 * order are those of llama-quantize --imatrix (ggml's quantize_row_*_impl), so the results are
 * bit-identical to it (tests/test_imatrix.py). Q8_0 ignores the importance matrix, as ggml does.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "encode.h"

/* sum of squares, in index order (the order fixes the float result) */
static float sum_sq(const float *x, int64_t n) {
    float s = 0;
    for (int64_t j = 0; j < n; j++) s += x[j] * x[j];
    return s;
}

static void importance(const float *x, const float *qw, float sigma2, int n, float *w) {
    for (int j = 0; j < n; j++) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
}

/* weighted fit of the scale of a sum of values, as ggml's make_qp_quants: x ~ scale * L, L in [0, nmax] */
static float fit_qp(int n, int nmax, const float *x, uint8_t *L, const float *w) {
    float max = 0;
    for (int i = 0; i < n; i++) max = x[i] > max ? x[i] : max;
    if (max < 1e-15f) { memset(L, 0, n); return 0.0f; }
    float iscale = nmax / max;
    for (int i = 0; i < n; i++) L[i] = (uint8_t)rnd(iscale * x[i]);
    float scale = 1 / iscale, best = 0;
    for (int i = 0; i < n; i++) { const float d = x[i] - scale * L[i]; best += w[i] * d * d; }
    for (int k = -4; k <= 4; k++) {
        if (!k) continue;
        const float is = (0.1f * k + nmax) / max, sc = 1 / is;
        float mse = 0;
        for (int i = 0; i < n; i++) {
            int l = rnd(is * x[i]); l = l < nmax ? l : nmax;
            const float d = x[i] - sc * l;
            mse += w[i] * d * d;
        }
        if (mse < best) { best = mse; iscale = is; }
    }
    float slx = 0, sl2 = 0;
    for (int i = 0; i < n; i++) {
        int l = rnd(iscale * x[i]); l = l < nmax ? l : nmax;
        L[i] = (uint8_t)l;
        slx += w[i] * x[i] * l; sl2 += w[i] * l * l;
    }
    for (int it = 0; it < 5; it++) {  /* move single codes while that raises slx^2 / sl2 */
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float a = slx - w[i] * x[i] * L[i], c = sl2 - w[i] * L[i] * L[i];
            if (a > 0 && c > 0) {
                int l = rnd(x[i] * c / a); l = l < nmax ? l : nmax;
                if (l != L[i]) {
                    a += w[i] * x[i] * l; c += w[i] * l * l;
                    if (a * a * sl2 > slx * slx * c) { L[i] = (uint8_t)l; slx = a; sl2 = c; changed++; }
                }
            }
        }
        if (!changed) break;
    }
    return sl2 > 0.0f ? slx / sl2 : 0.0f;
}

/* 32-value types on one row: Q4_0 / Q5_0 (symmetric, nmax 8 / 16), Q4_1 / Q5_1 (scale and min) */
static void q_legacy_w(int type, const float *x, uint8_t *b, int64_t cols, const float *qw) {
    const float sigma2 = sum_sq(x, cols) / cols;
    const int asym = type == 3 || type == 7, five = type == 6 || type == 7;
    const int size = 18 + 2 * asym + 4 * five;
    for (int64_t ib = 0; ib < cols / 32; ib++, x += 32, qw += 32, b += size) {
        float w[32]; uint8_t L[32];
        importance(x, qw, sigma2, 32, w);
        if (asym) {
            float m;
            put16(b, qc_fit_scale_min(32, five ? 31 : 15, x, w, L, &m, -0.9f, 0.05f, 36));
            put16(b + 2, -m);
        } else {
            put16(b, qc_fit_sym(32, five ? 16 : 8, x, w, (int8_t *)L));
        }
        uint8_t *qs = b + size - 16;
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            qs[j] = (uint8_t)((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4));
            qh |= ((uint32_t)(L[j] >> 4) & 1u) << j;
            qh |= ((uint32_t)(L[j + 16] >> 4) & 1u) << (j + 16);
        }
        if (five) memcpy(b + 2 + 2 * asym, &qh, 4);
    }
}

/* Q2_K: scale and min per 16 values (4-bit each on two f16 super-block scales) */
static void q_q2_k_w(const float *x, uint8_t *b, int64_t nb, const float *qw) {
    for (int64_t i = 0; i < nb; i++, x += 256, qw += 256, b += 84) {
        uint8_t L[256], Ls[16], Lm[16]; float w[16], sw[16], scales[16], mins[16];
        const float sigma2 = sum_sq(x, 256) / 256;
        for (int j = 0; j < 16; j++) {
            importance(x + 16 * j, qw + 16 * j, sigma2, 16, w);
            sw[j] = 0;
            for (int l = 0; l < 16; l++) sw[j] += w[l];
            scales[j] = qc_fit_scale_min(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], -0.9f, 0.05f, 36);
        }
        put16(b + 80, fit_qp(16, 15, scales, Ls, sw));
        put16(b + 82, fit_qp(16, 15, mins, Lm, sw));
        const float dm = h2f(rd16(b + 80)), mm = h2f(rd16(b + 82));
        for (int j = 0; j < 16; j++) {
            b[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
            const float d = dm * (b[j] & 0xF);
            if (!d) continue;
            const float m = mm * (b[j] >> 4);
            for (int l = 0; l < 16; l++) L[16 * j + l] = (uint8_t)clampi(rnd((x[16 * j + l] + m) / d), 0, 3);
        }
        qc_pack_2bit(L, b + 16);
    }
}

/* Q3_K: signed 6-bit scale per 16 values on one f16 super-block scale */
static void q_q3_k_w(const float *x, uint8_t *b, int64_t nb, const float *qw) {
    for (int64_t i = 0; i < nb; i++, x += 256, qw += 256, b += 110) {
        int8_t L[256], Ls[16]; float w[16], sw[16], scales[16];
        const float sigma2 = 2 * sum_sq(x, 256) / 256;
        for (int j = 0; j < 16; j++) {
            importance(x + 16 * j, qw + 16 * j, sigma2, 16, w);
            sw[j] = 0;
            for (int l = 0; l < 16; l++) sw[j] += w[l];
            scales[j] = qc_fit_sym(16, 4, x + 16 * j, w, L + 16 * j);
        }
        memset(b, 0, 110);
        uint8_t *sc = b + 96;
        const float d_block = qc_fit_sym(16, 32, scales, sw, Ls);
        for (int j = 0; j < 16; j++) {  /* 6 bits: low nibble in bytes 0-7, high pair in bytes 8-11 */
            sc[j % 8] |= (uint8_t)((Ls[j] & 0xF) << (j < 8 ? 0 : 4));
            sc[8 + j % 4] |= (uint8_t)((Ls[j] >> 4) << (2 * (j / 4)));
        }
        put16(b + 108, d_block);
        const float d0 = h2f(rd16(b + 108));
        for (int j = 0; j < 16; j++) {
            const int s = (((sc[j % 8] >> (j < 8 ? 0 : 4)) & 0xF) | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
            const float d = d0 * s;
            if (!d) continue;
            for (int l = 0; l < 16; l++) L[16 * j + l] = (int8_t)(clampi(rnd(x[16 * j + l] / d), -4, 3) + 4);
        }
        uint8_t *hm = b;  /* bit k of hm[l] is the high bit of value 32 k + l */
        uint8_t U[256];
        for (int j = 0; j < 256; j++) {
            U[j] = (uint8_t)L[j];
            if (U[j] > 3) { hm[j % 32] |= (uint8_t)(1u << (j / 32)); U[j] -= 4; }
        }
        qc_pack_2bit(U, b + 32);
    }
}

/* Q4_K / Q5_K: 6-bit scale and min per 32 values on two f16 super-block scales */
static void q_k45_w(int five, const float *x, uint8_t *b, int64_t nb, const float *qw) {
    const int nmax = five ? 31 : 15, size = five ? 176 : 144;
    for (int64_t i = 0; i < nb; i++, x += 256, qw += 256, b += size) {
        uint8_t L[256], Ls[8], Lm[8]; float w[32], sw[8], scales[8], mins[8];
        const float sigma2 = 2 * sum_sq(x, 256) / 256;
        for (int j = 0; j < 8; j++) {
            importance(x + 32 * j, qw + 32 * j, sigma2, 32, w);
            sw[j] = 0;
            for (int l = 0; l < 32; l++) sw[j] += w[l];
            scales[j] = qc_fit_scale_min(32, nmax, x + 32 * j, w, L + 32 * j, &mins[j], -0.9f, 0.05f, 36);
        }
        memset(b, 0, size);
        put16(b, fit_qp(8, 63, scales, Ls, sw));
        put16(b + 2, fit_qp(8, 63, mins, Lm, sw));
        uint8_t *sc = b + 4;
        for (int j = 0; j < 8; j++) qc_pack_scale_min_k4(sc, j, Ls[j] < 63 ? Ls[j] : 63, Lm[j] < 63 ? Lm[j] : 63);
        const float d0 = h2f(rd16(b)), m0 = h2f(rd16(b + 2));
        for (int j = 0; j < 8; j++) {
            uint8_t s, m; scale_min_k4(j, sc, &s, &m);
            const float d = d0 * s;
            if (!d) continue;
            const float dm = m0 * m;
            for (int l = 0; l < 32; l++) L[32 * j + l] = (uint8_t)clampi(rnd((x[32 * j + l] + dm) / d), 0, nmax);
        }
        qc_pack_k45(five, L, b);
    }
}

/* ---- IQ4_NL / IQ4_XS: 4-bit indices into a fixed non-linear grid ---- */
static const int8_t IQ4_GRID[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* index of the grid value nearest v (the lower one on ties) */
static int nearest_iq4(float v) {
    if (v <= IQ4_GRID[0]) return 0;
    if (v >= IQ4_GRID[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) { const int mid = (lo + hi) / 2; if (v < IQ4_GRID[mid]) hi = mid; else lo = mid; }
    return v - IQ4_GRID[hi - 1] < IQ4_GRID[hi] - v ? hi - 1 : hi;
}

/* weighted sums of one candidate inverse scale: sum w q x and sum w q^2 over the nearest grid values */
static void iq4_sums(const float *x, const float *w, float id, uint8_t *L, float *sqx, float *sq2) {
    float a = 0, c = 0;
    for (int j = 0; j < 32; j++) {
        const int l = nearest_iq4(id * x[j]);
        const float q = IQ4_GRID[l];
        if (L) L[j] = (uint8_t)l;
        a += w[j] * q * x[j]; c += w[j] * q * q;
    }
    *sqx = a; *sq2 = c;
}

/* One IQ4 super-block of n values (32: IQ4_NL, 256: IQ4_XS, 6-bit sub-block scales) into d, scales, qs.
 * Each 32-value sub-block tries 15 grid scalings around the largest value and keeps the one with the best
 * weighted least-squares scale; IQ4_XS then codes the sub-block scales on the super-block's. */
static void iq4_block(int n, const float *x, const float *qw, uint8_t *dh, uint8_t *sh, uint8_t *sl, uint8_t *qs) {
    float sigma2 = 0, scales[8], max_scale = 0, amax_scale = 0, w[32];
    uint8_t L[256];
    for (int j = 0; j < n; j++) sigma2 += x[j] * x[j];
    sigma2 *= 2.f / n;
    memset(qs, 0, n / 2);
    put16(dh, 0.f);
    for (int ib = 0; ib < n / 32; ib++) {
        const float *xb = x + 32 * ib;
        if (qw) importance(xb, qw + 32 * ib, sigma2, 32, w);
        else for (int j = 0; j < 32; j++) w[j] = xb[j] * xb[j];
        float amax = 0, max = 0;
        for (int j = 0; j < 32; j++) { const float a = fabsf(xb[j]); if (a > amax) { amax = a; max = xb[j]; } }
        if (amax < 1e-15f) { scales[ib] = 0; continue; }
        float sqx, sq2;
        iq4_sums(xb, w, 1 / (-max / IQ4_GRID[0]), L + 32 * ib, &sqx, &sq2);
        float d = sq2 > 0 ? sqx / sq2 : 0.f, best = d * sqx;
        for (int t = -7; t <= 7; t++) {
            iq4_sums(xb, w, (t + IQ4_GRID[0]) / max, NULL, &sqx, &sq2);
            if (sq2 > 0 && sqx * sqx > best * sq2) { d = sqx / sq2; best = d * sqx; }
        }
        scales[ib] = d;
        if (fabsf(d) > amax_scale) { amax_scale = fabsf(d); max_scale = d; }
    }
    if (n > 32) {
        uint16_t h = 0;
        const float d = -max_scale / 32, id = d ? 1 / d : 0.f;
        put16(dh, d);
        for (int ib = 0; ib < n / 32; ib++) {
            const int l = clampi(rnd(id * scales[ib]), -32, 31);
            const float dl = d * l, idl = dl ? 1 / dl : 0.f;
            for (int j = 0; j < 32; j++) L[32 * ib + j] = (uint8_t)nearest_iq4(idl * x[32 * ib + j]);
            const int u = l + 32;
            if (ib % 2 == 0) sl[ib / 2] = (uint8_t)(u & 0xF);
            else sl[ib / 2] |= (uint8_t)((u & 0xF) << 4);
            h |= (uint16_t)((u >> 4) << (2 * ib));
        }
        memcpy(sh, &h, 2);
    } else {
        put16(dh, scales[0]);
        const float id = scales[0] ? 1 / scales[0] : 0;
        for (int j = 0; j < 32; j++) L[j] = (uint8_t)nearest_iq4(id * x[j]);
    }
    for (int i = 0; i < n / 32; i++)
        for (int j = 0; j < 16; j++) qs[16 * i + j] = (uint8_t)(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
}

/* Encode rows [rows, cols] of float32 into GGML type `type` (GGMLQuantizationType id) with importance
 * weights imatrix [cols] (NULL: IQ4 types only, which weight by x^2). Returns 0, or -1 for a type this
 * file does not handle (the caller then uses qc_quant: Q8_0, float types). */
int qc_quant_w(int type, const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    const int64_t nk = cols / 256;
    if (!imatrix && type != 20 && type != 23) return -1;
    for (int64_t r = 0; r < rows; r++, x += cols) {
        switch (type) {
            case 2: case 3: case 6: case 7: {
                const int64_t size = type == 2 ? 18 : type == 3 ? 20 : type == 6 ? 22 : 24;
                q_legacy_w(type, x, out + r * (cols / 32) * size, cols, imatrix);
                break;
            }
            case 10: q_q2_k_w(x, out + r * nk * 84, nk, imatrix); break;
            case 11: q_q3_k_w(x, out + r * nk * 110, nk, imatrix); break;
            case 12: q_k45_w(0, x, out + r * nk * 144, nk, imatrix); break;
            case 13: q_k45_w(1, x, out + r * nk * 176, nk, imatrix); break;
            case 14: qc_q6k(x, out + r * nk * 210, nk, imatrix); break;
            case 20: {  /* IQ4_NL: d, qs[16] */
                uint8_t *b = out + r * (cols / 32) * 18;
                for (int64_t ib = 0; ib < cols / 32; ib++)
                    iq4_block(32, x + 32 * ib, imatrix ? imatrix + 32 * ib : NULL, b + 18 * ib, NULL, NULL, b + 18 * ib + 2);
                break;
            }
            case 23: {  /* IQ4_XS: d, scales_h (u16), scales_l[4], qs[128] */
                uint8_t *b = out + r * nk * 136;
                for (int64_t ib = 0; ib < nk; ib++, b += 136)
                    iq4_block(256, x + 256 * ib, imatrix ? imatrix + 256 * ib : NULL, b, b + 2, b + 4, b + 8);
                break;
            }
            default: return -1;
        }
    }
    return 0;
}

/* IQ4_NL (type 20) / IQ4_XS (23) blocks -> float32 */
int qc_dequant_iq4(int type, const uint8_t *b, float *y, int64_t nb) {
    if (type == 20) {
        for (int64_t i = 0; i < nb; i++, b += 18, y += 32) {
            const float d = h2f(rd16(b));
            for (int j = 0; j < 16; j++) { y[j] = d * IQ4_GRID[b[2 + j] & 0xF]; y[j + 16] = d * IQ4_GRID[b[2 + j] >> 4]; }
        }
        return 0;
    }
    if (type != 23) return -1;
    for (int64_t i = 0; i < nb; i++, b += 136) {
        const float d = h2f(rd16(b));
        const uint16_t sh = rd16(b + 2);
        for (int ib = 0; ib < 8; ib++, y += 32) {
            const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4);
            const float dl = d * (ls - 32);
            const uint8_t *q = b + 8 + 16 * ib;
            for (int j = 0; j < 16; j++) { y[j] = dl * IQ4_GRID[q[j] & 0xF]; y[j + 16] = dl * IQ4_GRID[q[j] >> 4]; }
        }
    }
    return 0;
}

/* ---- fixed block scales, free codes (GPTQ on GGML grids, qconvert/quant/gptq_ggml.py) ----
 * Every type here decodes as value = d * G(L) + m per sub-block, with L the stored code: G(L) = L for the
 * affine types (L in 0..nmax), the IQ4 grid for IQ4_NL / IQ4_XS. qc_grid reads (d, m) of every sub-block;
 * qc_pack_codes writes new codes into blocks whose scale bytes it keeps. Q8_0 codes are stored + 128. */
typedef struct { int sub, size, nmax; } grid_info;
static int info_of(int type, grid_info *g) {
    switch (type) {
        case 2: *g = (grid_info){32, 18, 15}; return 0;
        case 3: *g = (grid_info){32, 20, 15}; return 0;
        case 6: *g = (grid_info){32, 22, 31}; return 0;
        case 7: *g = (grid_info){32, 24, 31}; return 0;
        case 8: *g = (grid_info){32, 34, 255}; return 0;
        case 10: *g = (grid_info){16, 84, 3}; return 0;
        case 11: *g = (grid_info){16, 110, 7}; return 0;
        case 12: *g = (grid_info){32, 144, 15}; return 0;
        case 13: *g = (grid_info){32, 176, 31}; return 0;
        case 14: *g = (grid_info){16, 210, 63}; return 0;
        case 20: *g = (grid_info){32, 18, 15}; return 0;
        case 23: *g = (grid_info){32, 136, 15}; return 0;
        default: return -1;
    }
}

/* sub-block parameters of nb blocks: d[nb * subs], m[nb * subs]; returns subs per block, or -1 */
int qc_grid(int type, const uint8_t *b, int64_t nb, float *d, float *m) {
    grid_info g;
    if (info_of(type, &g)) return -1;
    const int64_t per = (type >= 10 && type <= 14) || type == 23 ? 256 / g.sub : 1;
    for (int64_t i = 0; i < nb; i++, b += g.size, d += per, m += per) {
        switch (type) {
            case 2: d[0] = h2f(rd16(b)); m[0] = -8 * d[0]; break;
            case 6: d[0] = h2f(rd16(b)); m[0] = -16 * d[0]; break;
            case 8: d[0] = h2f(rd16(b)); m[0] = -128 * d[0]; break;
            case 3: case 7: d[0] = h2f(rd16(b)); m[0] = h2f(rd16(b + 2)); break;
            case 20: d[0] = h2f(rd16(b)); m[0] = 0; break;
            case 10: {
                const float D = h2f(rd16(b + 80)), M = h2f(rd16(b + 82));
                for (int j = 0; j < 16; j++) { d[j] = D * (b[j] & 0xF); m[j] = -M * (b[j] >> 4); }
                break;
            }
            case 11: {
                const float D = h2f(rd16(b + 108)); const uint8_t *sc = b + 96;
                for (int j = 0; j < 16; j++) {
                    const int s = (((sc[j % 8] >> (j < 8 ? 0 : 4)) & 0xF) | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
                    d[j] = D * s; m[j] = -4 * d[j];
                }
                break;
            }
            case 12: case 13: {
                const float D = h2f(rd16(b)), M = h2f(rd16(b + 2));
                for (int j = 0; j < 8; j++) { uint8_t s, mm; scale_min_k4(j, b + 4, &s, &mm); d[j] = D * s; m[j] = -M * mm; }
                break;
            }
            case 14: {
                const float D = h2f(rd16(b + 208));
                for (int j = 0; j < 16; j++) { d[j] = D * ((const int8_t *)(b + 192))[j]; m[j] = -32 * d[j]; }
                break;
            }
            case 23: {
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
    const int vals = (type >= 10 && type <= 14) || type == 23 ? 256 : 32;
    for (int64_t i = 0; i < nb; i++, b += g.size, L += vals) {
        switch (type) {
            case 2: case 3: case 6: case 7: case 20: {
                const int asym = type == 3 || type == 7, five = type == 6 || type == 7;
                uint8_t *qs = b + g.size - 16; uint32_t qh = 0;
                for (int j = 0; j < 16; j++) {
                    qs[j] = (uint8_t)((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4));
                    qh |= ((uint32_t)(L[j] >> 4) & 1u) << j;
                    qh |= ((uint32_t)(L[j + 16] >> 4) & 1u) << (j + 16);
                }
                if (five) memcpy(b + 2 + 2 * asym, &qh, 4);
                break;
            }
            case 8: for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(L[j] - 128); break;
            case 10: qc_pack_2bit(L, b + 16); break;
            case 11: {
                uint8_t U[256];
                memset(b, 0, 32);
                for (int j = 0; j < 256; j++) {
                    U[j] = L[j];
                    if (U[j] > 3) { b[j % 32] |= (uint8_t)(1u << (j / 32)); U[j] -= 4; }
                }
                qc_pack_2bit(U, b + 32);
                break;
            }
            case 12: case 13: if (type == 13) memset(b + 16, 0, 32); qc_pack_k45(type == 13, L, b); break;
            case 14: qc_pack_q6k(L, b); break;
            case 23:
                for (int k = 0; k < 8; k++)
                    for (int j = 0; j < 16; j++) b[8 + 16 * k + j] = (uint8_t)(L[32 * k + j] | (L[32 * k + 16 + j] << 4));
                break;
        }
    }
    return 0;
}
