// The kernels, written once over a SIMD vector type. Each instruction-set
// translation unit defines, before including this file:
//   struct V  -- L floats: zero, set1, load, store, fma, add, hsum, unpack4, unpack8,
//                mul_add (a * b, then + c: two roundings, never fused), round_bf16 (each
//                value to the nearest bf16, ties to even, NaN kept), and where kTable:
//                table, table_bf16, lookup4
//   float half_to_f32(uint16_t), uint16_t f32_to_half(float)  (round to nearest even)
//   void halves_to_f32(const uint16_t*, float*, long n)       (bulk fp16 -> fp32)
// Everything here has internal linkage: each TU compiles its own copy with its
// own flags, and the linker can never hand the portable TU an AVX-512 body.
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "quantized_matmul_kernels.h"

namespace {

using tiny_llm::qmm::DType;
using tiny_llm::qmm::Weights;

struct F16 { uint16_t bits; };
struct BF16 { uint16_t bits; };

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(float v) { return v; }
inline float to_float(F16 v) { return half_to_f32(v.bits); }
inline float to_float(BF16 v) { return bits_to_f32(uint32_t(v.bits) << 16); }

// bf16 keeps the top 16 bits of an fp32, rounded to nearest even (NaN stays NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Scales and biases of NB consecutive rows ((NB, G), contiguous) as fp32: fp16 is
// converted in bulk (F16C where the TU has it), fp32 is used in place.
template <class S>
inline const float* row_floats(const void* base, int n, int G, int count, float* buf) {
  const S* src = static_cast<const S*>(base) + size_t(n) * G;
  if constexpr (std::is_same_v<S, float>) {
    return src;
  } else if constexpr (std::is_same_v<S, F16>) {
    halves_to_f32(reinterpret_cast<const uint16_t*>(src), buf, count);
    return buf;
  } else {
    for (int i = 0; i < count; ++i) buf[i] = to_float(src[i]);
    return buf;
  }
}

// y[0:MB, n:n+NB] = x[0:MB] @ W[n:n+NB].T. Per group: broadcast scale and bias,
// unpack C = 2L values per row, dequantize in registers (one FMA), FMA into the
// accumulators of all MB rows of x. s, b: (NB, G) fp32 scales and biases. GS, the
// group size, is a template argument so that the loop over a group unrolls
// (measured at M = 1, 576x1536 from L2, interleaved in one process: 35.7 -> 32.0 us
// a call on one thread, 20.3 -> 18.7 on two).
//
// ahead: where the packed rows of a later tile start, or nullptr. A first pass over W
// (all of decode) reads it from DRAM in small tiles that the hardware prefetcher is
// slow to follow; each group step asks for its share of that tile's bytes in advance.
//
// Every output, whatever the tile, the path (fused or panel) or the row's place in
// x, is computed by the same operations in the same order: w = fma(q, s, b); per
// step acc = fma(w0, x0, acc), acc = fma(w1, x1, acc); y = hsum(acc). So a row of
// x gives bit-identical results alone, in a batch, or in a prompt of any length.
//
// R (precision="bf16"): w = round_bf16(s * q + b), the multiply and the add rounded apart as
// the bf16 twin's array ops are; x was rounded to bf16 by the caller. Same order otherwise.
template <class V_>
inline V_ dequant(V_ q, V_ s, V_ b, std::bool_constant<false>) { return V_::fma(q, s, b); }
template <class V_>
inline V_ dequant(V_ q, V_ s, V_ b, std::bool_constant<true>) { return V_::round_bf16(V_::mul_add(q, s, b)); }

template <int MB, int NB, int BITS, int GS, bool R>
inline void tile(const Weights& W, const float* x, const float* s, const float* b, float* y, long ldy, int n,
                 const uint8_t* ahead) {
  constexpr int L = V::L, C = 2 * L, gs = GS, ahead_per_group = NB * GS * BITS / 8;
  const int K = W.K, G = K / gs;
  const size_t row_bytes = size_t(K) * BITS / 8;
  const uint8_t* wr = reinterpret_cast<const uint8_t*>(W.w) + size_t(n) * row_bytes;
  V acc[MB][NB];
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = V::zero();
  for (int g = 0; g < G; ++g) {
    if (ahead)
      for (int o = 0; o < ahead_per_group; o += 64) __builtin_prefetch(ahead + g * ahead_per_group + o);
    if constexpr (BITS == 4 && V::kTable) {  // AVX-512: dequantize by table lookup (see V::table)
      // Measured on the model's 120 layer matmuls at M = 1: 3.3 -> 3.0 ms from DRAM, and
      // 2.1 -> 1.7 ms for 60 L2-resident 576x3072 ones (interleaved in one process).
      V t[NB];  // this group's 16 dequantized values, per row
      for (int j = 0; j < NB; ++j) {
        if constexpr (R) {
          t[j] = V::table_bf16(s[j * G + g], b[j * G + g]);
        } else {
          t[j] = V::table(s[j * G + g], b[j * G + g]);
        }
      }
      for (int k = g * gs; k < (g + 1) * gs; k += C) {
        for (int j = 0; j < NB; ++j) {
          V w0, w1;
          V::lookup4(wr + j * row_bytes + k / 2, t[j], w0, w1);
          for (int r = 0; r < MB; ++r)
            acc[r][j] = V::fma(w1, V::load(x + size_t(r) * K + k + L), V::fma(w0, V::load(x + size_t(r) * K + k), acc[r][j]));
        }
      }
      continue;
    }
    for (int k = g * gs; k < (g + 1) * gs; k += C) {
      for (int j = 0; j < NB; ++j) {
        V q0, q1;
        if constexpr (BITS == 4) {
          V::unpack4(wr + j * row_bytes + k / 2, q0, q1);  // L bytes: low nibbles, high nibbles
        } else {
          q0 = V::unpack8(wr + j * row_bytes + k);
          q1 = V::unpack8(wr + j * row_bytes + k + L);
        }
        const V sj = V::set1(s[j * G + g]), bj = V::set1(b[j * G + g]);
        const V w0 = dequant(q0, sj, bj, std::bool_constant<R>{}), w1 = dequant(q1, sj, bj, std::bool_constant<R>{});
        for (int r = 0; r < MB; ++r)
          acc[r][j] = V::fma(w1, V::load(x + size_t(r) * K + k + L), V::fma(w0, V::load(x + size_t(r) * K + k), acc[r][j]));
      }
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j) y[r * ldy + n + j] = V::hsum(acc[r][j]);
}

// The first pass over W's rows prefetches the tile this many tiles ahead (see
// `tile`). Measured on the model's decode at S = 512 (interleaved, one process):
// 6.24 ms a token without, 5.69 with 1 tile ahead, 5.44 with 2; 3 and 4 were no
// better than 2. At M = 4 and 16 (64 MB of weight copies) it gave 5% to 38% more
// GFLOPS on the model's shapes.
constexpr int kPrefetchTiles = 2;

// Rows n0..n1 of W against MB rows of x, NB rows of W at a time. `first`: the first
// pass over these rows, which reads them from memory (later passes find them in L2).
template <int MB, int NB, int BITS, int GS, class S, bool R>
void rows(const Weights& W, const float* x, float* y, long ldy, int n0, int n1, bool first) {
  const int G = W.K / GS;
  const size_t row_bytes = size_t(W.K) * BITS / 8;
  thread_local std::vector<float> buf;  // per thread: no allocation per call
  buf.resize(2 * NB * G);
  auto run = [&](auto nb, int n) {
    constexpr int B = decltype(nb)::value;
    const int later = n + kPrefetchTiles * B;
    const uint8_t* ahead = nullptr;
    if (first && later + B <= n1) {
      ahead = reinterpret_cast<const uint8_t*>(W.w) + size_t(later) * row_bytes;
      const size_t sb_bytes = size_t(B) * G * sizeof(S), at = size_t(later) * G * sizeof(S);
      for (size_t o = 0; o < sb_bytes; o += 64) {  // that tile's scales and biases too
        __builtin_prefetch(static_cast<const char*>(W.scales) + at + o);
        __builtin_prefetch(static_cast<const char*>(W.biases) + at + o);
      }
    }
    const float* s = row_floats<S>(W.scales, n, G, B * G, buf.data());
    const float* b = row_floats<S>(W.biases, n, G, B * G, buf.data() + B * G);
    tile<MB, B, BITS, GS, R>(W, x, s, b, y, ldy, n, ahead);
  };
  int n = n0;
  for (; n + NB <= n1; n += NB) run(std::integral_constant<int, NB>{}, n);
  for (; n < n1; ++n) run(std::integral_constant<int, 1>{}, n);
}

// Rows n0..n1 of W dequantized to fp32 in the order the kernels read x (for 4
// bits: per chunk of C values, the low nibbles then the high ones), for `panel`.
template <int BITS, class S, bool R>
void dequantize_panel_t(const Weights& W, int n0, int n1, float* out) {
  constexpr int L = V::L, C = 2 * L;
  const int K = W.K, gs = W.group_size, G = K / gs;
  const size_t row_bytes = size_t(K) * BITS / 8;
  thread_local std::vector<float> buf;
  buf.resize(2 * G);
  for (int n = n0; n < n1; ++n, out += K) {
    const uint8_t* wr = reinterpret_cast<const uint8_t*>(W.w) + size_t(n) * row_bytes;
    const float* s = row_floats<S>(W.scales, n, G, G, buf.data());
    const float* b = row_floats<S>(W.biases, n, G, G, buf.data() + G);
    for (int g = 0; g < G; ++g) {
      const V sg = V::set1(s[g]), bg = V::set1(b[g]);
      for (int k = g * gs; k < (g + 1) * gs; k += C) {
        V q0, q1;
        if constexpr (BITS == 4) {
          V::unpack4(wr + k / 2, q0, q1);
        } else {
          q0 = V::unpack8(wr + k);
          q1 = V::unpack8(wr + k + L);
        }
        V::store(out + k, dequant(q0, sg, bg, std::bool_constant<R>{}));
        V::store(out + k + L, dequant(q1, sg, bg, std::bool_constant<R>{}));
      }
    }
  }
}

template <bool R>
void dequantize_panel_r(const Weights& W, int n0, int n1, float* out) {
  const bool four = W.bits == 4;
  switch (W.scale_dtype) {
    case DType::f32: return (four ? dequantize_panel_t<4, float, R> : dequantize_panel_t<8, float, R>)(W, n0, n1, out);
    case DType::f16: return (four ? dequantize_panel_t<4, F16, R> : dequantize_panel_t<8, F16, R>)(W, n0, n1, out);
    case DType::bf16: return (four ? dequantize_panel_t<4, BF16, R> : dequantize_panel_t<8, BF16, R>)(W, n0, n1, out);
  }
}

void dequantize_panel(const Weights& W, int n0, int n1, float* out) { dequantize_panel_r<false>(W, n0, n1, out); }
void dequantize_panel_bf16(const Weights& W, int n0, int n1, float* out) { dequantize_panel_r<true>(W, n0, n1, out); }

// y[0:MB, n:n+NB] = x[0:MB] @ w[n:n+NB].T with w already fp32: the tile above
// without the unpacking (same operations, same order, same results), for large M
// where each dequantized row serves every x row.
template <int MB, int NB>
inline void tile_f32(const float* x, int K, const float* w, float* y, long ldy, int n) {
  constexpr int L = V::L;
  V acc[MB][NB];
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = V::zero();
  const float* wn = w + size_t(n) * K;
  for (int k = 0; k < K; k += 2 * L) {
    for (int j = 0; j < NB; ++j) {
      const V w0 = V::load(wn + size_t(j) * K + k), w1 = V::load(wn + size_t(j) * K + k + L);
      for (int r = 0; r < MB; ++r)
        acc[r][j] = V::fma(w1, V::load(x + size_t(r) * K + k + L), V::fma(w0, V::load(x + size_t(r) * K + k), acc[r][j]));
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j) y[r * ldy + n + j] = V::hsum(acc[r][j]);
}

template <int MB>
void panel_rows(const float* x, int K, const float* w, int rows, float* y, long ldy) {
  int n = 0;
  for (; n + 4 <= rows; n += 4) tile_f32<MB, 4>(x, K, w, y, ldy, n);
  for (; n < rows; ++n) tile_f32<MB, 1>(x, K, w, y, ldy, n);
}

// y (M, ldy)[:, 0:rows] = x (M, K) @ w (rows, K).T, both in the dequantize_panel order.
void panel(const float* x, int M, int K, const float* w, int rows, float* y, long ldy) {
  int m = 0;
  for (; M - m >= 4; m += 4) panel_rows<4>(x + size_t(m) * K, K, w, rows, y + m * ldy, ldy);
  if (M - m >= 2) panel_rows<2>(x + size_t(m) * K, K, w, rows, y + m * ldy, ldy), m += 2;
  if (M - m >= 1) panel_rows<1>(x + size_t(m) * K, K, w, rows, y + m * ldy, ldy);
}

template <int BITS, int GS, class S, bool R>
void fused_t(const Weights& W, const float* x, int M, float* y, long ldy, int n0, int n1) {
  // A block of W rows stays in L2 while every block of x rows passes over it.
  const size_t row_bytes = size_t(W.K) * BITS / 8;
  const int block = std::max<int>(8, int((192 << 10) / row_bytes) / 8 * 8);
  for (int nb = n0; nb < n1; nb += block) {
    const int ne = std::min(n1, nb + block);
    // Tiles of 4 x rows by 4 W rows: each unpacked weight feeds 4 FMAs, each x load 4
    // (measured best of 8x1 .. 16x1 with AVX-512: 1.1-1.4x over 8x1 at M = 16 and 48).
    int m = 0;
    for (; M - m >= 4; m += 4) rows<4, 4, BITS, GS, S, R>(W, x + size_t(m) * W.K, y + m * ldy, ldy, nb, ne, m == 0);
    if (M - m >= 2) rows<2, 4, BITS, GS, S, R>(W, x + size_t(m) * W.K, y + m * ldy, ldy, nb, ne, m == 0), m += 2;
    // One row (decode): 8 W rows at a time, 8 independent FMA chains to hide latency.
    if (M - m >= 1) rows<1, 8, BITS, GS, S, R>(W, x + size_t(m) * W.K, y + m * ldy, ldy, nb, ne, m == 0);
  }
}

template <int GS, class S, bool R>
void fused_s(const Weights& W, const float* x, int M, float* y, long ldy, int n0, int n1) {
  (W.bits == 4 ? fused_t<4, GS, S, R> : fused_t<8, GS, S, R>)(W, x, M, y, ldy, n0, n1);
}

template <class S, bool R>
void fused_g(const Weights& W, const float* x, int M, float* y, long ldy, int n0, int n1) {
  switch (W.group_size) {  // 32, 64 or 128: the op checks
    case 32: return fused_s<32, S, R>(W, x, M, y, ldy, n0, n1);
    case 64: return fused_s<64, S, R>(W, x, M, y, ldy, n0, n1);
    default: return fused_s<128, S, R>(W, x, M, y, ldy, n0, n1);
  }
}

template <bool R>
void fused_r(const Weights& W, const float* x, int M, float* y, long ldy, int n0, int n1) {
  switch (W.scale_dtype) {
    case DType::f32: return fused_g<float, R>(W, x, M, y, ldy, n0, n1);
    case DType::f16: return fused_g<F16, R>(W, x, M, y, ldy, n0, n1);
    case DType::bf16: return fused_g<BF16, R>(W, x, M, y, ldy, n0, n1);
  }
}

void fused(const Weights& W, const float* x, int M, float* y, long ldy, int n0, int n1) {
  fused_r<false>(W, x, M, y, ldy, n0, n1);
}
void fused_bf16(const Weights& W, const float* x, int M, float* y, long ldy, int n0, int n1) {
  fused_r<true>(W, x, M, y, ldy, n0, n1);
}

// Each value to the nearest bf16 (as a float), in place: x under precision="bf16".
void round_bf16(float* v, long n) {
  long i = 0;
  for (; i + V::L <= n; i += V::L) V::store(v + i, V::round_bf16(V::load(v + i)));
  for (; i < n; ++i) v[i] = bits_to_f32(uint32_t(f32_to_bf16(v[i])) << 16);
}

// Scalar conversions, for the tails of the bulk ones and for the portable TU.
void to_f32_scalar(const void* src, DType t, float* dst, long n) {
  const auto* h = static_cast<const uint16_t*>(src);
  switch (t) {
    case DType::f32: std::memcpy(dst, src, size_t(n) * 4); return;
    case DType::f16: for (long i = 0; i < n; ++i) dst[i] = half_to_f32(h[i]); return;
    case DType::bf16: for (long i = 0; i < n; ++i) dst[i] = bits_to_f32(uint32_t(h[i]) << 16); return;
  }
}

void from_f32_scalar(const float* src, void* dst, DType t, long n) {
  auto* h = static_cast<uint16_t*>(dst);
  switch (t) {
    case DType::f32: std::memcpy(dst, src, size_t(n) * 4); return;
    case DType::f16: for (long i = 0; i < n; ++i) h[i] = f32_to_half(src[i]); return;
    case DType::bf16: for (long i = 0; i < n; ++i) h[i] = f32_to_bf16(src[i]); return;
  }
}

}  // namespace
