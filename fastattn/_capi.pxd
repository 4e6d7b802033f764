# Declarations of csrc/fastattn.h, the only C interface. Nothing else.
from libc.stdint cimport int64_t, uint8_t

cdef extern from "fastattn.h" nogil:
    ctypedef enum fa_status:
        FA_OK
        FA_ERR_INVALID
        FA_ERR_OVERFLOW
        FA_ERR_NOMEM
        FA_ERR_ISA

    # The enums, read by name: _kernels.pyx hands their values to Python, so
    # no value is ever retyped there.
    ctypedef enum fa_isa:
        FA_ISA_SCALAR
        FA_ISA_AVX2
        FA_ISA_AVX512
    ctypedef enum fa_dtype:
        FA_DTYPE_F32
        FA_DTYPE_F64
    ctypedef enum fa_kv_dtype:
        FA_KV_SAME
        FA_KV_BF16
        FA_KV_F16
        FA_KV_I8
    ctypedef enum fa_mask_kind:
        FA_MASK_NONE
        FA_MASK_BOOL
        FA_MASK_ADD
    ctypedef enum fa_causal:
        FA_CAUSAL_NONE
        FA_CAUSAL_TOP_LEFT
        FA_CAUSAL_BOTTOM_RIGHT
    ctypedef enum fa_seqmask_mode:
        FA_SEQMASK_MUL
        FA_SEQMASK_ADD
    ctypedef enum fa_pe_layout:
        FA_PE_CONCAT
        FA_PE_INTERLEAVED
    ctypedef enum fa_rope_layout:
        FA_ROPE_NONE
        FA_ROPE_NEOX
        FA_ROPE_GPTJ

    ctypedef struct fa_mask_view:
        const void *data
        int kind
        int64_t stride_b, stride_m, stride_q, stride_k

    ctypedef struct fa_lengths_view:
        const int64_t *data
        int64_t stride_b, stride_m

    ctypedef struct fa_view4:
        void *data
        int64_t stride[4]

    ctypedef struct fa_pe_params:
        int layout
        double min_timescale, max_timescale
        int64_t start_index

    int fa_cpu_best_isa()
    int fa_compiled_max_isa()
    int fa_get_isa()
    int fa_set_isa(int isa)
    const char *fa_isa_name(int isa)
    int fa_openmp_enabled()
    int fa_default_num_threads()
    const char *fa_build_compiler()
    const char *fa_build_flags()

    int fa_masked_softmax(int dtype, fa_view4 x, fa_view4 y,
                          int64_t B, int64_t M, int64_t Lq, int64_t Lk,
                          double scale, const fa_mask_view *mask,
                          const fa_lengths_view *key_len,
                          const fa_lengths_view *query_len,
                          int causal, int num_threads)
    ctypedef struct fa_attention_args:
        int64_t B, H, Hkv, Lq, Lk, D, Dv
        fa_view4 q, k, v, out, weights
        fa_mask_view mask
        fa_lengths_view key_len, query_len
        int is_causal
        int alignment
        double scale
        const void *alibi_slopes
        fa_lengths_view key_start
        int window
        int64_t window_left, window_right
        double softcap
        const void *sinks
        int kv_dtype
        fa_view4 k_scale, v_scale

    int FA_WINDOW_LEFT
    int FA_WINDOW_RIGHT

    ctypedef struct fa_varlen_args:
        int64_t B, H, Hkv, total_q, total_k, D, Dv
        const int64_t *cu_q
        const int64_t *cu_k
        fa_view4 q, k, v, out
        int is_causal
        int alignment
        double scale
        const void *alibi_slopes
        int window
        int64_t window_left, window_right
        double softcap
        const void *sinks
        int kv_dtype

    int fa_varlen_attention(int dtype, const fa_varlen_args *args, int num_threads)
    int fa_quantize_kv(fa_view4 x, fa_view4 values, fa_view4 scales, int64_t B, int64_t H,
                       int64_t L, int64_t D, int num_threads)
    int fa_dequantize_kv(fa_view4 values, fa_view4 scales, fa_view4 y, int64_t B, int64_t H,
                         int64_t L, int64_t D, int num_threads)

    ctypedef struct fa_paged_args:
        int64_t B, H, Hkv, Lq, D, Dv, num_blocks, block_size, max_blocks
        fa_view4 q, out, k_cache, v_cache
        const int64_t *block_table
        int64_t bt_stride
        const int64_t *seq_lens
        int is_causal
        double scale
        const void *alibi_slopes
        int window
        int64_t window_left, window_right
        double softcap
        const void *sinks
        int kv_dtype
        fa_view4 k_scale, v_scale

    int fa_paged_attention(int dtype, const fa_paged_args *args, int num_threads)
    int fa_scaled_dot_product_attention(int dtype, const fa_attention_args *args,
                                        int num_threads)
    int fa_apply_sequence_mask(int dtype, fa_view4 x, fa_view4 y,
                               int64_t B, int64_t P, int64_t L, int64_t C,
                               const int64_t *lengths, int mode, int num_threads)
    int fa_split_heads(int elem_size, fa_view4 x, void *y,
                       int64_t B, int64_t S, int64_t H, int64_t D, int num_threads)
    int fa_merge_heads(int elem_size, fa_view4 x, void *y,
                       int64_t B, int64_t H, int64_t S, int64_t D, int num_threads)
    int fa_position_encoding(int dtype, void *out, int64_t out_row_stride,
                             int64_t length, int64_t channels,
                             const fa_pe_params *p, int num_threads)
    int fa_add_position_encoding(int dtype, fa_view4 x, fa_view4 y,
                                 int64_t B, int64_t length, int64_t channels,
                                 const fa_pe_params *p, int num_threads)

