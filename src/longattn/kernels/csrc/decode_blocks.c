/* Fused decode step over selected key blocks (longattn.kernels.native.decode_blocks).
 *
 * One query per (batch, query head) attends exactly to the keys of a list of whole key blocks of
 * its key-value head, read in place from the cache: no gathered copy of the selected keys and
 * values is ever written. Per block the scores are computed first (the block's keys stream from
 * memory once), then an online softmax folds the block into a running maximum, normaliser and
 * value accumulator; the row ends with out = acc / l and lse = m + log(l).
 *
 * Dtypes: q is float32; k and v are float32, bfloat16 or float16 (`kv_dtype` 0, 1, 2), read as
 * stored and widened to float32 in registers: a half-precision cache costs half the bytes of a
 * float32 one in this memory-bound step, and nothing converts the cache beforehand. Scores, the
 * online softmax and the output are float32.
 *
 * Layout: q [B, Hq, 1, D]; k, v [B, Hkv, T, D] with the last dimension contiguous (strides are
 * given in elements for the batch, head and token axes); blocks [B, Hq, n_sel] int64 block
 * indices, -1 for an unused slot; block j holds tokens [j*bs, min((j+1)*bs, T)).
 * Query head h reads key-value head h / (Hq / Hkv) (GQA). out [B, Hq, D] and lse [B, Hq] are
 * contiguous. A row that selects no keys (or whose every score is -inf) gets out = 0 and
 * lse = -inf; a NaN score makes the row NaN (IEEE, as the float64 reference), never "no keys".
 *
 * How (vectorised with GCC vector extensions, 8 floats a vector, as csrc/sparse_prefill.c):
 *   scores  keys go 8 at a time: 8 independent accumulators (one per key) walk the head dimension
 *           a vector at a time, the query's vector loaded once per step for all 8 keys, then an
 *           8 x 8 transpose-add (14 shuffles) leaves the 8 dot products in one vector. 8 chains
 *           of FMAs cover the FMA latency x 2 ports; 9 loads per 8 FMAs stay under the load rate.
 *           A short group (a block length not a multiple of 8, the cache's short last block)
 *           reads its first key again in the missing lanes, then overwrites those lanes with
 *           -inf: never a row past the block.
 *   softmax block max (vmax), one scalar expf for the rescale, a polynomial exp over the
 *           block's scores in place (the -inf padding lanes give p = 0).
 *   P . V   the accumulator, up to 8 vectors (64 head dims) per panel, stays in registers while
 *           the panel walks every key of the block: broadcast p, FMA with the widened value row.
 *   bf16    16 values are one 32-byte load; as 8 uint32 lanes, `x << 16` is the even elements
 *           and `x & 0xffff0000` the odd ones, each an exact float32 - no lane-crossing widening
 *           (vpmovzx) at all. The query and the accumulator are kept in that order (even 8, odd
 *           8 of each 16 dims) and put back in natural order at the end. A remaining group of 8
 *           dims widens in natural order (zero-extend, shift).
 *   fp16    F16C (vcvtph2ps, 8 at a time) where the compiler targets it, else element by element.
 *   tails   head dims past the last multiple of 8 go scalar (D = 1, 3, 17 ...): no vector ever
 *           reads past a row, past the last key row, or outside the tensors.
 *   memory  the next selected block is prefetched while one is scored (see prefetch_span).
 * Measured (2-core VM, "AMD EPYC" family 25 model 17 - Zen 4 - exposing AVX2 + FMA + F16C, no
 * AVX-512; 2 threads; B = 1, 8 heads, D = 64, 32 random blocks of 64
 * keys over a 128k-token cache, the kernel alone, medians): float32 / bfloat16 cache
 *   data in cache (L3, the same call repeated)   0.16 / 0.18 ms  ->  0.10 / 0.072 ms
 *   cold (other blocks, other caches each call)  0.53 / 0.39 ms  ->  0.30 / 0.17 ms
 * bfloat16 is now the faster of the two, hot and cold. float32 is bound by the bytes it moves even
 * from L2 / L3 (32 KiB per block), bfloat16 mostly by the FMAs; cold, both by memory latency and
 * bandwidth (~29 GB/s streaming on that machine).
 *
 * Scratch (the value accumulator, the reordered query and one block's scores) lives on the heap,
 * one buffer per thread: OpenMP worker stacks can be small (OMP_STACKSIZE), and a 16k-token block
 * of scores on the stack overflowed them. The function returns 0, or 1 when that buffer cannot be
 * allocated (the caller then takes its torch path), or 2 for an unknown kv_dtype.
 *
 * Threads: rows are split over `n_threads` OpenMP threads (torch's own libgomp when torch is
 * loaded first: the shared object names libgomp.so.1, which the loader resolves to the copy
 * already in the process).
 *
 * Portability: C11 with GCC vector extensions (gcc; clang documents the same, with its own
 * shuffle builtin), intrinsics only under __AVX__ / __F16C__ with generic fallbacks (a build with
 * -mno-avx is tested). -ffp-contract must allow FMA contraction (GNU C's default).
 */
