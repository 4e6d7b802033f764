/*
 * attention_impl.h: the fused attention kernel for one work item, written
 * once against simd_map.h and instantiated per ISA and dtype (see
 * attention_scalar.c, attention_avx2.c, attention_avx512.c).
 *
 * A work item is queries [q0, q1) (at most FA_ATTN_MQ) of head (b, h)
 * against keys [k0, k1). Shapes (strides in elements, last axes unit):
 *   q (B, H, Lq, D)   k (B, Hkv, Lk, D)   v (B, Hkv, Lk, Dv)
 *   out (B, H, Lq, Dv)   weights (B, H, Lq, Lk), optional
 *
 * Tiled path (rows >= FA_ATTN_ROW_PATH), one key tile of FA_ATTN_NK at a time:
 *   1. Qt (D, MQ): the query block transposed and pre-scaled, packed once;
 *   2. St (NK, MQ) = K_tile . Qt: the score tile *transposed*, so that the
 *      per-query softmax statistics are vertical vector operations and no
 *      horizontal reduction appears in the inner loops. Micro-kernel: MR
 *      keys x 2 vectors of queries, K elements broadcast straight from the
 *      key rows (no K packing);
 *   3. masks (ALiBi, causal diagonal, explicit masks), then the online
 *      softmax: m_new = max(m, tile max), alpha = exp(m - m_new),
 *      P = exp(St - m_new) in place, l = alpha * l + sum P;
 *   4. acc (MQ, Dv) = alpha * acc + P^T . V_tile. Micro-kernel: MR queries x
 *      2 vectors of value columns, P broadcast from St, V rows loaded as
 *      they lie (no V packing);
 *   the division by l happens once per row, at the end.
 * Row path (decode-like blocks): per query, vectorised along D for the
 * scores and along Dv for P.V, with the same online softmax.
 *
 * Tiles entirely past the causal diagonal or the key length are never
 * computed. Every sum runs in a fixed order that depends only on the
 * shapes, so results do not depend on the thread count.
 */
#include "half_rows.h"
#include "simd_dtype.h"

/* FA_DPBF16 1 (attention_avx512bf16.c, with FA_KV 1): the all-bf16
 * instance whose tiled path runs Q.K^T and P.V on vdpbf16ps pair tiles.
 * FA_AMX 1 (attention_amx.c, with FA_DPBF16 1): the same instance with
 * Q.K^T on AMX tiles where D is a multiple of 32 (scores_tile_amx) and
 * P.V on them where Dv <= 256 (pv_tile_amx). */
#ifndef FA_DPBF16
#define FA_DPBF16 0
#endif
#ifndef FA_AMX
#define FA_AMX 0
#endif
#if FA_AMX && !FA_DPBF16
#error "FA_AMX needs FA_DPBF16"
#endif
#if FA_DPBF16
#if FA_KV != 1 || FA_ISA_LEVEL != 2
#error "FA_DPBF16 needs FA_KV 1 at FA_ISA_LEVEL 2"
#endif
#undef DT
#define DT bf16dp
#endif

#ifndef FA_ATTN_IMPL_ONCE
#define FA_ATTN_IMPL_ONCE
#if FA_ISA_LEVEL == 2
#include "bf16_round_avx512.h"
#include "transpose_avx512.h"
#endif
/* MR: rows of the register tile; with 2 vector accumulators per row, plus
 * two operand vectors and one broadcast, it fills but does not exceed the
 * register file: AVX2 6 * 2 + 3 = 15 of 16 ymm, AVX-512 12 * 2 + 3 = 27 of
 * 32 zmm. The scalar build keeps a small 4 x 2 tile. */
#if FA_ISA_LEVEL == 2
#define FA_MR 12
#elif FA_ISA_LEVEL == 1
#define FA_MR 6
#else
#define FA_MR 4
#endif
/* 0 (drop) for the first 64 entries, then 1 (keep): fa_ramp + 64 - n is a
 * lane mask whose first n lanes are dropped. */
static const uint8_t fa_ramp[128] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
/* 1 (keep) for the first 64 entries, then 0 (drop): fa_ramp_keep + 64 - n
 * keeps the first n lanes and drops the rest (the left window edge). */
static const uint8_t fa_ramp_keep[128] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
#define FA_ALIGN_UP(n, a) (((n) + (a)-1) / (a) * (a))
/* Query rows requested ahead of their packing in the tiled path: eight
 * rows (16 lines of D = 64 floats) keep a few misses in flight within
 * L1's miss buffers. With these requests and those of the key tiles and
 * output rows, a padded batch in transformers' layout (B = 32, H = 12,
 * L = 128, D = 32, lengths 3-128) ran 5-6% faster (Zen 4, 2 threads);
 * contiguous prefill did not change. */
#define FA_ROWS_AHEAD 8
#endif

#define NC (2 * VL)           /* query chunk (tiled scores), value-column chunk */
#define MQ FA_ATTN_MQ
#define NK FA_ATTN_NK

/* Scratch regions of one thread, each 64-byte aligned. */
typedef struct {
    T *qt;     /* (D, MQ) packed, scaled Q^T; the row path uses its first D */
    T *st;     /* (NK, MQ) transposed score / probability tile */
    T *acc;    /* (MQ, ldacc) unnormalised output rows */
    T *m, *l, *alpha, *tmp; /* (MQ) running max, running sum, rescale */
    int64_t ldacc;
    /* vdpbf16ps tiles (FA_DPBF16): P as bf16 pairs of keys (NK/2, MQ) and
     * V as bf16 pairs of keys (NK/2, ldv2), 32-bit words */
    uint32_t *pp, *v2;
    int64_t ldv2;
    /* narrow K/V widened once per tile (tiled path): K (NK, D), V (NK, Dv) */
    T *kw, *vw;
} FA_KNAME(attn_scratch, DT);

static FA_KNAME(attn_scratch, DT) FA_KNAME(attn_carve, DT)(T *base, int64_t D, int64_t Dv) {
    FA_KNAME(attn_scratch, DT) s;
    const int64_t align = 64 / (int64_t)sizeof(T);
    s.ldacc = FA_ALIGN_UP(Dv, NC);
    s.qt = base;
    s.st = s.qt + FA_ALIGN_UP(D * MQ, align);
    s.acc = s.st + (int64_t)NK * MQ;
    s.m = s.acc + FA_ALIGN_UP(MQ * s.ldacc, align);
    s.l = s.m + MQ;
    s.alpha = s.l + MQ;
    s.tmp = s.alpha + MQ;
    s.pp = (uint32_t *)(((uintptr_t)(s.tmp + MQ) + 63) & ~(uintptr_t)63);
    s.v2 = s.pp + (int64_t)(NK / 2) * MQ;
    s.ldv2 = FA_ALIGN_UP(Dv, 32);
    s.kw = (T *)(((uintptr_t)(s.v2 + (int64_t)(NK / 2) * s.ldv2) + 63) & ~(uintptr_t)63);
    s.vw = s.kw + FA_ALIGN_UP((int64_t)NK * D, align);
    return s;
}

/* The int8 scales of kv head (b, hk) from key row kr0 on (NULL unless the
 * storage is scaled); scales are (B, Hkv, Lk) with a unit key stride. */
static inline const T *FA_KNAME(kv_scale_row, DT)(const float *sc, const int64_t *ss, int64_t b,
                                                  int64_t hk, int64_t kr0) {
#if KV_SCALED
    return sc + b * ss[0] + hk * ss[1] + kr0;
#else
    (void)sc, (void)ss, (void)b, (void)hk, (void)kr0;
    return NULL;
#endif
}

/* dst[d * dst_stride] = scale * (element qe + d of q), d < D: q's dtype,
 * or a 16-bit float (job->io16) widened exactly, a row at a time by the
 * level's vector widening (half_rows.h). */
static inline void FA_KNAME(scaled_q_row, DT)(const fa_attn_job *job, int64_t qe, int64_t D,
                                              T scale, T *dst, int64_t dst_stride) {
#if !FA_T_F64
    if (job->io16) {
        float row[256];
        for (int64_t d0 = 0; d0 < D; d0 += 256) {
            const int64_t n = D - d0 < 256 ? D - d0 : 256;
            fa_half_row_to_f32(job->io16, (const uint16_t *)job->q + qe + d0, 1, n, row);
            for (int64_t d = 0; d < n; ++d) dst[(d0 + d) * dst_stride] = row[d] * scale;
        }
        return;
    }
#endif
    const T *src = (const T *)job->q + qe;
    for (int64_t d = 0; d < D; ++d) dst[d * dst_stride] = src[d] * scale;
}


/* Qt rows [0, rows) of the tiled path: the query block transposed and
 * scaled, qt[d * MQ + i] = scale * q[i][d] for the rows at element qe,
 * qe + qs[2], ... (a unit stride along D), each requested FA_ROWS_AHEAD
 * rows ahead. AVX-512 float transposes 16 rows x 16 columns at a time in
 * registers and stores whole vectors, where a row at a time stores one
 * element per column: transformers' padded batch (B = 32, H = 12, L = 128,
 * D = 32, (B, L, H, D) layout) ran 2-9% faster, contiguous prefill the
 * same (Zen 4, 2 threads). The products are the same either way. */
static inline void FA_KNAME(pack_scaled_q, DT)(const fa_attn_job *job, int64_t qe, int64_t rows,
                                               int64_t D, T scale, T *qt, const char *qrows,
                                               int64_t qrow_bytes, int64_t qes) {
    int64_t i = 0;
#if FA_ISA_LEVEL == 2 && !FA_T_F64
    if (!job->io16) {
        const __m512 vs = _mm512_set1_ps(scale);
        const int64_t D16 = D / 16 * 16;
        /* a last block of fewer than 16 rows transposes zero rows after
         * them, into the padding columns (below cols, which are 0 anyway) */
        for (; i < rows && D16 > 0; i += 16) {
            const int nr = rows - i < 16 ? (int)(rows - i) : 16;
            for (int64_t r = i + FA_ROWS_AHEAD; r < i + 16 + FA_ROWS_AHEAD && r < rows; ++r)
                fa_prefetch(qrows + r * qrow_bytes, D * qes);
            const T *src = (const T *)job->q + qe + i * job->qs[2];
            for (int64_t d0 = 0; d0 < D16; d0 += 16) {
                __m512i blk[16];
                for (int r = 0; r < 16; ++r)
                    blk[r] = r < nr ? _mm512_castps_si512(_mm512_loadu_ps(src + r * job->qs[2] + d0))
                                    : _mm512_setzero_si512();
                fa_transpose16_epi32(blk);
                for (int c = 0; c < 16; ++c)
                    _mm512_storeu_ps(qt + (d0 + c) * MQ + i,
                                     _mm512_mul_ps(_mm512_castsi512_ps(blk[c]), vs));
            }
            for (int r = 0; r < nr; ++r)
                for (int64_t d = D16; d < D; ++d)
                    qt[d * MQ + i + r] = src[r * job->qs[2] + d] * scale;
        }
    }
#endif
    for (; i < rows; ++i) {
        if (i + FA_ROWS_AHEAD < rows)
            fa_prefetch(qrows + (i + FA_ROWS_AHEAD) * qrow_bytes, D * qes);
        FA_KNAME(scaled_q_row, DT)(job, qe + i * job->qs[2], D, scale, qt + i, MQ);
    }
}

/* ---- scores: St (nk, MQ) = K_tile (nk, D) . Qt (D, MQ) ------------------- */

/* One register tile: MR key rows x nv (1 or 2, a constant at each call)
 * vectors of query columns. mx: NULL, or the running tile max of these
 * query columns, folded in key order with the same V_MAX sequence as the
 * separate max pass would apply. */
static inline __attribute__((always_inline)) void FA_KNAME(scores_mr, DT)(
    const T *qt, const KT *const *rows, int64_t D, T *st, T *mx, int nv) {
    V a[2][FA_MR];
#pragma GCC unroll 16
    for (int r = 0; r < FA_MR; ++r) a[0][r] = a[1][r] = V_ZERO();
    for (int64_t d = 0; d < D; ++d) {
        const V x0 = V_LOADU(qt + d * MQ), x1 = nv > 1 ? V_LOADU(qt + d * MQ + VL) : x0;
#pragma GCC unroll 16
        for (int r = 0; r < FA_MR; ++r) {
            const V kb = V_SET1(KV_S(rows[r][d]));
            a[0][r] = V_FMADD(x0, kb, a[0][r]);
            if (nv > 1) a[1][r] = V_FMADD(x1, kb, a[1][r]);
        }
    }
#pragma GCC unroll 2
    for (int c = 0; c < nv; ++c) {
#pragma GCC unroll 16
        for (int r = 0; r < FA_MR; ++r) V_STOREU(st + r * MQ + c * VL, a[c][r]);
        if (mx) {
            V m = V_LOADU(mx + c * VL);
#pragma GCC unroll 16
            for (int r = 0; r < FA_MR; ++r) m = V_MAX(m, a[c][r]);
            V_STOREU(mx + c * VL, m);
        }
    }
}

/* Leftover keys (fewer than MR) go through the same register tile: rows
 * past the last key repeat it, and their scores land in tile rows >= nk
 * (inside the NK-row tile, since NK is a multiple of MR) that nothing reads.
 * A one-key loop would run at a quarter of the FMA rate. A repeated row
 * leaves the tile max as it is (V_MAX of a value already folded in).
 * tmax: NULL, or (MQ) receiving each query column's max over the tile's
 * scores (the tiles that need no mask, ALiBi or cap skip the max pass). */
static void FA_KNAME(scores_tile, DT)(const T *qt, const KT *kt, int64_t kst, int64_t D,
                                      int64_t nk, int64_t ic0, int64_t cols, T *st, T *tmax) {
    if (tmax)
        for (int64_t i = ic0; i < cols; ++i) tmax[i] = (T)-INFINITY;
    /* query chunk outer: its D x NC slice of Q^T stays in L1 while the
     * key rows stream past; a last chunk of one vector (cols is a multiple
     * of VL) runs a one-vector tile */
    for (int64_t ic = ic0; ic < cols; ic += NC) {
        for (int64_t j = 0; j < nk; j += FA_MR) {
            const KT *rows[FA_MR];
            for (int r = 0; r < FA_MR; ++r) rows[r] = kt + (j + r < nk ? j + r : nk - 1) * kst;
            if (cols - ic >= NC)
                FA_KNAME(scores_mr, DT)(qt + ic, rows, D, st + j * MQ + ic, tmax ? tmax + ic : NULL, 2);
            else
                FA_KNAME(scores_mr, DT)(qt + ic, rows, D, st + j * MQ + ic, tmax ? tmax + ic : NULL, 1);
        }
    }
}

