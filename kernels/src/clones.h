// TINY_LLM_CLONES: GCC's target_clones for a plain C++ loop, one copy each for AVX-512, AVX2 and
// the baseline, picked by CPU when the library loads (elsewhere: the one baseline copy). With
// -ffp-contract=off each clone does the same roundings in the same order, so all give the same bits.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TINY_LLM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TINY_LLM_CLONES
#endif
