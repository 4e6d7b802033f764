/*
 * fork_safety.c: keep a forked child from hanging in GNU OpenMP.
 *
 * libgomp keeps, for each thread that has started a parallel region, a pool
 * of worker threads in that thread's thread-local state. fork() copies only
 * the calling thread, so in the child that thread's pool lists workers that
 * do not exist; its next parallel region with more than one thread waits for
 * them forever (measured with gcc 12's libgomp: see docs/reliability.md).
 * libgomp installs no fork handler, so this file does: in the child, the
 * thread that called fork() is marked, and fa_resolve_threads() gives its
 * kernel calls one thread (no parallel region is entered). Threads the child
 * starts later have fresh thread-local state, hence a fresh pool, and keep
 * full parallelism; the parent is untouched.
 *
 * Cost: one thread-local load per kernel call; in a forked child, the
 * forking thread's kernels run serially (a multiprocessing worker or a
 * gunicorn --preload worker usually wants that anyway).
 */
#include "fastattn.h"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define FA_HAVE_FORK 1
#endif

static _Thread_local int forked_thread = 0;

int fa_fork_child_serial(void) { return forked_thread; }

#if defined(FA_HAVE_FORK)
static void mark_child(void) { forked_thread = 1; }

/* Runs when the extension module is loaded (dlopen), before any kernel. */
__attribute__((constructor)) static void fa_register_fork_handler(void) {
    pthread_atfork(NULL, NULL, mark_child);
}
#endif
