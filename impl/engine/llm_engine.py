"""The engine (topic 2.6): requests in, tokens out, many at a time. `step()` is three lines:
schedule, run, postprocess (nano-vllm's loop). Requests join (`add_request`) and leave
(finished, or `abort_request`) between steps; their KV cache is freed at once.

The KV cache is paged by default (topic 3.1: KVPool and BlockManager, prefix caching 3.2);
`paged=False` gives each sequence week 2.1's contiguous cache (topic 2.6's own).
`speculative_config` drafts tokens by n-gram prompt lookup or a draft model and verifies them in the
step's one model call (topic 3.4: impl/engine/spec_decode.py).
"""

from __future__ import annotations

import json
import sys
import time

import mlx.core as mx

from impl.engine.contiguous_cache import ContiguousKVCache
from impl.engine.model_runner import LaunchedStep, ModelRunner, top_logprobs
from impl.engine.outputs import IncrementalText, RequestMetrics, RequestOutput
from impl.engine.sampling_params import SamplingParams
from impl.engine.scheduler import ScheduledBatch, Scheduler
from impl.engine.sequence import PENDING, Sequence, SequenceStatus
from impl.engine.spec_decode import SpecDecoder, SpeculativeConfig
from impl.errors import TinyLLMError
from impl.generate import _eos_ids

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # bytes for keys and values when the user sets no budget