/* ---- P.V: acc (rows, Dv) = alpha * acc + St^T (rows, nk) . V (nk, Dv) ---- */

/* vsc: the int8 rows' scales (KV_SCALED), applied to the widened V rows. */
static inline void FA_KNAME(pv_mr, DT)(const T *st, const KT *vt, int64_t vst, int64_t nk,
                                       int64_t w, const T *alpha, T *acc, int64_t ldacc,
                                       const T *vsc) {
    (void)vsc;
    V o0[FA_MR], o1[FA_MR];
#pragma GCC unroll 16
    for (int r = 0; r < FA_MR; ++r) {
        const V al = V_SET1(alpha[r]);
        o0[r] = V_MUL(V_LOADU(acc + r * ldacc), al);
        o1[r] = V_MUL(V_LOADU(acc + r * ldacc + VL), al);
    }
    if (w == NC) {
        for (int64_t j = 0; j < nk; ++j) {
            V b0 = KV_LOADU(vt + j * vst), b1 = KV_LOADU(vt + j * vst + VL);
#if KV_SCALED
            b0 = V_MUL(b0, V_SET1(vsc[j]));
            b1 = V_MUL(b1, V_SET1(vsc[j]));
#endif
#pragma GCC unroll 16
            for (int r = 0; r < FA_MR; ++r) {
                const V p = V_SET1(st[j * MQ + r]);
                o0[r] = V_FMADD(p, b0, o0[r]);
                o1[r] = V_FMADD(p, b1, o1[r]);
            }
        }
    } else { /* the last, partial column chunk: masked loads never read past Dv */
        const int64_t w0 = w < VL ? w : VL, w1 = w - w0;
        for (int64_t j = 0; j < nk; ++j) {
            V b0 = KV_LOADN(vt + j * vst, w0), b1 = KV_LOADN(vt + j * vst + VL, w1);
#if KV_SCALED
            b0 = V_MUL(b0, V_SET1(vsc[j]));
            b1 = V_MUL(b1, V_SET1(vsc[j]));
#endif
#pragma GCC unroll 16
            for (int r = 0; r < FA_MR; ++r) {
                const V p = V_SET1(st[j * MQ + r]);
                o0[r] = V_FMADD(p, b0, o0[r]);
                o1[r] = V_FMADD(p, b1, o1[r]);
            }
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < FA_MR; ++r) {
        V_STOREU(acc + r * ldacc, o0[r]);
        V_STOREU(acc + r * ldacc + VL, o1[r]);
    }
}

/* Rows [r0, rows_mr): r0 a multiple of MR, rows_mr rows rounded up to MR
 * (<= MQ; the padding rows are never output). */
static void FA_KNAME(pv_tile, DT)(const T *st, const KT *vt, int64_t vst, int64_t nk,
                                  int64_t Dv, int64_t r0, int64_t rows_mr, const T *alpha,
                                  T *acc, int64_t ldacc, const T *vsc) {
    for (int64_t c0 = 0; c0 < Dv; c0 += NC) {
        const int64_t w = Dv - c0 < NC ? Dv - c0 : NC;
        for (int64_t i0 = r0; i0 < rows_mr; i0 += FA_MR)
            FA_KNAME(pv_mr, DT)(st + i0, vt + c0, vst, nk, w, alpha + i0,
                                acc + i0 * ldacc + c0, ldacc, vsc);
    }
}


#if FA_DPBF16
/* ---- vdpbf16ps tiles (all-bf16 inputs) ----------------------------------------
 * One vdpbf16ps adds, per float lane, the products of a pair of bf16
 * elements: acc += a[2i+1] b[2i+1], then acc += a[2i] b[2i], each an
 * exact product added in float32. So both products run over pairs along
 * their reduction axis, at half the instructions of the float FMA tiles:
 *   scores: Q2 (ceil(D/2), MQ) words, word (p, i) = q[i, 2p] | q[i, 2p+1]
 *     << 16, against a broadcast word of the key row (k[j, 2p], k[j, 2p+1]);
 *   P.V: P2 (ceil(nk/2), MQ) words of probabilities rounded to bf16,
 *     (p[2t, i], p[2t+1, i]), against V2 (ceil(nk/2), ldv2) words, word
 *     (t, c) = (v[2t, c], v[2t+1, c]).
 * An odd D, or an odd nk, has a last pair whose high half is 0 on both
 * sides. The scale multiplies the float scores (a bf16 q times a scale is
 * not a bf16). */

/* Word p of a key row of D bf16 elements; past an odd D's end the high
 * half is 0 (the row is never read past its end). */
static inline uint32_t FA_KNAME(key_pair, DT)(const uint16_t *row, int64_t p, int64_t D) {
    if (2 * p + 1 < D) {
        uint32_t w;
        memcpy(&w, row + 2 * p, sizeof w);
        return w;
    }
    return row[2 * p];  /* odd D: the high half is 0 */
}

/* MR key rows x nv (1 or 2) vectors of queries: St rows = scale * K rows . Q2. */
static inline __attribute__((always_inline)) void FA_KNAME(scores_mr_dp, DT)(
    const uint32_t *q2, const uint16_t *const *rows, int64_t D, T scale, T *st, T *mx, int nv) {
    __m512 a[2][FA_MR];
#pragma GCC unroll 16
    for (int r = 0; r < FA_MR; ++r) a[0][r] = a[1][r] = _mm512_setzero_ps();
    /* whole pairs, then an odd D's last element (its pair's high half 0) */
    for (int64_t p = 0; p < (D + 1) / 2; ++p) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(q2 + p * MQ);
        const __m512bh x1 = nv > 1 ? (__m512bh)_mm512_loadu_si512(q2 + p * MQ + 16) : x0;
        if (2 * p + 1 < D) {
#pragma GCC unroll 16
            for (int r = 0; r < FA_MR; ++r) {
                uint32_t kw;
                memcpy(&kw, rows[r] + 2 * p, sizeof kw);
                const __m512bh kb = (__m512bh)_mm512_set1_epi32((int)kw);
                a[0][r] = _mm512_dpbf16_ps(a[0][r], x0, kb);
                if (nv > 1) a[1][r] = _mm512_dpbf16_ps(a[1][r], x1, kb);
            }
        } else {
#pragma GCC unroll 16
            for (int r = 0; r < FA_MR; ++r) {
                const __m512bh kb = (__m512bh)_mm512_set1_epi32((int)FA_KNAME(key_pair, DT)(rows[r], p, D));
                a[0][r] = _mm512_dpbf16_ps(a[0][r], x0, kb);
                if (nv > 1) a[1][r] = _mm512_dpbf16_ps(a[1][r], x1, kb);
            }
        }
    }
    const __m512 vs = _mm512_set1_ps(scale);
#pragma GCC unroll 2
    for (int c = 0; c < nv; ++c) {
#pragma GCC unroll 16
        for (int r = 0; r < FA_MR; ++r) {
            a[c][r] = _mm512_mul_ps(a[c][r], vs);
            _mm512_storeu_ps(st + r * MQ + c * 16, a[c][r]);
        }
        if (mx) { /* as in scores_mr */
            __m512 m = _mm512_loadu_ps(mx + c * 16);
#pragma GCC unroll 16
            for (int r = 0; r < FA_MR; ++r) m = _mm512_max_ps(m, a[c][r]);
            _mm512_storeu_ps(mx + c * 16, m);
        }
    }
}

/* Leftover keys as in scores_tile: rows past the last key repeat it and
 * land in tile rows >= nk that nothing reads. */
static void FA_KNAME(scores_tile_dp, DT)(const uint32_t *q2, const uint16_t *kt, int64_t kst,
                                         int64_t D, int64_t nk, int64_t ic0, int64_t cols,
                                         T scale, T *st, T *tmax) {
    if (tmax)
        for (int64_t i = ic0; i < cols; ++i) tmax[i] = (T)-INFINITY;
    for (int64_t ic = ic0; ic < cols; ic += NC) {
        for (int64_t j = 0; j < nk; j += FA_MR) {
            const uint16_t *rows[FA_MR];
            for (int r = 0; r < FA_MR; ++r) rows[r] = kt + (j + r < nk ? j + r : nk - 1) * kst;
            if (cols - ic >= NC)
                FA_KNAME(scores_mr_dp, DT)(q2 + ic, rows, D, scale, st + j * MQ + ic,
                                           tmax ? tmax + ic : NULL, 2);
            else
                FA_KNAME(scores_mr_dp, DT)(q2 + ic, rows, D, scale, st + j * MQ + ic,
                                           tmax ? tmax + ic : NULL, 1);
        }
    }
}


#if FA_AMX
/* Q.K^T on AMX tiles (amx_tiles.h), for D a multiple of 32 up to
 * FA_AMX_MAX_D: St (keys x queries) = K rows . Q2, as scores_tile_dp
 * computes it, tile by tile. K rows are the A operand as they are in
 * memory (16 keys x 32 elements = 16 pairs a tile row), Q2's pair rows
 * the B operand (16 pairs x 16 queries, row stride MQ words), and each C
 * tile (16 keys x 16 queries of float sums) is stored into St, where a
 * vector pass scales the rows and takes the column max. A last group of
 * fewer than 16 keys is read from a copy that repeats its last key (the
 * rows past nk land in St rows nothing reads, as in scores_tile_dp). The
 * tiles add each pair's products in their own order, with denormals
 * flushed: the scores differ from the vdpbf16ps ones in their last bits. */
#define FA_AMX_MAX_D 256

static void FA_KNAME(scores_tile_amx, DT)(const uint32_t *q2, const uint16_t *kt, int64_t kst,
                                          int64_t D, int64_t nk, int64_t ic0, int64_t cols,
                                          T scale, T *st, T *tmax) {
    uint16_t last[16 * FA_AMX_MAX_D] __attribute__((aligned(64)));
    const int64_t steps = D / 32, qst = MQ * (int64_t)sizeof(uint32_t);
    for (int64_t j = 0; j < nk; j += 16) {
        const uint16_t *rows = kt + j * kst;
        int64_t rst = kst * (int64_t)sizeof(uint16_t);
        if (nk - j < 16) {
            for (int64_t r = 0; r < 16; ++r)
                memcpy(last + r * D, kt + (j + r < nk ? j + r : nk - 1) * kst,
                       (size_t)D * sizeof(uint16_t));
            rows = last;
            rst = D * (int64_t)sizeof(uint16_t);
        }
        for (int64_t ic = ic0; ic < cols; ic += 32) {
            const int two = cols - ic >= 32; /* else one 16-column tile */
            _tile_zero(0);
            if (two) _tile_zero(1);
            for (int64_t s = 0; s < steps; ++s) {
                _tile_loadd(4, rows + 32 * s, rst);
                _tile_loadd(6, q2 + 16 * s * MQ + ic, qst);
                _tile_dpbf16ps(0, 4, 6);
                if (two) {
                    _tile_loadd(7, q2 + 16 * s * MQ + ic + 16, qst);
                    _tile_dpbf16ps(1, 4, 7);
                }
            }
            _tile_stored(0, st + j * MQ + ic, MQ * (int64_t)sizeof(T));
            if (two) _tile_stored(1, st + j * MQ + ic + 16, MQ * (int64_t)sizeof(T));
        }
    }
    const __m512 vs = _mm512_set1_ps(scale);
    for (int64_t ic = ic0; ic < cols; ic += 16) {
        __m512 m = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < nk; ++j) {
            const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(st + j * MQ + ic), vs);
            _mm512_storeu_ps(st + j * MQ + ic, x);
            m = _mm512_max_ps(m, x);
        }
        if (tmax) _mm512_storeu_ps(tmax + ic, m);
    }
}
#endif /* FA_AMX */

/* 2^t for t <= 0, for the probabilities this kernel rounds to bf16 next:
 * the range reduction of vf32_exp2_nonpos with a degree-4 polynomial for
 * 2^r on |r| <= 1/2 (fitted for relative error, 2.8e-6: 700 times below
 * the 2^-9 of the rounding that follows), one FMA fewer than its degree 5.
 * -inf gives 0 and NaN stays NaN, as there. */
static inline __m512 FA_KNAME(exp2_for_bf16, DT)(__m512 t) {
    __m512 nb;
    const __m512 r = vf32_exp2_reduce(t, &nb);
    __m512 p = _mm512_set1_ps(9.58285e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.590643e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4024099e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931242e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return vf32_exp2_scale(p, nb);
}

/* Word indices that interleave the 16-bit elements of two vectors a and
 * b (VPERMT2W numbering: a's are 0-31, b's 32-63): fa_pair_lo gives (a[i],
 * b[i]) for i < 16, fa_pair_hi for i in [16, 32). */
static const uint16_t fa_pair_lo[32] __attribute__((aligned(64))) = {
    0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
/* VPERMW indices that interleave the two halves of one vector: (x[i], x[16 + i]) */
static const uint16_t fa_pair_cat[32] __attribute__((aligned(64))) = {
    0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
static const uint16_t fa_pair_hi[32] __attribute__((aligned(64))) = {
    16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

/* The P2 words of a query chunk: probabilities p0 (key 2t) in the low and
 * p1 (key 2t + 1) in the high half of each lane, rounded to nearest even
 * by one VCVTNE2PS2BF16 and interleaved by one VPERMW, where the integer
 * rounding of each and a shift and an or took 10 operations: bf16 prefill
 * 2-3% faster, the same output (Zen 4, 2 threads, S = 128 to 2048).
 * The instruction reads a denormal input as 0, which changes nothing: the
 * vdpbf16ps and AMX products read a denormal bf16 operand as 0 too. */
static inline __m512i FA_KNAME(bf16_key_pairs, DT)(__m512 p0, __m512 p1) {
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0); /* p0 in words 0-15 */
    return _mm512_permutexvar_epi16(_mm512_load_si512(fa_pair_cat), both);
}

/* V2 words (t, c) for c in [0, ldv2) from the nk value rows at vt (row
 * stride vst, Dv elements); columns past Dv and the row past an odd nk's
 * end are 0. */
static void FA_KNAME(pack_v_pairs, DT)(const uint16_t *vt, int64_t vst, int64_t nk, int64_t Dv,
                                       int64_t ldv2, uint32_t *v2) {
    const __m512i lo_idx = _mm512_load_si512(fa_pair_lo), hi_idx = _mm512_load_si512(fa_pair_hi);
    for (int64_t t = 0; t < (nk + 1) / 2; ++t) {
        const uint16_t *a = vt + 2 * t * vst, *b = 2 * t + 1 < nk ? a + vst : NULL;
        uint32_t *dst = v2 + t * ldv2;
        int64_t c = 0;
        /* 32 columns of both rows, interleaved by two VPERMT2W */
        for (; c + 32 <= Dv; c += 32) {
            const __m512i x = _mm512_loadu_si512(a + c);
            const __m512i y = b ? _mm512_loadu_si512(b + c) : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + c, _mm512_permutex2var_epi16(x, lo_idx, y));
            _mm512_storeu_si512(dst + c + 16, _mm512_permutex2var_epi16(x, hi_idx, y));
        }
        for (; c + 16 <= Dv; c += 16) {
            const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + c)));
            __m512i w = lo;
            if (b)
                w = _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                                              _mm256_loadu_si256((const __m256i *)(b + c))),
                                                          16));
            _mm512_storeu_ps((float *)(dst + c), _mm512_castsi512_ps(w));
        }
        for (; c < Dv; ++c) dst[c] = (uint32_t)a[c] | (b ? (uint32_t)b[c] << 16 : 0u);
        for (; c < ldv2; ++c) dst[c] = 0;
    }
}

