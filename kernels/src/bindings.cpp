// The Python module tiny_llm_kernels._ext: one m.def per kernel. It shares
// nanobind's type registry with mlx.core (NB_DOMAIN mlx in CMakeLists.txt), so
// mx.array, mx.Stream and mx.Device pass straight through.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "flash_attention.h"
#include "quantized_matmul.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "tiny-llm spec's C++ kernels for MLX (CPU).";

  m.def("quantized_matmul", &tiny_llm::quantized_matmul, "x"_a, "w_q"_a, "scales"_a, "biases"_a,
        "group_size"_a = 64, "bits"_a = 4, "stream"_a = nb::none(),
        "y = x @ dequantize(w_q, scales, biases).T in MLX's affine format, on the CPU.\n\n"
        "x (..., K) float32/float16/bfloat16; w_q (N, K * bits / 32) uint32; scales and\n"
        "biases (N, K / group_size) float32/float16/bfloat16. Returns (..., N) in x's dtype,\n"
        "accumulated in float32. bits 4 or 8, group_size 32, 64 or 128. Lazy, like any MLX op.");
  m.def("quantized_matmul_info", &tiny_llm::quantized_matmul_info,
        "Which code quantized_matmul runs: instruction set, threads, panel_min_m.");
  m.def("quantized_matmul_configure", &tiny_llm::quantized_matmul_configure, "isa"_a = "", "panel_min_m"_a = -1,
        "For tests and benchmarks: force isa ('portable', 'avx2', 'avx512', 'auto') and the\n"
        "smallest M sent to the dequantized-panel kernel (0: never). Returns quantized_matmul_info().");

  m.def("flash_attention", &tiny_llm::flash_attention, "q"_a, "k"_a, "v"_a, "scale"_a = nb::none(),
        "causal"_a = false, "mask"_a = nb::none(), "stream"_a = nb::none(),
        "softmax(q @ k^T * scale + mask) @ v, tiled with an online softmax, on the CPU.\n\n"
        "q (B, H, L, D); k, v (B, H_kv, S, D), H % H_kv == 0; float32/float16/bfloat16.\n"
        "causal: query i sees keys j <= i + S - L. mask: additive (or boolean, True = attend),\n"
        "broadcastable to (B, H, L, S). scale defaults to 1/sqrt(D). A row that sees no key is 0.\n"
        "Returns (B, H, L, D) in q's dtype, accumulated in float32. Lazy, like any MLX op.");
  m.def("flash_attention_info", &tiny_llm::flash_attention_info,
        "Which code flash_attention runs: instruction set, threads, key tile.");
  m.def("flash_attention_configure", &tiny_llm::flash_attention_configure, "isa"_a = "auto",
        "For tests and benchmarks: force isa ('portable', 'avx2', 'avx512', 'auto').\n"
        "Returns flash_attention_info().");
}
