/*
 * dispatch.c: the kernel table of the selected ISA, the thread policy and
 * the small utilities every driver uses. Compiled with baseline flags only.
 */
#include <stdlib.h>

#include "internal.h"

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
/* No kernel of the table has a bf16-specific version yet: the avx512bf16
 * level runs the avx512 ones (the 16-bit GEMM picks its own, gemm_bf16.c). */
static const fa_kernel_table kernels_avx512bf16 = {
    .isa = FA_ISA_AVX512BF16, FA_KERNEL_LIST(FA_FIELD_AVX512)};
#endif

static const fa_kernel_table *table_for(int isa) {
#if defined(FA_HAVE_X86_KERNELS)
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
    if (isa < FA_ISA_SCALAR || isa > FA_ISA_AVX512BF16) return FA_ERR_INVALID;
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
        default: return "unknown";
    }
}

int fa_openmp_enabled(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int fa_default_num_threads(void) {
    if (fa_fork_child_serial()) return 1; /* see fork_safety.c */
#ifdef _OPENMP
    /* nthreads-var: OMP_NUM_THREADS, else the CPUs in the affinity mask;
     * threadpoolctl lowers it through omp_set_num_threads. */
    int n = omp_get_max_threads();
    return n > 0 ? n : 1;
#else
    return 1;
#endif
}

int fa_resolve_threads(int requested, int64_t work_items, int64_t total_elems) {
    int n = requested > 0 ? requested : fa_default_num_threads();
#ifndef _OPENMP
    n = 1;
#endif
    if (fa_fork_child_serial()) n = 1; /* see fork_safety.c */
    if (total_elems < FA_MIN_PARALLEL_ELEMS) n = 1;
    if (work_items < n) n = work_items > 0 ? (int)work_items : 1;
    return n < 1 ? 1 : n;
}

void fa_run_team(int nthreads, fa_team_fn fn, void *ctx) {
    if (nthreads <= 1) {
        fn(ctx, 0, 1);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    fn(ctx, omp_get_thread_num(), omp_get_num_threads());
#else
    for (int t = 0; t < nthreads; ++t) fn(ctx, t, nthreads);
#endif
}

int fa_view_ok(const int64_t *dims, const int64_t *strides, int n,
               int64_t elem_size) {
    int64_t reach = 0;
    for (int i = 0; i < n; ++i) {
        if (dims[i] < 0) return 0;
        if (dims[i] == 0) return 1; /* empty: nothing is ever addressed */
        int64_t s = strides[i] < 0 ? -strides[i] : strides[i];
        if (strides[i] == INT64_MIN) return 0;
        int64_t span;
        if (!fa_mul_ok(dims[i] - 1, s, &span)) return 0;
        if (reach > INT64_MAX - span) return 0;
        reach += span;
    }
    int64_t bytes;
    return fa_mul_ok(reach + 1, elem_size, &bytes) && (uint64_t)bytes <= SIZE_MAX;
}

void *fa_scratch_alloc(int64_t count, int64_t elem_size) {
    int64_t bytes;
    if (!fa_mul_ok(count, elem_size, &bytes)) return NULL;
    /* round up to the alignment, as aligned_alloc requires */
    if (bytes > INT64_MAX - 63) return NULL;
    bytes = (bytes + 63) & ~(int64_t)63;
    if (bytes == 0) bytes = 64;
    if ((uint64_t)bytes > SIZE_MAX) return NULL;
    return aligned_alloc(64, (size_t)bytes);
}

void fa_scratch_free(void *p) { free(p); }
