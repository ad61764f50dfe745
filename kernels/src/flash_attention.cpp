// The MLX side of flash attention: the op (checks, mask broadcast), and the
// primitive's eval_cpu, which hands raw pointers and strides to the core.
#include "flash_attention.h"

#include <cmath>
#include <limits>
#include <stdexcept>

#include "cpu_stream.h"
#include "flash_attention_kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "quantized_matmul_threads.h"

namespace tiny_llm {

namespace {

fa::DType to_fa(mx::Dtype t) {
  if (t == mx::float32) return fa::DType::f32;
  if (t == mx::float16) return fa::DType::f16;
  if (t == mx::bfloat16) return fa::DType::bf16;
  throw std::invalid_argument("flash_attention: inputs must be float32, float16 or bfloat16");
}

fa::Tensor view(const mx::array& a) {  // any strides, including MLX's 0-stride broadcasts
  fa::Tensor t;
  t.data = a.data<void>();
  t.dtype = to_fa(a.dtype());
  for (int i = 0; i < 4; ++i) t.strides[i] = a.strides()[i];
  return t;
}

}  // namespace

mx::array flash_attention(const mx::array& q, const mx::array& k, const mx::array& v, std::optional<float> scale,
                          bool causal, const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4)
    throw std::invalid_argument("flash_attention: q, k, v must be (B, H, L, D), (B, H_kv, S, D), (B, H_kv, S, D); got " +
                                shape_str(q) + ", " + shape_str(k) + ", " + shape_str(v));
  const int B = q.shape(0), H = q.shape(1), L = q.shape(2), D = q.shape(3), H_kv = k.shape(1), S = k.shape(2);
  if (k.shape() != v.shape() || k.shape(0) != B || k.shape(3) != D || D == 0 || H_kv == 0 || H % H_kv != 0)
    throw std::invalid_argument("flash_attention: q " + shape_str(q) + ", k " + shape_str(k) + ", v " + shape_str(v) +
                                ": need k == v shapes, equal B and D >= 1, and H a multiple of H_kv");
  if (k.dtype() != q.dtype() || v.dtype() != q.dtype())
    throw std::invalid_argument("flash_attention: q, k, v must share one dtype");
  to_fa(q.dtype());
  const float sc = scale.value_or(1.0f / std::sqrt(float(D)));
  const mx::Stream stream = cpu_stream(s, "flash_attention");
  std::vector<mx::array> inputs = {q, k, v};
  if (mask) {
    mx::array m = *mask;
    if (m.dtype() == mx::bool_) {  // true = attend
      m = mx::where(m, mx::array(0.0f, q.dtype()), mx::array(-std::numeric_limits<float>::infinity(), q.dtype()), stream);
    } else if (!is_float(m.dtype())) {
      m = mx::astype(m, mx::float32, stream);
    }
    // A view with 0 strides on broadcast axes: an (L, S) mask stays (L, S) in memory.
    inputs.push_back(mx::broadcast_to(m, {B, H, L, S}, stream));
  }
  return mx::array(q.shape(), q.dtype(), std::make_shared<FlashAttention>(stream, sc, causal, bool(mask)),
                   std::move(inputs));
}

void FlashAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) return;  // B, H, L or D of 0: nothing to compute (and no heads to group)

  fa::Problem p;
  p.q = view(q), p.k = view(k), p.v = view(v);
  if (has_mask_) p.mask = view(inputs[3]);
  p.causal = causal_;
  p.B = q.shape(0), p.H = q.shape(1), p.L = q.shape(2), p.D = q.shape(3);
  p.H_kv = k.shape(1), p.S = k.shape(2);
  p.scale = scale_;
  p.out = out.data<void>();
  p.set_contiguous_out();

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  // The packed kv tiles and flash-decoding partials: O(S * D) and O(threads * D),
  // from MLX's allocator so that mx.get_peak_memory() sees them.
  void* workspace = nullptr;
  if (const size_t bytes = fa::workspace_bytes(p)) {
    mx::array ws(mx::allocator::malloc(bytes), {int((bytes + 3) / 4)}, mx::float32);
    workspace = ws.data<void>();
    encoder.add_temporary(std::move(ws));  // freed once the task below is done
  }
  encoder.dispatch([p, workspace]() { fa::run(p, workspace); });
}

void FlashAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("tiny_llm_kernels.flash_attention has no GPU implementation here (topic 2.5): "
                           "run it on a CPU stream (stream=mx.cpu)");
}

std::map<std::string, std::string> flash_attention_info() {
  return {{"isa", fa::isa_name()},
          {"threads", std::to_string(ThreadPool::get().size())},
          {"key_tile", std::to_string(fa::kKeyTile)}};
}

std::map<std::string, std::string> flash_attention_configure(const std::string& isa) {
  fa::configure(isa);
  return flash_attention_info();
}

}  // namespace tiny_llm
