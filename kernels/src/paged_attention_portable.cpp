// The portable paged attention kernel: plain C++ over 8-float vectors (attention_simd_portable.h's
// vector type, shared with flash attention), compiled with -ffp-contract=off, so V::fma is a multiply then an add
// everywhere. The fallback on CPUs without AVX2, and the only path on non-x86 builds.
#include "attention_simd_portable.h"
#include "paged_attention_kernels.h"

namespace {
constexpr int kScoreRows = 2;  // SR: rows of a score block
}  // namespace

#include "paged_attention_impl.h"

namespace tiny_llm::pa {

const Isa& isa_portable() {
  static const Isa isa{"portable", attend, merge};
  return isa;
}

#if !(defined(__x86_64__) || defined(_M_X64))
const Isa* isa_avx2() { return nullptr; }
const Isa* isa_avx512() { return nullptr; }
#endif

}  // namespace tiny_llm::pa
