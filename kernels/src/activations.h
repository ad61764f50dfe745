// tiny_llm_kernels.softmax and tiny_llm_kernels.sigmoid: the two activations whose exp dominates
// a training step of week 4's small models. MLX's CPU exp costs about 25 ns an element here
// (measured: 26 ms for 1M floats, numpy's 1.8 ms) and is off by up to 65 ulps; these compute
// exp with a short polynomial the compiler vectorizes, to about 2 ulps. The backward passes are
// MLX ops (impl/train/layers.py gives each a vjp), so only the forward is here.
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// x (..., D) fp32/fp16/bf16 -> softmax over the last axis, in x's dtype; max, exp and sum in
// fp32. A row that is all -inf gives NaN, as exp(x - max) / sum does (twin: impl.basics.softmax).
mx::array softmax(const mx::array& x, mx::StreamOrDevice s = {});

// x (any shape) fp32/fp16/bf16 -> 1 / (1 + exp(-x)) in x's dtype, computed in fp32 from
// e = exp(-|x|) as 1 / (1 + e) for x >= 0 and e / (1 + e) below, so that nothing overflows.
mx::array sigmoid(const mx::array& x, mx::StreamOrDevice s = {});

class ActivationPrimitive : public mx::UnaryPrimitive {
 public:
  enum class Kind { softmax, sigmoid };
  ActivationPrimitive(mx::Stream stream, Kind kind) : mx::UnaryPrimitive(stream), kind_(kind) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return kind_ == Kind::softmax ? "TinyLLMSoftmax" : "TinyLLMSigmoid"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return kind_ == static_cast<const ActivationPrimitive&>(other).kind_;
  }

 private:
  Kind kind_;
};

}  // namespace tiny_llm
