// The MLX side of tiny_llm_kernels.quantized_matmul: the op (checks, graph
// node), the primitive's CPU evaluation (dispatched on MLX's CPU stream), and
// the choice of path, both split over the thread pool by rows of W:
//   M < panel_min_m (decode, short prompts): the fused kernel streams the packed
//     weights once, unpacks and dequantizes them in registers, FMA into fp32.
//   M >= panel_min_m (prefill): each task dequantizes a panel of W rows to fp32
//     (it stays in L2) and multiplies every row of x with it, 4x4 register tiles.
// panel_min_m is each instruction set's own (Isa::panel_min_m): 16 for AVX2 and the
// portable kernels; AVX-512's fused kernel is as fast at every M, so it never panels.
// precision="bf16" (operands rounded to bf16, fp32 accumulation): from M = bf16_min_m on
// CPUs with AVX512-BF16, each task dequantizes its W rows into a bf16 panel in VDPBF16PS's
// pair layout and multiplies x, converted to bf16 once, with it (quantized_matmul_avx512bf16.cpp);
// below that M, or without the instruction (or with another isa forced), the fp32 kernels above
// run on the same bf16-rounded operands (Isa::fused_bf16 and friends): the same products, only
// the order of the fp32 additions differs.
// precision="int8" (x rounded to int8 per row per group, integer dots, fp32 group scaling): at
// every M, tasks of W rows, each reading its rows of the weight packed once (int8_packed, see
// Int8PackHeader) or packing them into a panel of u8 quads, times every row of x quantized
// once (run_int8); AVX512-VNNI where the CPU has it and the AVX-512 kernels are the ones chosen,
// else the plain C++ kernels (quantized_matmul_int8.cpp), which give the same bits.
// An earlier version sent the panels to OpenBLAS's sgemm; measured here (AVX-512,
// kernels/bench_qmm.py) the panel kernel ran at ~170 GFLOPS a thread and sgemm at
// ~110 (its Haswell kernels), and two sgemm calls on two threads did not scale.
#include "quantized_matmul.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#include "cpu_features.h"
#include "cpu_stream.h"
#include "layer_rows.h"
#include "mlx/backend/cpu/encoder.h"
#include "op_checks.h"
#include "quantized_matmul_kernels.h"
#include "quantized_matmul_threads.h"
#include "row_major.h"

