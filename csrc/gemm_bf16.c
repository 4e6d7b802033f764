/*
 * gemm_bf16.c: the 16-bit GEMM driver (fastattn.h, "16-bit GEMM"):
 * weight packing, cache blocking, the thread partition and the choice of
 * kernel set for the selected ISA level. Compiled with baseline flags; the
 * kernels are in gemm_bf16_impl.h.
 *
 * c (M, N) = alpha * a (M, K) . w (N, K)^T (+ bias)
 *
 * Blocking (every constant below is independent of the thread count, and
 * the per-element summation order does not depend on the blocking at all):
 *   - a task is a block of at most FA_G16_MC_MAX rows x FA_G16_NC_MAX
 *     columns; tasks are numbered row block by row block and each thread
 *     takes a fixed contiguous range of them, so a thread's consecutive
 *     tasks share their rows and pack them once;
 *   - a row block is packed once (all of K) into the thread's scratch;
 *   - within a task, k runs in chunks of FA_G16_KC_PAIRS pairs; for each
 *     chunk, each 32-column weight panel is swept by all the row tiles
 *     while it sits in L1/L2, the packed rows coming from L2;
 *   - the float32 sums live in a per-thread (rows x columns) block between
 *     chunks (stored at full float32 precision, so chunking changes no bit)
 *     and the epilogue converts the block into c.
 */
#include <string.h>

#include "fastattn.h"
#include "gemm_bf16.h"
#include "checked_size.h"
#include "scratch.h"
#include "threads.h"

/* k pairs per chunk: the float32 sums of a tile are loaded and stored once
 * per chunk, so long chunks pay that less often; a chunk of one weight
 * panel is 512 pairs x 128 bytes = 64 KiB, served from L1/L2 while the row
 * tiles sweep it. Measured on a Zen 5 core (vdpbf16ps, best of 30, M x 768
 * x 768): 64 pairs 450 GF/s, 128 pairs 465, 256 pairs 480, 512 pairs
 * (all of K = 768 in one chunk) 490-500. */
#define FA_G16_KC_PAIRS 512
/* Rows per block: the packed block (192 rows x a chunk) is re-read from L2
 * for each panel; 192 rows x 512 pairs are 384-768 KiB, inside a 1 MiB L2.
 * It also bounds how often the weights are streamed again: once per block. */
#define FA_G16_MC_MAX 192
/* Columns per block: 4 panels. Small enough that the projections of one
 * layer (N = 768 at M = 128 tokens: 6 tasks) split evenly over a few
 * threads; the float32 sum block (192 x 128 x 4 = 96 KiB) stays in L2. */
#define FA_G16_NC_MAX 128

int64_t fa_gemm16_packed_elems(int64_t N, int64_t K) {
    if (N < 0 || K < 0) return -1;
    const int64_t panels = N / FA_G16_NR + (N % FA_G16_NR != 0);
    const int64_t pairs = K / 2 + (K & 1);
    int64_t n;
    if (!fa_mul_ok(panels, pairs, &n) || !fa_mul_ok(n, FA_G16_PAIR_ELEMS, &n)) return -1;
    return n;
}

/* packed element index of w[n, k] (gemm_bf16.h) */
static inline int64_t packed_index(int dtype, int64_t K2, int64_t n, int64_t k) {
    const int64_t p = n / FA_G16_NR, c = n % FA_G16_NR, q = k / 2, e = k & 1;
    const int64_t base = (p * K2 + q) * FA_G16_PAIR_ELEMS;
    if (dtype == FA_DTYPE_BF16) return base + 2 * c + e;
    return base + 32 * (c / 16) + 16 * e + c % 16;
}

typedef struct {
    int dtype;
    const uint16_t *w;
    int64_t N, K, sn, sk, panels;
    uint16_t *packed;
} pack_job;

