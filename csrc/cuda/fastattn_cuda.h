/*
 * fastattn_cuda.h: the only interface between the CUDA code in csrc/cuda/
 * and Python (fastattn/_cuda.pyx). Plain C, so Cython compiles against it
 * with the host C compiler and never needs a CUDA header.
 *
 * Conventions shared by every entry point (they mirror csrc/fastattn.h):
 *   - sizes, indices and strides are int64_t; strides count ELEMENTS;
 *   - every pointer named in a view is DEVICE memory unless marked HOST;
 *   - every function returns an fa_cuda_status and never prints or aborts;
 *     on failure fa_cuda_last_error() describes the failing call;
 *   - work is queued on `stream` (a cudaStream_t; NULL is the legacy default
 *     stream) and the call returns without synchronising;
 *   - Python has validated shapes; the C side re-checks what memory safety
 *     needs (NULL pointers, negative sizes, int64 overflow, cuBLAS int range).
 */
#ifndef FASTATTN_CUDA_H
#define FASTATTN_CUDA_H

#include <stdint.h>

/* The enum values shared with the CPU kernels (mask kinds, causal
 * alignments, position-encoding and RoPE layouts, the float dtypes) are
 * defined once, in the CPU header, and only renamed here. */
#include "../fastattn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    FA_CUDA_OK = 0,
    FA_CUDA_ERR_INVALID = 1,   /* an argument is NULL, negative or unknown */
    FA_CUDA_ERR_OVERFLOW = 2,  /* a size overflows int64 or cuBLAS's int */
    FA_CUDA_ERR_NOMEM = 3,     /* device memory ran out */
    FA_CUDA_ERR_RUNTIME = 4,   /* any other CUDA runtime error */
    FA_CUDA_ERR_LAUNCH = 5,    /* a kernel launch failed */
    FA_CUDA_ERR_CUBLAS = 6,    /* a cuBLAS call failed */
    FA_CUDA_ERR_NO_DEVICE = 7  /* no CUDA device, or no (recent enough) driver */
} fa_cuda_status;

/* Element types. F32 and F64 are the compute types; the others are only
 * accepted as the source of fa_cuda_copy (which converts). */
typedef enum {
    FA_CUDA_F32 = FA_DTYPE_F32,
    FA_CUDA_F64 = FA_DTYPE_F64,
    FA_CUDA_F16 = 2,
    FA_CUDA_BOOL = 3, /* one byte, nonzero = true */
    FA_CUDA_I8 = 4,
    FA_CUDA_U8 = 5,
    FA_CUDA_I16 = 6,
    FA_CUDA_U16 = 7,
    FA_CUDA_I32 = 8,
    FA_CUDA_U32 = 9,
    FA_CUDA_I64 = 10,
    FA_CUDA_U64 = 11
} fa_cuda_dtype;

typedef enum {
    FA_CUDA_MASK_NONE = FA_MASK_NONE,
    FA_CUDA_MASK_BOOL = FA_MASK_BOOL,
    FA_CUDA_MASK_ADD = FA_MASK_ADD
} fa_cuda_mask_kind;
typedef enum {
    FA_CUDA_CAUSAL_NONE = FA_CAUSAL_NONE,
    FA_CUDA_CAUSAL_TOP_LEFT = FA_CAUSAL_TOP_LEFT,         /* key j > i is masked */
    FA_CUDA_CAUSAL_BOTTOM_RIGHT = FA_CAUSAL_BOTTOM_RIGHT, /* key j > i + (Lk - Lq) is masked */
    /* Bottom-right per row, aligned to the lengths instead of the axes:
     * key j > i + (key_len(b, m) - query_len(b, m)) is masked (the lengths
     * default to Lk and Lq). A ragged KV cache: query i of a sequence that
     * held key_len - query_len tokens before this call sees its own
     * position and everything before it. Not in csrc/fastattn.h. */
    FA_CUDA_CAUSAL_LENGTHS = FA_CAUSAL_BOTTOM_RIGHT + 1
} fa_cuda_causal;
typedef enum {
    FA_CUDA_PE_CONCAT = FA_PE_CONCAT,
    FA_CUDA_PE_INTERLEAVED = FA_PE_INTERLEAVED
} fa_cuda_pe_layout;
typedef enum { FA_CUDA_ROPE_NEOX = FA_ROPE_NEOX, FA_CUDA_ROPE_GPTJ = FA_ROPE_GPTJ } fa_cuda_rope_layout;

