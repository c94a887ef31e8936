/* Block-sparse prefill over selected key blocks, read in place
 * (longattn.kernels.native_prefill.sparse_prefill).
 *
 * What it computes (the semantics of longattn.sparse.kernel.sparse_attention, no key padding):
 * query i sits at position p = i + Tk - Tq (bottom-right causal alignment). Query block
 * qb = [qb*q_block, min((qb+1)*q_block, Tq)) attends to
 *   - non-causal: every key of every selected block j (block j = tokens [j*bs, min((j+1)*bs, Tk)));
 *   - causal: the selected blocks that end at or before the block's "present start"
 *     ps = floor(max(first position, 0) / bs) * bs, whole and unmasked, plus the present keys
 *     [ps, p] of each query (always attended, masked per token; selected blocks at or after ps
 *     add nothing more, selectors force them anyway).
 * A slot of -1 is unused. A block listed twice is attended twice (as the torch paths do).
 *
 * Layout: q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D]; last dimension contiguous, the other strides
 * given in elements (a view into a larger cache is fine: only the selected rows are read).
 * Element types, one code per tensor (a float32 query may read a half-precision cache as stored):
 * 0 = float32, 1 = bfloat16, 2 = float16; compute, the softmax statistics and the outputs are
 * float32. sel [B, Hq, n_qb, n_sel] int64 contiguous.
 * Query head h reads key-value head h / (Hq / Hkv) (GQA).
 * out [B, Hq, Tq, D] and lse [B, Hq, Tq] contiguous float32. A row with no visible key (or whose
 * every score is -inf) gets out = 0, lse = -inf; a NaN score, or a non-finite value of a visible
 * key, makes the row NaN as IEEE says (the float64 reference does the same); keys the row does
 * not see never reach it, whatever they hold.
 *
 * How: one work item is (batch, query head, tile of up to tile_q queries of one query block);
 * OpenMP threads take items dynamically (neighbouring items share key blocks, which then come
 * from the shared cache). Per item the tile's key ranges are listed (adjacent blocks merged) and
 * walked in chunks of up to KC keys. The tile's queries are processed in column groups of NC = 16
 * (two 8-float vectors); everything per group is kept transposed, queries along the vector:
 *   QT [D][16]  = scale * Q^T                 (packed once per item)
 *   S  [n][16]  = K_chunk · QT                (micro-kernel: 6 keys x 16 queries, D-long dots)
 *   m, l [16]   running max and normaliser    (vertical max / sum over keys: no shuffles)
 *   P = exp(S - m_new) in place               (vectorised polynomial exp, ~1e-7 relative)
 *   OT [D][16]  = alpha * OT + V_chunk^T · P  (micro-kernel: 6 head dims x 16 queries)
 * Both micro-kernels broadcast one scalar of the row-major operand (K row / V row, read in place)
 * against two vector loads of the packed [x][16] operand, 12 accumulators: the FMA units' 4-cycle
 * latency x 2 ports is covered and the loads stay under the load ports' rate.
 * Causally, a chunk entirely at or before the tile's first query needs no mask; in a chunk that
 * is not, each column group only computes the keys up to its last query (the rest of the square
 * is skipped), and masks per token (by assignment of -inf, so a NaN key it hides cannot leak).
 * A partly hidden chunk whose values hold non-finite numbers takes a scalar path that skips the
 * hidden (key, query) pairs, since 0 * NaN would otherwise reach rows that must not see them.
 * bf16 / fp16 chunks are converted to float32 in per-thread scratch first (1/tile_q of the work).
 *
 * Portability: C11 with GCC vector extensions (written for gcc; clang documents the same
 * extensions but was not available to test), one intrinsic (vmax, under __AVX__, with a portable
 * fallback that tests/test_native_prefill.py builds with -mno-avx and checks). With -O3
 * -march=native the vectors become AVX2/FMA (AVX-512 machines run them at 256 bits), SSE or NEON
 * pairs elsewhere. -ffp-contract must allow FMA contraction (GNU C's default).
 * Measured (AMD EPYC Zen 3, AVX2, one core): ~78% of the core's FMA peak over a 10% causal
 * selection; of the time ~45% is Q·K^T, ~45% P·V, ~13% the softmax (exp included).
 *
 * Scratch lives on the heap, one buffer per thread (OpenMP stacks may be small). Returns 0, or 1
 * when a thread's scratch could not be allocated (the Python wrapper raises MemoryError).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int sparse_prefill_abi_version(void) { return 1; }

#include "half.h" /* bf16_to_f32, f16_to_f32, row_to_f32, esize */
#include "vec8.h" /* vf, vi, VL, ld, st, bc, sel, vmax, vexp */

