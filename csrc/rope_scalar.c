/* rope_scalar.c: the rotary row kernels at the scalar level
 * (FA_ISA_LEVEL 0), instantiated from rope_impl.h for float and double.
 * Exports fa_rope_row_f32_scalar and fa_rope_row_f64_scalar; dispatch.c puts
 * them in the scalar kernel table. */
#include "kernel_table.h"
#define FA_ISA_LEVEL 0
#include "simd_map.h"

#define FA_T_F64 0
#include "rope_impl.h"
#undef FA_T_F64
#define FA_T_F64 1
#include "rope_impl.h"