namespace tiny_llm {

namespace {

using qmm::DType;
using qmm::Isa;
using qmm::Weights;

const Isa* best_isa() {
  if (cpu_has_avx512()) return qmm::isa_avx512();
  if (cpu_has_avx2_fma_f16c()) return qmm::isa_avx2();
  return &qmm::isa_portable();
}

const Isa* isa_named(const std::string& name) {
  if (name == "auto") return best_isa();
  if (name == "portable") return &qmm::isa_portable();
  if (name == "avx512") {
    if (!cpu_has_avx512()) throw std::invalid_argument("this CPU (or build) lacks AVX-512");
    return qmm::isa_avx512();
  }
  if (name == "avx2") {
    if (!cpu_has_avx2_fma_f16c()) throw std::invalid_argument("this CPU (or build) lacks AVX2/FMA/F16C");
    return qmm::isa_avx2();
  }
  throw std::invalid_argument("unknown isa '" + name + "' (portable, avx2, avx512 or auto)");
}

// The smallest M that precision="bf16" sends to the VDPBF16PS kernels (see info()); below it the
// AVX-512 fused kernel on bf16-rounded operands is faster, as it dequantizes in registers
// (kernels/check_qmm_bf16.py, GFLOPS emulated/VDPBF16PS, model shapes, group 32): M = 4: 37/30
// (576x576), 48/37 (576x3072), 72/51 (1536x576), 28/36 (head); M = 8: 41/51, 50/62, 68/85, 34/48.
// precision="fp32" beats both below M ~ 12-16: the caller picks the precision (see the header).
constexpr int kBf16MinM = 8;

struct Config {
  const Isa* isa;
  int panel_min_m;  // -1: the instruction set's own (Isa::panel_min_m)
  int bf16_min_m;   // -1: kBf16MinM
  int min_m() const { return panel_min_m >= 0 ? panel_min_m : isa->panel_min_m; }
  // The VDPBF16PS kernels when this CPU has them and the AVX-512 kernels are the ones chosen.
  const qmm::Bf16Kernels* bf16() const {
    static const qmm::Bf16Kernels* k = cpu_has_avx512_bf16() ? qmm::bf16_avx512() : nullptr;
    return isa == qmm::isa_avx512() ? k : nullptr;
  }
  int bf16_m() const { return bf16_min_m >= 0 ? bf16_min_m : kBf16MinM; }
  // precision="int8": VNNI with the AVX-512 kernels on a CPU that has it, else plain C++ (same bits).
  const qmm::Int8Kernels& int8() const {
    static const qmm::Int8Kernels* k = cpu_has_avx512_vnni() ? qmm::int8_avx512vnni() : nullptr;
    return k && isa == qmm::isa_avx512() ? *k : qmm::int8_portable();
  }
};

Config& config() {
  static Config c = [] {
    Config c{best_isa(), -1, -1};
    if (const char* isa = std::getenv("TINY_LLM_QMM_ISA"); isa && *isa) {
      try {
        c.isa = isa_named(isa);
      } catch (const std::exception& e) {  // first use may be on MLX's stream thread: never throw
        std::fprintf(stderr, "tiny-llm: TINY_LLM_QMM_ISA=%s ignored (%s)\n", isa, e.what());
      }
    }
    if (const char* m = std::getenv("TINY_LLM_QMM_PANEL_MIN_M"); m && *m) c.panel_min_m = std::atoi(m);
    if (const char* m = std::getenv("TINY_LLM_QMM_BF16_MIN_M"); m && *m) c.bf16_min_m = std::atoi(m);
    return c;
  }();
  return c;
}

DType dtype_of(const mx::array& a) {
  if (a.dtype() == mx::float16) return DType::f16;
  if (a.dtype() == mx::bfloat16) return DType::bf16;
  return DType::f32;
}

// x (M, K) in `xt` -> fp32, permuted for 4 bits (see Isa::chunk), rounded to bf16 if `bf16`;
// rows split over the pool.
const float* kernel_input(const Isa& isa, const void* x, DType xt, long M, int K, int bits, bool bf16,
                          std::vector<float>& buf) {
  if (xt == DType::f32 && bits == 8 && !bf16) return static_cast<const float*>(x);  // already what the kernels read
  buf.resize(size_t(M) * K);
  const size_t item = xt == DType::f32 ? 4 : 2;
  const int C = isa.chunk, H = C / 2;
  auto& pool = ThreadPool::get();
  const Split rows(M, M * K < (1 << 15) ? 1 : pool.size(), 1);
  pool.run(rows.count, [&](int t) {
    thread_local std::vector<float> row;
    row.resize(K);
    for (long m = long(t) * rows.per; m < std::min<long>(M, long(t + 1) * rows.per); ++m) {
      float* dst = buf.data() + size_t(m) * K;
      const void* src = static_cast<const char*>(x) + size_t(m) * K * item;
      if (bits == 8) {
        isa.to_f32(src, xt, dst, K);
      } else {
        isa.to_f32(src, xt, row.data(), K);
        for (int c = 0; c < K; c += C)
          for (int j = 0; j < H; ++j) {
            dst[c + j] = row[c + 2 * j];
            dst[c + H + j] = row[c + 2 * j + 1];
          }
      }
      if (bf16) isa.round_bf16(dst, K);
    }
  });
  return buf.data();
}

void run_fused(const Isa& isa, const Weights& W, const float* x, long M, float* y, bool bf16) {
  auto& pool = ThreadPool::get();
  // Tasks of at least ~16 KB of weights x rows (below that, handing work to another
  // thread costs more than it saves), 2 per thread: measured at M = 1, 576x576 from
  // DRAM, 1/2/4/8 tasks per thread ran 17/22/18/12 GB/s (longer streams prefetch better).
  const double work = double(W.N) * W.K * W.bits / 8 * double(M);
  const Split split(W.N, int(std::clamp(work / (16 << 10), 1.0, 2.0 * pool.size())), 4);
  pool.run(split.count, [&](int t) {
    const int n0 = t * split.per, n1 = std::min(W.N, n0 + split.per);
    (bf16 ? isa.fused_bf16 : isa.fused)(W, x, int(M), y, W.N, n0, n1);
  });
}

void run_panels(const Isa& isa, const Weights& W, const float* x, long M, float* y, bool bf16) {
  auto& pool = ThreadPool::get();
  // Panels of about 64 rows (64 x K fp32 stays in L2), as many as a multiple of the
  // thread count so that no thread idles at the end.
  const int threads = pool.size(), panels = (W.N + 63) / 64;
  const Split split(W.N, (panels + threads - 1) / threads * threads, 4);
  pool.run(split.count, [&](int t) {
    const int n0 = t * split.per, n1 = std::min(W.N, n0 + split.per);
    thread_local std::vector<float> panel;
    panel.resize(size_t(split.per) * W.K);
    (bf16 ? isa.dequantize_panel_bf16 : isa.dequantize_panel)(W, n0, n1, panel.data());
    isa.panel(x, int(M), W.K, panel.data(), n1 - n0, y + n0, W.N);
  });
}

// precision="bf16" on VDPBF16PS: x (M, K) in `xt` -> bf16 once (rows over the pool), then tasks of
// W rows, each dequantizing its rows into a bf16 panel (at most 192 rows: 192 x K bf16 stays in
// L2) and multiplying every row of x with it; as many tasks as a multiple of the thread count.
void run_bf16(const qmm::Bf16Kernels& k, const Weights& W, const void* x, DType xt, long M, float* y) {
  auto& pool = ThreadPool::get();
  const int K = W.K;
  const std::unique_ptr<uint16_t[]> xb(new uint16_t[size_t(M) * K]);  // not zeroed: every value is written
  const size_t item = xt == DType::f32 ? 4 : 2;
  const Split rows(M, M * K < (1 << 15) ? 1 : pool.size(), 1);
  pool.run(rows.count, [&](int t) {
    const long m0 = long(t) * rows.per, m1 = std::min<long>(M, m0 + rows.per);
    k.to_bf16(static_cast<const char*>(x) + size_t(m0) * K * item, xt, xb.get() + size_t(m0) * K, (m1 - m0) * K);
  });
  const int threads = pool.size(), panels = (W.N + 191) / 192;
  const Split split(W.N, (panels + threads - 1) / threads * threads, 16);
  pool.run(split.count, [&](int t) {
    const int n0 = t * split.per, n1 = std::min(W.N, n0 + split.per);
    thread_local std::vector<uint16_t> panel;
    panel.resize(size_t(split.per + 15) / 16 * 16 * K);
    k.dequantize_panel(W, n0, n1, panel.data());
    k.gemm(xb.get(), int(M), K, panel.data(), n1 - n0, y + n0, W.N);
  });
}

// precision="int8" packs a task's W rows into the gemm's layout at every call, unless the caller
// passes the weight packed once (quantized_matmul_int8_pack, kept beside the weight by
// impl.quantized_weight.QuantizedWeight): packing at every call cost 7% of a 64-request serving
// run, and at M = 1 it doubled the time of the tied head (kernels/bench_qmm_int8.py). A packed
// weight is one uint8 array: a header (Int8PackHeader, 64 bytes), then the kernel set's panel of
// all N rows (blocks of 16 rows from row 0, block b at b * block_bytes: a task's rows start at a
// block, so it reads what it would have packed, and the bits are the same), then the fp32 scales
// and the fp32 biases as pack() writes them (per block of 16 rows, per group, 16 values).
struct Int8PackHeader {
  char magic[8];  // "tllmI8P"
  int32_t kernels;  // which Int8Kernels packed it: 0 portable, 1 avx512_vnni (their layouts differ)
  int32_t N, K, group_size, bits;
  char pad[36];
};
static_assert(sizeof(Int8PackHeader) == 64);
constexpr char kInt8Magic[8] = "tllmI8P";

int int8_kernels_id(const qmm::Int8Kernels& k) { return &k == &qmm::int8_portable() ? 0 : 1; }

size_t int8_pack_bytes(const qmm::Int8Kernels& k, int N, int K, int gs, int bits) {
  const size_t blocks = (N + 15) / 16;
  return sizeof(Int8PackHeader) + blocks * k.block_bytes(K, bits) + 2 * blocks * 16 * (K / gs) * sizeof(float);
}

// W's rows packed by k into `out` (int8_pack_bytes of them): the header, then the panel, scales and biases.
void int8_pack_into(const qmm::Int8Kernels& k, const Weights& W, uint8_t* out) {
  Int8PackHeader h{};
  std::memcpy(h.magic, kInt8Magic, 8);
  h.kernels = int8_kernels_id(k), h.N = W.N, h.K = W.K, h.group_size = W.group_size, h.bits = W.bits;
  std::memcpy(out, &h, sizeof h);
  const int G = W.K / W.group_size, blocks = (W.N + 15) / 16;
  const size_t bb = k.block_bytes(W.K, W.bits);
  uint8_t* panel = out + sizeof h;
  float* dw = reinterpret_cast<float*>(panel + blocks * bb);
  float* bw = dw + size_t(blocks) * 16 * G;
  auto& pool = ThreadPool::get();
  const Split split(W.N, pool.size() * 4, 16);
  pool.run(split.count, [&](int t) {
    const int n0 = t * split.per, n1 = std::min(W.N, n0 + split.per);
    const size_t b0 = n0 / 16;
    k.pack(W, n0, n1, panel + b0 * bb, dw + b0 * 16 * G, bw + b0 * 16 * G);
  });
}

// Whether `packed` is W packed by k (else the caller packs, as without it).
bool int8_pack_fits(const uint8_t* packed, size_t bytes, const qmm::Int8Kernels& k, const Weights& W) {
  Int8PackHeader h;
  if (bytes < sizeof h) return false;
  std::memcpy(&h, packed, sizeof h);
  return std::memcmp(h.magic, kInt8Magic, 8) == 0 && h.kernels == int8_kernels_id(k) && h.N == W.N && h.K == W.K &&
         h.group_size == W.group_size && h.bits == W.bits && bytes == int8_pack_bytes(k, W.N, W.K, W.group_size, W.bits);
}

// precision="int8": x (M, K) in `xt` -> fp32 (exact) -> per row and group xq, dx, xc (rows over
// the pool; each row's values depend on that row only). Then tasks of W rows as in run_bf16 (at
// most 192 rows: 192 x K bytes stay in L2), each multiplying every quantized row of x with its
// rows of `packed` (W packed by k, as int8_pack_into writes it), or of its own rows packed now.
void run_int8(const Isa& isa, const qmm::Int8Kernels& k, const Weights& W, const uint8_t* packed, const void* x,
              DType xt, long M, float* y) {
  auto& pool = ThreadPool::get();
  const int K = W.K, gs = W.group_size, G = K / gs;
  const std::unique_ptr<int8_t[]> xq(new int8_t[size_t(M) * K]);  // not zeroed: every value is written
  const std::unique_ptr<float[]> dx(new float[size_t(M) * G]), xc(new float[size_t(M) * G]);
  const size_t item = xt == DType::f32 ? 4 : 2;
  parallel_rows(M, K, [&](long m0, long m1) {
    thread_local std::vector<float> row;
    row.resize(K);
    for (long m = m0; m < m1; ++m) {
      isa.to_f32(static_cast<const char*>(x) + size_t(m) * K * item, xt, row.data(), K);
      k.quantize_x(row.data(), K, gs, W.bits, xq.get() + size_t(m) * K, dx.get() + size_t(m) * G, xc.get() + size_t(m) * G);
    }
  });
  const size_t bb = k.block_bytes(K, W.bits), blocks = (W.N + 15) / 16;
  const uint8_t* all = packed ? packed + sizeof(Int8PackHeader) : nullptr;  // the packed rows, when given
  const float* dw_all = packed ? reinterpret_cast<const float*>(all + blocks * bb) : nullptr;
  const float* bw_all = packed ? dw_all + blocks * 16 * G : nullptr;
  const int threads = pool.size(), panels = (W.N + 191) / 192;
  const Split split(W.N, (panels + threads - 1) / threads * threads, 16);
  pool.run(split.count, [&](int t) {
    const int n0 = t * split.per, n1 = std::min(W.N, n0 + split.per);
    const size_t b0 = n0 / 16;
    const uint8_t* panel = all ? all + b0 * bb : nullptr;
    const float* dw = all ? dw_all + b0 * 16 * G : nullptr;
    const float* bw = all ? bw_all + b0 * 16 * G : nullptr;
    if (!all) {  // this task's rows packed now, into a panel that stays in L2
      const size_t task_blocks = size_t(split.per + 15) / 16;
      thread_local std::vector<uint8_t> own;
      thread_local std::vector<float> scales;
      own.resize(task_blocks * bb);
      scales.resize(task_blocks * 16 * G * 2);
      k.pack(W, n0, n1, own.data(), scales.data(), scales.data() + task_blocks * 16 * G);
      panel = own.data(), dw = scales.data(), bw = dw + task_blocks * 16 * G;
    }
    k.gemm(xq.get(), dx.get(), xc.get(), int(M), K, gs, W.bits, panel, dw, bw, n1 - n0, y + n0, W.N);
  });
}

// The prologue on M rows of x (row-major, x's dtype T) into `buf`: K values a row.
template <typename T>
const void* prologue_t(const Fusion& f, const void* x, const mx::array* norm_w, long M, int K, std::vector<char>& buf) {
  buf.resize(size_t(M) * K * sizeof(T));
  T* y = reinterpret_cast<T*>(buf.data());
  if (f.prologue == Fusion::kSwiGLU) {  // x (M, 2K) = [gate | up] -> y (M, K)
    const T* xt = static_cast<const T*>(x);
    parallel_rows(M, 2 * K, [&](long r0, long r1) { swiglu_rows(xt + size_t(r0) * 2 * K, y + size_t(r0) * K, r1 - r0, K); });
  } else {
    std::vector<char> tw;
    const T* xt = static_cast<const T*>(x);
    const T* w = static_cast<const T*>(row_major(*norm_w, tw));
    parallel_rows(M, K, [&](long r0, long r1) {
      rms_norm_rows(xt + size_t(r0) * K, w, y + size_t(r0) * K, r1 - r0, K, f.eps);
    });
  }
  return buf.data();
}

const void* prologue(const Fusion& f, const mx::array& x, const void* xd, const mx::array* norm_w, long M, int K,
                     std::vector<char>& buf) {
  if (f.prologue == Fusion::kNone) return xd;
  const void* y = nullptr;
  with_float_type(x.dtype(), [&](auto type) { y = prologue_t<decltype(type)>(f, xd, norm_w, M, K, buf); });
  return y;
}

// out += residual, both in T: y was rounded to T already, the sum is rounded once more.
template <typename T>
void add_residual_t(T* out, const T* r, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = T(float(out[i]) + float(r[i]));
}

void add_residual(mx::array& out, const mx::array& residual) {
  std::vector<char> tr;
  const void* r = row_major(residual, tr);
  const long N = out.ndim() ? out.shape(-1) : 1, M = N ? long(out.size() / N) : 0;
  with_float_type(out.dtype(), [&](auto type) {
    using T = decltype(type);
    parallel_rows(M, N, [&](long r0, long r1) {
      add_residual_t(out.data<T>() + size_t(r0) * N, static_cast<const T*>(r) + size_t(r0) * N, size_t(r1 - r0) * N);
    });
  });
}

// norm_w, residual: the fused pieces' inputs when `fusion` has them, else nullptr.
void run(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
         mx::array& out, int group_size, int bits, const Fusion& fusion, Precision precision, const mx::array* norm_w,
         const mx::array* residual, const mx::array* int8_packed) {
  const int N = w.shape(0), K = int(int64_t(w.shape(1)) * 32 / bits);
  const long M = long(x.size() / x.shape(-1));
  if (M == 0 || N == 0) return;
  std::vector<char> tx, tw, ts, tb, tp;
  const Weights W{static_cast<const uint32_t*>(row_major(w, tw)), row_major(scales, ts), row_major(biases, tb),
                  dtype_of(scales), N, K, group_size, bits};
  const DType yt = dtype_of(out);
  const Config& cfg = config();
  std::vector<float> xbuf, ybuf;
  const void* xd = prologue(fusion, x, row_major(x, tx), norm_w, M, K, tp);
  float* y = out.data<float>();
  if (yt != DType::f32) {
    ybuf.resize(size_t(M) * N);
    y = ybuf.data();
  }
  const bool bf16 = precision == Precision::kBf16;
  const qmm::Bf16Kernels* fast = bf16 ? cfg.bf16() : nullptr;
  if (precision == Precision::kInt8) {
    const qmm::Int8Kernels& k = cfg.int8();
    const uint8_t* packed = int8_packed ? int8_packed->data<uint8_t>() : nullptr;
    if (packed && !int8_pack_fits(packed, int8_packed->nbytes(), k, W)) packed = nullptr;  // made for another set
    run_int8(*cfg.isa, k, W, packed, xd, dtype_of(x), M, y);
  } else if (fast && cfg.bf16_m() > 0 && M >= cfg.bf16_m()) {
    run_bf16(*fast, W, xd, dtype_of(x), M, y);
  } else {
    const float* xf = kernel_input(*cfg.isa, xd, dtype_of(x), M, K, bits, bf16, xbuf);
    if (cfg.min_m() > 0 && M >= cfg.min_m()) {
      run_panels(*cfg.isa, W, xf, M, y, bf16);
    } else {
      run_fused(*cfg.isa, W, xf, M, y, bf16);
    }
  }
  if (yt != DType::f32) {
    auto& pool = ThreadPool::get();
    const Split rows(M, M * N < (1 << 16) ? 1 : pool.size(), 1);
    pool.run(rows.count, [&](int t) {
      const long m0 = long(t) * rows.per, m1 = std::min<long>(M, m0 + rows.per);
      cfg.isa->from_f32(y + size_t(m0) * N, out.data<uint16_t>() + size_t(m0) * N, yt, (m1 - m0) * N);
    });
  }
  if (residual) add_residual(out, *residual);
}

// y (M, N) in f32: rows of x (M, K, already the kernels' input: see kernel_input) through the
// fused or panel kernel of the isa, as `run` sends M rows.
void run_rows(const Config& cfg, const Weights& W, const float* x, long M, float* y) {
  if (cfg.min_m() > 0 && M >= cfg.min_m()) {
    run_panels(*cfg.isa, W, x, M, y, false);
  } else {
    run_fused(*cfg.isa, W, x, M, y, false);
  }
}

// gather_quantized_matmul: each run of equal expert ids is one matmul of its rows with that
// expert's (N, K) slice of the stacked weights; an id >= X gives rows of 0.
void run_gather(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                const mx::array& indices, mx::array& out, int group_size, int bits) {
  const int X = w.shape(0), N = w.shape(1), K = int(int64_t(w.shape(2)) * 32 / bits);
  const long M = x.shape(0);
  if (M == 0 || N == 0) return;
  std::vector<char> tx, tw, ts, tb, ti;
  const auto* wq = static_cast<const uint32_t*>(row_major(w, tw));
  const auto* sc = static_cast<const char*>(row_major(scales, ts));
  const auto* bi = static_cast<const char*>(row_major(biases, tb));
  const auto* ids = static_cast<const uint32_t*>(row_major(indices, ti));
  const size_t words = size_t(N) * w.shape(2), groups = size_t(N) * (K / group_size) * scales.itemsize();
  const Config& cfg = config();
  std::vector<float> xbuf, ybuf;
  const float* xf = kernel_input(*cfg.isa, row_major(x, tx), dtype_of(x), M, K, bits, false, xbuf);
  const DType yt = dtype_of(out);
  float* y = out.data<float>();
  if (yt != DType::f32) {
    ybuf.resize(size_t(M) * N);
    y = ybuf.data();
  }
  for (long m0 = 0, m1; m0 < M; m0 = m1) {
    const uint32_t e = ids[m0];
    for (m1 = m0 + 1; m1 < M && ids[m1] == e;) ++m1;
    float* yr = y + size_t(m0) * N;
    if (e >= uint32_t(X)) {
      std::fill(yr, yr + size_t(m1 - m0) * N, 0.0f);
      continue;
    }
    const Weights W{wq + e * words, sc + e * groups, bi + e * groups, dtype_of(scales), N, K, group_size, bits};
    run_rows(cfg, W, xf + size_t(m0) * K, m1 - m0, yr);
  }
  if (yt != DType::f32) cfg.isa->from_f32(y, out.data<uint16_t>(), yt, long(M) * N);
}

std::string dtype_name(const mx::Dtype& t) {
  const std::pair<mx::Dtype, const char*> names[] = {
      {mx::float32, "float32"}, {mx::float16, "float16"}, {mx::bfloat16, "bfloat16"}, {mx::float64, "float64"},
      {mx::uint8, "uint8"},     {mx::uint16, "uint16"},   {mx::uint32, "uint32"},     {mx::uint64, "uint64"},
      {mx::int8, "int8"},       {mx::int16, "int16"},     {mx::int32, "int32"},       {mx::int64, "int64"},
      {mx::bool_, "bool"}};
  for (const auto& [dtype, name] : names)
    if (t == dtype) return name;
  return "an unsupported dtype";
}

// w_q must be (N, K * bits / 32) uint32: quantized_matmul's and quantized_matmul_int8_pack's check.
void check_w_q(const std::string& op, const mx::array& w_q) {
  if (w_q.ndim() != 2 || w_q.dtype() != mx::uint32)
    throw std::invalid_argument(op + ": w_q must be a 2-D uint32 array (N, K * bits / 32), got " +
                                shape_str(w_q.shape()) + " " + dtype_name(w_q.dtype()));
}

// The kernels read scales and biases of one dtype: mixed ones go to fp32 (exactly), else both as they are.
std::pair<mx::array, mx::array> one_scale_dtype(const mx::array& scales, const mx::array& biases,
                                                const mx::Stream& stream) {
  if (biases.dtype() == scales.dtype()) return {scales, biases};
  return {mx::astype(scales, mx::float32, stream), mx::astype(biases, mx::float32, stream)};
}

}  // namespace

int fused_k(const std::string& op, const mx::array& x, const std::optional<mx::array>& norm_weight, bool swiglu) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(op + ": " + what); };
  if (norm_weight && swiglu) fail("one prologue at a time: norm_weight or swiglu, not both");
  if (swiglu && x.shape(-1) % 2 != 0)
    fail("with swiglu, x's last axis holds gate then up: its size must be even, got " + std::to_string(x.shape(-1)));
  return swiglu ? x.shape(-1) / 2 : x.shape(-1);
}

