// The AVX2 + FMA flash attention kernels (compiled with -mavx2 -mfma -mf16c). 8 floats
// a vector; the matmul tile is 4 rows by 2 vectors: 8 accumulators of the 16 registers.
#include "attention_simd_avx2.h"
#include "flash_attention_kernels.h"

#include "flash_attention_impl.h"

namespace tiny_llm::fa {

const Isa* isa_avx2() {
  static const Isa isa{"avx2", pack_kv, attend, merge};
  return &isa;
}

}  // namespace tiny_llm::fa
