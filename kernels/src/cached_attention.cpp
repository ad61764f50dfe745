// The MLX side and the prologue of tiny_llm_kernels.cached_attention; the attention
// itself is the flash attention core (flash_attention_core.cpp), pointed at the cache
// buffers and at an output laid out (N, L, H, D). Compiled with -ffp-contract=off for
// RoPE's rounding (rope_row.h): the cache then holds exactly what the twin writes.
#include "cached_attention.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "cpu_stream.h"
#include "flash_attention_kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "rope_row.h"
#include "row_major.h"
#include "take_buffer.h"

namespace tiny_llm {

namespace {

fa::DType fa_dtype(const mx::Dtype& t) {
  return t == mx::float16 ? fa::DType::f16 : t == mx::bfloat16 ? fa::DType::bf16 : fa::DType::f32;
}

struct Shapes {
  int N, L, H, H_kv, D, C;
};

// q (N, L, H, D) rotated into qbuf; k rotated and v copied into the caches at offset..offset+L,
// rounded to the cache's type C as they are written.
template <typename T, typename C>
void prologue(const mx::array& qkv, const mx::array& cos, const mx::array& sin, const Shapes& sh, int offset,
              bool traditional, T* qbuf, C* kc, C* vc) {
  const auto& st = qkv.strides();
  const T* base = qkv.data<T>();
  const int half = sh.D / 2;
  const int64_t cs = cos.strides()[1], ss = sin.strides()[1];
  for (int n = 0; n < sh.N; ++n)
    for (int l = 0; l < sh.L; ++l) {
      const T* row = base + n * st[0] + l * st[1];  // (H + 2 H_kv) * D values, st[2] apart
      const float* c = cos.data<float>() + (offset + l) * cos.strides()[0];
      const float* s = sin.data<float>() + (offset + l) * sin.strides()[0];
      for (int h = 0; h < sh.H; ++h)
        rotate_row(row + int64_t(h) * sh.D * st[2], st[2], c, cs, s, ss, half, traditional,
                   qbuf + ((int64_t(n) * sh.L + l) * sh.H + h) * sh.D);
      for (int g = 0; g < sh.H_kv; ++g) {
        const int64_t at = ((int64_t(n) * sh.H_kv + g) * sh.C + offset + l) * sh.D;
        rotate_row(row + int64_t(sh.H + g) * sh.D * st[2], st[2], c, cs, s, ss, half, traditional, kc + at);
        const T* v = row + int64_t(sh.H + sh.H_kv + g) * sh.D * st[2];
        for (int d = 0; d < sh.D; ++d) vc[at + d] = C(float(v[d * st[2]]));
      }
    }
}

}  // namespace

std::tuple<mx::array, mx::array, mx::array> cached_attention(const mx::array& qkv, const mx::array& keys,
                                                             const mx::array& values, const mx::array& cos,
                                                             const mx::array& sin, int offset, int n_heads,
                                                             int n_kv_heads, std::optional<float> scale,
                                                             bool traditional, mx::StreamOrDevice s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("cached_attention: " + what); };
  if (qkv.ndim() != 3 || !is_float(qkv.dtype()))
    fail("qkv must be (N, L, (H + 2 H_kv) D) float32, float16 or bfloat16, got " + shape_str(qkv));
  if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0)
    fail("n_heads must be a positive multiple of n_kv_heads, got " + std::to_string(n_heads) + " and " +
         std::to_string(n_kv_heads));
  const int N = qkv.shape(0), L = qkv.shape(1), width = qkv.shape(2), heads = n_heads + 2 * n_kv_heads;
  if (width % heads != 0 || (width / heads) % 2 != 0)
    fail("qkv's last axis (" + std::to_string(width) + ") must be (H + 2 H_kv) * D = " + std::to_string(heads) +
         " * D with D even");
  const int D = width / heads;
  if (keys.ndim() != 4 || keys.shape() != values.shape() || keys.shape(0) != N || keys.shape(1) != n_kv_heads ||
      keys.shape(3) != D)
    fail("keys and values must be (N, H_kv, C, D) = (" + std::to_string(N) + ", " + std::to_string(n_kv_heads) +
         ", C, " + std::to_string(D) + "), got " + shape_str(keys) + " and " + shape_str(values));
  if (keys.dtype() != values.dtype() || !is_float(keys.dtype()))
    fail("keys and values must share one dtype: float32, float16 or bfloat16");
  if (offset < 0 || int64_t(offset) + L > keys.shape(2))
    fail("positions " + std::to_string(offset) + ".." + std::to_string(int64_t(offset) + L - 1) +
         " do not fit a cache of " + std::to_string(keys.shape(2)));
  if (cos.ndim() != 2 || cos.shape() != sin.shape() || cos.shape(1) != D / 2 || cos.dtype() != mx::float32 ||
      sin.dtype() != mx::float32 || int64_t(offset) + L > cos.shape(0))
    fail("cos and sin must be float32 (P, D/2) with P >= offset + L, got " + shape_str(cos) + " and " +
         shape_str(sin));
  const mx::Stream stream = cpu_stream(s, "cached_attention");
  const float sc = scale.value_or(1.0f / std::sqrt(float(D)));
  auto outs = mx::array::make_arrays(
      {{N, L, n_heads * D}, keys.shape(), values.shape()}, {qkv.dtype(), keys.dtype(), keys.dtype()},
      std::make_shared<CachedAttention>(stream, offset, n_heads, n_kv_heads, sc, traditional),
      {qkv, keys, values, cos, sin});
  return {outs[0], outs[1], outs[2]};
}

