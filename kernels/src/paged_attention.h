// tiny_llm_kernels.paged_attention (topic 3.2): one attention layer's work for a packed batch
// of sequences over a paged KV cache, as one MLX primitive -- RoPE on q and k at each token's
// position, the new k and v written into their slots of the block pools, and causal attention
// that reads each sequence's keys and values from its blocks in place (no gather). The twin is
// impl.engine.paged_attention.paged_attention_mlx.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <tuple>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// qkv (1, T, (H + 2 H_kv) D): T tokens of B sequences end to end, per token q heads, k heads,
// v heads (fp32/fp16/bf16). k_pool, v_pool (num_blocks, H_kv, block_size, D), one float dtype
// (qkv's, or another: the new rows are rounded to it as they are written). cos, sin (P, D/2)
// float32 RoPE tables. int32 metadata: positions (T,), slot_mapping (T,), block_tables
// (B, max_blocks), cu_seqlens_q (B + 1,), context_lens (B,). Returns (out (1, T, H D) in
// qkv's dtype, k_pool', v_pool'): token t's rotated k and its v written at slot
// slot_mapping[t] (block slot / block_size, offset slot % block_size), then query row t
// (sequence b, position p) attends to sequence b's keys 0..p through block_tables[b]; with
// window > 0 (a sliding window, Gemma 3's local layers), to keys p - window + 1 .. p only.
// The pools take over the input buffers when nothing else holds them, as in cached_attention.
// Bad shapes, dtypes or heads throw std::invalid_argument (Python: ValueError) with the twin's
// words (check_paged_attention); so do metadata values that would index outside the pools or
// tables, here when the metadata is already evaluated (the engine's is), else when the node runs.
std::tuple<mx::array, mx::array, mx::array> paged_attention(
    const mx::array& qkv, const mx::array& k_pool, const mx::array& v_pool, const mx::array& cos,
    const mx::array& sin, const mx::array& positions, const mx::array& slot_mapping, const mx::array& block_tables,
    const mx::array& cu_seqlens_q, const mx::array& context_lens, int n_heads, int n_kv_heads,
    std::optional<float> scale, bool traditional, int window = 0, mx::StreamOrDevice s = {});

class PagedAttention : public mx::Primitive {
 public:
  PagedAttention(mx::Stream stream, int n_heads, int n_kv_heads, float scale, bool traditional, int window)
      : mx::Primitive(stream),
        n_heads_(n_heads),
        n_kv_heads_(n_kv_heads),
        scale_(scale),
        traditional_(traditional),
        window_(window) {}

  // inputs: qkv, k_pool, v_pool, cos, sin, positions, slot_mapping, block_tables, cu_seqlens_q, context_lens
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "TinyLLMPagedAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const PagedAttention&>(other);
    return n_heads_ == o.n_heads_ && n_kv_heads_ == o.n_kv_heads_ && scale_ == o.scale_ &&
           traditional_ == o.traditional_ && window_ == o.window_;
  }

 private:
  int n_heads_, n_kv_heads_;
  float scale_;
  bool traditional_;
  int window_;  // 0: none
};

// Which code runs: {"isa", "threads", "key_tile", "segment"}, as text for the Python side.
std::map<std::string, std::string> paged_attention_info();

// For tests and benchmarks: force an instruction set ("portable", "avx2", "avx512", "auto" or
// "" = best available). Returns the info above.
std::map<std::string, std::string> paged_attention_configure(const std::string& isa);

}  // namespace tiny_llm
