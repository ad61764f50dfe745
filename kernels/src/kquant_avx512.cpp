// The k-quant kernels for AVX-512 with VNNI (compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512dq -mavx512vnni -mavx2 -mfma -mf16c; run only where the CPU reports them all).
// fp32 mode and the panels: each block decoded to fp32 in registers from the same unpacked bytes.
// int8 mode: 64 weights a register as unsigned bytes, vpdpbusd against 64 int8 values of x,
// packed to int16 and multiplied by the sub-blocks' scales (see q4k_rows), so a whole block's sum
// stays in exact integers until one conversion to fp32.
#include <immintrin.h>

#include "kquant_kernels_impl.h"

namespace {

// q4k_scales in one register, sc[0..7] then m[0..7] (bytes), without a round trip through memory
// (bytes stored one by one and loaded as a vector stall the load). s: the 12 bytes (16 are read).
inline __m128i q4k_scales_vec(const uint8_t* s) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
  // a: the byte holding each output's low bits; t: the byte holding the top 2 bits of outputs 4-7, 12-15
  const __m128i a = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
  const __m128i t = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 4, 5, 6, 7));
  const __m128i a2 = _mm_mask_blend_epi8(__mmask16(0xF000), a, _mm_srli_epi16(a, 4));  // m[4..7]: the high nibbles
  const __m128i low = _mm_and_si128(a2, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
  const __m128i top = _mm_and_si128(_mm_srli_epi16(t, 2), _mm_setr_epi8(0, 0, 0, 0, 0x30, 0x30, 0x30, 0x30, 0, 0, 0,
                                                                        0, 0x30, 0x30, 0x30, 0x30));
  return _mm_or_si128(low, top);
}

// Q4_K: 4 registers a block, register c = values 64c..64c+63 = sub-blocks 2c (lanes 0-7) and
// 2c+1 (lanes 8-15). The scales vector holds sc in lanes 0-7 and m in lanes 8-15.
inline void q4k_block(const uint8_t* b, __m512i q[4], __m512i s[4], __m512i& scm) {
  scm = _mm512_cvtepu8_epi32(q4k_scales_vec(b + 4));
  const __m512i low4 = _mm512_set1_epi8(15);
  for (int c = 0; c < 4; ++c) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * c));
    __m512i t = _mm512_inserti64x4(_mm512_castsi256_si512(raw), raw, 1);  // [bytes | bytes]
    t = _mm512_mask_srli_epi16(t, __mmask32(0xFFFF0000u), t, 4);         // [bytes | bytes >> 4]
    q[c] = _mm512_and_si512(t, low4);
    s[c] = _mm512_permutexvar_epi32(_mm512_set_epi32(2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1,
                                                     2 * c + 1, 2 * c + 1, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c,
                                                     2 * c, 2 * c),
                                    scm);
  }
}

// Q6_K: register k = values 64k..64k+63 (k = 2h + part of half h); lane i holds sub-block 4k + i/4.
inline void q6k_block(const uint8_t* b, __m512i q[4], __m512i s[4], __m512i& sc) {
  sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)));
  const __m512i low4 = _mm512_set1_epi8(15), bits45 = _mm512_set1_epi8(0x30);
  // per 16-bit lane: shift the lower 256 bits by the first count, the upper by the second
  const __m512i shl_a = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
  const __m512i shr_b = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
  for (int h = 0; h < 2; ++h) {
    const __m512i l = _mm512_loadu_si512(b + 64 * h);  // ql[l], l = 0..63 of this half
    const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
    const __m512i hh = _mm512_inserti64x4(_mm512_castsi256_si512(hb), hb, 1);
    // values 0..63: low nibbles of ql, qh bits (0,1) for the first 32, (2,3) for the next
    q[2 * h] = _mm512_or_si512(_mm512_and_si512(l, low4), _mm512_and_si512(_mm512_sllv_epi16(hh, shl_a), bits45));
    // values 64..127: high nibbles of ql, qh bits (4,5), then (6,7)
    q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low4),
                                   _mm512_and_si512(_mm512_srlv_epi16(hh, shr_b), bits45));
  }
  for (int k = 0; k < 4; ++k) {
    const int a = 4 * k;
    s[k] = _mm512_permutexvar_epi32(
        _mm512_set_epi32(a + 3, a + 3, a + 3, a + 3, a + 2, a + 2, a + 2, a + 2, a + 1, a + 1, a + 1, a + 1, a, a, a, a), sc);
  }
}