void CachedAttention::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto &qkv = inputs[0], &keys = inputs[1], &values = inputs[2];
  auto &out = outputs[0], &k_out = outputs[1], &v_out = outputs[2];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const bool copy_k = take_buffer(keys, k_out, outputs.size());
  const bool copy_v = take_buffer(values, v_out, outputs.size());
  const Shapes sh{qkv.shape(0), qkv.shape(1), n_heads_, n_kv_heads_, keys.shape(3), keys.shape(2)};

  fa::Problem p;
  p.B = sh.N, p.H = sh.H, p.H_kv = sh.H_kv, p.L = sh.L, p.S = offset_ + sh.L, p.D = sh.D;
  p.causal = true;
  p.scale = scale_;
  // The rotated q, (N, L, H, D), read as (B, H, L, D) through strides.
  const int64_t q_strides[4] = {int64_t(sh.L) * sh.H * sh.D, sh.D, int64_t(sh.H) * sh.D, 1};
  const int64_t kv_strides[4] = {int64_t(sh.H_kv) * sh.C * sh.D, int64_t(sh.C) * sh.D, sh.D, 1};
  p.q.dtype = fa_dtype(qkv.dtype());
  p.k.dtype = p.v.dtype = fa_dtype(keys.dtype());
  std::memcpy(p.q.strides, q_strides, sizeof q_strides);
  std::memcpy(p.k.strides, kv_strides, sizeof kv_strides);
  std::memcpy(p.v.strides, kv_strides, sizeof kv_strides);
  std::memcpy(p.out_strides, q_strides, sizeof q_strides);  // out (N, L, H, D) = (N, L, H * D)

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  for (auto& o : outputs) encoder.set_output_array(o);
  // Scratch from MLX's allocator (mx.get_peak_memory() sees it): the rotated q, then the
  // flash attention workspace.
  const size_t q_bytes = (size_t(sh.N) * sh.L * sh.H * sh.D * qkv.itemsize() + 63) / 64 * 64;
  const size_t bytes = q_bytes + fa::workspace_bytes(p);
  mx::array scratch(mx::allocator::malloc(bytes), {int((bytes + 3) / 4)}, mx::float32);
  char* qbuf = scratch.data<char>();
  encoder.add_temporary(std::move(scratch));
  encoder.dispatch([qkv = mx::array::unsafe_weak_copy(qkv), keys = mx::array::unsafe_weak_copy(keys),
                    values = mx::array::unsafe_weak_copy(values), cos = mx::array::unsafe_weak_copy(inputs[3]),
                    sin = mx::array::unsafe_weak_copy(inputs[4]), out = mx::array::unsafe_weak_copy(out),
                    k_out = mx::array::unsafe_weak_copy(k_out), v_out = mx::array::unsafe_weak_copy(v_out), copy_k,
                    copy_v, sh, p, qbuf, q_bytes, offset = offset_, traditional = traditional_]() mutable {
    std::vector<char> tmp;
    if (copy_k) std::memcpy(k_out.data<char>(), row_major(keys, tmp), k_out.nbytes());
    if (copy_v) std::memcpy(v_out.data<char>(), row_major(values, tmp), v_out.nbytes());
    with_float_type(qkv.dtype(), [&](auto q_type) {
      with_float_type(k_out.dtype(), [&](auto cache_type) {
        using T = decltype(q_type);
        using C = decltype(cache_type);
        prologue(qkv, cos, sin, sh, offset, traditional, reinterpret_cast<T*>(qbuf), k_out.data<C>(),
                 v_out.data<C>());
      });
    });
    p.q.data = qbuf;
    p.k.data = k_out.data<void>();
    p.v.data = v_out.data<void>();
    p.out = out.data<void>();
    fa::run(p, qbuf + q_bytes);
  });
}

void CachedAttention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("tiny_llm_kernels.cached_attention is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