/* A strided view of up to 4 dimensions; unused trailing strides are 0. */
typedef struct {
    void *data;
    int64_t stride[4];
} fa_cuda_view4;

/* A mask broadcast to (B, M, Lq, Lk) with zero strides where broadcast.
 * kind BOOL: one byte per element (0 = masked); kind ADD: the kernel's dtype,
 * added to the scaled scores. data == NULL or kind NONE: no mask. */
typedef struct {
    const void *data;
    int kind;
    int64_t stride[4];
} fa_cuda_mask_view;

/* Per-(b, m) int64 lengths at data[b*stride_b + m*stride_m];
 * data == NULL means "the full axis". */
typedef struct {
    const int64_t *data;
    int64_t stride_b, stride_m;
} fa_cuda_lengths_view;

/* ---- runtime ------------------------------------------------------------ */

/* What the last failing call on this host thread was, and why. */
const char *fa_cuda_last_error(void);
/* Number of visible devices; FA_CUDA_ERR_NO_DEVICE without a driver. */
int fa_cuda_device_count(int *count);
/* CUDA runtime version this was built against and the driver's version. */
int fa_cuda_versions(int *runtime_version, int *driver_version);
/* Make `device` current for the calling host thread (CuPy may use its own
 * copy of the runtime, whose current device we cannot see). */
int fa_cuda_set_device(int device);
/* The device that owns `ptr`; FA_CUDA_ERR_INVALID for host memory. */
int fa_cuda_pointer_device(const void *ptr, int *device);
/* Make `consumer` wait for the work queued so far on `producer`. */
int fa_cuda_stream_wait(void *consumer, void *producer);

/* A cuBLAS handle for the current device (math mode: plain FP32/FP64, no
 * TF32, so float32 results meet the 1e-5 oracle tolerance). */
int fa_cuda_blas_create(void **handle);
int fa_cuda_blas_destroy(void *handle);

/* ---- data movement -------------------------------------------------------- */

/* dst[i0,i1,i2,i3] = (dst_dtype) src[i0,i1,i2,i3] over (n0, n1, n2, n3).
 * dst_dtype is F32 or F64, or equal to src_dtype (a plain copy).
 * split_heads, merge_heads and dtype conversion are this copy with permuted
 * source strides. src and dst must not partly overlap. */
int fa_cuda_copy(int dst_dtype, int src_dtype, fa_cuda_view4 src, fa_cuda_view4 dst,
                 int64_t n0, int64_t n1, int64_t n2, int64_t n3, void *stream);

/* KV-cache append of one dtype (F32 or F64), over src (B, M, L, C) and
 * dst (B, M, dst_len, C) strided views:
 *   dst[b, m, dst_row[b] + i, :] = src[b, m, i, :]   for i < min(rows[b], L).
 * dst_row and rows are contiguous int64 (B,) in DEVICE memory; a row that
 * would land outside [0, dst_len) is skipped, never written (Python checks
 * that none does). src and dst must not overlap. */
int fa_cuda_append_rows(int dtype, fa_cuda_view4 src, fa_cuda_view4 dst, int64_t B, int64_t M,
                        int64_t L, int64_t C, int64_t dst_len, const int64_t *dst_row,
                        const int64_t *rows, void *stream);

/* y: contiguous (B, M, L, C); rows l >= lengths(b, m) are set to +0. */
int fa_cuda_zero_padded_rows(int dtype, void *y, int64_t B, int64_t M, int64_t L,
                             int64_t C, const fa_cuda_lengths_view *lengths,
                             void *stream);

/* ---- fused masked softmax --------------------------------------------------
 * x, y: (B, M, Lq, Lk). Per row (b, m, i): s_j = x_j * scale (+ additive
 * mask); keys excluded by the bool mask, key_len or causality get exactly 0;
 * rows i >= query_len and rows with no valid key are all zero. x and y may
 * be the same memory when their views are equal. */
