/* gemm_bf16_avx512.c: the 16-bit GEMM kernels at level 2 (AVX-512 F/BW/VL/DQ + FMA),
 * instantiated from gemm_bf16_impl.h. */
#include "fastattn.h"
#define FA_G16_LEVEL 2
#include "gemm_bf16_impl.h"
