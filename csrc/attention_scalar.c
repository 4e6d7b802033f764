/* attention_scalar.c: the fused attention work-item kernels at the scalar level
 * (FA_ISA_LEVEL 0), instantiated from attention_impl.h for float and
 * double. Exports fa_attention_block_f32_scalar and fa_attention_block_f64_scalar. */
#include <string.h>

#include "kernel_table.h"
#define FA_ISA_LEVEL 0
#include "simd_map.h"

#define FA_T_F64 0
#include "attention_impl.h"
#undef FA_T_F64
#define FA_T_F64 1
#include "attention_impl.h"
