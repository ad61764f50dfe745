"""`python -m bench [--quick] ...`: the batch-1 benchmark (bench.single);
`python -m bench --serving [--quick] ...`: the serving benchmark (bench.serving);
`python -m bench --online [--quick] ...`: the online serving benchmark (bench.online);
`python -m bench --moe [--quick]`: mixture of experts, layer and kernel (bench.moe);
`python -m bench --train [--quick]`: training steps against PyTorch (bench.train);
`python -m bench --long-context [--quick]`: attention sinks, perplexity by window (bench.long_context);
`python -m bench --speculative [--quick]`: speculative decoding, n-gram and draft model (bench.speculative)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--train" in argv:
        from bench import train

        return train.main([a for a in argv if a != "--train"])
    if "--long-context" in argv:
        from bench import long_context

        return long_context.main([a for a in argv if a != "--long-context"])
    if "--speculative" in argv:
        from bench import speculative

        return speculative.main([a for a in argv if a != "--speculative"])
    if "--moe" in argv:
        from bench import moe

        return moe.main([a for a in argv if a != "--moe"])
    if "--online" in argv:
        from bench import online

        return online.main([a for a in argv if a != "--online"])
    if "--serving" in argv:
        from bench import serving

        return serving.main([a for a in argv if a != "--serving"])
    from bench import single

    return single.main(argv)


if __name__ == "__main__":
    sys.exit(main())