Fusion fusion_inputs(const std::string& op, const mx::array& x, int K, const mx::Shape& out,
                     const std::optional<mx::array>& norm_weight, float eps, bool swiglu,
                     const std::optional<mx::array>& residual, const mx::Stream& stream,
                     std::vector<mx::array>& inputs) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(op + ": " + what); };
  Fusion fusion;
  if (norm_weight) {
    if (norm_weight->ndim() != 1 || norm_weight->shape(0) != K || !is_float(norm_weight->dtype()))
      fail("norm_weight must be a float (K,) = (" + std::to_string(K) + ",) array, got " +
           shape_str(norm_weight->shape()));
    fusion.prologue = Fusion::kRMSNorm, fusion.eps = eps;
    inputs.push_back(mx::astype(*norm_weight, x.dtype(), stream));  // as the RMSNorm kernel: in x's dtype
  }
  if (swiglu) fusion.prologue = Fusion::kSwiGLU;
  if (residual) {
    if (residual->shape() != out || residual->dtype() != x.dtype())
      fail("residual must be " + shape_str(out) + " " + dtype_name(x.dtype()) + " (the output's), got " +
           shape_str(residual->shape()) + " " + dtype_name(residual->dtype()));
    fusion.residual = true;
    inputs.push_back(*residual);
  }
  return fusion;
}

