/*
 * threads.h: the thread policy shared by every driver: how many threads a
 * call gets, how a team is started, and how work is split among it.
 */
#ifndef FASTATTN_THREADS_H
#define FASTATTN_THREADS_H

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Work below this many elements runs on one thread: an OpenMP fork/join costs
 * a few microseconds, about what two cores spend on ~32K float ops. */
#define FA_MIN_PARALLEL_ELEMS 32768

/* Thread count for a call: the request (or the OpenMP default when <= 0),
 * capped by the number of independent work items and forced to 1 for work
 * smaller than FA_MIN_PARALLEL_ELEMS elements. */
int fa_resolve_threads(int requested, int64_t work_items, int64_t total_elems);

/* Runs fn(ctx, t, nthreads) for t = 0 .. nthreads-1, one call per thread of
 * an OpenMP team; with nthreads == 1 the caller runs fn(ctx, 0, 1) itself
 * and no OpenMP region is entered, since even an if(false) region costs a
 * futex call in libgomp (a fifth of a tiny attention call). */
typedef void (*fa_team_fn)(void *ctx, int t, int nthreads);
void fa_run_team(int nthreads, fa_team_fn fn, void *ctx);

static inline int fa_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Split [0, n) into nthreads contiguous ranges; thread t gets [*lo, *hi). A
 * static partition keeps each thread's rows fixed, which keeps results
 * independent of scheduling. */
static inline void fa_partition(int64_t n, int nthreads, int t, int64_t *lo,
                                int64_t *hi) {
    int64_t base = n / nthreads, rem = n % nthreads;
    *lo = t * base + (t < rem ? t : rem);
    *hi = *lo + base + (t < rem ? 1 : 0);
}

#endif /* FASTATTN_THREADS_H */
