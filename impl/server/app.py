"""The routes: OpenAI's /v1/models, /v1/chat/completions and /v1/completions (streamed as
server-sent events, or not), /health, /metrics and the chat page at /.

A request is parsed (protocol), turned into token ids and SamplingParams, added to the engine
once per choice, and answered from the choices' outputs as they arrive. A client that goes
away aborts its choices: their KV blocks are freed between two steps.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from impl.engine.outputs import RequestOutput
from impl.errors import TinyLLMError
from impl.server.async_engine import AsyncEngine, EngineStopped
from impl.server.metrics import Metrics
from impl.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from impl.tokenizer import encode_prompt

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 1 << 20  # bytes: a prompt that fills the context is far smaller


@dataclass
class ServedModel:
    """What the routes serve: a loaded model (impl.loader.LoadedModel), its engine on a thread,
    and the server's settings."""

    name: str
    loaded: object
    engine: AsyncEngine
    metrics: Metrics
    max_model_len: int
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def build_app(served: ServedModel) -> FastAPI:
    """The FastAPI app over a served model; its engine thread runs while the app does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # the engine's thread was started with the model's load
        yield
        served.engine.stop()

    app = FastAPI(title="tiny-llm spec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=served.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(e.detail), e.status_code, kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug: still an OpenAI-style body
        return JSONResponse(APIError(f"internal error: {type(e).__name__}: {e}", 500, "server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        """200 while the engine's thread runs."""
        if served.engine.error is not None:
            raise APIError(f"the engine stopped: {served.engine.error}", 503, "server_error")
        return {}

    @app.get("/metrics")
    async def metrics():
        """Prometheus' text format."""
        return Response(served.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def chat_page():
        """The chat page."""
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models")
    async def models(request: Request):
        """The one model this server serves."""
        _authorize(served, request)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "tiny-llm-spec", "max_model_len": served.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """OpenAI's chat completions, on the model's chat template."""
        _authorize(served, request)
        body = parse(ChatCompletionRequest, await request.body())
        _check_model(served, body.model)
        prompt = await asyncio.to_thread(_chat_prompt_ids, served, body)
        max_tokens = _max_tokens(served, [prompt], body.max_completion_tokens or body.max_tokens, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _respond(served, request, body, "chat.completion", [prompt], max_tokens, logprobs)

    @app.post("/v1/completions")
    async def completions(request: Request):
        """OpenAI's (legacy) text completions: a prompt as text or token ids, no template."""
        _authorize(served, request)
        body = parse(CompletionRequest, await request.body())
        _check_model(served, body.model)
        prompts = await asyncio.to_thread(_completion_prompt_ids, served, body)
        max_tokens = _max_tokens(served, prompts, body.max_tokens, "prompt")
        return await _respond(served, request, body, "text_completion", prompts, max_tokens, body.logprobs)

    return app


# ------------------------------------------------------------------ checks


def _authorize(served: ServedModel, request: Request) -> None:
    if served.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if given != f"Bearer {served.api_key}":
        what = "no API key was given" if not given else "the API key is wrong"
        raise APIError(f"{what}: send the header Authorization: Bearer <key>", 401,
                       "authentication_error", code="invalid_api_key")


def _check_model(served: ServedModel, model: str | None) -> None:
    if model is not None and model != served.name:
        raise APIError(f"the model {model!r} does not exist; this server serves {served.name!r}", 404,
                       "not_found_error", param="model", code="model_not_found")


def _chat_prompt_ids(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    template = served.loaded.chat_template
    try:
        if template is None:  # a base model: the messages' text, no roles
            return encode_prompt(served.tokenizer, "\n".join(m["content"] for m in messages))
        return served.tokenizer.encode(template.render(messages, add_generation_prompt=True))
    except TinyLLMError as e:
        raise APIError(str(e), param="messages") from None


def _completion_prompt_ids(served: ServedModel, body: CompletionRequest) -> list[list[int]]:
    prompts = body.prompts()
    vocab = served.loaded.args.vocab_size
    for p in prompts:
        if not isinstance(p, str) and any(not 0 <= t < vocab for t in p):
            raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
    return [encode_prompt(served.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]


def _max_tokens(served: ServedModel, prompts: list[list[int]], asked: int | None, where: str) -> int:
    """The tokens each choice may generate: what was asked, or the rest of the context.
    where: the field that holds the prompt, for the error."""
    longest = max(len(p) for p in prompts)
    context = served.max_model_len
    if longest == 0:
        raise APIError("the prompt is empty", param=where)
    if longest >= context:
        raise APIError(f"the prompt is {longest} tokens; this model's context is {context} tokens",
                       param=where, code="context_length_exceeded")
    if asked is None:
        return context - longest
    if longest + asked > context:
        raise APIError(f"this model's context is {context} tokens, and {longest} prompt tokens plus"
                       f" max_tokens {asked} is {longest + asked}", param="max_tokens",
                       code="context_length_exceeded")
    return asked


# ------------------------------------------------------------------ answering


@dataclass
class _Choice:
    index: int
    prompt_index: int
    output: RequestOutput | None = None
    logprobs_sent: int = 0  # output tokens whose logprobs went out (streaming)


async def _respond(served: ServedModel, request: Request, body, kind: str, prompts: list[list[int]],
                   max_tokens: int, logprobs: int | None) -> Response:
    """Add every choice to the engine (all or none), then answer, streamed or not."""
    base = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
    outputs: asyncio.Queue = asyncio.Queue()  # every choice's outputs, tagged by request id
    choices: dict[str, _Choice] = {}

    async def add(p: int, i: int) -> str:
        request_id = f"{base}-{p * body.n + i}"
        await served.engine.add(request_id, prompts[p], body.sampling_params(max_tokens, logprobs, i), outputs)
        choices[request_id] = _Choice(p * body.n + i, p)
        return request_id

    try:
        firsts = {await add(p, 0) for p in range(len(prompts))}
        if body.n > 1:
            # Each prompt's other choices join once its first choice has prefilled: they find the
            # prompt's full blocks in the prefix cache and compute only the last partial block.
            await _first_tokens(outputs, firsts)
            for p in range(len(prompts)):
                for i in range(1, body.n):
                    await add(p, i)
    except TinyLLMError as e:
        _abort(served, choices)
        raise APIError(str(e)) from None
    except EngineStopped as e:
        _abort(served, choices)
        raise APIError(str(e), 503, "server_error") from None
    except BaseException:
        _abort(served, choices)
        raise
    answer = _Answer(served, body, kind, base, prompts, choices, outputs, logprobs is not None)
    if body.stream:
        return EventStream(answer.events(), on_close=lambda: _abort(served, choices))
    collect = asyncio.ensure_future(answer.collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():  # the client went away (or the handler was cancelled): free its blocks
            collect.cancel()
            _abort(served, choices)
    if not collect.done():
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return JSONResponse(collect.result())


async def _first_tokens(outputs: asyncio.Queue, request_ids: set[str]) -> None:
    """Wait until each of request_ids has an output (its prompt is computed), leaving the queue
    as it was: the outputs taken are put back in their order."""
    held, waiting = [], set(request_ids)
    while waiting:
        held.append(await outputs.get())
        waiting.discard(held[-1].request_id)
    for out in held:  # the queue is empty now, and nothing runs between these puts
        outputs.put_nowait(out)


def _abort(served: ServedModel, choices: dict[str, _Choice]) -> None:
    for request_id, choice in choices.items():
        if choice.output is None or not choice.output.finished:
            served.engine.abort(request_id)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Answer:
    """One request's choices as an OpenAI response body, or as its stream of chunks."""

    def __init__(self, served, body, kind, base, prompts, choices, outputs, with_logprobs):
        self.served, self.body, self.kind, self.id = served, body, kind, base
        self.prompts, self.choices, self.outputs, self.with_logprobs = prompts, choices, outputs, with_logprobs
        self.chat = kind == "chat.completion"

    async def _next(self) -> tuple[_Choice, RequestOutput]:
        out = await self.outputs.get()
        choice = self.choices[out.request_id]
        if out.finish_reason == "abort":  # the server is stopping
            raise APIError("the request was aborted: the server is shutting down", 503, "server_error")
        choice.output = out
        return choice, out

    def _unfinished(self) -> bool:
        return any(c.output is None or not c.output.finished for c in self.choices.values())

    async def collect(self) -> dict:
        """The whole response body, once every choice finished."""
        while self._unfinished():
            await self._next()
        ordered = sorted(self.choices.values(), key=lambda c: c.index)
        return {"id": self.id, "object": self.kind, "created": int(time.time()), "model": self.served.name,
                "choices": [self._choice(c) for c in ordered], "usage": self._usage()}

    def _choice(self, c: _Choice) -> dict:
        out = c.output
        lp = self._logprobs(out, 0) if self.with_logprobs else None
        if self.chat:
            return {"index": c.index, "message": {"role": "assistant", "content": out.text},
                    "logprobs": lp, "finish_reason": out.finish_reason}
        return {"index": c.index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}

    def _usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.output.token_ids) for c in self.choices.values() if c.output)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def events(self) -> AsyncIterator[bytes]:
        """Server-sent events: chunks as the choices' tokens arrive, the usage if asked, [DONE]."""
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        created = int(time.time())

        def chunk(choices: list[dict], **extra) -> bytes:
            data = {"id": self.id, "object": object_, "created": created, "model": self.served.name,
                    "choices": choices, **extra}
            return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

        try:
            if self.chat:  # the role first, as OpenAI does
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for c in sorted(self.choices.values(), key=lambda c: c.index)])
            while self._unfinished():
                c, out = await self._next()
                if not out.new_text and not out.finished and not self.with_logprobs:
                    continue  # tokens still held back (an incomplete character, a possible stop string)
                lp = None
                if self.with_logprobs:
                    lp = self._logprobs(out, c.logprobs_sent)
                    c.logprobs_sent = len(out.token_ids)
                if self.chat:
                    delta = {"content": out.new_text} if out.new_text else {}
                    yield chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}])
                else:
                    yield chunk([{"index": c.index, "text": out.new_text, "logprobs": lp,
                                  "finish_reason": out.finish_reason}])
            if self.body.include_usage:
                yield chunk([], usage=self._usage())
        except APIError as e:  # mid-stream there is no status to set: the error goes as an event
            yield b"data: " + json.dumps(e.body()).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    def _logprobs(self, out: RequestOutput, start: int) -> dict:
        """OpenAI's logprobs for out's tokens from `start` on: chat's {"content": [...]} or
        completions' {"tokens", "token_logprobs", "top_logprobs", "text_offset"}."""
        tok = self.served.tokenizer
        k = (self.body.top_logprobs or 0) if self.chat else self.body.logprobs
        rows = []
        for token, table in zip(out.token_ids[start:], (out.logprobs or [])[start:], strict=False):
            top = sorted(table.items(), key=lambda kv: -kv[1])[:k]
            rows.append((token, table[token], top))

        def text(t: int) -> str:
            return tok.token_bytes(t).decode("utf-8", errors="replace")

        if self.chat:
            def entry(t, lp):
                return {"token": text(t), "logprob": lp, "bytes": list(tok.token_bytes(t))}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                                for t, lp, top in rows]}
        offsets = list(itertools.accumulate((len(text(t)) for t in out.token_ids), initial=0))[start:]
        return {"tokens": [text(t) for t, _, _ in rows], "token_logprobs": [lp for _, lp, _ in rows],
                "top_logprobs": [{text(i): v for i, v in top} for _, _, top in rows],
                "text_offset": offsets[:len(rows)]}


# ------------------------------------------------------------------ ASGI pieces


class EventStream(StreamingResponse):
    """text/event-stream that notices a client leaving while nothing is being sent (a long
    prefill), and calls on_close however the stream ends."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tasks:
                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(watch)
                with suppress(OSError):  # the client went away mid-send
                    await self.stream_response(send)
                tasks.cancel_scope.cancel()
        finally:
            self.on_close()
            with suppress(Exception):
                await self.body_iterator.aclose()


class BodyLimit:
    """ASGI middleware: a body over max_bytes is refused with 413 before it is all read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_large = APIError(f"the body is larger than {self.max_bytes} bytes", 413, code="body_too_large")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            error = too_large if length.isdigit() else APIError("bad Content-Length header")
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited, send)