static void pack_panels(void *ctx, int t, int nthreads) {
    const pack_job *j = (const pack_job *)ctx;
    const int64_t K2 = j->K / 2 + (j->K & 1);
    int64_t lo, hi;
    fa_partition(j->panels, nthreads, t, &lo, &hi);
    for (int64_t p = lo; p < hi; ++p) {
        /* zero the panel (padding columns, the odd k), then scatter */
        memset(j->packed + p * K2 * FA_G16_PAIR_ELEMS, 0,
               (size_t)(K2 * FA_G16_PAIR_ELEMS) * sizeof(uint16_t));
        const int64_t n1 = (p + 1) * FA_G16_NR < j->N ? (p + 1) * FA_G16_NR : j->N;
        for (int64_t n = p * FA_G16_NR; n < n1; ++n)
            for (int64_t k = 0; k < j->K; ++k)
                j->packed[packed_index(j->dtype, K2, n, k)] = j->w[n * j->sn + k * j->sk];
    }
}

int fa_gemm16_pack_weight(int dtype, const void *w, int64_t N, int64_t K,
                          int64_t w_stride_n, int64_t w_stride_k,
                          void *packed, int64_t packed_elems, int num_threads) {
    if (dtype != FA_DTYPE_BF16 && dtype != FA_DTYPE_F16) return FA_ERR_INVALID;
    const int64_t need = fa_gemm16_packed_elems(N, K);
    if (need < 0) return N < 0 || K < 0 ? FA_ERR_INVALID : FA_ERR_OVERFLOW;
    if (packed_elems < need) return FA_ERR_INVALID;
    if (need == 0) return FA_OK;
    if (w == NULL || packed == NULL) return FA_ERR_INVALID;
    const int64_t dims[2] = {N, K}, strides[2] = {w_stride_n, w_stride_k};
    if (!fa_view_ok(dims, strides, 2, 2) || !fa_view_ok(&need, (const int64_t[]){1}, 1, 2))
        return FA_ERR_OVERFLOW;
    pack_job job = {dtype, (const uint16_t *)w, N, K, w_stride_n, w_stride_k,
                    N / FA_G16_NR + (N % FA_G16_NR != 0), (uint16_t *)packed};
    fa_run_team(fa_resolve_threads(num_threads, job.panels, need), pack_panels, &job);
    return FA_OK;
}

/* The kernel set for the selected ISA level and the input dtype. */
static const fa_g16_kernels *pick_kernels(int dtype) {
    const int isa = fa_get_isa();
#if defined(FA_HAVE_X86_KERNELS)
    if (dtype == FA_DTYPE_BF16) {
#if defined(FA_HAVE_AMX_KERNELS)
        if (isa >= FA_ISA_AMX) return &fa_g16_bf16_amx;
#endif
        if (isa >= FA_ISA_AVX512BF16) return &fa_g16_bf16_avx512bf16;
        if (isa == FA_ISA_AVX512) return &fa_g16_bf16_avx512;
        if (isa == FA_ISA_AVX2 && fa_cpu_has_f16c()) return &fa_g16_bf16_avx2;
        return &fa_g16_bf16_scalar;
    }
    if (isa >= FA_ISA_AVX512) return &fa_g16_f16_avx512;
    if (isa == FA_ISA_AVX2 && fa_cpu_has_f16c()) return &fa_g16_f16_avx2;
#else
    (void)isa;
    if (dtype == FA_DTYPE_BF16) return &fa_g16_bf16_scalar;
#endif
    return &fa_g16_f16_scalar;
}

typedef struct {
    const fa_gemm16_args *args;
    const fa_g16_kernels *ks;
    int64_t K2;
    int64_t K2a; /* K2 rounded up to the kernel set's pair_align: a packed tile's pairs */
    int64_t tiles, row_blocks;  /* row tiles of mr rows, split into blocks of whole tiles */
    int64_t panels, col_blocks; /* 32-column panels, split into blocks of whole panels */
    int64_t mc, nc;             /* the most rows / columns of a block */
    int64_t a_bytes, sums_elems; /* per-thread scratch parts (64-byte multiples) */
    char *scratch;
} gemm_job;

/* Start of part i of n items split into `parts` parts that differ by at
 * most one item (the first n % parts parts get the extra one). */
static inline int64_t even_split(int64_t n, int64_t parts, int64_t i) {
    const int64_t base = n / parts, extra = n % parts;
    return i * base + (i < extra ? i : extra);
}

/* Tiles times panels of a task: blocks differ by up to a tile or a panel,
 * so tasks differ by up to a tenth at the layer shapes. */
