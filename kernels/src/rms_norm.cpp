// The MLX side and the loop of tiny_llm_kernels.rms_norm: one pass over each row
// for the sum of squares, one to scale it. Rows are short (the hidden size), so
// one thread does them all; the win is one graph node instead of ~8.
//
// And its backward (training): one node instead of MLX's ~15 for the twin's vjp. Rows in chunks
// of kChunk over the thread pool, each chunk's share of dw summed row by row in order into its
// own partial, the partials then added in chunk order: the same bits whatever the threads.
#include "rms_norm.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cpu_stream.h"
#include "layer_rows.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "quantized_matmul_threads.h"
#include "row_major.h"

namespace tiny_llm {

namespace {

void run(const mx::array& x, const mx::array& w, mx::array& out, float eps) {
  const int D = x.shape(-1);
  const long rows = D ? long(x.size() / D) : 0;
  std::vector<char> tx, tw;
  const void* xd = row_major(x, tx);
  const void* wd = row_major(w, tw);
  with_float_type(out.dtype(), [&](auto type) {
    using T = decltype(type);
    rms_norm_rows(static_cast<const T*>(xd), static_cast<const T*>(wd), out.data<T>(), rows, D, eps);
  });
}

constexpr long kChunk = 64;

// Rows [r0, r1) of x, dy (rows, D): dx's rows, and their dw share into part (D), from zero.
void rms_norm_backward_rows(const float* x, const float* w, const float* dy, float* dx, float* part, long r0,
                            long r1, int D, float eps) {
  std::fill(part, part + D, 0.0f);
  for (long r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    const float* gr = dy + r * D;
    float* out = dx + r * D;
    float ss = 0.0f, gx = 0.0f;
    for (int i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float rms = 1.0f / std::sqrt(ss * (1.0f / D) + eps);
    for (int i = 0; i < D; ++i) gx += (w[i] * gr[i]) * xr[i];
    const float k = rms * rms * rms * (gx * (1.0f / D));
    for (int i = 0; i < D; ++i) {
      out[i] = rms * (w[i] * gr[i]) - xr[i] * k;
      part[i] += gr[i] * (xr[i] * rms);
    }
  }
}

}  // namespace

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("rms_norm: " + what); };
  if (x.ndim() < 1 || !is_float(x.dtype())) fail("x must be float32, float16 or bfloat16 with shape (..., D)");
  if (weight.ndim() != 1 || weight.shape(0) != x.shape(-1))
    fail("weight must be (D,) with D = x.shape[-1] = " + std::to_string(x.shape(-1)));
  if (!is_float(weight.dtype())) fail("weight must be float32, float16 or bfloat16");
  const mx::Stream stream = cpu_stream(s, "rms_norm");
  // As the twin: the weight in x's dtype (astype returns weight itself when they match).
  return mx::array(x.shape(), x.dtype(), std::make_shared<RMSNormPrimitive>(stream, eps),
                   {x, mx::astype(weight, x.dtype(), stream)});
}

std::vector<mx::array> rms_norm_backward(const mx::array& x, const mx::array& weight, const mx::array& dy,
                                         float eps, mx::StreamOrDevice s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("rms_norm_backward: " + what); };
  if (x.ndim() < 1 || x.dtype() != mx::float32 || weight.dtype() != mx::float32 || dy.dtype() != mx::float32)
    fail("x, weight and dy must be float32, x (..., D)");
  if (weight.ndim() != 1 || weight.shape(0) != x.shape(-1))
    fail("weight must be (D,) with D = x.shape[-1] = " + std::to_string(x.shape(-1)));
  if (dy.shape() != x.shape()) fail("dy must have x's shape " + shape_str(x) + ", got " + shape_str(dy));
  const mx::Stream stream = cpu_stream(s, "rms_norm_backward");
  return mx::array::make_arrays({x.shape(), weight.shape()}, {mx::float32, mx::float32},
                                std::make_shared<RMSNormBackward>(stream, eps), {x, weight, dy});
}

void RMSNormBackward::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  encoder.dispatch([ins = weak_copies(inputs), outs = weak_copies(outputs), eps = eps_]() mutable {
    const int D = ins[0].shape(-1);
    const long rows = D ? long(ins[0].size() / D) : 0;
    std::vector<std::vector<char>> tmp;
    const std::vector<const float*> in = row_major_floats(ins, tmp);
    const float *x = in[0], *w = in[1], *dy = in[2];
    float* dx = outs[0].data<float>();
    float* dw = outs[1].data<float>();
    const long chunks = (rows + kChunk - 1) / kChunk;
    std::vector<float> parts(size_t(std::max<long>(chunks, 1)) * D, 0.0f);
    ThreadPool::get().run(int(chunks), [&](int c) {
      rms_norm_backward_rows(x, w, dy, dx, parts.data() + size_t(c) * D, c * kChunk,
                             std::min(rows, (c + 1) * kChunk), D, eps);
    });
    std::copy(parts.begin(), parts.begin() + D, dw);  // chunk 0 (all zero when there are no rows)
    for (long c = 1; c < chunks; ++c)
      for (int i = 0; i < D; ++i) dw[i] += parts[size_t(c) * D + i];
  });
}

void RMSNormBackward::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("tiny_llm_kernels.rms_norm_backward is a CPU kernel; run it with stream=mx.cpu");
}

void RMSNormPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = cpu_encoder(stream(), inputs, out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), w = mx::array::unsafe_weak_copy(inputs[1]),
                    out = mx::array::unsafe_weak_copy(out), eps = eps_]() mutable { run(x, w, out, eps); });
}

void RMSNormPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("tiny_llm_kernels.rms_norm is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