/* acc = alpha acc + P2 . V2 for a register tile of MRP query rows x NV
 * vectors of value columns (constants at each call, inlined). Two shapes:
 * 4 rows x 4 vectors (64 columns), 16 accumulators: each V2 vector serves
 * 4 rows and each broadcast P2 word 4 columns vectors, and 16 independent
 * vdpbf16ps chains cover its latency; and 6 rows x 2 vectors for a
 * 32-column tail. The whole 12-row tile's 24 accumulators with the V2
 * vectors and the broadcast left GCC one register short: it kept an
 * accumulator on the stack, and every pair of keys waited on a store and a
 * reload of it (a sixth of the kernel's time at D = 64). */
static inline __attribute__((always_inline)) void FA_KNAME(pv_mr_dp, DT)(
    const uint32_t *pp, const uint32_t *v2, int64_t npairs, int64_t ldv2, const T *alpha,
    T *acc, int64_t ldacc, const int MRP, const int NV) {
    __m512 o[6][4];
#pragma GCC unroll 16
    for (int r = 0; r < MRP; ++r) {
        const __m512 al = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c)
            o[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * ldacc + 16 * c), al);
    }
    for (int64_t t = 0; t < npairs; ++t) {
        __m512bh bv[4];
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) bv[c] = (__m512bh)_mm512_loadu_si512(v2 + t * ldv2 + 16 * c);
#pragma GCC unroll 16
        for (int r = 0; r < MRP; ++r) {
            const __m512bh p = (__m512bh)_mm512_set1_epi32((int)pp[t * MQ + r]);
#pragma GCC unroll 4
            for (int c = 0; c < NV; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], p, bv[c]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MRP; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + r * ldacc + 16 * c, o[r][c]);
}

/* Rows [r0, rows_mr) as in pv_tile (a multiple of FA_MR, 12, from r0, so of
 * 4 and 6), over 64-column chunks of ldv2 and a 32-column tail (the
 * accumulator's row stride rounds Dv up to the same 32). */
static void FA_KNAME(pv_tile_dp, DT)(const FA_KNAME(attn_scratch, DT) *sc, int64_t nk,
                                     int64_t r0, int64_t rows_mr) {
    const int64_t npairs = (nk + 1) / 2;
    int64_t c0 = 0;
    for (; c0 + 64 <= sc->ldv2; c0 += 64)
        for (int64_t i0 = r0; i0 < rows_mr; i0 += 6)
            FA_KNAME(pv_mr_dp, DT)(sc->pp + i0, sc->v2 + c0, npairs, sc->ldv2, sc->alpha + i0,
                                   sc->acc + i0 * sc->ldacc + c0, sc->ldacc, 6, 4);
    if (c0 < sc->ldv2)
        for (int64_t i0 = r0; i0 < rows_mr; i0 += 6)
            FA_KNAME(pv_mr_dp, DT)(sc->pp + i0, sc->v2 + c0, npairs, sc->ldv2, sc->alpha + i0,
                                   sc->acc + i0 * sc->ldacc + c0, sc->ldacc, 6, 2);
}
#if FA_AMX
/* P.V on AMX tiles where Dv <= FA_AMX_MAX_DV: acc rows [r0, rows_mr) =
 * alpha acc + P . V, with P as the A operand (16 queries x 16 pairs of
 * keys: P2's words transposed, 16 x 16 at a time in registers), V2 as B
 * (16 pairs of keys x 16 value columns, as pack_v_pairs lays it out) and
 * 16 x 16 blocks of acc as C, loaded and stored in place. The last step's
 * pairs past ceil(nk / 2) are zero on both sides: P's in the transposed
 * block, V2's in a padded copy (V2 has NK / 2 rows, not a multiple of 16).
 * Rows of a 16-row block outside [r0, rows_mr) get zero P rows, so their
 * sums come back unchanged. */
#define FA_AMX_MAX_DV 256
#if NK / 2 > 32
#error "pv_tile_amx holds at most two 16-pair steps of P"
#endif

static void FA_KNAME(pv_tile_amx, DT)(const FA_KNAME(attn_scratch, DT) *sc, int64_t nk,
                                      int64_t r0, int64_t rows_mr) {
    const int64_t npairs = (nk + 1) / 2, full = npairs / 16, steps = (npairs + 15) / 16;
    const int64_t ldv2 = sc->ldv2, ldacc = sc->ldacc;
    uint32_t vlast[16 * FA_AMX_MAX_DV] __attribute__((aligned(64)));
    if (steps > full) {
        const int64_t left = npairs - 16 * full;
        memcpy(vlast, sc->v2 + 16 * full * ldv2, (size_t)(left * ldv2) * sizeof(uint32_t));
        memset(vlast + left * ldv2, 0, (size_t)((16 - left) * ldv2) * sizeof(uint32_t));
    }
    for (int64_t r = r0; r < rows_mr; ++r) {
        const __m512 al = _mm512_set1_ps(sc->alpha[r]);
        for (int64_t c = 0; c < ldv2; c += 16)
            _mm512_storeu_ps(sc->acc + r * ldacc + c,
                             _mm512_mul_ps(_mm512_loadu_ps(sc->acc + r * ldacc + c), al));
    }
    uint32_t prow[2][16][16] __attribute__((aligned(64)));
    for (int64_t i0 = r0 / 16 * 16; i0 < rows_mr; i0 += 16) {
        for (int64_t s = 0; s < steps; ++s) {
            __m512i blk[16];
            for (int t = 0; t < 16; ++t) {
                const int64_t pair = 16 * s + t;
                blk[t] = pair < npairs ? _mm512_loadu_si512(sc->pp + pair * MQ + i0)
                                       : _mm512_setzero_si512();
            }
            fa_transpose16_epi32(blk);
            for (int i = 0; i < 16; ++i)
                _mm512_storeu_si512(prow[s][i], i0 + i >= r0 && i0 + i < rows_mr
                                                    ? blk[i] : _mm512_setzero_si512());
        }
        for (int64_t c0 = 0; c0 < ldv2; c0 += 16) {
            T *c = sc->acc + i0 * ldacc + c0;
            _tile_loadd(0, c, ldacc * (int64_t)sizeof(T));
            for (int64_t s = 0; s < steps; ++s) {
                _tile_loadd(4, prow[s], 64);
                _tile_loadd(6, s < full ? sc->v2 + 16 * s * ldv2 + c0 : vlast + c0,
                            ldv2 * (int64_t)sizeof(uint32_t));
                _tile_dpbf16ps(0, 4, 6);
            }
            _tile_stored(0, c, ldacc * (int64_t)sizeof(T));
        }
    }
}
#endif /* FA_AMX */
#endif /* FA_DPBF16 */

#if FA_KV != 0 && !FA_DPBF16
/* The tiled path widens a narrow K or V tile once, to (nk, cols) floats at
 * dst, and then runs the float instance's micro-kernels on it: each element
 * is converted once per tile instead of once per query block that reads it
 * (a broadcast of a half element costs a scalar conversion, and a vector of
 * halves without F16C a dozen integer operations). vsc: NULL, or the int8
 * rows' scales, applied here as the float kernels would apply them. */
#if FA_ISA_LEVEL == 0
/* Scalar level: one narrow row of a tile widened by a loop that the
 * compiler turns into the target's baseline vector code (half_float.h),
 * instead of a scalar conversion (a branch, for float16) per element. */
static inline void FA_KNAME(widen_row, DT)(const KT *restrict src, int64_t n, T *restrict dst) {
#if FA_KV == 1
    fa_bf16_row_to_f32(src, n, dst);
#elif FA_KV == 2
    fa_f16_row_to_f32(src, n, dst);
#else
    for (int64_t i = 0; i < n; ++i) dst[i] = (T)src[i];
#endif
}
#endif

static void FA_KNAME(widen_tile, DT)(const KT *src, int64_t sst, int64_t nk, int64_t cols,
                                     const T *vsc, T *dst) {
    for (int64_t j = 0; j < nk; ++j) {
        const KT *row = src + j * sst;
        T *out = dst + j * cols;
#if FA_ISA_LEVEL == 0
        FA_KNAME(widen_row, DT)(row, cols, out);
        if (vsc)
            for (int64_t c = 0; c < cols; ++c) out[c] *= vsc[j];
#else
        const V sj = V_SET1(vsc ? vsc[j] : (T)1);
        int64_t c = 0;
        for (; c + VL <= cols; c += VL) {
            const V x = KV_LOADU(row + c);
            V_STOREU(out + c, vsc ? V_MUL(x, sj) : x);
        }
        if (c < cols) {
            const V x = KV_LOADN(row + c, cols - c);
            V_STOREN(out + c, vsc ? V_MUL(x, sj) : x, cols - c);
        }
#endif
    }
}
#endif

/* ---- shared pieces ----------------------------------------------------------- */

/* Explicit masks on a score held as s[(key j) * sj + (query i) * si]. */
static void FA_KNAME(apply_explicit_mask, DT)(const fa_attn_job *job, int64_t b, int64_t h,
                                              int64_t q0, int64_t rows, int64_t kb,
                                              int64_t nk, T *s, int64_t sj, int64_t si) {
    const fa_mask_view *mv = &job->mask;
    const int64_t base = b * mv->stride_b + h * mv->stride_m;
    if (mv->kind == FA_MASK_BOOL) {
        const uint8_t *mk = (const uint8_t *)mv->data + base;
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < nk; ++j)
                if (!mk[(q0 + i) * mv->stride_q + (kb + j) * mv->stride_k])
                    s[j * sj + i * si] = (T)-INFINITY;
    } else {
        const T *mk = (const T *)mv->data + base;
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < nk; ++j)
                s[j * sj + i * si] += mk[(q0 + i) * mv->stride_q + (kb + j) * mv->stride_k];
    }
}

/* Row of key kb of head (b, hk) in K (base = job->k, st = job->ks) or V:
 * padded and packed batches hold a head's keys at one row stride; a paged
 * cache holds them in blocks of block_size rows, found through the block
 * table (entries checked by the driver before any kernel runs). */
static inline const KT *FA_KNAME(kv_row, DT)(const fa_attn_job *job, const char *base,
                                            const int64_t *st, int64_t b, int64_t hk,
                                            int64_t kb) {
    if (job->block_table) {
        const int64_t blk = job->block_table[b * job->bt_stride + kb / job->block_size];
        return (const KT *)base + blk * st[0] + (kb % job->block_size) * st[2] + hk * st[1];
    }
    return (const KT *)base + b * st[0] + hk * st[1] + (fa_attn_k_row0(job, b) + kb) * st[2];
}

/* Keys of a tile from kb: at most n, and in a paged cache never past the
 * end of kb's block, so that a tile's rows share one stride. */
static inline int64_t FA_KNAME(tile_keys, DT)(const fa_attn_job *job, int64_t kb, int64_t n) {
    if (job->block_table) {
        const int64_t left_in_block = job->block_size - kb % job->block_size;
        return n < left_in_block ? n : left_in_block;
    }
    return n;
}

/* The ALiBi reference key of a row: fa_attn_alibi_ref in attention_job.h. */
static inline int64_t FA_KNAME(alibi_ref, DT)(const fa_attn_job *job, int64_t b, int64_t h,
                                              int64_t ipos, T slope) {
    return fa_attn_alibi_ref(job, b, h, ipos, slope < (T)0);
}

/* Soft-capping: s = cap * tanh(s / cap) on n elements of s (n a multiple of
 * the vector length when whole is set; otherwise a scalar tail follows). */
static inline void FA_KNAME(softcap_run, DT)(T *s, int64_t n, T cap) {
    const T inv = (T)1 / cap;
    const V vcap = V_SET1(cap), vinv = V_SET1(inv);
    int64_t j = 0;
    for (; j + VL <= n; j += VL) V_STOREU(s + j, V_MUL(vcap, V_TANH(V_MUL(V_LOADU(s + j), vinv))));
    for (; j < n; ++j) s[j] = cap * S_TANH(s[j] * inv);
}

/* out row = acc row / l (0 for an empty row); weights row = exp(w - m) / l
 * over the keys that were computed, [k0, kend). A sink joins the row's max
 * and denominator here, once: m' = max(m, sink), l' = l e^(m - m') +
 * e^(sink - m'), and acc is rescaled by e^(m - m'). i is the row within
 * the sequence. */
