"""A request's state in the engine (topic 2.6): its tokens, how many are in the KV cache,
its block table, its status. nano-vllm's Sequence, with vLLM's names."""

from __future__ import annotations

import time
from enum import Enum, auto

from impl.engine.sampling_params import SamplingParams

PENDING = -1  # a sampled token still being computed (impl/engine/model_runner.py)


class SequenceStatus(Enum):
    WAITING = auto()  # not yet admitted, or preempted (its blocks freed; recomputed when readmitted)
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: prompt + generated tokens; `num_computed_tokens` of them have their keys and
    values in the cache (those from prefix-cache hits are `num_cached_tokens`)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt: str | None = None  # the text, when the request came as text
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []  # block ids, in position order
        self.num_computed_tokens = 0  # positions whose K/V are in the cache
        self.num_cached_tokens = 0  # of those, found in the prefix cache when last admitted
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.num_preemptions = 0
        self.finish_reason: str | None = None  # "stop", "length", "abort"
        self.sampler = params.sampler()
        # Speculative decoding (topic 3.4): this step's drafts (after token_ids; not in the cache until
        # verified) and, drafted by a sampling draft model, their (k, V) distributions q; the request's
        # counts, and the key its drafts and rejection sampling draw with (impl/engine/spec_decode.py).
        self.spec_token_ids: list[int] = []
        self.spec_draft_probs = None
        self.num_draft_tokens = self.num_accepted_tokens = 0
        self.spec_key = None
        self.logprobs: list[dict[int, float]] = []  # per output token, when params.logprobs asks
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens known so far (not one still PENDING)."""
        out = self.token_ids[self.num_prompt_tokens:]
        return out[:-1] if out and out[-1] == PENDING else out

    @property
    def is_prefill(self) -> bool:
        """More than one token is still to be computed (a prompt, or a preempted sequence)."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