class LLMEngine:
    """Continuous batching over one model. add_request, step, abort_request; `stats()` for metrics."""

    def __init__(self, model, tokenizer=None, *, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 enable_chunked_prefill: bool = True, paged: bool = True, block_size: int = 16,
                 kv_cache_memory: int | None = None, kv_cache_dtype: mx.Dtype | None = None,
                 enable_prefix_caching: bool = True, use_kernels: bool = True, eos_token_ids=None,
                 trace: str | None = None, log=None, speculative_config=None):
        """model: an impl Model; tokenizer: for text and stop strings (None: token ids only).
        kv_cache_memory: bytes for the KV cache (default 1 GiB), kv_cache_dtype: what it stores
        (default the activations' dtype). log: where the start-up line goes (default stderr; False: nowhere).
        speculative_config: a SpeculativeConfig, or a dict (or JSON) of its fields, e.g.
        {"method": "ngram", "num_speculative_tokens": 4} or {"method": "draft_model", "model": "qwen2.5-coder-0.5b"},
        speculative decoding's (spec_decode.py); a one-line ValueError if bad."""
        self.model, self.tokenizer, self.args = model, tokenizer, model.args
        self.max_model_len = self.args.max_position_embeddings
        spec_config = None if speculative_config is None else SpeculativeConfig.of(speculative_config)  # checked first
        if spec_config is not None and not paged:
            raise ValueError("speculative decoding rewinds the paged KV cache; drop paged=False")
        self.num_draft_tokens = self.num_accepted_tokens = 0  # over all requests (topic 3.4)
        dtype = kv_cache_dtype or model.embed_tokens(mx.array([[0]])).dtype  # default: the activations'
        budget = DEFAULT_KV_CACHE_MEMORY if kv_cache_memory is None else kv_cache_memory
        if paged:
            from impl.engine.kv_pool import KVPool, num_blocks_for_budget

            num_blocks = num_blocks_for_budget(self.args, block_size, dtype, budget)
            self.kv_pool = views = KVPool(self.args, num_blocks, block_size, dtype, enable_prefix_caching, use_kernels)
            self.kv, self.kv_tokens = self.kv_pool.block_manager, num_blocks * block_size
        else:
            self.kv_pool, self.kv = None, ContiguousKVCache.for_budget(self.args, budget, kv_cache_dtype)
            self.kv_tokens, views = self.kv.capacity, self.kv
        self.spec = None if spec_config is None else SpecDecoder(spec_config, self.args, self.kv_tokens)  # topic 3.4
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self.runner = ModelRunner(model, views)
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else _eos_ids(tokenizer, self.args))
        self.requests: dict[str, tuple[Sequence, IncrementalText]] = {}
        self.num_steps = self.num_preemptions = 0
        self.in_flight: LaunchedStep | None = None  # the step launched last, its tokens not yet read
        self.ending: set[str] = set()  # requests ended at launch (their length), their last token in flight
        self.trace = open(trace, "w", encoding="utf-8") if trace else None  # noqa: SIM115  (closed by close())
        if log is not False:
            kind = f"{self.kv.num_blocks} blocks of {block_size} positions" if paged else "contiguous"
            print(f"[KV cache: {kind}, {self.kv_tokens} tokens, {budget / 2**20:.0f} MiB budget,"
                  f" {str(dtype).removeprefix('mlx.core.')}]", file=log or sys.stderr)
            if self.spec is not None:
                print(self.spec.describe(), file=log or sys.stderr)

    # ---------------------------------------------------------------- requests

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    prompt: str | None = None, arrival_time: float | None = None) -> None:
        """Queue a request; a one-line TinyLLMError if it cannot be served (nothing else changes)."""
        params = params or SamplingParams()
        params.validate()
        if request_id in self.requests:
            raise TinyLLMError(f"request id {request_id!r} is already in use")
        n = len(prompt_token_ids)
        if n == 0:
            raise TinyLLMError("the prompt is empty")
        if n >= self.max_model_len:
            raise TinyLLMError(f"the prompt is {n} tokens; the model's context is {self.max_model_len} tokens")
        if n + 1 > self.kv_tokens:
            raise TinyLLMError(f"the prompt is {n} tokens; the whole KV cache holds {self.kv_tokens}")
        if not self.scheduler.enable_chunked_prefill and n > self.scheduler.max_num_batched_tokens:
            raise TinyLLMError(f"the prompt is {n} tokens; without chunked prefill a step computes at most"
                               f" {self.scheduler.max_num_batched_tokens}")
        vocab = self.args.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise TinyLLMError(f"prompt token ids must be integers in [0, {vocab})")
        seq = Sequence(request_id, prompt_token_ids, params, arrival_time)
        self.requests[request_id] = (seq, IncrementalText(self.tokenizer, params.stop))
        seq.prompt = prompt
        self.scheduler.add(seq)
        self._trace(event="add", step=self.num_steps, request_id=request_id, prompt_tokens=n,
                    max_tokens=params.max_tokens)

    def abort_request(self, request_id: str) -> None:
        """End a request between steps; its blocks are freed at once. Unknown ids are ignored."""
        if request_id in self.requests:
            seq, _ = self.requests.pop(request_id)
            self.ending.discard(request_id)
            self.scheduler.finish(seq, "abort")
            if self.spec is not None:
                self.spec.release(self.scheduler.running)  # its draft model's cache, if any
            self._trace(event="finish", step=self.num_steps, request_id=request_id, reason="abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self.in_flight is not None

    # ---------------------------------------------------------------- the loop

    def step(self) -> list[RequestOutput]:
        """One step: schedule, run, postprocess. The run is launched, not awaited: the step
        before it, still computing meanwhile, is the one postprocessed, so building this step's
        graph overlaps that step's compute. Returns the requests that got tokens or finished.
        Speculating (spec_decode.py), drafts need every token known: each step is proposed, run and
        postprocessed in turn, with nothing in flight."""
        if self.spec is not None:
            self.propose()
        batch = self.scheduler.schedule()
        launched = self.launch(batch) if batch else None
        outputs = self.postprocess(self.in_flight) if self.in_flight else []
        if self.spec is not None:
            if launched is not None:
                outputs, launched = outputs + self.postprocess(launched), None
            self.spec.release(self.scheduler.running)  # draft caches of the finished and preempted
        self.in_flight = launched
        if not batch and not launched and self.scheduler.waiting and not self.scheduler.running:
            outputs.append(self._stuck())
        self.num_steps += 1
        return outputs

    def propose(self) -> None:
        """Speculative decoding (topic 3.4): drafts for each running sequence that decodes (its only
        token to compute is its last), none for one still prefilling."""
        for seq in self.scheduler.running:
            decoding = seq.num_tokens - seq.num_computed_tokens == 1
            seq.spec_token_ids = self.spec.propose(seq) if decoding else []

    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Start the step's compute and count its tokens as computed; each sequence that samples
        holds PENDING for its token until postprocess. One that reaches its length ends now."""
        step = self.runner.launch(batch, self.in_flight)
        for seq, n in batch.scheduled:
            seq.num_computed_tokens += n
        self.num_preemptions += len(batch.preempted)
        self._write_trace(batch)
        for seq in step.sampling:
            step.positions.append(seq.num_tokens)
            seq.append_token(PENDING)
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                self.scheduler.finish(seq, "length")  # no step after this one: its blocks go at once
                step.ending.add(seq.request_id)
                self.ending.add(seq.request_id)
        return step

    def postprocess(self, step: LaunchedStep) -> list[RequestOutput]:
        """The launched step's tokens (waiting for them): fill them in, stream their text, finish
        what stops, and hash the blocks now full for the prefix cache."""
        tokens = step.tokens.tolist() if step.tokens is not None else []
        now, outputs = time.perf_counter(), []
        for i, seq in enumerate(step.sampling):
            gone = seq.request_id not in self.requests or (seq.is_finished and seq.request_id not in self.ending)
            if gone:  # aborted, or stopped by the step before: this token was computed past its end
                continue
            ending = seq.request_id in step.ending
            if seq.spec_token_ids:  # the drafts the target agrees with, then its own token
                new = self.verify(step, i, seq)
                ending = seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len
            else:
                new = [tokens[i]]
                seq.token_ids[step.positions[i]] = tokens[i]
                if i in step.logprobs:
                    ids, values = step.logprobs[i]
                    seq.logprobs.append(dict(zip(ids.tolist(), values.tolist(), strict=True)))
            outputs.append(self._add_tokens(seq, new, now, ending))
        if self.kv.enable_prefix_caching:
            for seq, _ in step.batch.scheduled:
                if seq.status == SequenceStatus.RUNNING:
                    self.kv.cache_full_blocks(seq)
        return outputs

    def verify(self, step: LaunchedStep, i: int, seq: Sequence) -> list[int]:
        """Speculative decoding (topic 3.4): the tokens sampling sequence i of the step gains (its
        accepted drafts, then the target's token), in place of its PENDING; its cache rewound past
        the rejected drafts."""
        k, r = len(seq.spec_token_ids), step.first_rows[i]
        rows = step.logits[r:r + 1 + k]  # (1 + k, V): at [last, d1 .. dk]
        new = self.spec.verify(seq, rows)
        self.num_draft_tokens += k
        self.num_accepted_tokens += len(new) - 1
        seq.spec_token_ids = []
        seq.token_ids[step.positions[i]:] = new  # nothing after its PENDING: no step is in flight
        self.kv.rewind(seq, seq.num_computed_tokens - (k + 1 - len(new)))  # the last new token is not computed
        if seq.params.logprobs is not None:
            for j, token in enumerate(new):
                ids, values = top_logprobs(rows[j], mx.array(token), seq.params.logprobs)
                seq.logprobs.append(dict(zip(ids.tolist(), values.tolist(), strict=True)))
        return new

    def _add_tokens(self, seq: Sequence, tokens: list[int], now: float, ending: bool) -> RequestOutput:
        """Stream tokens (several when drafts were accepted); the first that stops the request
        ends it, and those after it are dropped."""
        seq.first_token_time = seq.first_token_time or now
        p, text, reason, stopped = seq.params, "", None, False
        for j, token in enumerate(tokens):
            if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
                reason = "stop"  # the stop token's own text is not output
            else:
                piece, stopped = self.requests[seq.request_id][1].add(token)
                text += piece
                reason = "stop" if stopped else "length" if ending and j == len(tokens) - 1 else None
            if reason:
                dropped = len(tokens) - j - 1
                if dropped:
                    del seq.token_ids[-dropped:]
                    if p.logprobs is not None:
                        del seq.logprobs[-dropped:]
                tokens = tokens[:j + 1]
                text += self._finish(seq, reason, now, stopped)
                break
        return self._output(seq, text, tokens)

    def _finish(self, seq: Sequence, reason: str, now: float, stopped: bool = False) -> str:
        if seq.is_finished:  # ended at launch, at its length; a stop token or string says "stop"
            seq.finish_reason = reason
            self.ending.discard(seq.request_id)
        else:
            self.scheduler.finish(seq, reason)
        if seq.token_ids[-1] == PENDING:  # scheduled once more before it stopped: that token is dropped
            seq.token_ids.pop()
        self._trace(event="finish", step=self.num_steps, request_id=seq.request_id, reason=reason)
        seq.finished_time = now
        return "" if stopped else self.requests[seq.request_id][1].finish()

    def _stuck(self) -> RequestOutput:
        """A preempted sequence that outgrew the whole KV cache: it ends, as out of length."""
        seq = self.scheduler.waiting[0]
        text = self._finish(seq, "length", time.perf_counter())
        return self._output(seq, text, [])

    def _output(self, seq: Sequence, new_text: str, new_tokens: list[int]) -> RequestOutput:
        full = self.requests[seq.request_id][1].text
        finished = seq.is_finished and seq.request_id not in self.ending  # not while its last token is in flight
        metrics = RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finished_time, len(seq.output_token_ids),
                                 seq.num_draft_tokens, seq.num_accepted_tokens)
        out = RequestOutput(seq.request_id, seq.prompt, seq.token_ids[:seq.num_prompt_tokens], text=full,
                            token_ids=seq.output_token_ids, new_text=new_text, new_token_ids=new_tokens,
                            finished=finished, finish_reason=seq.finish_reason if finished else None,
                            num_cached_tokens=seq.num_cached_tokens, metrics=metrics,
                            logprobs=seq.logprobs if seq.params.logprobs is not None else None)
        if finished:
            self.requests.pop(seq.request_id)
        return out

    # ---------------------------------------------------------------- observing

    def stats(self) -> dict:
        """Requests running and waiting, KV blocks used and free, the prefix cache's hit rate and
        token counts, preemptions and steps so far; speculating, the drafts checked and accepted."""
        free = self.kv.num_free_blocks
        total = self.kv.num_blocks if self.kv_pool else self.kv_tokens
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "num_blocks": total, "blocks_free": free, "blocks_used": total - free,
                "prefix_cache_hit_rate": getattr(self.kv, "prefix_cache_hit_rate", 0.0),
                "prefix_cache_queried_tokens": getattr(self.kv, "num_queried_tokens", 0),
                "prefix_cache_hit_tokens": getattr(self.kv, "num_hit_tokens", 0),
                "preemptions": self.num_preemptions, "steps": self.num_steps,
                **(self.spec_stats() if self.spec is not None else {})}

    def spec_stats(self) -> dict:
        """Speculative decoding's counts over all requests so far (topic 3.4)."""
        drafted, accepted = self.num_draft_tokens, self.num_accepted_tokens
        return {"spec_num_draft_tokens": drafted, "spec_num_accepted_tokens": accepted,
                "spec_acceptance_rate": accepted / drafted if drafted else 0.0,
                "spec_draft_cache_positions": getattr(self.spec.drafter, "num_positions", 0)}

    def _write_trace(self, batch: ScheduledBatch) -> None:
        if self.trace is not None:
            self._trace(event="step", step=self.num_steps,
                        scheduled=[[s.request_id, n, s.num_cached_tokens] for s, n in batch.scheduled],
                        preempted=[s.request_id for s in batch.preempted], **self.stats(),
                        max_num_seqs=self.scheduler.max_num_seqs,
                        max_num_batched_tokens=self.scheduler.max_num_batched_tokens)

    def _trace(self, **record) -> None:
        if self.trace is not None:
            self.trace.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.trace:
            self.trace.close()
            self.trace = None
