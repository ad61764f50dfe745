// tiny_llm_kernels.kquant_matmul: y = x @ W.T with W in GGUF k-quant blocks (Q4_K, Q6_K) as the
// file stores them, an MLX primitive with a CPU implementation (twin: impl.kquant.kquant_matmul_mlx).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "quantized_matmul.h"  // Fusion

namespace tiny_llm {

namespace mx = mlx::core;

// x (..., K) fp32/fp16/bf16 ((..., 2K) with swiglu); parts: W's rows in runs, each a (N_i, K / 256 *
// block bytes) uint8 array of blocks of types[i] ("Q4_K" or "Q6_K") -> (..., N_1 + N_2 + ...) in
// x's dtype, fp32 accumulation. x_int8: x is first rounded per block of 256 values to int8 (d =
// max|x| / 127, q = round(x / d), ties to even): below panel_min_m rows (decode) W's integer q are
// dotted with q in int32 and scaled, llama.cpp's arithmetic; from panel_min_m rows the fp32 panels
// take d * q. Without it, x as given. W is decoded exactly. norm_weight, eps, swiglu, residual:
// the fused prologue and epilogue of quantized_matmul.
mx::array kquant_matmul(const mx::array& x, const std::vector<mx::array>& parts, const std::vector<std::string>& types,
                        bool x_int8 = false, const std::optional<mx::array>& norm_weight = std::nullopt,
                        float eps = 1e-5f, bool swiglu = false,
                        const std::optional<mx::array>& residual = std::nullopt, mx::StreamOrDevice s = {});

class KQuantMatmul : public mx::UnaryPrimitive {
 public:
  KQuantMatmul(mx::Stream stream, std::vector<int> types, bool x_int8, Fusion fusion)
      : mx::UnaryPrimitive(stream), types_(std::move(types)), x_int8_(x_int8), fusion_(fusion) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "TinyLLMKQuantMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const KQuantMatmul&>(other);
    return types_ == o.types_ && x_int8_ == o.x_int8_ && fusion_ == o.fusion_;
  }

 private:
  std::vector<int> types_;  // kq::Type per part
  bool x_int8_;
  Fusion fusion_;
};

// {"isa", "threads", "panel_min_m"} as text.
std::map<std::string, std::string> kquant_matmul_info();

// For tests and benchmarks: force an instruction set ("portable", "avx2", "avx512", "auto"; ""
// keeps it) and the smallest M sent to the fp32 panels (0 = never; -1 = the default; -2 keeps it).
std::map<std::string, std::string> kquant_matmul_configure(const std::string& isa, int panel_min_m = -2);

}  // namespace tiny_llm
