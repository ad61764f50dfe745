// The AVX2 kernels (compiled with -mavx2 -mfma -mf16c; run only where the CPU
// reports all three). 8 floats a vector: a 4-bit step reads 8 bytes = 16 values.
#include <immintrin.h>

#include <cstdint>

#include "quantized_matmul_kernels.h"

namespace {

struct V {
  static constexpr int L = 8;
  static constexpr bool kTable = false;  // 16-entry tables need 2 registers here: unpack4 instead
  static V table(float s, float b);                    // declared for the shared code, never called
  static V table_bf16(float s, float b);
  static void lookup4(const uint8_t* p, V t, V& lo, V& hi);
  __m256 v;
  static V zero() { return {_mm256_setzero_ps()}; }
  static V set1(float a) { return {_mm256_set1_ps(a)}; }
  static V load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a.v); }
  static V fma(V a, V b, V c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static V add(V a, V b) { return {_mm256_add_ps(a.v, b.v)}; }
  static V mul_add(V a, V b, V c) {  // a * b, then + c: the empty asm keeps GCC from fusing them
    __m256 p = _mm256_mul_ps(a.v, b.v);
    __asm__("" : "+x"(p));
    return {_mm256_add_ps(p, c.v)};
  }
  static V round_bf16(V a) {  // to the nearest bf16, ties to even; NaN stays NaN (made quiet)
    const __m256i u = _mm256_castps_si256(a.v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i hi = _mm256_set1_epi32(int(0xffff0000u));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), hi);
    const __m256i quiet = _mm256_or_si256(_mm256_and_si256(u, hi), _mm256_set1_epi32(0x400000));
    const __m256 nan = _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q);
    return {_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet), nan)};
  }
  static float hsum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static __m256i bytes8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static void unpack4(const uint8_t* p, V& lo, V& hi) {
    const __m256i b = bytes8(p);
    lo.v = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    hi.v = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
  static V unpack8(const uint8_t* p) { return {_mm256_cvtepi32_ps(bytes8(p))}; }
};

float half_to_f32(uint16_t h) { return _cvtsh_ss(h); }
uint16_t f32_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

void halves_to_f32(const uint16_t* h, float* dst, long n) {
  long i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
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
    for (; i + 8 <= n; i += 8) {
      const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)));
    }
  }
  if (t == DType::f32) return to_f32_scalar(src, t, dst, n);
  to_f32_scalar(h + i, t, dst + i, n - i);
}

void from_f32(const float* src, void* dst, DType t, long n) {
  auto* h = static_cast<uint16_t*>(dst);
  long i = 0;
  if (t == DType::f16) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  if (t == DType::f32) return from_f32_scalar(src, dst, t, n);
  from_f32_scalar(src + i, h + i, t, n - i);  // bf16: scalar (outputs are few)
}

}  // namespace

namespace tiny_llm::qmm {

const Isa* isa_avx2() {
  // Panels from M = 16 (GFLOPS fused/panel, model shapes, group 32): M = 16: 72/76 (576x576),
  // 86/100 (1536x576), 80/86 (head); M = 512: 77/88, 111/128, 82/90.
  static const Isa isa{"avx2", 2 * V::L, 16, fused, dequantize_panel, panel, to_f32, from_f32,
                       fused_bf16, dequantize_panel_bf16, round_bf16};
  return &isa;
}

}  // namespace tiny_llm::qmm
