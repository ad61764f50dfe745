"""`python -m bench [--quick] ...`: the batch-1 benchmark (bench.single);
`python -m bench --serving [--quick] ...`: the serving benchmark (bench.serving);
`python -m bench --online [--quick] ...`: the online serving benchmark (bench.online);
`python -m bench --moe [--quick]`: mixture of experts, layer and kernel (bench.moe);
`python -m bench --train [--quick]`: training steps against PyTorch (bench.train);
`python -m bench --long-context [--quick]`: attention sinks, perplexity by window (bench.long_context);
`python -m bench --speculative [--quick]`: speculative decoding, n-gram and draft model (bench.speculative)."""

from __future__ import annotations

import importlib
import sys

MODES = {  # flag -> its module of bench/, looked for in this order; no flag: bench.single
    "--train": "train",
    "--long-context": "long_context",
    "--speculative": "speculative",
    "--moe": "moe",
    "--online": "online",
    "--serving": "serving",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, module in MODES.items():
        if flag in argv:
            return importlib.import_module(f"bench.{module}").main([a for a in argv if a != flag])
    return importlib.import_module("bench.single").main(argv)


if __name__ == "__main__":
    sys.exit(main())