#define NC 16 /* query columns per group: two vectors */
#define KC 64 /* keys per chunk */
#define MR 6  /* rows per micro-kernel */

/* y[i] = e^x[i] through vexp (the kernel's exp), for testing its accuracy: x <= 0, -inf or NaN */
void sparse_prefill_exp(const float *x, float *y, int64_t n) { vexp_array(x, y, n); }

/* S[r][0..15] = sum_d k[r*kst + d] * qt[d][0..15] for r < R (R <= MR keys) */
static inline __attribute__((always_inline)) void qk_micro(const int R, const float *restrict k, int64_t kst,
                                                           const float *restrict qt, int64_t D, float *restrict s) {
    vf a0[MR], a1[MR];
    for (int r = 0; r < MR; r++)
        if (r < R) a0[r] = a1[r] = (vf){0};
    const float *kr[MR];
    for (int r = 0; r < MR; r++) kr[r] = k + (r < R ? r : 0) * kst;
    for (int64_t d = 0; d < D; d++) {
        const vf b0 = ld(qt + d * NC), b1 = ld(qt + d * NC + VL);
        for (int r = 0; r < MR; r++)
            if (r < R) {
                const vf x = bc(kr[r][d]);
                a0[r] += x * b0;
                a1[r] += x * b1;
            }
    }
    for (int r = 0; r < MR; r++)
        if (r < R) {
            st(s + r * NC, a0[r]);
            st(s + r * NC + VL, a1[r]);
        }
}

/* ot[r][0..15] = alpha * ot[r][..] + sum_t v[t*vst + r] * p[t][0..15] for r < R (R <= MR dims) */
static inline __attribute__((always_inline)) void pv_micro(const int R, const float *restrict v, int64_t vst,
                                                           const float *restrict p, int64_t n, float *restrict ot,
                                                           vf al0, vf al1) {
    vf a0[MR], a1[MR];
    for (int r = 0; r < MR; r++)
        if (r < R) {
            a0[r] = ld(ot + r * NC) * al0;
            a1[r] = ld(ot + r * NC + VL) * al1;
        }
    for (int64_t t = 0; t < n; t++) {
        const vf b0 = ld(p + t * NC), b1 = ld(p + t * NC + VL);
        const float *vr = v + t * vst;
        for (int r = 0; r < MR; r++)
            if (r < R) {
                const vf x = bc(vr[r]);
                a0[r] += x * b0;
                a1[r] += x * b1;
            }
    }
    for (int r = 0; r < MR; r++)
        if (r < R) {
            st(ot + r * NC, a0[r]);
            st(ot + r * NC + VL, a1[r]);
        }
}

/* S = K[0..n) · QT for one column group (n keys, rows of kst floats) */
static void qk_group(const float *k, int64_t kst, const float *qt, int64_t D, int64_t n, float *s) {
    int64_t r0 = 0;
    for (; r0 + MR <= n; r0 += MR) qk_micro(MR, k + r0 * kst, kst, qt, D, s + r0 * NC);
    switch (n - r0) {
    case 5: qk_micro(5, k + r0 * kst, kst, qt, D, s + r0 * NC); break;
    case 4: qk_micro(4, k + r0 * kst, kst, qt, D, s + r0 * NC); break;
    case 3: qk_micro(3, k + r0 * kst, kst, qt, D, s + r0 * NC); break;
    case 2: qk_micro(2, k + r0 * kst, kst, qt, D, s + r0 * NC); break;
    case 1: qk_micro(1, k + r0 * kst, kst, qt, D, s + r0 * NC); break;
    default: break;
    }
}

