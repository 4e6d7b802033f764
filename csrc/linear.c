/*
 * linear.c: the attention layer's projections, c = alpha * a @ w (+ bias),
 * through a BLAS the caller supplies (fa_blas: scipy.linalg.cython_blas's
 * Fortran-ABI sgemm / dgemm / sgemv / dgemv). No BLAS is linked or written
 * here; this file decides how to call it.
 *
 * Row-major to column-major: a row-major (M, N) matrix with row stride ld
 * is the column-major (N, M) matrix with leading dimension ld, so the
 * row-major product C = A @ W is the column-major product Cᵀ = Wᵀ Aᵀ: gemm
 * is called with the operands swapped (W first) and m = N, n = M.
 *
 * Leading dimensions are the arrays' row strides, which is how the layer
 * writes Q, K and V straight into column blocks of a fused buffer, or rows
 * of a KV cache, with no copy pass.
 *
 * A bias is added by filling each output row with it and calling BLAS with
 * beta = 1: BLAS would otherwise zero C first (beta = 0), so the bias costs
 * nothing extra.
 *
 * Threads: the output columns are split into blocks, in whole 64-byte
 * lines and whole heads when the RoPE epilogue is on, and the blocks over
 * the OpenMP threads (fa_run_team; BLAS must then be single-threaded, which
 * fastattn.projections arranges). The epilogue rotates the heads of each
 * block on the thread that computed it, right after its GEMM, while the
 * block is still in that core's caches (fa_rope_apply, single-threaded).
 *
 * Determinism: a BLAS gives a column bits that depend on where the column
 * falls in the call (edge micro-kernels, small-matrix paths and GEMV tails
 * sum in other orders), so one block per thread makes the result change
 * with the thread count (by up to a few ulps). The deterministic partition
 * cuts the columns into blocks fixed by M, N and K alone, one BLAS call
 * each, and gives threads whole runs of blocks: the same calls, the same
 * bits, for every thread count. A GEMV-sized product (a decode step) is
 * instead cut along K: block b is the GEMV of rows [k0, k1) of W, which it
 * reads as whole contiguous rows, into its own partial sum, and the partial
 * sums are added in block order afterwards. Measured on one core (768 x
 * 2304, float32): column slivers of W, read with a large stride, cost ~12%
 * over one GEMV; K blocks of 64 rows ~4%, of 32 rows ~9% (more calls).
 */
#include <limits.h>
#include <stdatomic.h>
#include <string.h>

#include "checked_size.h"
#include "fastattn.h"
#include "scratch.h"
#include "threads.h"

/* A product with at most this many rows goes through GEMV, one row at a
 * time: GEMM packs the whole weight matrix into its panel layout first. For
 * a 768 x 2304 weight on one Zen 3 core, sgemm took ~1.4 ms for 1 to 8 rows
 * (the packing) against 0.13 ms per row for sgemv; they cross near 12-16. */
#define GEMV_MAX_ROWS 12
/* Below this many multiply-adds a product stays on one thread: an OpenMP
 * fork/join costs a few microseconds, ~2^18 multiply-adds on one core. */
#define PARALLEL_MIN_FLOPS 262144
/* The deterministic partition's blocks: at most this many, so that 1, 2, 3,
 * 4, 6, 8, 12 and 24 threads get equal shares of a wide product. Each block
 * is a BLAS call that packs the activations again, so more blocks cost more
 * than they balance. */
#define DETERMINISTIC_MAX_BLOCKS 24
/* ... and at least this many columns each (wider blocks when N is small):
 * narrower GEMM calls spend more of their time packing than multiplying. */
#define DETERMINISTIC_MIN_COLS 128
/* The deterministic GEMV's K blocks: at most DETERMINISTIC_MAX_BLOCKS, and
 * at least this many rows of W each: each block is a GEMV call (~0.5 us of
 * overhead) and a partial sum to add, so fewer, longer blocks cost less
 * (measured above), but 12 blocks of K = 768 still balance 1, 2, 3, 4, 6
 * and 12 threads. */