# ---- fork safety (csrc/fork_safety.c) ------------------------------------------
cdef extern from "fastattn.h" nogil:
    int fa_fork_child_serial()

# ---- RoPE (csrc/rope.c) -----------------------------------------------------------
cdef extern from "fastattn.h" nogil:
    int fa_rope_table(int dtype, void *cos_out, void *sin_out, int64_t n, int64_t half,
                      const int64_t *positions, int64_t start, double base, int num_threads)

    ctypedef struct fa_rope_args:
        int64_t N0, N1, L, D
        fa_view4 x, y
        const int64_t *rows
        const int64_t *y_row_offset
        const int64_t *index
        int64_t index_stride[3]
        const void *cos
        const void *sin
        int64_t table_len
        int layout

    int fa_rope_apply(int dtype, const fa_rope_args *args, int num_threads)

# ---- projections through a caller-supplied BLAS (csrc/linear.c) -----------------
cdef extern from "fastattn.h" nogil:
    ctypedef void fa_sgemm_fn(char *transa, char *transb, int *m, int *n, int *k, float *alpha,
                              float *a, int *lda, float *b, int *ldb, float *beta, float *c,
                              int *ldc) noexcept
    ctypedef void fa_dgemm_fn(char *transa, char *transb, int *m, int *n, int *k, double *alpha,
                              double *a, int *lda, double *b, int *ldb, double *beta, double *c,
                              int *ldc) noexcept
    ctypedef void fa_sgemv_fn(char *trans, int *m, int *n, float *alpha, float *a, int *lda,
                              float *x, int *incx, float *beta, float *y, int *incy) noexcept
    ctypedef void fa_dgemv_fn(char *trans, int *m, int *n, double *alpha, double *a, int *lda,
                              double *x, int *incx, double *beta, double *y, int *incy) noexcept

    ctypedef struct fa_blas:
        fa_sgemm_fn *sgemm
        fa_dgemm_fn *dgemm
        fa_sgemv_fn *sgemv
        fa_dgemv_fn *dgemv

    ctypedef struct fa_linear_rope:
        int enabled
        int layout
        int64_t heads, D
        const int64_t *index
        int64_t index_stride[3]
        const void *cos
        const void *sin
        int64_t table_len

    ctypedef struct fa_linear_args:
        int64_t B, M, K, N
        const void *a
        int64_t a_stride[3]
        const void *w
        int64_t w_stride[2]
        void *c
        int64_t c_stride[3]
        const void *bias
        const int64_t *row_start
        const int64_t *row_stop
        double alpha
        int deterministic
        fa_linear_rope rope

    int fa_linear(int dtype, const fa_linear_args *args, const fa_blas *blas, int num_threads)

    # ---- 16-bit GEMM (csrc/gemm_bf16.c) ----
    int FA_ISA_AVX512BF16
    int FA_DTYPE_BF16
    int FA_DTYPE_F16

    ctypedef struct fa_gemm16_args:
        int dtype
        int out_dtype
        int64_t M, N, K
        const void *a
        int64_t a_row_stride
        const void *packed_w
        int64_t packed_elems
        void *c
        int64_t c_row_stride
        const float *bias
        float alpha

    int64_t fa_gemm16_packed_elems(int64_t N, int64_t K)
    int fa_gemm16_pack_weight(int dtype, const void *w, int64_t N, int64_t K,
                              int64_t w_stride_n, int64_t w_stride_k,
                              void *packed, int64_t packed_elems, int num_threads)
    int fa_gemm16(const fa_gemm16_args *args, int num_threads)
