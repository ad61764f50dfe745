// The MLX side and the loops of tiny_llm_kernels.layer_norm and its backward (layer_norm.h). Rows
// in chunks of kChunk over the thread pool; the backward's weight and bias gradients summed row
// by row in order into each chunk's partial, the partials then added in chunk order: the same
// bits whatever the number of threads.
#include "layer_norm.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cpu_stream.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "quantized_matmul_threads.h"
#include "row_major.h"

namespace tiny_llm {

namespace {

constexpr long kChunk = 64;

// A row's mean and rstd, in fp32: the sum in order, then the squared deviations in order.
inline void row_stats(const float* x, int D, float eps, float& mean, float& rstd) {
  float sum = 0.0f;
  for (int i = 0; i < D; ++i) sum += x[i];
  mean = sum * (1.0f / D);
  float var = 0.0f;
  for (int i = 0; i < D; ++i) var += (x[i] - mean) * (x[i] - mean);
  rstd = 1.0f / std::sqrt(var * (1.0f / D) + eps);
}

void forward_rows(const float* x, const float* w, const float* b, float* y, long r0, long r1, int D, float eps) {
  for (long r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    float mean, rstd;
    row_stats(xr, D, eps, mean, rstd);
    for (int i = 0; i < D; ++i) yr[i] = ((xr[i] - mean) * rstd) * w[i] + b[i];
  }
}

// Rows [r0, r1): dx's rows, and their shares of dw and db into pw, pb (D each), from zero.
void backward_rows(const float* x, const float* w, const float* dy, float* dx, float* pw, float* pb, long r0,
                   long r1, int D, float eps) {
  std::fill(pw, pw + D, 0.0f);
  std::fill(pb, pb + D, 0.0f);
  for (long r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    const float* gr = dy + r * D;
    float* out = dx + r * D;
    float mean, rstd;
    row_stats(xr, D, eps, mean, rstd);
    float sg = 0.0f, sgx = 0.0f;
    for (int i = 0; i < D; ++i) {
      const float xhat = (xr[i] - mean) * rstd, g = gr[i] * w[i];
      sg += g;
      sgx += g * xhat;
      pw[i] += gr[i] * xhat;
      pb[i] += gr[i];
    }
    const float mg = sg * (1.0f / D), mgx = sgx * (1.0f / D);
    for (int i = 0; i < D; ++i) {
      const float xhat = (xr[i] - mean) * rstd;
      out[i] = rstd * ((gr[i] * w[i] - mg) - xhat * mgx);
    }
  }
}

void check(const char* who, const mx::array& x, const mx::array& w, const mx::array& other, const char* other_name) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(std::string(who) + ": " + what); };
  if (x.ndim() < 1 || x.dtype() != mx::float32 || w.dtype() != mx::float32 || other.dtype() != mx::float32)
    fail(std::string("x, weight and ") + other_name + " must be float32, x (..., D)");
  if (w.ndim() != 1 || w.shape(0) != x.shape(-1))
    fail("weight must be (D,) with D = x.shape[-1] = " + std::to_string(x.shape(-1)));
}

}  // namespace

mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps,
                     mx::StreamOrDevice s) {
  check("layer_norm", x, weight, bias, "bias");
  if (bias.shape() != weight.shape())
    throw std::invalid_argument("layer_norm: bias must be (D,) with D = x.shape[-1] = " + std::to_string(x.shape(-1)));
  const mx::Stream stream = cpu_stream(s, "layer_norm");
  return mx::array::make_arrays({x.shape()}, {mx::float32}, std::make_shared<LayerNorm>(stream, eps, false),
                                {x, weight, bias})[0];
}

std::vector<mx::array> layer_norm_backward(const mx::array& x, const mx::array& weight, const mx::array& dy,
                                           float eps, mx::StreamOrDevice s) {
  check("layer_norm_backward", x, weight, dy, "dy");
  if (dy.shape() != x.shape())
    throw std::invalid_argument("layer_norm_backward: dy must have x's shape " + shape_str(x) + ", got " +
                                shape_str(dy));
  const mx::Stream stream = cpu_stream(s, "layer_norm_backward");
  return mx::array::make_arrays({x.shape(), weight.shape(), weight.shape()}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<LayerNorm>(stream, eps, true), {x, weight, dy});
}

void LayerNorm::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  encoder.dispatch([ins = weak_copies(inputs), outs = weak_copies(outputs), eps = eps_,
                    backward = backward_]() mutable {
    const int D = ins[0].shape(-1);
    const long rows = D ? long(ins[0].size() / D) : 0;
    std::vector<std::vector<char>> tmp;
    const std::vector<const float*> in = row_major_floats(ins, tmp);
    const long chunks = (rows + kChunk - 1) / kChunk;
    ThreadPool& pool = ThreadPool::get();
    if (!backward) {
      float* y = outs[0].data<float>();
      pool.run(int(chunks), [&](int c) {
        forward_rows(in[0], in[1], in[2], y, c * kChunk, std::min(rows, (c + 1) * kChunk), D, eps);
      });
      return;
    }
    std::vector<float> parts(size_t(std::max<long>(chunks, 1)) * 2 * D, 0.0f);  // per chunk: dw, then db
    pool.run(int(chunks), [&](int c) {
      float* p = parts.data() + size_t(c) * 2 * D;
      backward_rows(in[0], in[1], in[2], outs[0].data<float>(), p, p + D, c * kChunk,
                    std::min(rows, (c + 1) * kChunk), D, eps);
    });
    float *dw = outs[1].data<float>(), *db = outs[2].data<float>();
    std::copy(parts.begin(), parts.begin() + D, dw);  // chunk 0 (zero when there are no rows)
    std::copy(parts.begin() + D, parts.begin() + 2 * D, db);
    for (long c = 1; c < chunks; ++c)
      for (int i = 0; i < D; ++i) {
        dw[i] += parts[size_t(c) * 2 * D + i];
        db[i] += parts[size_t(c) * 2 * D + D + i];
      }
  });
}

void LayerNorm::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(std::string("tiny_llm_kernels.") + (backward_ ? "layer_norm_backward" : "layer_norm") +
                           " is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
