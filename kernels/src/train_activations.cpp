// The MLX side and the loops of train_activations.h: element by element in fp32, the sigmoid from
// fast_exp.h's exp (as tiny_llm_kernels.sigmoid), pieces of 16K values over the thread pool (each
// value's arithmetic is its own, so the split does not change a bit). Compiled with
// -ffp-contract=off and cloned per instruction set: every clone rounds the same.
#include "train_activations.h"

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

using Kind = TrainActivation::Kind;

constexpr long kPiece = 1 << 14;
constexpr float kGeluC = 1.5957691216057308f;  // sqrt(8 / pi), as the twin's Python float rounds to fp32
constexpr float kGeluK = 0.044715f;

TINY_LLM_CLONES void silu_mul_loop(const float* __restrict g, const float* __restrict u, float* __restrict y,
                                   long n) {
  for (long i = 0; i < n; ++i) y[i] = (g[i] * sigmoid_fast(g[i])) * u[i];
}

TINY_LLM_CLONES void silu_mul_backward_loop(const float* __restrict g, const float* __restrict u,
                                            const float* __restrict dy, float* __restrict dg, float* __restrict du,
                                            long n) {
  for (long i = 0; i < n; ++i) {
    const float s = sigmoid_fast(g[i]), gs = g[i] * s;
    du[i] = dy[i] * gs;
    dg[i] = (dy[i] * u[i]) * (s + gs * (1.0f - s));
  }
}

inline __attribute__((always_inline)) float gelu_z(float x) { return kGeluC * (x + ((kGeluK * x) * x) * x); }

TINY_LLM_CLONES void gelu_loop(const float* __restrict x, float* __restrict y, long n) {
  for (long i = 0; i < n; ++i) y[i] = x[i] * sigmoid_fast(gelu_z(x[i]));
}

TINY_LLM_CLONES void gelu_backward_loop(const float* __restrict x, const float* __restrict dy, float* __restrict dx,
                                        long n) {
  for (long i = 0; i < n; ++i) {
    const float s = sigmoid_fast(gelu_z(x[i]));
    const float dz = kGeluC * (1.0f + (3.0f * kGeluK) * (x[i] * x[i]));
    dx[i] = dy[i] * (s + (x[i] * (s * (1.0f - s))) * dz);
  }
}

const char* op_name(Kind k) {
  switch (k) {
    case Kind::silu_mul: return "silu_mul";
    case Kind::silu_mul_backward: return "silu_mul_backward";
    case Kind::gelu: return "gelu";
    case Kind::gelu_backward: return "gelu_backward";
  }
  return "?";
}

// Every input float32 and of the first's shape; words the error by the op's arguments.
std::vector<mx::array> make(Kind kind, const std::vector<mx::array>& inputs, int n_outputs, const char* what,
                            mx::StreamOrDevice s) {
  const std::string who = op_name(kind);
  for (const auto& a : inputs) {
    if (a.dtype() != mx::float32) throw std::invalid_argument(who + ": " + what + " must be float32");
    if (a.shape() != inputs[0].shape())
      throw std::invalid_argument(who + ": " + what + " must have one shape, got " + shape_str(inputs[0]) + " and " +
                                  shape_str(a));
  }
  const mx::Stream stream = cpu_stream(s, who);
  return mx::array::make_arrays(std::vector<mx::Shape>(n_outputs, inputs[0].shape()),
                                std::vector<mx::Dtype>(n_outputs, mx::float32),
                                std::make_shared<TrainActivation>(stream, kind), inputs);
}

}  // namespace

mx::array silu_mul(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  return make(Kind::silu_mul, {gate, up}, 1, "gate, up and dy", s)[0];
}

std::vector<mx::array> silu_mul_backward(const mx::array& gate, const mx::array& up, const mx::array& dy,
                                         mx::StreamOrDevice s) {
  return make(Kind::silu_mul_backward, {gate, up, dy}, 2, "gate, up and dy", s);
}

mx::array gelu(const mx::array& x, mx::StreamOrDevice s) { return make(Kind::gelu, {x}, 1, "x and dy", s)[0]; }

mx::array gelu_backward(const mx::array& x, const mx::array& dy, mx::StreamOrDevice s) {
  return make(Kind::gelu_backward, {x, dy}, 1, "x and dy", s)[0];
}

const char* TrainActivation::name() const {
  switch (kind_) {
    case Kind::silu_mul: return "TinyLLMSiluMul";
    case Kind::silu_mul_backward: return "TinyLLMSiluMulBackward";
    case Kind::gelu: return "TinyLLMGelu";
    case Kind::gelu_backward: return "TinyLLMGeluBackward";
  }
  return "TinyLLMTrainActivation";
}

void TrainActivation::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  encoder.dispatch([ins = weak_copies(inputs), outs = weak_copies(outputs), kind = kind_]() mutable {
    std::vector<std::vector<char>> tmp;
    const std::vector<const float*> in = row_major_floats(ins, tmp);
    std::vector<float*> out(outs.size());
    for (size_t j = 0; j < outs.size(); ++j) out[j] = outs[j].data<float>();
    const long n = long(outs[0].size());
    ThreadPool::get().run(int((n + kPiece - 1) / kPiece), [&](int t) {
      const long a = t * kPiece, len = std::min(kPiece, n - a);
      switch (kind) {
        case Kind::silu_mul: return silu_mul_loop(in[0] + a, in[1] + a, out[0] + a, len);
        case Kind::silu_mul_backward:
          return silu_mul_backward_loop(in[0] + a, in[1] + a, in[2] + a, out[0] + a, out[1] + a, len);
        case Kind::gelu: return gelu_loop(in[0] + a, out[0] + a, len);
        case Kind::gelu_backward: return gelu_backward_loop(in[0] + a, in[1] + a, out[0] + a, len);
      }
    });
  });
}

void TrainActivation::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(std::string("tiny_llm_kernels.") + op_name(kind_) +
                           " is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
