/*
 * fastattn.h: the only interface between the C kernels and Cython.
 *
 * Conventions shared by every entry point:
 *   - sizes, indices and strides are int64_t; strides count ELEMENTS, not bytes;
 *   - every function returns an fa_status and never prints or aborts;
 *   - num_threads <= 0 means "the OpenMP default" (omp_get_max_threads(), which
 *     follows OMP_NUM_THREADS and threadpoolctl); OpenMP state is never changed;
 *   - the caller (Python) has already validated shapes; the C side re-checks
 *     what it needs for memory safety (sizes, overflow, NULL) and returns
 *     FA_ERR_INVALID / FA_ERR_OVERFLOW rather than trusting it.
 */
#ifndef FASTATTN_H
#define FASTATTN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    FA_OK = 0,
    FA_ERR_INVALID = 1,   /* an argument is out of range or NULL */
    FA_ERR_OVERFLOW = 2,  /* a size computation would overflow int64 / size_t */
    FA_ERR_NOMEM = 3,     /* scratch allocation failed */
    FA_ERR_ISA = 4        /* the requested ISA level is not supported here */
} fa_status;

/* FA_ISA_AVX512BF16: AVX512 plus AVX512_BF16 (vdpbf16ps); kernels without a
 * bf16-specific version run their avx512 code there. FA_ISA_AMX: that level
 * plus AMX-TILE and AMX-BF16 with the OS's permission to use the tile data
 * (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, requested on detection); the
 * bfloat16 GEMM runs on tiles there, everything else as at avx512bf16. */
typedef enum {
    FA_ISA_SCALAR = 0,
    FA_ISA_AVX2 = 1,
    FA_ISA_AVX512 = 2,
    FA_ISA_AVX512BF16 = 3,
    FA_ISA_AMX = 4
} fa_isa;

typedef enum { FA_DTYPE_F32 = 0, FA_DTYPE_F64 = 1 } fa_dtype;

/* Storage type of a K/V cache narrower than the compute dtype. */
typedef enum { FA_KV_SAME = 0, FA_KV_BF16 = 1, FA_KV_F16 = 2, FA_KV_I8 = 3 } fa_kv_dtype;

typedef enum { FA_MASK_NONE = 0, FA_MASK_BOOL = 1, FA_MASK_ADD = 2 } fa_mask_kind;

typedef enum {
    FA_CAUSAL_NONE = 0,
    FA_CAUSAL_TOP_LEFT = 1,     /* key j > i is masked */
    FA_CAUSAL_BOTTOM_RIGHT = 2  /* key j > i + (Lk - Lq) is masked */
} fa_causal;

/* ---- configuration ------------------------------------------------------ */

/* Best ISA level the CPU and OS support (CPUID + XGETBV), detected once. */
int fa_cpu_best_isa(void);
/* ISA level that was compiled into this build (x86 builds: AVX512). */
int fa_compiled_max_isa(void);
/* Currently selected level. */
int fa_get_isa(void);
/* Select a level <= fa_cpu_best_isa(); FA_ERR_ISA otherwise. Not thread-safe
 * against concurrent kernel calls: call it at import or between calls. */
int fa_set_isa(int isa);
const char *fa_isa_name(int isa);
/* 1 when built with OpenMP. */
int fa_openmp_enabled(void);
/* Thread count a call with num_threads <= 0 would use. */
int fa_default_num_threads(void);
/* The compiler and the flags of each source group, as recorded by setup.py. */
const char *fa_build_compiler(void);
const char *fa_build_flags(void);

/* ---- broadcast views used by several kernels ----------------------------- */

/* A mask broadcast to (B, M, Lq, Lk); zero strides express broadcasting.
 * kind FA_MASK_BOOL: data is uint8 (0 = masked, nonzero = may attend).
 * kind FA_MASK_ADD:  data has the kernel's dtype and is added to the scores. */
typedef struct {
    const void *data;
    int kind;
    int64_t stride_b, stride_m, stride_q, stride_k;
} fa_mask_view;

/* Per-(b, m) lengths: length(b, m) = data[b*stride_b + m*stride_m].
 * data == NULL means "no limit" (length = full axis). */
typedef struct {
    const int64_t *data;
    int64_t stride_b, stride_m;
} fa_lengths_view;