static void FA_KNAME(finish_row, DT)(const fa_attn_job *job, int64_t b, int64_t h, int64_t i,
                                     const T *acc, T m, T l, int64_t k0, int64_t kend) {
    const int64_t Dv = job->Dv;
    const int64_t oe = b * job->os[0] + h * job->os[1] + (fa_attn_q_row0(job, b) + i) * job->os[2];
    T fac = (T)1;
    if (job->sinks && l != (T)0) {
        /* the scores carry ALiBi measured from ref, not from i_pos: shift
         * the sink by the same per-row constant */
        const T slope = job->alibi ? ((const T *)job->alibi)[h] : (T)0;
        const int64_t ipos = i + fa_attn_offset(job, b);
        const T sink = ((const T *)job->sinks)[h] +
                       (slope != (T)0 ? slope * (T)(ipos - FA_KNAME(alibi_ref, DT)(job, b, h, ipos, slope))
                                      : (T)0);
        const T mt = sink > m ? sink : m;
        fac = S_EXP_NONPOS(m - mt);
        l = l * fac + S_EXP_NONPOS(sink - mt);
        m = mt;
    }
    const T inv = l == (T)0 ? (T)0 : fac / l; /* NaN l stays NaN */
#if FA_ISA_LEVEL == 2 && !FA_T_F64
    if (job->io16) {
        /* 16-bit output rounded in registers, with half_rows_avx512.c's
         * rounding (the same bits): through a row buffer and the level's
         * row conversion, looked up per row, it cost a bf16 prefill of
         * (1, 12, 128, 64) in (B, L, H, D) 4% (Zen 4, 2 threads) */
        uint16_t *o16 = (uint16_t *)job->out + oe;
        const V vinv = V_SET1(inv);
        for (int64_t c = 0; c < Dv; c += 16) {
            const __mmask16 m = Dv - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Dv - c)) - 1u);
            const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, acc + c), vinv);
            const __m256i h = job->io16 == FA_DTYPE_BF16
                                  ? _mm512_cvtepi32_epi16(fa_bf16_round16(x))
                                  : _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_mask_storeu_epi16(o16 + c, m, h);
        }
    } else
#elif !FA_T_F64
    if (job->io16) { /* 16-bit output: each element rounded once, to nearest even, by
                        the level's vector rounding (half_rows.h); scalar rounding
                        cost a sixth of a float16 prefill's time */
        uint16_t *o16 = (uint16_t *)job->out + oe;
        float row[256];
        const V vinv = V_SET1(inv);
        for (int64_t c0 = 0; c0 < Dv; c0 += 256) {
            const int64_t n = Dv - c0 < 256 ? Dv - c0 : 256;
            int64_t c = 0;
            for (; c + VL <= n; c += VL) V_STOREU(row + c, V_MUL(V_LOADU(acc + c0 + c), vinv));
            if (c < n) V_STOREN(row + c, V_MUL(V_LOADN(acc + c0 + c, n - c), vinv), n - c);
            fa_f32_row_to_half(job->io16, row, n, o16 + c0, 1);
        }
    } else
#endif
    {
        T *o = (T *)job->out + oe;
        const V vinv = V_SET1(inv);
        int64_t c = 0;
        for (; c + VL <= Dv; c += VL) V_STOREU(o + c, V_MUL(V_LOADU(acc + c), vinv));
        if (c < Dv) V_STOREN(o + c, V_MUL(V_LOADN(acc + c, Dv - c), vinv), Dv - c);
    }
    if (job->weights) {
        T *w = (T *)job->weights + b * job->ws[0] + h * job->ws[1] + i * job->ws[2];
        const T winv = l == (T)0 ? (T)0 : (T)1 / l;
        const V vwinv = V_SET1(winv);
        if (l == (T)0) {
            for (int64_t j = k0; j < kend; ++j) w[j] = (T)0;
            return;
        }
        const V vm = V_SET1(m);
        int64_t j = k0;
        for (; j + VL <= kend; j += VL)
            V_STOREU(w + j, V_MUL(V_EXP_NONPOS(V_SUB(V_LOADU(w + j), vm)), vwinv));
        for (; j < kend; ++j) w[j] = S_EXP_NONPOS(w[j] - m) * winv;
    }
}

/* The int8 scales of keys [kb, kb + nk) of head (b, hk): from sc, the
 * head's scales for padded and packed keys (kv_scale_row: contiguous over
 * the keys), or, in a paged cache, from the scale cache base with strides
 * ss (block, head, row) through the block table. */
static inline void FA_KNAME(tile_scales, DT)(const fa_attn_job *job, const T *sc, const T *base,
                                             const int64_t *ss, int64_t b, int64_t hk,
                                             int64_t kb, int64_t nk, T *out) {
    if (job->block_table) {
        /* block by block: a table lookup (and a division) per block, not
         * per key, which cost int8 paged decode 7-9% of its time (Zen 4,
         * 2 threads) */
        const int64_t bs = job->block_size;
        for (int64_t j = 0, n; j < nk; j += n) {
            const int64_t t = kb + j;
            n = FA_KNAME(tile_keys, DT)(job, t, nk - j);
            const int64_t blk = job->block_table[b * job->bt_stride + t / bs];
            const T *src = base + blk * ss[0] + hk * ss[1] + (t % bs) * ss[2];
            for (int64_t u = 0; u < n; ++u) out[j + u] = src[u * ss[2]];
        }
        return;
    }
    for (int64_t j = 0; j < nk; ++j) out[j] = sc[kb + j];
}

/* ---- tiled path --------------------------------------------------------------- */

static void FA_KNAME(attention_tiled, DT)(const fa_attn_job *job, int64_t b, int64_t h,
                                          int64_t q0, int64_t q1, int64_t k0, int64_t k1,
                                          T *part, T *part_ml, FA_KNAME(attn_scratch, DT) *sc) {
    const int64_t D = job->D, Dv = job->Dv, rows = q1 - q0, hk = h / job->group;
    /* query columns: whole vectors (the scores' last chunk may be one) */
    const int64_t cols = FA_ALIGN_UP(rows, VL), rows_mr = FA_ALIGN_UP(rows, FA_MR);
    const int64_t qr0 = fa_attn_q_row0(job, b), kr0 = fa_attn_k_row0(job, b);
    const int64_t qe = b * job->qs[0] + h * job->qs[1] + (qr0 + q0) * job->qs[2];
    (void)kr0;
    const int64_t kst = job->ks[2], vst = job->vs[2];
#if KV_SCALED
    /* the head's int8 scales (padded and packed keys) and each tile's, found
     * through the block table in a paged cache */
    const T *ksc = job->block_table ? NULL
                                    : FA_KNAME(kv_scale_row, DT)(job->k_scale, job->kss, b, hk, kr0);
    const T *vsc = job->block_table ? NULL
                                    : FA_KNAME(kv_scale_row, DT)(job->v_scale, job->vss, b, hk, kr0);
    T kscale[NK], vscale[NK];
#endif
    const T scale = (T)job->scale;
    /* row i sees keys [i + off - left, i + off + right] (a side only when
     * bounded; causality is right = 0) */
    const int has_right = job->has_right, has_left = job->has_left;
    const int64_t right = job->right, left = job->left;
    const int64_t off = fa_attn_offset(job, b);
    const T cap = (T)job->softcap;
    const T slope = job->alibi ? ((const T *)job->alibi)[h] : (T)0;
    T *w = job->weights ? (T *)job->weights + b * job->ws[0] + h * job->ws[1] : NULL;

    /* In a (B, L, H, D) layout (transformers' projections, viewed as
     * (B, H, L, D)) consecutive rows of q, K, V and the output lie a token
     * row apart: each row is a line or two of its own, which the hardware
     * prefetcher does not fetch ahead. The query rows are requested paced
     * with their packing (FA_ROWS_AHEAD ahead), each key tile's K and V
     * rows with the tile before (into the outer caches, as for decode), and
     * the output rows for writing with the last tile. */
    const int64_t qes = (FA_DPBF16 || job->io16) ? 2 : (int64_t)sizeof(T);
    const char *qrows = (const char *)job->q + qe * qes;
    const int64_t qrow_bytes = job->qs[2] * qes;
    for (int64_t i = 0; i < rows && i < FA_ROWS_AHEAD; ++i)
        fa_prefetch(qrows + i * qrow_bytes, D * qes);
#if FA_DPBF16
    /* 1. pack Q2: bf16 pairs along D, unscaled (exact); padding columns 0 */
    uint32_t *q2 = (uint32_t *)sc->qt;
    for (int64_t i = FA_ROWS_AHEAD; i < rows; ++i) fa_prefetch(qrows + i * qrow_bytes, D * qes);
    {
        const uint16_t *q16 = (const uint16_t *)job->q + qe;
        const int64_t P16 = D / 32 * 16; /* pairs in whole 16-pair blocks */
        /* 16 rows x 16 pairs transposed in registers, whole vectors stored
         * (a last block of fewer rows transposes zero rows into the padding
         * columns): word by word, the scalar gathers of the pairs took 2%
         * of a bf16 prefill's time, (1, 12, 512, 64) in (B, L, H, D) */
        for (int64_t i = 0; i < rows && P16 > 0; i += 16) {
            const int nr = rows - i < 16 ? (int)(rows - i) : 16;
            for (int64_t p0 = 0; p0 < P16; p0 += 16) {
                __m512i blk[16];
                for (int r = 0; r < 16; ++r)
                    blk[r] = r < nr ? _mm512_loadu_si512(q16 + (i + r) * job->qs[2] + 2 * p0)
                                    : _mm512_setzero_si512();
                fa_transpose16_epi32(blk);
                for (int c = 0; c < 16; ++c) _mm512_storeu_si512(q2 + (p0 + c) * MQ + i, blk[c]);
            }
        }
        for (int64_t p = P16; p < (D + 1) / 2; ++p) {
            uint32_t *dst = q2 + p * MQ;
            for (int64_t i = 0; i < rows; ++i)
                dst[i] = FA_KNAME(key_pair, DT)(q16 + i * job->qs[2], p, D);
        }
        for (int64_t p = 0; p < (D + 1) / 2; ++p)
            for (int64_t i = rows; i < cols; ++i) q2[p * MQ + i] = 0;
    }
#else
    /* 1. pack Q^T, scaled (pack_scaled_q); padding columns are zero. Each
     * query row is read contiguously, with the dtype decided once per
     * block (a per-element conversion call cost an eighth of short-head
     * calls) */
    FA_KNAME(pack_scaled_q, DT)(job, qe, rows, D, scale, sc->qt, qrows, qrow_bytes, qes);
    for (int64_t d = 0; d < D; ++d)
        for (int64_t i = rows; i < cols; ++i) sc->qt[d * MQ + i] = (T)0;
#endif
    for (int64_t i = 0; i < cols; ++i) {
        sc->m[i] = (T)-INFINITY;
        sc->l[i] = (T)0;
    }
    memset(sc->acc, 0, (size_t)(rows_mr * sc->ldacc) * sizeof(T));
    /* P.V runs whole register tiles, so when the tile height does not
     * divide the query columns (rows_mr > cols, e.g. 30 rows: 36 vs 32 on
     * AVX-512 float) it reads st and alpha columns that no pass writes.
     * Their rows are never output, but leftover scratch could hold NaN or
     * subnormals (slow FMA assists): they get P = 0 and alpha = 1. */
    for (int64_t i = cols; i < rows_mr; ++i) {
        sc->alpha[i] = (T)1;
        for (int64_t j = 0; j < NK; ++j) sc->st[j * MQ + i] = (T)0;
#if FA_DPBF16
        for (int64_t t = 0; t < NK / 2; ++t) sc->pp[t * MQ + i] = 0;
#endif
    }

    /* keys past the last row's right limit, or before the first row's left
     * limit, are never attended */
    int64_t kbeg = k0, kend = k1;
    if (has_left && q0 + off - left > kbeg) kbeg = q0 + off - left;
    if (has_right && q1 - 1 + off + right + 1 < kend) kend = q1 - 1 + off + right + 1;
    if (kend < kbeg) kend = kbeg;
    if (w)
        for (int64_t i = 0; i < rows; ++i)
            memset(w + (q0 + i) * job->ws[2], 0, (size_t)job->Lk * sizeof(T));

    for (int64_t kb = kbeg, nk; kb < kend; kb += nk) {
        nk = FA_KNAME(tile_keys, DT)(job, kb, kend - kb < NK ? kend - kb : NK);
        T *st = sc->st;
        if (kb + nk < kend) {
            /* the next tile's K and V rows (a paged tile ends with its block) */
            const int64_t kn = kb + nk;
            const int64_t nn = FA_KNAME(tile_keys, DT)(job, kn, kend - kn < NK ? kend - kn : NK);
            const KT *kr = FA_KNAME(kv_row, DT)(job, job->k, job->ks, b, hk, kn);
            const KT *vr = FA_KNAME(kv_row, DT)(job, job->v, job->vs, b, hk, kn);
            for (int64_t j = 0; j < nn; ++j) {
                fa_prefetch_stream(kr + j * kst, D * (int64_t)sizeof(KT));
                fa_prefetch_stream(vr + j * vst, Dv * (int64_t)sizeof(KT));
            }
        } else if (!part) {
            /* the output rows, to be written after this last tile */
            const int64_t oes = job->io16 ? 2 : (int64_t)sizeof(T);
            char *orow = job->out + (b * job->os[0] + h * job->os[1] + (qr0 + q0) * job->os[2]) * oes;
            for (int64_t i = 0; i < rows; ++i) fa_prefetch_write(orow + i * job->os[2] * oes, Dv * oes);
        }
#if KV_SCALED
        FA_KNAME(tile_scales, DT)(job, ksc, job->k_scale, job->kss, b, hk, kb, nk, kscale);
        FA_KNAME(tile_scales, DT)(job, vsc, job->v_scale, job->vss, b, hk, kb, nk, vscale);
#endif
        /* With causality, rows [0, live) see no key of this tile (row i sees
         * keys up to q0 + i + off < kb): their scores, softmax update and
         * P.V are skipped, which halves the wasted work on the diagonal of
         * a 96-row block. The cut is rounded down to a query chunk (ic0,
         * scores) and to a register tile (r0, P.V); rows [r0, ic0) get
         * P = 0 and alpha = 1, so P.V leaves them as they are. The weights
         * output reads every score of the tile, so it keeps them all. */
        int64_t ic0 = 0, r0 = 0;
        if (has_right && !w && kb - q0 - off - right > 0) {
            ic0 = (kb - q0 - off - right) / NC * NC;
            r0 = ic0 / FA_MR * FA_MR;
            for (int64_t r = r0; r < ic0; ++r) {
                sc->alpha[r] = (T)1;
                for (int64_t j = 0; j < nk; ++j) st[j * MQ + r] = (T)0;
#if FA_DPBF16
                for (int64_t t = 0; t < (nk + 1) / 2; ++t) sc->pp[t * MQ + r] = 0;
#endif
            }
        }
        /* the right edge needs masking when some key exceeds the first row's
         * limit, the left edge when some key is below the last row's */
        const int diag = has_right && kb + nk - 1 > q0 + off + right;
        const int ledge = has_left && kb < q1 - 1 + off - left;
        /* a tile that nothing changes after the product (no mask edge, explicit
         * mask, ALiBi, cap or int8 scale) takes its max from the micro-kernels */
        const int plain = !diag && !ledge && !job->mask.data && slope == (T)0 && !(cap > (T)0) &&
                          !KV_SCALED;
        /* 2. scores */
#if FA_DPBF16
#if FA_AMX
        if (D % 32 == 0 && D <= FA_AMX_MAX_D)
            FA_KNAME(scores_tile_amx, DT)(q2, FA_KNAME(kv_row, DT)(job, job->k, job->ks, b, hk, kb),
                                          kst, D, nk, ic0, cols, scale, st, plain ? sc->tmp : NULL);
        else
#endif
        FA_KNAME(scores_tile_dp, DT)(q2, FA_KNAME(kv_row, DT)(job, job->k, job->ks, b, hk, kb),
                                     kst, D, nk, ic0, cols, scale, st, plain ? sc->tmp : NULL);
#else
#if FA_KV != 0
        FA_KNAME(widen_tile, DT)(FA_KNAME(kv_row, DT)(job, job->k, job->ks, b, hk, kb), kst, nk, D,
                                 NULL, sc->kw);
        FA_KNAME(scores_tile, f32)(sc->qt, sc->kw, D, D, nk, ic0, cols, st, plain ? sc->tmp : NULL);
#else
        FA_KNAME(scores_tile, DT)(sc->qt, FA_KNAME(kv_row, DT)(job, job->k, job->ks, b, hk, kb),
                                  kst, D, nk, ic0, cols, st, plain ? sc->tmp : NULL);
#endif
#endif
#if KV_SCALED
        /* int8 keys: q . (values * scale_j) = (q . values) * scale_j */
        for (int64_t j = 0; j < nk; ++j) {
            const V sj = V_SET1(kscale[j]);
            for (int64_t ic = ic0; ic < cols; ic += VL)
                V_STOREU(st + j * MQ + ic, V_MUL(V_LOADU(st + j * MQ + ic), sj));
        }
#endif
        /* 2b. soft-capping, on the scaled scores before any mask */
        if (cap > (T)0)
            for (int64_t j = 0; j < nk; ++j)
                FA_KNAME(softcap_run, DT)(st + j * MQ + ic0, cols - ic0, cap);
        /* 3a. masks that are not vectorised across queries */
        if (job->mask.data)
            FA_KNAME(apply_explicit_mask, DT)(job, b, h, q0 + ic0, rows - ic0, kb, nk, st + ic0, MQ, 1);
        /* 3b. ALiBi, causal diagonal, tile max */
        for (int64_t ic = ic0; ic < cols && !plain; ic += VL) {
            V ref = V_ZERO();
            if (slope != (T)0) {
                T lanes[64];
                for (int t = 0; t < VL; ++t)
                    lanes[t] = (T)FA_KNAME(alibi_ref, DT)(job, b, h, q0 + ic + t + off, slope);
                ref = V_LOADU(lanes);
            }
            V mb = V_SET1((T)-INFINITY);
            for (int64_t j = 0; j < nk; ++j) {
                V s = V_LOADU(st + j * MQ + ic);
                if (slope != (T)0) s = V_FMADD(V_SET1(slope), V_SUB(V_SET1((T)(kb + j)), ref), s);
                if (diag) {
                    /* query q0+ic+t sees key kb+j iff q0+ic+t >= kb+j-off-right */
                    int64_t drop = kb + j - off - right - (q0 + ic);
                    drop = drop < 0 ? 0 : drop > VL ? VL : drop;
                    if (drop) s = V_KEEP(s, fa_ramp + 64 - drop);
                }
                if (ledge) {
                    /* query q0+ic+t sees key kb+j iff q0+ic+t <= kb+j-off+left */
                    int64_t keep = kb + j - off + left - (q0 + ic) + 1;
                    keep = keep < 0 ? 0 : keep;
                    if (keep < VL) s = V_KEEP(s, fa_ramp_keep + 64 - keep);
                }
                V_STOREU(st + j * MQ + ic, s);
                mb = V_MAX(mb, s);
            }
            V_STOREU(sc->tmp + ic, mb);
        }
        if (w) /* masked, scaled scores; normalised in finish_row */
            for (int64_t i = 0; i < rows; ++i)
                for (int64_t j = 0; j < nk; ++j) w[(q0 + i) * job->ws[2] + kb + j] = st[j * MQ + i];
        /* 3c. online softmax update */
        for (int64_t ic = ic0; ic < cols; ic += VL) {
            const V mold = V_LOADU(sc->m + ic);
            const V mnew = V_MAX(mold, V_LOADU(sc->tmp + ic));
            /* a row with nothing valid yet keeps -inf; exp(-inf - (-T_MAX)) = 0 */
            const V msafe = V_MAX(V_SET1(-T_MAX), mnew);
            const V alpha = V_EXP_NONPOS(V_SUB(mold, msafe));
            V sum = V_ZERO();
#if FA_DPBF16
            /* P goes straight to its bf16 pairs of keys (the P2 tile); the
             * sum is of the float probabilities, in the same order */
            /* e^x as 2^(x log2 e): the base-2 exponential's reduction is one
             * exact subtraction, three vector operations fewer than e^x's;
             * and a degree-4 polynomial, enough for a bf16 result */
            const V vlog2e = V_SET1((T)T_LOGB_E);
            int64_t j = 0;
            for (; j + 2 <= nk; j += 2) {
                const V p0 = FA_KNAME(exp2_for_bf16, DT)(V_MUL(V_SUB(V_LOADU(st + j * MQ + ic), msafe), vlog2e));
                const V p1 = FA_KNAME(exp2_for_bf16, DT)(V_MUL(V_SUB(V_LOADU(st + (j + 1) * MQ + ic), msafe), vlog2e));
                sum = V_ADD(V_ADD(sum, p0), p1);
                _mm512_storeu_si512(sc->pp + j / 2 * MQ + ic, FA_KNAME(bf16_key_pairs, DT)(p0, p1));
            }
            if (j < nk) { /* odd nk: the last pair's high half is 0 */
                const V p0 = FA_KNAME(exp2_for_bf16, DT)(V_MUL(V_SUB(V_LOADU(st + j * MQ + ic), msafe), vlog2e));
                sum = V_ADD(sum, p0);
                _mm512_storeu_si512(sc->pp + j / 2 * MQ + ic, FA_KNAME(bf16_key_pairs, DT)(p0, V_ZERO()));
            }
#else
            for (int64_t j = 0; j < nk; ++j) {
                const V p = V_EXP_NONPOS(V_SUB(V_LOADU(st + j * MQ + ic), msafe));
                V_STOREU(st + j * MQ + ic, p);
                sum = V_ADD(sum, p);
            }
#endif
            V_STOREU(sc->l + ic, V_FMADD(V_LOADU(sc->l + ic), alpha, sum));
            V_STOREU(sc->m + ic, mnew);
            V_STOREU(sc->alpha + ic, alpha);
        }
        /* 4. acc = alpha * acc + P^T V */
#if FA_DPBF16
        FA_KNAME(pack_v_pairs, DT)(FA_KNAME(kv_row, DT)(job, job->v, job->vs, b, hk, kb), vst, nk,
                                   Dv, sc->ldv2, sc->v2);
#if FA_AMX
        if (sc->ldv2 <= FA_AMX_MAX_DV)
            FA_KNAME(pv_tile_amx, DT)(sc, nk, r0, rows_mr);
        else
#endif
        FA_KNAME(pv_tile_dp, DT)(sc, nk, r0, rows_mr);
#else
#if FA_KV != 0
#if KV_SCALED
        const T *vtile_scale = vscale; /* int8 values: widened and scaled */
#else
        const T *vtile_scale = NULL;
#endif
#if FA_ISA_LEVEL >= 1
        /* V vectors are widened in registers as P.V loads them, once per
         * FA_MR query rows (a vcvtph2ps, a shift or a vpmovsxbd): cheaper
         * than a store to scratch and a reload, which cost float16 prefill
         * 3-5% against float32 */
        FA_KNAME(pv_tile, DT)(st, FA_KNAME(kv_row, DT)(job, job->v, job->vs, b, hk, kb), vst, nk,
                              Dv, r0, rows_mr, sc->alpha, sc->acc, sc->ldacc, vtile_scale);
#else
        /* the scalar level converts each element once, into scratch */
        FA_KNAME(widen_tile, DT)(FA_KNAME(kv_row, DT)(job, job->v, job->vs, b, hk, kb), vst, nk, Dv,
                                 vtile_scale, sc->vw);
        FA_KNAME(pv_tile, f32)(st, sc->vw, Dv, nk, Dv, r0, rows_mr, sc->alpha, sc->acc, sc->ldacc,
                               NULL);
#endif
#else
        FA_KNAME(pv_tile, DT)(st, FA_KNAME(kv_row, DT)(job, job->v, job->vs, b, hk, kb), vst, nk,
                              Dv, r0, rows_mr, sc->alpha, sc->acc, sc->ldacc, NULL);
#endif
#endif
    }

    for (int64_t i = 0; i < rows; ++i) {
        const T *a = sc->acc + i * sc->ldacc;
        if (part) {
            memcpy(part + i * Dv, a, (size_t)Dv * sizeof(T));
            part_ml[2 * i] = sc->m[i];
            part_ml[2 * i + 1] = sc->l[i];
        } else {
            FA_KNAME(finish_row, DT)(job, b, h, q0 + i, a, sc->m[i], sc->l[i], kbeg, kend);
        }
    }
}

