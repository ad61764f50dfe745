// precision="int8" on AVX512-VNNI: vpdpbusd (16 lanes of 4 u8 x s8 products added to an int32).
// Compiled with the AVX-512 flags plus -mavx512vnni and -ffp-contract=off; called only where the
// CPU also reports avx512_vnni. Computes what quantized_matmul_int8.cpp computes (see there), the
// same integers and the same fp32 operations in the same order, so the same bits:
//   quantize_x: per group, max|x| (a max: any order), dx = amax / 127 and x / dx (IEEE division,
//     correctly rounded in both), round to nearest even (vrndscaleps), clamp, exact integer sum.
//   gemm: per output and per group, isum is an exact int32 whatever the order of vpdpbusd's adds;
//     then a = dw * dx, p = float(isum) * a, c = bias * xc, acc = acc + (p + c): vmulps/vaddps
//     only, never fused (-ffp-contract=off), acc = 0 first and the groups in order.
// Layout: a task's W rows in blocks of 16; per block, one 64-byte vector per dword of a row's
// packed quants, whose lane r holds row r's dword: a 16 x 16 dword transpose of 16 rows, the
// quants left as stored. 8 bits: dword j = quants 4j .. 4j + 3, u8 as vpdpbusd reads them.
// 4 bits: dword o = quants 8o .. 8o + 7, the even ones in the low nibbles of its 4 bytes and the
// odd ones in the high nibbles; the gemm splits it (and 0x0f; shift right 4, and 0x0f) into the
// quads (8o, 8o+2, 8o+4, 8o+6) and (8o+1, 8o+3, 8o+5, 8o+7), so quantize_x stores x's int8 in that
// order within each 8 (evens, then odds). Packing is then only a transpose, no unpacking, and a
// 4-bit panel is half the bytes.
// A tile is MR rows of x times NV blocks: per dword of W, NV vector loads, MR * NV vpdpbusd (twice
// for 4 bits) into int32 accumulators, x's 4 int8 broadcast from memory; per group those are
// scaled into fp32 ones. A row's outputs are computed by the same operations whichever tile, M or
// task holds it.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "quantized_matmul_kernels.h"
#include "transpose16_avx512.h"

namespace {

using tiny_llm::qmm::DType;
using tiny_llm::qmm::Weights;

// The tile's shape, a compile-time choice (-DTLLM_I8_MR=..., -DTLLM_I8_NV=...): 4 x 3 spills a few
// accumulators, yet 4 x 2, 3 x 3, 5 x 2 and 6 x 2 measured the same on SmolLM2's shapes.
#ifndef TLLM_I8_MR
#define TLLM_I8_MR 4
#endif
#ifndef TLLM_I8_NV
#define TLLM_I8_NV 3
#endif
constexpr int kMR = TLLM_I8_MR;  // rows of x per tile
constexpr int kNV = TLLM_I8_NV;  // blocks of 16 W rows per tile

void quantize_x(const float* x, int K, int gs, int bits, int8_t* xq, float* dx, float* xc) {
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  // 4 bits: per 8 values, the even ones then the odd ones (see the layout above)
  const __m128i order = bits == 4 ? _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)
                                  : _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int g = 0; g < K / gs; ++g, x += gs, xq += gs) {  // gs: 32, 64 or 128, a multiple of 16
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;  // NaN or infinite values: dx = NaN, xq = 0 (as quantized_matmul_int8.cpp)
    for (int i = 0; i < gs; i += 16) {
      const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
      bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ);
      amax = _mm512_max_ps(amax, a);
    }
    const float d = bad ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(amax) / 127.0f;
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < gs; i += 16) {
      __m512i q = _mm512_setzero_si512();
      if (d > 0.0f) {
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(d)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, r)));  // exact: r is an integer
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i), _mm_shuffle_epi8(_mm512_cvtsepi32_epi8(q), order));
      sum = _mm512_add_epi32(sum, q);
    }
    dx[g] = d;
    xc[g] = d * float(_mm512_reduce_add_epi32(sum));
  }
}

// The `m` lanes of 16 consecutive scales (or biases) from base + i, as fp32 bits (exact), 0 elsewhere.
inline __m512i scales16(const void* base, DType t, size_t i, __mmask16 m) {
  if (t == DType::f32) return _mm512_maskz_loadu_epi32(m, static_cast<const float*>(base) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + i);
  if (t == DType::f16) return _mm512_castps_si512(_mm512_cvtph_ps(h));
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);  // bf16: the top half of an fp32
}


