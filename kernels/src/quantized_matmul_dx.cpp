// The x-gradient of the quantized matmul (QLoRA, topic 4.7): dx (M, K) = dy (M, N) @ W (N, K),
// W = dequantize(w_q, scales, biases) in MLX's affine format, on the CPU.
//
// Plain C++ that the compiler vectorizes: the baseline's SSE2 (x86-64) or NEON (arm64), and on
// x86-64 Linux AVX2 and AVX-512 clones of the inner loops too (add_rows). The columns of dx are
// split over the thread pool in slices of whole groups, so each task owns its slice of every row of
// dx (no races, no reduction). Per task, for n = 0 .. N - 1 in blocks of 8 rows: dequantize each
// row's slice group by group into fp32 (w = s * q + b, multiply then add: -ffp-contract=off,
// CMakeLists.txt), then for every m sum the 8 products dy[m, n] * w in order and add that to
// dx[m, slice] (a tail of fewer rows: one by one). W streams from memory once; the (M, slice)
// accumulators stay in cache for small M. The order of the sum over n is fixed, so a value differs
// from the twin's (one BLAS sgemm on the dequantized W, its own blocking) by fp32 summation-order
// rounding only.
#include "quantized_matmul_dx.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_stream.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "quantized_matmul_threads.h"
#include "row_major.h"

