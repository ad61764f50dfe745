// tiny_llm_kernels.cached_attention: one attention layer's work between its q/k/v and
// o projections as one MLX primitive -- RoPE on q and k, the new k and v written into the
// KV cache, causal flash attention over every cached position -- where the twin
// (impl.layer_kernels.cached_attention_mlx) is ~16 graph nodes (slices, transposes, two
// RoPEs, two cache slice-updates, the attention). At batch-1 decode each node costs MLX
// a few microseconds of scheduling, more than its arithmetic.
#pragma once

#include <optional>
#include <tuple>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// qkv (N, L, (H + 2 H_kv) D): the stacked projection's output, heads q_0..q_H-1, k_0..,
// v_0.. (fp32/fp16/bf16). keys, values (N, H_kv, C, D): the cache buffers, one float dtype,
// qkv's or another (an fp16 cache under fp32 activations: the new k and v are rounded to
// it as they are written), positions [0, offset) filled, C >= offset + L. cos, sin (P, D/2):
// fp32 RoPE tables, P >= offset + L. Returns (out, keys', values'):
//   out (N, L, H * D): causal attention of the rotated q at positions offset.. over the
//     offset + L cached keys (query l sees keys <= offset + l), in o_proj's input layout;
//   keys', values': the buffers with positions [offset, offset + L) set to the rotated k
//     and v. They take over the input buffers when nothing else holds them (MLX's
//     donation), so a decode step writes L rows instead of copying the cache.
std::tuple<mx::array, mx::array, mx::array> cached_attention(const mx::array& qkv, const mx::array& keys,
                                                             const mx::array& values, const mx::array& cos,
                                                             const mx::array& sin, int offset, int n_heads,
                                                             int n_kv_heads, std::optional<float> scale,
                                                             bool traditional, mx::StreamOrDevice s = {});

class CachedAttention : public mx::Primitive {
 public:
  CachedAttention(mx::Stream stream, int offset, int n_heads, int n_kv_heads, float scale, bool traditional)
      : mx::Primitive(stream), offset_(offset), n_heads_(n_heads), n_kv_heads_(n_kv_heads), scale_(scale),
        traditional_(traditional) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "TinyLLMCachedAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CachedAttention&>(other);
    return offset_ == o.offset_ && n_heads_ == o.n_heads_ && n_kv_heads_ == o.n_kv_heads_ && scale_ == o.scale_ &&
           traditional_ == o.traditional_;
  }

 private:
  int offset_, n_heads_, n_kv_heads_;
  float scale_;
  bool traditional_;
};

}  // namespace tiny_llm
