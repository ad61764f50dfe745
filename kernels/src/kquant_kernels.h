// The CPU kernels behind tiny_llm_kernels.kquant_matmul, free of MLX: x times GGUF k-quant
// weights kept in their own bytes (llama.cpp's block layouts, ggml-common.h), one table of
// function pointers per instruction set, as quantized_matmul_kernels.h does for MLX's format.
//
//   Q4_K  256 values, 144 bytes: d, dmin fp16; 12 bytes of 6-bit (sc, m) for 8 sub-blocks of 32;
//         128 bytes of nibbles (per 64 values: 32 low nibbles, then the 32 high ones).
//         w = (d sc) q - (dmin m), q in 0..15.
//   Q6_K  256 values, 210 bytes: ql 128 bytes (low 4 bits), qh 64 bytes (high 2 bits), 16 int8
//         scales (sub-blocks of 16), d fp16. w = (d sc) (q - 32), q in 0..63.
// Every weight is exact in fp32 (an 11-bit d times a 6- or 8-bit scale times a 4- or 6-bit q).
//
// Two ways to multiply (chosen by the caller, see kquant_matmul.h):
//   fp32: x as given, w decoded to fp32 a block at a time, fp32 products and sums.
//   int8: x quantized per block of 256 to int8 (Q8), w's integer q dotted with it in integers
//         (VNNI's vpdpbusd on AVX-512), then scaled: llama.cpp's arithmetic for these types.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tiny_llm::kq {

constexpr int QK = 256;  // values a block
enum class Type { q4_k, q6_k };
inline size_t block_bytes(Type t) { return t == Type::q4_k ? 144 : 210; }

// A run of rows of one type: row n's bytes at w + n * row_bytes.
struct Rows {
  const uint8_t* w;
  Type type;
  size_t row_bytes;
  int n, K;
};

// x quantized (int8 mode), M rows of K: per block b of 256 values, d[b] = max|x| / 127 and
// q = round(x / d[b]) (nearest, ties to even; 0 where d = 0). qp: the same q with each 128
// values reordered as Q4_K's nibbles come out of one 64-byte load (values 0-31, 64-95, 32-63,
// 96-127), so the AVX-512 kernel unpacks a Q4_K block with 2 loads, 2 shifts and 4 ands. bs[b]
// 32 int16: the sums of q over its 16 sub-blocks of 16 (lanes 0-15), then 8 zeros, then the sums
// over its 8 sub-blocks of 32 (lanes 24-31; |sum| <= 32 * 127 fits), the layouts the AVX-512
// kernels multiply with the scales (vpmaddwd).
struct Q8 {
  const int8_t* q;    // (M, K)
  const int8_t* qp;   // (M, K), Q4_K's order
  const float* d;     // (M, K / 256)
  const int16_t* bs;  // (M, K / 256, 32)
  int K;
};

struct Isa {
  const char* name;
  // y (M, ldy)[:, n0:n1] = x (M, K) fp32 @ W[n0:n1].T, fp32: each block decoded once for the M rows.
  void (*dot_f32)(const Rows& w, int n0, int n1, const float* x, int M, float* y, long ldy);
  // The same with x as Q8 (int8 mode).
  void (*dot_q8)(const Rows& w, int n0, int n1, const Q8& x, int M, float* y, long ldy);
  // out (n1 - n0, K) fp32 = rows n0..n1 decoded (prefill's panels).
  void (*dequantize)(const Rows& w, int n0, int n1, float* out);
  // One row of K fp32 values -> its Q8 q (K), qp (K), d (K / 256), bs (K / 256 * 32).
  void (*quantize_x)(const float* x, int K, int8_t* q, int8_t* qp, float* d, int16_t* bs);
};

const Isa& isa_portable();
const Isa* isa_avx2();    // nullptr where not compiled in (non-x86 builds)
const Isa* isa_avx512();  // AVX-512 with VNNI; nullptr where not compiled in

}  // namespace tiny_llm::kq