#define KSPLIT_MIN_ROWS 64
/* Reference BLAS takes 32-bit ints for sizes and leading dimensions. */
#define BLAS_INT_MAX INT_MAX

/* One product over rows of the output: c (M, N) = alpha * a (M, K) @ w (K, N)
 * (+ bias (N)), row-major with row strides lda, ldw, ldc (elements), or with
 * w the transpose of a row-major (N, K) matrix (w_trans: ldw is that
 * matrix's row stride), as torch's nn.Linear holds its weight. Its M
 * rows are nbatch batches of M / nbatch rows, cbs apart in c, which sit at
 * batch b0, row r0 of the epilogue's index. */
typedef struct {
    const fa_linear_args *args;
    const fa_blas *blas;
    int dtype;
    int64_t item;   /* bytes per element */
    int64_t align;  /* columns per block: whole lines (and whole heads) */
    const char *a, *w;
    char *c;
    int w_trans;
    int64_t lda, ldw, ldc, cbs;
    int64_t M, nbatch, b0, r0;
    int64_t block_cols; /* > 0: the deterministic blocks' width; 0: one block per thread */
    int64_t nblocks;
    /* deterministic GEMV: nkblocks > 0 blocks along K, partial sums
     * (nkblocks, M, N) in partial; 0 otherwise */
    int64_t nkblocks;
    char *partial;
    atomic_int status; /* the epilogue's first failure, FA_OK otherwise */
} linear_job;

/* w's columns from n0 and rows from k0: a row-major w steps ldw per row,
 * a transposed one ldw per column. */
static const char *w_at(const linear_job *j, int64_t k0, int64_t n0) {
    const int64_t rs = j->w_trans ? 1 : j->ldw, cs = j->w_trans ? j->ldw : 1;
    return j->w + (k0 * rs + n0 * cs) * j->item;
}

/* y (n) = alpha * wᵀ x (k) + beta * y for the (k, n) block of w at wb, one
 * BLAS GEMV. Column-major, a row-major (k, n) block is the (n, k) matrix
 * with leading dimension ldw ('N'); a transposed one is the (k, n) matrix
 * with leading dimension ldw, whose transpose is wanted ('T'). */
static void gemv(const linear_job *j, const char *wb, int64_t k, int64_t n, const char *x,
                 double beta, char *y) {
    char t = j->w_trans ? 'T' : 'N';
    int m_ = (int)(j->w_trans ? k : n), n_ = (int)(j->w_trans ? n : k), ldw_ = (int)j->ldw;
    int one = 1;
    double da = j->args->alpha, db = beta;
    float fa = (float)da, fb = (float)db;
    if (j->dtype == FA_DTYPE_F64)
        j->blas->dgemv(&t, &m_, &n_, &da, (double *)wb, &ldw_, (double *)x, &one, &db, (double *)y,
                       &one);
    else
        j->blas->sgemv(&t, &m_, &n_, &fa, (float *)wb, &ldw_, (float *)x, &one, &fb, (float *)y,
                       &one);
}

/* Columns [n0, n1) of the job's product, with a BLAS on one thread. */
static void product(const linear_job *j, int64_t n0, int64_t n1) {
    const int64_t item = j->item, M = j->M, K = j->args->K, N = n1 - n0;
    const char *bias = j->args->bias ? (const char *)j->args->bias + n0 * item : NULL;
    const char *w = w_at(j, 0, n0);
    char *c = j->c + n0 * item;
    for (int64_t i = 0; i < M; ++i) {
        if (bias != NULL)
            memcpy(c + i * j->ldc * item, bias, (size_t)(N * item));
        else if (K == 0)
            memset(c + i * j->ldc * item, 0, (size_t)(N * item));
    }
    if (K == 0) return;
    /* sizes were checked against BLAS_INT_MAX by fa_linear */
    int n_ = (int)N, k_ = (int)K, ldw_ = (int)j->ldw, lda_ = (int)j->lda, ldc_ = (int)j->ldc;
    int m_ = (int)M;
    char tn = 'N', tw = j->w_trans ? 'T' : 'N';
    const int dbl = j->dtype == FA_DTYPE_F64;
    double da = j->args->alpha, db = bias != NULL ? 1.0 : 0.0;
    float fa = (float)da, fb = (float)db;
    if (M <= GEMV_MAX_ROWS) {
        for (int64_t i = 0; i < M; ++i)
            gemv(j, w, K, N, j->a + i * j->lda * item, db, c + i * j->ldc * item);
        return;
    }
    /* column-major, Cᵀ (N, M) = Wᵀ (N, K) Aᵀ (K, M); Wᵀ is w as stored when w
     * is row-major ('N'), else the transpose of the stored (K, N) matrix ('T') */
    if (dbl)
        j->blas->dgemm(&tw, &tn, &n_, &m_, &k_, &da, (double *)w, &ldw_, (double *)j->a, &lda_,
                       &db, (double *)c, &ldc_);
    else
        j->blas->sgemm(&tw, &tn, &n_, &m_, &k_, &fa, (float *)w, &ldw_, (float *)j->a, &lda_,
                       &fb, (float *)c, &ldc_);
}

