// The avx512 SIMD vector type V shared by the flash attention and paged attention kernels
// (each including TU keeps its own copy, with internal linkage; the TU's compile flags decide
// contraction), with half_to_float / float_to_half and V::exp2.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's avx512fintrin.h builds its "undefined" vectors from an uninitialized
// variable, which -Wall reports wherever those intrinsics inline (a false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>

namespace {

// 2^x for x <= 0 (clamped to [-127, 127]): 2^n by building the exponent bits, times
// 2^f for f = x - n in [-0.5, 0.5] by its Taylor series to degree 7 (error ~5e-9,
// below fp32's 6e-8 ulp). x <= -126.5 gives exactly 0 (n = -127 is a zero exponent
// field): a masked score, -inf, becomes a weight of 0 and no denormal is ever made.
constexpr float kExp2Poly[8] = {1.0f, 0.6931471805599453f, 0.2402265069591007f, 0.05550410866482158f,
                                0.009618129107628477f, 0.0013333558146428443f, 1.5403530393381608e-4f,
                                1.5252733804059841e-5f};

struct V {
  static constexpr int L = 16, RB = 6, NV = 4;
  __m512 v;
  static V zero() { return {_mm512_setzero_ps()}; }
  static V set1(float a) { return {_mm512_set1_ps(a)}; }
  static V load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a.v); }
  static V fma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static V add(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
  static V sub(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
  static V mul(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static V max(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
  static float hmax(V a) { return _mm512_reduce_max_ps(a.v); }
  static float hsum(V a) { return _mm512_reduce_add_ps(a.v); }
  // Lane j = hsum(a[j]), for 16 vectors at once: add pairs within 128-bit blocks, then
  // fours, then across blocks (45 shuffles and adds where 16 hsums take ~140). Always inlined:
  // GCC kept it out of line, so the caller's 16 accumulators went through the stack (paged
  // decode attention: 23 -> 19-20 ns of CPU a key and kv head).
  [[gnu::always_inline]] static V sum_lanes(const V* a) {
    __m512 two[8], four[4];
    for (int i = 0; i < 8; ++i)  // block g: [x0+x2, y0+y2, x1+x3, y1+y3] of a[2i] = x, a[2i+1] = y
      two[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i].v, a[2 * i + 1].v),
                             _mm512_unpackhi_ps(a[2 * i].v, a[2 * i + 1].v));
    for (int i = 0; i < 4; ++i)  // block g: a[4i + k]'s sum over block g, k = 0..3
      four[i] = _mm512_add_ps(_mm512_shuffle_ps(two[2 * i], two[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_ps(two[2 * i], two[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(four[0], four[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(four[0], four[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(four[2], four[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(four[2], four[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return {_mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)))};
  }
  static V exp2(V x);  // below
  static V load_f16(const uint16_t* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static V load_bf16(const uint16_t* p) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(u, 16))};
  }
  static int f16_n(const uint16_t* src, float* dst, int n) {
    int i = 0;
    for (; i + L <= n; i += L)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
    return i;
  }
  static int bf16_n(const uint16_t* src, float* dst, int n) {
    int i = 0;
    for (; i + L <= n; i += L) {
      const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)));
    }
    return i;
  }
};

float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
uint16_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

V V::exp2(V a) {
  // Constants first: max/min return their second operand when either is NaN, so NaN stays NaN.
  const __m512 x = _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-127.0f), a.v));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 r = _mm512_set1_ps(kExp2Poly[7]);
  for (int i = 6; i >= 0; --i) r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(kExp2Poly[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return {_mm512_mul_ps(r, _mm512_castsi512_ps(e))};
}

}  // namespace
