// precision="int8" in plain C++: the reference every int8 kernel matches bit for bit, and the
// path on CPUs without AVX512-VNNI (or with another isa forced). Built with -ffp-contract=off.
//
// What it computes (the twin: impl.quantize.quantized_matmul_int8_mlx), for a row x of M and a
// row n of W, per group g of gs values along K:
//   dx = max|x_k| / 127 over the group, xq_k = round(x_k / dx) (ties to even, clamped to
//   +-127; all 0 where dx = 0), xc = dx * float(sum_k xq_k)                     (per row of x)
//   (a group holding a NaN or an infinity: dx = NaN and xq = 0, so its row's outputs are NaN, as
//   the fp32 product's would be, instead of finite values that hide it)
//   isum = sum_k q_k * xq_k, an exact int32 (|q| <= 255, |xq| <= 127, gs <= 128: < 2^22)
//   y += float(isum) * (dw * dx) + bias * xc                       (fp32, each op rounded)
// with y = 0 first and the groups in order. float(isum) is exact (< 2^24). Nothing here depends
// on M, on the tile or on the task a row lands in: a row gives the same bits alone or in a batch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "quantized_matmul_kernels.h"

namespace {

using tiny_llm::qmm::DType;
using tiny_llm::qmm::Weights;

float f32_of_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Scale or bias i of W (fp32, fp16 or bf16) as fp32, exactly.
float scale_at(const void* base, DType t, size_t i) {
  if (t == DType::f32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  if (t == DType::bf16) return f32_of_bits(uint32_t(h) << 16);
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 31u, man = h & 0x3ffu;
  if (exp == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(float(man), -24);  // zero or subnormal: exact
  if (exp == 31) return f32_of_bits(sign | 0x7f800000u | (man << 13));
  return f32_of_bits(sign | ((exp + 112) << 23) | (man << 13));
}

// xq in x's own order, whatever the bits (pack's quad layout keeps k in order).
void quantize_x(const float* x, int K, int gs, int /*bits*/, int8_t* xq, float* dx, float* xc) {
  for (int g = 0; g < K / gs; ++g, x += gs, xq += gs) {
    float amax = 0.0f;
    bool finite = true;
    for (int i = 0; i < gs; ++i) {
      const float a = std::fabs(x[i]);
      finite = finite && a <= std::numeric_limits<float>::max();  // false for NaN and infinities
      amax = std::max(amax, a);
    }
    const float d = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
    int sum = 0;
    for (int i = 0; i < gs; ++i) {
      // nearbyint: the default rounding mode, to nearest, ties to even
      const int q = d > 0.0f ? int(std::fmin(127.0f, std::fmax(-127.0f, std::nearbyint(x[i] / d)))) : 0;
      xq[i] = int8_t(q);
      sum += q;
    }
    dx[g] = d;
    xc[g] = d * float(sum);
  }
}

// Quant k of a row of W (bytes, MLX's little-endian packing: 4 bits, value 2j in byte j's low nibble).
inline int quant(const uint8_t* row, int k, int bits) { return bits == 4 ? (row[k / 2] >> (4 * (k & 1))) & 15 : row[k]; }

// The quad layout: per block of 16 W rows, per quad j (k = 4j .. 4j + 3), 16 dwords, lane r =
// the quants q[n0 + 16 b + r, 4j .. 4j + 3] as bytes; block b at panel + b * 16 * K.
void pack(const Weights& W, int n0, int n1, uint8_t* panel, float* dw, float* bw) {
  const int K = W.K, G = K / W.group_size;
  const size_t row_bytes = size_t(K) * W.bits / 8;
  for (int n = n0; n < n1; n += 16, panel += size_t(16) * K, dw += 16 * G, bw += 16 * G)
    for (int r = 0; r < 16; ++r) {
      const int rr = std::min(n + r, n1 - 1);  // a short last block repeats its last row
      const uint8_t* row = reinterpret_cast<const uint8_t*>(W.w) + size_t(rr) * row_bytes;
      for (int k = 0; k < K; ++k) panel[size_t(k / 4) * 64 + 4 * r + k % 4] = uint8_t(quant(row, k, W.bits));
      for (int g = 0; g < G; ++g) {
        dw[16 * g + r] = scale_at(W.scales, W.scale_dtype, size_t(rr) * G + g);
        bw[16 * g + r] = scale_at(W.biases, W.scale_dtype, size_t(rr) * G + g);
      }
    }
}

size_t block_bytes(int K, int /*bits*/) { return size_t(16) * K; }  // one byte a quant, 4 or 8 bits

void gemm(const int8_t* xq, const float* dx, const float* xc, int M, int K, int gs, int /*bits*/, const uint8_t* panel,
          const float* dw, const float* bw, int rows, float* y, long ldy) {
  const int G = K / gs;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < rows; ++n) {
      const int blk = n / 16, r = n % 16;
      const uint8_t* w = panel + size_t(blk) * 16 * K + 4 * r;
      const int8_t* xm = xq + size_t(m) * K;
      float acc = 0.0f;
      for (int g = 0; g < G; ++g) {
        int32_t isum = 0;
        for (int k = g * gs; k < (g + 1) * gs; ++k) isum += int32_t(w[size_t(k / 4) * 64 + k % 4]) * xm[k];
        const size_t s = (size_t(blk) * G + g) * 16 + r;
        const float a = dw[s] * dx[size_t(m) * G + g];
        const float p = float(isum) * a;
        const float c = bw[s] * xc[size_t(m) * G + g];
        acc = acc + (p + c);
      }
      y[size_t(m) * ldy + n] = acc;
    }
}

}  // namespace

namespace tiny_llm::qmm {

const Int8Kernels& int8_portable() {
  static const Int8Kernels k{"portable", quantize_x, pack, block_bytes, gemm};
  return k;
}

#if !(defined(__x86_64__) || defined(_M_X64))
const Int8Kernels* int8_avx512vnni() { return nullptr; }
#endif

}  // namespace tiny_llm::qmm
