/* gemm_bf16_scalar.c: the 16-bit GEMM kernels at level 0 (any CPU),
 * instantiated from gemm_bf16_impl.h. */
#include "fastattn.h"
#define FA_G16_LEVEL 0
#include "gemm_bf16_impl.h"
