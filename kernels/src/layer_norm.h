// tiny_llm_kernels.layer_norm and .layer_norm_backward: the classic (GPT-2) training block's
// LayerNorm (week 4), one node each way where MLX differentiating the twin
// (impl.train.layers.layer_norm_mlx) takes about eight forward and fifteen backward.
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// x (..., D), weight and bias (D,), float32 -> (x - mean) * rstd * weight + bias per row, with
// mean and the biased variance over the row, rstd = 1 / sqrt(var + eps).
mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps = 1e-5f,
                     mx::StreamOrDevice s = {});

// Its gradients from dy (x's shape): [dx, dweight, dbias] with xhat = (x - mean) * rstd, g = dy * w:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat));  dweight = sum over rows of dy * xhat;
//   dbias = sum over rows of dy (each sum per chunk of 64 rows, the chunks then in order).
std::vector<mx::array> layer_norm_backward(const mx::array& x, const mx::array& weight, const mx::array& dy,
                                           float eps = 1e-5f, mx::StreamOrDevice s = {});

class LayerNorm : public mx::Primitive {
 public:
  LayerNorm(mx::Stream stream, float eps, bool backward) : mx::Primitive(stream), eps_(eps), backward_(backward) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return backward_ ? "TinyLLMLayerNormBackward" : "TinyLLMLayerNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const LayerNorm&>(other);
    return eps_ == o.eps_ && backward_ == o.backward_;
  }

 private:
  float eps_;
  bool backward_;
};

}  // namespace tiny_llm
