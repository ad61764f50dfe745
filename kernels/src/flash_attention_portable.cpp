// The portable flash attention kernels: plain C++ over 8-float vectors, which the
// compiler vectorizes for the baseline ISA (SSE2 on x86-64, NEON on arm64). The
// fallback on CPUs without AVX2, and the only path on non-x86 builds.
#include "attention_simd_portable.h"
#include "flash_attention_kernels.h"

#include "flash_attention_impl.h"

namespace tiny_llm::fa {

const Isa& isa_portable() {
  static const Isa isa{"portable", pack_kv, attend, merge};
  return isa;
}

#if !(defined(__x86_64__) || defined(_M_X64))
const Isa* isa_avx2() { return nullptr; }
const Isa* isa_avx512() { return nullptr; }
#endif

}  // namespace tiny_llm::fa
