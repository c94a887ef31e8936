/* Chunked causal linear attention with an optional per-head decay, forward only
 * (longattn.kernels.native_linear; the fast path of longattn.recurrent.linear and .lightning when
 * no gradient is wanted).
 *
 * What it computes, per state head s with decay lambda = exp(log_decay[s]) (1 without a decay):
 *   S_t = lambda S_{t-1} + phi(k_t) v_t^T      S [F, Dv], float32
 *   z_t = lambda z_{t-1} + phi(k_t)            z [F], only where z0 is given (linear attention)
 *   o_t = phi(q_t)^T S_t                        per query head of the state head
 *   normalize:  o_t = o_t / (phi(q_t) . z_t + eps)
 *   rms_norm:   o_t = o_t / sqrt(mean(o_t^2) + norm_eps) * w      (TransNormer's NormAttention)
 * phi is applied to scale * x: 0 identity, 1 elu(x) + 1, 2 relu(x).
 *
 * Heads: H query heads, Hs state heads (H % Hs == 0: query head h reads state head h / (H / Hs)),
 * Hkv key/value heads (Hs % Hkv == 0: state head s reads k/v head s / (Hs / Hkv)). Linear attention
 * keeps one state per key/value head (Hs = Hkv); Lightning one per query head (Hs = H), each
 * decaying at its own rate.
 *
 * Layout: q [B, H, T, F], k [B, Hkv, T, F], v [B, Hkv, T, Dv], each float32 / bfloat16 / float16
 * (codes 0 / 1 / 2), read as stored with the given batch / head / token strides (elements), last
 * dimension contiguous. s0, s_out [B, Hs, F, Dv], z0, z_out [B, Hs, F] (or NULL) and out
 * [B, H, T, Dv]: contiguous float32. log_decay [Hs] float32 or NULL; norm_w [Dv] or NULL.
 *
 * How (Lightning Attention-2's blocking, Qin et al. 2024): one work item is one (batch, state
 * head); OpenMP threads take items dynamically; an item walks its sequence in chunks of C tokens
 * keeping S (and z, as one more value column) in per-thread scratch. With i, j in [0, C):
 *   O   = diag(lambda^(i+1)) Q S  +  (Q K^T . M) V      M_ij = lambda^(i-j) for j <= i, else 0
 *   S   = lambda^C S  +  (diag(lambda^(C-1-j)) K)^T V
 * Every product is one micro-kernel: 6 rows of the left operand, read in place and broadcast
 * one scalar at a time, against two 8-float vectors of the right operand's row (K^T, S or V,
 * packed with rows padded to a multiple of 8); 12 accumulators stay in registers. Q K^T and its
 * product with V are computed only for the lower triangle (per 6-row block, up to its last row).
 * Entries above the diagonal are set to 0 by assignment, not by a multiply, so a non-finite key
 * in a later position never reaches an earlier query's score; a chunk whose values hold an inf or
 * NaN takes a row-by-row P V over exactly the tokens each row sees (the blocked product would
 * give the earlier rows of a 6-row block 0 * inf). So output t depends on tokens <= t only, as
 * the recurrence says, whatever the inputs hold.
 * Decay powers lambda^n are computed in double as exp(log lambda * n) with n >= 0: they underflow
 * to 0, never overflow. bf16 / fp16 rows are widened to float32 as they are read.
 *
 * Scratch lives on the heap, one buffer per thread (OpenMP stacks may be small). Returns 0, or 1
 * when a thread's scratch could not be allocated (the Python wrapper raises MemoryError).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int linear_chunked_abi_version(void) { return 1; }

#include "half.h" /* bf16_to_f32, f16_to_f32, row_to_f32, esize */
#include "vec8.h" /* vf, vi, VL, ld, st, bc, sel, vmax, vexp */

#define MR 6 /* rows per micro-kernel */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t pad8(int64_t n) { return (n + VL - 1) / VL * VL; }

/* C[r][0 .. 8W) = (acc ? C[r][..] : 0) + rs[r] * sum_{t<K} A[r*lda + t] * B[t*ldb + 0 .. 8W), r < R
 * (rs NULL: 1). W is 1 or 2 vectors. */
