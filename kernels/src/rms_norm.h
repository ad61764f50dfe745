// tiny_llm_kernels.rms_norm: y = x / sqrt(mean(x^2) + eps) * weight over the last
// axis, one MLX primitive instead of the ~8 array ops of its twin (impl.norm.RMSNorm).
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// x (..., D) fp32/fp16/bf16; weight (D,) -> (..., D) in x's dtype. The mean of
// squares is accumulated in fp32; (x * rms) is rounded to x's dtype before it is
// multiplied by the weight (also in x's dtype), as the twin does.
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps = 1e-5f, mx::StreamOrDevice s = {});

class RMSNormPrimitive : public mx::UnaryPrimitive {
 public:
  RMSNormPrimitive(mx::Stream stream, float eps) : mx::UnaryPrimitive(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "TinyLLMRMSNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RMSNormPrimitive&>(other).eps_;
  }

 private:
  float eps_;
};

}  // namespace tiny_llm
