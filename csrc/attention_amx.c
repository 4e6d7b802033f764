/* attention_amx.c: the all-bfloat16 fused attention work-item kernel at the
 * amx level: attention_avx512bf16.c's instance (FA_DPBF16) whose tiled path
 * computes Q.K^T (where D is a multiple of 32) and P.V (where Dv <= 256) on
 * AMX tiles (FA_AMX: scores_tile_amx, pv_tile_amx in attention_impl.h); the
 * softmax and the decode rows stay on AVX-512 and vdpbf16ps. Exports fa_attention_block_bf16dp_amx; every other
 * kernel of the level is the avx512 one (dispatch.c). */
#include <string.h>

/* GCC spells the macros __AMX_TILE__ / __AMX_BF16__, clang __AMXTILE__ /
 * __AMXBF16__ */
#if !(defined(__AMX_TILE__) || defined(__AMXTILE__)) || !(defined(__AMX_BF16__) || defined(__AMXBF16__))
#error "attention_amx.c needs -mamx-tile -mamx-bf16"
#endif

#include "kernel_table.h"
#define FA_ISA_LEVEL 2
#include "simd_map.h"
#include "amx_tiles.h"
/* the level-2 helpers under this file's own instance names */
#undef FA_ISA_SUFFIX
#define FA_ISA_SUFFIX amx

#define FA_T_F64 0
#define FA_KV 1
#define FA_DPBF16 1
#define FA_AMX 1
#include "attention_impl.h"
