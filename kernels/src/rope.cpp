// The MLX side and the loop of tiny_llm_kernels.rope. x and the tables are read
// through their strides (a head slice of a fused q/k/v projection needs no copy);
// the output is row-contiguous. Compiled with -ffp-contract=off: a*c - b*s is
// then rounded exactly as the twin's separate multiply and subtract are.
#include "rope.h"

#include <stdexcept>
#include <string>

#include "cpu_stream.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "rope_row.h"

namespace tiny_llm {

namespace {

template <typename T>
void rope_rows(const mx::array& x, const mx::array& cos_table, const mx::array& sin_table, T* y, int offset,
               bool traditional) {
  const int N = x.shape(0), L = x.shape(1), H = x.shape(2), D = x.shape(3), half = D / 2;
  const auto& st = x.strides();
  const T* base = x.data<T>();
  const int64_t cs = cos_table.strides()[1], ss = sin_table.strides()[1];
  for (int n = 0; n < N; ++n)
    for (int l = 0; l < L; ++l) {
      const float* c = cos_table.data<float>() + (offset + l) * cos_table.strides()[0];
      const float* s = sin_table.data<float>() + (offset + l) * sin_table.strides()[0];
      for (int h = 0; h < H; ++h, y += D)
        rotate_row(base + n * st[0] + l * st[1] + h * st[2], st[3], c, cs, s, ss, half, traditional, y);
    }
}

}  // namespace

mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin, int offset, bool traditional,
               mx::StreamOrDevice s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("rope: " + what); };
  if (x.ndim() != 4 || !is_float(x.dtype()) || x.shape(3) % 2 != 0)
    fail("x must be (N, L, H, D) float32, float16 or bfloat16 with D even, got " + shape_str(x));
  const int L = x.shape(1), half = x.shape(3) / 2;
  if (cos.ndim() != 2 || cos.shape() != sin.shape() || cos.shape(1) != half || cos.dtype() != mx::float32 ||
      sin.dtype() != mx::float32)
    fail("cos and sin must be float32 (S, D/2) = (S, " + std::to_string(half) + "), got " + shape_str(cos) +
         " and " + shape_str(sin));
  if (offset < 0 || int64_t(offset) + L > cos.shape(0))
    fail("positions " + std::to_string(offset) + ".." + std::to_string(int64_t(offset) + L - 1) +
         " are past the table of " + std::to_string(cos.shape(0)));
  const mx::Stream stream = cpu_stream(s, "rope");
  return mx::array(x.shape(), x.dtype(), std::make_shared<RoPEPrimitive>(stream, offset, traditional), {x, cos, sin});
}

void RoPEPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = cpu_encoder(stream(), inputs, out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), c = mx::array::unsafe_weak_copy(inputs[1]),
                    s = mx::array::unsafe_weak_copy(inputs[2]), out = mx::array::unsafe_weak_copy(out),
                    offset = offset_, traditional = traditional_]() mutable {
    with_float_type(out.dtype(), [&](auto type) {
      rope_rows(x, c, s, out.data<decltype(type)>(), offset, traditional);
    });
  });
}

void RoPEPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("tiny_llm_kernels.rope is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
