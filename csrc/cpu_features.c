/*
 * cpu_features.c: which SIMD level this CPU *and* its OS can run.
 *
 * CPUID says what the core implements; XGETBV says which register files the
 * OS saves on a context switch. Both are needed: running AVX code where the
 * OS does not save the YMM/ZMM state corrupts registers at random.
 */
/* syscall() (the AMX permission request) is not ISO C */
#define _DEFAULT_SOURCE
#include <stddef.h>

#include "fastattn.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

static uint64_t read_xcr0(void) {
    uint32_t eax, edx;
    /* xgetbv with ecx = 0 reads XCR0; encoded as bytes so that no -mxsave
     * flag is needed on this baseline-compiled file. */
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

/* AMX: CPUID leaf 7 EDX bits 24 (AMX-TILE) and 22 (AMX-BF16), the OS
 * saving the tile state (XCR0 bits 17 XTILECFG and 18 XTILEDATA), and, on
 * Linux, the process's permission to use the tile data: a process starts
 * without it, and the first tile instruction would then fault
 * (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, 18, which the
 * kernel grants where it supports AMX and the signal stack has room; a
 * forked child inherits it). Elsewhere the OS's permission cannot be asked
 * for, so AMX is not used. */
static int detect_amx(unsigned int leaf7_edx, uint64_t xcr0) {
    const int has_tile = (leaf7_edx >> 24) & 1, has_bf16 = (leaf7_edx >> 22) & 1;
    if (!has_tile || !has_bf16 || (xcr0 & 0x60000) != 0x60000) return 0;
#if defined(__linux__) && defined(SYS_arch_prctl)
    const long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
#else
    return 0;
#endif
}

static int detect_best_isa(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return FA_ISA_SCALAR;
    const int has_osxsave = (c >> 27) & 1;
    const int has_avx = (c >> 28) & 1;
    const int has_fma = (c >> 12) & 1;
    /* F16C: the avx2 kernels widen half-precision K/V with it; every CPU
     * with AVX2 has it, but a hypervisor may hide it, and then the scalar
     * kernels are the safe choice */
    const int has_f16c = (c >> 29) & 1;
    if (!has_osxsave || !has_avx || !has_fma || !has_f16c) return FA_ISA_SCALAR;

    const uint64_t xcr0 = read_xcr0();
    const int os_ymm = (xcr0 & 0x6) == 0x6;    /* XMM and YMM state */
    const int os_zmm = (xcr0 & 0xe6) == 0xe6;  /* plus opmask, ZMM_Hi256, Hi16_ZMM */
    if (!os_ymm) return FA_ISA_SCALAR;

    if (__get_cpuid_max(0, NULL) < 7) return FA_ISA_SCALAR;
    __cpuid_count(7, 0, a, b, c, d);
    const int has_avx2 = (b >> 5) & 1;
    const int has_avx512f = (b >> 16) & 1;
    const int has_avx512dq = (b >> 17) & 1;
    const int has_avx512bw = (b >> 30) & 1;
    const int has_avx512vl = (b >> 31) & 1;
    if (!has_avx2) return FA_ISA_SCALAR;
    if (os_zmm && has_avx512f && has_avx512dq && has_avx512bw && has_avx512vl) {
        /* AVX512_BF16 is leaf 7 subleaf 1, EAX bit 5; subleaf 1 exists when
         * subleaf 0 reports a maximum subleaf >= 1 in its EAX (a, above).
         * It needs the ZMM state checked above and nothing more. */
        unsigned int a1 = 0, b1, c1, d1;
        if (a >= 1) __cpuid_count(7, 1, a1, b1, c1, d1);
        if (!((a1 >> 5) & 1)) return FA_ISA_AVX512;
        /* the tile permission is asked for only where this build has the
         * AMX kernels (fa_cpu_best_isa caps the level the same way) */
        if (fa_compiled_max_isa() >= FA_ISA_AMX && detect_amx(d, xcr0)) return FA_ISA_AMX;
        return FA_ISA_AVX512BF16;
    }
    return FA_ISA_AVX2;
}

/* F16C (CPUID leaf 1, ECX bit 29): the half-precision conversions the avx2
 * 16-bit GEMM uses. Every AVX-512 CPU has them (its EVEX forms are AVX512F),
 * but the AVX2 level does not require them. */
static int detect_f16c(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c >> 29) & 1;
}
#else
static int detect_best_isa(void) { return FA_ISA_SCALAR; }
static int detect_f16c(void) { return 0; }
#endif

int fa_cpu_has_f16c(void) {
    static int cached = -1;
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        v = detect_f16c();
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}

int fa_cpu_best_isa(void) {
    /* Idempotent and race-free: every caller computes the same value. */
    static int cached = -1;
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        v = detect_best_isa();
        if (v > fa_compiled_max_isa()) v = fa_compiled_max_isa();
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}

int fa_compiled_max_isa(void) {
#if defined(FA_HAVE_AMX_KERNELS)
    return FA_ISA_AMX;
#elif defined(FA_HAVE_X86_KERNELS)
    return FA_ISA_AVX512BF16;
#else
    return FA_ISA_SCALAR;
#endif
}