/* RoPE on the heads within columns [n0, n1) (multiples of D) of the job's
 * rows: c viewed as (nbatch, heads, M / nbatch, D). */
static int rope_block(const linear_job *j, int64_t n0, int64_t n1) {
    const fa_linear_rope *ep = &j->args->rope;
    const int64_t D = ep->D, end = ep->heads * D; /* heads * D <= N: checked */
    const int64_t h0 = n0 / D, h1 = (n1 < end ? n1 : end) / D;
    if (h1 <= h0 || j->M == 0) return FA_OK;
    fa_rope_args r;
    r.N0 = j->nbatch;
    r.N1 = h1 - h0;
    r.L = j->M / j->nbatch;
    r.D = D;
    r.x.data = j->c + h0 * D * j->item;
    r.x.stride[0] = j->cbs;
    r.x.stride[1] = D;
    r.x.stride[2] = j->ldc;
    r.x.stride[3] = 1;
    r.y = r.x;
    r.rows = NULL;
    r.y_row_offset = NULL;
    r.index = ep->index + j->b0 * ep->index_stride[0] + h0 * ep->index_stride[1] +
              j->r0 * ep->index_stride[2];
    memcpy(r.index_stride, ep->index_stride, sizeof r.index_stride);
    r.cos = ep->cos;
    r.sin = ep->sin;
    r.table_len = ep->table_len;
    r.layout = ep->layout;
    return fa_rope_apply(j->dtype, &r, 1);
}

/* Columns [n0, n1) of the job: the product, then its epilogue. */
static void linear_block(linear_job *j, int64_t n0, int64_t n1) {
    if (n1 <= n0) return;
    product(j, n0, n1);
    if (j->args->rope.enabled) {
        const int st = rope_block(j, n0, n1);
        int ok = FA_OK;
        if (st != FA_OK) atomic_compare_exchange_strong(&j->status, &ok, st);
    }
}

/* Thread t's share. Deterministic: blocks [t nblocks / T, (t+1) nblocks / T)
 * of the fixed partition, one call each. Otherwise ceil(N / T) columns
 * rounded up to whole align units, as one call. */
static void linear_part(void *ctx, int t, int nthreads) {
    linear_job *j = ctx;
    const int64_t N = j->args->N;
    if (j->block_cols > 0) {
        const int64_t b0 = j->nblocks * t / nthreads, b1 = j->nblocks * (t + 1) / nthreads;
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t n0 = b * j->block_cols, n1 = n0 + j->block_cols < N ? n0 + j->block_cols : N;
            linear_block(j, n0, n1);
        }
        return;
    }
    int64_t per = (N + nthreads - 1) / nthreads;
    per = (per + j->align - 1) / j->align * j->align;
    const int64_t n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
    linear_block(j, n0, n1);
}

/* Rows [k0, k1) of K block kb: fixed by K and the block count alone. */
static void kblock_range(const linear_job *j, int64_t kb, int64_t *k0, int64_t *k1) {
    const int64_t K = j->args->K;
    *k0 = K * kb / j->nkblocks;
    *k1 = K * (kb + 1) / j->nkblocks;
}

