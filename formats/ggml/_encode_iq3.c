/* IQ3_XXS and IQ3_S encoders (iq.h). Not written yet: every entry answers -1. */
#include "types.h"
#include "iq.h"

int qc_quant_iq3_xxs(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    (void)x; (void)out; (void)rows; (void)cols; (void)imatrix;
    return -1;
}
int qc_quant_iq3_s(const float *x, uint8_t *out, int64_t rows, int64_t cols, const float *imatrix) {
    (void)x; (void)out; (void)rows; (void)cols; (void)imatrix;
    return -1;
}