#include <math.h>
#include <stdint.h>

#include <stdlib.h>
#include <string.h>

#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* the C signature's version (native.ABI_VERSION). A changed source needs no bump: the build is
 * cached under a hash of the source, so an edited kernel is always rebuilt. */
int decode_blocks_abi_version(void) { return 3; }

#include "half.h" /* bf16_to_f32, f16_to_f32 */

static inline float load_bf16(const uint16_t *p, int64_t i) { return bf16_to_f32(p[i]); }
static inline float load_f16(const uint16_t *p, int64_t i) { return f16_to_f32(p[i]); }

#define AI static inline __attribute__((always_inline))

#include "vec8.h" /* vf, vi, VL, ld, st, bc, sel, vmax, vexp */

typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));

#define PW 8 /* vectors per P.V panel: 64 head dims of accumulator in registers */

enum { F32 = 0, BF16 = 1, F16 = 2 };

#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

/* y[i] = e^x[i] through vexp (the kernel's exp), for testing its accuracy: x <= 0, -inf or NaN */
void decode_blocks_exp(const float *x, float *y, int64_t n) { vexp_array(x, y, n); }

/* The 8 dot products of a[0..7] (lane-wise partial sums) in one vector, r[i] = sum of a[i]'s
 * lanes: three rounds of pairwise shuffle-adds. The patterns stay within 128-bit halves until the
 * last round (shufps / vperm2f128 on AVX). */
