/* attention_instances.h: every instance of the fused attention kernel that
 * one ISA file compiles from attention_impl.h: float and double, and float
 * queries against bfloat16, half and int8 K/V (FA_KV 1..3). Included once
 * by attention_scalar.c, attention_avx2.c and attention_avx512.c after they
 * set FA_ISA_LEVEL and include simd_map.h, so the three lists cannot drift
 * apart. No include guard: each ISA file includes it exactly once. */
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