// One block -> 256 fp32 weights, the values decode_block gives (every product is exact, so the
// FMA's single rounding is the add's): 16 at a time from the bytes q4k_block / q6k_block unpack.
void decode_block_avx512(Type t, const uint8_t* b, float* w) {
  __m512i q[4], s[4], sv;
  alignas(64) float scale[16], bias[16];
  if (t == Type::q4_k) {
    q4k_block(b, q, s, sv);
    const __m512 f = _mm512_cvtepi32_ps(sv);  // sc in lanes 0-7, m in 8-15
    _mm512_store_ps(scale, _mm512_mul_ps(f, _mm512_set1_ps(f16(b))));
    _mm512_store_ps(bias, _mm512_mul_ps(f, _mm512_set1_ps(-f16(b + 2))));  // -(dmin m): lanes 8-15
  } else {
    q6k_block(b, q, s, sv);
    _mm512_store_ps(scale, _mm512_mul_ps(_mm512_cvtepi32_ps(sv), _mm512_set1_ps(f16(b + 208))));
  }
  for (int c = 0; c < 4; ++c)
    for (int k = 0; k < 4; ++k) {  // values 64c + 16k ..: sub-block 2c + k / 2 (Q4_K), 4c + k (Q6_K)
      __m128i bytes;
      switch (k) {
        case 0: bytes = _mm512_extracti32x4_epi32(q[c], 0); break;
        case 1: bytes = _mm512_extracti32x4_epi32(q[c], 1); break;
        case 2: bytes = _mm512_extracti32x4_epi32(q[c], 2); break;
        default: bytes = _mm512_extracti32x4_epi32(q[c], 3); break;
      }
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
      __m512 out;
      if (t == Type::q4_k) {
        const int j = 2 * c + k / 2;
        out = _mm512_fmadd_ps(v, _mm512_set1_ps(scale[j]), _mm512_set1_ps(bias[8 + j]));
      } else {
        out = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_set1_ps(32.0f)), _mm512_set1_ps(scale[4 * c + k]));
      }
      _mm512_storeu_ps(w + 64 * c + 16 * k, out);
    }
}

void dot_f32_avx512(const Rows& W, int n0, int n1, const float* x, int M, float* y, long ldy) {
  const int nb = W.K / QK;
  const size_t bb = tiny_llm::kq::block_bytes(W.type);
  alignas(64) float w[QK];
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = W.w + size_t(n) * W.row_bytes;
    for (int m0 = 0; m0 < M; m0 += kRows) {
      const int mr = std::min(kRows, M - m0);
      __m512 acc[kRows];
      for (int r = 0; r < mr; ++r) acc[r] = _mm512_setzero_ps();
      for (int b = 0; b < nb; ++b) {
        decode_block_avx512(W.type, row + b * bb, w);
        for (int r = 0; r < mr; ++r) {
          const float* xr = x + size_t(m0 + r) * W.K + b * QK;
          for (int i = 0; i < QK; i += 16)
            acc[r] = _mm512_fmadd_ps(_mm512_load_ps(w + i), _mm512_loadu_ps(xr + i), acc[r]);
        }
      }
      for (int r = 0; r < mr; ++r) y[size_t(m0 + r) * ldy + n] = _mm512_reduce_add_ps(acc[r]);
    }
  }
}

void dequantize_avx512(const Rows& W, int n0, int n1, float* out) {
  const int nb = W.K / QK;
  const size_t bb = tiny_llm::kq::block_bytes(W.type);
  for (int n = n0; n < n1; ++n)
    for (int b = 0; b < nb; ++b)
      decode_block_avx512(W.type, W.w + size_t(n) * W.row_bytes + b * bb, out + size_t(n - n0) * W.K + b * QK);
}