AI vf hsum8x8(const vf a[8]) {
#define EV 0, 2, 8, 10, 4, 6, 12, 14
#define OD 1, 3, 9, 11, 5, 7, 13, 15
    const vf x01 = SHUF(a[0], a[1], EV) + SHUF(a[0], a[1], OD);
    const vf x23 = SHUF(a[2], a[3], EV) + SHUF(a[2], a[3], OD);
    const vf x45 = SHUF(a[4], a[5], EV) + SHUF(a[4], a[5], OD);
    const vf x67 = SHUF(a[6], a[7], EV) + SHUF(a[6], a[7], OD);
    /* y0 = [a0 a1 a2 a3 (dims 0-3) | a0 a1 a2 a3 (dims 4-7)], y1 the same for a4..a7 */
    const vf y0 = SHUF(x01, x23, EV) + SHUF(x01, x23, OD);
    const vf y1 = SHUF(x45, x67, EV) + SHUF(x45, x67, OD);
#undef EV
#undef OD
    return SHUF(y0, y1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(y0, y1, 4, 5, 6, 7, 12, 13, 14, 15);
}

static inline float hsum(vf x) {
    float a[VL];
    st(a, x);
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* address of element i of a row of element type dt */
AI const void *at(const int dt, const void *base, int64_t i) {
    return (const char *)base + i * (dt == F32 ? 4 : 2);
}

AI float widen1(const int dt, const void *base, int64_t i) {
    if (dt == F32) return ((const float *)base)[i];
    if (dt == BF16) return load_bf16((const uint16_t *)base, i);
    return load_f16((const uint16_t *)base, i);
}

/* elements [i, i+8) of a row as float32, in natural order (reads exactly those 8) */
AI vf widen8(const int dt, const void *base, int64_t i) {
    if (dt == F32) return ld((const float *)base + i);
    const uint16_t *h = (const uint16_t *)base + i;
    if (dt == BF16) {
        vh8 x;
        memcpy(&x, h, sizeof x);
        return (vf)(__builtin_convertvector(x, vu) << 16);
    }
#if defined(__F16C__) && !defined(LONGATTN_NO_FLOAT16)
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
#else
    /* the tests compare this build (-DLONGATTN_NO_FLOAT16) with the F16C one bit for bit: only the
     * widening differs, never the arithmetic that follows */
    return (vf){load_f16(h, 0), load_f16(h, 1), load_f16(h, 2), load_f16(h, 3),
                load_f16(h, 4), load_f16(h, 5), load_f16(h, 6), load_f16(h, 7)};
#endif
}

/* bfloat16 elements [i, i+16) of a row: *e = the even ones (i, i+2, ...), *o = the odd ones.
 * Little-endian, uint32 lane k holds element 2k in its low half and 2k+1 in its high half. */
AI void widen16_bf16(const void *base, int64_t i, vf *e, vf *o) {
    vu x;
    memcpy(&x, (const uint16_t *)base + i, sizeof x);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    *o = (vf)(x << 16);
    *e = (vf)(x & 0xffff0000u);
#else
    *e = (vf)(x << 16);
    *o = (vf)(x & 0xffff0000u);
#endif
}

/* Head dims in "kernel order": for bf16 the first D16 = D rounded down to 16 dims go as 16-dim
 * chunks, even then odd (see widen16_bf16); everything else (all of f32 / f16) is in natural
 * order. kpos gives where natural dim d sits. */
AI int64_t kpos(const int dt, int64_t D, int64_t d) {
    if (dt != BF16 || d >= (D & ~(int64_t)15)) return d;
    const int64_t c = d & ~(int64_t)15, w = d & 15;
    return c + (w & 1) * VL + (w >> 1);
}

/* The 8 scores sum_d qv[d] k_r[d] for key rows kr[0..7] (qv in kernel order) */
AI vf qk8(const int dt, const void *const kr[8], const float *qv, int64_t D) {
    vf a[8];
    for (int r = 0; r < 8; r++) a[r] = (vf){0};
    int64_t d = 0;
    if (dt == BF16)
        for (; d + 16 <= D; d += 16) {
            const vf qe = ld(qv + d), qo = ld(qv + d + VL);
            for (int r = 0; r < 8; r++) {
                vf e, o;
                widen16_bf16(kr[r], d, &e, &o);
                a[r] += qe * e;
                a[r] += qo * o;
            }
        }
    for (; d + VL <= D; d += VL) {
        const vf qd = ld(qv + d);
        for (int r = 0; r < 8; r++) a[r] += qd * widen8(dt, kr[r], d);
    }
    vf s = hsum8x8(a);
    if (d < D) { /* head dims past the last multiple of 8 */
        float tail[8];
        for (int r = 0; r < 8; r++) {
            float x = 0.0f;
            for (int64_t e = d; e < D; e++) x += qv[e] * widen1(dt, kr[r], e);
            tail[r] = x;
        }
        s += ld(tail);
    }
    return s;
}

/* Software prefetch. The selected blocks sit at random places in a cache far larger than the
 * processor's caches: each block starts with misses the hardware prefetchers cannot foresee (and
 * they stop at every 4 KiB page, a bfloat16 block of 64 x 64 being two). So while a block is
 * scored, the lines of the next selected block (keys and values) are requested, spread over the
 * block's key groups. Locality 1 (prefetcht2): into the outer caches without holding L1 miss
 * buffers; on that EPYC it beat prefetcht0 clearly (which stalled the loads the kernel itself
 * waits for), and one block ahead was as good as two or three. */
#define PF_LOC 1

/* prefetch the cache lines of bytes [p, p + bytes), each once */
static inline void prefetch_span(const void *p, int64_t bytes) {
    if (bytes <= 0) return;
    const uintptr_t first = (uintptr_t)p & ~(uintptr_t)63, last = ((uintptr_t)p + (uintptr_t)bytes - 1) & ~(uintptr_t)63;
    for (uintptr_t a = first; a <= last; a += 64) __builtin_prefetch((const void *)a, 0, PF_LOC);
}

/* prefetch rows [r0, r0 + nrows) of a [*, D] matrix with row stride st (elements) */
AI void prefetch_rows(const int dt, const void *base, int64_t st, int64_t r0, int64_t nrows, int64_t D) {
    const int64_t rb = D * (dt == F32 ? 4 : 2);
    if (st == D) {
        prefetch_span(at(dt, base, r0 * st), nrows * rb);
    } else {
        for (int64_t r = r0; r < r0 + nrows; r++) prefetch_span(at(dt, base, r * st), rb);
    }
}

/* acc[off + 8j ..] (NV vectors, kernel order) = keep * acc + sum_t p[t] v_t[...], v_t = row t of
 * the block (v0 + t * vst elements). NV and NPAIR are constants after inlining: the panel's
 * accumulators live in registers across all n keys. For bf16 the first NPAIR pairs of vectors
 * are even/odd chunks, a last odd vector is in natural order. */
AI void pv_panel(const int dt, const int NV, const int NPAIR, const void *v0, int64_t vst, int64_t off,
                 const float *p, int64_t n, float *acc, float keep) {
    vf c[PW];
    const vf kv = bc(keep);
    for (int j = 0; j < PW; j++)
        if (j < NV) c[j] = ld(acc + off + j * VL) * kv;
    for (int64_t t = 0; t < n; t++) {
        const vf pt = bc(p[t]);
        const void *row = at(dt, v0, t * vst);
        for (int j = 0; j < PW; j++) {
            if (j >= NV) break;
            if (j < 2 * NPAIR) {
                if ((j & 1) == 0 && j + 1 < PW) { /* j + 1 < PW always holds: said for the compiler */
                    vf e, o;
                    widen16_bf16(row, off + j * VL, &e, &o);
                    c[j] += pt * e;
                    c[j + 1] += pt * o;
                }
            } else {
                c[j] += pt * widen8(dt, row, off + j * VL);
            }
        }
    }
    for (int j = 0; j < PW; j++)
        if (j < NV) st(acc + off + j * VL, c[j]);
}

/* acc = keep * acc + P . V over one block of n keys (first row v0) */
AI void pv_block(const int dt, const void *v0, int64_t vst, const float *p, int64_t n, int64_t D, float *acc,
                 float keep) {
    const int64_t Dv = D & ~(int64_t)(VL - 1);
    for (int64_t off = 0; off < Dv; off += PW * VL) {
        const int64_t nv = (Dv - off) / VL < PW ? (Dv - off) / VL : PW;
        /* bf16: a panel starts on a 16-dim boundary, so its vectors are pairs but for a last odd one */
        switch (nv) {
#define PV_CASE(NV) \
        case NV: pv_panel(dt, NV, dt == BF16 ? NV / 2 : 0, v0, vst, off, p, n, acc, keep); break;
        PV_CASE(8) PV_CASE(7) PV_CASE(6) PV_CASE(5) PV_CASE(4) PV_CASE(3) PV_CASE(2) PV_CASE(1)
#undef PV_CASE
        default: break;
        }
    }
    if (Dv < D) { /* head dims past the last multiple of 8 */
        for (int64_t d = Dv; d < D; d++) acc[d] *= keep;
        for (int64_t t = 0; t < n; t++) {
            const void *row = at(dt, v0, t * vst);
            for (int64_t d = Dv; d < D; d++) acc[d] += p[t] * widen1(dt, row, d);
        }
    }
}

/* the next slot at or after i holding a block, or n_sel */
static inline int64_t next_valid(const int64_t *sel_row, int64_t n_sel, int64_t i) {
    while (i < n_sel && sel_row[i] < 0) i++;
    return i;
}

/* One (batch, query head) row. scratch: acc [D], qv [D], score [bs rounded up to 8]. */
AI void decode_row(const int dt, const float *qp, const void *kh, const void *vh, const int64_t *sel_row,
                   int64_t n_sel, int64_t D, int64_t T, int64_t bs, int64_t k_st, int64_t v_st, float scale,
                   float *scratch, float *op, float *lse) {
    float *acc = scratch, *qv = scratch + D, *score = scratch + 2 * D;
    for (int64_t d = 0; d < D; d++) {
        acc[d] = 0.0f;
        qv[kpos(dt, D, d)] = qp[d];
    }
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const vf ninf = bc(-INFINITY);
    float m = -INFINITY, l = 0.0f;
    int nan_seen = 0;
    /* pf: the slot of the next block to prefetch. The row's first block is requested whole now,
     * every later one while its predecessor is scored */
    int64_t pf = next_valid(sel_row, n_sel, 0);
    if (pf < n_sel) {
        const int64_t a0 = sel_row[pf] * bs, an = (a0 + bs < T ? a0 + bs : T) - a0;
        prefetch_rows(dt, kh, k_st, a0, an, D);
        prefetch_rows(dt, vh, v_st, a0, an, D);
        pf = next_valid(sel_row, n_sel, pf + 1);
    }
    for (int64_t i = 0; i < n_sel; i++) {
        const int64_t j = sel_row[i];
        if (j < 0) continue;
        const int64_t t0 = j * bs;
        const int64_t n = (t0 + bs < T ? t0 + bs : T) - t0;
        if (n <= 0) continue;
        const int64_t nr = (n + VL - 1) & ~(int64_t)(VL - 1); /* scores padded to whole vectors */
        int64_t nt0 = -1, nn = 0; /* the block to prefetch: its first token and length */
        if (pf < n_sel) {
            nt0 = sel_row[pf] * bs;
            nn = (nt0 + bs < T ? nt0 + bs : T) - nt0;
            pf = next_valid(sel_row, n_sel, pf + 1);
        }
        vf mx = ninf;
        for (int64_t g = 0; g < n; g += VL) {
            const int64_t R = n - g < VL ? n - g : VL;
            if (g < nn) { /* the next block's rows g .. g+7 */
                prefetch_rows(dt, kh, k_st, nt0 + g, nn - g < VL ? nn - g : VL, D);
                prefetch_rows(dt, vh, v_st, nt0 + g, nn - g < VL ? nn - g : VL, D);
            }
            const void *kr[8];
            for (int r = 0; r < 8; r++) kr[r] = at(dt, kh, (t0 + g + (r < R ? r : 0)) * k_st);
            vf s = qk8(dt, kr, qv, D) * scale;
            if (R < VL) s = sel(lane < (int32_t)R, s, ninf); /* lanes past the block: p = 0 */
            st(score + g, s);
            mx = vmax(s, mx); /* a NaN score never becomes the max: vmax keeps mx */
        }
        if (nr < nn) { /* this block was short (the cache's last): the rest of the next one */
            prefetch_rows(dt, kh, k_st, nt0 + nr, nn - nr, D);
            prefetch_rows(dt, vh, v_st, nt0 + nr, nn - nr, D);
        }
        float block_max = -INFINITY;
        {
            float x[VL];
            st(x, mx);
            for (int r = 0; r < VL; r++)
                if (x[r] > block_max) block_max = x[r];
        }
        if (block_max == -INFINITY) {
            /* every score is -inf or NaN. A NaN among finite scores needs no test here: its
             * p = exp(NaN - m_new) turns l and acc NaN below; only a block of nothing but
             * NaN / -inf would be skipped silently, so look for NaN on this rare path */
            for (int64_t t = 0; t < n; t++) nan_seen |= isnan(score[t]);
            if (nan_seen) break; /* the row is NaN whatever follows */
            continue;            /* -inf everywhere: the block adds nothing */
        }
        const float m_new = block_max > m ? block_max : m;
        /* m = -inf before the first contributing block: exp(-inf - m_new) is 0, but written
         * out so that m_new = -inf can never make it exp(NaN) */
        const float keep = m == -INFINITY ? 0.0f : expf(m - m_new);
        /* p in place; score - m_new <= 0 but for NaN (kept) and +inf - +inf (NaN, as IEEE) */
        const vf mv = bc(m_new);
        vf sum = (vf){0};
        for (int64_t t = 0; t < nr; t += VL) {
            const vf p = vexp(ld(score + t) - mv);
            st(score + t, p);
            sum += p;
        }
        l = l * keep + hsum(sum);
        pv_block(dt, at(dt, vh, t0 * v_st), v_st, score, n, D, acc, keep);
        m = m_new;
    }
    if (nan_seen) {
        for (int64_t d = 0; d < D; d++) op[d] = NAN;
        *lse = NAN;
    } else if (m == -INFINITY) {
        for (int64_t d = 0; d < D; d++) op[d] = 0.0f;
        *lse = -INFINITY;
    } else { /* +inf scores or non-finite values propagate through acc / l as IEEE says */
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < D; d++) op[d] = acc[kpos(dt, D, d)] * inv;
        *lse = m + logf(l);
    }
}

#define ROW_ARGS \
    const float *qp, const void *kh, const void *vh, const int64_t *sel_row, int64_t n_sel, int64_t D, int64_t T, \
        int64_t bs, int64_t k_st, int64_t v_st, float scale, float *scratch, float *op, float *lse
#define ROW_PASS qp, kh, vh, sel_row, n_sel, D, T, bs, k_st, v_st, scale, scratch, op, lse
/* one specialised copy per element type (dt a constant: every widening branch folds away) */
static void row_f32(ROW_ARGS) { decode_row(F32, ROW_PASS); }
static void row_bf16(ROW_ARGS) { decode_row(BF16, ROW_PASS); }
static void row_f16(ROW_ARGS) { decode_row(F16, ROW_PASS); }

/* kv_dtype: 0 float32, 1 bfloat16, 2 float16; returns 0, 1 (scratch allocation failed) or 2 (bad kv_dtype) */
int decode_blocks(const float *q, const void *k, const void *v, const int64_t *blocks, float *out, float *lse,
                  int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t T, int64_t bs, int64_t n_sel, int64_t q_sb,
                  int64_t q_sh, int64_t k_sb, int64_t k_sh, int64_t k_st, int64_t v_sb, int64_t v_sh, int64_t v_st,
                  float scale, int n_threads, int kv_dtype) {
    if (kv_dtype < 0 || kv_dtype > 2) return 2;
    const size_t es = kv_dtype == F32 ? 4 : 2;
    const int64_t group = Hq / Hkv;
    const int64_t rows = B * Hq;
    /* acc [D], qv [D], scores [bs rounded up to a whole vector] */
    const size_t floats = (size_t)(2 * D) + (size_t)((bs + VL - 1) & ~(int64_t)(VL - 1));
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *scratch = (float *)malloc(floats * sizeof(float));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            if (scratch == NULL) continue;
            const int64_t b = row / Hq, h = row % Hq, hk = h / group;
            const float *qp = q + b * q_sb + h * q_sh;
            const void *kh = (const char *)k + (size_t)(b * k_sb + hk * k_sh) * es;
            const void *vh = (const char *)v + (size_t)(b * v_sb + hk * v_sh) * es;
            const int64_t *sel_row = blocks + row * n_sel;
            float *op = out + row * D;
            switch (kv_dtype) {
            case F32: row_f32(qp, kh, vh, sel_row, n_sel, D, T, bs, k_st, v_st, scale, scratch, op, lse + row); break;
            case BF16: row_bf16(qp, kh, vh, sel_row, n_sel, D, T, bs, k_st, v_st, scale, scratch, op, lse + row); break;
            default: row_f16(qp, kh, vh, sel_row, n_sel, D, T, bs, k_st, v_st, scale, scratch, op, lse + row); break;
            }
        }
        free(scratch);
    }
    return failed;
}
