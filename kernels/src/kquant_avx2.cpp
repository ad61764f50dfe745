// The k-quant kernels for AVX2+FMA+F16C: the portable code (kquant_kernels_impl.h) compiled with
// -mavx2 -mfma -mf16c, which the compiler vectorizes; no intrinsics of its own.
#include "kquant_kernels_impl.h"

namespace tiny_llm::kq {

const Isa* isa_avx2() {
  static const Isa isa{"avx2", dot_f32, dot_q8_generic, dequantize, quantize_x};
  return &isa;
}

}  // namespace tiny_llm::kq