/* A 4-D strided tensor view (B, M, rows, cols), strides in elements. */
typedef struct {
    void *data;
    int64_t stride[4];
} fa_view4;

/* ---- fused masked softmax ------------------------------------------------
 * x, y: (B, M, Lq, Lk). For each row (b, m, i), over the last axis:
 *   s_j = x_j * scale (+ additive mask), keys excluded by the bool mask,
 *   key_len, or causality get probability exactly 0; rows i >= query_len and
 *   rows with no valid key are all zeros. Masked work is skipped.
 * x and y may be the same memory (in place) when their views are equal.
 * dtype FA_DTYPE_F32 / F64, or FA_DTYPE_BF16 / F16 (fa_dtype16): float32
 * arithmetic, the output rounded to nearest even; an additive mask is then
 * float32. */
int fa_masked_softmax(int dtype, fa_view4 x, fa_view4 y,
                      int64_t B, int64_t M, int64_t Lq, int64_t Lk,
                      double scale, const fa_mask_view *mask,
                      const fa_lengths_view *key_len,
                      const fa_lengths_view *query_len,
                      int causal, int num_threads);

/* ---- fused scaled-dot-product attention -----------------------------------
 * q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, H, Lq, Dv)
 * out = softmax(scale * q k^T + masks) v, with query head h reading kv head
 * h / (H / Hkv) (grouped-query attention; H % Hkv == 0).
 * The last axis of q, k, v, out and weights must be contiguous (stride 1).
 * mask: broadcast view over (B, H, Lq, Lk); key_len, query_len: per (b, h).
 * alignment places the diagonal that both the causal mask and ALiBi use:
 * query i sits at position i_pos = i (FA_CAUSAL_TOP_LEFT) or
 * i + Lk - Lq (FA_CAUSAL_BOTTOM_RIGHT); with is_causal, key j > i_pos is
 * masked; alibi_slopes (NULL or (H,) in the dtype) adds
 * -slope[h] * (i_pos - j). weights: NULL data, or (B, H, Lq, Lk) receiving
 * the softmax that produced out. Results are bitwise identical for every
 * num_threads.
 * Model features (a zero-filled struct turns every one of them off):
 *   key_start: per (b, h); keys j < start are masked and skipped (left
 *     padding), so the valid keys are [start, key_len);
 *   window: bit FA_WINDOW_LEFT bounds the left side, FA_WINDOW_RIGHT the
 *     right: key j is visible iff i_pos - window_left <= j <= i_pos +
 *     window_right (each >= 0); keys outside are never computed;
 *   softcap > 0: each scaled score s becomes softcap * tanh(s / softcap)
 *     before the masks and ALiBi;
 *   sinks: NULL or (H,) in the dtype: one logit per head added to every
 *     row's softmax denominator, exp(sink - m) with m the max over the
 *     row's scores and the sink; it has no value row. A row with no visible
 *     key stays 0. */
enum { FA_WINDOW_LEFT = 1, FA_WINDOW_RIGHT = 2 };

typedef struct {
    int64_t B, H, Hkv, Lq, Lk, D, Dv;
    fa_view4 q, k, v, out, weights;
    fa_mask_view mask;
    fa_lengths_view key_len, query_len;
    int is_causal;
    int alignment;
    double scale;
    const void *alibi_slopes;
    fa_lengths_view key_start;
    int window;
    int64_t window_left, window_right;
    double softcap;
    const void *sinks;
    /* Narrow K/V (dtype FA_DTYPE_F32 only): kv_dtype FA_KV_SAME (0) reads k
     * and v in the dtype; FA_KV_BF16 / FA_KV_F16 as 16-bit floats and
     * FA_KV_I8 as int8 with k_scale, v_scale: (B, Hkv, Lk, 1) float32 views
     * (stride[2] must be 1), element j of a head row is value * scale[j].
     * The kernel converts in registers; no fp32 copy of K/V is made. */
    int kv_dtype;
    fa_view4 k_scale, v_scale;
} fa_attention_args;

