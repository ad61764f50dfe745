// The avx2 SIMD vector type V shared by the flash attention and paged attention kernels
// (each including TU keeps its own copy, with internal linkage; the TU's compile flags decide
// contraction), with half_to_float / float_to_half and V::exp2.
#pragma once

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
  static constexpr int L = 8, RB = 4, NV = 2;
  __m256 v;
  static V zero() { return {_mm256_setzero_ps()}; }
  static V set1(float a) { return {_mm256_set1_ps(a)}; }
  static V load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a.v); }
  static V fma(V a, V b, V c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static V add(V a, V b) { return {_mm256_add_ps(a.v, b.v)}; }
  static V sub(V a, V b) { return {_mm256_sub_ps(a.v, b.v)}; }
  static V mul(V a, V b) { return {_mm256_mul_ps(a.v, b.v)}; }
  static V max(V a, V b) { return {_mm256_max_ps(a.v, b.v)}; }
  static float hmax(V a) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  static float hsum(V a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  // Lane j = hsum(a[j]), for 8 vectors at once: pairwise hadds within 128-bit halves, then
  // the two halves added. Always inlined, as AVX-512's.
  [[gnu::always_inline]] static V sum_lanes(const V* a) {
    const __m256 lo4 = _mm256_hadd_ps(_mm256_hadd_ps(a[0].v, a[1].v), _mm256_hadd_ps(a[2].v, a[3].v));
    const __m256 hi4 = _mm256_hadd_ps(_mm256_hadd_ps(a[4].v, a[5].v), _mm256_hadd_ps(a[6].v, a[7].v));
    return {_mm256_add_ps(_mm256_permute2f128_ps(lo4, hi4, 0x20), _mm256_permute2f128_ps(lo4, hi4, 0x31))};
  }
  static V exp2(V x);  // below
  static V load_f16(const uint16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static V load_bf16(const uint16_t* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(u, 16))};
  }
  static int f16_n(const uint16_t* src, float* dst, int n) {
    int i = 0;
    for (; i + L <= n; i += L)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    return i;
  }
  static int bf16_n(const uint16_t* src, float* dst, int n) {
    int i = 0;
    for (; i + L <= n; i += L) {
      const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)));
    }
    return i;
  }
};

float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
uint16_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

V V::exp2(V a) {
  // Constants first: max/min return their second operand when either is NaN, so NaN stays NaN.
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), a.v));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 r = _mm256_set1_ps(kExp2Poly[7]);
  for (int i = 6; i >= 0; --i) r = _mm256_fmadd_ps(r, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(r, _mm256_castsi256_ps(e))};
}

}  // namespace
