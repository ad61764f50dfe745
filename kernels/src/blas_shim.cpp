// The BLAS fix: MLX's Linux CPU wheels link the reference BLAS (~5 GFLOPS for an fp32
// matmul). This library defines the cblas entry points MLX calls and forwards them to
// OpenBLAS from the scipy-openblas32 wheel, whose symbols carry a `scipy_` prefix. Loaded
// RTLD_GLOBAL before mlx, it wins symbol resolution. The scipy_* symbols resolve at load
// time against that OpenBLAS, which tiny_llm_kernels loads (also RTLD_GLOBAL) just before
// this library.
//
// OpenBLAS runs on one thread (tiny_llm_kernels/__init__.py sets it: its own spinning
// workers fought MLX's eval thread on 2 cores). A large sgemm is instead cut into ranges of
// C's rows (or columns, when C is wider than tall), one single-threaded OpenBLAS call each, on
// the kernels' thread pool (whose waiting workers yield their core). Each element of C is
// still one call's dot product over all of K; a range only moves the pointers.
#include <atomic>

#include "quantized_matmul_threads.h"

using blasint = int;

extern "C" {
void scipy_cblas_sgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, float alpha,
                       const float* a, blasint lda, const float* b, blasint ldb, float beta, float* c, blasint ldc);
void scipy_cblas_dgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, double alpha,
                       const double* a, blasint lda, const double* b, blasint ldb, double beta, double* c,
                       blasint ldc);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111;
// Below this many multiply-adds a call stays whole: handing half to the other thread costs a
// few microseconds, about what 2^21 multiply-adds take on one core.
constexpr double kSplitMacs = double(1 << 21);

std::atomic<long> sgemm_calls{0};
std::atomic<int> sgemm_threads{0};  // 0: the pool's size; 1: never split

}  // namespace

extern "C" {

// How many sgemm calls came through here: the spec's proof that MLX uses this path.
long tiny_llm_blas_shim_sgemm_calls(void) { return sgemm_calls.load(); }

// The most row ranges a large sgemm is cut into (0: the thread pool's size, the default; 1:
// every call on the caller's thread); returns the previous setting.
int tiny_llm_blas_shim_set_threads(int threads) { return sgemm_threads.exchange(threads < 0 ? 0 : threads); }

void cblas_sgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, float alpha, const float* a,
                 blasint lda, const float* b, blasint ldb, float beta, float* c, blasint ldc) {
  sgemm_calls.fetch_add(1);
  if (order != kRowMajor) {  // column-major C = op(A) op(B) is row-major C^T = op(B)^T op(A)^T
    std::swap(m, n), std::swap(a, b), std::swap(lda, ldb), std::swap(trans_a, trans_b);
  }
  tiny_llm::ThreadPool& pool = tiny_llm::ThreadPool::get();
  const int want = sgemm_threads.load() ? sgemm_threads.load() : pool.size();
  const int parts = double(m) * n * k < kSplitMacs || std::max(m, n) < 32 ? 1 : std::min(want, pool.size());
  if (parts <= 1) {
    scipy_cblas_sgemm(kRowMajor, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Cut the longer side of C, so that each call reads its share of the larger operand: rows of
  // C take rows of op(A) (row i of A, or column i when transposed), columns take columns of op(B).
  const bool by_rows = m >= n;
  const tiny_llm::Split split(by_rows ? m : n, parts, by_rows ? 1 : 16);
  pool.run(split.count, [&](int t) {
    const blasint i0 = blasint(t) * split.per, len = std::min<blasint>((by_rows ? m : n) - i0, split.per);
    if (by_rows) {
      const float* at = a + (trans_a == kNoTrans ? size_t(i0) * lda : size_t(i0));
      scipy_cblas_sgemm(kRowMajor, trans_a, trans_b, len, n, k, alpha, at, lda, b, ldb, beta, c + size_t(i0) * ldc, ldc);
    } else {
      const float* bt = b + (trans_b == kNoTrans ? size_t(i0) : size_t(i0) * ldb);
      scipy_cblas_sgemm(kRowMajor, trans_a, trans_b, m, len, k, alpha, a, lda, bt, ldb, beta, c + i0, ldc);
    }
  });
}

void cblas_dgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, double alpha, const double* a,
                 blasint lda, const double* b, blasint ldb, double beta, double* c, blasint ldc) {
  scipy_cblas_dgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // extern "C"
