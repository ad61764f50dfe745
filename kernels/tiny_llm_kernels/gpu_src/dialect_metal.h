// The GPU kernel dialect for Metal (mx.fast.metal_kernel): the same names as
// dialect_cuda.h, on Metal's SIMD-group functions (a SIMD group is 32 threads on
// Apple GPUs, the warp of the bodies).
#define TL_SHARED threadgroup

inline float tl_float(float v) { return v; }
inline float tl_float(half v) { return static_cast<float>(v); }
inline float tl_float(bfloat16_t v) { return static_cast<float>(v); }

template <typename T> inline T tl_cast(float v) { return static_cast<T>(v); }

inline float tl_neg_inf() { return -INFINITY; }
inline float tl_exp(float x) { return metal::exp(x); }
inline float tl_max(float a, float b) { return metal::max(a, b); }

inline float tl_warp_sum(float v) { return metal::simd_sum(v); }
inline float tl_warp_max(float v) { return metal::simd_max(v); }
inline float tl_shuffle(float v, int lane) { return metal::simd_shuffle(v, ushort(lane)); }
inline void tl_warp_sync() { metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup); }
