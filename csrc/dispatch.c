/*
 * dispatch.c: the kernel table of each compiled ISA, the selected one, and
 * the build description. Compiled with baseline flags only.
 */
#include <stddef.h>

#include "kernel_table.h"

/* setup.py writes fa_build_config.h into the build directory; a build
 * without it (a hand-made one) reports "unknown". */
#if defined(__has_include)
#if __has_include("fa_build_config.h")
#include "fa_build_config.h"
#endif
#endif
#ifndef FA_BUILD_COMPILER
#define FA_BUILD_COMPILER "unknown"
#endif
#ifndef FA_BUILD_FLAGS
#define FA_BUILD_FLAGS "unknown"
#endif

const char *fa_build_compiler(void) { return FA_BUILD_COMPILER; }
const char *fa_build_flags(void) { return FA_BUILD_FLAGS; }

/* Declare fa_<kernel>_<dtype>_<isa> for every kernel, then build the table. */
#define FA_DECLARE(name, dt, type, isa) extern type fa_##name##_##dt##_##isa;
#define FA_FIELD(name, dt, type, isa) .name##_##dt = fa_##name##_##dt##_##isa,
#define FA_DECLARE_SCALAR(n, d, t) FA_DECLARE(n, d, t, scalar)
#define FA_FIELD_SCALAR(n, d, t) FA_FIELD(n, d, t, scalar)
FA_KERNEL_LIST(FA_DECLARE_SCALAR)
static const fa_kernel_table kernels_scalar = {
    .isa = FA_ISA_SCALAR, FA_KERNEL_LIST(FA_FIELD_SCALAR)};

#if defined(FA_HAVE_X86_KERNELS)
#define FA_DECLARE_AVX2(n, d, t) FA_DECLARE(n, d, t, avx2)
#define FA_FIELD_AVX2(n, d, t) FA_FIELD(n, d, t, avx2)
#define FA_DECLARE_AVX512(n, d, t) FA_DECLARE(n, d, t, avx512)
#define FA_FIELD_AVX512(n, d, t) FA_FIELD(n, d, t, avx512)
FA_KERNEL_LIST(FA_DECLARE_AVX2)
FA_KERNEL_LIST(FA_DECLARE_AVX512)
static const fa_kernel_table kernels_avx2 = {
    .isa = FA_ISA_AVX2, FA_KERNEL_LIST(FA_FIELD_AVX2)};
static const fa_kernel_table kernels_avx512 = {
    .isa = FA_ISA_AVX512, FA_KERNEL_LIST(FA_FIELD_AVX512)};
/* The avx512bf16 level runs the avx512 kernels plus the all-bf16 attention
 * kernel on vdpbf16ps (the 16-bit GEMM picks its own, gemm_bf16.c). */
extern fa_attention_block_f32_fn fa_attention_block_bf16dp_avx512bf16;
static const fa_kernel_table kernels_avx512bf16 = {
    .isa = FA_ISA_AVX512BF16, FA_KERNEL_LIST(FA_FIELD_AVX512)
    .attention_block_bf16dp = fa_attention_block_bf16dp_avx512bf16};
/* The amx level: the avx512bf16 kernels with Q.K^T and P.V of the all-bf16
 * one on AMX tiles (the 16-bit GEMM picks its AMX kernel set, gemm_bf16.c). */
#if defined(FA_HAVE_AMX_KERNELS)
extern fa_attention_block_f32_fn fa_attention_block_bf16dp_amx;
#define FA_BF16DP_AMX fa_attention_block_bf16dp_amx
#else
#define FA_BF16DP_AMX fa_attention_block_bf16dp_avx512bf16
#endif
static const fa_kernel_table kernels_amx = {
    .isa = FA_ISA_AMX, FA_KERNEL_LIST(FA_FIELD_AVX512)
    .attention_block_bf16dp = FA_BF16DP_AMX};
#endif

static const fa_kernel_table *table_for(int isa) {
#if defined(FA_HAVE_X86_KERNELS)
    if (isa == FA_ISA_AMX) return &kernels_amx;
    if (isa == FA_ISA_AVX512BF16) return &kernels_avx512bf16;
    if (isa == FA_ISA_AVX512) return &kernels_avx512;
    if (isa == FA_ISA_AVX2) return &kernels_avx2;
#endif
    (void)isa;
    return &kernels_scalar;
}

/* NULL until the first query, then the best level; fa_set_isa overrides. */
static const fa_kernel_table *selected = NULL;

const fa_kernel_table *fa_kernels(void) {
    const fa_kernel_table *t = __atomic_load_n(&selected, __ATOMIC_ACQUIRE);
    if (t == NULL) {
        t = table_for(fa_cpu_best_isa());
        __atomic_store_n(&selected, t, __ATOMIC_RELEASE);
    }
    return t;
}

int fa_get_isa(void) { return fa_kernels()->isa; }

int fa_set_isa(int isa) {
    if (isa < FA_ISA_SCALAR || isa > FA_ISA_AMX) return FA_ERR_INVALID;
    if (isa > fa_cpu_best_isa()) return FA_ERR_ISA;
    __atomic_store_n(&selected, table_for(isa), __ATOMIC_RELEASE);
    return FA_OK;
}

const char *fa_isa_name(int isa) {
    switch (isa) {
        case FA_ISA_SCALAR: return "scalar";
        case FA_ISA_AVX2: return "avx2";
        case FA_ISA_AVX512: return "avx512";
        case FA_ISA_AVX512BF16: return "avx512bf16";
        case FA_ISA_AMX: return "amx";
        default: return "unknown";
    }
}