mx::array quantized_matmul(const mx::array& x, const mx::array& w_q, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits,
                           const std::optional<mx::array>& norm_weight, float eps, bool swiglu,
                           const std::optional<mx::array>& residual, const std::string& precision,
                           const std::optional<mx::array>& int8_packed, mx::StreamOrDevice s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("quantized_matmul: " + what); };
  if (precision != "fp32" && precision != "bf16" && precision != "int8")
    fail("precision must be 'fp32', 'bf16' or 'int8', got '" + precision + "'");
  const Precision prec = precision == "bf16" ? Precision::kBf16 : precision == "int8" ? Precision::kInt8 : Precision::kFp32;
  check_bits_and_group_size("quantized_matmul", group_size, bits);
  check_w_q("quantized_matmul", w_q);
  if (x.ndim() < 1 || !is_float(x.dtype()))
    fail("x must be float32, float16 or bfloat16 with shape (..., K), got " + shape_str(x) + " " + dtype_name(x.dtype()));
  const int N = w_q.shape(0), K = fused_k("quantized_matmul", x, norm_weight, swiglu);
  if (int64_t(w_q.shape(1)) * 32 / bits != K)
    fail("x has K = " + std::to_string(K) + (swiglu ? " (after swiglu)" : "") + " but w_q " +
         shape_str(w_q.shape()) + " holds " + std::to_string(int64_t(w_q.shape(1)) * 32 / bits) + " " +
         std::to_string(bits) + "-bit values per row");
  check_scales_and_biases("quantized_matmul", w_q, scales, biases, group_size, bits);
  const mx::Stream stream = cpu_stream(s, "quantized_matmul");
  const auto [s32, b32] = one_scale_dtype(scales, biases, stream);
  mx::Shape shape = x.shape();
  shape.back() = N;
  std::vector<mx::array> inputs = {x, w_q, s32, b32};
  const Fusion fusion =
      fusion_inputs("quantized_matmul", x, K, shape, norm_weight, eps, swiglu, residual, stream, inputs);
  if (int8_packed && (int8_packed->dtype() != mx::uint8 || int8_packed->ndim() != 1))
    fail("int8_packed must be the 1-D uint8 array quantized_matmul_int8_pack returns, got " +
         shape_str(int8_packed->shape()) + " " + dtype_name(int8_packed->dtype()));
  const bool packed = int8_packed && prec == Precision::kInt8;  // other precisions do not read it
  if (packed) inputs.push_back(*int8_packed);
  return mx::array(shape, x.dtype(),
                   std::make_shared<QuantizedMatmul>(stream, group_size, bits, fusion, prec, packed),
                   std::move(inputs));
}

