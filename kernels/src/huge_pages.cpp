// The copy behind tiny_llm_kernels.huge_pages (huge_pages.h).
//
// The buffer comes from MLX's allocator (so MLX frees it as any other), 2 MB larger than the
// array, and the array starts at the first 2 MB boundary inside it. Before the copy writes it,
// the array's whole 2 MB spans are emptied (MADV_DONTNEED: a reused heap block may hold 4 KB
// pages already; the bytes are about to be overwritten) and advised MADV_HUGEPAGE, so that the
// copy's first touch of each span faults in one 2 MB page, when the kernel has one to give.
// Nothing depends on getting them: where it does not, the array is an ordinary copy.
#include "huge_pages.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_stream.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "row_major.h"

namespace tiny_llm {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
#define TINY_LLM_HAVE_MADV_HUGEPAGE 1
constexpr size_t kHuge = size_t(2) << 20;
#endif

mx::array huge_pages(const mx::array& a, mx::StreamOrDevice s) {
  const mx::Stream stream = cpu_stream(s, "huge_pages");
  return mx::array(a.shape(), a.dtype(), std::make_shared<HugePagesPrimitive>(stream), {a});
}

void HugePagesPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const size_t n = out.nbytes();
  bool placed = false;
#if defined(TINY_LLM_HAVE_MADV_HUGEPAGE)
  if (n >= 2 * kHuge) {
    mx::allocator::Data data = mx::allocator::malloc(n + kHuge);
    char* raw = static_cast<char*>(data.buffer().raw_ptr());
    if (raw != nullptr) {
      const uintptr_t at = (reinterpret_cast<uintptr_t>(raw) + kHuge - 1) & ~(kHuge - 1);
      char* start = reinterpret_cast<char*>(at);
      const size_t spans = n / kHuge * kHuge;  // the whole 2 MB spans of the array; the tail stays on 4 KB pages
      madvise(start, spans, MADV_DONTNEED);
      madvise(start, spans, MADV_HUGEPAGE);
      mx::array::Flags flags;
      flags.contiguous = flags.row_contiguous = true;
      int big_axes = 0;
      for (int d : out.shape()) big_axes += d > 1;
      flags.col_contiguous = big_axes <= 1;
      out.set_data(std::move(data), out.size(), mx::make_contiguous_strides(out.shape()), flags, int64_t(start - raw));
      placed = true;
    }
  }
#endif
  if (!placed) out.set_data(mx::allocator::malloc(n));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(inputs[0]);
  encoder.set_output_array(out);
  encoder.dispatch([a = mx::array::unsafe_weak_copy(inputs[0]), out = mx::array::unsafe_weak_copy(out), n]() mutable {
    std::vector<char> tmp;
    std::memcpy(out.data<char>(), row_major(a, tmp), n);
  });
}

void HugePagesPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("tiny_llm_kernels.huge_pages is a CPU op; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
