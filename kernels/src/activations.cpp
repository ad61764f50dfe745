// The MLX side and the loops of tiny_llm_kernels.softmax and .sigmoid (activations.h).
//
// exp and the sum: fast_exp.h (shared with causal_attention.cpp).
// Every loop is plain C++ without branches, compiled with -ffp-contract=off (no fused multiply-add
// anywhere), and cloned for AVX-512, AVX2 and the baseline (GCC's target_clones), which the loader
// picks by CPU: each clone does the same roundings in the same order, so all give the same bits.
#include "activations.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "clones.h"
#include "cpu_stream.h"
#include "fast_exp.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "quantized_matmul_threads.h"
#include "row_major.h"

namespace tiny_llm {

namespace {

// x (n) fp32 -> y (n) = sigmoid(x).
TINY_LLM_CLONES void sigmoid_f32(const float* x, float* y, long n) {
  for (long i = 0; i < n; ++i) y[i] = sigmoid_fast(x[i]);  // NaN stays NaN
}

// One row of D fp32: y = exp(x - max) / sum. e holds the exponentials first.
TINY_LLM_CLONES void softmax_row_f32(const float* x, float* y, int D) {
  float m = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < D; ++i) m = x[i] > m ? x[i] : m;  // a NaN is skipped here and turns up in x - m
  for (int i = 0; i < D; ++i) y[i] = exp_nonpositive(x[i] - m);
  const float sum = sum16(y, D);
  for (int k = 0; k < D; ++k) y[k] = y[k] / sum;
}

template <typename T>
void to_f32(const T* src, float* dst, long n) {
  for (long i = 0; i < n; ++i) dst[i] = float(src[i]);
}
template <typename T>
void from_f32(const float* src, T* dst, long n) {
  for (long i = 0; i < n; ++i) dst[i] = T(src[i]);
}

// Rows [r0, r1) of x (rows, D) in T.
template <typename T>
void run_rows(ActivationPrimitive::Kind kind, const T* x, T* y, long r0, long r1, int D) {
  const long n = (r1 - r0) * long(D);
  if constexpr (std::is_same_v<T, float>) {
    if (kind == ActivationPrimitive::Kind::sigmoid) return sigmoid_f32(x + r0 * D, y + r0 * D, n);
    for (long r = r0; r < r1; ++r) softmax_row_f32(x + r * D, y + r * D, D);
  } else {
    thread_local std::vector<float> in, out;
    in.resize(n), out.resize(n);
    to_f32(x + r0 * D, in.data(), n);
    if (kind == ActivationPrimitive::Kind::sigmoid) {
      sigmoid_f32(in.data(), out.data(), n);
    } else {
      for (long r = 0; r < r1 - r0; ++r) softmax_row_f32(in.data() + r * D, out.data() + r * D, D);
    }
    from_f32(out.data(), y + r0 * D, n);
  }
}

mx::array activation(const mx::array& x, mx::StreamOrDevice s, ActivationPrimitive::Kind kind, const char* who) {
  if (!is_float(x.dtype()))
    throw std::invalid_argument(std::string(who) + ": x must be float32, float16 or bfloat16");
  if (kind == ActivationPrimitive::Kind::softmax && x.ndim() < 1)
    throw std::invalid_argument(std::string(who) + ": x must have an axis to normalize over, got a scalar");
  const mx::Stream stream = cpu_stream(s, who);
  return mx::array(x.shape(), x.dtype(), std::make_shared<ActivationPrimitive>(stream, kind), {x});
}

}  // namespace

mx::array softmax(const mx::array& x, mx::StreamOrDevice s) {
  return activation(x, s, ActivationPrimitive::Kind::softmax, "softmax");
}

mx::array sigmoid(const mx::array& x, mx::StreamOrDevice s) {
  return activation(x, s, ActivationPrimitive::Kind::sigmoid, "sigmoid");
}

void ActivationPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(inputs[0]);
  encoder.set_output_array(out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), out = mx::array::unsafe_weak_copy(out),
                    kind = kind_]() mutable {
    // sigmoid is elementwise: one "row" of all the elements, cut anywhere.
    const int D = kind == Kind::softmax ? int(out.shape(-1)) : 1;
    const long rows = D ? long(out.size() / D) : 0;
    std::vector<char> tmp;
    const void* xd = row_major(x, tmp);
    // Tasks of at least 16K elements: below that a thread's wake-up costs more than it saves.
    ThreadPool& pool = ThreadPool::get();
    const long per_task = std::max<long>(1, (16384 + D - 1) / std::max(D, 1));
    const int tasks = int(std::min<long>(pool.size(), (rows + per_task - 1) / per_task));
    with_float_type(out.dtype(), [&](auto type) {
      using T = decltype(type);
      const T* xs = static_cast<const T*>(xd);
      T* ys = out.data<T>();
      pool.run(tasks, [&](int t) {
        const long r0 = rows * t / tasks, r1 = rows * (t + 1) / tasks;
        run_rows<T>(kind, xs, ys, r0, r1, D);
      });
    });
  });
}

void ActivationPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(std::string("tiny_llm_kernels.") + (kind_ == Kind::softmax ? "softmax" : "sigmoid") +
                           " is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
