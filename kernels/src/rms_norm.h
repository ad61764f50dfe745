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

// The gradients of y = rms_norm(x, w, eps) (week 4, training): x (..., D), w (D,), dy (x's shape),
// float32. Returns (dx (x's shape), dw (D,)):
//   r = 1 / sqrt(mean(x^2) + eps) per row, g = w * dy, c = mean(g * x);
//   dx = r * g - x * (r^3 * c);  dw = the sum over rows of dy * x * r.
std::vector<mx::array> rms_norm_backward(const mx::array& x, const mx::array& weight, const mx::array& dy,
                                         float eps = 1e-5f, mx::StreamOrDevice s = {});

class RMSNormBackward : public mx::Primitive {
 public:
  RMSNormBackward(mx::Stream stream, float eps) : mx::Primitive(stream), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TinyLLMRMSNormBackward"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RMSNormBackward&>(other).eps_;
  }

 private:
  float eps_;
};

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