// int8 mode, R rows of x at a time (R a constant: the rows are unrolled and each keeps one
// accumulator in a register). Per block and row, the integer sum over the block of sc_j * (q . x
// over sub-block j): vpdpbusd (unsigned q times int8 x, 4 adjacent products summed into an int32
// lane: |lane| <= 4 * 63 * 127 < 2^15), vpackssdw of two such registers into int16 lanes (no
// saturation, by that bound), then vpmaddwd / vpdpwssd against the sub-blocks' scales as int16
// (pairs summed into int32 lanes: the block's total < 256 * 63 * 127 * 128 < 2^31): exact until
// one conversion to fp32. The -32 (Q6_K): -32 sc_j times x's sums over sub-blocks (Q8::bs,
// vpmaddwd) in the same integers (|total| <= 256 * 32 * 128 * 127 < 2^31), one FMA a block and row.
// The mins (Q4_K), whose scale is dmin, not d: m_j times x's sums over sub-blocks of 32 in 128-bit
// registers, a second, 4-lane accumulator a row. Each row's accumulators are reduced once, at the
// row's end. Measured on the 1.5B's gate/up weight (Zen 4, 2 cores), per
// block and row at 8 rows: 1.8 ns against 2.1 ns for vpmaddubsw + vpdpwssd on each register with
// a second accumulator a row (which spilled to the stack from 7 rows).
//
// vpackssdw works within 128-bit lanes: pack(a, b) holds, in 128-bit lane L, a's int32 lanes
// 4L..4L+3 then b's. pack_index builds the vpermw index that puts, in each int16 lane, the scale
// of the sub-block that lane's products came from: sub(L, second) for 128-bit lane L, second = the
// lane came from b.
//
// W's bytes 2 KB ahead (8-14 blocks) asked into L1 as each block is read. At 5-8 rows of x a
// block's dots take long enough that the hardware prefetcher alone left the block loads waiting on
// memory (perf annotate: the loads of W were q6k_rows<5>'s hottest instructions). Measured on the
// 1.5B's layers (Zen 4, 2 threads), ns a block and row of x: Q4_K gate/up at 5 rows 4.7 -> 3.8,
// Q6_K down 6.9 -> 5.1, the Q6_K head 4.6 -> 3.8; at 8 rows the head 17.8 -> 13.4 ms; 1 row
// (bandwidth-bound) unchanged. 1, 2 and 3 KB measured alike; 512 bytes too near, 4 KB no better.
constexpr size_t kPrefetchAhead = 2048;
inline void prefetch_block(const uint8_t* p, size_t bytes) {
  for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead + o), _MM_HINT_T0);
}

template <class F>
inline __m512i pack_index(F sub) {
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 32; ++i) idx[i] = int16_t(sub(i / 8, i % 8 >= 4));
  return _mm512_load_si512(idx);
}

