// The portable k-quant kernels (kquant_kernels_impl.h compiled with the build's default flags).
#include "kquant_kernels_impl.h"

namespace tiny_llm::kq {

const Isa& isa_portable() {
  static const Isa isa{"portable", dot_f32, dot_q8_generic, dequantize, quantize_x};
  return isa;
}

#if !(defined(__x86_64__) || defined(_M_X64))
const Isa* isa_avx2() { return nullptr; }
const Isa* isa_avx512() { return nullptr; }
#endif

}  // namespace tiny_llm::kq
