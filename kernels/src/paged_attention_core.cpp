// Cuts a paged attention step into tasks, picks the instruction set, and runs the tasks on
// the shared thread pool. No MLX here: paged_attention.cpp wraps this in a Primitive.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "cpu_features.h"
#include "paged_attention_kernels.h"
#include "quantized_matmul_threads.h"

namespace tiny_llm::pa {

namespace {

// Rows of a task (query heads x tokens): enough that each key tile, converted or read in
// place, serves many rows from L1/L2; few enough that a 512-token chunk makes a dozen tasks.
constexpr int kTargetRows = 96;

bool has_avx512() { return isa_avx512() && cpu_has_avx512(); }

bool has_avx2() { return isa_avx2() && cpu_has_avx2_fma_f16c(); }

const Isa* best_isa() { return has_avx512() ? isa_avx512() : has_avx2() ? isa_avx2() : &isa_portable(); }

const Isa* isa_named(const std::string& isa) {
  if (isa.empty() || isa == "auto") return best_isa();
  if (isa == "portable") return &isa_portable();
  if (isa == "avx512") {
    if (!has_avx512()) throw std::invalid_argument("this CPU (or build) lacks AVX-512");
    return isa_avx512();
  }
  if (isa == "avx2") {
    if (!has_avx2()) throw std::invalid_argument("this CPU (or build) lacks AVX2/FMA/F16C");
    return isa_avx2();
  }
  throw std::invalid_argument("unknown isa '" + isa + "' (portable, avx2, avx512 or auto)");
}

std::atomic<const Isa*>& current() {
  static std::atomic<const Isa*> isa{[] {
    if (const char* env = std::getenv("TINY_LLM_QMM_ISA"); env && *env) {
      try {
        return isa_named(env);
      } catch (const std::exception& e) {  // first use may be on MLX's stream thread: never throw
        std::fprintf(stderr, "tiny-llm: TINY_LLM_QMM_ISA=%s ignored by paged_attention (%s)\n", env, e.what());
      }
    }
    return best_isa();
  }()};
  return isa;
}

}  // namespace

void run(const Problem& p, const int32_t* cu) {
  if (p.T == 0 || p.H == 0 || p.D == 0) return;
  const Isa& isa = *current().load();
  ThreadPool& pool = ThreadPool::get();
  const int n_rep = p.H / p.H_kv, tokens = std::max(1, kTargetRows / n_rep);

  // Items: a kv head's query heads for up to `tokens` tokens of one sequence; or, with rows
  // that few (decode) and sequences enough to keep the threads busy, every kv head's: fewer
  // tasks, each reading whole blocks (a block's heads are contiguous in the pool).
  int blocks = 0;
  for (int b = 0; b < p.B; ++b) blocks += (cu[b + 1] - cu[b] + tokens - 1) / tokens;
  const bool all_heads = blocks >= 2 * pool.size();
  std::vector<Item> items;
  std::vector<int> segs, firsts;  // how many segments each item's rows reach; the first any row sees
  for (int b = 0; b < p.B; ++b)
    for (int t0 = cu[b]; t0 < cu[b + 1]; t0 += tokens) {
      const int nt = std::min(tokens, cu[b + 1] - t0);
      const int last = *std::max_element(p.positions + t0, p.positions + t0 + nt);
      const int lo = p.lo(*std::min_element(p.positions + t0, p.positions + t0 + nt));
      for (int g = 0; g < p.H_kv; ++g) {
        const bool whole = all_heads && nt * p.H <= kTargetRows;
        items.push_back({b, whole ? 0 : g, whole ? p.H_kv : 1, t0, nt});
        segs.push_back(last / kSegment + 1);
        firsts.push_back(lo / kSegment);
        if (whole) break;
      }
    }
  // Too few items to keep the threads busy (a small decode batch): each segment of a long
  // item is a task of its own, and a second pass folds them (flash-decoding). The bits are
  // the same either way.
  const bool split = items.size() < size_t(2 * pool.size());
  struct Task {
    int item, seg;  // seg -1: the whole item
    int64_t cost;
    float* partial;
  };
  std::vector<Task> tasks;
  std::vector<int> merges;  // the split items
  size_t partial_floats = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    const int64_t rows = int64_t(it.ng) * n_rep * it.nt;
    if (!split || segs[i] - firsts[i] == 1) {
      tasks.push_back({int(i), -1, rows * (segs[i] - firsts[i]) * kSegment, nullptr});
      continue;
    }
    merges.push_back(int(i));
    // Segments before the window have no task; their blocks of partials stay unread (merge
    // starts each row at its own first segment).
    for (int s = firsts[i]; s < segs[i]; ++s) tasks.push_back({int(i), s, rows * kSegment, nullptr});
    partial_floats += size_t(segs[i]) * rows * (p.Dp() + 2);
  }
  std::vector<float> partials(partial_floats);
  std::vector<float*> first(items.size(), nullptr);  // each split item's partials (segment 0's block)
  float* at = partials.data();
  for (size_t i = 0; i < items.size(); ++i)
    if (split && segs[i] - firsts[i] > 1) {
      first[i] = at;
      at += size_t(segs[i]) * items[i].ng * n_rep * items[i].nt * (p.Dp() + 2);
    }
  for (Task& t : tasks)
    if (t.seg >= 0) t.partial = first[t.item] + size_t(t.seg) * items[t.item].ng * n_rep * items[t.item].nt * (p.Dp() + 2);
  // The longest first (the pool hands tasks out in order), so the short ones fill the end.
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  pool.run(int(tasks.size()), [&](int i) { isa.attend(p, items[tasks[i].item], tasks[i].seg, tasks[i].partial); });
  if (!merges.empty())
    pool.run(int(merges.size()), [&](int i) { isa.merge(p, items[merges[i]], first[merges[i]], segs[merges[i]]); });
}

const char* isa_name() { return current().load()->name; }

const char* configure(const std::string& isa) {
  current().store(isa_named(isa));
  return isa_name();
}

}  // namespace tiny_llm::pa
