// tiny_llm_kernels.quantized_matmul: y = x @ dequantize(w_q, scales, biases).T as
// an MLX primitive with a CPU implementation, so it stays in MLX's lazy graph.
#pragma once

#include <map>
#include <string>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// x (..., K) fp32/fp16/bf16; w_q (N, K * bits / 32) uint32; scales, biases
// (N, K / group_size) fp32/fp16/bf16 -> (..., N) in x's dtype, fp32 accumulation.
mx::array quantized_matmul(const mx::array& x, const mx::array& w_q, const mx::array& scales,
                           const mx::array& biases, int group_size = 64, int bits = 4,
                           mx::StreamOrDevice s = {});

class QuantizedMatmul : public mx::UnaryPrimitive {
 public:
  QuantizedMatmul(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "TinyLLMQuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

 private:
  int group_size_, bits_;
};

// Which code runs: {"isa", "threads", "panel_min_m"}, as text.
std::map<std::string, std::string> quantized_matmul_info();

// For tests and benchmarks: force an instruction set ("portable", "avx2",
// "avx512", "auto" = the best this CPU has; "" keeps it) and the smallest M sent
// to the dequantized-panel kernel (0 = never; -1 keeps it). Returns the info.
std::map<std::string, std::string> quantized_matmul_configure(const std::string& isa, int panel_min_m);

}  // namespace tiny_llm
