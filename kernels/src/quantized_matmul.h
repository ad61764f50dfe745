// tiny_llm_kernels.quantized_matmul: y = x @ dequantize(w_q, scales, biases).T as
// an MLX primitive with a CPU implementation, so it stays in MLX's lazy graph.
#pragma once

#include <map>
#include <optional>
#include <string>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// What runs in the same node around the matmul (kernel fusion: one graph node where the
// engine's layer had two or three; each piece rounds exactly as its own kernel does):
//   prologue: x -> rms_norm(x, norm_weight, eps), or swiglu(x) = silu(gate) * up for
//     x = [gate | up] (2K wide);
//   epilogue: y -> y + residual, y rounded to x's dtype first (as `linear(x, w) + r`).
struct Fusion {
  enum Prologue { kNone, kRMSNorm, kSwiGLU } prologue = kNone;
  float eps = 0.0f;
  bool residual = false;
  bool operator==(const Fusion& o) const { return prologue == o.prologue && eps == o.eps && residual == o.residual; }
};

// The arithmetic of quantized_matmul's product (its `precision` argument).
enum class Precision { kFp32, kBf16, kInt8 };

// The fused pieces' argument checks, shared by quantized_matmul and kquant_matmul (each throws
// std::invalid_argument("<op>: ...")). fused_k: one prologue at most, and with swiglu an even
// last axis; returns K, the matmul's inner size (x's last axis, halved by swiglu).
int fused_k(const std::string& op, const mx::array& x, const std::optional<mx::array>& norm_weight, bool swiglu);
// fusion_inputs: norm_weight must be a float (K,) array, residual the output's shape `out` in x's
// dtype; appends their inputs to `inputs` (norm_weight cast to x's dtype, as the RMSNorm kernel
// takes it) and returns the Fusion.
Fusion fusion_inputs(const std::string& op, const mx::array& x, int K, const mx::Shape& out,
                     const std::optional<mx::array>& norm_weight, float eps, bool swiglu,
                     const std::optional<mx::array>& residual, const mx::Stream& stream,
                     std::vector<mx::array>& inputs);

// x (..., K) fp32/fp16/bf16 ((..., 2K) with swiglu); w_q (N, K * bits / 32) uint32; scales,
// biases (N, K / group_size) fp32/fp16/bf16 -> (..., N) in x's dtype, fp32 accumulation.
// norm_weight (K,): the RMSNorm prologue; residual (..., N) in x's dtype: the epilogue.
// precision "fp32" (default): fp32 operands. "bf16": the matmul's operands rounded to bf16 (x after
// the prologue; w = s * q + b computed in fp32, multiply then add, then rounded), products
// accumulated in fp32 (twin: impl.quantize.quantized_matmul_bf16_mlx); from M = bf16_min_m rows
// on AVX512-BF16 CPUs this runs VDPBF16PS, else the fp32 kernels on the rounded operands. precision
// names the arithmetic at every M; which precision pays is the caller's choice: bf16 is ~2-3x
// faster from M ~ 64, ~1.2x at M = 16, and slower than fp32 below M ~ 12 (kernels/check_qmm_bf16.py).
// "int8": x rounded per row per weight group to int8 (dx = max|x| / 127, ties to even), exact
// integer dots with W's quants (AVX512-VNNI vpdpbusd, else plain C++: the same bits), then per
// group y += float(isum) * (dw * dx) + bias * (dx * sum xq) in fp32, in one fixed order at every M
// (twin: impl.quantize.quantized_matmul_int8_mlx, equal bit for bit).
mx::array quantized_matmul(const mx::array& x, const mx::array& w_q, const mx::array& scales,
                           const mx::array& biases, int group_size = 64, int bits = 4,
                           const std::optional<mx::array>& norm_weight = std::nullopt, float eps = 1e-5f,
                           bool swiglu = false, const std::optional<mx::array>& residual = std::nullopt,
                           const std::string& precision = "fp32",
                           const std::optional<mx::array>& int8_packed = std::nullopt, mx::StreamOrDevice s = {});

