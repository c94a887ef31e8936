/* Eight-float vectors shared by the native kernels (decode_blocks.c, sparse_prefill.c,
 * linear_chunked.c): GCC/Clang vector extensions, which compile everywhere, with the AVX
 * intrinsic where the build has it.
 *
 * longattn.kernels.native pastes this file in place of a kernel's `#include "vec8.h"` before it
 * compiles the kernel (the build compiles one file in its cache folder, and the key of a build,
 * a hash of the source, then covers this header too).
 */
#ifndef LONGATTN_VEC8_H
#define LONGATTN_VEC8_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));

#define VL 8 /* floats per vector */

static inline vf ld(const float *p) {
    vf r;
    memcpy(&r, p, sizeof r);
    return r;
}
static inline void st(float *p, vf x) { memcpy(p, &x, sizeof x); }
static inline vf bc(float x) { return (vf){x, x, x, x, x, x, x, x}; }
static inline vf sel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
/* a > b ? a : b, lane-wise: a NaN in a (or b) yields b. Written with the intrinsic where there is
 * one: gcc does not turn the portable select into vmaxps (2 instructions instead of 1). */
#if defined(__AVX__)
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline vf vmax(vf a, vf b) { return sel(a > b, a, b); }
#endif

/* e^x for x <= 0, -inf (-> 0) or NaN (-> NaN); other inputs are never passed (scores minus a
 * maximum that is at least every non-NaN score). Range reduction x = n ln2 + r, |r| <= ln2/2,
 * then a degree-6 polynomial fitted for relative error on that interval (max 2e-9 in exact
 * arithmetic, ~1e-7 evaluated in float32), scaled by 2^n built in the exponent bits. x is first
 * raised to -88, where n = -127 makes the scale's bits 0, so e^x under about e^-87.7 (below
 * FLT_MIN, and -inf) comes out as exactly 0 with no extra test; a NaN passes the raise (vmax keeps
 * its second operand) and stays NaN through p * 2^n. */
static inline vf vexp(vf x) {
    const vf xc = vmax(bc(-88.0f), x);
    const vf magic = bc(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vi bias = {0x4B400000 - 127, 0x4B400000 - 127, 0x4B400000 - 127, 0x4B400000 - 127,
                     0x4B400000 - 127, 0x4B400000 - 127, 0x4B400000 - 127, 0x4B400000 - 127};
    const vf t = xc * 1.44269504088896341f + magic;
    const vf n = t - magic;
    const vi e = ((vi)t - bias) << 23; /* (n + 127) << 23: the float 2^n */
    vf r = xc - n * 0.693359375f;      /* ln2 split: the high part has 10 bits, n * it is exact */
    r = r - n * -2.12194440e-4f;
    vf p = bc(0.0013836845755577087f);
    p = p * r + 0.008374815806746483f;
    p = p * r + 0.04166822507977486f;
    p = p * r + 0.16666419804096222f;
    p = p * r + 0.49999991059303284f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (vf)e;
}

/* y[i] = e^x[i] through vexp, for the kernels' exported accuracy probes: x <= 0, -inf or NaN.
 * The tail past a multiple of 8 goes through a padded vector. */
static inline void vexp_array(const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) st(y + i, vexp(ld(x + i)));
    if (i < n) {
        float buf[VL] = {0};
        memcpy(buf, x + i, (size_t)(n - i) * sizeof(float));
        st(buf, vexp(ld(buf)));
        memcpy(y + i, buf, (size_t)(n - i) * sizeof(float));
    }
}

#endif
