// tiny_llm_kernels.silu_mul and .silu_mul_backward: the SwiGLU MLP's silu(gate) * up for training
// (week 4), forward and backward one node each. MLX differentiating the twin (impl.train.layers'
// silu, then a product) takes three nodes forward and about eight backward, each alone on one core.
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

class SiluMul : public mx::Primitive {
 public:
  SiluMul(mx::Stream stream, bool backward) : mx::Primitive(stream), backward_(backward) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return backward_ ? "TinyLLMSiluMulBackward" : "TinyLLMSiluMul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return backward_ == static_cast<const SiluMul&>(other).backward_;
  }

 private:
  bool backward_;
};

}  // namespace tiny_llm
