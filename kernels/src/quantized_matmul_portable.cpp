// The portable kernels: plain C++ over 4-float vectors (the compiler vectorizes
// them for the baseline ISA: SSE2 on x86-64, NEON on arm64). The fallback on
// CPUs without AVX2, and the only path on non-x86 builds.
#include <cstdint>
#include <cstring>

#include "quantized_matmul_kernels.h"

namespace {

struct V {
  static constexpr int L = 4;
  static constexpr bool kTable = false;
  static V table(float s, float b);                    // declared for the shared code, never called
  static V table_bf16(float s, float b);
  static void lookup4(const uint8_t* p, V t, V& lo, V& hi);
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
  static V fma(V a, V b, V c) {  // one rounding where the target has FMA, two else; the
    V r;                         // TU is built with -ffp-contract=off, so always the same
    for (int i = 0; i < L; ++i) {
#ifdef __FP_FAST_FMAF
      r.v[i] = __builtin_fmaf(a.v[i], b.v[i], c.v[i]);
#else
      r.v[i] = a.v[i] * b.v[i] + c.v[i];
#endif
    }
    return r;
  }
  static V add(V a, V b) {
    V r;
    for (int i = 0; i < L; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  static V mul_add(V a, V b, V c) {  // two roundings (the TU is built with -ffp-contract=off)
    V r;
    for (int i = 0; i < L; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static V round_bf16(V a) {  // to the nearest bf16, ties to even; NaN stays NaN (made quiet)
    V r;
    for (int i = 0; i < L; ++i) {
      uint32_t u;
      std::memcpy(&u, &a.v[i], 4);
      u = (u & 0x7fffffffu) > 0x7f800000u ? (u & 0xffff0000u) | 0x400000u : (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
      std::memcpy(&r.v[i], &u, 4);
    }
    return r;
  }
  static float hsum(V a) { return (a.v[0] + a.v[2]) + (a.v[1] + a.v[3]); }
  static void unpack4(const uint8_t* p, V& lo, V& hi) {  // L bytes -> 2L values
    for (int i = 0; i < L; ++i) {
      lo.v[i] = float(p[i] & 15);
      hi.v[i] = float(p[i] >> 4);
    }
  }
  static V unpack8(const uint8_t* p) {
    V r;
    for (int i = 0; i < L; ++i) r.v[i] = float(p[i]);
    return r;
  }
};

float half_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    float f = float(mant) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, 4);
    u |= sign;
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_half(float f) {  // round to nearest even, like F16C
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00;  // NaN
  if (u >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to infinity
  if (u < 0x38800000u) {                      // below 2^-14: subnormal half
    // Adding 0.5 puts the 2^-24 unit in the last mantissa bit; the FPU rounds.
    float a;
    std::memcpy(&a, &u, 4);
    a += 0.5f;
    uint32_t r;
    std::memcpy(&r, &a, 4);
    return sign | uint16_t(r - 0x3f000000u);
  }
  u += 0xc8000fffu + ((u >> 13) & 1);  // rebias exponent 127 -> 15, round to nearest even
  return sign | uint16_t(u >> 13);
}

void halves_to_f32(const uint16_t* h, float* dst, long n) {
  for (long i = 0; i < n; ++i) dst[i] = half_to_f32(h[i]);
}

}  // namespace

#include "quantized_matmul_kernels_impl.h"

namespace tiny_llm::qmm {

const Isa& isa_portable() {
  // Panels from M = 16 (GFLOPS fused/panel, 576x576, group 32): M = 16: 25/34; M = 512: 26/45.
  static const Isa isa{"portable", 2 * V::L, 16, fused, dequantize_panel, panel, to_f32_scalar, from_f32_scalar,
                       fused_bf16, dequantize_panel_bf16, round_bf16};
  return isa;
}

#if !(defined(__x86_64__) || defined(_M_X64))
const Isa* isa_avx2() { return nullptr; }
const Isa* isa_avx512() { return nullptr; }
const Bf16Kernels* bf16_avx512() { return nullptr; }
#endif

}  // namespace tiny_llm::qmm