mx::array quantized_matmul_int8_pack(const mx::array& w_q, const mx::array& scales, const mx::array& biases,
                                     int group_size, int bits, mx::StreamOrDevice s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("quantized_matmul_int8_pack: " + what); };
  check_bits_and_group_size("quantized_matmul_int8_pack", group_size, bits);
  check_w_q("quantized_matmul_int8_pack", w_q);
  check_scales_and_biases("quantized_matmul_int8_pack", w_q, scales, biases, group_size, bits);
  const mx::Stream stream = cpu_stream(s, "quantized_matmul_int8_pack");
  const auto [s32, b32] = one_scale_dtype(scales, biases, stream);
  const qmm::Int8Kernels& k = config().int8();  // the set the matmuls will use (unless reconfigured: then they pack)
  const int N = w_q.shape(0), K = int(int64_t(w_q.shape(1)) * 32 / bits);
  const size_t bytes = int8_pack_bytes(k, N, K, group_size, bits);
  if (bytes > size_t(std::numeric_limits<int32_t>::max()))
    fail("the packed weight would take " + std::to_string(bytes) + " bytes, more than one MLX array's 2^31 - 1");
  return mx::array({int(bytes)}, mx::uint8, std::make_shared<QuantizedMatmulInt8Pack>(stream, group_size, bits, &k),
                   {w_q, s32, b32});
}

