// A 16 x 16 transpose of dwords in AVX-512 registers, shared by the kernels that lay W rows out
// across a vector's lanes (quantized_matmul_avx512bf16.cpp, quantized_matmul_avx512vnni.cpp).
// Include only from translation units compiled with -mavx512f. Internal linkage (each unit keeps
// its own copy, compiled with its own flags), as the other per-instruction-set headers.
#pragma once

#include <immintrin.h>

namespace {

// r[0..16): 16 rows' dword vectors -> r[i] = dword i of every row (a 16 x 16 transpose).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4a + c] now holds, per 128-bit lane L, dword c of rows 4a..4a+3 of that lane's 4 dwords:
  // lane L of r[4a + c] = rows 4a..4a+3 at column 4L + c.
  for (int c = 0; c < 4; ++c) {
    const __m512i a0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), a1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    const __m512i b0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88),
                  b1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_i32x4(a0, b0, 0x88);       // column c
    t[8 + c] = _mm512_shuffle_i32x4(a0, b0, 0xdd);   // column 8 + c
    t[4 + c] = _mm512_shuffle_i32x4(a1, b1, 0x88);   // column 4 + c
    t[12 + c] = _mm512_shuffle_i32x4(a1, b1, 0xdd);  // column 12 + c
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

}  // namespace
