// tiny_llm_kernels.causal_attention and .causal_attention_backward: week 4's training attention
// (topic 4.3) as two MLX primitives. The twin, impl.attention.scaled_dot_product_attention_grouped
// with MLX's autodiff, is about thirty graph nodes forward and backward (transposes, batched matmuls
// of 64 x 64 tiles, the mask, the softmax and their vjps), each run alone on one core; at M1's
// shapes it was 30% of a training step (measured). Here each (sequence, kv head) is one task of
// the thread pool: its scores, softmax and weighted sum, and in the backward the gradients of its
// queries, keys and values, computed in place.
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// q (N, H, L, D), k and v (N, H_kv, L, D), float32, any strides (H a multiple of H_kv: query head h
// reads kv head h / (H / H_kv)). Query i sees keys 0..i. Returns
//   out (N, H, L, D): softmax(scale q k^T, causal) v, row-contiguous;
//   lse (N, H, L) float32: each row's log-sum-exp of its scaled scores, which the backward reuses.
std::vector<mx::array> causal_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                                        mx::StreamOrDevice s = {});

// The gradients of causal_attention: from its inputs, its out and lse, and dout (N, H, L, D), the
// gradient reaching out, returns (dq (N, H, L, D), dk, dv (N, H_kv, L, D)), float32.
std::vector<mx::array> causal_attention_backward(const mx::array& q, const mx::array& k, const mx::array& v,
                                                 const mx::array& out, const mx::array& lse,
                                                 const mx::array& dout, float scale, mx::StreamOrDevice s = {});

class CausalAttention : public mx::Primitive {
 public:
  CausalAttention(mx::Stream stream, float scale, bool backward)
      : mx::Primitive(stream), scale_(scale), backward_(backward) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return backward_ ? "TinyLLMCausalAttentionBackward" : "TinyLLMCausalAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CausalAttention&>(other);
    return scale_ == o.scale_ && backward_ == o.backward_;
  }

 private:
  float scale_;
  bool backward_;
};

}  // namespace tiny_llm
