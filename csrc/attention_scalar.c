/* attention_scalar.c: the fused attention work-item kernels at the scalar level
 * (FA_ISA_LEVEL 0), instantiated from attention_impl.h for float and
 * double, and for float queries against bfloat16, half and int8
 * K/V (FA_KV 1..3). Exports
 * fa_attention_block_{f32,f64,f32_bf16,f32_f16,f32_i8}_scalar. */
#include <string.h>

#include "kernel_table.h"
#define FA_ISA_LEVEL 0
#include "simd_map.h"

#define FA_T_F64 0
#include "attention_impl.h"
#undef FA_T_F64
#define FA_T_F64 1
#include "attention_impl.h"
#undef FA_T_F64
#define FA_T_F64 0
#define FA_KV 1
#include "attention_impl.h"
#undef FA_KV
#define FA_KV 2
#include "attention_impl.h"
#undef FA_KV
#define FA_KV 3
#include "attention_impl.h"
#undef FA_KV
