// The AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma
// -mf16c; run only where the CPU reports all four AVX-512 subsets). 16 floats a vector: a 4-bit
// step reads 16 bytes = 32 values, widened with one vpmovzxbd.
#include <immintrin.h>

#include <cstdint>

#include "quantized_matmul_kernels.h"

namespace {

struct V {
  static constexpr int L = 16;
  // 4-bit weights dequantize by table lookup: one register holds a group's 16 values
  // s * q + b (q = 0..15), and vpermps picks them by nibble (it reads only an index's
  // low 4 bits, so the low nibble needs no mask) -- instead of int->float conversions
  // and an FMA per vector. The table's entries are the same fma(q, s, b): same bits.
  static constexpr bool kTable = true;
  __m512 v;
  static V table(float s, float b) {
    const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return {_mm512_fmadd_ps(q, _mm512_set1_ps(s), _mm512_set1_ps(b))};
  }
  static void lookup4(const uint8_t* p, V t, V& lo, V& hi) {  // as unpack4, then through the table
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo.v = _mm512_permutexvar_ps(b, t.v);
    hi.v = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t.v);
  }
  static V table_bf16(float s, float b) {  // precision="bf16": s * q + b (two roundings), rounded to bf16
    const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return round_bf16(mul_add({q}, set1(s), set1(b)));
  }
  static V mul_add(V a, V b, V c) {  // the explicit-rounding forms: never contracted to an FMA
    constexpr int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return {_mm512_add_round_ps(_mm512_mul_round_ps(a.v, b.v, rn), c.v, rn)};
  }
  static V round_bf16(V a) {  // to the nearest bf16, ties to even; NaN stays NaN (made quiet)
    const __m512i u = _mm512_castps_si512(a.v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i hi = _mm512_set1_epi32(int(0xffff0000u));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), hi);
    const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
    const __m512i quiet = _mm512_or_si512(_mm512_and_si512(u, hi), _mm512_set1_epi32(0x400000));
    return {_mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, quiet))};
  }
  static V zero() { return {_mm512_setzero_ps()}; }
  static V set1(float a) { return {_mm512_set1_ps(a)}; }
  static V load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a.v); }
  static V fma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static V add(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
  static float hsum(V a) { return _mm512_reduce_add_ps(a.v); }
  static void unpack4(const uint8_t* p, V& lo, V& hi) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo.v = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    hi.v = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  }
  static V unpack8(const uint8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
  }
};

float half_to_f32(uint16_t h) { return _cvtsh_ss(h); }
uint16_t f32_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

void halves_to_f32(const uint16_t* h, float* dst, long n) {
  long i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
  for (; i < n; ++i) dst[i] = half_to_f32(h[i]);
}

}  // namespace

#include "quantized_matmul_kernels_impl.h"

namespace {

void to_f32(const void* src, DType t, float* dst, long n) {
  const auto* h = static_cast<const uint16_t*>(src);
  long i = 0;
  if (t == DType::f16) return halves_to_f32(h, dst, n);
  if (t == DType::bf16) {
    for (; i + 16 <= n; i += 16) {
      const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i)));
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)));
    }
  }
  if (t == DType::f32) return to_f32_scalar(src, t, dst, n);
  to_f32_scalar(h + i, t, dst + i, n - i);
}

void from_f32(const float* src, void* dst, DType t, long n) {
  auto* h = static_cast<uint16_t*>(dst);
  long i = 0;
  if (t == DType::f16) {
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + i),
                          _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if (t == DType::bf16) {
    for (; i + 16 <= n; i += 16) {  // f32_to_bf16, 16 at a time
      const __m512 f = _mm512_loadu_ps(src + i);
      const __m512i u = _mm512_castps_si512(f);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
      r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + i), _mm512_cvtepi32_epi16(r));
    }
  }
  if (t == DType::f32) return from_f32_scalar(src, dst, t, n);
  from_f32_scalar(src + i, h + i, t, n - i);
}

}  // namespace

namespace tiny_llm::qmm {

const Isa* isa_avx512() {
  // Panels never: with the table lookup and the group size unrolled, the fused kernel
  // was as fast or faster at every M (model shapes, group 32, 64 MB of weight copies,
  // GFLOPS fused/panel): M = 16: 117/104 (576x576), 120/116, 154/159, 222/170,
  // 140/112 (head); M = 64: 156/156, 195/189, 265/261, 283/242, 252/265; M = 512:
  // 164/167, 178/186, 215/213, 277/229, 202/177. Prefill of 512 tokens: 616 -> 659 tok/s.
  static const Isa isa{"avx512", 2 * V::L, 0, fused, dequantize_panel, panel, to_f32, from_f32,
                       fused_bf16, dequantize_panel_bf16, round_bf16};
  return &isa;
}

}  // namespace tiny_llm::qmm