namespace tiny_llm {

namespace {

// Row n's columns [k0, k1) of W (k0, k1 multiples of group_size) into w, fp32. s, b: fp32 (N, G).
void dequantize_slice(const uint32_t* wq, const float* s, const float* b, int K, int group_size, int bits, int n,
                      int k0, int k1, float* w) {
  const int per_word = 32 / bits, G = K / group_size;
  const uint32_t mask = (1u << bits) - 1;
  const uint32_t* row = wq + size_t(n) * (K / per_word);
  for (int g0 = k0; g0 < k1; g0 += group_size) {
    const float sc = s[size_t(n) * G + g0 / group_size], bi = b[size_t(n) * G + g0 / group_size];
    for (int k = g0; k < g0 + group_size; k += per_word) {
      const uint32_t word = row[k / per_word];
      for (int j = 0; j < per_word; ++j) w[k - k0 + j] = sc * float((word >> (bits * j)) & mask) + bi;
    }
  }
}

// acc[0, width) += d[0] * w[0] + d[1] * w[1] + ... + d[7] * w[7]: the 8 products summed in
// order into a fresh partial, then added to acc. One load and store of acc per 8 products, and a
// chain of N / 8 + 8 additions per output instead of N: measured through the model's 30 layers of
// backward, summing all N in one chain put layer 0's adapter gradients 1.6e-4 (of their largest)
// off the dense model's, beyond the spec's 1e-4 (QLORA_GRAD). On x86-64 Linux a copy for AVX-512
// and one for AVX2 too (16 and 8 lanes; the loader picks one per CPU), else the baseline's 4 lanes.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define TINY_LLM_DX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TINY_LLM_DX_CLONES
#endif
constexpr int kRows = 8;  // rows of W dequantized and added per pass over dx's slice

// Plain functions, not a template over the row count: clang's target_clones takes no templates.
TINY_LLM_DX_CLONES void add_rows(float* __restrict acc, const float* __restrict w, size_t stride, const float* d,
                                 int width) {
  for (int k = 0; k < width; ++k) {
    float a = d[0] * w[k];
    for (int r = 1; r < kRows; ++r) a += d[r] * w[size_t(r) * stride + k];
    acc[k] += a;
  }
}

TINY_LLM_DX_CLONES void add_row(float* __restrict acc, const float* __restrict w, float d, int width) {
  for (int k = 0; k < width; ++k) acc[k] += d * w[k];
}

void run_dx(const float* dy, const uint32_t* wq, const float* s, const float* b, float* dx, long M, int N, int K,
            int group_size, int bits) {
  auto& pool = ThreadPool::get();
  const int groups = K / group_size;
  // Slices of whole groups; one task when the work is small (handing it over costs more).
  const double work = double(M) * N * K;
  const int tasks = std::clamp(int(work / (1 << 16)), 1, std::min(groups, pool.size()));
  const int per = (groups + tasks - 1) / tasks * group_size;
  const int count = (K + per - 1) / per;
  pool.run(count, [&](int t) {
    const int k0 = t * per, k1 = std::min(K, k0 + per), width = k1 - k0;
    thread_local std::vector<float> w;
    w.resize(size_t(kRows) * width);
    float d[kRows];
    for (long m = 0; m < M; ++m) std::fill(dx + size_t(m) * K + k0, dx + size_t(m) * K + k1, 0.0f);
    for (int n0 = 0; n0 < N; n0 += kRows) {
      const int rows = std::min(kRows, N - n0);
      for (int r = 0; r < rows; ++r)
        dequantize_slice(wq, s, b, K, group_size, bits, n0 + r, k0, k1, w.data() + size_t(r) * width);
      for (long m = 0; m < M; ++m) {
        float* acc = dx + size_t(m) * K + k0;
        for (int r = 0; r < rows; ++r) d[r] = dy[size_t(m) * N + n0 + r];
        if (rows == kRows) {
          add_rows(acc, w.data(), width, d, width);
        } else {
          for (int r = 0; r < rows; ++r) add_row(acc, w.data() + size_t(r) * width, d[r], width);
        }
      }
    }
  });
}

}  // namespace

mx::array quantized_matmul_dx(const mx::array& dy, const mx::array& w_q, const mx::array& scales,
                              const mx::array& biases, int group_size, int bits, mx::StreamOrDevice s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("quantized_matmul_dx: " + what); };
  check_bits_and_group_size("quantized_matmul_dx", group_size, bits);
  if (w_q.ndim() != 2 || w_q.dtype() != mx::uint32)
    fail("w_q must be a 2-D uint32 array (N, K * bits / 32), got " + shape_str(w_q.shape()));
  if (dy.ndim() < 1 || !is_float(dy.dtype()))
    fail("dy must be float32, float16 or bfloat16 with shape (..., N), got " + shape_str(dy));
  const int N = w_q.shape(0);
  const int64_t K = int64_t(w_q.shape(1)) * 32 / bits;
  if (dy.shape(-1) != N)
    fail("dy has N = " + std::to_string(dy.shape(-1)) + " but w_q " + shape_str(w_q.shape()) + " has " +
         std::to_string(N) + " rows");
  check_scales_and_biases("quantized_matmul_dx", w_q, scales, biases, group_size, bits);
  const mx::Stream stream = cpu_stream(s, "quantized_matmul_dx");
  // The kernel reads fp32 (exact conversions); the result goes back to dy's dtype.
  auto f32 = [&](const mx::array& a) { return a.dtype() == mx::float32 ? a : mx::astype(a, mx::float32, stream); };
  mx::Shape shape = dy.shape();
  shape.back() = int(K);
  mx::array dx(shape, mx::float32, std::make_shared<QuantizedMatmulDx>(stream, group_size, bits),
               {f32(dy), w_q, f32(scales), f32(biases)});
  return dy.dtype() == mx::float32 ? dx : mx::astype(dx, dy.dtype(), stream);
}

void QuantizedMatmulDx::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = cpu_encoder(stream(), inputs, out);
  encoder.dispatch([in = weak_copies(inputs), out = mx::array::unsafe_weak_copy(out), gs = group_size_,
                    bits = bits_]() mutable {
    const int N = in[1].shape(0), K = int(int64_t(in[1].shape(1)) * 32 / bits);
    const long M = long(out.size() / std::max(1, K));
    if (M == 0 || K == 0) return;
    if (N == 0) {
      std::fill(out.data<float>(), out.data<float>() + out.size(), 0.0f);
      return;
    }
    std::vector<char> td, tw, ts, tb;
    run_dx(static_cast<const float*>(row_major(in[0], td)), static_cast<const uint32_t*>(row_major(in[1], tw)),
           static_cast<const float*>(row_major(in[2], ts)), static_cast<const float*>(row_major(in[3], tb)),
           out.data<float>(), M, N, K, gs, bits);
  });
}

void QuantizedMatmulDx::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("tiny_llm_kernels.quantized_matmul_dx is a CPU kernel; run it with stream=mx.cpu");
}

}  // namespace tiny_llm
