/*
 * cache_hints.h: what the kernels tell the memory system: prefetch requests
 * (whole ranges, or paced a line at a time) and the fence that orders
 * streaming (non-temporal) stores before later ones.
 */
#ifndef FASTATTN_CACHE_HINTS_H
#define FASTATTN_CACHE_HINTS_H

#include <stdint.h>

/* Orders this thread's earlier streaming (non-temporal) stores before its
 * later stores, so that another thread that sees the later ones (an OpenMP
 * barrier, the caller's return) also sees the streamed data. Streaming
 * stores exist only in the x86 kernels. */
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <xmmintrin.h>
static inline void fa_store_fence(void) { _mm_sfence(); }
#else
static inline void fa_store_fence(void) {}
#endif

/* The start of the 64-byte line that holds p. A range is requested line
 * by line from there to its end: NumPy's large arrays start 16 bytes into
 * a line, so a 128-byte row spans three lines, and requests at p, p + 64
 * left its last one to a demand miss. */
static inline const char *fa_line_of(const void *p) {
    return (const char *)((uintptr_t)p & ~(uintptr_t)63);
}

/* Asks the caches for [p, p + bytes) ahead of its use, one request per
 * 64-byte line. For streams the hardware prefetcher loses track of: rows
 * handed out in chunks, or K and V rows read in alternating tiles. */
static inline void fa_prefetch(const void *p, int64_t bytes) {
    for (const char *l = fa_line_of(p), *e = (const char *)p + bytes; l < e; l += 64)
        __builtin_prefetch(l, 0, 0);
}

/* The same for a stream read once, a tile or so ahead, by a kernel that
 * keeps its own working set in L1 (decode's K and V rows): the lines are
 * asked for into the outer caches only (PREFETCHT2), so they neither evict
 * the working set nor, when L1 turns them over before their use, go back
 * to memory, as non-temporal lines do. Decode over float32 caches of 64
 * MiB took 20-30% less time than with non-temporal requests, same output
 * (Zen 4, 1 and 2 threads); T1 and T0 gained less. */
static inline void fa_prefetch_stream(const void *p, int64_t bytes) {
    for (const char *l = fa_line_of(p), *e = (const char *)p + bytes; l < e; l += 64)
        __builtin_prefetch(l, 0, 1);
}

/* Asks for [p, p + bytes) with the intent to write it: rows a kernel is
 * about to overwrite in part of their lines. The ISA files are not built
 * with -mprfchw (Haswell has AVX2 but not PREFETCHW), so this is a
 * PREFETCHT0, which brings a line no other core holds in exclusive state,
 * and the store then needs no second request. */
static inline void fa_prefetch_write(void *p, int64_t bytes) {
    for (const char *l = fa_line_of(p), *e = (const char *)p + bytes; l < e; l += 64)
        __builtin_prefetch(l, 1, 3);
}

/* A prefetch issued a line at a time, paced by a kernel's progress (the
 * masked softmax requests a line of a later row per line of the row it
 * exponentiates). Requesting a whole row at once asks for more misses than
 * a core tracks at a time (a few dozen lines; a 512-key float row is 32),
 * and the surplus waits or is dropped; paced, the requests keep the memory
 * busy while the core computes. On a 2-core Zen 3 the softmax of
 * (8, 12, 512, 512) float32 took 4-16% less time than with whole-row
 * requests (interleaved medians). p: the next line to request; left: the
 * bytes still to request. */
typedef struct fa_prefetch_cursor {
    const char *p;
    int64_t left;
} fa_prefetch_cursor;

/* Requests what is left of the cursor's bytes at once and points it at
 * [p, p + bytes). */
static inline void fa_prefetch_retarget(fa_prefetch_cursor *c, const void *p, int64_t bytes) {
    if (c->left > 0) fa_prefetch(c->p, c->left);
    c->p = fa_line_of(p);
    c->left = bytes + ((const char *)p - c->p);
}

#endif /* FASTATTN_CACHE_HINTS_H */