/* Deterministic GEMV, phase 1: thread t's K blocks, one GEMV per block and
 * row, each into its own partial sum (beta = 0). */
static void kblock_part(void *ctx, int t, int nthreads) {
    linear_job *j = ctx;
    const int64_t item = j->item, M = j->M, N = j->args->N;
    const int64_t b0 = j->nkblocks * t / nthreads, b1 = j->nkblocks * (t + 1) / nthreads;
    for (int64_t kb = b0; kb < b1; ++kb) {
        int64_t k0, k1;
        kblock_range(j, kb, &k0, &k1);
        const char *w = w_at(j, k0, 0);
        for (int64_t i = 0; i < M; ++i)
            gemv(j, w, k1 - k0, N, j->a + (i * j->lda + k0) * item, 0.0,
                 j->partial + (kb * M + i) * N * item);
    }
}

/* Deterministic GEMV, phase 2: columns [n0, n1) of c = bias + the partial
 * sums in block order (each element's sum in the same order on every
 * thread count), then the epilogue on them. */
static void kblock_sum(void *ctx, int t, int nthreads) {
    linear_job *j = ctx;
    const int64_t N = j->args->N, M = j->M, nkb = j->nkblocks;
    int64_t per = (N + nthreads - 1) / nthreads;
    per = (per + j->align - 1) / j->align * j->align;
    const int64_t n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
    if (n1 <= n0) return;
    /* c = bias, then += each block's partial sum in block order: per element
     * the same order as a loop over blocks inside, but over contiguous rows */
    for (int64_t i = 0; i < M; ++i) {
        if (j->dtype == FA_DTYPE_F64) {
            const double *bias = j->args->bias, *part = (const double *)j->partial + i * N;
            double *c = (double *)j->c + i * j->ldc;
            for (int64_t n = n0; n < n1; ++n) c[n] = bias != NULL ? bias[n] : 0.0;
            for (int64_t kb = 0; kb < nkb; ++kb) {
                const double *pk = part + kb * M * N;
                for (int64_t n = n0; n < n1; ++n) c[n] += pk[n];
            }
        } else {
            const float *bias = j->args->bias, *part = (const float *)j->partial + i * N;
            float *c = (float *)j->c + i * j->ldc;
            for (int64_t n = n0; n < n1; ++n) c[n] = bias != NULL ? bias[n] : 0.0f;
            for (int64_t kb = 0; kb < nkb; ++kb) {
                const float *pk = part + kb * M * N;
                for (int64_t n = n0; n < n1; ++n) c[n] += pk[n];
            }
        }
    }
    if (j->args->rope.enabled) {
        const int st = rope_block(j, n0, n1);
        int ok = FA_OK;
        if (st != FA_OK) atomic_compare_exchange_strong(&j->status, &ok, st);
    }
}

/* The deterministic GEMV's K block count for K rows (0: K too short to
 * split, or the product too small for threads). */
static int64_t kblock_count(int64_t M, int64_t N, int64_t K) {
    int64_t flops;
    if (M > GEMV_MAX_ROWS || K < 2 * KSPLIT_MIN_ROWS) return 0;
    if (!fa_mul_ok(M, N, &flops) || !fa_mul_ok(flops, K, &flops)) return 0;
    if (flops < PARALLEL_MIN_FLOPS) return 0;
    const int64_t n = K / KSPLIT_MIN_ROWS;
    return n < DETERMINISTIC_MAX_BLOCKS ? n : DETERMINISTIC_MAX_BLOCKS;
}

