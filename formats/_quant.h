/* Helpers shared by the GGML block encoders (formats/_quant.c: plain; formats/_quant_w.c: importance-weighted
 * and IQ4). */
#ifndef QC_QUANT_H
#define QC_QUANT_H
#include <stdint.h>
#include <string.h>
#include "_half.h"

static inline void put16(uint8_t *p, float v) { const uint16_t h = f2h(v); memcpy(p, &h, 2); }
/* round half to even for |v| < 2^22: adding 1.5 * 2^23 leaves the integer in the mantissa */
static inline int rnd(float v) {
    const float t = v + 12582912.f;
    int32_t i; memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}
static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

float qc_fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L, float *m_out,
                       float rmin, float rdelta, int nstep);
float qc_fit_sym(int n, int nmax, const float *x, const float *w, int8_t *L);
void qc_pack_scale_min_k4(uint8_t *sc, int j, int ls, int lm);
void qc_pack_2bit(const uint8_t *L, uint8_t *qs);
void qc_pack_k45(int five, const uint8_t *L, uint8_t *b);
void qc_pack_q6k(const uint8_t *L, uint8_t *b);
void qc_q6k(const float *x, uint8_t *b, int64_t nb, const float *qw);
#endif