static inline __attribute__((always_inline)) void micro(const int R, const int W, int64_t K,
                                                        const float *restrict A, int64_t lda,
                                                        const float *restrict B, int64_t ldb, float *restrict C,
                                                        int64_t ldc, const float *rs, int acc) {
    vf a0[MR], a1[MR];
    for (int r = 0; r < MR; r++)
        if (r < R) a0[r] = a1[r] = (vf){0};
    const float *ar[MR];
    for (int r = 0; r < MR; r++) ar[r] = A + (r < R ? r : 0) * lda;
    for (int64_t t = 0; t < K; t++) {
        const vf b0 = ld(B + t * ldb);
        const vf b1 = W == 2 ? ld(B + t * ldb + VL) : (vf){0};
        for (int r = 0; r < MR; r++)
            if (r < R) {
                const vf x = bc(ar[r][t]);
                a0[r] += x * b0;
                if (W == 2) a1[r] += x * b1;
            }
    }
    for (int r = 0; r < MR; r++)
        if (r < R) {
            float *c = C + r * ldc;
            vf y0 = a0[r], y1 = a1[r];
            if (rs != NULL) {
                y0 *= bc(rs[r]);
                y1 *= bc(rs[r]);
            }
            if (acc) {
                y0 += ld(c);
                if (W == 2) y1 += ld(c + VL);
            }
            st(c, y0);
            if (W == 2) st(c + VL, y1);
        }
}

/* one block of R rows over N columns (N a multiple of 8) */
static inline __attribute__((always_inline)) void row_block(const int R, int64_t N, int64_t K, const float *A,
                                                            int64_t lda, const float *B, int64_t ldb, float *C,
                                                            int64_t ldc, const float *rs, int acc) {
    int64_t n0 = 0;
    for (; n0 + 2 * VL <= N; n0 += 2 * VL) micro(R, 2, K, A, lda, B + n0, ldb, C + n0, ldc, rs, acc);
    if (n0 < N) micro(R, 1, K, A, lda, B + n0, ldb, C + n0, ldc, rs, acc);
}

/* C [M][ldc] (=|+=) diag(rs) A [M][lda] . B [K][ldb] over N columns (a multiple of 8).
 * tri = 1: lower-triangular left factor: a block of rows ending at row e uses K = e columns of A
 *   (and rows of B), the rest being 0 (P . V);
 * tri = 2: only the columns a block's rows can keep are computed, N = pad8(e) (Q . K^T). */
static void gemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb,
                 float *C, int64_t ldc, const float *rs, int acc, int tri) {
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
        const int R = (int)min64(MR, M - i0);
        const int64_t e = i0 + R;
        const int64_t n = tri == 2 ? min64(N, pad8(e)) : N;
        const int64_t k = tri == 1 ? min64(K, e) : K;
        const float *a = A + i0 * lda;
        float *c = C + i0 * ldc;
        const float *r = rs != NULL ? rs + i0 : NULL;
        switch (R) {
        case 6: row_block(6, n, k, a, lda, B, ldb, c, ldc, r, acc); break;
        case 5: row_block(5, n, k, a, lda, B, ldb, c, ldc, r, acc); break;
        case 4: row_block(4, n, k, a, lda, B, ldb, c, ldc, r, acc); break;
        case 3: row_block(3, n, k, a, lda, B, ldb, c, ldc, r, acc); break;
        case 2: row_block(2, n, k, a, lda, B, ldb, c, ldc, r, acc); break;
        default: row_block(1, n, k, a, lda, B, ldb, c, ldc, r, acc); break;
        }
    }
}

/* dst[0 .. pad8(D)) = float32 of row `src`, zero past D */
static void row_to_f32_padded(const void *src, int64_t D, int dtype, float *restrict dst) {
    row_to_f32(src, D, dtype, dst);
    for (int64_t d = D; d < pad8(D); d++) dst[d] = 0.0f;
}

/* the feature map on one vector of scale * x */
static inline vf phi(vf x, int fmap) {
    if (fmap == 1) { /* elu(x) + 1 = x + 1 for x > 0, e^x otherwise (a NaN goes to vexp and stays NaN) */
        const vi pos = x > bc(0.0f);
        return sel(pos, x + 1.0f, vexp(sel(pos, bc(0.0f), x)));
    }
    if (fmap == 2) return sel(x < bc(0.0f), bc(0.0f), x); /* relu; NaN < 0 is false: NaN stays */
    return x;
}

/* x[0 .. pad8(n)) = phi(scale * x) in place (the padding, zero on entry, is mapped too and may
 * become phi(0); callers never read it as data) */
static void map_row(float *x, int64_t n, int fmap, float scale) {
    const vf s = bc(scale);
    for (int64_t d = 0; d < pad8(n); d += VL) st(x + d, phi(ld(x + d) * s, fmap));
}

