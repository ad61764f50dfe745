// The GPU kernel dialect for CUDA (mx.fast.cuda_kernel): what the kernel bodies in
// this folder may use beyond C++ itself. The body also gets tl_thread, tl_lane,
// tl_warp and tl_group_x/y/z from the prologue that tiny_llm_kernels/gpu.py adds.
// A warp is 32 threads here and on Apple GPUs (a SIMD group); bodies assume it.
#define TL_SHARED __shared__

__device__ inline float tl_float(float v) { return v; }
__device__ inline float tl_float(__half v) { return __half2float(v); }
__device__ inline float tl_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ inline T tl_cast(float v) { return v; }
template <> __device__ inline __half tl_cast<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 tl_cast<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ inline float tl_neg_inf() { return -__int_as_float(0x7f800000); }
__device__ inline float tl_exp(float x) { return expf(x); }
__device__ inline float tl_max(float a, float b) { return fmaxf(a, b); }

// Warp collectives: every lane of the warp must call them, the same number of times.
__device__ inline float tl_warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
__device__ inline float tl_warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
__device__ inline float tl_shuffle(float v, int lane) { return __shfl_sync(0xffffffffu, v, lane); }
__device__ inline void tl_warp_sync() { __syncwarp(); }