/* ---- row path --------------------------------------------------------------------- */

/* RB: query rows per pass of the row-path kernels. The rows of a GQA group
 * read the same K and V rows, so each K/V vector is loaded (and, for narrow
 * storage, widened) once per RB rows instead of once per row. Scores hold
 * RB x 4 accumulators, four key vectors and a query vector: AVX-512
 * 16 + 5 = 21 of 32 zmm, AVX2 8 + 5 = 13 of 16 ymm; P.V holds RB x 4 column
 * accumulators, four value vectors and a broadcast, the same counts. */
#ifndef FA_RB
#if FA_ISA_LEVEL == 2
#define FA_RB 4
#else
#define FA_RB 2
#endif
#endif

/* out[0..4) = V_HSUM of a, b, c, d, bit for bit (the same pairs are added
 * in the same tree), with the four reductions sharing their shuffles and
 * adds: 14 instead of 32 operations on AVX-512, 13 instead of 24 on AVX2.
 * Decode takes one such sum per key and query row. */
static inline void FA_KNAME(hsum4, DT)(V a, V b, V c, V d, T *out) {
#if FA_ISA_LEVEL == 2 && !FA_T_F64
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    /* 128-bit lanes: the 4-lane partial sums of a, b, c, d */
    __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    w = _mm512_add_ps(w, _mm512_permute_ps(w, _MM_SHUFFLE(3, 2, 3, 2)));
    w = _mm512_add_ps(w, _mm512_permute_ps(w, _MM_SHUFFLE(1, 1, 1, 1)));
    w = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12), w);
    _mm_storeu_ps(out, _mm512_castps512_ps128(w));