int linear_chunked(const void *q, const void *k, const void *v, const float *s0, const float *z0,
                   const float *log_decay, const float *norm_w, float *out, float *s_out, float *z_out, int64_t B,
                   int64_t H, int64_t Hs, int64_t Hkv, int64_t T, int64_t F, int64_t Dv, int64_t chunk,
                   int64_t q_sb, int64_t q_sh, int64_t q_st, int64_t k_sb, int64_t k_sh, int64_t k_st, int64_t v_sb,
                   int64_t v_sh, int64_t v_st, int q_dtype, int k_dtype, int v_dtype, int fmap, float fscale,
                   int normalize, float eps, int rms_norm, float norm_eps, int n_threads) {
    const int64_t G = H / Hs, per_kv = Hs / Hkv;
    const int64_t C = min64(chunk, T), Cp = pad8(C);
    const int with_z = z0 != NULL;
    const int64_t Dw = Dv + (with_z ? 1 : 0), Dp = pad8(Dw); /* value columns: v, then 1 for z */
    const int64_t Fp = pad8(F);
    const size_t qs = esize(q_dtype), ks = esize(k_dtype), vs = esize(v_dtype);
    const int64_t items = B * Hs;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        /* per-thread scratch: Q [C][Fp], K^T and decayed K^T [F][Cp], V [C][Dp], P [C][Cp],
         * O [C][Dp], S [F][Dp], the decay tables q_dec [C], k_dec [C], M [C][Cp], one row [max] */
        const size_t f_q = (size_t)(C * Fp), f_kt = (size_t)(F * Cp), f_v = (size_t)(C * Dp);
        const size_t f_p = (size_t)(C * Cp), f_s = (size_t)(F * Dp);
        const size_t f_row = (size_t)pad8(Fp > Dp ? Fp : Dp);
        const size_t floats = f_q + 2 * f_kt + 2 * f_v + 2 * f_p + f_s + 2 * (size_t)Cp + f_row;
        float *scratch = (float *)aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64);
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            memset(scratch, 0, floats * sizeof(float));
        }
        float *Qb = scratch, *Kt = Qb + f_q, *Ktd = Kt + f_kt, *Vb = Ktd + f_kt, *P = Vb + f_v;
        float *O = P + f_p, *S = O + f_v, *Mt = S + f_s, *qdec = Mt + f_p, *kdec = qdec + Cp, *row = kdec + Cp;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (scratch == NULL) continue;
            const int64_t b = item / Hs, s = item % Hs, hk = s / per_kv;
            const int decayed = log_decay != NULL && log_decay[s] != 0.0f;
            const double lam = log_decay != NULL ? (double)log_decay[s] : 0.0;
            /* the state, z as value column Dv, zero padding after */
            for (int64_t f = 0; f < F; f++) {
                float *sr = S + f * Dp;
                memcpy(sr, s0 + (item * F + f) * Dv, (size_t)Dv * sizeof(float));
                for (int64_t d = Dv; d < Dp; d++) sr[d] = 0.0f;
                if (with_z) sr[Dv] = z0[item * F + f];
            }
            int64_t tables_for = -1; /* the chunk length the decay tables hold */
            const char *kh = (const char *)k + (size_t)(b * k_sb + hk * k_sh) * ks;
            const char *vh = (const char *)v + (size_t)(b * v_sb + hk * v_sh) * vs;
            for (int64_t t0 = 0; t0 < T; t0 += C) {
                const int64_t L = min64(C, T - t0), Lp = pad8(L);
                if (decayed && tables_for != L) {
                    for (int64_t i = 0; i < L; i++) {
                        qdec[i] = (float)exp(lam * (double)(i + 1));
                        kdec[i] = (float)exp(lam * (double)(L - 1 - i));
                        for (int64_t j = 0; j < Lp; j++) Mt[i * Cp + j] = j <= i ? (float)exp(lam * (double)(i - j)) : 0.0f;
                    }
                    tables_for = L;
                }
                /* K^T (feature-mapped) and V with its ones column; pads of a short chunk are 0 */
                if (L < C || Lp != Cp)
                    for (int64_t f = 0; f < F; f++)
                        for (int64_t j = L; j < Cp; j++) Kt[f * Cp + j] = Ktd[f * Cp + j] = 0.0f;
                vf v_check = (vf){0}; /* stays 0 unless a value is inf or NaN (x * 0 is then NaN) */
                for (int64_t j = 0; j < L; j++) {
                    row_to_f32_padded(kh + (size_t)((t0 + j) * k_st) * ks, F, k_dtype, row);
                    map_row(row, F, fmap, fscale);
                    for (int64_t f = 0; f < F; f++) Kt[f * Cp + j] = row[f];
                    if (decayed)
                        for (int64_t f = 0; f < F; f++) Ktd[f * Cp + j] = row[f] * kdec[j];
                    float *vr = Vb + j * Dp;
                    row_to_f32_padded(vh + (size_t)((t0 + j) * v_st) * vs, Dv, v_dtype, vr);
                    for (int64_t d = 0; d < pad8(Dv); d += VL) v_check += ld(vr + d) * 0.0f;
                    for (int64_t d = Dv; d < Dp; d++) vr[d] = 0.0f;
                    if (with_z) vr[Dv] = 1.0f;
                }
                int v_bad = 0;
                for (int l = 0; l < VL; l++) v_bad |= v_check[l] != 0.0f;
                for (int64_t g = 0; g < G; g++) {
                    const int64_t h = s * G + g;
                    const char *qh = (const char *)q + (size_t)(b * q_sb + h * q_sh) * qs;
                    for (int64_t i = 0; i < L; i++) {
                        row_to_f32_padded(qh + (size_t)((t0 + i) * q_st) * qs, F, q_dtype, Qb + i * Fp);
                        map_row(Qb + i * Fp, F, fmap, fscale);
                    }
                    /* O = diag(lambda^(i+1)) Q S */
                    gemm(L, Dp, F, Qb, Fp, S, Dp, O, Dp, decayed ? qdec : NULL, 0, 0);
                    /* P = Q K^T on the lower triangle, times the decay mask; above the diagonal 0 */
                    gemm(L, Lp, F, Qb, Fp, Kt, Cp, P, Cp, NULL, 0, 2);
                    for (int64_t i = 0; i < L; i++) {
                        float *pr = P + i * Cp;
                        if (decayed) {
                            const float *mr = Mt + i * Cp;
                            for (int64_t j = 0; j < pad8(i + 1); j += VL) st(pr + j, ld(pr + j) * ld(mr + j));
                        }
                        const int64_t e = min64(Lp, pad8(min64(L, (i / MR + 1) * MR)));
                        for (int64_t j = i + 1; j < e; j++) pr[j] = 0.0f;
                    }
                    /* O += P V; with a non-finite value in the chunk, row by row over exactly the
                     * tokens each row sees (the blocked product would give rows before it 0 * inf) */
                    if (!v_bad) {
                        gemm(L, Dp, L, P, Cp, Vb, Dp, O, Dp, NULL, 1, 1);
                    } else {
                        for (int64_t i = 0; i < L; i++)
                            for (int64_t j = 0; j <= i; j++) {
                                const vf p = bc(P[i * Cp + j]);
                                for (int64_t d = 0; d < Dp; d += VL) st(O + i * Dp + d, ld(O + i * Dp + d) + p * ld(Vb + j * Dp + d));
                            }
                    }
                    float *oh = out + ((b * H + h) * T + t0) * Dv;
                    for (int64_t i = 0; i < L; i++) {
                        float *orow = O + i * Dp, *dst = oh + i * Dv;
                        if (normalize) {
                            const float inv = 1.0f / (orow[Dv] + eps);
                            for (int64_t d = 0; d < Dv; d++) dst[d] = orow[d] * inv;
                        } else {
                            memcpy(dst, orow, (size_t)Dv * sizeof(float));
                        }
                        if (rms_norm) {
                            float ss = 0.0f;
                            for (int64_t d = 0; d < Dv; d++) ss += dst[d] * dst[d];
                            const float r = 1.0f / sqrtf(ss / (float)Dv + norm_eps);
                            for (int64_t d = 0; d < Dv; d++) dst[d] = dst[d] * r * (norm_w != NULL ? norm_w[d] : 1.0f);
                        }
                    }
                }
                /* S = lambda^L S + (diag(lambda^(L-1-j)) K)^T V */
                if (decayed) {
                    const vf blk = bc((float)exp(lam * (double)L));
                    for (int64_t x = 0; x < F * Dp; x += VL) st(S + x, ld(S + x) * blk);
                }
                gemm(F, Dp, L, decayed ? Ktd : Kt, Cp, Vb, Dp, S, Dp, NULL, 1, 0);
            }
            for (int64_t f = 0; f < F; f++) {
                memcpy(s_out + (item * F + f) * Dv, S + f * Dp, (size_t)Dv * sizeof(float));
                if (with_z) z_out[item * F + f] = S[f * Dp + Dv];
            }
        }
        free(scratch);
    }
    return failed;
}
