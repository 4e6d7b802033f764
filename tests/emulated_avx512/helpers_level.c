/*
 * helpers_level.c: thin exported wrappers around the vector helpers of
 * csrc/simd_map.h, for helpers.c. run.sh compiles this file twice:
 * -DFA_ISA_LEVEL=1 (native AVX2) and -DFA_ISA_LEVEL=2 (emulated AVX-512),
 * which gives functions suffixed _avx2 and _avx512.
 */
#include <stdint.h>
#include <string.h>

#include "simd_map.h"

#define H_CAT_(a, b) a##_##b
#define H_CAT(a, b) H_CAT_(a, b)
#define H(name) H_CAT(name, FA_ISA_SUFFIX)

int H(lanes32)(void);
int H(lanes64)(void);
void H(exp32)(const float *x, float *y, int64_t n);
void H(exp2_32)(const float *x, float *y, int64_t n);
void H(exp64)(const double *x, double *y, int64_t n);
float H(hsum32)(const float *x);
float H(hmax32)(const float *x);
double H(hsum64)(const double *x);
double H(hmax64)(const double *x);
void H(keep32)(const float *x, const uint8_t *m, float *y);
void H(keep64)(const double *x, const uint8_t *m, double *y);
void H(loadn32)(const float *x, int64_t n, float *y);
void H(storen32)(float *y, const float *x, int64_t n);
void H(loadn64)(const double *x, int64_t n, double *y);
void H(storen64)(double *y, const double *x, int64_t n);
void H(max32)(const float *a, const float *b, float *y);
void H(widen)(const void *x, int kind, int64_t n, float *y);

int H(lanes32)(void) { return FA_VF32_LANES; }
int H(lanes64)(void) { return FA_VF64_LANES; }
/* n: a multiple of the lane count */
void H(exp32)(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i + FA_VF32_LANES <= n; i += FA_VF32_LANES)
        vf32_storeu(y + i, vf32_exp_nonpos(vf32_loadu(x + i)));
}
void H(exp2_32)(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i + FA_VF32_LANES <= n; i += FA_VF32_LANES)
        vf32_storeu(y + i, vf32_exp2_nonpos(vf32_loadu(x + i)));
}
void H(exp64)(const double *x, double *y, int64_t n) {
    for (int64_t i = 0; i + FA_VF64_LANES <= n; i += FA_VF64_LANES)
        vf64_storeu(y + i, vf64_exp_nonpos(vf64_loadu(x + i)));
}
float H(hsum32)(const float *x) { return vf32_hsum(vf32_loadu(x)); }
float H(hmax32)(const float *x) { return vf32_hmax(vf32_loadu(x)); }
double H(hsum64)(const double *x) { return vf64_hsum(vf64_loadu(x)); }
double H(hmax64)(const double *x) { return vf64_hmax(vf64_loadu(x)); }
void H(keep32)(const float *x, const uint8_t *m, float *y) { vf32_storeu(y, vf32_keep(vf32_loadu(x), m)); }
void H(keep64)(const double *x, const uint8_t *m, double *y) { vf64_storeu(y, vf64_keep(vf64_loadu(x), m)); }
void H(loadn32)(const float *x, int64_t n, float *y) { vf32_storeu(y, vf32_loadn(x, n)); }
void H(storen32)(float *y, const float *x, int64_t n) { vf32_storen(y, vf32_loadu(x), n); }
void H(loadn64)(const double *x, int64_t n, double *y) { vf64_storeu(y, vf64_loadn(x, n)); }
void H(storen64)(double *y, const double *x, int64_t n) { vf64_storen(y, vf64_loadu(x), n); }
void H(max32)(const float *a, const float *b, float *y) { vf32_storeu(y, vf32_max(vf32_loadu(a), vf32_loadu(b))); }
/* n narrow K/V elements (kind 1 bfloat16, 2 half, 3 int8) widened to float,
 * whole vectors then one loadn tail */
void H(widen)(const void *x, int kind, int64_t n, float *y) {
    int64_t i = 0;
    for (; i + FA_VF32_LANES <= n; i += FA_VF32_LANES)
        vf32_storeu(y + i, kind == 1   ? vf32_load_bf16((const uint16_t *)x + i)
                           : kind == 2 ? vf32_load_f16((const uint16_t *)x + i)
                                       : vf32_load_i8((const int8_t *)x + i));
    if (i < n)
        vf32_storen(y + i,
                    kind == 1   ? vf32_loadn_bf16((const uint16_t *)x + i, n - i)
                    : kind == 2 ? vf32_loadn_f16((const uint16_t *)x + i, n - i)
                                : vf32_loadn_i8((const int8_t *)x + i, n - i),
                    n - i);
}