// Rows n0..n1 of W -> panel (block b at + b * 16 * K * BITS / 8 bytes): per 16 dwords of the
// rows (16 rows x 64 bytes; a last step of K may hold fewer: masked), a 16 x 16 transpose.
template <int BITS>
void pack_t(const Weights& W, int n0, int n1, uint8_t* panel, float* dw, float* bw) {
  const int K = W.K, G = K / W.group_size, dwords = K * BITS / 32;
  const size_t row_bytes = size_t(K) * BITS / 8;
  for (int n = n0; n < n1; n += 16, panel += 16 * row_bytes, dw += 16 * G, bw += 16 * G) {
    const uint8_t* rows[16];
    int rr[16];
    for (int r = 0; r < 16; ++r) {
      rr[r] = std::min(n + r, n1 - 1);  // a short last block repeats its last row
      rows[r] = reinterpret_cast<const uint8_t*>(W.w) + size_t(rr[r]) * row_bytes;
    }
    // Scales and biases: each row's G values (contiguous), 16 groups at a time, transposed so that
    // group g's 16 rows are one vector.
    for (int g = 0; g < G; g += 16) {
      const int count = std::min(16, G - g);
      const __mmask16 m = __mmask16((1u << count) - 1);
      __m512i vs[16], vb[16];
      for (int r = 0; r < 16; ++r) {
        vs[r] = scales16(W.scales, W.scale_dtype, size_t(rr[r]) * G + g, m);
        vb[r] = scales16(W.biases, W.scale_dtype, size_t(rr[r]) * G + g, m);
      }
      transpose16(vs);
      transpose16(vb);
      for (int i = 0; i < count; ++i) {
        _mm512_storeu_si512(dw + 16 * (g + i), vs[i]);
        _mm512_storeu_si512(bw + 16 * (g + i), vb[i]);
      }
    }
    for (int j = 0; j < dwords; j += 16) {
      const int count = std::min(16, dwords - j);
      const __mmask16 m = __mmask16((1u << count) - 1);
      __m512i v[16];
      for (int r = 0; r < 16; ++r) v[r] = _mm512_maskz_loadu_epi32(m, rows[r] + 4 * j);
      transpose16(v);
      for (int i = 0; i < count; ++i) _mm512_storeu_si512(panel + size_t(j + i) * 64, v[i]);
    }
  }
}

void pack(const Weights& W, int n0, int n1, uint8_t* panel, float* dw, float* bw) {
  (W.bits == 4 ? pack_t<4> : pack_t<8>)(W, n0, n1, panel, dw, bw);
}

size_t block_bytes(int K, int bits) { return size_t(16) * K * bits / 8; }

inline __m512i broadcast(const int8_t* p) {  // 4 int8 of x as a dword in every lane
  int32_t quad;
  std::memcpy(&quad, p, 4);
  return _mm512_set1_epi32(quad);
}

