/*
 * threads.c: the thread policy (threads.h): the default team size, the size
 * a call gets, and starting a team.
 */
#include "fastattn.h"
#include "threads.h"

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