// Q4_K: the 128 bytes of nibbles as two loads of 64; low and high nibbles give 4 registers of
// 64 q, holding sub-blocks (0 | 2), (1 | 3), (4 | 6), (5 | 7) (256-bit halves): x's Q4_K order
// (Q8::qp) matches. Packed, 128-bit lanes 0-1 hold sub-blocks 0, 1 (4, 5), lanes 2-3 hold 2, 3 (6, 7).
template <int R>
void q4k_rows(const Rows& W, int n0, int n1, const Q8& X, int m0, float* y, long ldy) {
  const int nb = W.K / QK;
  const __m512i low4 = _mm512_set1_epi8(15);
  const __m512i i01 = pack_index([](int L, bool b) { return (L < 2 ? 0 : 2) + b; });
  const __m512i i45 = pack_index([](int L, bool b) { return (L < 2 ? 4 : 6) + b; });
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = W.w + size_t(n) * W.row_bytes;
    __m512 acc[R];
    __m128 accm[R];  // the mins' part
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), accm[r] = _mm_setzero_ps();
    for (int b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * 144;
      prefetch_block(blk, 144);
      const __m512i v0 = _mm512_loadu_si512(blk + 16), v1 = _mm512_loadu_si512(blk + 80);
      const __m512i q0 = _mm512_and_si512(v0, low4), q1 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low4);
      const __m512i q2 = _mm512_and_si512(v1, low4), q3 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low4);
      const __m256i scm = _mm256_cvtepu8_epi16(q4k_scales_vec(blk + 4));  // sc[0..7], m[0..7] as int16
      const __m512i sc = _mm512_castsi256_si512(scm);
      const __m512i s01 = _mm512_permutexvar_epi16(i01, sc), s45 = _mm512_permutexvar_epi16(i45, sc);
      const __m128i m16 = _mm256_extracti128_si256(scm, 1);  // m[0..7] as int16
      const float d = f16(blk), dmin = f16(blk + 2);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const size_t xb = size_t(m0 + r) * nb + b;
        const int8_t* x = X.qp + xb * QK;
        const __m512i z = _mm512_setzero_si512();
        const __m512i p0 = _mm512_dpbusd_epi32(z, q0, _mm512_loadu_si512(x));
        const __m512i p1 = _mm512_dpbusd_epi32(z, q1, _mm512_loadu_si512(x + 64));
        const __m512i p2 = _mm512_dpbusd_epi32(z, q2, _mm512_loadu_si512(x + 128));
        const __m512i p3 = _mm512_dpbusd_epi32(z, q3, _mm512_loadu_si512(x + 192));
        const __m512i sum = _mm512_dpwssd_epi32(_mm512_madd_epi16(_mm512_packs_epi32(p0, p1), s01),
                                                _mm512_packs_epi32(p2, p3), s45);
        // m_j times x's sums over sub-blocks of 32 (bs lanes 24-31), in pairs: 4 int32 lanes
        const __m128i mins = _mm_madd_epi16(m16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(X.bs + xb * 32 + 24)));
        const float dx = X.d[xb];
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d * dx), acc[r]);
        accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(mins), _mm_set1_ps(-dmin * dx), accm[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      y[size_t(m0 + r) * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], _mm512_zextps128_ps512(accm[r])));
  }
}

// Q6_K: register k = values 64k..64k+63 (x's natural order), as q6k_block builds them; its
// 128-bit lane i is sub-block 4k + i. Packed (k = 0, 1), 128-bit lane L holds sub-blocks L and 4 + L.
template <int R>
void q6k_rows(const Rows& W, int n0, int n1, const Q8& X, int m0, float* y, long ldy) {
  const int nb = W.K / QK;
  const __m512i low4 = _mm512_set1_epi8(15), bits45 = _mm512_set1_epi8(0x30);
  const __m512i shl_a = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
  const __m512i shr_b = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
  const __m512i i01 = pack_index([](int L, bool b) { return L + 4 * b; });
  const __m512i i23 = pack_index([](int L, bool b) { return 8 + L + 4 * b; });
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = W.w + size_t(n) * W.row_bytes;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * 210;
      prefetch_block(blk, 210);
      __m512i q[4];
      for (int h = 0; h < 2; ++h) {
        const __m512i l = _mm512_loadu_si512(blk + 64 * h);
        const __m512i hh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h)));
        // (l & 15) | (shifted qh & 0x30): vpternlog's A | (B & C)
        q[2 * h] = _mm512_ternarylogic_epi32(_mm512_and_si512(l, low4), _mm512_sllv_epi16(hh, shl_a), bits45, 0xF8);
        q[2 * h + 1] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(l, 4), low4),
                                                 _mm512_srlv_epi16(hh, shr_b), bits45, 0xF8);
      }
      const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
      const __m512i sc = _mm512_castsi256_si512(sc16);
      const __m512i sc_m32 = _mm512_zextsi256_si512(_mm256_slli_epi16(_mm256_sub_epi16(_mm256_setzero_si256(), sc16), 5));
      const __m512i s01 = _mm512_permutexvar_epi16(i01, sc), s23 = _mm512_permutexvar_epi16(i23, sc);
      const float d = f16(blk + 208);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const size_t xb = size_t(m0 + r) * nb + b;
        const int8_t* x = X.q + xb * QK;
        const __m512i z = _mm512_setzero_si512();
        const __m512i p0 = _mm512_dpbusd_epi32(z, q[0], _mm512_loadu_si512(x));
        const __m512i p1 = _mm512_dpbusd_epi32(z, q[1], _mm512_loadu_si512(x + 64));
        const __m512i p2 = _mm512_dpbusd_epi32(z, q[2], _mm512_loadu_si512(x + 128));
        const __m512i p3 = _mm512_dpbusd_epi32(z, q[3], _mm512_loadu_si512(x + 192));
        // q - 32 in the same integers: -32 sc_j times x's sum over sub-block j of 16 (bs lanes 0-15;
        // lanes 16-31 meet zeros), |total| <= 256 * 32 * 127 * 128 < 2^31
        const __m512i off = _mm512_madd_epi16(sc_m32, _mm512_loadu_si512(X.bs + xb * 32));
        const __m512i sum = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(off, _mm512_packs_epi32(p0, p1), s01),
                                                _mm512_packs_epi32(p2, p3), s23);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d * X.d[xb]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) y[size_t(m0 + r) * ldy + n] = _mm512_reduce_add_ps(acc[r]);
  }
}