#elif FA_ISA_LEVEL == 1 && !FA_T_F64
    const __m256 ab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    const __m256 cd = _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
    /* halves: [a, a, c, c] and [b, b, d, d] pair sums, then the final pair */
    __m256 z = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    z = _mm256_add_ps(_mm256_shuffle_ps(z, z, _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm256_shuffle_ps(z, z, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm_storeu_ps(out, _mm_unpacklo_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps(z, 1)));
#else
    out[0] = V_HSUM(a), out[1] = V_HSUM(b), out[2] = V_HSUM(c), out[3] = V_HSUM(d);
#endif
}

/* K or V rows for the row kernels: a run of rows (row j at base + j *
 * stride) that they read, and for the prefetcher, which may look past the
 * run, the list of each row's address (list[j]; NULL: the run goes on;
 * `lists`, a constant in each compiled copy, says which). The scores of a
 * key tile that spans blocks of a paged cache go through them one run
 * (block) at a time; P.V takes the tile's runs at once (more: NULL for
 * one run; else after the first `first` rows from base, the rows go on at
 * more[0], more[1], ..., `per` rows each, one stride apart). Reading every
 * row's address from a list instead cost about a fifth of fp32 decode's
 * time, in which the K and V loads wait on memory (Zen 4/5, 1 thread). */
typedef struct {
    const KT *const *list;
    const KT *base;
    int64_t stride;
    const KT *const *more;
    int64_t first, per;
} FA_KNAME(kv_rows, DT);
#ifndef FA_KV_ROW
#define FA_KV_ROW(t, j) ((t).base + (j) * (t).stride)
#define FA_KV_PREFETCH_ROW(t, j) (lists ? (t).list[j] : FA_KV_ROW(t, j))
#endif

/* A cursor over n rows of a kv_rows, run after run: each call of
 * kv_next gives the next row, with a branch per row that the predictor
 * follows instead of a division. P.V then goes through a tile in one call
 * wherever its blocks lie, each row's output in registers throughout;
 * cutting it at each block (or, in contiguous decode, where a split's
 * tiles crossed a multiple of the tile size) cost 2-20% of decode's time,
 * the most with bfloat16 caches (Zen 4, 2 threads). */
typedef struct {
    const KT *row;
    const KT *const *more;
    int64_t left, per, stride;
} FA_KNAME(kv_walk, DT);

static inline FA_KNAME(kv_walk, DT) FA_KNAME(kv_begin, DT)(const FA_KNAME(kv_rows, DT) t,
                                                            int64_t n) {
    const FA_KNAME(kv_walk, DT) w = {t.base, t.more, t.more ? t.first : n, t.per, t.stride};
    return w;
}

static inline const KT *FA_KNAME(kv_next, DT)(FA_KNAME(kv_walk, DT) *w) {
    if (w->left == 0) w->row = *w->more++, w->left = w->per;
    const KT *r = w->row;
    w->row += w->stride;
    --w->left;
    return r;
}

/* The rows of keys [kb, kb + nk) of head (b, hk) in K or V (base, st as
 * for kv_row): one pointer per key, so that a tile may span the blocks of
 * a paged cache and tiles start and end where contiguous ones do. */
static inline void FA_KNAME(tile_rows, DT)(const fa_attn_job *job, const char *base,
                                           const int64_t *st, int64_t b, int64_t hk, int64_t kb,
                                           int64_t nk, const KT **rows) {
    for (int64_t j = 0, n; j < nk; j += n) {
        const KT *r0 = FA_KNAME(kv_row, DT)(job, base, st, b, hk, kb + j);
        n = FA_KNAME(tile_keys, DT)(job, kb + j, nk - j);
        for (int64_t t = 0; t < n; ++t) rows[j + t] = r0 + t * st[2];
    }
}

/* s[r * sst + j] = dot(q_r, k_j) for nr rows (q_r = qs + r * qst) and nk
 * keys (rows kr[j]), four keys at a time to hide FMA latency. Each row's
 * sum runs along D in one vector accumulator, then V_HSUM: the same order
 * for every nr, so a row's scores do not depend on the rows beside it.
 * Decode is a pure stream of K and V, which the hardware prefetcher alone
 * follows poorly: with each group of four keys, the same keys of the next
 * K tile (pk, pk_rows of them) and of a V tile (pv, pv_rows of them) are
 * requested, spread over the compute so that the loads overlap it. nr is a
 * constant at each call (inlined). */
#if FA_ISA_LEVEL == 0
/* The scalar level's version: each (row, key) sum runs in FA_LANES partial
 * sums (d mod 4), held in a GNU C vector (simd_map.h) that compilers map
 * onto the target's baseline vector unit (SSE2, NEON) with contiguous
 * loads, narrow K widened in those registers, and added as (0 + 1) + (2 +
 * 3) at the end. One running sum per key, as below, was vectorized across
 * four keys instead, which took a transpose of four key rows per step and
 * a scalar conversion per narrow element: float32 decode at 60% of the
 * read bandwidth, bfloat16 1.1 and float16 2.7 times slower than it (Zen
 * 5, 2 threads, H = 32, D = 128, 2048 keys). The order is fixed, so a
 * row's scores still do not depend on its neighbours. */
#if FA_T_F64
#define TL fa_f64x4
#else
#define TL fa_f32x4
#endif
#if !FA_KV
#define KV_LANES_LOAD FA_LANES_LOAD
#elif FA_KV == 1
#define KV_LANES_LOAD FA_LANES_LOAD_BF16
#elif FA_KV == 2
#define KV_LANES_LOAD FA_LANES_LOAD_F16
#else
#define KV_LANES_LOAD FA_LANES_LOAD_I8
#endif
static inline __attribute__((always_inline)) void FA_KNAME(row_scores_n, DT)(
    const T *qs, int64_t qst, int nr, const FA_KNAME(kv_rows, DT) kr, int64_t D, int64_t nk,
    T *s, int64_t sst, const FA_KNAME(kv_rows, DT) pk, int64_t pk_rows,
    const FA_KNAME(kv_rows, DT) pv, int64_t pv_rows, int do_prefetch, int64_t Dv, int lists) {
    const int64_t Dl = D / FA_LANES * FA_LANES;
    for (int64_t j = 0; j < nk; j += 4) {
        const int64_t nj = nk - j < 4 ? nk - j : 4;
        if (do_prefetch && nj == 4)
            for (int64_t r = j; r < j + 4; ++r) {
                if (r < pk_rows) fa_prefetch_stream(FA_KV_PREFETCH_ROW(pk, r), D * (int64_t)sizeof(KT));
                if (r < pv_rows) fa_prefetch_stream(FA_KV_PREFETCH_ROW(pv, r), Dv * (int64_t)sizeof(KT));
            }
        /* a short last group repeats its last key; those sums are dropped */
        const KT *k[4];
        for (int64_t t = 0; t < 4; ++t) k[t] = FA_KV_ROW(kr, j + (t < nj ? t : nj - 1));
        TL a[FA_RB][4];
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) a[r][0] = a[r][1] = a[r][2] = a[r][3] = (TL){0};
        for (int64_t d = 0; d < Dl; d += FA_LANES) {
            TL b0, b1, b2, b3;
            KV_LANES_LOAD(b0, k[0] + d);
            KV_LANES_LOAD(b1, k[1] + d);
            KV_LANES_LOAD(b2, k[2] + d);
            KV_LANES_LOAD(b3, k[3] + d);
#pragma GCC unroll 8
            for (int r = 0; r < nr; ++r) {
                TL x;
                FA_LANES_LOAD(x, qs + r * qst + d);
                a[r][0] += x * b0, a[r][1] += x * b1, a[r][2] += x * b2, a[r][3] += x * b3;
            }
        }
        for (int64_t d = Dl; d < D; ++d)
#pragma GCC unroll 8
            for (int r = 0; r < nr; ++r)
                for (int t = 0; t < 4; ++t) a[r][t][d - Dl] += qs[r * qst + d] * KV_S(k[t][d]);
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r)
            for (int64_t t = 0; t < nj; ++t)
                s[r * sst + j + t] = (a[r][t][0] + a[r][t][1]) + (a[r][t][2] + a[r][t][3]);
    }
    (void)lists;
}
#else
static inline __attribute__((always_inline)) void FA_KNAME(row_scores_n, DT)(
    const T *qs, int64_t qst, int nr, const FA_KNAME(kv_rows, DT) kr, int64_t D, int64_t nk,
    T *s, int64_t sst, const FA_KNAME(kv_rows, DT) pk, int64_t pk_rows,
    const FA_KNAME(kv_rows, DT) pv, int64_t pv_rows, int do_prefetch, int64_t Dv, int lists) {
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4) {
        if (do_prefetch)
            for (int64_t r = j; r < j + 4; ++r) {
                if (r < pk_rows) fa_prefetch_stream(FA_KV_PREFETCH_ROW(pk, r), D * (int64_t)sizeof(KT));
                if (r < pv_rows) fa_prefetch_stream(FA_KV_PREFETCH_ROW(pv, r), Dv * (int64_t)sizeof(KT));
            }
        const KT *k0 = FA_KV_ROW(kr, j), *k1 = FA_KV_ROW(kr, j + 1);
        const KT *k2 = FA_KV_ROW(kr, j + 2), *k3 = FA_KV_ROW(kr, j + 3);
        V a0[FA_RB], a1[FA_RB], a2[FA_RB], a3[FA_RB];
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) a0[r] = a1[r] = a2[r] = a3[r] = V_ZERO();
        int64_t d = 0;
        for (; d + VL <= D; d += VL) {
            const V b0 = KV_LOADU(k0 + d), b1 = KV_LOADU(k1 + d);
            const V b2 = KV_LOADU(k2 + d), b3 = KV_LOADU(k3 + d);
#pragma GCC unroll 8
            for (int r = 0; r < nr; ++r) {
                const V x = V_LOADU(qs + r * qst + d);
                a0[r] = V_FMADD(x, b0, a0[r]);
                a1[r] = V_FMADD(x, b1, a1[r]);
                a2[r] = V_FMADD(x, b2, a2[r]);
                a3[r] = V_FMADD(x, b3, a3[r]);
            }
        }
        if (d < D) {
            const int64_t n = D - d;
            const V b0 = KV_LOADN(k0 + d, n), b1 = KV_LOADN(k1 + d, n);
            const V b2 = KV_LOADN(k2 + d, n), b3 = KV_LOADN(k3 + d, n);
#pragma GCC unroll 8
            for (int r = 0; r < nr; ++r) {
                const V x = V_LOADN(qs + r * qst + d, n);
                a0[r] = V_FMADD(x, b0, a0[r]);
                a1[r] = V_FMADD(x, b1, a1[r]);
                a2[r] = V_FMADD(x, b2, a2[r]);
                a3[r] = V_FMADD(x, b3, a3[r]);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) {
            FA_KNAME(hsum4, DT)(a0[r], a1[r], a2[r], a3[r], s + r * sst + j);
        }
    }
    for (; j < nk; ++j) {
        const KT *k0 = FA_KV_ROW(kr, j);
        V a[FA_RB];
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) a[r] = V_ZERO();
        int64_t d = 0;
        for (; d + VL <= D; d += VL) {
            const V b0 = KV_LOADU(k0 + d);
#pragma GCC unroll 8
            for (int r = 0; r < nr; ++r) a[r] = V_FMADD(V_LOADU(qs + r * qst + d), b0, a[r]);
        }
        if (d < D) {
            const V b0 = KV_LOADN(k0 + d, D - d);
#pragma GCC unroll 8
            for (int r = 0; r < nr; ++r) a[r] = V_FMADD(V_LOADN(qs + r * qst + d, D - d), b0, a[r]);
        }
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) s[r * sst + j] = V_HSUM(a[r]);
    }
}

#endif /* FA_ISA_LEVEL */

/* Scores of R rows, RB at a time, then the leftover rows two and one at a
 * time; only the first pass requests the next tiles (pk: the next K tile,
 * pk_rows keys of it; pv: this V tile). */
static inline __attribute__((always_inline)) void FA_KNAME(row_scores_c, DT)(
    const T *qs, int64_t qst, int64_t R, const FA_KNAME(kv_rows, DT) kr, int64_t D, int64_t nk,
    T *s, int64_t sst, const FA_KNAME(kv_rows, DT) pk, int64_t pk_rows,
    const FA_KNAME(kv_rows, DT) pv, int64_t pv_rows, int64_t Dv, int lists) {
    int64_t r = 0;
    int first = 1;
    for (; r + FA_RB <= R; r += FA_RB, first = 0)
        FA_KNAME(row_scores_n, DT)(qs + r * qst, qst, FA_RB, kr, D, nk, s + r * sst, sst, pk,
                                   pk_rows, pv, pv_rows, first, Dv, lists);
#if FA_RB > 2
    if (R - r >= 2) {
        FA_KNAME(row_scores_n, DT)(qs + r * qst, qst, 2, kr, D, nk, s + r * sst, sst, pk,
                                   pk_rows, pv, pv_rows, first, Dv, lists);
        r += 2, first = 0;
    }
#endif
    if (r < R)
        FA_KNAME(row_scores_n, DT)(qs + r * qst, qst, 1, kr, D, nk, s + r * sst, sst, pk,
                                   pk_rows, pv, pv_rows, first, Dv, lists);
}

static void FA_KNAME(row_scores, DT)(const T *qs, int64_t qst, int64_t R,
                                     const FA_KNAME(kv_rows, DT) kr, int64_t D, int64_t nk, T *s,
                                     int64_t sst, const FA_KNAME(kv_rows, DT) pk, int64_t pk_rows,
                                     const FA_KNAME(kv_rows, DT) pv, int64_t pv_rows,
                                     int64_t Dv) {
    if (pk.list) /* the prefetcher's rows from lists (paged) or runs: compiled for each */
        FA_KNAME(row_scores_c, DT)(qs, qst, R, kr, D, nk, s, sst, pk, pk_rows, pv, pv_rows, Dv, 1);
    else
        FA_KNAME(row_scores_c, DT)(qs, qst, R, kr, D, nk, s, sst, pk, pk_rows, pv, pv_rows, Dv, 0);
}

#if FA_ISA_LEVEL == 0
/* The scalar level's version of row_pv_n below: four value vectors of
 * FA_LANES columns per pass (narrow V widened in registers), then four
 * columns, then one; every output element gets the same operations in the
 * same order as in the generic version (o alpha, then p_j v_j added in j
 * order). */
static inline __attribute__((always_inline)) void FA_KNAME(row_pv_n, DT)(
    const T *p, int64_t pst, int nr, const FA_KNAME(kv_rows, DT) vr, int64_t nk, int64_t Dv,
    const T *alpha, T *o, int64_t ost, const FA_KNAME(kv_rows, DT) pn, int64_t pn_rows,
    int64_t pn_bytes) {
    int64_t c = 0;
    for (; c + 4 * FA_LANES <= Dv; c += 4 * FA_LANES) {
        TL o0[FA_RB], o1[FA_RB], o2[FA_RB], o3[FA_RB];
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) {
            const T *orow = o + r * ost + c;
            FA_LANES_LOAD(o0[r], orow), FA_LANES_LOAD(o1[r], orow + FA_LANES);
            FA_LANES_LOAD(o2[r], orow + 2 * FA_LANES), FA_LANES_LOAD(o3[r], orow + 3 * FA_LANES);
            o0[r] *= alpha[r], o1[r] *= alpha[r], o2[r] *= alpha[r], o3[r] *= alpha[r];
        }
        FA_KNAME(kv_walk, DT) wv = FA_KNAME(kv_begin, DT)(vr, nk);
        FA_KNAME(kv_walk, DT) wp = FA_KNAME(kv_begin, DT)(pn, c == 0 ? pn_rows : 0);
        for (int64_t j = 0; j < nk; ++j) {
            if (c == 0 && j < pn_rows) fa_prefetch_stream(FA_KNAME(kv_next, DT)(&wp), pn_bytes);
            const KT *v = FA_KNAME(kv_next, DT)(&wv) + c;
            TL b0, b1, b2, b3;
            KV_LANES_LOAD(b0, v);
            KV_LANES_LOAD(b1, v + FA_LANES);
            KV_LANES_LOAD(b2, v + 2 * FA_LANES);
            KV_LANES_LOAD(b3, v + 3 * FA_LANES);
#pragma GCC unroll 8
            for (int r = 0; r < nr; ++r) {
                const T pj = p[r * pst + j];
                o0[r] += pj * b0, o1[r] += pj * b1, o2[r] += pj * b2, o3[r] += pj * b3;
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) {
            T *orow = o + r * ost + c;
            memcpy(orow, &o0[r], sizeof o0[r]), memcpy(orow + FA_LANES, &o1[r], sizeof o1[r]);
            memcpy(orow + 2 * FA_LANES, &o2[r], sizeof o2[r]);
            memcpy(orow + 3 * FA_LANES, &o3[r], sizeof o3[r]);
        }
    }
    for (; c + FA_LANES <= Dv; c += FA_LANES) {
        TL acc[FA_RB];
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) FA_LANES_LOAD(acc[r], o + r * ost + c), acc[r] *= alpha[r];
        FA_KNAME(kv_walk, DT) wv = FA_KNAME(kv_begin, DT)(vr, nk);
        for (int64_t j = 0; j < nk; ++j) {
            TL bj;
            KV_LANES_LOAD(bj, FA_KNAME(kv_next, DT)(&wv) + c);
#pragma GCC unroll 8
            for (int r = 0; r < nr; ++r) acc[r] += p[r * pst + j] * bj;
        }
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) memcpy(o + r * ost + c, &acc[r], sizeof acc[r]);
    }
    for (; c < Dv; ++c)
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) {
            T acc = o[r * ost + c] * alpha[r];
            FA_KNAME(kv_walk, DT) wv = FA_KNAME(kv_begin, DT)(vr, nk);
            for (int64_t j = 0; j < nk; ++j)
                acc += p[r * pst + j] * KV_S(FA_KNAME(kv_next, DT)(&wv)[c]);
            o[r * ost + c] = acc;
        }
}
#else
/* o_r (Dv) = alpha[r] * o_r + sum_j p_r[j] v_j for nr rows (p_r = p + r *
 * pst, o_r = o + r * ost) and nk value rows vr[j], four value vectors per
 * pass. A row's sum runs over j in order for every nr. */