/* dtype FA_DTYPE_F32 or FA_DTYPE_F64; or FA_DTYPE_BF16 / FA_DTYPE_F16
 * (fa_dtype16, below): q and out are 16-bit floats, k and v too unless
 * kv_dtype says otherwise (any narrow storage), and everything else
 * (weights, additive masks, alibi_slopes, sinks, the sums and the softmax)
 * is float32. Each output element is rounded once, to nearest even. */

int fa_scaled_dot_product_attention(int dtype, const fa_attention_args *args,
                                    int num_threads);

/* ---- packed variable-length attention (flash-attn's varlen layout) --------
 * q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv) ->
 * out (total_q, H, Dv); each is passed as a fa_view4 over (1, heads, rows,
 * cols) whose stride[0] is ignored: stride[1] steps heads, stride[2] rows.
 * cu_q, cu_k: (B + 1,) prefix sums (0 = cu[0] <= cu[1] <= ... <= cu[B] =
 * total; checked, FA_ERR_INVALID otherwise): sequence b is query rows
 * cu_q[b]:cu_q[b+1] against key rows cu_k[b]:cu_k[b+1], with query i at
 * i_pos = i (top-left) or i + Lk_b - Lq_b (bottom-right). No padding
 * exists; the work items are (sequence, head, query chunk), run longest
 * first so that threads are balanced by tokens. Masks, causality, ALiBi,
 * window, softcap and sinks as in fa_attention_args; no weights output and
 * no split-KV. Bitwise identical for every num_threads. */
typedef struct {
    int64_t B, H, Hkv, total_q, total_k, D, Dv;
    const int64_t *cu_q, *cu_k;
    fa_view4 q, k, v, out;
    int is_causal;
    int alignment;
    double scale;
    const void *alibi_slopes;
    int window;
    int64_t window_left, window_right;
    double softcap;
    const void *sinks;
    /* K/V storage as in fa_attention_args, without int8 (packed batches
     * take no scales): FA_KV_SAME, or FA_KV_BF16 / FA_KV_F16 with float32
     * or 16-bit queries. q and out may be 16-bit as there (dtype
     * FA_DTYPE_BF16 / FA_DTYPE_F16, computed in float32). */
    int kv_dtype;
} fa_varlen_args;

int fa_varlen_attention(int dtype, const fa_varlen_args *args, int num_threads);

/* ---- attention over a paged KV cache (vLLM / flash-attn block tables) ------
 * k_cache (num_blocks, block_size, Hkv, D), v_cache (num_blocks, block_size,
 * Hkv, Dv), unit last strides; block_table (B, max_blocks) int64 with row
 * stride bt_stride; seq_lens (B,) int64 in [Lq, max_blocks * block_size].
 * Key t < seq_lens[b] of sequence b is row t % block_size of block
 * block_table[b, t / block_size]; every such entry must lie in
 * [0, num_blocks) (checked before anything runs: FA_ERR_INVALID). q
 * (B, H, Lq, D) holds the Lq newest tokens: query i sits at
 * seq_lens[b] - Lq + i, and is_causal hides later keys. out (B, H, Lq, Dv).
 * Window, softcap, sinks and ALiBi as in fa_attention_args. Decode shapes
 * use the same split-KV schedule as fa_scaled_dot_product_attention with
 * Lk = max(seq_lens). Bitwise identical for every num_threads. */
typedef struct {
    int64_t B, H, Hkv, Lq, D, Dv, num_blocks, block_size, max_blocks;
    fa_view4 q, out, k_cache, v_cache;
    const int64_t *block_table;
    int64_t bt_stride;
    const int64_t *seq_lens;
    int is_causal;
    double scale;
    const void *alibi_slopes;
    int window;
    int64_t window_left, window_right;
    double softcap;
    const void *sinks;
    /* q and out may be 16-bit (dtype FA_DTYPE_BF16 / FA_DTYPE_F16, computed
     * in float32, caches of that dtype by default), as for
     * fa_scaled_dot_product_attention. Narrow caches (float32 or 16-bit q),
     * as in fa_attention_args:
     * kv_dtype FA_KV_SAME (0), FA_KV_BF16, FA_KV_F16 or FA_KV_I8; int8
     * takes k_scale, v_scale: (num_blocks, block_size, Hkv, 1) float32
     * views, the scale of each cached row (NULL data otherwise). */
    int kv_dtype;
    fa_view4 k_scale, v_scale;
} fa_paged_args;