int fa_cuda_masked_softmax(int dtype, fa_cuda_view4 x, fa_cuda_view4 y, int64_t B,
                           int64_t M, int64_t Lq, int64_t Lk, double scale,
                           const fa_cuda_mask_view *mask,
                           const fa_cuda_lengths_view *key_len,
                           const fa_cuda_lengths_view *query_len, int causal,
                           void *stream);

/* ---- positional encodings ----------------------------------------------------
 * Tables as in csrc/fastattn.h (layout CONCAT or INTERLEAVED); angles are
 * computed in double precision. out: (length, channels), row stride in
 * elements, unit column stride. */
int fa_cuda_position_encoding(int dtype, void *out, int64_t row_stride, int64_t length,
                              int64_t channels, int layout, double min_timescale,
                              double max_timescale, int64_t start_index, void *stream);
/* y = x + PE over (B, length, channels) views (stride[0..2] used). */
int fa_cuda_add_position_encoding(int dtype, fa_cuda_view4 x, fa_cuda_view4 y, int64_t B,
                                  int64_t length, int64_t channels, int layout,
                                  double min_timescale, double max_timescale,
                                  int64_t start_index, void *stream);
/* Rotary embedding over (B, M, L, D) views, D even. positions: int64 view of
 * (B, M, L) (stride[0..2] used, zeros where broadcast). theta_i =
 * pos * base^(-2i/D) in double. NEOX rotates (i, i + D/2), GPTJ (2i, 2i + 1).
 * x and y may be the same memory when their views are equal. */
int fa_cuda_apply_rotary(int dtype, fa_cuda_view4 x, fa_cuda_view4 y, int64_t B,
                         int64_t M, int64_t L, int64_t D, fa_cuda_view4 positions,
                         int layout, double base, void *stream);

/* ---- cuBLAS GEMMs ---------------------------------------------------------------
 * y (rows, n_out) = x (rows, n_in) @ w (n_in, n_out) + bias (n_out), row-major;
 * x, w and y have unit column stride and the given row strides (so w may be
 * a column block of a wider concatenated weight); bias is contiguous or
 * NULL. */
int fa_cuda_linear(void *blas, int dtype, const void *x, int64_t x_row_stride,
                   const void *w, int64_t w_row_stride, const void *bias, void *y,
                   int64_t y_row_stride, int64_t rows, int64_t n_in, int64_t n_out,
                   void *stream);

/* Scaled dot-product attention. q (B, H, Lq, D), k (B, Hkv, Lk, D),
 * v (B, Hkv, Lk, Dv) and out (B, H, Lq, Dv) are contiguous; H % Hkv == 0 and
 * query head h reads kv head h / (H / Hkv). scores: contiguous workspace
 * (scores_batch, H, Lq, Lk) with 1 <= scores_batch <= B; the batch is run in
 * chunks of scores_batch items, and when scores_batch == B it ends holding
 * the attention weights. */
typedef struct {
    int dtype;
    int64_t B, H, Hkv, Lq, Lk, D, Dv;
    double scale;                    /* multiplies q.k before masks */
    int causal;                      /* fa_cuda_causal */
    fa_cuda_mask_view mask;          /* broadcast to (B, H, Lq, Lk) */
    fa_cuda_lengths_view key_len;    /* (B, H) */
    fa_cuda_lengths_view query_len;  /* (B, H) */
    const void *alibi_slopes;        /* (H,) of dtype, or NULL */
    /* ALiBi adds -slope[h] * (i + alibi_offset - j): 0 aligns the query
     * positions top-left, Lk - Lq bottom-right (as causal_alignment does). */
    int64_t alibi_offset;
    /* HOST (B,): keys [0, key_extent[b]) are the only ones any head of batch
     * item b may attend (from key_len and causality); GEMMs skip the rest
     * and never read V beyond it. NULL: all Lk keys. */
    const int64_t *key_extent;
} fa_cuda_sdpa_args;

int fa_cuda_sdpa(void *blas, const fa_cuda_sdpa_args *args, const void *q, const void *k,
                 const void *v, void *out, void *scores, int64_t scores_batch,
                 void *stream);

#ifdef __cplusplus
}
#endif
#endif /* FASTATTN_CUDA_H */
