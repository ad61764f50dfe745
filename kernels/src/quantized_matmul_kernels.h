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
  // precision="bf16" in this instruction set's fp32 kernels (below bf16_min_m, or without
  // VDPBF16PS): fused and dequantize_panel with w = s * q + b (multiply, then add) rounded to
  // bf16 (nearest even), and n values rounded to bf16 in place (x). bf16 times bf16 is exact
  // in fp32, so only the order of the fp32 additions differs from the bf16 twin.
  void (*fused_bf16)(const Weights& w, const float* x, int M, float* y, long ldy, int n0, int n1);
  void (*dequantize_panel_bf16)(const Weights& w, int n0, int n1, float* out);
  void (*round_bf16)(float* v, long n);
};

// The VDPBF16PS kernels (quantized_matmul_avx512bf16.cpp): bf16 operands, fp32 accumulation.
struct Bf16Kernels {
  const char* name;
  // n values of x (dtype t) -> bf16, nearest even.
  void (*to_bf16)(const void* src, DType t, uint16_t* dst, long n);
  // Rows n0..n1 of W, w = s * q + b (multiply, then add) rounded to bf16, in the pair layout:
  // per block of 16 rows, per k-pair p, 16 dwords (w[n, 2p], w[n, 2p + 1]); in a last block of
  // fewer rows the other lanes repeat its last row. out holds ceil((n1 - n0) / 16) * 16 * K values.
  void (*dequantize_panel)(const Weights& w, int n0, int n1, uint16_t* out);
  // y (M, ldy)[:, 0:rows] = x (M, K) bf16 row-major @ panel (rows, K).T, fp32 accumulation.
  void (*gemm)(const uint16_t* x, int M, int K, const uint16_t* panel, int rows, float* y, long ldy);
};

// precision="int8" (quantized_matmul_int8.cpp, quantized_matmul_avx512vnni.cpp): x rounded per row
// per weight group to int8 (dx = max|x| / 127, xq = round(x / dx), ties to even, clamped to +-127;
// all 0 where dx = 0), integer dots of W's unsigned quants q with xq, then per group, in fp32 and
// in this order for every output:  y += float(isum) * (dw * dx) + bias * xc,  xc = dx * sum(xq).
// Every kernel computes the same integers and the same float operations (no FMA), so every
// path gives the same bits, and so does the twin (impl.quantize.quantized_matmul_int8_mlx).
struct Int8Kernels {
  const char* name;
  // One row of x (K fp32 values, K a multiple of gs) -> xq (K), dx (K / gs), xc (K / gs); xq
  // within each group in the order this set's gemm reads it for `bits` (a permutation: the sum,
  // dx and xc do not depend on it).
  void (*quantize_x)(const float* x, int K, int gs, int bits, int8_t* xq, float* dx, float* xc);
  // Rows n0..n1 of W -> `panel` (at most 16 * K bytes a block of 16 rows), in the layout of this
  // set's gemm; dw and bw: per block of 16 rows, per group, the 16 rows' fp32 scales and biases
  // (block b at + b * 16 * G). A last block of fewer than 16 rows repeats its last row.
  void (*pack)(const Weights& w, int n0, int n1, uint8_t* panel, float* dw, float* bw);
  // The bytes of one packed block of 16 rows: block b of a panel starts at b * block_bytes(K, bits).
  size_t (*block_bytes)(int K, int bits);
  // y (M, ldy)[:, 0:rows] = the int8 product of the M quantized rows of x (xq (M, K), dx and xc
  // (M, K / gs)) with a packed panel of `rows` W rows of `bits` bits.
  void (*gemm)(const int8_t* xq, const float* dx, const float* xc, int M, int K, int gs, int bits,
               const uint8_t* panel, const float* dw, const float* bw, int rows, float* y, long ldy);
};

const Isa& isa_portable();
const Isa* isa_avx2();    // nullptr where not compiled in (non-x86 builds)
const Isa* isa_avx512();  // nullptr where not compiled in
const Bf16Kernels* bf16_avx512();  // nullptr where not compiled in; call only if the CPU has avx512_bf16
const Int8Kernels& int8_portable();
const Int8Kernels* int8_avx512vnni();  // nullptr where not compiled in; call only if the CPU has avx512_vnni

}  // namespace tiny_llm::qmm
