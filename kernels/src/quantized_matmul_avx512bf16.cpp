// The VDPBF16PS kernels behind quantized_matmul(..., precision="bf16") for M >= bf16_min_m
// (compiled with the AVX-512 flags plus -mavx512bf16 and -ffp-contract=off; called only
// where the CPU reports avx512_bf16 as well as the AVX-512 subsets of the avx512 TU).
//
// The operands are those of the bf16 twin (impl.quantize.quantized_matmul_bf16_mlx):
//   x rounded to bf16 (nearest even); w = s * q + b in fp32 (multiply, then add: two
//   roundings, as the twin's array ops), rounded to bf16. VDPBF16PS multiplies them exactly
//   (8-bit by 8-bit significands fit fp32's 24) and adds in fp32, nearest even. So kernel and
//   twin differ only in the order of the fp32 additions, and in denormals: the instruction
//   (like VCVTNE2PS2BF16) treats bf16 values below 2^-126 as zero and flushes such results.
//
// The product is a small GEMM: y[m, n] = sum over k-pairs p of x[m, 2p] w[n, 2p] +
// x[m, 2p+1] w[n, 2p+1], one VDPBF16PS lane per output column n. The weights of a task's
// rows are dequantized into a panel in the instruction's pair layout: per block of 16 W rows,
// per k-pair p, one 64-byte vector of 16 (w[n, 2p], w[n, 2p+1]) dwords; x stays row-major in
// bf16, each pair (x[m, 2p], x[m, 2p+1]) broadcast from memory. Each output is the same
// sequence of operations whatever its tile or task (acc = 0; per p in order: acc =
// dpbf16(acc, x pair, w pair)), so a row gives the same bits alone or in a batch on this path.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quantized_matmul_kernels.h"
#include "transpose16_avx512.h"

namespace {

using tiny_llm::qmm::DType;
using tiny_llm::qmm::Weights;

constexpr int kMR = 8;  // rows of x per tile (broadcasts)
constexpr int kNV = 3;  // vectors of 16 W rows per tile: a tile is 8 x 48 outputs, 24 accumulators

// bf16 bits (nearest even; NaN stays NaN, made quiet) of 16 floats, in the low half of each dword.
inline __m512i bf16_bits(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}

inline uint16_t bf16_scalar(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float f32_of(uint16_t h, DType t) {
  if (t == DType::f16) return _cvtsh_ss(h);
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// n values of x (dtype t) -> bf16, nearest even. bf16 is copied; fp16 goes through fp32 (exact).
void to_bf16(const void* src, DType t, uint16_t* dst, long n) {
  if (t == DType::bf16) {
    std::memcpy(dst, src, size_t(n) * 2);
    return;
  }
  long i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 f = t == DType::f32
                         ? _mm512_loadu_ps(static_cast<const float*>(src) + i)
                         : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                               static_cast<const uint16_t*>(src) + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(bf16_bits(f)));
  }
  for (; i < n; ++i)
    dst[i] = bf16_scalar(t == DType::f32 ? static_cast<const float*>(src)[i]
                                         : f32_of(static_cast<const uint16_t*>(src)[i], t));
}

// count scales (or biases) from `base` + first, as fp32, into buf.
void floats(const void* base, DType t, size_t first, int count, float* buf) {
  if (t == DType::f32) {
    std::memcpy(buf, static_cast<const float*>(base) + first, size_t(count) * 4);
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(base) + first;
  int i = 0;
  if (t == DType::f16) {
    for (; i + 16 <= count; i += 16)
      _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
  }
  for (; i < count; ++i) buf[i] = f32_of(h[i], t);
}

// s * q + b, rounded twice (never fused: -ffp-contract=off, and the explicit rounding forms).
inline __m512 mul_add(__m512 q, __m512 s, __m512 b) {
  constexpr int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return _mm512_add_round_ps(_mm512_mul_round_ps(q, s, rn), b, rn);
}


// Rows n0..n1 of W -> `out` in the pair layout: block j (rows n0 + 16j ..), pair p at
// out + (j * K / 2 + p) * 32. A last block of fewer than 16 rows repeats its last row in the
// other lanes (gemm never stores those). Per 16 rows and 32 values: each row's 32 values as 16
// pair dwords (4 bits: looked up in a bf16 table of the group's 16 values; 8 bits: converted),
// then a 16 x 16 transpose; the loop over the 16 rows is fixed so that they stay in registers.
template <int BITS>
void dequantize_panel_t(const Weights& W, int n0, int n1, uint16_t* out) {
  const int K = W.K, gs = W.group_size, G = K / gs;
  const size_t row_bytes = size_t(K) * BITS / 8;
  thread_local std::vector<float> sb;
  sb.resize(size_t(32) * G);
  float* s = sb.data();
  float* b = sb.data() + 16 * G;
  const __m512 q16 = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) uint16_t table[16][32];  // 4 bits: each row's 16 values s * q + b of a group, bf16, twice over
  for (int n = n0; n < n1; n += 16, out += size_t(K) * 16) {
    const int rows = std::min(16, n1 - n);
    floats(W.scales, W.scale_dtype, size_t(n) * G, rows * G, s);
    floats(W.biases, W.scale_dtype, size_t(n) * G, rows * G, b);
    const uint8_t* w0 = reinterpret_cast<const uint8_t*>(W.w) + size_t(n) * row_bytes;
    for (int g = 0; g < G; ++g) {
      if constexpr (BITS == 4)
        for (int r = 0; r < 16; ++r) {
          const int i = std::min(r, rows - 1) * G + g;
          const __m512 t = mul_add(q16, _mm512_set1_ps(s[i]), _mm512_set1_ps(b[i]));
          _mm512_store_si512(table[r], (__m512i)_mm512_cvtne2ps_pbh(t, t));
        }
      for (int k = g * gs; k < (g + 1) * gs; k += 32) {
        __m512i v[16];
        for (int r = 0; r < 16; ++r) {
          const int rr = std::min(r, rows - 1);
          const uint8_t* p = w0 + size_t(rr) * row_bytes;
          if constexpr (BITS == 4) {
            // byte j holds values 2j (low nibble) and 2j + 1: dword j's words index them.
            // vpermw reads 5 bits of an index; the table repeats, so bit 4 does not matter.
            const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k / 2)));
            v[r] = _mm512_permutexvar_epi16(_mm512_or_si512(bytes, _mm512_slli_epi32(bytes, 12)),
                                            _mm512_load_si512(table[r]));
          } else {
            const __m512 sr = _mm512_set1_ps(s[rr * G + g]), br = _mm512_set1_ps(b[rr * G + g]);
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k))));
            const __m512 hi =
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k + 16))));
            // words 0..15: values k..k+15, 16..31: k+16..k+31, so dword j = (value 2j, value 2j+1)
            v[r] = (__m512i)_mm512_cvtne2ps_pbh(mul_add(hi, sr, br), mul_add(lo, sr, br));
          }
        }
        transpose16(v);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + size_t(k / 2 + i) * 32, v[i]);
      }
    }
  }
}

