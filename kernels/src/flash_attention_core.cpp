// Plans the work, picks the instruction set, and runs the tiles on the shared thread
// pool. No MLX here: flash_attention.cpp wraps this in a Primitive.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>

#include "cpu_features.h"
#include "flash_attention_kernels.h"
#include "quantized_matmul_threads.h"

namespace tiny_llm::fa {

namespace {

// Rows of a query tile: enough that each packed kv tile (32 KB at D = 64) is reused
// from L1/L2 by many rows, few enough that L = 512 still makes dozens of tiles.
constexpr int kTargetRows = 96;

bool has_avx512() { return isa_avx512() && cpu_has_avx512(); }

bool has_avx2() { return isa_avx2() && cpu_has_avx2_fma_f16c(); }

const Isa* best_isa() { return has_avx512() ? isa_avx512() : has_avx2() ? isa_avx2() : &isa_portable(); }

std::atomic<const Isa*>& current() {
  static std::atomic<const Isa*> isa{best_isa()};
  return isa;
}

}  // namespace

Plan make_plan(const Problem& p) {
  Plan plan{};
  plan.n_rep = p.H / p.H_kv;
  plan.Dp = (std::max(p.D, 1) + 15) / 16 * 16;
  plan.positions = std::max(1, std::min(p.L, kTargetRows / plan.n_rep));
  plan.n_qtiles = (p.L + plan.positions - 1) / plan.positions;
  plan.n_ktiles = (p.S + kKeyTile - 1) / kKeyTile;
  // Too few query tiles to keep every thread busy (decode: L = 1): split the keys too,
  // each split >= 2 tiles, and merge the partial softmaxes after (flash-decoding).
  const int tiles = p.B * p.H_kv * plan.n_qtiles, want = 4 * ThreadPool::get().size();
  plan.n_splits = 1;
  if (tiles < want && plan.n_ktiles >= 4) plan.n_splits = std::min((want + tiles - 1) / tiles, plan.n_ktiles / 2);
  // Several query tiles read each kv tile: convert it to fp32 (and transpose K) once.
  plan.prepack = plan.n_qtiles > 1;
  plan.packed_floats = plan.prepack ? size_t(p.B) * p.H_kv * plan.n_ktiles * plan.tile_floats() : 0;
  plan.partial_floats = plan.n_splits > 1 ? size_t(tiles) * plan.n_splits * plan.max_rows() * (plan.Dp + 2) : 0;
  return plan;
}

size_t workspace_bytes(const Problem& p) {
  const Plan plan = make_plan(p);
  return (plan.packed_floats + plan.partial_floats) * sizeof(float);
}

void run(const Problem& p, void* workspace) {
  if (p.B == 0 || p.H == 0 || p.L == 0 || p.D == 0) return;
  const size_t elem = p.q.dtype == DType::f32 ? 4 : 2;
  if (p.S == 0) {  // no keys: every row sees nothing, and outputs 0
    for (int b = 0; b < p.B; ++b)
      for (int h = 0; h < p.H; ++h)
        for (int l = 0; l < p.L; ++l)
          std::memset(static_cast<char*>(p.out) + p.out_offset(b, h, l) * elem, 0, p.D * elem);
    return;
  }
  const Isa& isa = *current().load();
  const Plan plan = make_plan(p);
  float* packed = static_cast<float*>(workspace);
  float* partial = packed + plan.packed_floats;
  const int BG = p.B * p.H_kv, ns = plan.n_splits, nq = plan.n_qtiles;
  const size_t per_bg = size_t(plan.n_ktiles) * plan.tile_floats();
  const size_t block = size_t(plan.max_rows()) * (plan.Dp + 2);
  ThreadPool& pool = ThreadPool::get();

  if (plan.prepack) {
    pool.run(BG * plan.n_ktiles, [&](int i) {
      const int bg = i / plan.n_ktiles, t = i % plan.n_ktiles;
      isa.pack_kv(p, plan, bg / p.H_kv, bg % p.H_kv, t, packed + bg * per_bg + size_t(t) * plan.tile_floats());
    });
  }
  // Last query tiles first: under a causal mask they see the most keys, and the
  // pool hands tasks out in order, so the long ones start early and the short
  // ones fill the gaps at the end.
  pool.run(BG * nq * ns, [&](int i) {
    const int split = i % ns, bg = (i / ns) % BG, qt = nq - 1 - i / ns / BG;
    isa.attend(p, plan, bg / p.H_kv, bg % p.H_kv, qt, split, plan.prepack ? packed + bg * per_bg : nullptr,
               partial + (size_t(bg * nq + qt) * ns + split) * block);
  });
  if (ns > 1) {
    pool.run(BG * nq, [&](int i) {
      const int bg = i / nq, qt = i % nq;
      isa.merge(p, plan, bg / p.H_kv, bg % p.H_kv, qt, partial + size_t(i) * ns * block);
    });
  }
}

const char* isa_name() { return current().load()->name; }

const char* configure(const std::string& isa) {
  const Isa* want = isa.empty() || isa == "auto" ? best_isa() : isa == "portable" ? &isa_portable() : nullptr;
  if (!want && isa != "avx2" && isa != "avx512")
    throw std::invalid_argument("unknown isa '" + isa + "' (portable, avx2, avx512 or auto)");
  if (isa == "avx2" && has_avx2()) want = isa_avx2();
  if (isa == "avx512" && has_avx512()) want = isa_avx512();
  if (!want) throw std::invalid_argument("this CPU (or build) lacks " + isa);
  current().store(want);
  return isa_name();
}

}  // namespace tiny_llm::fa