static int64_t task_work(const gemm_job *j, int64_t task) {
    const int64_t rb = task / j->col_blocks, cb = task % j->col_blocks;
    return (even_split(j->tiles, j->row_blocks, rb + 1) - even_split(j->tiles, j->row_blocks, rb)) *
           (even_split(j->panels, j->col_blocks, cb + 1) - even_split(j->panels, j->col_blocks, cb));
}

/* Thread t's first task: the tasks split into contiguous ranges of about
 * equal work (tiles x panels), not of equal count. Equal counts gave one
 * of 2 threads 5% more work at M = 512 (blocks of 15, 14 and 14 tiles)
 * and left the other waiting at the barrier. */
static int64_t first_task(const gemm_job *j, int t, int nthreads) {
    const int64_t ntasks = j->row_blocks * j->col_blocks;
    if (t >= nthreads) return ntasks;
    const int64_t total = j->tiles * j->panels, goal = total / nthreads * t + total % nthreads * t / nthreads;
    int64_t i = 0;
    for (int64_t done = 0, w; i < ntasks && done + (w = task_work(j, i)) / 2 < goal; ++i) done += w;
    return i;
}

static void gemm_tasks(void *ctx, int t, int nthreads) {
    const gemm_job *j = (const gemm_job *)ctx;
    const fa_gemm16_args *g = j->args;
    const fa_g16_kernels *ks = j->ks;
    const int64_t mr = ks->mr, K2 = j->K2, K2a = j->K2a, ldsum = j->nc;
    const int64_t tile_bytes = (ks->a_layout == FA_G16_A_F32 ? 8 : 4) * mr; /* per pair */
    const int64_t out_size = g->out_dtype == FA_DTYPE_F32 ? 4 : 2;
    char *apack = j->scratch + (int64_t)t * (j->a_bytes + 4 * j->sums_elems);
    float *sums = (float *)(apack + j->a_bytes);
    const uint16_t *w = (const uint16_t *)g->packed_w;
    int64_t packed_block = -1;
    const int64_t lo = first_task(j, t, nthreads), hi = first_task(j, t + 1, nthreads);
    if (lo >= hi) return;
    if (ks->begin) ks->begin();
    for (int64_t task = lo; task < hi; ++task) {
        const int64_t rb = task / j->col_blocks, cb = task % j->col_blocks;
        /* block rb: tiles [rb T / nb, (rb + 1) T / nb), so blocks differ by
         * at most one tile; the same for the panels of column block cb */
        const int64_t r0 = even_split(j->tiles, j->row_blocks, rb) * mr;
        const int64_t r1 = even_split(j->tiles, j->row_blocks, rb + 1) * mr;
        const int64_t c0 = even_split(j->panels, j->col_blocks, cb) * FA_G16_NR;
        const int64_t c1 = even_split(j->panels, j->col_blocks, cb + 1) * FA_G16_NR;
        const int64_t rows = (r1 < g->M ? r1 : g->M) - r0;
        const int64_t cols = (c1 < g->N ? c1 : g->N) - c0;
        if (rb != packed_block) {
            ks->pack_a((const uint16_t *)g->a + r0 * g->a_row_stride, g->a_row_stride, rows,
                       g->K, apack);
            packed_block = rb;
        }
        const int64_t tiles = (rows + mr - 1) / mr;
        const int64_t panels = (cols + FA_G16_NR - 1) / FA_G16_NR;
        /* at least one chunk, so that K = 0 writes zero sums */
        for (int64_t q0 = 0; q0 == 0 || q0 < K2; q0 += FA_G16_KC_PAIRS) {
            const int64_t np = K2 - q0 < FA_G16_KC_PAIRS ? K2 - q0 : FA_G16_KC_PAIRS;
            for (int64_t p = 0; p < panels; ++p) {
                const uint16_t *wp = w + ((c0 / FA_G16_NR + p) * K2 + q0) * FA_G16_PAIR_ELEMS;
                for (int64_t i = 0; i < tiles; ++i) {
                    const void *at = apack + (i * K2a + q0) * tile_bytes;
                    float *ct = sums + i * mr * ldsum + p * FA_G16_NR;
                    if (ks->micro_tail && rows - i * mr < mr)
                        ks->micro_tail(np, at, wp, ct, ldsum, q0 > 0, (int)(rows - i * mr));
                    else
                        ks->micro(np, at, wp, ct, ldsum, q0 > 0);
                }
            }
        }
        ks->epilogue(sums, ldsum, rows, cols, g->alpha, g->bias ? g->bias + c0 : NULL,
                     (char *)g->c + (r0 * g->c_row_stride + c0) * out_size, g->c_row_stride,
                     g->out_dtype);
    }
    if (ks->end) ks->end();
}

