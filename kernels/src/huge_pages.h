// tiny_llm_kernels.huge_pages: a copy of an array in memory backed by 2 MB pages where the OS
// gives them (Linux transparent huge pages), for the weights that every decode step streams
// through. Batch-1 decode reads each weight once a token, at the memory's rate; on 4 KB pages
// the hardware prefetchers stop at every page boundary and each 4 KB costs a TLB entry.
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// a (any shape, any dtype) -> the same values, row-major, in a buffer whose start is 2 MB
// aligned and whose whole 2 MB spans are advised MADV_HUGEPAGE before they are first written.
// Under 4 MB, or where madvise has no MADV_HUGEPAGE, a plain copy.
mx::array huge_pages(const mx::array& a, mx::StreamOrDevice s = {});

class HugePagesPrimitive : public mx::UnaryPrimitive {
 public:
  explicit HugePagesPrimitive(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "TinyLLMHugePages"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace tiny_llm