/* The job's product, its columns over up to num_threads threads. */
static int run_product(linear_job *j, int num_threads) {
    const int64_t N = j->args->N;
    int64_t flops;
    if (!fa_mul_ok(j->M, N, &flops) || !fa_mul_ok(flops, j->args->K, &flops)) flops = INT64_MAX;
    atomic_init(&j->status, FA_OK);
    j->nkblocks = j->partial != NULL ? kblock_count(j->M, N, j->args->K) : 0;
    if (j->nkblocks > 0) {
        fa_run_team(fa_resolve_threads(num_threads, j->nkblocks, flops), kblock_part, j);
        fa_run_team(fa_resolve_threads(num_threads, N / j->align, j->M * N), kblock_sum, j);
        return atomic_load(&j->status);
    }
    int64_t work = N / j->align;
    j->block_cols = 0;
    j->nblocks = 1;
    if (j->args->deterministic) {
        /* The partition depends on the sizes only; a product too small to
         * split is one block on any thread count. */
        int64_t cols = N;
        if (flops >= PARALLEL_MIN_FLOPS) {
            cols = (N + DETERMINISTIC_MAX_BLOCKS - 1) / DETERMINISTIC_MAX_BLOCKS;
            if (cols < DETERMINISTIC_MIN_COLS) cols = DETERMINISTIC_MIN_COLS;
            cols = (cols + j->align - 1) / j->align * j->align;
        }
        if (cols < 1) cols = 1;
        j->block_cols = cols;
        j->nblocks = (N + cols - 1) / cols;
        work = j->nblocks;
    }
    int nthreads = fa_resolve_threads(num_threads, work, flops);
    if (flops < PARALLEL_MIN_FLOPS) nthreads = 1;
    fa_run_team(nthreads, linear_part, j);
    return atomic_load(&j->status);
}

/* A row-major matrix's leading dimension: its row stride, or cols when it
 * has at most one row (any stride is fine then, BLAS still wants ld >= cols);
 * -1 when rows would overlap. */
static int64_t leading_dim(int64_t rows, int64_t stride, int64_t cols) {
    if (rows <= 1 || cols == 0) return cols > 0 ? cols : 1; /* an empty row: never read */
    return stride < cols ? -1 : stride;
}

static int64_t gcd64(int64_t a, int64_t b) {
    while (b) {
        const int64_t r = a % b;
        a = b, b = r;
    }
    return a;
}

