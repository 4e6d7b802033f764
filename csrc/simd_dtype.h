/*
 * simd_dtype.h: binds the generic names a kernel template uses (T, V, VL,
 * V_ADD, ...) to the float (vf32) or double (vf64) operations of simd_map.h.
 * Included once per dtype instance, after defining FA_T_F64 to 0 or 1; it
 * has no include guard on purpose.
 *
 * V_EXPB_NONPOS is B^x for the base B the softmax row kernel takes its
 * exponents in, and T_LOGB_E is log_B(e), folded into its scale: base 2 for
 * float (the reduction x = n + r is then exact, three vector operations
 * fewer per vector than exp's Cody-Waite split), base e for double.
 */
#include <float.h>
#undef T
#undef DT
#undef V
#undef VL
#undef V_LOADU
#undef V_STOREU
#undef V_SET1
#undef V_ZERO
#undef V_ADD
#undef V_SUB
#undef V_MUL
#undef V_FMADD
#undef V_MAX
#undef V_HMAX
#undef V_HSUM
#undef V_EXP_NONPOS
#undef V_EXPB_NONPOS
#undef T_LOGB_E
#undef V_KEEP
#undef S_EXP_NONPOS
#undef V_LOADN
#undef V_STREAM
#undef V_STOREN
#undef T_MAX
#undef V_TANH
#undef S_TANH
#undef KT
#undef KV_LOADU
#undef KV_LOADN
#undef KV_S
#undef KV_SCALED

#if FA_T_F64
#define T double
#define DT f64
#define V fa_vf64
#define VL FA_VF64_LANES
#define V_LOADU vf64_loadu
#define V_STOREU vf64_storeu
#define V_SET1 vf64_set1
#define V_ZERO vf64_zero
#define V_ADD vf64_add
#define V_SUB vf64_sub
#define V_MUL vf64_mul
#define V_FMADD vf64_fmadd
#define V_MAX vf64_max
#define V_HMAX vf64_hmax
#define V_HSUM vf64_hsum
#define V_EXP_NONPOS vf64_exp_nonpos
#define V_EXPB_NONPOS vf64_exp_nonpos
#define T_LOGB_E 1.0
#define V_KEEP vf64_keep
#define S_EXP_NONPOS fa_exp
#define V_LOADN vf64_loadn
#define V_STREAM vf64_stream
#define V_STOREN vf64_storen
#define T_MAX DBL_MAX
#define V_TANH vf64_tanh
#define S_TANH fa_tanh
#else
#define T float
#define DT f32
#define V fa_vf32
#define VL FA_VF32_LANES
#define V_LOADU vf32_loadu
#define V_STOREU vf32_storeu
#define V_SET1 vf32_set1
#define V_ZERO vf32_zero
#define V_ADD vf32_add
#define V_SUB vf32_sub
#define V_MUL vf32_mul
#define V_FMADD vf32_fmadd
#define V_MAX vf32_max
#define V_HMAX vf32_hmax
#define V_HSUM vf32_hsum
#define V_EXP_NONPOS vf32_exp_nonpos
#define V_EXPB_NONPOS vf32_exp2_nonpos
#define T_LOGB_E 1.4426950408889634
#define V_KEEP vf32_keep
#define S_EXP_NONPOS fa_expf_nonpos
#define V_LOADN vf32_loadn
#define V_STREAM vf32_stream
#define V_STOREN vf32_storen
#define T_MAX FLT_MAX
#define V_TANH vf32_tanh
#define S_TANH fa_tanhf
#endif

/* K/V storage (FA_KV, attention only): the same type as T (0, or
 * undefined), or, with float T, bfloat16 (1), IEEE half (2) or int8 with a
 * per-row scale (3). KV_LOADU / KV_LOADN widen a vector of K/V elements to
 * V, KV_S one element to T; KV_SCALED says the row scales apply. The
 * instance name (DT) gains the storage: fa_attention_block_f32_bf16_avx2. */
#if !defined(FA_KV) || FA_KV == 0
#define KT T
#define KV_LOADU V_LOADU
#define KV_LOADN V_LOADN
#define KV_S(x) (x)
#define KV_SCALED 0
#else
#if FA_T_F64
#error "narrow K/V storage is for float compute only"
#endif
#undef DT
#if FA_KV == 1
#define DT f32_bf16
#define KT uint16_t
#define KV_LOADU vf32_load_bf16
#define KV_LOADN vf32_loadn_bf16
#define KV_S fa_bf16_bits_to_f32
#define KV_SCALED 0
#elif FA_KV == 2
#define DT f32_f16
#define KT uint16_t
#define KV_LOADU vf32_load_f16
#define KV_LOADN vf32_loadn_f16
#define KV_S fa_f16_bits_to_f32
#define KV_SCALED 0
#elif FA_KV == 3
#define DT f32_i8
#define KT int8_t
#define KV_LOADU vf32_load_i8
#define KV_LOADN vf32_loadn_i8
#define KV_S(x) ((float)(x))
#define KV_SCALED 1
#else
#error "unknown FA_KV"
#endif
#endif
