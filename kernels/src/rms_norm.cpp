// The MLX side and the loop of tiny_llm_kernels.rms_norm: one pass over each row
// for the sum of squares, one to scale it. Rows are short (the hidden size), so
// one thread does them all; the win is one graph node instead of ~8.
#include "rms_norm.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "cpu_stream.h"
#include "layer_rows.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
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

void RMSNormPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = cpu_encoder(stream(), inputs, out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), w = mx::array::unsafe_weak_copy(inputs[1]),
                    out = mx::array::unsafe_weak_copy(out), eps = eps_]() mutable { run(x, w, out, eps); });
}

void RMSNormPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("tiny_llm_kernels.rms_norm is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
