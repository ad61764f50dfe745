// The portable SIMD vector type V shared by the flash attention and paged attention kernels
// (each including TU keeps its own copy, with internal linkage; the TU's compile flags decide
// contraction), with half_to_float / float_to_half and V::exp2.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// 2^x for x <= 0 (clamped to [-127, 127]): 2^n by building the exponent bits, times
// 2^f for f = x - n in [-0.5, 0.5] by its Taylor series to degree 7 (error ~5e-9,
// below fp32's 6e-8 ulp). x <= -126.5 gives exactly 0 (n = -127 is a zero exponent
// field): a masked score, -inf, becomes a weight of 0 and no denormal is ever made.
constexpr float kExp2Poly[8] = {1.0f, 0.6931471805599453f, 0.2402265069591007f, 0.05550410866482158f,
                                0.009618129107628477f, 0.0013333558146428443f, 1.5403530393381608e-4f,
                                1.5252733804059841e-5f};

float half_to_float(uint16_t h);  // below

struct V {
  static constexpr int L = 8, RB = 4, NV = 2;
  float v[L];
  static V zero() { return set1(0.0f); }
  static V set1(float a) {
    V r;
    for (int i = 0; i < L; ++i) r.v[i] = a;
    return r;
  }
  static V load(const float* p) {
    V r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static void store(float* p, V a) { std::memcpy(p, a.v, sizeof(a.v)); }
  template <class F>
  static V map(V a, V b, F f) {
    V r;
    for (int i = 0; i < L; ++i) r.v[i] = f(a.v[i], b.v[i]);
    return r;
  }
  static V fma(V a, V b, V c) {  // a * b + c: one FMA where the TU's flags let the compiler contract it; two roundings under -ffp-contract=off (paged attention's TUs)
    V r;
    for (int i = 0; i < L; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static V add(V a, V b) { return map(a, b, [](float x, float y) { return x + y; }); }
  static V sub(V a, V b) { return map(a, b, [](float x, float y) { return x - y; }); }
  static V mul(V a, V b) { return map(a, b, [](float x, float y) { return x * y; }); }
  static V max(V a, V b) { return map(a, b, [](float x, float y) { return x > y ? x : y; }); }
  static float hmax(V a) {
    float m = a.v[0];
    for (int i = 1; i < L; ++i) m = a.v[i] > m ? a.v[i] : m;
    return m;
  }
  static float hsum(V a) {
    float s = 0.0f;
    for (int i = 0; i < L; ++i) s += a.v[i];
    return s;
  }
  static V sum_lanes(const V* a) {  // lane j = hsum(a[j])
    V r;
    for (int j = 0; j < L; ++j) r.v[j] = hsum(a[j]);
    return r;
  }
  static V exp2(V x);  // below
  static V load_f16(const uint16_t* p) {
    V r;
    for (int i = 0; i < L; ++i) r.v[i] = half_to_float(p[i]);
    return r;
  }
  static V load_bf16(const uint16_t* p) {
    V r;
    for (int i = 0; i < L; ++i) {
      const uint32_t u = uint32_t(p[i]) << 16;
      std::memcpy(&r.v[i], &u, 4);
    }
    return r;
  }
  static int f16_n(const uint16_t*, float*, int) { return 0; }  // the scalar tail does it all
  static int bf16_n(const uint16_t*, float*, int) { return 0; }
};

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float f = float(mant) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, 4);
    u |= sign;
  } else if (exp == 31) {  // inf, NaN
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_half(float f) {  // round to nearest even, as F16C does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (u >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (u < 0x38800000u) {                        // below 2^-14: a subnormal half, in units of 2^-24
    float a;
    std::memcpy(&a, &u, 4);
    return sign | uint16_t(std::nearbyint(a * 16777216.0f));  // exact scaling, then round to even
  }
  u += 0xfffu + ((u >> 13) & 1u);  // round the 13 dropped bits to nearest even
  return sign | uint16_t((u - (112u << 23)) >> 13);  // rebias 127 -> 15
}

V V::exp2(V a) {
  V r;
  for (int i = 0; i < L; ++i) {
    if (std::isnan(a.v[i])) {  // NaN in, NaN out (fmax would drop it; int(NaN) is undefined)
      r.v[i] = a.v[i];
      continue;
    }
    const float xi = std::fmin(std::fmax(a.v[i], -127.0f), 127.0f);
    const float n = std::nearbyint(xi), f = xi - n;
    float p = kExp2Poly[7];
    for (int k = 6; k >= 0; --k) p = p * f + kExp2Poly[k];
    const uint32_t bits = uint32_t(int(n) + 127) << 23;  // 2^n; n = -127: 0
    float scale;
    std::memcpy(&scale, &bits, 4);
    r.v[i] = p * scale;
  }
  return r;
}

}  // namespace
