// The MLX side and the loop of tiny_llm_kernels.adamw (adamw.h).
//
// Element by element, in the twin's order, with fp32 roundings only (compiled with
// -ffp-contract=off, so no multiply-add is fused; sqrt and / are IEEE's, as MLX's; -fno-math-errno
// lets the sqrt vectorize):
//   m' = (b1 * m) + (c1 * g)
//   v' = (b2 * v) + (c2 * (g * g))
//   w' = (w * decay) - ((step_size * m') / ((sqrt(v') / root_c2) + eps))
// The weights are cut into pieces of 64K values handed to the pool; every value's arithmetic is
// its own, so the pieces, the threads and the order do not matter.
#include "adamw.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "clones.h"
#include "cpu_stream.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "quantized_matmul_threads.h"
#include "row_major.h"

namespace tiny_llm {

namespace {

constexpr long kPiece = 1 << 16;

TINY_LLM_CLONES void step(const AdamWConstants& k, const float* __restrict w, const float* __restrict g,
                          const float* __restrict m, const float* __restrict v, float* __restrict w2,
                          float* __restrict m2, float* __restrict v2, long n) {
  for (long i = 0; i < n; ++i) {
    const float mi = k.b1 * m[i] + k.c1 * g[i];
    const float vi = k.b2 * v[i] + k.c2 * (g[i] * g[i]);
    m2[i] = mi;
    v2[i] = vi;
    w2[i] = w[i] * k.decay - (k.step_size * mi) / (std::sqrt(vi) / k.root_c2 + k.eps);
  }
}

}  // namespace

std::vector<mx::array> adamw(const std::vector<mx::array>& weights, const std::vector<mx::array>& grads,
                             const std::vector<mx::array>& m, const std::vector<mx::array>& v,
                             const AdamWConstants& k, mx::StreamOrDevice s) {
  const size_t n = weights.size();
  if (grads.size() != n || m.size() != n || v.size() != n)
    throw std::invalid_argument("adamw: weights, grads, m and v must be lists of one length, got " +
                                std::to_string(n) + ", " + std::to_string(grads.size()) + ", " +
                                std::to_string(m.size()) + " and " + std::to_string(v.size()));
  std::vector<mx::array> inputs;
  std::vector<mx::Shape> shapes;
  for (size_t i = 0; i < n; ++i) {
    for (const auto* a : {&weights[i], &grads[i], &m[i], &v[i]}) {
      if (a->dtype() != mx::float32)
        throw std::invalid_argument("adamw: weight " + std::to_string(i) + ": every array must be float32");
      if (a->shape() != weights[i].shape())
        throw std::invalid_argument("adamw: weight " + std::to_string(i) + " is " + shape_str(weights[i]) +
                                    " but its gradient or moments are " + shape_str(*a));
    }
  }
  for (const auto* list : {&weights, &grads, &m, &v}) inputs.insert(inputs.end(), list->begin(), list->end());
  for (int r = 0; r < 3; ++r)
    for (const auto& w : weights) shapes.push_back(w.shape());
  if (n == 0) return {};
  const mx::Stream stream = cpu_stream(s, "adamw");
  return mx::array::make_arrays(shapes, std::vector<mx::Dtype>(3 * n, mx::float32),
                                std::make_shared<AdamW>(stream, k), inputs);
}

void AdamW::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  encoder.dispatch([ins = weak_copies(inputs), outs = weak_copies(outputs), k = k_]() mutable {
    // Row-contiguous inputs are read in place; anything else (a broadcast zero moment, a
    // transposed view) is gathered first.
    std::vector<std::vector<char>> tmp;
    const std::vector<const float*> in = row_major_floats(ins, tmp);
    const size_t n = outs.size() / 3;
    std::vector<std::pair<size_t, long>> pieces;  // (weight, first value)
    for (size_t i = 0; i < n; ++i)
      for (long a = 0; a < long(outs[i].size()); a += kPiece) pieces.emplace_back(i, a);
    ThreadPool::get().run(int(pieces.size()), [&](int t) {
      const auto [i, a] = pieces[t];
      const long len = std::min<long>(kPiece, long(outs[i].size()) - a);
      step(k, in[i] + a, in[n + i] + a, in[2 * n + i] + a, in[3 * n + i] + a, outs[i].data<float>() + a,
           outs[n + i].data<float>() + a, outs[2 * n + i].data<float>() + a, len);
    });
  });
}

void AdamW::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("tiny_llm_kernels.adamw is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
