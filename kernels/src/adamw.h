// tiny_llm_kernels.adamw: one AdamW step on every weight of a model as one MLX primitive. The
// twin, impl.train.optim.AdamW's array ops, is 14 graph nodes a weight (the two moments, the decay,
// the square root, the divisions), each run alone on one core: at M1's model (39 weights of 0.8M
// values) about 10 ms of a 65 ms step, nearly all of it per-node cost (measured). Here the whole
// step is one pass over each weight, split over the thread pool, with the twin's own fp32
// operations in the twin's order, so both give the same bits.
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// The constants of one step, each as the twin rounds it to fp32 (impl.train.optim.AdamW):
// b1, 1 - b1, b2, 1 - b2, 1 - lr * weight_decay, lr / (1 - b1^t), sqrt(1 - b2^t), eps.
struct AdamWConstants {
  float b1, c1, b2, c2, decay, step_size, root_c2, eps;
};

// weights, grads, m, v: n float32 arrays each, weights[i], grads[i], m[i], v[i] of one shape.
// Returns 3n arrays: the n new weights, then the n new m, then the n new v:
//   m' = b1 m + c1 g;  v' = b2 v + c2 (g g);  w' = w decay - (step_size m') / (sqrt(v') / root_c2 + eps).
std::vector<mx::array> adamw(const std::vector<mx::array>& weights, const std::vector<mx::array>& grads,
                             const std::vector<mx::array>& m, const std::vector<mx::array>& v,
                             const AdamWConstants& k, mx::StreamOrDevice s = {});

class AdamW : public mx::Primitive {
 public:
  AdamW(mx::Stream stream, const AdamWConstants& k) : mx::Primitive(stream), k_(k) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "TinyLLMAdamW"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const AdamW&>(other).k_;
    return k_.b1 == o.b1 && k_.c1 == o.c1 && k_.b2 == o.b2 && k_.c2 == o.c2 && k_.decay == o.decay &&
           k_.step_size == o.step_size && k_.root_c2 == o.root_c2 && k_.eps == o.eps;
  }

 private:
  AdamWConstants k_;
};

}  // namespace tiny_llm
