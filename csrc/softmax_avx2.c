/* softmax_avx2.c: the masked-softmax row kernels at the avx2 level
 * (FA_ISA_LEVEL 1), instantiated from softmax_impl.h for float and double.
 * Exports fa_softmax_row_f32_avx2 and fa_softmax_row_f64_avx2; dispatch.c
 * puts them in the avx2 kernel table. */
#include "kernel_table.h"
#define FA_ISA_LEVEL 1
#include "simd_map.h"

#define FA_T_F64 0
#include "softmax_impl.h"
#undef FA_T_F64
#define FA_T_F64 1
#include "softmax_impl.h"
