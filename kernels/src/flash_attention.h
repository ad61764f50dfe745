// tiny_llm_kernels.flash_attention: grouped-query attention with an online softmax,
// as an MLX primitive with a CPU implementation, so it stays in MLX's lazy graph.
#pragma once

#include <optional>
#include <string>
#include <map>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// q (B, H, L, D); k, v (B, H_kv, S, D), H % H_kv == 0, one dtype of fp32/fp16/bf16.
// mask: additive (float) or boolean (true = attend), broadcastable to (B, H, L, S).
// causal: query i sees keys j <= i + S - L. -> (B, H, L, D) in q's dtype; a query
// row that sees no key is 0. scale defaults to 1 / sqrt(D).
mx::array flash_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                          std::optional<float> scale = std::nullopt, bool causal = false,
                          const std::optional<mx::array>& mask = std::nullopt, mx::StreamOrDevice s = {});

class FlashAttention : public mx::UnaryPrimitive {
 public:
  FlashAttention(mx::Stream stream, float scale, bool causal, bool has_mask)
      : mx::UnaryPrimitive(stream), scale_(scale), causal_(causal), has_mask_(has_mask) {}

  // inputs: q, k, v[, mask broadcast to (B, H, L, S)]
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "TinyLLMFlashAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const FlashAttention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_ && has_mask_ == o.has_mask_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float scale_;
  bool causal_, has_mask_;
};

// Which code runs: {"isa", "threads", "key_tile"}, as text for the Python side.
std::map<std::string, std::string> flash_attention_info();

// For tests and benchmarks: force an instruction set ("portable", "avx2", "avx512",
// "auto" or "" = best available). Returns the info above.
std::map<std::string, std::string> flash_attention_configure(const std::string& isa);

}  // namespace tiny_llm
