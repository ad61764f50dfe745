"""Topic 3.3, mixture of experts: the sparse MoE block of Mixtral, Qwen2-MoE and Qwen3-MoE.

A router scores every expert for each token; the token's top-k experts (SwiGLU MLPs) run on it and
their outputs are summed, weighted by the router's softmax probabilities (renormalized over the k
for Mixtral and when `norm_topk_prob`); Qwen2-MoE adds a shared expert gated by a sigmoid. The
experts are computed grouped: the token-expert pairs sorted by expert, each expert run once on its
rows, the results scatter-added back, never every expert on every token.

Quantized experts (a GGUF's, kept quantized) go through a gathered quantized matmul, each row times
its expert's quantized weights: a C++ kernel (tiny_llm_kernels.gather_quantized_matmul) checked
against its pure-MLX twin, against mx.gather_qmm, and row for row against topic 2.2's kernel.

Checked against: torch's softmax and topk (the router), the pure-MLX twin that gathers each token's
experts (the grouped computation, at fp32), mlx-lm's SwitchGLU (the experts), transformers'
MixtralForCausalLM, Qwen2MoeForCausalLM and Qwen3MoeForCausalLM on tiny random configs (the MoE
block alone; logits on the MODEL_FP32 rung; greedy tokens while the top-2 gap is clear), loaded
from the HF folders transformers saves and from GGUFs the gguf package writes (llama.cpp's stacked
ffn_*_exps tensors, F32, Q8_0 and Q5_0). No MoE checkpoint ships offline: every model here is a tiny
random one with fixed seeds.

The engine (impl.engine, topic 2.6's contiguous cache) runs a tiny MoE model: batched == alone.
That check is why this topic's prerequisites include 2.6 (and, through it, week 2's engine).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference.tiny_models import TINY_MOE, tiny_folder, tiny_gguf
from spec.engine_cases import (
    DENSE_BATCH,
    Request,
    assert_same_logprobs,
    assert_transformers_greedy,
    random_prompts,
    run,
)
from spec.ladder import BY_DTYPE, FP32, MODEL_FP32, assert_close, assert_greedy_tokens

BUILD = "pip install --no-build-isolation ./kernels  (needs a C++ compiler, cmake, mlx, nanobind>=3,<4)"

NAMES = {
    "config": ["ModelArgs"],
    "moe": ["route", "top_k_experts", "Experts", "swiglu_expert", "experts_grouped", "experts_dense_mlx",
            "SparseMoeBlock", "stack_experts", "gather_quantized_matmul", "gather_quantized_matmul_mlx",
            "check_gather_quantized_matmul"],
    "loader": ["load_model"],
}
ARCHITECTURES = ["mixtral", "qwen2-moe", "qwen3-moe"]  # one tiny config of each (reference/tiny_models.py)


@pytest.mark.presence
def test_has_names(impl):
    missing = [f"{m}.{n}" for m, names in NAMES.items() for n in names if not hasattr(getattr(impl, m), n)]
    assert not missing, f"missing: {missing}"


@pytest.fixture(scope="module")
def tiny(impl, tmp_path_factory):
    """kind -> (transformers model, its HF folder, impl's LoadedModel), made on first use."""
    made = {}

    def get(kind: str):
        if kind not in made:
            ref, folder = tiny_folder(tmp_path_factory.mktemp("moe"), kind, seed=7)
            made[kind] = ref, folder, impl.loader.load_model(folder)
        return made[kind]

    return get


# --- config -------------------------------------------------------------------------------


def test_config_reads_the_moe_fields(impl):
    base = {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 96, "num_attention_heads": 4,
            "vocab_size": 320, "unknown_future_key": 1}
    m = impl.config.ModelArgs.from_dict(base | {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2})
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.norm_topk_prob) == (8, 2, 96, True), \
        "Mixtral: num_local_experts experts of intermediate_size, always renormalized"
    assert all(m.is_moe_layer(i) for i in range(4))
    q = impl.config.ModelArgs.from_dict(base | {
        "model_type": "qwen2_moe", "num_experts": 6, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 80, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert (q.num_experts, q.moe_intermediate_size, q.shared_expert_intermediate_size, q.norm_topk_prob) == \
        (6, 32, 80, False), "Qwen2-MoE: transformers' default norm_topk_prob is False"
    assert [q.is_moe_layer(i) for i in range(4)] == [False, True, False, False], \
        "sparse every decoder_sparse_step-th layer (1-based), except mlp_only_layers"
    q3 = impl.config.ModelArgs.from_dict(base | {"model_type": "qwen3_moe", "num_experts": 8, "norm_topk_prob": True})
    assert (q3.num_experts, q3.norm_topk_prob, q3.is_moe_layer(0)) == (8, True, True)
    dense = impl.config.ModelArgs.from_dict(base | {"model_type": "qwen2"})
    assert not dense.is_moe_layer(0)
    with pytest.raises(ValueError, match="num_experts"):
        impl.config.ModelArgs.from_dict(base | {"model_type": "qwen3_moe", "num_experts": 2, "num_experts_per_tok": 3})


# --- the router -----------------------------------------------------------------------------


@given(data=st.data())
def test_route_matches_torch(impl, data):
    T = data.draw(st.integers(1, 24), label="tokens")
    X = data.draw(st.integers(1, 16), label="experts")
    k = data.draw(st.integers(1, X), label="top_k")
    norm = data.draw(st.booleans(), label="norm_topk_prob")
    scale = data.draw(st.sampled_from([0.1, 1.0, 8.0]), label="logit scale")
    logits = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed")).standard_normal((T, X)) * scale
    logits = logits.astype(np.float32)
    weights, indices = impl.moe.route(mx.array(logits), k, norm)
    probs = torch.softmax(torch.tensor(logits), dim=-1)
    want_w, want_i = torch.topk(probs, k, dim=-1)  # distinct random floats: no ties
    if norm:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    assert np.array(indices).tolist() == want_i.tolist(), "top-k experts, largest first"
    assert_close(weights, want_w, FP32, f"routing weights T={T} X={X} k={k} norm={norm}")
    if norm:  # softmax then top-k then renormalize == top-k of the logits, then softmax over those k
        top_logits = torch.gather(torch.tensor(logits), 1, want_i)
        assert_close(weights, torch.softmax(top_logits, dim=-1), FP32, "renormalized == softmax after top-k")


def test_route_edge_cases(impl):
    route = impl.moe.route
    tied = mx.array([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    w, i = route(tied, 2, False)
    assert np.array(i).tolist() == [[1, 2], [0, 1]], "ties go to the lower expert index"
    assert_close(w[1], [0.2, 0.2], FP32, "all equal: each 1/X")
    w, i = route(tied, 5, False)  # top_k == num_experts: every expert, the weights the full softmax
    assert sorted(np.array(i)[0].tolist()) == [0, 1, 2, 3, 4] and np.array(i)[0, 0] == 1
    assert_close(mx.sum(w, axis=-1), [1.0, 1.0], FP32, "k = X: the weights are the whole softmax")
    w, i = route(mx.array([[0.0, 80.0, -80.0]]), 1, False)  # one expert takes all: probability 1
    assert np.array(i).tolist() == [[1]] and abs(float(w[0, 0]) - 1.0) < 1e-6
    w, i = route(mx.array([[0.0, 80.0, -80.0]]), 2, True)  # the second's probability underflows toward 0
    assert np.array(i).tolist() == [[1, 0]] and np.isfinite(np.array(w)).all()
    w, i = route(mx.array([[5.0, -1.0]], dtype=mx.float16), 1, True)
    assert w.dtype == mx.float16, "weights come back in the logits' dtype (transformers casts back)"


# --- the experts: grouped == the gathered twin == mlx-lm -------------------------------------


def random_experts(impl, seed: int, X: int, E: int, I: int):
    g = np.random.default_rng(seed)
    w = lambda *s: mx.array((g.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32))  # noqa: E731
    return impl.moe.Experts(w(X, I, E), w(X, I, E), w(X, E, I))


def random_routing(seed: int, T: int, X: int, k: int, hot: int | None = None):
    """(weights, indices) (T, k): k distinct experts per token (all drawn from the `hot` first when set)."""
    g = np.random.default_rng(seed)
    pool = hot or X
    indices = np.stack([g.permutation(pool)[:k] for _ in range(T)]).astype(np.uint32)
    weights = g.uniform(0.05, 1.0, (T, k)).astype(np.float32)
    return mx.array(weights), mx.array(indices)


@given(data=st.data())
def test_experts_grouped_matches_the_gathered_twin(impl, data):
    T = data.draw(st.integers(1, 40), label="tokens")
    X = data.draw(st.integers(1, 10), label="experts")
    k = data.draw(st.integers(1, X), label="top_k")
    hot = data.draw(st.integers(k, X), label="experts any token chooses (the rest: no rows)")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    experts = random_experts(impl, seed, X, 32, 24)
    weights, indices = random_routing(seed + 1, T, X, k, hot)
    x = mx.array(np.random.default_rng(seed + 2).standard_normal((T, 32)).astype(np.float32))
    got = impl.moe.experts_grouped(x, weights, indices, experts)
    want = impl.moe.experts_dense_mlx(x, weights, indices, experts)
    # The same products in another grouping: fp32 summation order only.
    assert_close(got, want, FP32, f"grouped vs twin T={T} X={X} k={k} hot={hot}")


def test_a_pair_routed_to_no_expert_adds_nothing(impl):
    """transformers' experts skip index X (one past the last expert): so do the grouped form and the twin."""
    X = 4
    experts = random_experts(impl, 8, X, 32, 24)
    weights, indices = random_routing(9, 6, X, 2)
    x = mx.array(np.random.default_rng(10).standard_normal((6, 32)).astype(np.float32))
    cut = mx.array(np.where(np.arange(12).reshape(6, 2) % 3 == 0, X, np.array(indices)).astype(np.uint32))
    keep = mx.array(np.where(np.array(cut) == X, 0.0, np.array(weights)).astype(np.float32))
    want = impl.moe.experts_dense_mlx(x, keep, mx.minimum(cut, X - 1), experts)  # those pairs weighted 0
    for f in (impl.moe.experts_grouped, impl.moe.experts_dense_mlx):
        assert_close(f(x, weights, cut, experts), want, FP32, f"{f.__name__} with pairs routed to no expert")


def test_experts_grouped_runs_each_expert_once_on_its_rows(impl, monkeypatch):
    """Grouped, not dense: one call per expert that some token chose, on exactly its rows."""
    T, X, k = 10, 6, 2
    experts = random_experts(impl, 0, X, 32, 24)
    weights, indices = random_routing(1, T, X, k, hot=4)  # experts 4 and 5: no rows
    calls = []
    original = impl.moe.swiglu_expert
    monkeypatch.setattr(impl.moe, "swiglu_expert", lambda x, *w: calls.append(x.shape[0]) or original(x, *w))
    impl.moe.experts_grouped(mx.zeros((T, 32)), weights, indices, experts)
    want = np.bincount(np.array(indices).ravel(), minlength=X)
    assert sorted(calls) == sorted(int(n) for n in want if n), \
        f"expert calls on {calls} rows; the routing gives {want.tolist()} rows per expert"


@pytest.mark.parametrize("T", [5, 48])  # mlx-lm sorts the pairs by expert from 64 of them (48 tokens x 2)
def test_experts_match_mlx_lm_switch_glu(impl, T):
    from mlx_lm.models.switch_layers import SwitchGLU

    X, E, I, k = 8, 32, 24, 2
    experts = random_experts(impl, 3, X, E, I)
    weights, indices = random_routing(4, T, X, k)
    switch = SwitchGLU(E, I, X)
    switch.gate_proj.weight, switch.up_proj.weight, switch.down_proj.weight = experts.gate, experts.up, experts.down
    x = mx.array(np.random.default_rng(5).standard_normal((T, E)).astype(np.float32))
    want = mx.sum(switch(x, indices) * weights[..., None], axis=-2)  # (T, k, E) weighted, summed over k
    assert_close(impl.moe.experts_grouped(x, weights, indices, experts), want, FP32, f"vs SwitchGLU, T={T}")


# --- quantized experts: the gathered quantized matmul ------------------------------------------


def quantized_experts(X: int, N: int, K: int, bits: int, group: int, dtype, seed: int):
    """(w_q (X, N, K bits / 32), scales, biases (X, N, K / group)) of random experts, mx.quantize's."""
    w = mx.random.normal((X, N, K), key=mx.random.key(seed)) / np.sqrt(K)
    w_q, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    return w_q, scales.astype(dtype), biases.astype(dtype)


@pytest.fixture
def kernel(impl):
    kernels = impl.native.kernels
    if kernels is None or not hasattr(kernels, "gather_quantized_matmul"):
        pytest.fail(f"tiny_llm_kernels is not built, or built before gather_quantized_matmul: {BUILD}")
    return kernels.gather_quantized_matmul


@given(data=st.data())
def test_gather_quantized_matmul_kernel_matches_twin_and_mx(impl, kernel, data):
    bits = data.draw(st.sampled_from([4, 8]), label="bits")
    group = data.draw(st.sampled_from([32, 64, 128]), label="group_size")
    dtype = data.draw(st.sampled_from([mx.float32, mx.float16, mx.bfloat16]), label="dtype")
    X = data.draw(st.integers(1, 6), label="experts")
    M = data.draw(st.integers(1, 40), label="rows (token-expert pairs)")
    N = 8 * data.draw(st.integers(1, 12), label="N / 8")
    K = group * data.draw(st.integers(1, 3), label="K / group")
    ordered = data.draw(st.booleans(), label="rows sorted by expert")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    w_q, scales, biases = quantized_experts(X, N, K, bits, group, dtype, seed)
    g = np.random.default_rng(seed)
    ids = g.integers(0, X, M)
    ids = np.sort(ids) if ordered else ids
    indices = mx.array(ids.astype(np.uint32))
    x = mx.array(g.standard_normal((M, K)).astype(np.float32)).astype(dtype)
    twin = impl.moe.gather_quantized_matmul_mlx(x, w_q, scales, biases, indices, group, bits)
    got = kernel(x, w_q, scales, biases, indices, group, bits)
    what = f"M={M} X={X} N={N} K={K} bits={bits} group={group} {dtype} sorted={ordered}"
    assert got.dtype == dtype and got.shape == (M, N), what
    # Both accumulate in fp32 from the same dequantized values; in fp16/bf16 the output rounds once.
    assert_close(got, twin, BY_DTYPE[str(dtype).removeprefix("mlx.core.")], f"kernel vs twin, {what}")
    # mx.gather_qmm on fp32 inputs (its CPU path accumulates in the inputs' dtype), rounded once at the end.
    f32 = [a.astype(mx.float32) for a in (x, scales, biases)]
    want = mx.gather_qmm(f32[0][:, None, :], w_q, f32[1], f32[2], rhs_indices=indices, transpose=True,
                         group_size=group, bits=bits)[:, 0]  # (M, 1, K) rows, one expert each -> (M, N)
    assert_close(twin, want.astype(dtype), BY_DTYPE[str(dtype).removeprefix("mlx.core.")],
                 f"twin vs mx.gather_qmm, {what}")


def test_gather_quantized_matmul_rows_are_topic_2_2s(impl, kernel):
    """Each row's bits are those the quantized-matmul kernel gives it on its expert's weights alone, and
    a row with index >= X (no expert) is 0, in the twin too."""
    X, N, K = 5, 40, 64
    w_q, scales, biases = quantized_experts(X, N, K, 4, 32, mx.float32, 11)
    ids = np.array([2, 2, 2, 0, 4, 4, 1, 5, 3, 3, 3, 3], np.uint32)  # 5: routed to no expert
    x = mx.array(np.random.default_rng(12).standard_normal((len(ids), K)).astype(np.float32))
    got = np.array(kernel(x, w_q, scales, biases, mx.array(ids), 32, 4))
    for m, e in enumerate(ids):
        if e < X:
            alone = impl.native.kernels.quantized_matmul(x[m:m + 1], w_q[int(e)], scales[int(e)], biases[int(e)], 32, 4)
            assert (got[m] == np.array(alone)[0]).all(), f"row {m} (expert {e}) differs from quantized_matmul's"
    assert (got[7] == 0).all(), "a row routed to no expert is 0"
    twin = impl.moe.gather_quantized_matmul_mlx(x, w_q, scales, biases, mx.array(ids), 32, 4)
    assert (np.array(twin)[7] == 0).all(), "the twin: a row routed to no expert is 0"


BAD_GATHER = {  # case -> (what changes, a word of the message)
    "bits": (dict(bits=3), "bits must be 4 or 8"), "group": (dict(group_size=16), "group_size must be"),
    "2-D w_q": (dict(w_q=0), "3-D uint32"), "x of other K": (dict(x=(4, 32)), "x has K = 32"),
    "x 3-D": (dict(x=(1, 4, 64)), "shape (M, K)"), "x int": (dict(x="int32"), "x must be float32"),
    "scales shape": (dict(scales=1), "scales and biases must be (3, 16, 2)"),
    "indices length": (dict(indices=3), "indices must be a uint32 (M,) = (4,)"),
    "indices int32": (dict(indices="int32"), "indices must be a uint32"),
}


def bad_gather_case(case: str) -> tuple:
    w_q, scales, biases = quantized_experts(3, 16, 64, 4, 32, mx.float32, 0)
    a = dict(x=mx.zeros((4, 64)), w_q=w_q, scales=scales, biases=biases,
             indices=mx.array([0, 1, 2, 0], dtype=mx.uint32), group_size=32, bits=4)
    change, _ = BAD_GATHER[case]
    for k, v in change.items():
        if k == "x":
            a["x"] = mx.zeros(v) if isinstance(v, tuple) else mx.zeros((4, 64), dtype=mx.int32)
        elif k == "w_q":
            a["w_q"] = w_q[0]
        elif k == "scales":
            a["scales"] = scales[:, :, :1]
        elif k == "indices":
            a["indices"] = a["indices"][:v] if isinstance(v, int) else a["indices"].astype(mx.int32)
        else:
            a[k] = v
    return tuple(a.values())


@pytest.mark.parametrize("case", sorted(BAD_GATHER))
def test_gather_twin_and_kernel_reject_the_same_inputs(impl, kernel, case):
    """check_gather_quantized_matmul states the contract; the twin calls it, the kernel checks the same in C++."""
    messages = {}
    for name, f in {"check": impl.moe.check_gather_quantized_matmul, "kernel": kernel,
                    "twin": impl.moe.gather_quantized_matmul_mlx}.items():
        with pytest.raises(ValueError) as e:
            f(*bad_gather_case(case))
        messages[name] = str(e.value)
    assert BAD_GATHER[case][1] in messages["kernel"] and messages["kernel"].startswith("gather_quantized_matmul: "), \
        f"{case}: {messages['kernel']}"
    assert len(set(messages.values())) == 1, f"{case}: the three say different things: {messages}"


def test_quantized_experts_use_the_gathered_kernel(impl, kernel):
    """The MoE block on quantized experts == the twin on the same experts dequantized."""
    X, E, I, T, k = 6, 64, 32, 9, 2
    w = {n: quantized_experts(X, *shape, 4, 32, mx.float32, s)
         for s, (n, shape) in enumerate({"gate": (I, E), "up": (I, E), "down": (E, I)}.items())}
    Q = impl.quantized_weight.QuantizedWeight
    experts = impl.moe.Experts(*(Q(*w[n], 32, 4) for n in ("gate", "up", "down")))
    weights, indices = random_routing(13, T, X, k)
    x = mx.array(np.random.default_rng(14).standard_normal((T, E)).astype(np.float32))
    got = impl.moe.experts_grouped(x, weights, indices, experts)
    assert_close(got, impl.moe.experts_dense_mlx(x, weights, indices, experts), FP32, "quantized experts vs the twin")
    # A GGUF may keep one projection dense (Q6_K is decoded to fp32): the same sums.
    mixed = impl.moe.Experts(experts.gate, experts.up, experts.dense()[2])
    assert_close(impl.moe.experts_grouped(x, weights, indices, mixed), got, FP32, "dense down, quantized gate/up")


# --- the block and the models against transformers -------------------------------------------


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_moe_block_matches_transformers(impl, tiny, kind):
    ref, _, loaded = tiny(kind)
    x = np.random.default_rng(6).standard_normal((2, 9, 64)).astype(np.float32)
    block = loaded.model.layers[0].mlp
    assert isinstance(block, impl.moe.SparseMoeBlock), f"{kind}: layer 0 is sparse, got {type(block).__name__}"
    with torch.no_grad():
        want = ref.model.layers[0].mlp(torch.tensor(x))
    assert_close(block(mx.array(x)), want, FP32, f"{kind} sparse MoE block")


@pytest.mark.parametrize("kind", sorted(TINY_MOE))
def test_tiny_moe_logits_match_transformers(impl, tiny, kind):
    ref, _, loaded = tiny(kind)
    ids = np.random.default_rng(0).integers(0, 320, size=(2, 13))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits
    assert_close(loaded.model(mx.array(ids)), want, MODEL_FP32, f"{kind} logits")
    sparse = [type(layer.mlp).__name__ for layer in loaded.model.layers]
    want_sparse = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in ref.model.layers]
    assert [s == "SparseMoeBlock" for s in sparse] == want_sparse, f"{kind}: sparse layers {sparse}"


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_tiny_moe_greedy_tokens_match_transformers(tiny, kind):
    ref, _, loaded = tiny(kind)
    ids = np.random.default_rng(5).integers(0, 320, size=12).tolist()  # all 10 steps have clear gaps (measured)
    x = torch.tensor([ids])
    out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, output_scores=True,
                       return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    want = out.sequences[0, len(ids):].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]

    def greedy():  # the whole sequence through the model at every step (week 1's loop)
        seq = list(ids)
        while True:
            seq.append(int(mx.argmax(loaded.model(mx.array([seq]))[0, -1]).item()))
            yield seq[-1]

    assert_greedy_tokens(greedy(), want, gaps, f"{kind}: greedy tokens vs transformers")


# --- loading: GGUF's stacked experts ----------------------------------------------------------


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_moe_gguf_loads_to_the_same_logits(impl, tiny, tmp_path, kind):
    """llama.cpp's tensors: ffn_gate_inp (the router), ffn_{gate,up,down}_exps (X, out, in), Qwen2-MoE's
    ffn_*_shexp and ffn_gate_inp_shexp (a vector); Mixtral as llama with expert_count, Q/K permuted."""
    ref, _, folder_model = tiny(kind)
    ids = mx.array(np.random.default_rng(2).integers(0, 320, size=(1, 17)))
    with torch.no_grad():
        want = ref(torch.tensor(np.array(ids))).logits
    f32 = tiny_gguf(ref, tmp_path / f"{kind}.gguf")
    for quantized in (False, True):
        loaded = impl.loader.load_model(f32, quantized=quantized)
        a, b = loaded.args, folder_model.args
        got = (a.model_type, a.num_experts, a.num_experts_per_tok, a.moe_intermediate_size, a.norm_topk_prob)
        assert got == (b.model_type, b.num_experts, b.num_experts_per_tok, b.moe_intermediate_size,
                       b.norm_topk_prob), f"{kind}: GGUF's MoE metadata {got}"
        assert_close(loaded.model(ids), want, MODEL_FP32, f"{kind} from an F32 GGUF (quantized={quantized})")
    # Quantized experts kept quantized (stacked affine triples) vs the same file dequantized at load:
    # Q8_0 as mx.load reads it, Q5_0 through impl's own GGUF decoding.
    for qtype in ("Q8_0", "Q5_0"):
        path = tiny_gguf(ref, tmp_path / f"{kind}-{qtype}.gguf", qtype)
        kept = impl.loader.load_model(path, quantized=True)
        experts = kept.model.layers[0].mlp.experts
        assert not isinstance(experts.gate, mx.array), f"{kind}: quantized=True keeps {qtype} experts quantized"
        # The same dequantized values multiplied in fp32 (the kernel or the twin): summation order only.
        assert_close(kept.model(ids), impl.loader.load_model(path, quantized=False).model(ids), MODEL_FP32,
                     f"{kind} {qtype} experts kept quantized vs dequantized")


def test_hf_folder_experts_are_stacked(impl, tiny):
    """Mixtral's block_sparse_moe.experts.E.w1/w3/w2 and Qwen's mlp.experts.E.*_proj become one (X, out, in)
    tensor per projection, in expert order."""
    ref, _, loaded = tiny("mixtral")
    experts = loaded.model.layers[1].mlp.experts
    gate_up = ref.model.layers[1].mlp.experts.gate_up_proj.detach()  # transformers 5: (X, 2I, E)
    I = gate_up.shape[1] // 2
    assert_close(experts.gate, gate_up[:, :I], FP32, "stacked gate (w1)")
    assert_close(experts.up, gate_up[:, I:], FP32, "stacked up (w3)")
    assert_close(experts.down, ref.model.layers[1].mlp.experts.down_proj.detach(), FP32, "stacked down (w2)")


# --- the engine: batched == alone ---------------------------------------------------------------


@pytest.mark.parametrize("source", ["hf-folder", "q8-gguf"])
def test_moe_model_in_the_engine_batched_equals_alone(impl, tiny, tmp_path, source):
    """A tiny Qwen2-MoE (shared expert and all), dense fp32 from its folder, or from a Q8_0 GGUF with the
    experts kept quantized (the gathered quantized matmul); greedy tokens == transformers' (the folder)."""
    ref, _, loaded = tiny("qwen2-moe")
    if source == "q8-gguf":
        loaded = impl.loader.load_model(tiny_gguf(ref, tmp_path / "q8.gguf", "Q8_0"), quantized=True)
    P = impl.engine.SamplingParams
    requests = [Request(str(i), ids, P(max_tokens=6, logprobs=5, ignore_eos=True), join_step=[0, 0, 1, 3][i])
                for i, ids in enumerate(random_prompts(7, 4, 1, 30, 320))]

    def engine():  # topic 2.6's own engine: contiguous caches, whole prefills
        return impl.engine.LLMEngine(loaded.model, None, paged=False, enable_chunked_prefill=False, log=False)

    batched = run(engine(), requests)
    compared = 0
    for r in requests:
        alone = run(engine(), [Request(r.request_id, r.prompt_token_ids, r.params)])[r.request_id]
        got = batched[r.request_id]
        assert got.token_ids == alone.token_ids, f"request {r.request_id}: batched {got.token_ids}, alone {alone.token_ids}"
        # Routing is per token, so only which rows share an expert's matmul changes with the batch:
        # dense BLAS's summation order (spec/engine_cases.py).
        assert_same_logprobs(got.logprobs, alone.logprobs, tol=DENSE_BATCH, what=f"request {r.request_id}")
        if source == "hf-folder":  # the same weights as transformers
            compared += assert_transformers_greedy(ref, r.prompt_token_ids, got.token_ids, f"request {r.request_id}")
    assert source != "hf-folder" or compared >= 2 * len(requests), \
        f"only {compared} tokens had a clear top-2 gap: a vacuous check"
