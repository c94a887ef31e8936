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
#include <string.h>

/* bfloat16 is the top half of a float32: widening is a 16-bit shift */
static inline float load_bf16(const uint16_t *p, int64_t i) {
    const uint32_t bits = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(__FLT16_MAX__) && !defined(LONGATTN_NO_FLOAT16)
/* the compiler knows IEEE half (gcc >= 12, clang): F16C / AVX512-FP16 conversions */
static inline float load_f16(const uint16_t *p, int64_t i) {
    _Float16 h;
    memcpy(&h, p + i, sizeof h);
    return (float)h;
}
#else
/* IEEE half by hand: sign, 5-bit exponent, 10-bit mantissa (subnormals, inf and NaN kept) */
static inline float load_f16(const uint16_t *p, int64_t i) {
    const uint32_t h = p[i], sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else {
        float f = (float)man * 5.9604644775390625e-8f; /* man * 2^-24 */
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

static inline float load_f32(const float *p, int64_t i) { return p[i]; }

int decode_blocks_abi_version(void) { return 3; }


#define DEFINE_DECODE(NAME, ELEM, LOAD) \
static int decode_blocks_##NAME(const float *q, const ELEM *k, const ELEM *v, const int64_t *blocks, float *out, \
                      float *lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t T, int64_t bs, \
                      int64_t n_sel, int64_t q_sb, int64_t q_sh, int64_t k_sb, int64_t k_sh, int64_t k_st, \
                      int64_t v_sb, int64_t v_sh, int64_t v_st, float scale, int n_threads) { \
    const int64_t group = Hq / Hkv; \
    const int64_t rows = B * Hq; \
    int failed = 0; \
_Pragma("omp parallel num_threads(n_threads)") \
    { \
        float *scratch = (float *)malloc((size_t)(D + bs) * sizeof(float)); \
        if (scratch == NULL) { \
_Pragma("omp atomic write") \
            failed = 1; \
        } \
        float *acc = scratch, *score = scratch + D; \
_Pragma("omp for schedule(static)") \
        for (int64_t row = 0; row < rows; row++) { \
            if (scratch == NULL) continue; \
            const int64_t b = row / Hq, h = row % Hq, hk = h / group; \
            const float *qp = q + b * q_sb + h * q_sh; \
            const ELEM *kh = k + b * k_sb + hk * k_sh; \
            const ELEM *vh = v + b * v_sb + hk * v_sh; \
            const int64_t *sel = blocks + row * n_sel; \
            for (int64_t d = 0; d < D; d++) acc[d] = 0.0f; \
            float m = -INFINITY, l = 0.0f; \
            int nan_seen = 0; \
            for (int64_t i = 0; i < n_sel; i++) { \
                const int64_t j = sel[i]; \
                if (j < 0) continue; \
                const int64_t t0 = j * bs; \
                const int64_t n = (t0 + bs < T ? t0 + bs : T) - t0; \
                if (n <= 0) continue; \
                float block_max = -INFINITY; \
                for (int64_t t = 0; t < n; t++) { \
                    const ELEM *kp = kh + (t0 + t) * k_st; \
                    float dot = 0.0f; \
_Pragma("omp simd reduction(+ : dot)") \
                    for (int64_t d = 0; d < D; d++) dot += qp[d] * LOAD(kp, d); \
                    dot *= scale; \
                    score[t] = dot; \
                    if (dot > block_max) block_max = dot; /* false for NaN: NaN never becomes the max */ \
                } \
                if (block_max == -INFINITY) { \
                    /* every score is -inf or NaN. A NaN among finite scores needs no test here: its \
                     * p = expf(NaN - m_new) turns l and acc NaN below; only a block of nothing but \
                     * NaN / -inf would be skipped silently, so look for NaN on this rare path */ \
                    for (int64_t t = 0; t < n; t++) nan_seen |= isnan(score[t]); \
                    if (nan_seen) break; /* the row is NaN whatever follows */ \
                    continue;            /* -inf everywhere: the block adds nothing */ \
                } \
                const float m_new = block_max > m ? block_max : m; \
                /* m = -inf before the first contributing block: exp(-inf - m_new) is 0, but written \
                 * out so that m_new = -inf can never make it exp(NaN) */ \
                const float keep = m == -INFINITY ? 0.0f : expf(m - m_new); \
                l *= keep; \
                for (int64_t d = 0; d < D; d++) acc[d] *= keep; \
                for (int64_t t = 0; t < n; t++) { \
                    const float p = expf(score[t] - m_new); \
                    const ELEM *vp = vh + (t0 + t) * v_st; \
                    l += p; \
_Pragma("omp simd") \
                    for (int64_t d = 0; d < D; d++) acc[d] += p * LOAD(vp, d); \
                } \
                m = m_new; \
            } \
            float *op = out + row * D; \
            if (nan_seen) { \
                for (int64_t d = 0; d < D; d++) op[d] = NAN; \
                lse[row] = NAN; \
            } else if (m == -INFINITY) { \
                for (int64_t d = 0; d < D; d++) op[d] = 0.0f; \
                lse[row] = -INFINITY; \
            } else { /* +inf scores or non-finite values propagate through acc / l as IEEE says */ \
                const float inv = 1.0f / l; \
                for (int64_t d = 0; d < D; d++) op[d] = acc[d] * inv; \
                lse[row] = m + logf(l); \
            } \
        } \
        free(scratch); \
    } \
    return failed; \
}

DEFINE_DECODE(f32, float, load_f32)
DEFINE_DECODE(bf16, uint16_t, load_bf16)
DEFINE_DECODE(f16, uint16_t, load_f16)

/* kv_dtype: 0 float32, 1 bfloat16, 2 float16; returns 0, 1 (scratch allocation failed) or 2 (bad kv_dtype) */
int decode_blocks(const float *q, const void *k, const void *v, const int64_t *blocks, float *out, float *lse,
                  int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t T, int64_t bs, int64_t n_sel, int64_t q_sb,
                  int64_t q_sh, int64_t k_sb, int64_t k_sh, int64_t k_st, int64_t v_sb, int64_t v_sh, int64_t v_st,
                  float scale, int n_threads, int kv_dtype) {
    switch (kv_dtype) {
    case 0:
        return decode_blocks_f32(q, (const float *)k, (const float *)v, blocks, out, lse, B, Hq, Hkv, D, T, bs, n_sel,
                                 q_sb, q_sh, k_sb, k_sh, k_st, v_sb, v_sh, v_st, scale, n_threads);
    case 1:
        return decode_blocks_bf16(q, (const uint16_t *)k, (const uint16_t *)v, blocks, out, lse, B, Hq, Hkv, D, T, bs,
                                  n_sel, q_sb, q_sh, k_sb, k_sh, k_st, v_sb, v_sh, v_st, scale, n_threads);
    case 2:
        return decode_blocks_f16(q, (const uint16_t *)k, (const uint16_t *)v, blocks, out, lse, B, Hq, Hkv, D, T, bs,
                                 n_sel, q_sb, q_sh, k_sb, k_sh, k_st, v_sb, v_sh, v_st, scale, n_threads);
    default:
        return 2;
    }
}