/* OT = alpha * OT + V[0..n)^T · P for one column group */
static void pv_group(const float *v, int64_t vst, const float *p, int64_t n, int64_t D, float *ot, vf al0, vf al1) {
    int64_t d0 = 0;
    for (; d0 + MR <= D; d0 += MR) pv_micro(MR, v + d0, vst, p, n, ot + d0 * NC, al0, al1);
    switch (D - d0) {
    case 5: pv_micro(5, v + d0, vst, p, n, ot + d0 * NC, al0, al1); break;
    case 4: pv_micro(4, v + d0, vst, p, n, ot + d0 * NC, al0, al1); break;
    case 3: pv_micro(3, v + d0, vst, p, n, ot + d0 * NC, al0, al1); break;
    case 2: pv_micro(2, v + d0, vst, p, n, ot + d0 * NC, al0, al1); break;
    case 1: pv_micro(1, v + d0, vst, p, n, ot + d0 * NC, al0, al1); break;
    default: break;
    }
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Softmax update of one column group over n scored keys: s [n][16] becomes P in place; m, l [16]
 * are updated; alpha [2 vectors] receives the factor the accumulator must be scaled by. */
static void softmax_group(float *s, int64_t n, float *m, float *l, vf *al0, vf *al1) {
    const vf m0 = ld(m), m1 = ld(m + VL);
    vf x0 = m0, x1 = m1;
    /* a NaN score never becomes the max (vmax keeps the running max); it still turns its p, and
     * so l and the accumulator, NaN below */
    for (int64_t t = 0; t < n; t++) {
        x0 = vmax(ld(s + t * NC), x0);
        x1 = vmax(ld(s + t * NC + VL), x1);
    }
    const vf ninf = bc(-INFINITY);
    /* a column that has seen only -inf keeps m = -inf; exponents are taken against 0 there so
     * that -inf - -inf never makes a NaN */
    const vf safe0 = sel(x0 == ninf, (vf){0}, x0), safe1 = sel(x1 == ninf, (vf){0}, x1);
    const vf a0 = vexp(m0 - safe0), a1 = vexp(m1 - safe1);
    vf sum0 = (vf){0}, sum1 = (vf){0};
    for (int64_t t = 0; t < n; t++) {
        const vf p0 = vexp(ld(s + t * NC) - safe0), p1 = vexp(ld(s + t * NC + VL) - safe1);
        st(s + t * NC, p0);
        st(s + t * NC + VL, p1);
        sum0 += p0;
        sum1 += p1;
    }
    st(l, ld(l) * a0 + sum0);
    st(l + VL, ld(l + VL) * a1 + sum1);
    st(m, x0);
    st(m + VL, x1);
    *al0 = a0;
    *al1 = a1;
}

int sparse_prefill(const void *q, const void *k, const void *v, const int64_t *selp, float *out, float *lse,
                   int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, int64_t q_block,
                   int64_t bs, int64_t n_qb, int64_t n_sel, int64_t q_sb, int64_t q_sh, int64_t q_st, int64_t k_sb,
                   int64_t k_sh, int64_t k_st, int64_t v_sb, int64_t v_sh, int64_t v_st, float scale, int causal,
                   int q_dtype, int k_dtype, int v_dtype, int64_t tile_q, int n_threads) {
    const int64_t group = Hq / Hkv;
    const int64_t off = Tk - Tq;
    const int64_t tiles_per_qb = (q_block + tile_q - 1) / tile_q;
    const int64_t n_cg_max = (tile_q + NC - 1) / NC;
    const int64_t items = B * Hq * n_qb * tiles_per_qb;
    const size_t qs = esize(q_dtype), ks = esize(k_dtype), vs = esize(v_dtype);
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        /* per-thread scratch: QT and OT [n_cg][D][16], S [KC][16], m and l [n_cg*16], a query
         * row [D], converted K and V chunks [KC][D] (where stored as half types), segment bounds
         * [2 (n_sel+1)] */
        const size_t f_qt = (size_t)(n_cg_max * D * NC), f_s = (size_t)KC * NC, f_ml = (size_t)(n_cg_max * NC);
        const size_t f_k = k_dtype == 0 ? 0 : (size_t)(KC * D), f_v = v_dtype == 0 ? 0 : (size_t)(KC * D);
        const size_t floats = 2 * f_qt + f_s + 2 * f_ml + (size_t)D + f_k + f_v;
        const size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64 + (size_t)(2 * (n_sel + 1)) * sizeof(int64_t);
        char *scratch = (char *)aligned_alloc(64, ((bytes + 63) / 64) * 64);
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        float *QT = (float *)scratch, *OT = QT + f_qt, *S = OT + f_qt, *M = S + f_s, *L = M + f_ml;
        float *qrow = L + f_ml, *Kc = qrow + D, *Vc = Kc + f_k;
        int64_t *seg = (int64_t *)(scratch + ((floats * sizeof(float) + 63) / 64) * 64);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (scratch == NULL) continue;
            const int64_t bh = item / (n_qb * tiles_per_qb), rem = item % (n_qb * tiles_per_qb);
            const int64_t qb = rem / tiles_per_qb, tile = rem % tiles_per_qb;
            const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
            const int64_t qb0 = qb * q_block, qb1 = min64(qb0 + q_block, Tq);
            const int64_t r0 = qb0 + tile * tile_q;
            if (r0 >= qb1) continue;
            const int64_t r1 = min64(r0 + tile_q, qb1), m = r1 - r0;
            const int64_t n_cg = (m + NC - 1) / NC;
            const int64_t p0 = r0 + off, plast = r1 - 1 + off; /* positions of the tile's queries */
            const char *qh = (const char *)q + (size_t)(b * q_sb + h * q_sh) * qs;
            const char *kh = (const char *)k + (size_t)(b * k_sb + hk * k_sh) * ks;
            const char *vh = (const char *)v + (size_t)(b * v_sb + hk * v_sh) * vs;
            const int64_t *sl = selp + (bh * n_qb + qb) * n_sel;

            /* key ranges [seg[2i], seg[2i+1]), adjacent ones merged */
            int64_t n_seg = 0;
            const int64_t ps = causal ? (max64(qb0 + off, 0) / bs) * bs : Tk;
            for (int64_t i = 0; i < n_sel; i++) {
                const int64_t j = sl[i];
                if (j < 0) continue;
                const int64_t lo = j * bs, hi = min64(lo + bs, Tk);
                if (causal && lo + bs > ps) continue; /* at or after the present start */
                if (n_seg && seg[2 * n_seg - 1] == lo) {
                    seg[2 * n_seg - 1] = hi;
                } else {
                    seg[2 * n_seg] = lo;
                    seg[2 * n_seg + 1] = hi;
                    n_seg++;
                }
            }
            if (causal) {
                const int64_t lo = ps, hi = min64(plast + 1, Tk);
                if (hi > lo) {
                    if (n_seg && seg[2 * n_seg - 1] == lo) {
                        seg[2 * n_seg - 1] = hi;
                    } else {
                        seg[2 * n_seg] = lo;
                        seg[2 * n_seg + 1] = hi;
                        n_seg++;
                    }
                }
            }

            /* QT[cg][d][c] = scale * q[r0 + cg*16 + c][d], zero past the tile */
            memset(QT, 0, (size_t)(n_cg * D * NC) * sizeof(float));
            for (int64_t c = 0; c < m; c++) {
                row_to_f32(qh + (size_t)((r0 + c) * q_st) * qs, D, q_dtype, qrow);
                float *dst = QT + (c / NC) * D * NC + (c % NC);
                for (int64_t d = 0; d < D; d++) dst[d * NC] = scale * qrow[d];
            }
            memset(OT, 0, (size_t)(n_cg * D * NC) * sizeof(float));
            for (int64_t c = 0; c < n_cg * NC; c++) {
                M[c] = -INFINITY;
                L[c] = 0.0f;
            }

            for (int64_t si = 0; si < n_seg; si++) {
                for (int64_t c0 = seg[2 * si]; c0 < seg[2 * si + 1]; c0 += KC) {
                    const int64_t n = min64(KC, seg[2 * si + 1] - c0);
                    const float *kp, *vp;
                    int64_t kst, vst;
                    if (k_dtype == 0) {
                        kp = (const float *)kh + c0 * k_st;
                        kst = k_st;
                    } else {
                        for (int64_t t = 0; t < n; t++)
                            row_to_f32(kh + (size_t)((c0 + t) * k_st) * ks, D, k_dtype, Kc + t * D);
                        kp = Kc;
                        kst = D;
                    }
                    if (v_dtype == 0) {
                        vp = (const float *)vh + c0 * v_st;
                        vst = v_st;
                    } else {
                        for (int64_t t = 0; t < n; t++)
                            row_to_f32(vh + (size_t)((c0 + t) * v_st) * vs, D, v_dtype, Vc + t * D);
                        vp = Vc;
                        vst = D;
                    }
                    /* every key of the chunk visible to every query of the tile? */
                    const int full = !causal || c0 + n - 1 <= p0;
                    int bad_v = 0;
                    if (!full) {
                        for (int64_t t = 0; t < n && !bad_v; t++)
                            for (int64_t d = 0; d < D; d++) bad_v |= !isfinite(vp[t * vst + d]);
                    }
                    for (int64_t cg = 0; cg < n_cg; cg++) {
                        const int64_t cpos = p0 + cg * NC; /* position of the group's first query */
                        const int64_t n_eff = full ? n : max64(0, min64(n, cpos + NC - 1 - c0 + 1));
                        if (n_eff == 0) continue; /* the group sees none of these keys */
                        const float *qt = QT + cg * D * NC;
                        float *ot = OT + cg * D * NC;
                        qk_group(kp, kst, qt, D, n_eff, S);
                        if (!full) {
                            /* hide key t from columns c with cpos + c < c0 + t */
                            for (int64_t t = 0; t < n_eff; t++) {
                                const int64_t hide = min64(NC, max64(0, c0 + t - cpos));
                                for (int64_t c = 0; c < hide; c++) S[t * NC + c] = -INFINITY;
                            }
                        }
                        vf al0, al1;
                        softmax_group(S, n_eff, M + cg * NC, L + cg * NC, &al0, &al1);
                        if (!bad_v) {
                            pv_group(vp, vst, S, n_eff, D, ot, al0, al1);
                        } else {
                            float al[NC];
                            st(al, al0);
                            st(al + VL, al1);
                            for (int64_t d = 0; d < D; d++)
                                for (int64_t c = 0; c < NC; c++) ot[d * NC + c] *= al[c];
                            for (int64_t t = 0; t < n_eff; t++)
                                for (int64_t c = max64(0, c0 + t - cpos); c < NC; c++) {
                                    const float pr = S[t * NC + c];
                                    for (int64_t d = 0; d < D; d++) ot[d * NC + c] += pr * vp[t * vst + d];
                                }
                        }
                    }
                }
            }

            for (int64_t c = 0; c < m; c++) {
                const int64_t row = r0 + c;
                const float mi = M[c], li = L[c];
                float *op = out + (bh * Tq + row) * D;
                const float *src = OT + (c / NC) * D * NC + (c % NC);
                if (li != li) {
                    for (int64_t d = 0; d < D; d++) op[d] = NAN;
                    lse[bh * Tq + row] = NAN;
                } else if (mi == -INFINITY) {
                    for (int64_t d = 0; d < D; d++) op[d] = 0.0f;
                    lse[bh * Tq + row] = -INFINITY;
                } else {
                    const float inv = 1.0f / li;
                    for (int64_t d = 0; d < D; d++) op[d] = src[d * NC] * inv;
                    lse[bh * Tq + row] = mi + logf(li);
                }
            }
        }
        free(scratch);
    }
    return failed;
}