template <int R>
void rows_q8(const Rows& W, int n0, int n1, const Q8& X, int m0, float* y, long ldy) {
  if (W.type == Type::q4_k) {
    q4k_rows<R>(W, n0, n1, X, m0, y, ldy);
  } else {
    q6k_rows<R>(W, n0, n1, X, m0, y, ldy);
  }
}

void dot_q8_vnni(const Rows& W, int n0, int n1, const Q8& X, int M, float* y, long ldy) {
  static_assert(kRows == 8, "one case per count of rows");
  // More than 8 rows of x: 16 rows of W at a time (at most 16 x 35 blocks, in L1/L2) for all of them.
  const int step = M > kRows ? 16 : n1 - n0;
  for (int a = n0; a < n1; a += step) {
    const int b = std::min(n1, a + step);
    for (int m0 = 0; m0 < M; m0 += kRows) {
      switch (std::min(kRows, M - m0)) {
        case 1: rows_q8<1>(W, a, b, X, m0, y, ldy); break;
        case 2: rows_q8<2>(W, a, b, X, m0, y, ldy); break;
        case 3: rows_q8<3>(W, a, b, X, m0, y, ldy); break;
        case 4: rows_q8<4>(W, a, b, X, m0, y, ldy); break;
        case 5: rows_q8<5>(W, a, b, X, m0, y, ldy); break;
        case 6: rows_q8<6>(W, a, b, X, m0, y, ldy); break;
        case 7: rows_q8<7>(W, a, b, X, m0, y, ldy); break;
        default: rows_q8<8>(W, a, b, X, m0, y, ldy); break;
      }
    }
  }
}

// quantize_x (kquant_kernels_impl.h) 16 values at a time, the same values: x / d divided and
// rounded to nearest, ties to even (vcvtps2dq in the default rounding mode, as std::nearbyint).
void quantize_x_avx512(const float* x, int K, int8_t* q, int8_t* qp, float* d, int16_t* bs) {
  for (int b = 0; b < K / QK; ++b, x += QK, q += QK, qp += QK, bs += 32) {
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < QK; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    const float db = _mm512_reduce_max_ps(amax) / 127.0f;
    d[b] = db;
    const __m512 dv = _mm512_set1_ps(db);
    for (int j = 0; j < 16; ++j) {
      __m512i v = _mm512_setzero_si512();
      if (db != 0.0f) {
        v = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(x + 16 * j), dv));
        v = _mm512_max_epi32(_mm512_set1_epi32(-127), _mm512_min_epi32(_mm512_set1_epi32(127), v));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * j), _mm512_cvtepi32_epi8(v));
      bs[j] = int16_t(_mm512_reduce_add_epi32(v));
    }
    for (int h = 0; h < QK; h += 128) {  // Q4_K's order: per 128, values 0-31, 64-95, 32-63, 96-127
      std::memcpy(qp + h, q + h, 32), std::memcpy(qp + h + 32, q + h + 64, 32);
      std::memcpy(qp + h + 64, q + h + 32, 32), std::memcpy(qp + h + 96, q + h + 96, 32);
    }
    for (int j = 0; j < 8; ++j) bs[16 + j] = 0, bs[24 + j] = int16_t(bs[2 * j] + bs[2 * j + 1]);
  }
}

}  // namespace

namespace tiny_llm::kq {

const Isa* isa_avx512() {
  static const Isa isa{"avx512_vnni", dot_f32_avx512, dot_q8_vnni, dequantize_avx512, quantize_x_avx512};
  return &isa;
}

}  // namespace tiny_llm::kq