static inline __attribute__((always_inline)) void FA_KNAME(row_pv_n, DT)(
    const T *p, int64_t pst, int nr, const FA_KNAME(kv_rows, DT) vr, int64_t nk, int64_t Dv,
    const T *alpha, T *o, int64_t ost, const FA_KNAME(kv_rows, DT) pn, int64_t pn_rows,
    int64_t pn_bytes) {
    int64_t c = 0;
    for (; c + 4 * VL <= Dv; c += 4 * VL) {
        V o0[FA_RB], o1[FA_RB], o2[FA_RB], o3[FA_RB];
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) {
            const V al = V_SET1(alpha[r]);
            const T *orow = o + r * ost + c;
            o0[r] = V_MUL(V_LOADU(orow), al), o1[r] = V_MUL(V_LOADU(orow + VL), al);
            o2[r] = V_MUL(V_LOADU(orow + 2 * VL), al), o3[r] = V_MUL(V_LOADU(orow + 3 * VL), al);
        }
        FA_KNAME(kv_walk, DT) wv = FA_KNAME(kv_begin, DT)(vr, nk);
        FA_KNAME(kv_walk, DT) wp = FA_KNAME(kv_begin, DT)(pn, c == 0 ? pn_rows : 0);
        for (int64_t j = 0; j < nk; ++j) {
            if (c == 0 && j < pn_rows) fa_prefetch_stream(FA_KNAME(kv_next, DT)(&wp), pn_bytes);
            const KT *v = FA_KNAME(kv_next, DT)(&wv) + c;
            const V b0 = KV_LOADU(v), b1 = KV_LOADU(v + VL);
            const V b2 = KV_LOADU(v + 2 * VL), b3 = KV_LOADU(v + 3 * VL);
#pragma GCC unroll 8
            for (int r = 0; r < nr; ++r) {
                const V pj = V_SET1(p[r * pst + j]);
                o0[r] = V_FMADD(pj, b0, o0[r]);
                o1[r] = V_FMADD(pj, b1, o1[r]);
                o2[r] = V_FMADD(pj, b2, o2[r]);
                o3[r] = V_FMADD(pj, b3, o3[r]);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) {
            T *orow = o + r * ost + c;
            V_STOREU(orow, o0[r]);
            V_STOREU(orow + VL, o1[r]);
            V_STOREU(orow + 2 * VL, o2[r]);
            V_STOREU(orow + 3 * VL, o3[r]);
        }
    }
    for (; c < Dv; c += VL) {
        const int64_t n = Dv - c < VL ? Dv - c : VL;
        V acc[FA_RB];
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) acc[r] = V_MUL(V_LOADN(o + r * ost + c, n), V_SET1(alpha[r]));
        FA_KNAME(kv_walk, DT) wv = FA_KNAME(kv_begin, DT)(vr, nk);
        for (int64_t j = 0; j < nk; ++j) {
            const V bj = KV_LOADN(FA_KNAME(kv_next, DT)(&wv) + c, n);
#pragma GCC unroll 8
            for (int r = 0; r < nr; ++r) acc[r] = V_FMADD(V_SET1(p[r * pst + j]), bj, acc[r]);
        }
#pragma GCC unroll 8
        for (int r = 0; r < nr; ++r) V_STOREN(o + r * ost + c, acc[r], n);
    }
}

#endif /* FA_ISA_LEVEL */

/* P.V of R rows, RB at a time, then two and one at a time; the first pass
 * requests pn_bytes of each of the pn_rows rows of pn (the next tile's
 * values, or keys), one row per key of this tile. */
static void FA_KNAME(row_pv, DT)(const T *p, int64_t pst, int64_t R,
                                 const FA_KNAME(kv_rows, DT) vr, int64_t nk, int64_t Dv,
                                 const T *alpha, T *o, int64_t ost,
                                 const FA_KNAME(kv_rows, DT) pn, int64_t pn_rows,
                                 int64_t pn_bytes) {
    int64_t r = 0;
    for (; r + FA_RB <= R; r += FA_RB, pn_rows = 0)
        FA_KNAME(row_pv_n, DT)(p + r * pst, pst, FA_RB, vr, nk, Dv, alpha + r, o + r * ost, ost, pn,
                               pn_rows, pn_bytes);
#if FA_RB > 2
    if (R - r >= 2) {
        FA_KNAME(row_pv_n, DT)(p + r * pst, pst, 2, vr, nk, Dv, alpha + r, o + r * ost, ost, pn,
                               pn_rows, pn_bytes);
        r += 2, pn_rows = 0;
    }
#endif
    if (r < R)
        FA_KNAME(row_pv_n, DT)(p + r * pst, pst, 1, vr, nk, Dv, alpha + r, o + r * ost, ost, pn,
                               pn_rows, pn_bytes);
}

/* max_j s[j] over nk scores, or NaN when the scores hold a NaN (or both
 * infinities, which the caller then rescans one by one, as it does rows
 * with ALiBi): the vector max drops NaN, the running sum keeps it. A max
 * is exact, so this equals the one-by-one scan whenever it is not NaN. */
static inline T FA_KNAME(row_max, DT)(const T *s, int64_t nk) {
    V vm = V_SET1((T)-INFINITY), vc = V_ZERO();
    int64_t j = 0;
    for (; j + VL <= nk; j += VL) {
        const V x = V_LOADU(s + j);
        vm = V_MAX(vm, x);
        vc = V_ADD(vc, x);
    }
    T mb = V_HMAX(vm), chk = V_HSUM(vc);
    for (; j < nk; ++j) {
        mb = s[j] > mb ? s[j] : mb;
        chk += s[j];
    }
    return chk != chk ? chk : mb;
}

/* Keys per scores step of a multi-head item (paged decode, or a (B, Lk,
 * Hkv, D) cache), at most (in a paged cache a step ends with its block):
 * the token rows of every kv head of 16 keys, 64 KiB for 8 heads of D =
 * 128 floats, are read, each head's next 16 requested four at a time as
 * its scores go (row_scores). Steps of 4 and 8 keys ran paged decode at
 * 1.75-1.79x and 1.53-1.54x the contiguous time (Zen 5, 2 threads, H = 32
 * over 8 kv heads, 2048 keys, block size 16, caches hot), 16 at
 * 1.44-1.51x; one head at a time, 1.56-1.61x. The values are read a head
 * at a time over the whole tile (rows_heads_pv). */
#define FA_HEADS_STEP 16

/* The keys of the step that starts at key kb, within the tile [.., kend)
 * and kb's block. */
static inline int64_t FA_KNAME(step_keys, DT)(const fa_attn_job *job, int64_t kb, int64_t kend) {
    const int64_t n = kend - kb < FA_HEADS_STEP ? kend - kb : FA_HEADS_STEP;
    return FA_KNAME(tile_keys, DT)(job, kb, n);
}

/* The keys of the step after the one that ends at key ahead: in this tile
 * or the next, none past kend (the row's last visible key). */
static inline int64_t FA_KNAME(keys_after, DT)(const fa_attn_job *job, int64_t ahead,
                                               int64_t kend) {
    return ahead < kend ? FA_KNAME(step_keys, DT)(job, ahead, kend) : 0;
}

/* Scores of one tile [kb, kb + nk) of query ii for the item's query heads
 * [h, h + heads) over several kv heads whose rows interleave (a paged or
 * (B, Lk, Hkv, D) cache), FA_HEADS_STEP keys at a time for every head
 * (attention_rows): row g nq + ii of st (s0 + g sst). */
static void FA_KNAME(rows_heads_scores, DT)(const fa_attn_job *job, int64_t b, int64_t h,
                                            int64_t heads, int64_t ii, int64_t nq, int64_t kb,
                                            int64_t nk, int64_t kend, T *s0, int64_t sst,
                                            FA_KNAME(attn_scratch, DT) *sc) {
    const int64_t D = job->D, group = job->group, hk0 = h / group, hk1 = (h + heads - 1) / group;
    for (int64_t j0 = 0, n; j0 < nk; j0 += n) {
        n = FA_KNAME(step_keys, DT)(job, kb + j0, kb + nk);
        const int64_t ahead = kb + j0 + n, na = FA_KNAME(keys_after, DT)(job, ahead, kend);
        for (int64_t hk = hk0; hk <= hk1; ++hk) {
            const int64_t g0 = hk * group - h > 0 ? hk * group - h : 0;
            const int64_t g1 = (hk + 1) * group - h < heads ? (hk + 1) * group - h : heads;
            /* with each four keys, the same keys of the next step are
             * requested (P.V requests the values) */
            const FA_KNAME(kv_rows, DT) kt = {
                .base = FA_KNAME(kv_row, DT)(job, job->k, job->ks, b, hk, kb + j0),
                .stride = job->ks[2]};
            const FA_KNAME(kv_rows, DT) kx = {
                .base = na ? FA_KNAME(kv_row, DT)(job, job->k, job->ks, b, hk, ahead) : NULL,
                .stride = job->ks[2]};
            FA_KNAME(row_scores, DT)(sc->qt + (g0 * nq + ii) * D, nq * D, g1 - g0, kt, D, n,
                                     s0 + g0 * sst + j0, sst, kx, na, kx, 0, job->Dv);
        }
    }
}

/* The rows of keys [kb, kb + nk) of head (b, hk) in K or V as runs for
 * the P.V kernel: one run, or in a paged cache one per block, whose first
 * rows go to runs[] (NK entries at most). */
static inline FA_KNAME(kv_rows, DT) FA_KNAME(tile_runs, DT)(const fa_attn_job *job,
                                                           const char *base, const int64_t *st,
                                                           int64_t b, int64_t hk, int64_t kb,
                                                           int64_t nk, const KT **runs) {
    FA_KNAME(kv_rows, DT) t = {.base = FA_KNAME(kv_row, DT)(job, base, st, b, hk, kb),
                               .stride = st[2]};
    const int64_t first = FA_KNAME(tile_keys, DT)(job, kb, nk);
    if (first < nk) {
        int64_t u = 0;
        for (int64_t j = kb + first; j < kb + nk; j += job->block_size)
            runs[u++] = FA_KNAME(kv_row, DT)(job, base, st, b, hk, j);
        t.more = runs, t.first = first, t.per = job->block_size;
    }
    return t;
}

/* P.V of that tile, a kv head at a time over all the tile's keys (block
 * after block in a paged cache), so that each row's output stays in
 * registers through the tile, as in a contiguous one; alpha rescales once
 * and each row's sums keep their key order. With each key, a value row of
 * what comes next is requested: the next kv head's in this tile, after the
 * last head the first head's in the next tile (up to kend). Against a
 * call per FA_HEADS_STEP keys, each loading and storing the rows' output,
 * paged decode (the shape above, caches hot) took 5% less time (Zen 4, 2
 * threads). */
static void FA_KNAME(rows_heads_pv, DT)(const fa_attn_job *job, int64_t b, int64_t h,
                                        int64_t heads, int64_t ii, int64_t nq, int64_t kb,
                                        int64_t nk, int64_t kend, const T *s0, int64_t sst,
                                        const T *alpha, FA_KNAME(attn_scratch, DT) *sc) {
    const int64_t Dv = job->Dv, group = job->group, hk0 = h / group, hk1 = (h + heads - 1) / group;
    const int64_t kn = kb + nk, nn = kend - kn < NK ? kend - kn : NK;
    /* a head's runs serve first as the previous head's prefetch target,
     * then as its own rows: two run arrays, swapped per head */
    const KT *runs_a[NK], *runs_b[NK], **runs = runs_a, **next_runs = runs_b;
    FA_KNAME(kv_rows, DT) vt = FA_KNAME(tile_runs, DT)(job, job->v, job->vs, b, hk0, kb, nk, runs);
    for (int64_t hk = hk0; hk <= hk1; ++hk) {
        const int64_t g0 = hk * group - h > 0 ? hk * group - h : 0;
        const int64_t g1 = (hk + 1) * group - h < heads ? (hk + 1) * group - h : heads;
        FA_KNAME(kv_rows, DT) vx = {.stride = job->vs[2]};
        int64_t nx = 0;
        if (hk < hk1)
            vx = FA_KNAME(tile_runs, DT)(job, job->v, job->vs, b, hk + 1, kb, nk, next_runs), nx = nk;
        else if (nn > 0)
            vx = FA_KNAME(tile_runs, DT)(job, job->v, job->vs, b, hk0, kn, nn, next_runs), nx = nn;
        FA_KNAME(row_pv, DT)(s0 + g0 * sst, sst, g1 - g0, vt, nk, Dv, alpha + g0,
                             sc->acc + (g0 * nq + ii) * sc->ldacc, nq * sc->ldacc, vx,
                             nx < nk ? nx : nk, Dv * (int64_t)sizeof(KT));
        vt = vx;
        const KT **swap = runs;
        runs = next_runs, next_runs = swap;
    }
}

/* Tiles per run of the row path: the scores of a run's tiles are taken
 * first, so that K streams alone, then its softmax and P.V tile by tile as
 * V streams alone; the run is also bounded by the score area (MQ tiles of
 * one row). Each tile's arithmetic is the same as one tile at a time, so
 * the output is too. Against alternating K and V tiles (both with the
 * outer-cache requests), decode over float32 caches of 64-256 MiB took
 * 5-15% less time, the most with GQA groups (Zen 4, 2 threads); runs of 4,
 * 16 and 96 tiles ran within 2% of each other. */
#define FA_ROW_RUN_TILES 16

/* One tile's scores s[0..nk) of row (b, hr, i), keys [kb, kb + nk), become
 * unnormalised probabilities: int8 key scales, softcap, mask, ALiBi (ref:
 * the row's reference key); the running max *m and sum *l take the tile,
 * *alpha is what the row's earlier sums are rescaled by, and int8 value
 * scales fold into the probabilities. Weights, when requested, get the
 * tile's final scores. */
