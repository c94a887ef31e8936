/* Widening half-precision elements to float32, shared by the native kernels (decode_blocks.c,
 * sparse_prefill.c, linear_chunked.c). Element type codes as in the C ABIs: 0 = float32,
 * 1 = bfloat16, 2 = float16 (longattn.kernels.native.DTYPE_CODES).
 *
 * longattn.kernels.native pastes this file in place of a kernel's `#include "half.h"` before it
 * compiles the kernel, as it does vec8.h.
 */
#ifndef LONGATTN_HALF_H
#define LONGATTN_HALF_H

#include <stdint.h>
#include <string.h>

/* bfloat16 is the top half of a float32: widening is a 16-bit shift */
static inline float bf16_to_f32(uint16_t x) {
    const uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(__FLT16_MAX__) && !defined(LONGATTN_NO_FLOAT16)
/* the compiler knows IEEE half (gcc >= 12, clang): F16C / AVX512-FP16 conversions */
static inline float f16_to_f32(uint16_t x) {
    _Float16 h;
    memcpy(&h, &x, sizeof h);
    return (float)h;
}
#else
/* IEEE half by hand: sign, 5-bit exponent, 10-bit mantissa (subnormals, inf and NaN kept) */
static inline float f16_to_f32(uint16_t x) {
    const uint32_t h = x, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else {
        const float f = (float)man * 5.9604644775390625e-8f; /* man * 2^-24, exact */
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

/* bytes per element of type code `dtype` */
static inline size_t esize(int dtype) { return dtype == 0 ? 4 : 2; }

/* dst[0..D) = float32 of row `src` (element type code `dtype`) */
static inline void row_to_f32(const void *src, int64_t D, int dtype, float *restrict dst) {
    if (dtype == 0) {
        memcpy(dst, src, (size_t)D * sizeof(float));
    } else if (dtype == 1) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t d = 0; d < D; d++) dst[d] = bf16_to_f32(s[d]);
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t d = 0; d < D; d++) dst[d] = f16_to_f32(s[d]);
    }
}

#endif
