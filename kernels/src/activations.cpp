// The MLX side and the loops of tiny_llm_kernels.softmax and .sigmoid (activations.h).
//
// exp(x) for x <= 0, the only inputs either activation needs (softmax's x - max, sigmoid's -|x|):
//   n = x log2(e) rounded to the nearest integer, r = x - n ln2 (ln2 in two parts, Cody and Waite's trick, so r
//   keeps its bits), exp(r) by Horner's rule on the degree-7 Taylor polynomial (|r| <= ln2 / 2:
//   the first term left out is below 2^-27), times 2^n made from its exponent bits.
//   x below -87.33 (exp under FLT_MIN) gives 0, so a masked -inf score gives exactly 0; NaN stays
//   NaN. Measured against float64: at most 2 ulps (spec/day_4_3_backprop.py).
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
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "quantized_matmul_threads.h"
#include "row_major.h"

namespace tiny_llm {

namespace {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;       // ln 2's first 11 bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;    // ln 2 - kLn2Hi
constexpr float kExpMin = -87.3365447505531f;  // ln(FLT_MIN): below it, 0
constexpr float kRound = 12582912.0f;            // 1.5 * 2^23

// exp(x) for x <= 0 (see the top of the file); inlined into each loop.
inline float exp_nonpositive(float x) {
  const bool under = x < kExpMin;
  const float xc = under ? kExpMin : x;  // NaN passes (NaN < a is false)
  // Round to nearest by adding and taking away 1.5 * 2^23 (|x log2 e| < 2^22): no floor() call,
  // which the baseline clone could not vectorize. -ffp-contract=off keeps both roundings.
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n, n in [-126, 0]: the exponent field n + 127. A NaN's n converts to garbage; p is NaN.
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  const float y = p * std::bit_cast<float>(under ? 0 : e);
  return under ? 0.0f : y;
}

// x (n) fp32 -> y (n) = sigmoid(x).
TINY_LLM_CLONES void sigmoid_f32(const float* x, float* y, long n) {
  for (long i = 0; i < n; ++i) {
    const float e = exp_nonpositive(-std::fabs(x[i]));
    y[i] = (x[i] >= 0.0f ? 1.0f : e) / (1.0f + e);  // NaN: e is NaN, so is y
  }
}

// One row of D fp32: y = exp(x - max) / sum. e holds the exponentials first.
TINY_LLM_CLONES void softmax_row_f32(const float* x, float* y, int D) {
  float m = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < D; ++i) m = x[i] > m ? x[i] : m;  // a NaN is skipped here and turns up in x - m
  for (int i = 0; i < D; ++i) y[i] = exp_nonpositive(x[i] - m);
  // The sum in 16 lanes (element i to lane i % 16), then the lanes in a fixed tree: the same
  // order in every clone, and a loop the compiler can vectorize.
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= D; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += y[i + j];
  for (int j = 0; i < D; ++i, ++j) acc[j] += y[i];
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  for (int k = 0; k < D; ++k) y[k] = y[k] / acc[0];
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
