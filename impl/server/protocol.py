"""The request bodies the server accepts (OpenAI's, with vLLM's extra sampling fields) and the
error body it answers with. Bodies are parsed strictly: `"max_tokens": "10"` is a wrong type,
as OpenAI has it, not a number."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from impl.engine.sampling_params import SamplingParams

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_PROMPTS = 64  # prompts in one /v1/completions body


class APIError(Exception):
    """An error the client caused (or a refusal), answered as OpenAI does:
    HTTP `status` with {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    # Unknown fields are ignored, as vLLM and OpenAI do (clients send `user`, `metadata`, ...);
    # known ones are typed strictly.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's: -1 or 0 is off
    min_p: float = Field(0.0, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's
    ignore_eos: bool = False  # vLLM's
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def check(self) -> None:
        """What the schema cannot say: unsupported options, and stop strings' count."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise APIError(f"{name} is not supported by this server (only 0)", param=name)
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise APIError(f"stop: at most {MAX_STOP} non-empty strings", param="stop")
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        """The engine's SamplingParams for choice number `choice` (a seeded request's choices
        each draw from seed + choice)."""
        seed = None if self.seed is None else (self.seed + choice) % 2**64
        return SamplingParams(temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
                              min_p=self.min_p, seed=seed, max_tokens=max_tokens,
                              stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                              stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                              logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI, still sent by many clients
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise APIError("echo is not supported by this server", param="echo")
        if self.suffix:
            raise APIError("suffix is not supported by this server", param="suffix")
        if self.best_of not in (None, self.n):
            raise APIError("best_of is not supported by this server (only equal to n)", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids."""
        p = self.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise APIError("prompt must not be empty", param="prompt")
        if len(prompts) * self.n > MAX_PROMPTS:
            raise APIError(f"at most {MAX_PROMPTS} prompts times n in one request", param="prompt")
        return prompts


# What a field that takes one of several shapes expects, said once instead of per shape.
SHAPES = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
          "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
          "stop": "a string or a list of strings"}
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\])$")


def parse(model: type[_Body], raw: bytes) -> _Body:
    """A body from JSON bytes, or APIError(400) naming the first bad field."""
    try:
        body = model.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise APIError(f"the body is not valid JSON: {first['msg']}", code="json_invalid") from None
        path = [str(x) for x in first["loc"]]
        kept = [x for x in path if not _UNION_TAG.match(x)]
        loc = ".".join(kept)
        message = first["msg"]
        if len(kept) < len(path) and kept[-1] in SHAPES:  # one of a union's shapes failed: name them all
            message = f"must be {SHAPES[kept[-1]]}"
        where = f"{loc}: " if loc else "the body: "
        raise APIError(f"{where}{message}", param=loc or None, code=first["type"]) from None
    body.check()
    return body
