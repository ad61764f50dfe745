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

// x (..., K) fp32/fp16/bf16 ((..., 2K) with swiglu); w_q (N, K * bits / 32) uint32; scales,
// biases (N, K / group_size) fp32/fp16/bf16 -> (..., N) in x's dtype, fp32 accumulation.
// norm_weight (K,): the RMSNorm prologue; residual (..., N) in x's dtype: the epilogue.
mx::array quantized_matmul(const mx::array& x, const mx::array& w_q, const mx::array& scales,
                           const mx::array& biases, int group_size = 64, int bits = 4,
                           const std::optional<mx::array>& norm_weight = std::nullopt, float eps = 1e-5f,
                           bool swiglu = false, const std::optional<mx::array>& residual = std::nullopt,
                           mx::StreamOrDevice s = {});

class QuantizedMatmul : public mx::UnaryPrimitive {
 public:
  QuantizedMatmul(mx::Stream stream, int group_size, int bits, Fusion fusion = {})
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits), fusion_(fusion) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "TinyLLMQuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_ && fusion_ == o.fusion_;
  }

 private:
  int group_size_, bits_;
  Fusion fusion_;
};

// Which code runs: {"isa", "threads", "panel_min_m"}, as text.
std::map<std::string, std::string> quantized_matmul_info();

// For tests and benchmarks: force an instruction set ("portable", "avx2",
// "avx512", "auto" = the best this CPU has; "" keeps it) and the smallest M sent
// to the dequantized-panel kernel (0 = never; -1 = the instruction set's own; -2
// keeps it). Returns the info.
std::map<std::string, std::string> quantized_matmul_configure(const std::string& isa, int panel_min_m);

}  // namespace tiny_llm
