// The k-quant kernels in plain C++, included by each instruction set's translation unit
// (kquant_portable.cpp, kquant_avx2.cpp, kquant_avx512.cpp), which the compiler vectorizes
// with that unit's flags. The AVX-512 unit replaces dot_q8 with VNNI intrinsics.
// Defines, in an anonymous namespace: dot_f32, dot_q8_generic, dequantize, quantize_x (kquant_kernels.h);
// a unit may replace any of them with its own ([[maybe_unused]]: then no warning).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "kquant_kernels.h"

namespace {

using tiny_llm::kq::Q8;
using tiny_llm::kq::QK;
using tiny_llm::kq::Rows;
using tiny_llm::kq::Type;

inline float f16(const uint8_t* p) {  // a little-endian IEEE half
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0) return std::copysign(std::ldexp(float(man), -24), sign ? -1.0f : 1.0f);  // 0, subnormal
  const uint32_t u = sign | (exp == 31 ? 0x7f800000u : (exp + 112) << 23) | man << 13;   // inf/NaN, normal
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Q4_K's 12 bytes -> sc[0..7], m[0..7] (6 bits each): sub-blocks 0-3 in the low 6 bits of bytes
// 0-3 (sc) and 4-7 (m); 4-7 in the nibbles of bytes 8-11 plus the top 2 bits of bytes 0-7.
inline void q4k_scales(const uint8_t* s, uint8_t* sc, uint8_t* m) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    m[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 15) | (s[j] >> 6) << 4;
    m[j + 4] = (s[j + 8] >> 4) | (s[j + 4] >> 6) << 4;
  }
}

// Q4_K's q (0..15) in value order: per 64 values, the 32 low nibbles of 32 bytes, then their high ones.
inline void q4k_ints(const uint8_t* b, uint8_t* q) {
  const uint8_t* qs = b + 16;
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) {
      q[64 * c + l] = qs[32 * c + l] & 15;
      q[64 * c + 32 + l] = qs[32 * c + l] >> 4;
    }
}

// Q6_K's q (0..63) in value order: per half of 128, value 32k + l has the low nibble of ql[l]
// (k = 0), ql[l + 32] (1), the high nibble of ql[l] (2), of ql[l + 32] (3), and bits 2k, 2k+1 of qh[l].
inline void q6k_ints(const uint8_t* b, uint8_t* q) {
  for (int h = 0; h < 2; ++h) {
    const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
    uint8_t* o = q + 128 * h;
    for (int l = 0; l < 32; ++l) {
      o[l] = (ql[l] & 15) | (qh[l] & 3) << 4;
      o[l + 32] = (ql[l + 32] & 15) | (qh[l] >> 2 & 3) << 4;
      o[l + 64] = (ql[l] >> 4) | (qh[l] >> 4 & 3) << 4;
      o[l + 96] = (ql[l + 32] >> 4) | (qh[l] >> 6 & 3) << 4;
    }
  }
}

// One block -> 256 fp32 weights, llama.cpp's values: (d sc) q - (dmin m), (d sc) (q - 32); exact.
inline void decode_block(Type t, const uint8_t* b, float* w) {
  alignas(64) uint8_t q[QK];
  if (t == Type::q4_k) {
    const float d = f16(b), dmin = f16(b + 2);
    uint8_t sc[8], m[8];
    q4k_scales(b + 4, sc, m);
    q4k_ints(b, q);
    for (int j = 0; j < 8; ++j) {
      const float s = d * float(sc[j]), bias = -(dmin * float(m[j]));
      for (int i = 0; i < 32; ++i) w[32 * j + i] = float(q[32 * j + i]) * s + bias;
    }
  } else {
    const float d = f16(b + 208);
    const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
    q6k_ints(b, q);
    for (int j = 0; j < 16; ++j) {
      const float s = d * float(sc[j]);
      for (int i = 0; i < 16; ++i) w[16 * j + i] = s * float(int(q[16 * j + i]) - 32);
    }
  }
}

constexpr int kLanes = 16;  // fp32 partial sums a row keeps: sums over i = l mod 16, added pairwise at the end
constexpr int kRows = 8;    // rows of x a decoded block serves before the next block

inline float sum_lanes(float* a) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  return a[0];
}

[[maybe_unused]] void dot_f32(const Rows& W, int n0, int n1, const float* x, int M, float* y, long ldy) {
  const int nb = W.K / QK;
  const size_t bb = tiny_llm::kq::block_bytes(W.type);
  alignas(64) float w[QK];
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = W.w + size_t(n) * W.row_bytes;
    for (int m0 = 0; m0 < M; m0 += kRows) {
      const int mr = std::min(kRows, M - m0);
      alignas(64) float acc[kRows][kLanes] = {};
      for (int b = 0; b < nb; ++b) {
        decode_block(W.type, row + b * bb, w);
        for (int r = 0; r < mr; ++r) {
          const float* xr = x + size_t(m0 + r) * W.K + b * QK;
          for (int i = 0; i < QK; i += kLanes)
            for (int l = 0; l < kLanes; ++l) acc[r][l] += w[i + l] * xr[i + l];
        }
      }
      for (int r = 0; r < mr; ++r) y[size_t(m0 + r) * ldy + n] = sum_lanes(acc[r]);
    }
  }
}