void QuantizedMatmulInt8Pack::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = cpu_encoder(stream(), inputs, out);
  encoder.dispatch([in = weak_copies(inputs), out = mx::array::unsafe_weak_copy(out), gs = group_size_, bits = bits_,
                    k = static_cast<const qmm::Int8Kernels*>(kernels_)]() mutable {
    std::vector<char> tw, ts, tb;
    const mx::array &w = in[0], &scales = in[1], &biases = in[2];
    const Weights W{static_cast<const uint32_t*>(row_major(w, tw)), row_major(scales, ts), row_major(biases, tb),
                    dtype_of(scales), w.shape(0), int(int64_t(w.shape(1)) * 32 / bits), gs, bits};
    int8_pack_into(*k, W, out.data<uint8_t>());
  });
}

void QuantizedMatmulInt8Pack::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("tiny_llm_kernels.quantized_matmul_int8_pack is a CPU kernel; run it with stream=mx.cpu");
}

mx::array gather_quantized_matmul(const mx::array& x, const mx::array& w_q, const mx::array& scales,
                                  const mx::array& biases, const mx::array& indices, int group_size, int bits,
                                  mx::StreamOrDevice s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("gather_quantized_matmul: " + what); };
  check_bits_and_group_size("gather_quantized_matmul", group_size, bits);
  if (w_q.ndim() != 3 || w_q.dtype() != mx::uint32)
    fail("w_q must be a 3-D uint32 array (X, N, K * bits / 32), got " + shape_str(w_q.shape()) + " " +
         dtype_name(w_q.dtype()));
  if (x.ndim() != 2 || !is_float(x.dtype()))
    fail("x must be float32, float16 or bfloat16 with shape (M, K), got " + shape_str(x) + " " + dtype_name(x.dtype()));
  const int N = w_q.shape(1), K = x.shape(1);
  if (int64_t(w_q.shape(2)) * 32 / bits != K)
    fail("x has K = " + std::to_string(K) + " but w_q " + shape_str(w_q.shape()) + " holds " +
         std::to_string(int64_t(w_q.shape(2)) * 32 / bits) + " " + std::to_string(bits) + "-bit values per row");
  check_scales_and_biases("gather_quantized_matmul", w_q, scales, biases, group_size, bits);
  if (indices.ndim() != 1 || indices.shape(0) != x.shape(0) || indices.dtype() != mx::uint32)
    fail("indices must be a uint32 (M,) = (" + std::to_string(x.shape(0)) + ",) array, got " +
         shape_str(indices.shape()) + " " + dtype_name(indices.dtype()));
  const mx::Stream stream = cpu_stream(s, "gather_quantized_matmul");
  const auto [s32, b32] = one_scale_dtype(scales, biases, stream);
  return mx::array({x.shape(0), N}, x.dtype(), std::make_shared<GatherQuantizedMatmul>(stream, group_size, bits),
                   {x, w_q, s32, b32, indices});
}

void GatherQuantizedMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = cpu_encoder(stream(), inputs, out);
  encoder.dispatch([in = weak_copies(inputs), out = mx::array::unsafe_weak_copy(out), gs = group_size_,
                    bits = bits_]() mutable { run_gather(in[0], in[1], in[2], in[3], in[4], out, gs, bits); });
}

void GatherQuantizedMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("tiny_llm_kernels.gather_quantized_matmul is a CPU kernel; run it with stream=mx.cpu");
}

void QuantizedMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = cpu_encoder(stream(), inputs, out);
  encoder.dispatch([in = weak_copies(inputs), out = mx::array::unsafe_weak_copy(out), gs = group_size_, bits = bits_,
                    fusion = fusion_, precision = precision_, packed = int8_packed_]() mutable {
    int next = 4;  // the fused pieces' inputs follow x, w_q, scales, biases
    const mx::array* norm_w = fusion.prologue == Fusion::kRMSNorm ? &in[next++] : nullptr;
    const mx::array* residual = fusion.residual ? &in[next++] : nullptr;
    const mx::array* int8_packed = packed ? &in[next++] : nullptr;
    run(in[0], in[1], in[2], in[3], out, gs, bits, fusion, precision, norm_w, residual, int8_packed);
  });
}

void QuantizedMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("tiny_llm_kernels.quantized_matmul is a CPU kernel; run it with stream=mx.cpu");
}

std::map<std::string, std::string> quantized_matmul_info() {
  const Config& c = config();
  return {{"isa", c.isa->name},
          {"threads", std::to_string(ThreadPool::get().size())},
          {"panel_min_m", std::to_string(c.min_m())},
          {"bf16", c.bf16() ? c.bf16()->name : "emulated"},
          {"bf16_min_m", std::to_string(c.bf16_m())},
          {"int8", c.int8().name}};
}

std::map<std::string, std::string> quantized_matmul_configure(const std::string& isa, int panel_min_m,
                                                              int bf16_min_m) {
  Config& c = config();
  if (!isa.empty()) c.isa = isa_named(isa);
  if (panel_min_m >= -1) c.panel_min_m = panel_min_m;
  if (bf16_min_m >= -1) c.bf16_min_m = bf16_min_m;
  return quantized_matmul_info();
}

}  // namespace tiny_llm
