// The MLX side and the loop of tiny_llm_kernels.swiglu. Rows are short (the
// intermediate size), so one thread does them all; the win is one graph node.
#include "swiglu.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "cpu_stream.h"
#include "layer_rows.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "row_major.h"

namespace tiny_llm {

mx::array swiglu(const mx::array& x, mx::StreamOrDevice s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("swiglu: " + what); };
  if (x.ndim() < 1 || !is_float(x.dtype()))
    fail("x must be float32, float16 or bfloat16 with shape (..., 2I)");
  if (x.shape(-1) % 2 != 0) fail("the last axis holds gate then up: its size must be even, got " +
                                 std::to_string(x.shape(-1)));
  const mx::Stream stream = cpu_stream(s, "swiglu");
  mx::Shape shape = x.shape();
  shape.back() /= 2;
  return mx::array(shape, x.dtype(), std::make_shared<SwiGLUPrimitive>(stream), {x});
}

void SwiGLUPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(inputs[0]);
  encoder.set_output_array(out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), out = mx::array::unsafe_weak_copy(out)]() mutable {
    const int I = out.shape(-1);
    const long rows = I ? long(out.size() / I) : 0;
    std::vector<char> tmp;
    const void* xd = row_major(x, tmp);
    with_float_type(out.dtype(), [&](auto type) {
      using T = decltype(type);
      swiglu_rows(static_cast<const T*>(xd), out.data<T>(), rows, I);
    });
  });
}

void SwiGLUPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("tiny_llm_kernels.swiglu is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
