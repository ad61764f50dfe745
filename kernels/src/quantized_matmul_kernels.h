// The CPU kernels behind tiny_llm_kernels.quantized_matmul, free of MLX: one
// table of function pointers per instruction set (portable C++, AVX2+FMA,
// AVX-512), each compiled in its own translation unit with its own -m flags and
// picked at run time, so one wheel runs on any x86-64 (or ARM) CPU.
//
// The format is MLX's affine quantization: w = scale * q + bias per group of
// `group_size` values along K; q packed little-endian in uint32 words, value i
// of a word in bits [i*bits, (i+1)*bits).
#pragma once

#include <cstddef>
#include <cstdint>

namespace tiny_llm::qmm {

enum class DType { f32, f16, bf16 };  // activations, outputs, scales and biases

struct Weights {
  const uint32_t* w;   // (N, K * bits / 32)
  const void* scales;  // (N, K / group_size), dtype `scale_dtype`
  const void* biases;  // (N, K / group_size), dtype `scale_dtype`
  DType scale_dtype;
  int N, K, group_size, bits;
};

struct Isa {
  const char* name;
  // 4-bit kernels read x permuted in chunks of `chunk` values: the even-indexed
  // values of the chunk, then the odd ones (the low and high nibbles of its bytes).
  int chunk;
  // The smallest M sent to the panel kernels (0: never): both paths give the same
  // bits (see kernels_impl.h), so this is a speed choice only, measured per ISA.
  int panel_min_m;
  // y[m, n] for m < M, n0 <= n < n1: fused unpack + dequantize + FMA, fp32
  // accumulation. x (M, K) fp32, permuted as above for 4 bits; y (M, ldy).
  void (*fused)(const Weights& w, const float* x, int M, float* y, long ldy, int n0, int n1);
  // out (n1 - n0, K) fp32 = rows n0..n1 dequantized, in the order of the kernels'
  // x (4 bits: permuted by `chunk`); and y (M, ldy)[:, 0:rows] = x (M, K) @ panel
  // (rows, K).T on such a panel: for large M, where each weight serves M rows of x.
  void (*dequantize_panel)(const Weights& w, int n0, int n1, float* out);
  void (*panel)(const float* x, int M, int K, const float* panel, int rows, float* y, long ldy);
  // n contiguous values, converted (fp16 and bf16 round to nearest even).
  void (*to_f32)(const void* src, DType t, float* dst, long n);
  void (*from_f32)(const float* src, void* dst, DType t, long n);
};

const Isa& isa_portable();
const Isa* isa_avx2();    // nullptr where not compiled in (non-x86 builds)
const Isa* isa_avx512();  // nullptr where not compiled in

}  // namespace tiny_llm::qmm
