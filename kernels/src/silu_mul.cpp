// The MLX side and the loops of tiny_llm_kernels.silu_mul and its backward (silu_mul.h): element
// by element in fp32, the sigmoid from fast_exp.h's exp, pieces of 16K values over the thread pool
// (each value's arithmetic is its own, so the split does not change a bit). Compiled with
// -ffp-contract=off and cloned per instruction set: every clone rounds the same.
#include "silu_mul.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "clones.h"
#include "cpu_stream.h"
#include "fast_exp.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "quantized_matmul_threads.h"
#include "row_major.h"

namespace tiny_llm {

namespace {

constexpr long kPiece = 1 << 14;

inline __attribute__((always_inline)) float sigmoid_of(float g) {
  const float e = exp_nonpositive(-std::fabs(g));
  return (g >= 0.0f ? 1.0f : e) / (1.0f + e);
}

TINY_LLM_CLONES void forward(const float* __restrict g, const float* __restrict u, float* __restrict y, long n) {
  for (long i = 0; i < n; ++i) y[i] = (g[i] * sigmoid_of(g[i])) * u[i];
}

TINY_LLM_CLONES void backward_loop(const float* __restrict g, const float* __restrict u, const float* __restrict dy,
                              float* __restrict dg, float* __restrict du, long n) {
  for (long i = 0; i < n; ++i) {
    const float s = sigmoid_of(g[i]), gs = g[i] * s;
    du[i] = dy[i] * gs;
    dg[i] = (dy[i] * u[i]) * (s + gs * (1.0f - s));
  }
}

void check(const char* who, const std::vector<const mx::array*>& arrays) {
  for (const auto* a : arrays) {
    if (a->dtype() != mx::float32)
      throw std::invalid_argument(std::string(who) + ": gate, up and dy must be float32");
    if (a->shape() != arrays[0]->shape())
      throw std::invalid_argument(std::string(who) + ": gate, up and dy must have one shape, got " +
                                  shape_str(*arrays[0]) + " and " + shape_str(*a));
  }
}

}  // namespace

mx::array silu_mul(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  check("silu_mul", {&gate, &up});
  const mx::Stream stream = cpu_stream(s, "silu_mul");
  return mx::array::make_arrays({gate.shape()}, {mx::float32}, std::make_shared<SiluMul>(stream, false),
                                {gate, up})[0];
}

std::vector<mx::array> silu_mul_backward(const mx::array& gate, const mx::array& up, const mx::array& dy,
                                         mx::StreamOrDevice s) {
  check("silu_mul_backward", {&gate, &up, &dy});
  const mx::Stream stream = cpu_stream(s, "silu_mul_backward");
  return mx::array::make_arrays({gate.shape(), gate.shape()}, {mx::float32, mx::float32},
                                std::make_shared<SiluMul>(stream, true), {gate, up, dy});
}

void SiluMul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  for (auto& o : outputs) encoder.set_output_array(o);
  encoder.dispatch([ins = weak_copies(inputs), outs = weak_copies(outputs), backward = backward_]() mutable {
    std::vector<std::vector<char>> tmp(ins.size());
    std::vector<const float*> in(ins.size());
    for (size_t j = 0; j < ins.size(); ++j) in[j] = static_cast<const float*>(row_major(ins[j], tmp[j]));
    const long n = long(outs[0].size());
    const int pieces = int((n + kPiece - 1) / kPiece);
    ThreadPool::get().run(pieces, [&](int t) {
      const long a = t * kPiece, len = std::min(kPiece, n - a);
      if (backward) {
        backward_loop(in[0] + a, in[1] + a, in[2] + a, outs[0].data<float>() + a, outs[1].data<float>() + a, len);
      } else {
        forward(in[0] + a, in[1] + a, outs[0].data<float>() + a, len);
      }
    });
  });
}

void SiluMul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(std::string("tiny_llm_kernels.") + (backward_ ? "silu_mul_backward" : "silu_mul") +
                           " is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