void dequantize_panel(const Weights& W, int n0, int n1, uint16_t* out) {
  (W.bits == 4 ? dequantize_panel_t<4> : dequantize_panel_t<8>)(W, n0, n1, out);
}

// y[0:MR, 0:16 NV] (+ ldy rows) = x[0:MR] (bf16, ldx) @ the NV blocks at w (block stride bs,
// in uint16) for KP pairs; `last`: which lanes of the last block are rows of W.
template <int MR, int NV>
inline void tile(const uint16_t* x, long ldx, const uint16_t* w, size_t bs, int KP, float* y, long ldy,
                 __mmask16 last) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int p = 0; p < KP; ++p) {
    __m512bh wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(w + v * bs + size_t(p) * 32);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * p, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xb, wv[v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV - 1; ++v) _mm512_storeu_ps(y + r * ldy + 16 * v, acc[r][v]);
    _mm512_mask_storeu_ps(y + r * ldy + 16 * (NV - 1), last, acc[r][NV - 1]);
  }
}

template <int MR>
void tile_nv(int nv, const uint16_t* x, long ldx, const uint16_t* w, size_t bs, int KP, float* y, long ldy,
             __mmask16 last) {
  switch (nv) {
    case 1: return tile<MR, 1>(x, ldx, w, bs, KP, y, ldy, last);
    case 2: return tile<MR, 2>(x, ldx, w, bs, KP, y, ldy, last);
    default: return tile<MR, 3>(x, ldx, w, bs, KP, y, ldy, last);
  }
}

// y (M, ldy)[:, 0:rows] = x (M, K) bf16 @ panel (rows of W in the pair layout).T
void gemm(const uint16_t* x, int M, int K, const uint16_t* panel, int rows, float* y, long ldy) {
  static_assert(kMR == 8 && kNV == 3, "the switches below");
  const int KP = K / 2, blocks = (rows + 15) / 16;
  const size_t bs = size_t(KP) * 32;
  for (int m = 0; m < M; m += kMR) {
    const int mr = std::min(kMR, M - m);
    for (int j = 0; j < blocks; j += kNV) {
      const int nv = std::min(kNV, blocks - j);
      const int tail = rows - 16 * (j + nv - 1);  // rows of W in the tile's last block
      const __mmask16 last = tail >= 16 ? __mmask16(0xffff) : __mmask16((1u << tail) - 1);
      const uint16_t* xm = x + size_t(m) * K;
      const uint16_t* w = panel + size_t(j) * bs;
      float* ym = y + size_t(m) * ldy + 16 * j;
      switch (mr) {
        case 8: tile_nv<8>(nv, xm, K, w, bs, KP, ym, ldy, last); break;
        case 7: tile_nv<7>(nv, xm, K, w, bs, KP, ym, ldy, last); break;
        case 6: tile_nv<6>(nv, xm, K, w, bs, KP, ym, ldy, last); break;
        case 5: tile_nv<5>(nv, xm, K, w, bs, KP, ym, ldy, last); break;
        case 4: tile_nv<4>(nv, xm, K, w, bs, KP, ym, ldy, last); break;
        case 3: tile_nv<3>(nv, xm, K, w, bs, KP, ym, ldy, last); break;
        case 2: tile_nv<2>(nv, xm, K, w, bs, KP, ym, ldy, last); break;
        default: tile_nv<1>(nv, xm, K, w, bs, KP, ym, ldy, last); break;
      }
    }
  }
}

}  // namespace

namespace tiny_llm::qmm {

const Bf16Kernels* bf16_avx512() {
  static const Bf16Kernels k{"avx512_bf16", to_bf16, dequantize_panel, gemm};
  return &k;
}

}  // namespace tiny_llm::qmm
