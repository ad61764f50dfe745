"""impl.moe.Experts.expert: one expert's weights keep the stacked weights' format and matmul precision
(a QuantizedWeight set to precision "int8" for the engine stays so per expert)."""

import impl  # noqa: F401  (the kernels and the BLAS fix before mlx)

# isort: split
import mlx.core as mx

from impl.moe import Experts
from impl.quantized_weight import QuantizedWeight


def test_an_expert_keeps_its_weights_precision():
    X, N, K = 3, 16, 64
    w_q, scales, biases = mx.quantize(mx.random.normal((X, N, K), key=mx.random.key(0)), group_size=32, bits=4)
    stacked = QuantizedWeight(w_q, scales, biases, 32, 4, "int8")
    for e, (gate, up, down) in enumerate(Experts(stacked, stacked, stacked).expert(e) for e in range(X)):
        for w in (gate, up, down):
            assert w.precision == "int8" and (w.group_size, w.bits) == (32, 4)
            assert mx.array_equal(w.w_q, w_q[e]) and mx.array_equal(w.scales, scales[e])