static inline void FA_KNAME(row_softmax_step, DT)(const fa_attn_job *job, int64_t b, int64_t hr,
                                                  int64_t i, int64_t kb, int64_t nk, T *s, T ref,
                                                  T *m_io, T *l_io, T *alpha, const T *kscale,
                                                  const T *vscale) {
    const T slope = job->alibi ? ((const T *)job->alibi)[hr] : (T)0, cap = (T)job->softcap;
    T *w = job->weights ? (T *)job->weights + b * job->ws[0] + hr * job->ws[1] + i * job->ws[2]
                        : NULL;
#if KV_SCALED
    for (int64_t j = 0; j < nk; ++j) s[j] *= kscale[j];
#else
    (void)kscale, (void)vscale;
#endif
    if (cap > (T)0) FA_KNAME(softcap_run, DT)(s, nk, cap);
    if (job->mask.data) FA_KNAME(apply_explicit_mask, DT)(job, b, hr, i, 1, kb, nk, s, 1, 0);
    T mb = slope != (T)0 ? (T)NAN : FA_KNAME(row_max, DT)(s, nk);
    if (mb != mb) {
        mb = (T)-INFINITY;
        for (int64_t j = 0; j < nk; ++j) {
            if (slope != (T)0) s[j] += slope * ((T)(kb + j) - ref);
            mb = s[j] > mb ? s[j] : mb;
            if (s[j] != s[j]) mb = s[j]; /* keep NaN: the row must become NaN */
        }
    }
    if (w) memcpy(w + kb, s, (size_t)nk * sizeof(T));
    const T m = *m_io;
    const T mnew = mb > m || mb != mb ? mb : m;
    const T msafe = mnew > -T_MAX || mnew != mnew ? mnew : -T_MAX;
    *alpha = S_EXP_NONPOS(m - msafe);
    const V vms = V_SET1(msafe);
    V vsum = V_ZERO();
    int64_t j = 0;
    for (; j + VL <= nk; j += VL) {
        const V p = V_EXP_NONPOS(V_SUB(V_LOADU(s + j), vms));
        V_STOREU(s + j, p);
        vsum = V_ADD(vsum, p);
    }
    T sum = V_HSUM(vsum);
    for (; j < nk; ++j) {
        s[j] = S_EXP_NONPOS(s[j] - msafe);
        sum += s[j];
    }
    *l_io = *l_io * *alpha + sum;
    *m_io = mnew;
#if KV_SCALED
    /* int8 values: p_j (values_j * scale_j) = (p_j scale_j) values_j */
    for (int64_t jj = 0; jj < nk; ++jj) s[jj] *= vscale[jj];
#endif
}

/* Queries [q0, q1) of `heads` consecutive query heads from h, all reading kv
 * head h / group: one head, or every head of the group for GQA decode
 * (job->row_heads; several groups when the kv heads interleave, below). Row r is head
 * h + r / nq, query q0 + r % nq. The rows
 * of one query (one per head) see the same keys; they go through each key
 * tile together, as a small GEMM: every K and V vector is loaded and
 * widened once for RB of them (row_scores, row_pv), so the kv head comes
 * from memory once for the whole group. A query's tiles start at its first
 * visible key and hold NK keys, wherever the cache's blocks end, so a
 * row's arithmetic depends only on its own visible keys: the same for a
 * lone row, a GQA group, a contiguous or a paged cache. */
static void FA_KNAME(attention_rows, DT)(const fa_attn_job *job, int64_t b, int64_t h,
                                         int64_t q0, int64_t q1, int64_t k0, int64_t k1,
                                         T *part, T *part_ml, FA_KNAME(attn_scratch, DT) *sc) {
    const int64_t D = job->D, Dv = job->Dv, group = job->group, hk = h / group;
    const int64_t heads = job->row_heads > 1 ? job->row_heads : 1, nq = q1 - q0, R = heads * nq;
    /* the kv heads of the item: one, or several whose rows interleave */
    const int64_t hk_last = (h + heads - 1) / group;
    const int64_t qr0 = fa_attn_q_row0(job, b), kr0 = fa_attn_k_row0(job, b);
    (void)kr0;
    const T scale = (T)job->scale;
    const int64_t off = fa_attn_offset(job, b);
    /* per query i = q0 + ii: its visible keys [kbeg, kend) and next tile
     * kcur; per row r: in scratch its scaled query (qt + r D), scores
     * (st + r NK), accumulator (acc + r ldacc), m, l, ALiBi reference (tmp) */
    int64_t kbeg[FA_ATTN_ROW_PATH], kend[FA_ATTN_ROW_PATH], kcur[FA_ATTN_ROW_PATH];
    for (int64_t ii = 0; ii < nq; ++ii) {
        const int64_t i = q0 + ii;
        /* the query's visible keys: [i + off - left, i + off + right] */
        kbeg[ii] = k0, kend[ii] = k1;
        if (job->has_left && i + off - job->left > kbeg[ii]) kbeg[ii] = i + off - job->left;
        if (job->has_right && i + off + job->right + 1 < kend[ii])
            kend[ii] = i + off + job->right + 1;
        if (kend[ii] < kbeg[ii]) kend[ii] = kbeg[ii];
        kcur[ii] = kbeg[ii];
    }
    for (int64_t r = 0; r < R; ++r) {
        const int64_t hr = h + r / nq, i = q0 + r % nq;
        const int64_t qe = b * job->qs[0] + hr * job->qs[1] + (qr0 + i) * job->qs[2];
        T *qs = sc->qt + r * D;
        FA_KNAME(scaled_q_row, DT)(job, qe, D, scale, qs, 1);
        if (job->weights)
            memset((T *)job->weights + b * job->ws[0] + hr * job->ws[1] + i * job->ws[2], 0,
                   (size_t)job->Lk * sizeof(T));
        memset(sc->acc + r * sc->ldacc, 0, (size_t)Dv * sizeof(T));
        sc->m[r] = (T)-INFINITY;
        sc->l[r] = (T)0;
        const T slope = job->alibi ? ((const T *)job->alibi)[hr] : (T)0;
        sc->tmp[r] = slope != (T)0 ? (T)FA_KNAME(alibi_ref, DT)(job, b, hr, i + off, slope) : (T)0;
    }

    /* the rows of a tile's keys in K and V, and of the next tile's in K;
     * the first rows of a value tile's runs (blocks) */
    const KT *krows[NK], *vrows[NK], *knext[NK], *vruns[NK];
    T kscale[NK], vscale[NK], alpha[FA_ATTN_MQ];
    (void)kscale, (void)vscale;
    const int paged = job->block_table != NULL;
    /* Several kv heads (interleaved rows) go a few keys at a time for every
     * head (rows_heads_scores), one tile per run; otherwise a run is as
     * many tiles as the score area holds, up to FA_ROW_RUN_TILES. */
    const int multi = hk_last > hk;
    int64_t run_max = multi ? 1 : MQ / R;
    if (run_max > FA_ROW_RUN_TILES) run_max = FA_ROW_RUN_TILES;
    if (run_max < 1) run_max = 1;
    /* rows ii, ii + nq, ...: this query in each head; tile t of a run at
     * st + t R NK */
    const int64_t sst = nq * NK, tile_elems = R * NK;
    /* one round: each query's next run of tiles, for all its rows */
    for (int more = 1; more;) {
        more = 0;
        for (int64_t ii = 0; ii < nq; ++ii) {
            const int64_t i = q0 + ii, kb0 = kcur[ii];
            if (kb0 >= kend[ii]) continue;
            /* The run's scores, tile by tile: K alone streams in; with
             * each four keys the next tile's are requested (the first
             * query's), and during the last tile the run's first V tile. */
            int64_t nt = 0, kb = kb0;
            for (; nt < run_max && kb < kend[ii]; ++nt) {
                const int64_t nk = kend[ii] - kb < NK ? kend[ii] - kb : NK;
                const int64_t kn = kb + nk;
                const int last = nt + 1 == run_max || kn >= kend[ii];
                const int64_t nk_next =
                    ii == 0 && kn < kend[ii] ? (kend[ii] - kn < NK ? kend[ii] - kn : NK) : 0;
                T *s0 = sc->st + nt * tile_elems + ii * NK;
                kb = kn;
                if (multi) {
                    FA_KNAME(rows_heads_scores, DT)(job, b, h, heads, ii, nq, kn - nk, nk, kend[ii],
                                                    s0, sst, sc);
                    continue;
                }
                const int64_t k_at = kn - nk;
                const int64_t nv = last ? (kend[ii] - kb0 < NK ? kend[ii] - kb0 : NK) : 0;
                FA_KNAME(tile_rows, DT)(job, job->k, job->ks, b, hk, k_at, nk, krows);
                if (nv) FA_KNAME(tile_rows, DT)(job, job->v, job->vs, b, hk, kb0, nv, vrows);
                if (nk_next) FA_KNAME(tile_rows, DT)(job, job->k, job->ks, b, hk, kn, nk_next, knext);
                for (int64_t j0 = 0, n; j0 < nk; j0 += n) {
                    n = FA_KNAME(tile_keys, DT)(job, k_at + j0, nk - j0);
                    const FA_KNAME(kv_rows, DT) kt = {.base = krows[j0], .stride = job->ks[2]};
                    /* (pk and pv are both lists or both runs) */
                    const FA_KNAME(kv_rows, DT) vt = {.list = paged ? vrows + j0 : NULL,
                                                      .base = j0 < nv ? vrows[j0] : NULL,
                                                      .stride = job->vs[2]};
                    const FA_KNAME(kv_rows, DT) kx = {.list = paged ? knext + j0 : NULL,
                                                      .base = nk_next ? knext[0] : NULL,
                                                      .stride = job->ks[2]};
                    FA_KNAME(row_scores, DT)(sc->qt + ii * D, nq * D, heads, kt, D, n, s0 + j0, sst,
                                             kx, nk_next - j0, vt, nv - j0, Dv);
                }
            }
            kcur[ii] = kb;
            more |= kb < kend[ii];
            /* then per tile, in key order: softmax, and P.V as V streams in */
            kb = kb0;
            for (int64_t t = 0; t < nt; ++t) {
                const int64_t nk = kend[ii] - kb < NK ? kend[ii] - kb : NK;
                T *s0 = sc->st + t * tile_elems + ii * NK;
                for (int64_t g = 0; g < heads; ++g) {
                    const int64_t r = g * nq + ii, hr = h + g;
#if KV_SCALED
                    if (g == 0 || (h + g) % group == 0) { /* the scales of kv head hr / group */
                        /* padded and packed keys: the head's scale rows;
                         * paged: found per key by tile_scales */
                        const int64_t hs = hr / group;
                        const T *hks = job->block_table ? NULL
                                     : FA_KNAME(kv_scale_row, DT)(job->k_scale, job->kss, b, hs, kr0);
                        const T *hvs = job->block_table ? NULL
                                     : FA_KNAME(kv_scale_row, DT)(job->v_scale, job->vss, b, hs, kr0);
                        FA_KNAME(tile_scales, DT)(job, hks, job->k_scale, job->kss, b, hs, kb, nk,
                                                  kscale);
                        FA_KNAME(tile_scales, DT)(job, hvs, job->v_scale, job->vss, b, hs, kb, nk,
                                                  vscale);
                    }
#endif
                    FA_KNAME(row_softmax_step, DT)(job, b, hr, i, kb, nk, s0 + g * sst, sc->tmp[r],
                                                   &sc->m[r], &sc->l[r], &alpha[g], kscale, vscale);
                }
                /* P.V tile by tile: alpha rescales once, and each row's
                 * sum keeps its key order */
                if (multi) {
                    FA_KNAME(rows_heads_pv, DT)(job, b, h, heads, ii, nq, kb, nk, kend[ii], s0, sst,
                                                alpha, sc);
                } else {
                    /* with each key, a row of what comes next is requested
                     * (contiguous K/V): the next tile's values, or after
                     * the run's last tile the first keys of the next run */
                    const int64_t kn = kb + nk, nn = kend[ii] - kn < NK ? kend[ii] - kn : NK;
                    const int next_v = t + 1 < nt;
                    const int64_t pn_rows = paged || nn <= 0 ? 0 : nn;
                    FA_KNAME(kv_rows, DT) pn = {.stride = next_v ? job->vs[2] : job->ks[2]};
                    if (pn_rows)
                        pn.base = next_v ? FA_KNAME(kv_row, DT)(job, job->v, job->vs, b, hk, kn)
                                         : FA_KNAME(kv_row, DT)(job, job->k, job->ks, b, hk, kn);
                    const int64_t pn_bytes = (next_v ? Dv : D) * (int64_t)sizeof(KT);
                    const FA_KNAME(kv_rows, DT) vt =
                        FA_KNAME(tile_runs, DT)(job, job->v, job->vs, b, hk, kb, nk, vruns);
                    FA_KNAME(row_pv, DT)(s0, sst, heads, vt, nk, Dv, alpha,
                                         sc->acc + ii * sc->ldacc, nq * sc->ldacc, pn,
                                         pn_rows < nk ? pn_rows : nk, pn_bytes);
                }
                kb += nk;
            }
        }
    }
    for (int64_t r = 0; r < R; ++r) {
        const int64_t g = r / nq, ii = r % nq, i = q0 + ii;
        const T *o = sc->acc + r * sc->ldacc;
        if (part) {
            T *po = part + g * job->part_head_stride, *pml = part_ml + g * job->part_ml_head_stride;
            memcpy(po + ii * Dv, o, (size_t)Dv * sizeof(T));
            pml[2 * ii] = sc->m[r];
            pml[2 * ii + 1] = sc->l[r];
        } else {
            FA_KNAME(finish_row, DT)(job, b, h + g, i, o, sc->m[r], sc->l[r], kbeg[ii], kend[ii]);
        }
    }
}

void FA_KNAME(attention_block, DT)(const fa_attn_job *job, int64_t b, int64_t h, int64_t q0,
                                   int64_t q1, int64_t k0, int64_t k1, T *part, T *part_ml,
                                   T *scratch) {
    FA_KNAME(attn_scratch, DT) sc = FA_KNAME(attn_carve, DT)(scratch, job->D, job->Dv);
    if (q1 - q0 < FA_ATTN_ROW_PATH) {
        FA_KNAME(attention_rows, DT)(job, b, h, q0, q1, k0, k1, part, part_ml, &sc);
        return;
    }
#if FA_AMX
    /* the tiles' configuration is per thread: loaded for the item */
    fa_amx_begin();
#endif
    FA_KNAME(attention_tiled, DT)(job, b, h, q0, q1, k0, k1, part, part_ml, &sc);
#if FA_AMX
    fa_amx_end();
#endif
}

#undef NC
#undef MQ
#undef NK
#undef TL
#undef KV_LANES_LOAD
