// The Python module tiny_llm_kernels._ext: one m.def per kernel. It shares
// nanobind's type registry with mlx.core (NB_DOMAIN mlx in CMakeLists.txt), so
// mx.array, mx.Stream and mx.Device pass straight through.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>

#include "cached_attention.h"
#include "flash_attention.h"
#include "quantized_matmul.h"
#include "rms_norm.h"
#include "rope.h"
#include "swiglu.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "tiny-llm spec's C++ kernels for MLX (CPU).";

  m.def("quantized_matmul", &tiny_llm::quantized_matmul, "x"_a, "w_q"_a, "scales"_a, "biases"_a,
        "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "norm_weight"_a = nb::none(), "eps"_a = 1e-5f,
        "swiglu"_a = false, "residual"_a = nb::none(), "stream"_a = nb::none(),
        "y = x @ dequantize(w_q, scales, biases).T in MLX's affine format, on the CPU.\n\n"
        "x (..., K) float32/float16/bfloat16; w_q (N, K * bits / 32) uint32; scales and\n"
        "biases (N, K / group_size) float32/float16/bfloat16. Returns (..., N) in x's dtype,\n"
        "accumulated in float32. bits 4 or 8, group_size 32, 64 or 128. Lazy, like any MLX op.\n"
        "Fused in the same node (twin: impl.fusion.fused_linear_mlx): norm_weight (K,):\n"
        "x = rms_norm(x, norm_weight, eps) first; swiglu: x (..., 2K) = [gate | up] ->\n"
        "silu(gate) * up first; residual (..., N) in x's dtype: y + residual after.");
  m.def("quantized_matmul_info", &tiny_llm::quantized_matmul_info,
        "Which code quantized_matmul runs: instruction set, threads, panel_min_m.");
  m.def("quantized_matmul_configure", &tiny_llm::quantized_matmul_configure, "isa"_a = "", "panel_min_m"_a = -2,
        "For tests and benchmarks: force isa ('portable', 'avx2', 'avx512', 'auto') and the\n"
        "smallest M sent to the dequantized-panel kernel (0: never, -1: the isa's own). Returns quantized_matmul_info().");

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

  m.def("cached_attention", &tiny_llm::cached_attention, "qkv"_a, "keys"_a, "values"_a, "cos"_a, "sin"_a,
        "offset"_a, "n_heads"_a, "n_kv_heads"_a, "scale"_a = nb::none(), "traditional"_a = false,
        "stream"_a = nb::none(),
        "RoPE, KV-cache append and causal flash attention in one node, on the CPU\n"
        "(twin: impl.layer_kernels.cached_attention_mlx).\n\n"
        "qkv (N, L, (H + 2 H_kv) D): q, k, v heads side by side. keys, values (N, H_kv, C, D), one float\n"
        "dtype (qkv's, or e.g. float16 under float32 activations: the new rows are rounded to it),\n"
        "positions [0, offset) filled, C >= offset + L. cos, sin (P, D/2) float32 RoPE tables.\n"
        "Returns (out (N, L, H D), keys', values'): the new k (rotated) and v written at positions\n"
        "offset..offset + L - 1, query l attending to keys <= offset + l. keys'/values' reuse the\n"
        "input buffers when nothing else holds them. Lazy, like any MLX op.");
  m.def("rms_norm", &tiny_llm::rms_norm, "x"_a, "weight"_a, "eps"_a = 1e-5f, "stream"_a = nb::none(),
        "x / sqrt(mean(x^2) + eps) * weight over the last axis, on the CPU (twin: impl.norm.RMSNorm).\n\n"
        "x (..., D) float32/float16/bfloat16, weight (D,). Returns x's shape and dtype; the mean of\n"
        "squares is accumulated in float32. Lazy, like any MLX op.");
  m.def("rope", &tiny_llm::rope, "x"_a, "cos"_a, "sin"_a, "offset"_a = 0, "traditional"_a = false,
        "stream"_a = nb::none(),
        "Rotary position embedding from cos/sin tables, on the CPU (twin: impl.rope.RoPE).\n\n"
        "x (N, L, H, D) float32/float16/bfloat16, any strides; cos, sin (S, D/2) float32 for positions\n"
        "[0, S); position l is offset + l. traditional: interleaved pairs (x_2i, x_2i+1), else\n"
        "half-split (x_i, x_i+D/2). Returns (N, L, H, D) in x's dtype. Lazy, like any MLX op.");
  m.def("swiglu", &tiny_llm::swiglu, "x"_a, "stream"_a = nb::none(),
        "silu(gate) * up for x = [gate | up] on the last axis, on the CPU (twin: impl.layer_kernels.swiglu_mlx).\n\n"
        "x (..., 2I) float32/float16/bfloat16 -> (..., I) in x's dtype. Lazy, like any MLX op.");
}