// int8 mode in integers: sum_i q_i xq_i per sub-block times its 6/8-bit scale, exact in int32;
// the mins (Q4_K) and the -32 (Q6_K) through the sub-block sums of xq (Q8::bs).
[[maybe_unused]] void dot_q8_generic(const Rows& W, int n0, int n1, const Q8& X, int M, float* y, long ldy) {
  const int nb = W.K / QK;
  const size_t bb = tiny_llm::kq::block_bytes(W.type);
  alignas(64) uint8_t q[QK];
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = W.w + size_t(n) * W.row_bytes;
    for (int m0 = 0; m0 < M; m0 += kRows) {
      const int mr = std::min(kRows, M - m0);
      float acc[kRows] = {};
      for (int b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bb;
        const bool q4 = W.type == Type::q4_k;
        uint8_t sc4[8], m4[8];
        if (q4) {
          q4k_scales(blk + 4, sc4, m4);
          q4k_ints(blk, q);
        } else {
          q6k_ints(blk, q);
        }
        const auto* sc6 = reinterpret_cast<const int8_t*>(blk + 192);
        const int sub = q4 ? 32 : 16, nsub = QK / sub;
        for (int r = 0; r < mr; ++r) {
          const size_t xb = size_t(m0 + r) * nb + b;
          const int8_t* xq = X.q + xb * QK;
          const int16_t* bs = X.bs + xb * 32;
          int32_t sumi = 0, sumb = 0;
          for (int j = 0; j < nsub; ++j) {
            int32_t s = 0;
            for (int i = 0; i < sub; ++i) s += int32_t(q[sub * j + i]) * xq[sub * j + i];
            sumi += (q4 ? int32_t(sc4[j]) : int32_t(sc6[j])) * s;
            sumb += q4 ? int32_t(m4[j]) * bs[24 + j] : int32_t(sc6[j]) * bs[j];
          }
          const float dx = X.d[xb];
          if (q4) {
            acc[r] += f16(blk) * dx * float(sumi) - f16(blk + 2) * dx * float(sumb);
          } else {
            acc[r] += f16(blk + 208) * dx * float(sumi - 32 * sumb);
          }
        }
      }
      for (int r = 0; r < mr; ++r) y[size_t(m0 + r) * ldy + n] = acc[r];
    }
  }
}

[[maybe_unused]] void dequantize(const Rows& W, int n0, int n1, float* out) {
  const int nb = W.K / QK;
  const size_t bb = tiny_llm::kq::block_bytes(W.type);
  for (int n = n0; n < n1; ++n)
    for (int b = 0; b < nb; ++b)
      decode_block(W.type, W.w + size_t(n) * W.row_bytes + b * bb, out + size_t(n - n0) * W.K + b * QK);
}

// Q8 of one row: d = max|x| / 127 per block, q = round(x / d) (nearest, ties to even, as
// std::nearbyint in the default rounding mode); the twin (impl.kquant.quantize_x_int8) rounds alike.
// Unused where a unit has its own (AVX-512's quantize_x_avx512): [[maybe_unused]] for -Werror.
[[maybe_unused]] void quantize_x(const float* x, int K, int8_t* q, int8_t* qp, float* d, int16_t* bs) {
  for (int b = 0; b < K / QK; ++b, x += QK, q += QK, qp += QK, bs += 32) {
    float amax = 0.0f;
    for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float db = amax / 127.0f;
    d[b] = db;
    for (int i = 0; i < QK; ++i)
      q[i] = db == 0.0f ? 0 : int8_t(std::fmin(127.0f, std::fmax(-127.0f, std::nearbyint(x[i] / db))));
    for (int h = 0; h < QK; h += 128)  // Q4_K's order: per 128, values 0-31, 64-95, 32-63, 96-127
      for (int l = 0; l < 32; ++l) {
        qp[h + l] = q[h + l], qp[h + 32 + l] = q[h + 64 + l];
        qp[h + 64 + l] = q[h + 32 + l], qp[h + 96 + l] = q[h + 96 + l];
      }
    for (int j = 0; j < 16; ++j) {
      int s = 0;
      for (int i = 0; i < 16; ++i) s += q[16 * j + i];
      bs[j] = int16_t(s);
    }
    for (int j = 0; j < 8; ++j) bs[16 + j] = 0, bs[24 + j] = int16_t(bs[2 * j] + bs[2 * j + 1]);
  }
}

}  // namespace
