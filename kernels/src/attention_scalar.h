// Scalar pieces shared by the flash and paged attention kernels (internal linkage, as theirs):
// log2(e) for the exp2-based softmax, infinity, and bf16 <-> fp32 conversions.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr float kLog2e = 1.44269504088896340736f;
constexpr float kInf = std::numeric_limits<float>::infinity();

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace
