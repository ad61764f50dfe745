// The MLX side of tiny_llm_kernels.paged_attention: the op (argument and metadata checks), the
// primitive's eval_cpu, and the prologue -- RoPE on q and k, k and v written to their slots --
// before the attention core (paged_attention_core.cpp) reads the pools in place. Compiled with
// -ffp-contract=off for RoPE's rounding (rope_row.h): the pools then hold exactly what the
// twin (impl.engine.paged_attention.paged_attention_mlx) writes.
#include "paged_attention.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_stream.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "paged_attention_kernels.h"
#include "quantized_matmul_threads.h"
#include "rope_row.h"
#include "row_major.h"
#include "take_buffer.h"

namespace tiny_llm {

namespace {

pa::DType pa_dtype(const mx::Dtype& t) {
  return t == mx::float16 ? pa::DType::f16 : t == mx::bfloat16 ? pa::DType::bf16 : pa::DType::f32;
}

// A dtype as Python prints it ("mlx.core.float32"), for the twin's words.
std::string dtype_str(const mx::Dtype& t) {
  static const std::pair<mx::Dtype, const char*> names[] = {
      {mx::bool_, "bool"},       {mx::uint8, "uint8"},     {mx::uint16, "uint16"},   {mx::uint32, "uint32"},
      {mx::uint64, "uint64"},    {mx::int8, "int8"},       {mx::int16, "int16"},     {mx::int32, "int32"},
      {mx::int64, "int64"},      {mx::float16, "float16"}, {mx::float32, "float32"}, {mx::float64, "float64"},
      {mx::bfloat16, "bfloat16"}, {mx::complex64, "complex64"}};
  for (const auto& [d, n] : names)
    if (d == t) return std::string("mlx.core.") + n;
  return "mlx.core.?";
}

struct Shapes {
  int T, B, H, H_kv, D, block_size, num_blocks, max_blocks, P;
};

// The int32 metadata, read into vectors (small: T, B and B * max_blocks values).
struct Meta {
  std::vector<int32_t> positions, slots, tables, cu, context;
};

std::vector<int32_t> ints(const mx::array& a) {
  std::vector<char> tmp;
  const auto* p = static_cast<const int32_t*>(row_major(a, tmp));
  return std::vector<int32_t>(p, p + a.size());
}

Meta read_meta(const mx::array& positions, const mx::array& slots, const mx::array& tables, const mx::array& cu,
               const mx::array& context) {
  return {ints(positions), ints(slots), ints(tables), ints(cu), ints(context)};
}

// "" when every index the kernel will follow lies inside the pools, the tables and the RoPE
// table; else the one-line reason.
std::string check_meta(const Meta& m, const Shapes& sh) {
  const std::string at = "paged_attention: ";
  auto s = [](int64_t v) { return std::to_string(v); };
  if (m.cu[0] != 0) return at + "cu_seqlens_q must start at 0, got " + s(m.cu[0]);
  for (int b = 0; b < sh.B; ++b)
    if (m.cu[b + 1] < m.cu[b])
      return at + "cu_seqlens_q must not decrease, got " + s(m.cu[b + 1]) + " after " + s(m.cu[b]);
  if (m.cu[sh.B] != sh.T) return at + "qkv holds " + s(sh.T) + " tokens, the metadata " + s(m.cu[sh.B]);
  const int64_t capacity = int64_t(sh.max_blocks) * sh.block_size;
  for (int b = 0; b < sh.B; ++b) {
    const int64_t ctx = m.context[b];
    if (ctx < 0 || ctx > capacity)
      return at + "context_lens[" + s(b) + "] = " + s(ctx) + " is outside 0.." + s(capacity) + " (block_tables holds " +
             s(sh.max_blocks) + " blocks of " + s(sh.block_size) + ")";
    for (int64_t i = 0; i < (ctx + sh.block_size - 1) / sh.block_size; ++i) {
      const int32_t id = m.tables[b * int64_t(sh.max_blocks) + i];
      if (id < 0 || id >= sh.num_blocks)
        return at + "block_tables[" + s(b) + ", " + s(i) + "] = " + s(id) + " is not a block of the pools (num_blocks = " +
               s(sh.num_blocks) + ")";
    }
    for (int t = m.cu[b]; t < m.cu[b + 1]; ++t) {
      const int64_t p = m.positions[t];
      if (p < 0 || p >= ctx)
        return at + "positions[" + s(t) + "] = " + s(p) + " is outside sequence " + s(b) + "'s context 0.." + s(ctx - 1);
      if (p >= sh.P) return at + "position " + s(p) + " is past the RoPE table of " + s(sh.P);
    }
  }
  const int64_t slots = int64_t(sh.num_blocks) * sh.block_size;
  for (int t = 0; t < sh.T; ++t)
    if (m.slots[t] < 0 || m.slots[t] >= slots)
      return at + "slot_mapping[" + s(t) + "] = " + s(m.slots[t]) + " is outside the pools' " + s(sh.num_blocks) + " * " +
             s(sh.block_size) + " slots";
  return "";
}

// q (T, H, D) rotated into qbuf; k rotated and v copied into their slots, rounded to qkv's type
// T (as the twin's RoPE output is) and then to the pools' type C (as its write is).
template <typename T, typename C>
void prologue(const mx::array& qkv, const mx::array& cos, const mx::array& sin, const Shapes& sh, const Meta& m,
              bool traditional, T* qbuf, C* kc, C* vc) {
  const auto& st = qkv.strides();
  const T* base = qkv.data<T>();
  const int half = sh.D / 2;
  const int64_t cs = cos.strides()[1], ss = sin.strides()[1];
  std::vector<T> krow(sh.D);
  for (int t = 0; t < sh.T; ++t) {
    const T* row = base + t * st[1];  // (H + 2 H_kv) * D values, st[2] apart
    const int p = m.positions[t];
    const float* c = cos.data<float>() + p * cos.strides()[0];
    const float* s = sin.data<float>() + p * sin.strides()[0];
    for (int h = 0; h < sh.H; ++h)
      rotate_row(row + int64_t(h) * sh.D * st[2], st[2], c, cs, s, ss, half, traditional,
                 qbuf + (int64_t(t) * sh.H + h) * sh.D);
    const int64_t blk = m.slots[t] / sh.block_size, off = m.slots[t] % sh.block_size;
    for (int g = 0; g < sh.H_kv; ++g) {
      const int64_t at = ((blk * sh.H_kv + g) * sh.block_size + off) * sh.D;
      rotate_row(row + int64_t(sh.H + g) * sh.D * st[2], st[2], c, cs, s, ss, half, traditional, krow.data());
      for (int d = 0; d < sh.D; ++d) kc[at + d] = C(float(krow[d]));
      const T* v = row + int64_t(sh.H + sh.H_kv + g) * sh.D * st[2];
      for (int d = 0; d < sh.D; ++d) vc[at + d] = C(float(v[d * st[2]]));
    }
  }
}

}  // namespace

std::tuple<mx::array, mx::array, mx::array> paged_attention(
    const mx::array& qkv, const mx::array& k_pool, const mx::array& v_pool, const mx::array& cos,
    const mx::array& sin, const mx::array& positions, const mx::array& slot_mapping, const mx::array& block_tables,
    const mx::array& cu_seqlens_q, const mx::array& context_lens, int n_heads, int n_kv_heads,
    std::optional<float> scale, bool traditional, int window, mx::StreamOrDevice s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("paged_attention: " + what); };
  // The twin's checks (impl.engine.paged_attention.check_paged_attention), in its order and words.
  if (qkv.ndim() != 3 || qkv.shape(0) != 1 || !is_float(qkv.dtype()))
    fail("qkv must be (1, T, (H + 2 H_kv) D) float32, float16 or bfloat16, got " + shape_str(qkv) + " " +
         dtype_str(qkv.dtype()));
  if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0)
    fail("n_heads must be a positive multiple of n_kv_heads, got " + std::to_string(n_heads) + " and " +
         std::to_string(n_kv_heads));
  const int T = qkv.shape(1), width = qkv.shape(2), heads = n_heads + 2 * n_kv_heads;
  if (width % heads != 0)
    fail("qkv's last axis (" + std::to_string(width) + ") is not (H + 2 H_kv) * D with H + 2 H_kv = " +
         std::to_string(heads));
  const int D = width / heads;
  if (k_pool.ndim() != 4 || k_pool.shape() != v_pool.shape() || k_pool.shape(1) != n_kv_heads || k_pool.shape(3) != D)
    fail("pools must both be (num_blocks, H_kv=" + std::to_string(n_kv_heads) + ", block_size, D=" +
         std::to_string(D) + "), got " + shape_str(k_pool) + " and " + shape_str(v_pool));
  if (!is_float(k_pool.dtype()) || v_pool.dtype() != k_pool.dtype())
    fail("the pools must share one dtype, float32, float16 or bfloat16");
  if (cu_seqlens_q.dtype() == mx::int32 && cu_seqlens_q.ndim() == 1 && cu_seqlens_q.size() > 0 &&
      cu_seqlens_q.is_available()) {  // the twin's last check: its sum(query_lens) is cu_seqlens_q[-1]
    std::vector<char> tmp;
    const int32_t total = static_cast<const int32_t*>(row_major(cu_seqlens_q, tmp))[cu_seqlens_q.size() - 1];
    if (total != T) fail("qkv holds " + std::to_string(T) + " tokens, the metadata " + std::to_string(total));
  }
  // The kernel's own.
  if (window < 0) fail("window must be positive, or 0 for none, got " + std::to_string(window));
  if (D == 0 || D % 2 != 0) fail("D = " + std::to_string(D) + " must be even and positive (RoPE rotates pairs)");
  if (k_pool.shape(2) <= 0) fail("the pools' block_size must be positive, got " + shape_str(k_pool));
  if (cos.ndim() != 2 || cos.shape() != sin.shape() || cos.shape(1) != D / 2 || cos.dtype() != mx::float32 ||
      sin.dtype() != mx::float32)
    fail("cos and sin must be float32 (P, D/2) = (P, " + std::to_string(D / 2) + "), got " + shape_str(cos) + " " +
         dtype_str(cos.dtype()) + " and " + shape_str(sin) + " " + dtype_str(sin.dtype()));
  const int B = context_lens.ndim() == 1 ? context_lens.shape(0) : -1;
  const mx::array* meta[5] = {&positions, &slot_mapping, &block_tables, &cu_seqlens_q, &context_lens};
  bool int32 = true;
  for (const auto* a : meta) int32 = int32 && a->dtype() == mx::int32;
  if (!int32 || positions.shape() != mx::Shape{T} || slot_mapping.shape() != mx::Shape{T} || B < 0 ||
      block_tables.ndim() != 2 || block_tables.shape(0) != B || cu_seqlens_q.shape() != mx::Shape{B + 1})
    fail("the metadata must be int32 positions (T,), slot_mapping (T,), block_tables (B, max_blocks), cu_seqlens_q"
         " (B + 1,) and context_lens (B,) with T = " + std::to_string(T) + ", got " + shape_str(positions) + ", " +
         shape_str(slot_mapping) + ", " + shape_str(block_tables) + ", " + shape_str(cu_seqlens_q) + ", " +
         shape_str(context_lens) + " of " + dtype_str(positions.dtype()) + ", " + dtype_str(slot_mapping.dtype()) +
         ", " + dtype_str(block_tables.dtype()) + ", " + dtype_str(cu_seqlens_q.dtype()) + ", " +
         dtype_str(context_lens.dtype()));
  const Shapes sh{T, B, n_heads, n_kv_heads, D, k_pool.shape(2), k_pool.shape(0), block_tables.shape(1), cos.shape(0)};
  // The values too, when they can be read now (the engine builds them from lists); else the
  // node checks them when it runs, before it writes anything.
  bool ready = true;
  for (const auto* a : meta) ready = ready && a->is_available();
  if (ready) {
    const std::string err = check_meta(read_meta(positions, slot_mapping, block_tables, cu_seqlens_q, context_lens), sh);
    if (!err.empty()) throw std::invalid_argument(err);
  }
  const mx::Stream stream = cpu_stream(s, "paged_attention");
  const float sc = scale.value_or(1.0f / std::sqrt(float(D)));
  auto outs = mx::array::make_arrays(
      {{1, T, n_heads * D}, k_pool.shape(), v_pool.shape()}, {qkv.dtype(), k_pool.dtype(), k_pool.dtype()},
      std::make_shared<PagedAttention>(stream, n_heads, n_kv_heads, sc, traditional, window),
      {qkv, k_pool, v_pool, cos, sin, positions, slot_mapping, block_tables, cu_seqlens_q, context_lens});
  return {outs[0], outs[1], outs[2]};
}

