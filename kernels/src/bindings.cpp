// The Python module tiny_llm_kernels._ext: one m.def per kernel. It shares
// nanobind's type registry with mlx.core (NB_DOMAIN mlx in CMakeLists.txt), so
// mx.array, mx.Stream and mx.Device pass straight through.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "activations.h"
#include "adamw.h"
#include "cached_attention.h"
#include "causal_attention.h"
#include "flash_attention.h"
#include "huge_pages.h"
#include "kquant_matmul.h"
#include "layer_norm.h"
#include "paged_attention.h"
#include "quantized_matmul.h"
#include "quantized_matmul_dx.h"
#include "rms_norm.h"
#include "rope.h"
#include "train_activations.h"
#include "swiglu.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "tiny-llm spec's C++ kernels for MLX (CPU).";

  m.def("quantized_matmul", &tiny_llm::quantized_matmul, "x"_a, "w_q"_a, "scales"_a, "biases"_a,
        "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "norm_weight"_a = nb::none(), "eps"_a = 1e-5f,
        "swiglu"_a = false, "residual"_a = nb::none(), "precision"_a = "fp32", "int8_packed"_a = nb::none(),
        "stream"_a = nb::none(),
        "y = x @ dequantize(w_q, scales, biases).T in MLX's affine format, on the CPU.\n\n"
        "x (..., K) float32/float16/bfloat16; w_q (N, K * bits / 32) uint32; scales and\n"
        "biases (N, K / group_size) float32/float16/bfloat16. Returns (..., N) in x's dtype,\n"
        "accumulated in float32. bits 4 or 8, group_size 32, 64 or 128. Lazy, like any MLX op.\n"
        "Fused in the same node (twin: impl.fusion.fused_linear_mlx): norm_weight (K,):\n"
        "x = rms_norm(x, norm_weight, eps) first; swiglu: x (..., 2K) = [gate | up] ->\n"
        "silu(gate) * up first; residual (..., N) in x's dtype: y + residual after.\n"
        "precision: 'fp32' (default) or 'bf16': the matmul's operands rounded to bfloat16, x (after\n"
        "the prologue) and w = scales * q + biases (in float32, multiply then add), products\n"
        "accumulated in float32 (twin: impl.quantize.quantized_matmul_bf16_mlx). From bf16_min_m\n"
        "rows on a CPU with AVX512-BF16 this runs VDPBF16PS (about 2x the float32 FLOPS), else the\n"
        "float32 kernels on the same rounded operands; only the order of the additions differs.\n"
        "'int8': x rounded per row per weight group to int8 (dx = max|x| / 127, ties to even),\n"
        "exact integer dots with the weights' quants (AVX512-VNNI, else plain C++: the same bits),\n"
        "then per group y += isum * (scale * dx) + bias * (dx * sum xq) in float32, in one order at\n"
        "every M (twin: impl.quantize.quantized_matmul_int8_mlx, equal bit for bit). It packs the\n"
        "weight into its kernels' layout at each call unless given int8_packed, the weight packed once\n"
        "by quantized_matmul_int8_pack (the same bits).");
  m.def("quantized_matmul_int8_pack", &tiny_llm::quantized_matmul_int8_pack, "w_q"_a, "scales"_a, "biases"_a,
        "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "stream"_a = nb::none(),
        "The weight (w_q, scales, biases) packed once for quantized_matmul(..., precision='int8',\n"
        "int8_packed=...): a 1-D uint8 array (a header naming the kernel set and shape, the quants in\n"
        "the int8 kernels' layout, the scales and biases in float32). Lazy, like any MLX op.");
  m.def("gather_quantized_matmul", &tiny_llm::gather_quantized_matmul, "x"_a, "w_q"_a, "scales"_a, "biases"_a,
        "indices"_a, "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "stream"_a = nb::none(),
        "y[m] = x[m] @ dequantize(w_q[e], scales[e], biases[e]).T with e = indices[m]: each row times\n"
        "its expert's quantized weights (mixture of experts), on the CPU (twin:\n"
        "impl.moe.gather_quantized_matmul_mlx; as mx.gather_qmm with rhs_indices).\n\n"
        "x (M, K) float32/float16/bfloat16; w_q (X, N, K * bits / 32) uint32; scales and biases\n"
        "(X, N, K / group_size); indices (M,) uint32. Returns (M, N) in x's dtype, accumulated in\n"
        "float32. Rows sorted by expert run as one quantized_matmul per expert; a row whose index is\n"
        ">= X is 0. Lazy, like any MLX op.");
  m.def("quantized_matmul_dx", &tiny_llm::quantized_matmul_dx, "dy"_a, "w_q"_a, "scales"_a, "biases"_a,
        "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "stream"_a = nb::none(),
        "dx = dy @ dequantize(w_q, scales, biases): the x-gradient of y = x @ W.T (QLoRA), on the CPU\n"
        "(twin: impl.train.qlora.quantized_matmul_dx_mlx).\n\n"
        "dy (..., N) float32/float16/bfloat16; w_q (N, K * bits / 32) uint32; scales and biases\n"
        "(N, K / group_size). Returns (..., K) in dy's dtype, accumulated in float32 over n in order.\n"
        "bits 4 or 8, group_size 32, 64 or 128. Lazy, like any MLX op.");
  m.def("quantized_matmul_info", &tiny_llm::quantized_matmul_info,
        "Which code quantized_matmul runs: instruction set, threads, panel_min_m, bf16 ('avx512_bf16'\n"
        "or 'emulated'), bf16_min_m, int8 ('avx512_vnni' or 'portable').");
  m.def("quantized_matmul_configure", &tiny_llm::quantized_matmul_configure, "isa"_a = "", "panel_min_m"_a = -2,
        "bf16_min_m"_a = -2,
        "For tests and benchmarks: force isa ('portable', 'avx2', 'avx512', 'auto'), the\n"
        "smallest M sent to the dequantized-panel kernel (0: never, -1: the isa's own) and the\n"
        "smallest M that precision='bf16' sends to the VDPBF16PS kernel (0: never, -1: the default).\n"
        "Returns quantized_matmul_info().");

  m.def("kquant_matmul", &tiny_llm::kquant_matmul, "x"_a, "parts"_a, "types"_a, nb::kw_only(), "x_int8"_a = false,
        "norm_weight"_a = nb::none(), "eps"_a = 1e-5f, "swiglu"_a = false, "residual"_a = nb::none(),
        "stream"_a = nb::none(),
        "y = x @ W.T with W in GGUF k-quant blocks as the file stores them, on the CPU (twin:\n"
        "impl.kquant.kquant_matmul_mlx).\n\n"
        "x (..., K) float32/float16/bfloat16, K a multiple of 256; parts: W's rows in runs, each a\n"
        "(N_i, K / 256 * block bytes) uint8 array of types[i] ('Q4_K': 144 bytes a block, 'Q6_K': 210).\n"
        "Returns (..., sum N_i) in x's dtype, accumulated in float32. x_int8: x first rounded per 256\n"
        "values to int8 (d = max|x| / 127, q = round(x / d), ties to even; below panel_min_m rows dotted\n"
        "with W's integer q, llama.cpp's arithmetic); else x as given. W decoded exactly.\n"
        "norm_weight, eps, swiglu, residual: fused as in quantized_matmul. Lazy, like any MLX op.");
  m.def("kquant_matmul_info", &tiny_llm::kquant_matmul_info, "Which code kquant_matmul runs: isa, threads, panel_min_m (fp32 mode) and\n"
        "panel_min_m_int8 (0: never panels; the default on AVX-512 VNNI, whose int8 dots are faster).");
  m.def("kquant_matmul_configure", &tiny_llm::kquant_matmul_configure, "isa"_a = "", "panel_min_m"_a = -2,
        "For tests and benchmarks: force isa ('portable', 'avx2', 'avx512', 'auto') and the smallest M\n"
        "sent to the float32 panels (0: never, -1: the default). Returns kquant_matmul_info().");

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
  m.def("paged_attention", &tiny_llm::paged_attention, "qkv"_a, "k_pool"_a, "v_pool"_a, "cos"_a, "sin"_a,
        "positions"_a, "slot_mapping"_a, "block_tables"_a, "cu_seqlens_q"_a, "context_lens"_a, "n_heads"_a,
        "n_kv_heads"_a, nb::kw_only(), "scale"_a = nb::none(), "traditional"_a = false, "window"_a = 0,
        "stream"_a = nb::none(),
        "RoPE, the paged KV-cache write and causal attention through block tables in one node, on the\n"
        "CPU (twin: impl.engine.paged_attention.paged_attention_mlx).\n\n"
        "qkv (1, T, (H + 2 H_kv) D): T tokens of B sequences end to end, q, k, v heads side by side.\n"
        "k_pool, v_pool (num_blocks, H_kv, block_size, D), one float dtype (qkv's, or e.g. float16 under\n"
        "float32 activations: the new rows are rounded to it). cos, sin (P, D/2) float32 RoPE tables;\n"
        "traditional: interleaved pairs, else half-split. int32 metadata: positions (T,), slot_mapping (T,),\n"
        "block_tables (B, max_blocks), cu_seqlens_q (B + 1,), context_lens (B,). Token t's rotated k and\n"
        "its v go to slot slot_mapping[t] (block slot // block_size, offset slot % block_size); then its\n"
        "query (sequence b, position p = positions[t]) attends to sequence b's keys at positions 0..p,\n"
        "read in place through block_tables[b]; window > 0: keys p - window + 1 .. p only (a sliding\n"
        "window, Gemma 3's local layers). scale defaults to 1/sqrt(D). Returns (out (1, T, H D) in\n"
        "qkv's dtype, k_pool', v_pool'); the pools reuse the input buffers when nothing else holds them.\n"
        "A row's bits depend only on its q, its position and its sequence's keys and values it sees (not on\n"
        "the batch, the chunk, the block size or layout, or the thread count). Out-of-range slots, block\n"
        "ids or positions raise ValueError. Lazy, like any MLX op.");
  m.def("paged_attention_info", &tiny_llm::paged_attention_info,
        "Which code paged_attention runs: instruction set, threads, key tile, segment (positions a task\n"
        "may take alone: a row's keys are folded a segment at a time).");
  m.def("paged_attention_configure", &tiny_llm::paged_attention_configure, "isa"_a = "auto",
        "For tests and benchmarks: force isa ('portable', 'avx2', 'avx512', 'auto').\n"
        "Returns paged_attention_info().");
  m.def("huge_pages", &tiny_llm::huge_pages, "a"_a, "stream"_a = nb::none(),
        "A copy of a in memory backed by 2 MB pages where the OS gives them (Linux transparent huge\n"
        "pages; a plain copy elsewhere, or under 4 MB): for weights that every decode step reads.\n\n"
        "Same shape, dtype and values, row-major. Lazy, like any MLX op.");
  m.def("rms_norm", &tiny_llm::rms_norm, "x"_a, "weight"_a, "eps"_a = 1e-5f, "stream"_a = nb::none(),
        "x / sqrt(mean(x^2) + eps) * weight over the last axis, on the CPU (twin: impl.norm.RMSNorm).\n\n"
        "x (..., D) float32/float16/bfloat16, weight (D,). Returns x's shape and dtype; the mean of\n"
        "squares is accumulated in float32. Lazy, like any MLX op.");
  m.def("rms_norm_backward", &tiny_llm::rms_norm_backward, "x"_a, "weight"_a, "dy"_a, "eps"_a = 1e-5f,
        "stream"_a = nb::none(),
        "The gradients of rms_norm, on the CPU (twin: MLX's autodiff of impl.norm.RMSNorm).\n\n"
        "x (..., D), weight (D,), dy (x's shape), float32 -> [dx (x's shape), dw (D,)]. Lazy, like any MLX op.");
  m.def("rope", &tiny_llm::rope, "x"_a, "cos"_a, "sin"_a, "offset"_a = 0, "traditional"_a = false,
        "stream"_a = nb::none(),
        "Rotary position embedding from cos/sin tables, on the CPU (twin: impl.rope.RoPE).\n\n"
        "x (N, L, H, D) float32/float16/bfloat16, any strides; cos, sin (S, D/2) float32 for positions\n"
        "[0, S); position l is offset + l. traditional: interleaved pairs (x_2i, x_2i+1), else\n"
        "half-split (x_i, x_i+D/2). Returns (N, L, H, D) in x's dtype. Lazy, like any MLX op.");
  m.def("swiglu", &tiny_llm::swiglu, "x"_a, "stream"_a = nb::none(),
        "silu(gate) * up for x = [gate | up] on the last axis, on the CPU (twin: impl.layer_kernels.swiglu_mlx).\n\n"
        "x (..., 2I) float32/float16/bfloat16 -> (..., I) in x's dtype. Lazy, like any MLX op.");
  m.def("softmax", &tiny_llm::softmax, "x"_a, "stream"_a = nb::none(),
        "Softmax over the last axis, on the CPU (twin: impl.basics.softmax).\n\n"
        "x (..., D) float32/float16/bfloat16 -> x's shape and dtype; max, exp and sum in float32,\n"
        "exp to about 2 ulps (MLX's CPU exp: up to 65). A row of -inf gives NaN, as the twin's.\n"
        "Forward only: impl.train.layers.softmax gives it a vjp. Lazy, like any MLX op.");
  m.def("causal_attention", &tiny_llm::causal_attention, "q"_a, "k"_a, "v"_a, "scale"_a, "stream"_a = nb::none(),
        "Causal attention for training, on the CPU (twin: impl.attention.scaled_dot_product_attention_grouped).\n\n"
        "q (N, H, L, D), k and v (N, H_kv, L, D) float32, any strides, H a multiple of H_kv; query i sees\n"
        "keys 0..i. Returns [out (N, H, L, D), lse (N, H, L)]: lse is each row's log-sum-exp of its\n"
        "scaled scores, for causal_attention_backward. Lazy, like any MLX op.");
  m.def("causal_attention_backward", &tiny_llm::causal_attention_backward, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a,
        "dout"_a, "scale"_a, "stream"_a = nb::none(),
        "The gradients of causal_attention, on the CPU (twin: MLX's autodiff of the twin above).\n\n"
        "From q, k, v, causal_attention's [out, lse] and dout (N, H, L, D), the gradient reaching out,\n"
        "returns [dq (N, H, L, D), dk, dv (N, H_kv, L, D)], float32. Lazy, like any MLX op.");
  m.def(
      "adamw",
      [](const std::vector<tiny_llm::mx::array>& weights, const std::vector<tiny_llm::mx::array>& grads,
         const std::vector<tiny_llm::mx::array>& m, const std::vector<tiny_llm::mx::array>& v, float b1, float c1,
         float b2, float c2, float decay, float step_size, float root_c2, float eps, tiny_llm::mx::StreamOrDevice s) {
        return tiny_llm::adamw(weights, grads, m, v, {b1, c1, b2, c2, decay, step_size, root_c2, eps}, s);
      },
      "weights"_a, "grads"_a, "m"_a, "v"_a, nb::kw_only(), "b1"_a, "c1"_a, "b2"_a, "c2"_a, "decay"_a, "step_size"_a,
      "root_c2"_a, "eps"_a, "stream"_a = nb::none(),
      "One AdamW step on lists of float32 weights, gradients and moments, on the CPU (twin:\n"
      "impl.train.optim.AdamW's array ops, bit for bit).\n\n"
      "m' = b1 m + c1 g; v' = b2 v + c2 g^2; w' = w decay - step_size m' / (sqrt(v') / root_c2 + eps),\n"
      "each constant as the twin rounds it to float32. Returns the new weights, then m, then v (3n\n"
      "arrays). Lazy, like any MLX op.");
  m.def("silu_mul", &tiny_llm::silu_mul, "gate"_a, "up"_a, "stream"_a = nb::none(),
        "silu(gate) * up for training, on the CPU (twin: impl.train.layers.silu(gate) * up).\n\n"
        "gate, up float32 of one shape -> (gate * sigmoid(gate)) * up. Lazy, like any MLX op.");
  m.def("silu_mul_backward", &tiny_llm::silu_mul_backward, "gate"_a, "up"_a, "dy"_a, "stream"_a = nb::none(),
        "The gradients of silu_mul, on the CPU (twin: MLX's autodiff of the twin above).\n\n"
        "gate, up, dy float32 of one shape -> [dgate, dup]. Lazy, like any MLX op.");
  m.def("gelu", &tiny_llm::gelu, "x"_a, "stream"_a = nb::none(),
        "GPT-2's GELU (tanh form) for training, on the CPU (twin: impl.train.layers.gelu, bit for bit).\n\n"
        "x float32 -> x * sigmoid(sqrt(8 / pi) * (x + 0.044715 x^3)). Lazy, like any MLX op.");
  m.def("gelu_backward", &tiny_llm::gelu_backward, "x"_a, "dy"_a, "stream"_a = nb::none(),
        "The gradient of gelu, on the CPU (twin: MLX's autodiff of the twin above).\n\n"
        "x, dy float32 of one shape -> dx. Lazy, like any MLX op.");
  m.def("layer_norm", &tiny_llm::layer_norm, "x"_a, "weight"_a, "bias"_a, "eps"_a = 1e-5f, "stream"_a = nb::none(),
        "LayerNorm over the last axis for training, on the CPU (twin: impl.train.layers.layer_norm_mlx).\n\n"
        "x (..., D), weight and bias (D,), float32; the biased variance, as torch's. Lazy, like any MLX op.");
  m.def("layer_norm_backward", &tiny_llm::layer_norm_backward, "x"_a, "weight"_a, "dy"_a, "eps"_a = 1e-5f,
        "stream"_a = nb::none(),
        "The gradients of layer_norm, on the CPU (twin: MLX's autodiff of the twin above).\n\n"
        "x (..., D), weight (D,), dy (x's shape), float32 -> [dx, dweight, dbias]. Lazy, like any MLX op.");
  m.def("sigmoid", &tiny_llm::sigmoid, "x"_a, "stream"_a = nb::none(),
        "1 / (1 + exp(-x)) elementwise, on the CPU (twin: impl.train.layers.sigmoid_mlx).\n\n"
        "x float32/float16/bfloat16, any shape -> the same shape and dtype, computed in float32 from\n"
        "exp(-|x|), which never overflows. Forward only: impl.train.layers.sigmoid gives it a vjp.");
}
