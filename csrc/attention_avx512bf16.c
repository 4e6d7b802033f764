/* attention_avx512bf16.c: the all-bfloat16 fused attention work-item
 * kernel at the avx512bf16 level: the avx512 kernel (FA_ISA_LEVEL 2) with
 * bfloat16 K/V (FA_KV 1) whose tiled path computes Q.K^T and P.V with
 * vdpbf16ps on bf16 pair tiles (FA_DPBF16). Exports
 * fa_attention_block_bf16dp_avx512bf16; every other kernel of the level is
 * the avx512 one (dispatch.c). */
#include <string.h>

#if !defined(__AVX512BF16__)
#error "attention_avx512bf16.c needs -mavx512bf16"
#endif

#include "kernel_table.h"
#define FA_ISA_LEVEL 2
#include "simd_map.h"
/* the level-2 helpers under this file's own instance names */
#undef FA_ISA_SUFFIX
#define FA_ISA_SUFFIX avx512bf16

#define FA_T_F64 0
#define FA_KV 1
#define FA_DPBF16 1
#include "attention_impl.h"
