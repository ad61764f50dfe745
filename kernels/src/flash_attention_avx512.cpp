// The AVX-512 flash attention kernels (compiled with -mavx512f -mavx512bw -mavx512vl
// -mfma -mf16c; run only where the CPU reports avx512f). 16 floats a vector; the
// matmul tile is 6 rows by 4 vectors: 24 accumulators + 4 loads of the 32 registers.
#include "attention_simd_avx512.h"
#include "flash_attention_kernels.h"

#include "flash_attention_impl.h"

namespace tiny_llm::fa {

const Isa* isa_avx512() {
  static const Isa isa{"avx512", pack_kv, attend, merge};
  return &isa;
}

}  // namespace tiny_llm::fa
