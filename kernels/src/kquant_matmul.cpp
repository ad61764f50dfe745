// The MLX side of tiny_llm_kernels.kquant_matmul: checks, the graph node, and the CPU evaluation,
// split over the thread pool by rows of W (across its parts: a stacked q/k/v may hold Q4_K and
// Q6_K rows). Paths:
//   M < panel_min_m (decode): each task streams its rows' blocks once, decoding a block for up to
//     8 rows of x at a time: fp32 (x as given) or, with x_int8, integer dot products against x
//     quantized per block of 256 (VNNI on AVX-512).
//   M >= panel_min_m (prefill): each task decodes a panel of 64 rows of W to fp32 and runs
//     quantized_matmul's fp32 panel kernel (4x4 register tiles) on it: exact weights, both modes.
//     By default int8 mode on AVX-512 VNNI never takes them (see Config).
#include "kquant_matmul.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu_features.h"
#include "cpu_stream.h"
#include "kquant_kernels.h"
#include "layer_rows.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "quantized_matmul_kernels.h"
#include "quantized_matmul_threads.h"
#include "row_major.h"

namespace tiny_llm {

namespace {

// Each k-quant instruction set with the quantized_matmul one whose panel kernel it borrows.
struct Pair {
  const kq::Isa* kq;
  const qmm::Isa* qmm;
};

Pair isa_named(const std::string& name) {
  if (name == "auto") {
    if (cpu_has_avx512_vnni()) return {kq::isa_avx512(), qmm::isa_avx512()};
    if (cpu_has_avx2_fma_f16c()) return {kq::isa_avx2(), qmm::isa_avx2()};
    return {&kq::isa_portable(), &qmm::isa_portable()};
  }
  if (name == "portable") return {&kq::isa_portable(), &qmm::isa_portable()};
  if (name == "avx512") {
    if (!cpu_has_avx512_vnni()) throw std::invalid_argument("this CPU (or build) lacks AVX-512 with VNNI");
    return {kq::isa_avx512(), qmm::isa_avx512()};
  }
  if (name == "avx2") {
    if (!cpu_has_avx2_fma_f16c()) throw std::invalid_argument("this CPU (or build) lacks AVX2/FMA/F16C");
    return {kq::isa_avx2(), qmm::isa_avx2()};
  }
  throw std::invalid_argument("unknown isa '" + name + "' (portable, avx2, avx512 or auto)");
}

constexpr int kPanelMinM = 16;

struct Config {
  Pair isa;
  int panel_min_m;  // -1: the default below
  // Default: fp32 panels from kPanelMinM rows, except in int8 mode on AVX-512 VNNI, whose dots
  // (8 rows of x a decoded block, 16 rows of W at a time) beat the fp32 panels at every M (single
  // thread, M = 128: Q4_K 8960x1536 37 -> 28-34 ms, Q6_K 1536x8960 48-50 -> 35 ms): never.
  int min_m(bool x_int8) const {
    if (panel_min_m >= 0) return panel_min_m;
    return x_int8 && isa.kq == kq::isa_avx512() ? 0 : kPanelMinM;
  }
};

Config& config() {
  static Config c = [] {
    Config c{isa_named("auto"), -1};
    if (const char* isa = std::getenv("TINY_LLM_QMM_ISA"); isa && *isa) {
      try {
        c.isa = isa_named(isa);
      } catch (const std::exception& e) {  // first use may be on MLX's stream thread: never throw
        std::fprintf(stderr, "tiny-llm: TINY_LLM_QMM_ISA=%s ignored for kquant_matmul (%s)\n", isa, e.what());
      }
    }
    return c;
  }();
  return c;
}

// fn(part, local n0, local n1, column of the part's first row) for the rows [n0, n1) of W.
template <typename F>
void for_rows(const std::vector<kq::Rows>& parts, int n0, int n1, F&& fn) {
  int base = 0;
  for (const kq::Rows& p : parts) {
    const int a = std::max(n0, base), b = std::min(n1, base + p.n);
    if (a < b) fn(p, a - base, b - base, base);
    base += p.n;
  }
}

// x rows (M, K) in T -> fp32.
template <typename T>
void to_f32(const void* src, float* dst, size_t n) {
  const T* s = static_cast<const T*>(src);
  for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
}

void run(const mx::array& x, const std::vector<mx::array>& w, const std::vector<int>& types, mx::array& out,
         bool x_int8, const Fusion& fusion, const mx::array* norm_w, const mx::array* residual) {
  const int N = out.shape(-1);
  const long M = long(out.size() / N);
  if (M == 0 || N == 0) return;
  const int K = fusion.prologue == Fusion::kSwiGLU ? x.shape(-1) / 2 : x.shape(-1);
  std::vector<std::vector<char>> tw(w.size());
  std::vector<kq::Rows> parts;
  for (size_t i = 0; i < w.size(); ++i)
    parts.push_back({static_cast<const uint8_t*>(row_major(w[i], tw[i])), kq::Type(types[i]), size_t(w[i].shape(1)),
                     w[i].shape(0), K});
  const Config& cfg = config();
  auto& pool = ThreadPool::get();

  // x -> fp32 (M, K), through the prologue in x's dtype first, as quantized_matmul does.
  std::vector<char> tx, tp;
  const void* xd = row_major(x, tx);
  std::vector<float> xf(size_t(M) * K);
  with_float_type(x.dtype(), [&](auto type) {
    using T = decltype(type);
    const void* src = xd;
    if (fusion.prologue != Fusion::kNone) {
      tp.resize(size_t(M) * K * sizeof(T));
      T* p = reinterpret_cast<T*>(tp.data());
      const T* xt = static_cast<const T*>(xd);
      if (fusion.prologue == Fusion::kSwiGLU) {  // x (M, 2K) = [gate | up] -> p (M, K)
        parallel_rows(M, 2 * K, [&](long r0, long r1) { swiglu_rows(xt + size_t(r0) * 2 * K, p + size_t(r0) * K, r1 - r0, K); });
      } else {
        std::vector<char> tn;
        const T* nw = static_cast<const T*>(row_major(*norm_w, tn));
        parallel_rows(M, K, [&](long r0, long r1) {
          rms_norm_rows(xt + size_t(r0) * K, nw, p + size_t(r0) * K, r1 - r0, K, fusion.eps);
        });
      }
      src = p;
    }
    parallel_rows(M, K, [&](long r0, long r1) {
      to_f32<T>(static_cast<const T*>(src) + size_t(r0) * K, xf.data() + size_t(r0) * K, size_t(r1 - r0) * K);
    });
  });

  float* y = out.data<float>();
  std::vector<float> ybuf;
  if (out.dtype() != mx::float32) {
    ybuf.resize(size_t(M) * N);
    y = ybuf.data();
  }
  // int8 mode: x's Q8 (the decode kernels' operand); the panels take its values d * q in fp32.
  const int nb = K / kq::QK;
  std::vector<int8_t> xq, xqp;
  std::vector<float> xs;
  std::vector<int16_t> xbs;
  if (x_int8) {
    xq.resize(size_t(M) * K), xqp.resize(size_t(M) * K), xs.resize(size_t(M) * nb), xbs.resize(size_t(M) * nb * 32);
    parallel_rows(M, K, [&](long r0, long r1) {
      for (long m = r0; m < r1; ++m)
        cfg.isa.kq->quantize_x(xf.data() + size_t(m) * K, K, xq.data() + size_t(m) * K, xqp.data() + size_t(m) * K,
                               xs.data() + size_t(m) * nb, xbs.data() + size_t(m) * nb * 32);
    });
  }
  const kq::Q8 q8{xq.data(), xqp.data(), xs.data(), xbs.data(), K};
  if (const int min_m = cfg.min_m(x_int8); min_m > 0 && M >= min_m) {
    if (x_int8)
      parallel_rows(M, K, [&](long r0, long r1) {
        for (size_t i = size_t(r0) * K; i < size_t(r1) * K; ++i) xf[i] = xs[i / kq::QK] * float(xq[i]);
      });
    const int threads = pool.size(), npanels = (N + 63) / 64;
    const Split split(N, (npanels + threads - 1) / threads * threads, 4);
    pool.run(split.count, [&](int t) {
      thread_local std::vector<float> panel;
      for_rows(parts, t * split.per, std::min(N, (t + 1) * split.per), [&](const kq::Rows& p, int a, int b, int base) {
        panel.resize(size_t(b - a) * K);
        cfg.isa.kq->dequantize(p, a, b, panel.data());
        cfg.isa.qmm->panel(xf.data(), int(M), K, panel.data(), b - a, y + base + a, N);
      });
    });
  } else {
    // Tasks of at least ~16 KB of weights x rows, 2 per thread (as quantized_matmul's fused path).
    const double work = double(N) * K * 0.6 * double(M);
    const Split split(N, int(std::clamp(work / (16 << 10), 1.0, 2.0 * pool.size())), 4);
    pool.run(split.count, [&](int t) {
      for_rows(parts, t * split.per, std::min(N, (t + 1) * split.per), [&](const kq::Rows& p, int a, int b, int base) {
        if (x_int8) {
          cfg.isa.kq->dot_q8(p, a, b, q8, int(M), y + base, N);
        } else {
          cfg.isa.kq->dot_f32(p, a, b, xf.data(), int(M), y + base, N);
        }
      });
    });
  }
  if (out.dtype() != mx::float32) {
    with_float_type(out.dtype(), [&](auto type) {
      using T = decltype(type);
      T* o = out.data<T>();
      parallel_rows(M, N, [&](long r0, long r1) {
        for (size_t i = size_t(r0) * N; i < size_t(r1) * N; ++i) o[i] = T(ybuf[i]);
      });
    });
  }
  if (residual) {
    std::vector<char> tr;
    const void* r = row_major(*residual, tr);
    with_float_type(out.dtype(), [&](auto type) {  // y was rounded to T; the sum is rounded once more
      using T = decltype(type);
      T* o = out.data<T>();
      const T* rr = static_cast<const T*>(r);
      parallel_rows(M, N, [&](long r0, long r1) {
        for (size_t i = size_t(r0) * N; i < size_t(r1) * N; ++i) o[i] = T(float(o[i]) + float(rr[i]));
      });
    });
  }
}

}  // namespace

mx::array kquant_matmul(const mx::array& x, const std::vector<mx::array>& parts, const std::vector<std::string>& types,
                        bool x_int8, const std::optional<mx::array>& norm_weight, float eps, bool swiglu,
                        const std::optional<mx::array>& residual, mx::StreamOrDevice s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("kquant_matmul: " + what); };
  if (parts.empty() || parts.size() != types.size())
    fail("parts and types must be non-empty lists of one length, got " + std::to_string(parts.size()) + " and " +
         std::to_string(types.size()));
  if (x.ndim() < 1 || !is_float(x.dtype()))
    fail("x must be float32, float16 or bfloat16 with shape (..., K), got " + shape_str(x));
  const int K = fused_k("kquant_matmul", x, norm_weight, swiglu);
  if (K == 0 || K % kq::QK != 0)
    fail("x has K = " + std::to_string(K) + ", which must be a positive multiple of 256 (a k-quant block)");
  std::vector<int> kinds;
  int N = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (types[i] != "Q4_K" && types[i] != "Q6_K") fail("types must be 'Q4_K' or 'Q6_K', got '" + types[i] + "'");
    const kq::Type t = types[i] == "Q4_K" ? kq::Type::q4_k : kq::Type::q6_k;
    const int row_bytes = int(K / kq::QK * kq::block_bytes(t));
    const mx::array& p = parts[i];
    if (p.ndim() != 2 || p.dtype() != mx::uint8 || p.shape(1) != row_bytes)
      fail("part " + std::to_string(i) + " (" + types[i] + ") must be a (N, " + std::to_string(row_bytes) +
           ") uint8 array for K = " + std::to_string(K) + ", got " + shape_str(p));
    kinds.push_back(int(t));
    N += p.shape(0);
  }
  const mx::Stream stream = cpu_stream(s, "kquant_matmul");
  mx::Shape shape = x.shape();
  shape.back() = N;
  std::vector<mx::array> inputs = {x};
  inputs.insert(inputs.end(), parts.begin(), parts.end());
  const Fusion fusion = fusion_inputs("kquant_matmul", x, K, shape, norm_weight, eps, swiglu, residual, stream, inputs);
  return mx::array(shape, x.dtype(), std::make_shared<KQuantMatmul>(stream, kinds, x_int8, fusion), std::move(inputs));
}

void KQuantMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  std::vector<mx::array> in;
  for (const auto& a : inputs) in.push_back(mx::array::unsafe_weak_copy(a));
  encoder.dispatch([in = std::move(in), out = mx::array::unsafe_weak_copy(out), types = types_, x_int8 = x_int8_,
                    fusion = fusion_]() mutable {
    const size_t np = types.size();
    std::vector<mx::array> w(in.begin() + 1, in.begin() + 1 + np);
    size_t next = 1 + np;  // the fused pieces' inputs follow x and the parts
    const mx::array* norm_w = fusion.prologue == Fusion::kRMSNorm ? &in[next++] : nullptr;
    const mx::array* residual = fusion.residual ? &in[next++] : nullptr;
    run(in[0], w, types, out, x_int8, fusion, norm_w, residual);
  });
}

void KQuantMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("tiny_llm_kernels.kquant_matmul is a CPU kernel; run it with stream=mx.cpu");
}

std::map<std::string, std::string> kquant_matmul_info() {
  const Config& c = config();
  return {{"isa", c.isa.kq->name},
          {"threads", std::to_string(ThreadPool::get().size())},
          {"panel_min_m", std::to_string(c.min_m(false))},
          {"panel_min_m_int8", std::to_string(c.min_m(true))}};
}

std::map<std::string, std::string> kquant_matmul_configure(const std::string& isa, int panel_min_m) {
  Config& c = config();
  if (!isa.empty()) c.isa = isa_named(isa);
  if (panel_min_m >= -1) c.panel_min_m = panel_min_m;
  return kquant_matmul_info();
}

}  // namespace tiny_llm
