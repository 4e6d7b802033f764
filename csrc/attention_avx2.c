/* attention_avx2.c: the fused attention work-item kernels at the avx2 level
 * (FA_ISA_LEVEL 1), instantiated from attention_impl.h for float and
 * double, and for float queries against bfloat16, half and int8
 * K/V (FA_KV 1..3). Exports
 * fa_attention_block_{f32,f64,f32_bf16,f32_f16,f32_i8}_avx2. */
#include <string.h>

#include "kernel_table.h"
#define FA_ISA_LEVEL 1
#include "simd_map.h"

#include "attention_instances.h"