// y[0:MR, 0:16 NV] (+ ldy rows) for MR rows of x and the NV blocks at w (block stride bs bytes;
// their scales and biases at dw, bw, stride ss floats); `last`: the lanes of the last block to store.
template <int BITS, int MR, int NV>
inline void tile(const int8_t* xq, const float* dx, const float* xc, int K, int gs, const uint8_t* w, size_t bs,
                 const float* dw, const float* bw, size_t ss, float* y, long ldy, __mmask16 last) {
  const int G = K / gs, per = 32 / BITS;  // quants a dword
  const __m512i low = _mm512_set1_epi8(0x0f);
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int g = 0; g < G; ++g) {
    __m512i s[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) s[r][v] = _mm512_setzero_si512();
    for (int j = g * gs / per; j < (g + 1) * gs / per; ++j)
      for (int v = 0; v < NV; ++v) {
        const __m512i wv = _mm512_loadu_si512(w + v * bs + size_t(j) * 64);
        if constexpr (BITS == 8) {
          for (int r = 0; r < MR; ++r) s[r][v] = _mm512_dpbusd_epi32(s[r][v], wv, broadcast(xq + size_t(r) * K + 4 * j));
        } else {  // quants 8j + 0, 2, 4, 6 (low nibbles), then 8j + 1, 3, 5, 7; x stored evens then odds
          const __m512i even = _mm512_and_si512(wv, low), odd = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
          for (int r = 0; r < MR; ++r) {
            s[r][v] = _mm512_dpbusd_epi32(s[r][v], even, broadcast(xq + size_t(r) * K + 8 * j));
            s[r][v] = _mm512_dpbusd_epi32(s[r][v], odd, broadcast(xq + size_t(r) * K + 8 * j + 4));
          }
        }
      }
    for (int v = 0; v < NV; ++v) {
      const __m512 dwv = _mm512_loadu_ps(dw + v * ss + 16 * g), bwv = _mm512_loadu_ps(bw + v * ss + 16 * g);
      for (int r = 0; r < MR; ++r) {
        const __m512 a = _mm512_mul_ps(dwv, _mm512_set1_ps(dx[r * G + g]));
        const __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(s[r][v]), a);
        const __m512 c = _mm512_mul_ps(bwv, _mm512_set1_ps(xc[r * G + g]));
        acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_add_ps(p, c));
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV - 1; ++v) _mm512_storeu_ps(y + r * ldy + 16 * v, acc[r][v]);
    _mm512_mask_storeu_ps(y + r * ldy + 16 * (NV - 1), last, acc[r][NV - 1]);
  }
}

// tile<BITS, mr, nv> for the run-time mr <= MR and nv <= NV (a tile at the edge of x or W).
template <int BITS, int MR, int NV = kNV>
inline void tile_any(int mr, int nv, const int8_t* xq, const float* dx, const float* xc, int K, int gs,
                     const uint8_t* w, size_t bs, const float* dw, const float* bw, size_t ss, float* y, long ldy,
                     __mmask16 last) {
  if constexpr (MR > 1) {
    if (mr < MR) return tile_any<BITS, MR - 1, NV>(mr, nv, xq, dx, xc, K, gs, w, bs, dw, bw, ss, y, ldy, last);
  }
  if constexpr (NV > 1) {
    if (nv < NV) return tile_any<BITS, MR, NV - 1>(mr, nv, xq, dx, xc, K, gs, w, bs, dw, bw, ss, y, ldy, last);
  }
  tile<BITS, MR, NV>(xq, dx, xc, K, gs, w, bs, dw, bw, ss, y, ldy, last);
}

template <int BITS>
void gemm_t(const int8_t* xq, const float* dx, const float* xc, int M, int K, int gs, const uint8_t* panel,
            const float* dw, const float* bw, int rows, float* y, long ldy) {
  const int G = K / gs, blocks = (rows + 15) / 16;
  const size_t bs = size_t(16) * K * BITS / 8, ss = size_t(16) * G;
  for (int m = 0; m < M; m += kMR) {
    const int mr = std::min(kMR, M - m);
    const int8_t* xm = xq + size_t(m) * K;
    const float *dxm = dx + size_t(m) * G, *xcm = xc + size_t(m) * G;
    for (int j = 0; j < blocks; j += kNV) {
      const int nv = std::min(kNV, blocks - j);
      const int tail = rows - 16 * (j + nv - 1);  // rows of W in the tile's last block
      const __mmask16 last = tail >= 16 ? __mmask16(0xffff) : __mmask16((1u << tail) - 1);
      const uint8_t* w = panel + j * bs;
      const float *dwj = dw + j * ss, *bwj = bw + j * ss;
      float* ym = y + size_t(m) * ldy + 16 * j;
      tile_any<BITS, kMR>(mr, nv, xm, dxm, xcm, K, gs, w, bs, dwj, bwj, ss, ym, ldy, last);
    }
  }
}

void gemm(const int8_t* xq, const float* dx, const float* xc, int M, int K, int gs, int bits, const uint8_t* panel,
          const float* dw, const float* bw, int rows, float* y, long ldy) {
  (bits == 4 ? gemm_t<4> : gemm_t<8>)(xq, dx, xc, M, K, gs, panel, dw, bw, rows, y, ldy);
}

}  // namespace

namespace tiny_llm::qmm {

const Int8Kernels* int8_avx512vnni() {
  static const Int8Kernels k{"avx512_vnni", quantize_x, pack, block_bytes, gemm};
  return &k;
}

}  // namespace tiny_llm::qmm
