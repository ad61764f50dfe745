// The AVX2 + FMA paged attention kernel (compiled with -mavx2 -mfma -mf16c -ffp-contract=off).
// The vector type is attention_simd_avx2.h's, shared with flash attention, plus SR: score blocks of 2 rows by 4
// keys fill the 8 lanes of one sum_lanes; the P @ V block is 4 rows by 2 vectors.
#include "attention_simd_avx2.h"
#include "paged_attention_kernels.h"

namespace {
constexpr int kScoreRows = 2;  // SR: rows of a score block
}  // namespace

#include "paged_attention_impl.h"

namespace tiny_llm::pa {

const Isa* isa_avx2() {
  static const Isa isa{"avx2", attend, merge};
  return &isa;
}

}  // namespace tiny_llm::pa