void PagedAttention::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto &qkv = inputs[0], &k_pool = inputs[1], &v_pool = inputs[2];
  auto &out = outputs[0], &k_out = outputs[1], &v_out = outputs[2];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const bool copy_k = take_buffer(k_pool, k_out, outputs.size());
  const bool copy_v = take_buffer(v_pool, v_out, outputs.size());
  const Shapes sh{qkv.shape(1),   inputs[9].shape(0), n_heads_,         n_kv_heads_,     k_pool.shape(3),
                  k_pool.shape(2), k_pool.shape(0),    inputs[7].shape(1), inputs[3].shape(0)};

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  for (auto& o : outputs) encoder.set_output_array(o);
  // The rotated q, from MLX's allocator (mx.get_peak_memory() sees it).
  const size_t q_bytes = std::max<size_t>(4, size_t(sh.T) * sh.H * sh.D * qkv.itemsize());
  mx::array scratch(mx::allocator::malloc(q_bytes), {int((q_bytes + 3) / 4)}, mx::float32);
  char* qbuf = scratch.data<char>();
  encoder.add_temporary(std::move(scratch));
  auto weak = [](const mx::array& a) { return mx::array::unsafe_weak_copy(a); };
  encoder.dispatch([qkv = weak(qkv), k_pool = weak(k_pool), v_pool = weak(v_pool), cos = weak(inputs[3]),
                    sin = weak(inputs[4]), positions = weak(inputs[5]), slots = weak(inputs[6]),
                    tables = weak(inputs[7]), cu = weak(inputs[8]), context = weak(inputs[9]), out = weak(out),
                    k_out = weak(k_out), v_out = weak(v_out), copy_k, copy_v, sh, qbuf, scale = scale_,
                    traditional = traditional_, window = window_]() mutable {
    const Meta m = read_meta(positions, slots, tables, cu, context);
    // Checked when the op was built if the metadata was ready then; else here, before any write.
    // (MLX hands an exception from a task back to the caller of eval.)
    if (const std::string err = check_meta(m, sh); !err.empty()) throw std::invalid_argument(err);
    std::vector<char> tmp;
    if (copy_k) std::memcpy(k_out.data<char>(), row_major(k_pool, tmp), k_out.nbytes());
    if (copy_v) std::memcpy(v_out.data<char>(), row_major(v_pool, tmp), v_out.nbytes());
    if (sh.T == 0) return;
    with_float_type(qkv.dtype(), [&](auto q_type) {
      with_float_type(k_out.dtype(), [&](auto pool_type) {
        using T = decltype(q_type);
        using C = decltype(pool_type);
        prologue(qkv, cos, sin, sh, m, traditional, reinterpret_cast<T*>(qbuf), k_out.data<C>(), v_out.data<C>());
      });
    });
    pa::Problem p;
    p.T = sh.T, p.B = sh.B, p.H = sh.H, p.H_kv = sh.H_kv, p.D = sh.D;
    p.block_size = sh.block_size, p.num_blocks = sh.num_blocks, p.max_blocks = sh.max_blocks;
    p.scale = scale;
    p.window = window;
    p.q_dtype = pa_dtype(qkv.dtype());
    p.kv_dtype = pa_dtype(k_out.dtype());
    p.q = qbuf;
    p.k = k_out.data<void>();
    p.v = v_out.data<void>();
    p.positions = m.positions.data();
    p.block_tables = m.tables.data();
    p.out = out.data<void>();
    pa::run(p, m.cu.data());
  });
}

void PagedAttention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("tiny_llm_kernels.paged_attention is a CPU kernel; run it with stream=mx.cpu");
}

std::map<std::string, std::string> paged_attention_info() {
  return {{"isa", pa::isa_name()},
          {"threads", std::to_string(ThreadPool::get().size())},
          {"key_tile", std::to_string(pa::kKeyTile)},
          {"segment", std::to_string(pa::kSegment)}};
}

std::map<std::string, std::string> paged_attention_configure(const std::string& isa) {
  pa::configure(isa);
  return paged_attention_info();
}

}  // namespace tiny_llm
