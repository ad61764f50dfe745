// The CPU flash attention behind tiny_llm_kernels.flash_attention, free of MLX
// (raw pointers and element strides), so a plain C++ program can test it.
//
// out = softmax(q @ k^T * scale + mask) @ v, grouped-query heads: query head h
// reads kv head h / (H / H_kv). Tiled with an online softmax, fp32 accumulation;
// the (L, S) scores never exist beyond one (rows, 64) tile per thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tiny_llm::fa {

enum class DType { f32, f16, bf16 };

// A 4-d view: element strides over (batch, head, row, column); 0 broadcasts.
struct Tensor {
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t strides[4] = {0, 0, 0, 0};
};

struct Problem {
  Tensor q, k, v;  // q (B, H, L, D); k, v (B, H_kv, S, D)
  Tensor mask;     // additive, viewed as (B, H, L, S); data == nullptr: no mask
  bool causal = false;  // query i sees keys j <= i + S - L (lower-right aligned)
  int B = 0, H = 0, H_kv = 0, L = 0, S = 0, D = 0;
  float scale = 1.0f;
  void* out = nullptr;  // (B, H, L, D) in q's dtype, at out_strides (set_contiguous_out: row-major)
  int64_t out_strides[4] = {0, 0, 0, 0};
  void set_contiguous_out() {
    out_strides[3] = 1, out_strides[2] = D, out_strides[1] = int64_t(L) * D, out_strides[0] = int64_t(H) * L * D;
  }
  int64_t out_offset(int b, int h, int l) const { return b * out_strides[0] + h * out_strides[1] + l * out_strides[2]; }
};

constexpr int kKeyTile = 64;  // keys per tile (BC)

// How the work is cut; a function of the problem and the thread count only.
struct Plan {
  int n_rep;      // query heads per kv head
  int Dp;         // D rounded up to 16: the padded row length of every fp32 buffer
  int positions;  // query positions per tile; a tile's rows are n_rep * positions
  int n_qtiles, n_ktiles;
  int n_splits;   // key ranges per query tile (> 1 only when there are too few tiles to share out)
  bool prepack;   // pack every kv tile once up front (many query tiles) or inside each task
  size_t packed_floats, partial_floats;  // workspace parts
  int max_rows() const { return n_rep * positions; }
  size_t tile_floats() const { return size_t(2) * kKeyTile * Dp; }
};

// One instruction set's kernels.
struct Isa {
  const char* name;
  // k tile t of kv head (b, g) as fp32: Kt (Dp, 64) transposed, then V (64, Dp); zero padded.
  void (*pack_kv)(const Problem& p, const Plan& plan, int b, int g, int t, float* dst);
  // Query tile qt of kv head (b, g) (all n_rep heads) over key tiles of split `split`.
  // packed: this (b, g)'s packed tiles, or nullptr to pack inside. With n_splits == 1 it
  // writes out; else (m, l, acc) per row to partial (rows * (Dp + 2) floats).
  void (*attend)(const Problem& p, const Plan& plan, int b, int g, int qt, int split,
                 const float* packed, float* partial);
  // Combines the n_splits partials of query tile qt of (b, g) into out.
  void (*merge)(const Problem& p, const Plan& plan, int b, int g, int qt, const float* partials);
};

const Isa& isa_portable();
const Isa* isa_avx2();    // nullptr where not compiled in (non-x86 builds)
const Isa* isa_avx512();  // nullptr where not compiled in

Plan make_plan(const Problem& p);
size_t workspace_bytes(const Problem& p);
// Runs on the shared thread pool; workspace: workspace_bytes(p) bytes, 64-byte aligned.
void run(const Problem& p, void* workspace);

// The instruction set in use; configure("portable" | "avx2" | "avx512" | "auto" or "" = best) forces
// one (for tests) and returns the name now in use; an unknown name, or one this CPU or build
// lacks, throws std::invalid_argument.
const char* isa_name();
const char* configure(const std::string& isa);

}  // namespace tiny_llm::fa