int fa_linear(int dtype, const fa_linear_args *p, const fa_blas *blas, int num_threads) {
    if (p == NULL || blas == NULL || (dtype != FA_DTYPE_F32 && dtype != FA_DTYPE_F64))
        return FA_ERR_INVALID;
    const int64_t B = p->B, M = p->M, K = p->K, N = p->N, item = dtype == FA_DTYPE_F64 ? 8 : 4;
    if (B < 0 || M < 0 || K < 0 || N < 0) return FA_ERR_INVALID;
    const fa_linear_rope *ep = &p->rope;
    if (ep->enabled) {
        int64_t cols;
        if (ep->D <= 0 || ep->D % 2 || ep->heads < 0) return FA_ERR_INVALID;
        if (!fa_mul_ok(ep->heads, ep->D, &cols)) return FA_ERR_OVERFLOW;
        if (cols > N) return FA_ERR_INVALID;
        /* index (B, heads, M) */
        const int64_t idims[3] = {B, ep->heads, M};
        if (!fa_view_ok(idims, ep->index_stride, 3, 8)) return FA_ERR_OVERFLOW;
        if (cols > 0 && (ep->index == NULL || ep->cos == NULL || ep->sin == NULL))
            return FA_ERR_INVALID;
    }
    int64_t rows_total, cols_total;
    if (!fa_mul_ok(B, M, &rows_total) || !fa_mul_ok(rows_total, N, &cols_total))
        return FA_ERR_OVERFLOW;
    if (cols_total == 0) return FA_OK;
    if (p->a == NULL || p->w == NULL || p->c == NULL) return FA_ERR_INVALID;
    const int dbl = dtype == FA_DTYPE_F64;
    if (dbl ? blas->dgemm == NULL || blas->dgemv == NULL : blas->sgemm == NULL || blas->sgemv == NULL)
        return FA_ERR_INVALID;
    /* a (B, M, K), w (K, N), c (B, M, N): unit last-axis strides (an empty
     * array may have any), or w with a unit first-axis stride (the transpose
     * of a row-major (N, K) matrix); every element offset representable */
    const int w_rows = N <= 1 || K == 0 || p->w_stride[1] == 1;
    const int w_trans = !w_rows && (K <= 1 || p->w_stride[0] == 1);
    if ((K > 1 && p->a_stride[2] != 1) || (!w_rows && !w_trans) || (N > 1 && p->c_stride[2] != 1))
        return FA_ERR_INVALID;
    const int64_t adims[3] = {B, M, K}, wdims[2] = {K, N}, cdims[3] = {B, M, N};
    if (!fa_view_ok(adims, p->a_stride, 3, item) || !fa_view_ok(wdims, p->w_stride, 2, item) ||
        !fa_view_ok(cdims, p->c_stride, 3, item))
        return FA_ERR_OVERFLOW;
    const int64_t lda = leading_dim(M, p->a_stride[1], K),
                  ldw = w_trans ? leading_dim(N, p->w_stride[1], K) : leading_dim(K, p->w_stride[0], N),
                  ldc = leading_dim(M, p->c_stride[1], N);
    if (lda < 0 || ldw < 0 || ldc < 0) return FA_ERR_INVALID;
    const int64_t blas_sizes[6] = {M, N, K, lda, ldw, ldc};
    for (int i = 0; i < 6; ++i)
        if (blas_sizes[i] > BLAS_INT_MAX) return FA_ERR_OVERFLOW;
    const int64_t *r0p = p->row_start, *r1p = p->row_stop;
    for (int64_t b = 0; b < B; ++b)
        if ((r0p && (r0p[b] < 0 || r0p[b] > M)) || (r1p && (r1p[b] < 0 || r1p[b] > M)))
            return FA_ERR_INVALID;

    linear_job job;
    job.args = p;
    job.blas = blas;
    job.dtype = dtype;
    job.item = item;
    job.align = 64 / item;
    if (ep->enabled) job.align = job.align / gcd64(job.align, ep->D) * ep->D; /* lcm */
    job.w = p->w;
    job.w_trans = w_trans;
    job.lda = lda;
    job.ldw = ldw;
    job.ldc = ldc;
    job.cbs = p->c_stride[0];
    const int64_t sab = p->a_stride[0], scb = p->c_stride[0];
    int64_t a_span, c_span;
    /* evenly spaced batches: one BLAS call covers them all */
    const int merged = r0p == NULL && r1p == NULL && B > 1 && fa_mul_ok(M, lda, &a_span) &&
                       sab == a_span && fa_mul_ok(M, ldc, &c_span) && scb == c_span &&
                       rows_total <= BLAS_INT_MAX;
    /* the deterministic GEMV's partial sums, for the most rows a job has */
    const int64_t job_rows = merged ? rows_total : M;
    const int64_t nkb = p->deterministic ? kblock_count(job_rows, N, K) : 0;
    job.partial = NULL;
    if (nkb > 0) {
        int64_t count;
        if (!fa_mul_ok(nkb, job_rows, &count) || !fa_mul_ok(count, N, &count)) return FA_ERR_OVERFLOW;
        job.partial = fa_scratch_alloc(count, item);
        if (job.partial == NULL) return FA_ERR_NOMEM;
    }
    int status = FA_OK;
    if (merged) {
        job.a = p->a;
        job.c = p->c;
        job.M = rows_total;
        job.nbatch = B;
        job.b0 = job.r0 = 0;
        status = run_product(&job, num_threads);
    } else {
        for (int64_t b = 0; b < B; ++b) {
            const int64_t r0 = r0p ? r0p[b] : 0, r1 = r1p ? r1p[b] : M;
            if (r1 <= r0) continue;
            /* offsets within the views checked above */
            job.a = (const char *)p->a + (b * sab + r0 * lda) * item;
            job.c = (char *)p->c + (b * scb + r0 * ldc) * item;
            job.M = r1 - r0;
            job.nbatch = 1;
            job.b0 = b;
            job.r0 = r0;
            const int st = run_product(&job, num_threads);
            if (st != FA_OK) status = st;
        }
    }
    fa_scratch_free(job.partial);
    return status;
}
