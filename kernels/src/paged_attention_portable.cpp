// The portable paged attention kernel: plain C++ over 8-float vectors (flash_attention_portable.cpp's
// vector type, a copy), compiled with -ffp-contract=off, so V::fma is a multiply then an add
// everywhere. The fallback on CPUs without AVX2, and the only path on non-x86 builds.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "paged_attention_kernels.h"

namespace {

float half_to_float(uint16_t h);  // below

struct V {
  static constexpr int L = 8, RB = 4, NV = 2, SR = 2;
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
  static V fma(V a, V b, V c) {  // a * b + c, two roundings (-ffp-contract=off): the same on every target
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
  static V exp2(V x);  // below, after kExp2Poly
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

}  // namespace

#include "paged_attention_impl.h"

namespace {

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

namespace tiny_llm::pa {

const Isa& isa_portable() {
  static const Isa isa{"portable", attend, merge};
  return isa;
}

#if !(defined(__x86_64__) || defined(_M_X64))
const Isa* isa_avx2() { return nullptr; }
const Isa* isa_avx512() { return nullptr; }
#endif

}  // namespace tiny_llm::pa