int fa_paged_attention(int dtype, const fa_paged_args *args, int num_threads);

/* ---- classic padding mask -------------------------------------------------
 * x, y: (B, P, L, C) strided views, where L is the masked axis, P collapses
 * the axes between batch and it, C the axes after it. lengths: (B,) int64.
 * mode FA_SEQMASK_MUL zeroes positions >= length; FA_SEQMASK_ADD returns
 * x - 1e12 there (x itself elsewhere), the classic additive padding mask. */
typedef enum { FA_SEQMASK_MUL = 0, FA_SEQMASK_ADD = 1 } fa_seqmask_mode;

int fa_apply_sequence_mask(int dtype, fa_view4 x, fa_view4 y,
                           int64_t B, int64_t P, int64_t L, int64_t C,
                           const int64_t *lengths, int mode, int num_threads);

/* ---- head split / merge --------------------------------------------------
 * split: x (B, S, H*D) viewed as (B, S, H, D) with the strides in x4
 *        -> y contiguous (B, H, S, D).
 * merge: x (B, H, S, D) strided -> y contiguous (B, S, H*D).
 * elem_size is 2, 4 or 8: these are pure data movement. */
int fa_split_heads(int elem_size, fa_view4 x, void *y,
                   int64_t B, int64_t S, int64_t H, int64_t D, int num_threads);
int fa_merge_heads(int elem_size, fa_view4 x, void *y,
                   int64_t B, int64_t H, int64_t S, int64_t D, int num_threads);

/* ---- sinusoidal positional encodings ------------------------------------
 * FA_PE_CONCAT: tensor2tensor get_timing_signal_1d, [sin | cos], an odd
 * channel count gets a trailing zero column; FA_PE_INTERLEAVED: the paper,
 * sin at 2i, cos at 2i+1. Angles are carried in double precision. */
typedef enum { FA_PE_CONCAT = 0, FA_PE_INTERLEAVED = 1 } fa_pe_layout;

typedef struct {
    int layout;
    double min_timescale, max_timescale;
    int64_t start_index;
} fa_pe_params;

/* out: (length, channels) with row stride out_row_stride (elements). */
int fa_position_encoding(int dtype, void *out, int64_t out_row_stride,
                         int64_t length, int64_t channels,
                         const fa_pe_params *p, int num_threads);

/* y = x + PE, x and y viewed as (B, length, channels) with the strides in
 * the first three entries of each view; the table is never materialised. */
int fa_add_position_encoding(int dtype, fa_view4 x, fa_view4 y,
                             int64_t B, int64_t length, int64_t channels,
                             const fa_pe_params *p, int num_threads);

/* ---- fork safety (csrc/fork_safety.c, docs/reliability.md) -------------
 * 1 when the calling thread is the one that called fork() in a child process
 * (or descends from it through further forks): GNU OpenMP's worker pool did
 * not survive the fork, so that thread's kernels run on one thread. 0 in
 * the parent and in threads the child starts later. */
int fa_fork_child_serial(void);

/* ==== rotary position embedding (RoPE) of the multi-head attention layer;
 * see rope.c (table, driver) and rope_impl.h (row kernel) ================= */

typedef enum { FA_ROPE_NONE = 0, FA_ROPE_NEOX = 1, FA_ROPE_GPTJ = 2 } fa_rope_layout;

/* cos_out, sin_out: (n, half) contiguous in the dtype, for the angles
 * pos_p * base^(-2j / (2 * half)), j < half, with pos_p = positions[p]
 * (positions: n int64) or start + p when positions is NULL. */
int fa_rope_table(int dtype, void *cos_out, void *sin_out, int64_t n, int64_t half,
                  const int64_t *positions, int64_t start, double base, int num_threads);

/* x, y: (N0, N1, L, D) views with unit last-axis strides; y may be x itself
 * (in place) or must not overlap it. Row (n0, n1, l) of x, for l < rows[n0]
 * (every l < L when rows is NULL), goes to row (n0, n1, l + y_row_offset[n0])
 * of y (offset 0 when y_row_offset is NULL), rotated by table row t = index[n0*is0 + n1*is1 + l*is2] (0 <= t <
 * table_len, all checked before anything is written; zero strides
 * broadcast). NEOX: (y_j, y_{j+D/2}) = (x_j c - x_{j+D/2} s, x_{j+D/2} c + x_j s);
 * GPTJ: the same on (x_2j, x_2j+1); NONE: a copy (index and table unused). */
