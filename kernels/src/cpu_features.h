// Whether this CPU runs the code of an instruction-set translation unit: every flag the unit is
// compiled with (CMakeLists.txt), asked of the CPU at run time. A unit's functions are called
// only where these say yes, so the package still runs on CPUs without AVX2. Shared by every
// kernel's dispatch (quantized matmul, k-quants, flash and paged attention).
#pragma once

namespace tiny_llm {

inline bool cpu_has_avx2_fma_f16c() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// AVX-512 F, BW, DQ and VL (the *_avx512.cpp units' flags), with AVX2/FMA/F16C.
inline bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && cpu_has_avx2_fma_f16c();
#else
  return false;
#endif
}

inline bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

inline bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

}  // namespace tiny_llm
