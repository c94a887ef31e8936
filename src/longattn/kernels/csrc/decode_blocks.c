/* Fused decode step over selected key blocks (longattn.kernels.native.decode_blocks).
 *
 * One query per (batch, query head) attends exactly to the keys of a list of whole key blocks of
 * its key-value head, read in place from the cache: no gathered copy of the selected keys and
 * values is ever written. Per block the scores are computed first (the block's keys stream from
 * memory once), then an online softmax folds the block into a running maximum, normaliser and
 * value accumulator; the row ends with out = acc / l and lse = m + log(l).
 *
 * Layout: q [B, Hq, 1, D]; k, v [B, Hkv, T, D] with the last dimension contiguous (strides are
 * given in elements for the batch, head and token axes); blocks [B, Hq, n_sel] int64 block
 * indices, -1 for an unused slot; block j holds tokens [j*bs, min((j+1)*bs, T)).
 * Query head h reads key-value head h / (Hq / Hkv) (GQA). out [B, Hq, D] and lse [B, Hq] are
 * contiguous. A row that selects no keys (or whose every score is -inf) gets out = 0 and
 * lse = -inf; a NaN score makes the row NaN (IEEE, as the float64 reference), never "no keys".
 *
 * Scratch (the value accumulator and one block's scores) lives on the heap, one buffer per
 * thread: OpenMP worker stacks can be small (OMP_STACKSIZE), and a 16k-token block of scores on
 * the stack overflowed them. The function returns 0, or 1 when that buffer cannot be allocated
 * (the caller then takes its torch path).
 *
 * Threads: rows are split over `n_threads` OpenMP threads (torch's own libgomp when torch is
 * loaded first: the shared object names libgomp.so.1, which the loader resolves to the copy
 * already in the process).
 */
#include <math.h>
#include <stdint.h>

#include <stdlib.h>

int decode_blocks_abi_version(void) { return 2; }

int decode_blocks_f32(const float *q, const float *k, const float *v, const int64_t *blocks, float *out,
                      float *lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t T, int64_t bs,
                      int64_t n_sel, int64_t q_sb, int64_t q_sh, int64_t k_sb, int64_t k_sh, int64_t k_st,
                      int64_t v_sb, int64_t v_sh, int64_t v_st, float scale, int n_threads) {
    const int64_t group = Hq / Hkv;
    const int64_t rows = B * Hq;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *scratch = (float *)malloc((size_t)(D + bs) * sizeof(float));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        float *acc = scratch, *score = scratch + D;
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            if (scratch == NULL) continue;
            const int64_t b = row / Hq, h = row % Hq, hk = h / group;
            const float *qp = q + b * q_sb + h * q_sh;
            const float *kh = k + b * k_sb + hk * k_sh;
            const float *vh = v + b * v_sb + hk * v_sh;
            const int64_t *sel = blocks + row * n_sel;
            for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
            float m = -INFINITY, l = 0.0f;
            int nan_seen = 0;
            for (int64_t i = 0; i < n_sel; i++) {
                const int64_t j = sel[i];
                if (j < 0) continue;
                const int64_t t0 = j * bs;
                const int64_t n = (t0 + bs < T ? t0 + bs : T) - t0;
                if (n <= 0) continue;
                float block_max = -INFINITY;
                for (int64_t t = 0; t < n; t++) {
                    const float *kp = kh + (t0 + t) * k_st;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; d++) dot += qp[d] * kp[d];
                    dot *= scale;
                    score[t] = dot;
                    if (dot > block_max) block_max = dot; /* false for NaN: NaN never becomes the max */
                }
                if (block_max == -INFINITY) {
                    /* every score is -inf or NaN. A NaN among finite scores needs no test here: its
                     * p = expf(NaN - m_new) turns l and acc NaN below; only a block of nothing but
                     * NaN / -inf would be skipped silently, so look for NaN on this rare path */
                    for (int64_t t = 0; t < n; t++) nan_seen |= isnan(score[t]);
                    if (nan_seen) break; /* the row is NaN whatever follows */
                    continue;            /* -inf everywhere: the block adds nothing */
                }
                const float m_new = block_max > m ? block_max : m;
                /* m = -inf before the first contributing block: exp(-inf - m_new) is 0, but written
                 * out so that m_new = -inf can never make it exp(NaN) */
                const float keep = m == -INFINITY ? 0.0f : expf(m - m_new);
                l *= keep;
                for (int64_t d = 0; d < D; d++) acc[d] *= keep;
                for (int64_t t = 0; t < n; t++) {
                    const float p = expf(score[t] - m_new);
                    const float *vp = vh + (t0 + t) * v_st;
                    l += p;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) acc[d] += p * vp[d];
                }
                m = m_new;
            }
            float *op = out + row * D;
            if (nan_seen) {
                for (int64_t d = 0; d < D; d++) op[d] = NAN;
                lse[row] = NAN;
            } else if (m == -INFINITY) {
                for (int64_t d = 0; d < D; d++) op[d] = 0.0f;
                lse[row] = -INFINITY;
            } else { /* +inf scores or non-finite values propagate through acc / l as IEEE says */
                const float inv = 1.0f / l;
                for (int64_t d = 0; d < D; d++) op[d] = acc[d] * inv;
                lse[row] = m + logf(l);
            }
        }
        free(scratch);
    }
    return failed;
}
