/* gemm_bf16_avx512bf16.c: the 16-bit GEMM kernels at level 3 (AVX-512 +
 * AVX512_BF16: vdpbf16ps), instantiated from gemm_bf16_impl.h. bf16 only:
 * fp16 inputs run the avx512 set at this level. */
#include "fastattn.h"
#define FA_G16_LEVEL 3
#include "gemm_bf16_impl.h"