// precision="int8" packs the weight's rows into its kernels' layout at every call, unless it is
// given int8_packed: the weight packed once by this op (a 1-D uint8 array: a header naming the
// kernel set and the shape, the quants, the scales and biases in fp32; about the weight's own
// size plus 8 bytes a group). The product's bits are the same either way; a packed array made
// for another kernel set or shape is not read (the call packs, as without it).
mx::array quantized_matmul_int8_pack(const mx::array& w_q, const mx::array& scales, const mx::array& biases,
                                     int group_size = 64, int bits = 4, mx::StreamOrDevice s = {});

class QuantizedMatmulInt8Pack : public mx::UnaryPrimitive {
 public:
  QuantizedMatmulInt8Pack(mx::Stream stream, int group_size, int bits, const void* kernels)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits), kernels_(kernels) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "TinyLLMQuantizedMatmulInt8Pack"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedMatmulInt8Pack&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_ && kernels_ == o.kernels_;
  }

 private:
  int group_size_, bits_;
  const void* kernels_;  // the qmm::Int8Kernels that packs (its layout is the header's)
};

class QuantizedMatmul : public mx::UnaryPrimitive {
 public:
  QuantizedMatmul(mx::Stream stream, int group_size, int bits, Fusion fusion = {},
                  Precision precision = Precision::kFp32, bool int8_packed = false)
      : mx::UnaryPrimitive(stream),
        group_size_(group_size),
        bits_(bits),
        fusion_(fusion),
        precision_(precision),
        int8_packed_(int8_packed) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "TinyLLMQuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_ && fusion_ == o.fusion_ && precision_ == o.precision_ &&
           int8_packed_ == o.int8_packed_;
  }

 private:
  int group_size_, bits_;
  Fusion fusion_;
  Precision precision_;
  bool int8_packed_;  // the last input is the weight packed for precision="int8"
};

// tiny_llm_kernels.gather_quantized_matmul (mixture of experts): row m of x times the quantized
// weights of expert indices[m]: y[m] = x[m] @ dequantize(w_q[e], scales[e], biases[e]).T, e =
// indices[m]. x (M, K) fp32/fp16/bf16; w_q (X, N, K * bits / 32) uint32; scales, biases
// (X, N, K / group_size); indices (M,) uint32 -> (M, N) in x's dtype, fp32 accumulation. A run of
// rows with one expert (rows sorted by expert: one run per expert) is one quantized_matmul on that
// expert's weights, so each expert's weights stream once per run, and each row's bits are those
// quantized_matmul gives it. A row whose index is >= X (routed to no expert) is 0.
mx::array gather_quantized_matmul(const mx::array& x, const mx::array& w_q, const mx::array& scales,
                                  const mx::array& biases, const mx::array& indices, int group_size = 64,
                                  int bits = 4, mx::StreamOrDevice s = {});

class GatherQuantizedMatmul : public mx::UnaryPrimitive {
 public:
  GatherQuantizedMatmul(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "TinyLLMGatherQuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const GatherQuantizedMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

 private:
  int group_size_, bits_;
};

// Which code runs: {"isa", "threads", "panel_min_m", "bf16" (what precision="bf16" runs from
// bf16_min_m rows: "avx512_bf16", or "emulated": the isa's fp32 kernels on bf16-rounded
// operands), "bf16_min_m", "int8" (what precision="int8" runs: "avx512_vnni" or "portable")}, as text.
std::map<std::string, std::string> quantized_matmul_info();

// For tests and benchmarks: force an instruction set ("portable", "avx2",
// "avx512", "auto" = the best this CPU has; "" keeps it), the smallest M sent
// to the dequantized-panel kernel (0 = never; -1 = the instruction set's own; -2
// keeps it) and the smallest M that precision="bf16" sends to the VDPBF16PS kernel
// (0 = never; -1 = the default; -2 keeps it). Returns the info.
std::map<std::string, std::string> quantized_matmul_configure(const std::string& isa, int panel_min_m,
                                                              int bf16_min_m = -2);

}  // namespace tiny_llm
