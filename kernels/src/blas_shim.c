/* The BLAS fix: MLX's Linux CPU wheels link the reference BLAS (~5 GFLOPS for
 * an fp32 matmul). This library defines the cblas entry points MLX calls and
 * forwards them to OpenBLAS from the scipy-openblas32 wheel, whose symbols carry
 * a `scipy_` prefix. Loaded RTLD_GLOBAL before mlx, it wins symbol resolution.
 * The scipy_* symbols resolve at load time against that OpenBLAS, which
 * tiny_llm_kernels loads (also RTLD_GLOBAL) just before this library. */

#include <stdatomic.h>

typedef int blasint;

extern void scipy_cblas_sgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k,
                              float alpha, const float *a, blasint lda, const float *b, blasint ldb,
                              float beta, float *c, blasint ldc);
extern void scipy_cblas_dgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k,
                              double alpha, const double *a, blasint lda, const double *b,
                              blasint ldb, double beta, double *c, blasint ldc);

static atomic_long sgemm_calls;

/* How many sgemm calls came through here: the spec's proof that MLX uses this path. */
long tiny_llm_blas_shim_sgemm_calls(void) { return atomic_load(&sgemm_calls); }

void cblas_sgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, float alpha,
                 const float *a, blasint lda, const float *b, blasint ldb, float beta, float *c,
                 blasint ldc) {
  atomic_fetch_add(&sgemm_calls, 1);
  scipy_cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, double alpha,
                 const double *a, blasint lda, const double *b, blasint ldb, double beta, double *c,
                 blasint ldc) {
  scipy_cblas_dgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
