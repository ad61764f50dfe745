// The training models' element-wise activations with their gradients (week 4), one node each way:
//   silu_mul(gate, up): the SwiGLU MLP's silu(gate) * up (the modern block, LoRA's base);
//   gelu(x): GPT-2's GELU, the tanh form (the classic block).
// MLX differentiating their twins (impl.train.layers) takes three to six nodes forward and about
// eight to twelve backward, each alone on one core.
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// gate, up: float32 of one shape -> (gate * s) * up, s = sigmoid(gate) from exp(-|gate|) as
// tiny_llm_kernels.sigmoid computes it.
mx::array silu_mul(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s = {});

// The gradients of silu_mul from dy (the same shape): [dgate, dup] with
//   dup = dy * (gate * s),  dgate = (dy * up) * (s + (gate * s) * (1 - s)).
std::vector<mx::array> silu_mul_backward(const mx::array& gate, const mx::array& up, const mx::array& dy,
                                         mx::StreamOrDevice s = {});

// x float32 -> x * sigmoid(z), z = c * (x + ((k * x) * x) * x), c = sqrt(8 / pi), k = 0.044715: the
// tanh GELU (0.5 x (1 + tanh(z / 2))), with the twin's operations in the twin's order.
mx::array gelu(const mx::array& x, mx::StreamOrDevice s = {});

// The gradient of gelu from dy: dy * (s + (x * s * (1 - s)) * (c * (1 + 3 k x^2))).
mx::array gelu_backward(const mx::array& x, const mx::array& dy, mx::StreamOrDevice s = {});

class TrainActivation : public mx::Primitive {
 public:
  enum class Kind { silu_mul, silu_mul_backward, gelu, gelu_backward };
  TrainActivation(mx::Stream stream, Kind kind) : mx::Primitive(stream), kind_(kind) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override;
  bool is_equivalent(const mx::Primitive& other) const override {
    return kind_ == static_cast<const TrainActivation&>(other).kind_;
  }

 private:
  Kind kind_;
};

}  // namespace tiny_llm
