// The AVX-512 paged attention kernel (compiled with -mavx512f -mavx512bw -mavx512vl -mfma
// -mf16c -ffp-contract=off; run only where the CPU reports avx512f). The vector type is
// attention_simd_avx512.h's (shared with flash attention; each TU keeps its own copy), plus
// SR: score blocks of 4 rows by 4 keys fill the 16 lanes of one sum_lanes; the P @ V block is
// 6 rows by 4 vectors (24 accumulators of the 32 registers).
#include "attention_simd_avx512.h"
#include "paged_attention_kernels.h"

namespace {
constexpr int kScoreRows = 4;  // SR: rows of a score block
}  // namespace

#include "paged_attention_impl.h"

namespace tiny_llm::pa {

const Isa* isa_avx512() {
  static const Isa isa{"avx512", attend, merge};
  return &isa;
}

}  // namespace tiny_llm::pa
