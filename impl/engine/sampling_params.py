"""What a request asks for (topic 2.6): vLLM's SamplingParams, checked when the request is added."""

from __future__ import annotations

from dataclasses import dataclass, field

from impl.errors import TinyLLMError
from impl.sampler import make_sampler, validate_sampling


@dataclass
class SamplingParams:
    """Per-request sampling and stopping, in vLLM's names. temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None  # None: a random one
    max_tokens: int = 16  # vLLM's default
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the text
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's EOS
    ignore_eos: bool = False  # benchmarks: run to max_tokens
    logprobs: int | None = None  # return this many top log-probabilities per output token (and the chosen one's)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    def validate(self) -> None:
        """One-line TinyLLMError for a value out of range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise TinyLLMError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise TinyLLMError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise TinyLLMError(f"stop must be non-empty strings, got {self.stop!r}")
        try:
            validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)
        except (ValueError, TypeError) as e:
            raise TinyLLMError(str(e)) from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampler(self):
        """A sampler (logits (1, V) -> (1,)) with its own key: a seeded request draws the same
        tokens whatever else is in the batch."""
        return make_sampler(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)
