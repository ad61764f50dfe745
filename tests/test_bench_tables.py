"""The benchmark's kernel table (bench.single.kernel_table): the M = 1 limit columns are the
fastest one MLX op could be, its weight bytes at the bandwidth plus MLX's cost of an op."""

from bench.single import kernel_table


def _row(impl: str, M: int, ms: float, nbytes: float) -> dict:
    return {"kernel": "quantized_matmul", "impl": impl, "what": "q/o proj", "K": 576, "N": 576, "bits": 4,
            "M": M, "ms": ms, "gflops": 2 * M * 576 * 576 / (ms / 1e3) / 1e9, "gbs": nbytes / (ms / 1e3) / 1e9,
            "vs_mx": None}


def test_the_m1_limit_is_the_bytes_at_the_bandwidth_plus_one_op():
    nbytes, bandwidth, op_us = 200e3, 40.0, 5.0
    rows = [_row("kernel", 1, 0.02, nbytes), _row("mx.qmm", 1, 0.30, nbytes), _row("twin", 1, 0.5, nbytes),
            _row("kernel", 16, 0.08, nbytes), _row("mx.qmm", 16, 4.0, nbytes), _row("twin", 16, 0.6, nbytes)]
    table = kernel_table({"fp32_matmul_gflops": 100.0, "op_overhead_us": op_us, "rows": rows}, bandwidth)
    line_m1, line_m16 = (ln for ln in table.splitlines() if ln.startswith("| q/o proj"))
    read_ms = nbytes / (bandwidth * 1e9) * 1e3  # 5 us of reading
    limit_ms = read_ms + op_us / 1e3  # + 5 us of MLX: 10 us
    cells = [c.strip() for c in line_m1.strip("|").split("|")]
    assert cells[-2:] == [f"{0.30 / limit_ms:.0f}x", f"{read_ms / limit_ms:.0%}"], line_m1  # 30x, 50%
    assert [c.strip() for c in line_m16.strip("|").split("|")][-2:] == ["-", "-"], "M = 16 has no such limit"


def test_a_failed_kernel_run_is_one_line():
    assert kernel_table({"error": "tiny_llm_kernels is not built"}, 40.0) == "Kernels: tiny_llm_kernels is not built"
