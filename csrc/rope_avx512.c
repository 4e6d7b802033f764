/* rope_avx512.c: the rotary row kernels at the avx512 level
 * (FA_ISA_LEVEL 2), instantiated from rope_impl.h for float and double.
 * Exports fa_rope_row_f32_avx512 and fa_rope_row_f64_avx512; dispatch.c puts
 * them in the avx512 kernel table. */
#include "kernel_table.h"
#define FA_ISA_LEVEL 2
#include "simd_map.h"

#define FA_T_F64 0
#include "rope_impl.h"
#undef FA_T_F64
#define FA_T_F64 1
#include "rope_impl.h"
