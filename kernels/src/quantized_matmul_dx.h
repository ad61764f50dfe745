// tiny_llm_kernels.quantized_matmul_dx: dx = dy @ dequantize(w_q, scales, biases), the x-gradient
// of week 2's y = x @ W^T (QLoRA, topic 4.7), as an MLX primitive with a CPU implementation.
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// dy (..., N) fp32/fp16/bf16; w_q (N, K * bits / 32) uint32; scales, biases (N, K / group_size)
// fp32/fp16/bf16 -> dx (..., K) in dy's dtype, accumulated in fp32 over n = 0, 1, ..., N - 1 in
// order (twin: impl.train.qlora.quantized_matmul_dx_mlx). bits 4 or 8, group_size 32/64/128.
mx::array quantized_matmul_dx(const mx::array& dy, const mx::array& w_q, const mx::array& scales,
                              const mx::array& biases, int group_size = 64, int bits = 4, mx::StreamOrDevice s = {});

class QuantizedMatmulDx : public mx::UnaryPrimitive {
 public:
  QuantizedMatmulDx(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "TinyLLMQuantizedMatmulDx"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedMatmulDx&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

 private:
  int group_size_, bits_;
};

}  // namespace tiny_llm
