/*
 * gemm_bf16.h: what the 16-bit GEMM driver (gemm_bf16.c) and its per-ISA
 * kernels (gemm_bf16_impl.h) share: the packed layouts and the kernel set.
 *
 * Packed weight, (N, K) -> panels of FA_G16_NR columns (the last one padded
 * with zero columns), each panel K2 = ceil(K / 2) pairs of k (an odd K gets
 * a zero k = K), one pair = 64 uint16 = 128 bytes:
 *   bf16: element (n = NR p + c, k = 2 q + e) at p K2 64 + q 64 + 2 c + e
 *         (pairs interleaved per column, as vdpbf16ps reads them; the fp32
 *         kernels split a 32-bit lane into k = 2q (<< 16) and 2q+1 (& mask));
 *   fp16: at p K2 64 + q 64 + 32 (c / 16) + 16 e + c % 16
 *         (16 columns of one k side by side, as vcvtph2ps reads them).
 * The layout does not depend on the ISA level, so a weight packed once
 * serves every level.
 *
 * Packed activations, per call: a block of rows is cut into tiles of MR
 * rows (the last padded with zero rows), each tile K2 pairs:
 *   dpbf16 kernels (FA_G16_A_PAIRS): uint32 at q MR + r, the bf16 pair
 *     (a[r, 2q] low half, a[r, 2q + 1] high half), ready to broadcast;
 *   fp32 kernels (FA_G16_A_F32): float at 2 (q MR + r) + e, a[r, 2q + e]
 *     converted exactly to float32;
 *   AMX (FA_G16_A_ROWS16): the pairs rounded up to a multiple of 16 (zero
 *     pairs), in blocks of 16: uint32 at (q / 16) 16 MR + 16 r + q % 16,
 *     so that a block's rows are an AMX A tile (16 pairs, 64 bytes a row).
 */
#ifndef FASTATTN_GEMM_BF16_H
#define FASTATTN_GEMM_BF16_H

#include <stdint.h>
#include "half_float.h"

/* Columns per packed panel: two AVX-512 float vectors, so the widest
 * micro-kernel's tile row is one panel; the narrower levels take it in
 * halves (AVX2) or element by element (scalar). */
#define FA_G16_NR 32
/* uint16 per packed pair of k in a panel */
#define FA_G16_PAIR_ELEMS (2 * FA_G16_NR)

enum { FA_G16_A_PAIRS = 0, FA_G16_A_F32 = 1, FA_G16_A_ROWS16 = 2 };

/* c (MR, FA_G16_NR), row stride ldc floats, = (accumulate ? c : 0) +
 * a_tile (MR rows, npairs pairs, packed) . w_panel (npairs pairs)^T. */
typedef void fa_g16_micro_fn(int64_t npairs, const void *a_tile, const uint16_t *w_panel,
                             float *c, int64_t ldc, int accumulate);

/* The same for a last tile of which only the first rows (< MR) are
 * output: the sums of rows past them are left undefined in c. */
typedef void fa_g16_micro_tail_fn(int64_t npairs, const void *a_tile, const uint16_t *w_panel,
                                  float *c, int64_t ldc, int accumulate, int rows);

/* Packs rows [0, rows) of a (rows <= the tile count * MR; the rest of the
 * last tile is zero), pairs [0, K2) of each, into the kernel's A layout.
 * a: row r at a + r * lda elements (uint16 bits of the dtype). */
typedef void fa_g16_pack_a_fn(const uint16_t *a, int64_t lda, int64_t rows, int64_t K,
                              void *packed);

/* out[r, j] = convert(alpha * acc[r, j] (+ bias[j])) for r < rows, j < cols;
 * acc row stride ldacc floats, out row stride ldout elements of out_dtype. */
typedef void fa_g16_epilogue_fn(const float *acc, int64_t ldacc, int64_t rows, int64_t cols,
                                float alpha, const float *bias, void *out, int64_t ldout,
                                int out_dtype);

/* Called by each thread before its first and after its last micro-kernel
 * call of a GEMM (the AMX set loads and releases its tile configuration,
 * which is per thread); NULL where nothing is needed. */
typedef void fa_g16_thread_fn(void);

typedef struct {
    int mr;         /* rows per micro-tile */
    int a_layout;   /* FA_G16_A_PAIRS, FA_G16_A_F32 or FA_G16_A_ROWS16 */
    /* a packed tile holds its pairs rounded up to a multiple of this (the
     * AMX set: whole 16-pair tile columns, zero-padded); 1 elsewhere */
    int pair_align;
    fa_g16_pack_a_fn *pack_a;
    fa_g16_micro_fn *micro;
    fa_g16_micro_tail_fn *micro_tail; /* NULL: the last tile runs micro */
    fa_g16_epilogue_fn *epilogue;
    fa_g16_thread_fn *begin, *end;
} fa_g16_kernels;

/* Per level and input dtype: fa_g16_<bf16|f16>_<isa>. The avx512bf16 file
 * has only the bf16 set (fp16 uses the avx512 one). */
extern const fa_g16_kernels fa_g16_bf16_scalar, fa_g16_f16_scalar;
#if defined(FA_HAVE_X86_KERNELS)
extern const fa_g16_kernels fa_g16_bf16_avx2, fa_g16_f16_avx2;
extern const fa_g16_kernels fa_g16_bf16_avx512, fa_g16_f16_avx512;
extern const fa_g16_kernels fa_g16_bf16_avx512bf16;
#endif
#if defined(FA_HAVE_AMX_KERNELS)
extern const fa_g16_kernels fa_g16_bf16_amx;
#endif

/* 1 when the CPU has F16C (cpu_features.c). */
int fa_cpu_has_f16c(void);

#endif /* FASTATTN_GEMM_BF16_H */