typedef struct {
    int64_t N0, N1, L, D;
    fa_view4 x, y;
    const int64_t *rows;
    const int64_t *y_row_offset;
    const int64_t *index;
    int64_t index_stride[3];
    const void *cos, *sin;
    int64_t table_len;
    int layout;
} fa_rope_args;

/* dtype FA_DTYPE_F32 / F64: x, y and the tables of that dtype;
 * FA_DTYPE_BF16 / F16: x and y of that dtype, float32 tables, each row
 * rotated in float32 and rounded to nearest even once. */
int fa_rope_apply(int dtype, const fa_rope_args *args, int num_threads);

/* ==== end of the RoPE block ================================================ */

/* ---- projections through a caller-supplied BLAS (csrc/linear.c) ----------
 * The BLAS is passed in, not linked: Fortran-ABI routines with every argument
 * by pointer, as scipy.linalg.cython_blas exports them. */
typedef void fa_sgemm_fn(char *transa, char *transb, int *m, int *n, int *k, float *alpha,
                         float *a, int *lda, float *b, int *ldb, float *beta, float *c, int *ldc);
typedef void fa_dgemm_fn(char *transa, char *transb, int *m, int *n, int *k, double *alpha,
                         double *a, int *lda, double *b, int *ldb, double *beta, double *c,
                         int *ldc);
typedef void fa_sgemv_fn(char *trans, int *m, int *n, float *alpha, float *a, int *lda, float *x,
                         int *incx, float *beta, float *y, int *incy);
typedef void fa_dgemv_fn(char *trans, int *m, int *n, double *alpha, double *a, int *lda,
                         double *x, int *incx, double *beta, double *y, int *incy);

/* Called single-threaded from each OpenMP thread when num_threads > 1: the
 * BLAS must not start threads of its own then (fastattn.mha pins it). */
typedef struct {
    fa_sgemm_fn *sgemm;
    fa_dgemm_fn *dgemm;
    fa_sgemv_fn *sgemv;
    fa_dgemv_fn *dgemv;
} fa_blas;

/* Optional epilogue: RoPE (fa_rope_apply) on columns [0, heads * D) of the
 * computed rows, as heads heads of dim D; row (b, h, i) is rotated by table
 * row index[b*is0 + h*is1 + i*is2] of cos, sin ((table_len, D/2) contiguous
 * in the dtype). Off when enabled is 0 (the rest is then unused). */
typedef struct {
    int enabled;
    int layout;
    int64_t heads, D;
    const int64_t *index; /* (B, heads, M) view, zero strides broadcast */
    int64_t index_stride[3];
    const void *cos, *sin;
    int64_t table_len;
} fa_linear_rope;

/* c[b, r0:r1] = alpha * a[b, r0:r1] @ w (+ bias) for every b, with
 * r0 = row_start[b] (0 when NULL) and r1 = row_stop[b] (M when NULL), both
 * within [0, M]; rows outside [r0, r1) are not touched. Then the epilogue.
 * a (B, M, K), w (K, N), c (B, M, N): one dtype, unit last-axis strides, any
 * row and batch strides (rows must not overlap: row stride >= columns); w
 * may instead have a unit first-axis stride (the transpose of a row-major
 * (N, K) matrix, such as torch's nn.Linear weight), read in place.
 * bias: NULL or (N,) contiguous. M, N, K and the row strides must fit the
 * 32-bit BLAS (FA_ERR_OVERFLOW otherwise). The columns are split over up to
 * num_threads threads; an epilogue failure (a bad index) is reported after
 * the products were written.
 * deterministic != 0: the columns (or, for at most a few rows, K) are cut
 * into blocks that depend on M, N and K only, one BLAS call each, summed in a
 * fixed order, so c is bitwise the same for every num_threads (given a BLAS
 * that is deterministic for one call). 0: one block per thread,
 * fewer BLAS calls, but the bits may change with num_threads. */
