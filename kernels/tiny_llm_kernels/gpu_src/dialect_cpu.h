// The GPU kernel dialect emulated on the CPU, so that the kernel bodies run (slowly)
// where there is no GPU: tiny_llm_kernels/gpu_emulator.py compiles a body with this
// header and runs each thread of a threadgroup as a std::thread, threadgroups one
// after another (so TL_SHARED may be `static`). Warp collectives go through a slot
// per lane and a barrier per warp; the warp sum adds in CUDA's butterfly order.
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

namespace tl_emu {
struct Warp {
  std::barrier<> sync{32};
  float slots[32];
};
struct Thread {
  int thread, group_x, group_y, group_z;
  Warp* warps;
};
inline thread_local Thread self;

inline float exchange(float v, int partner) {  // write my slot, read the partner's
  Warp& w = self.warps[self.thread / 32];
  w.slots[self.thread % 32] = v;
  w.sync.arrive_and_wait();
  float got = w.slots[partner];
  w.sync.arrive_and_wait();
  return got;
}
}  // namespace tl_emu

// bfloat16 as MLX stores it: the top 16 bits of an fp32, rounded to nearest even.
struct tl_bf16 {
  uint16_t bits;
  tl_bf16() = default;
  explicit tl_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = std::isnan(f) ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  explicit operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

#define TL_SHARED static

inline float tl_float(float v) { return v; }
inline float tl_float(_Float16 v) { return static_cast<float>(v); }
inline float tl_float(tl_bf16 v) { return static_cast<float>(v); }

template <typename T> inline T tl_cast(float v) { return static_cast<T>(v); }

inline float tl_neg_inf() { return -std::numeric_limits<float>::infinity(); }
inline float tl_exp(float x) { return std::exp(x); }
inline float tl_max(float a, float b) { return std::fmax(a, b); }

inline float tl_warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += tl_emu::exchange(v, (tl_emu::self.thread % 32) ^ offset);
  return v;
}
inline float tl_warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = std::fmax(v, tl_emu::exchange(v, (tl_emu::self.thread % 32) ^ offset));
  return v;
}
inline float tl_shuffle(float v, int lane) { return tl_emu::exchange(v, lane); }
inline void tl_warp_sync() { tl_emu::self.warps[tl_emu::self.thread / 32].sync.arrive_and_wait(); }
