"""What the engine gives back per request (topic 2.6): vLLM's RequestOutput, with the text
decoded as it streams and cut at a stop string."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from impl.generate import _held_back
from impl.tokenizer import StreamingDetokenizer


@dataclass
class RequestMetrics:
    """Times (time.perf_counter seconds) of a request's life."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_output_tokens: int = 0
    num_draft_tokens: int = 0  # speculative decoding (topic 3.4): drafts the target checked
    num_accepted_tokens: int = 0  # of those, kept

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted; None when nothing was drafted."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        if self.finished_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class RequestOutput:
    """A request's output so far: all of it (text, token_ids) and what this step added."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort"
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    logprobs: list[dict[int, float]] | None = None  # per output token, when SamplingParams.logprobs asks
    metrics: RequestMetrics | None = None


class IncrementalText:
    """A request's text as tokens arrive: complete UTF-8 only, held back while it may be the
    start of a stop string, cut before a stop string once one appears."""

    def __init__(self, tokenizer, stop: Seq[str]):
        self.detok = StreamingDetokenizer(tokenizer) if tokenizer is not None else None
        self.stop, self.pending, self.text = list(stop), "", ""

    def add(self, token: int) -> tuple[str, bool]:
        """Feed a token; returns (text now ready, whether a stop string ended the output)."""
        if self.detok is None:
            return "", False
        self.pending += self.detok.add_token(token)
        cut = min((self.pending.find(s) for s in self.stop if s in self.pending), default=-1)
        if cut >= 0:
            return self._emit(self.pending[:cut], rest=""), True
        ready = len(self.pending) - _held_back(self.pending, self.stop)
        return self._emit(self.pending[:ready], rest=self.pending[ready:]), False

    def finish(self) -> str:
        """The text held back, once the request ended without a stop string."""
        if self.detok is None:
            return ""
        return self._emit(self.pending + self.detok.finalize(), rest="")

    def _emit(self, ready: str, rest: str) -> str:
        self.text += ready
        self.pending = rest
        return ready