typedef struct {
    int64_t B, M, K, N;
    const void *a;
    int64_t a_stride[3];
    const void *w;
    int64_t w_stride[2];
    void *c;
    int64_t c_stride[3];
    const void *bias;
    const int64_t *row_start, *row_stop; /* NULL or (B,) */
    double alpha;
    int deterministic;
    fa_linear_rope rope;
} fa_linear_args;

int fa_linear(int dtype, const fa_linear_args *args, const fa_blas *blas, int num_threads);

/* ---- int8 K/V quantisation --------------------------------------------------
 * x: (B, H, L, D) float32, values: (B, H, L, D) int8, both with a unit last
 * stride; scales: (B, H, L, 1) float32 (stride[3] ignored). Per row
 * (b, h, l), symmetric:
 *   scale = max|x| / 127 (in float),  values = rint(x / scale) (in float,
 *   round half to even, within [-127, 127]);
 * a row of zeros gets scale 0 and values 0. A NaN in the row makes its
 * scale NaN, an infinity makes it inf; either way its values are 0 (NaN
 * has no int8 value). Strided views let a cache append quantise straight
 * into its storage. fa_dequantize_kv is the inverse, y = values * scale,
 * with y a (B, H, L, D) float32 view. */
int fa_quantize_kv(fa_view4 x, fa_view4 values, fa_view4 scales, int64_t B, int64_t H,
                   int64_t L, int64_t D, int num_threads);
int fa_dequantize_kv(fa_view4 values, fa_view4 scales, fa_view4 y, int64_t B, int64_t H,
                     int64_t L, int64_t D, int num_threads);

/* ==== 16-bit GEMM for projections (csrc/gemm_bf16.c) =======================
 * c (M, N) = alpha * a (M, K) . w (N, K)^T (+ bias), a and w bfloat16 or
 * float16, products summed in float32, c float32 or the input dtype.
 *
 * w is packed once (fa_gemm16_pack_weight) into a layout the micro-kernels
 * stream; a is read as it lies (unit column stride, any row stride).
 * Each c[i, j] sums its K products in one fixed order, pair by pair
 * (k = 2p + 1 then k = 2p, as vdpbf16ps does), in float32 whatever the ISA
 * level, the blocking or the thread count: results are bitwise identical
 * for every num_threads, and across ISA levels except where a product or a
 * partial sum is subnormal (vdpbf16ps flushes those to zero).
 * 16-bit outputs are rounded to nearest even; a NaN stays a (quiet) NaN. */
typedef enum { FA_DTYPE_BF16 = 2, FA_DTYPE_F16 = 3 } fa_dtype16;

/* Elements (uint16) of the packed form of a (N, K) weight; -1 on overflow. */
int64_t fa_gemm16_packed_elems(int64_t N, int64_t K);

/* Packs w (N, K) of dtype FA_DTYPE_BF16 or FA_DTYPE_F16, element (n, k) at
 * w[n * w_stride_n + k * w_stride_k], into packed (packed_elems uint16,
 * at least fa_gemm16_packed_elems(N, K); 64-byte alignment is faster). */
int fa_gemm16_pack_weight(int dtype, const void *w, int64_t N, int64_t K,
                          int64_t w_stride_n, int64_t w_stride_k,
                          void *packed, int64_t packed_elems, int num_threads);

typedef struct {
    int dtype;            /* FA_DTYPE_BF16 or FA_DTYPE_F16: a and the packed w */
    int out_dtype;        /* FA_DTYPE_F32 or dtype */
    int64_t M, N, K;
    const void *a;        /* (M, K), row i at a + i * a_row_stride */
    int64_t a_row_stride;
    const void *packed_w; /* fa_gemm16_pack_weight of (N, K) in dtype */
    int64_t packed_elems; /* its length (uint16), checked against N and K */
    void *c;              /* (M, N), row i at c + i * c_row_stride */
    int64_t c_row_stride;
    const float *bias;    /* NULL or (N,) float32 */
    float alpha;
} fa_gemm16_args;

int fa_gemm16(const fa_gemm16_args *args, int num_threads);

/* ==== end of the 16-bit GEMM block ========================================= */

#ifdef __cplusplus
}
#endif
#endif /* FASTATTN_H */