static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

int fa_gemm16(const fa_gemm16_args *g, int num_threads) {
    if (g == NULL) return FA_ERR_INVALID;
    if (g->dtype != FA_DTYPE_BF16 && g->dtype != FA_DTYPE_F16) return FA_ERR_INVALID;
    if (g->out_dtype != FA_DTYPE_F32 && g->out_dtype != g->dtype) return FA_ERR_INVALID;
    if (g->M < 0 || g->N < 0 || g->K < 0) return FA_ERR_INVALID;
    if (g->M == 0 || g->N == 0) return FA_OK;
    if (g->a_row_stride < 0 || (g->M > 1 && g->c_row_stride < g->N)) return FA_ERR_INVALID;
    if (g->c == NULL || (g->K > 0 && (g->a == NULL || g->packed_w == NULL)))
        return FA_ERR_INVALID;
    const int64_t out_size = g->out_dtype == FA_DTYPE_F32 ? 4 : 2;
    const int64_t a_dims[2] = {g->M, g->K}, a_str[2] = {g->a_row_stride, 1};
    const int64_t c_dims[2] = {g->M, g->N}, c_str[2] = {g->c_row_stride, 1};
    const int64_t packed_need = fa_gemm16_packed_elems(g->N, g->K);
    if (packed_need < 0 || !fa_view_ok(a_dims, a_str, 2, 2) ||
        !fa_view_ok(c_dims, c_str, 2, out_size))
        return FA_ERR_OVERFLOW;
    if (g->packed_elems < packed_need) return FA_ERR_INVALID;

    gemm_job job;
    job.args = g;
    job.ks = pick_kernels(g->dtype);
    const int64_t mr = job.ks->mr;
    job.K2 = g->K / 2 + (g->K & 1);
    job.K2a = round_up(job.K2, job.ks->pair_align);
    /* Even blocks of whole tiles and panels: 512 rows are 43 tiles of 12,
     * split 14 + 14 + 15 rather than 16 + 16 + 11, so the tasks the threads
     * share are of similar size. */
    job.tiles = (g->M + mr - 1) / mr;
    job.row_blocks = (job.tiles + FA_G16_MC_MAX / mr - 1) / (FA_G16_MC_MAX / mr);
    job.mc = (job.tiles + job.row_blocks - 1) / job.row_blocks * mr;
    job.panels = g->N / FA_G16_NR + (g->N % FA_G16_NR != 0);
    job.col_blocks = (job.panels + FA_G16_NC_MAX / FA_G16_NR - 1) / (FA_G16_NC_MAX / FA_G16_NR);
    job.nc = (job.panels + job.col_blocks - 1) / job.col_blocks * FA_G16_NR;

    /* per thread: the packed row block (mc x K2a pairs, 4 or 8 bytes per
     * row and pair) and the float32 sums (mc x nc); both 64-byte multiples */
    int64_t a_bytes;
    if (!fa_mul_ok(job.mc, job.K2a, &a_bytes) || !fa_mul_ok(a_bytes, 8, &a_bytes))
        return FA_ERR_OVERFLOW;
    job.a_bytes = round_up(a_bytes, 64);
    job.sums_elems = round_up(job.mc * job.nc, 16);
    if (job.a_bytes > INT64_MAX - 4 * job.sums_elems) return FA_ERR_OVERFLOW;
    const int64_t per_thread = job.a_bytes + 4 * job.sums_elems;

    int64_t work;
    if (!fa_mul_ok(g->M, g->N, &work) || !fa_mul_ok(work, g->K > 0 ? g->K : 1, &work))
        work = INT64_MAX;
    const int nthreads = fa_resolve_threads(num_threads, job.row_blocks * job.col_blocks, work);
    job.scratch = (char *)fa_scratch_alloc(nthreads, per_thread);
    if (job.scratch == NULL) return FA_ERR_NOMEM;
    fa_run_team(nthreads, gemm_tasks, &job);
    fa_scratch_free(job.scratch);
    return FA_OK;
}
