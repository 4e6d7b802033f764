/* gemm_bf16_avx2.c: the 16-bit GEMM kernels at level 1 (AVX2 + FMA + F16C),
 * instantiated from gemm_bf16_impl.h. */
#include "fastattn.h"
#define FA_G16_LEVEL 1
#include "gemm_bf16_impl.h"
