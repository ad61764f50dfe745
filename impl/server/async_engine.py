"""The engine on a thread of its own, for an asyncio server (vLLM's AsyncLLMEngine idea).

The engine is not thread-safe, so one thread owns it: it takes commands (add, abort) from a
queue between steps, steps while anything is unfinished, and hands each request's outputs
to that request's asyncio.Queue on the server's event loop. A handler never touches the
engine; it awaits its queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import mlx.core as mx

from impl.engine.llm_engine import LLMEngine
from impl.engine.outputs import RequestOutput
from impl.engine.sampling_params import SamplingParams
from impl.errors import TinyLLMError


class EngineStopped(Exception):
    """The engine's thread has ended (the server is stopping, or the engine failed)."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    done: Future  # set when the engine took the request, or with the TinyLLMError it raised


class AsyncEngine:
    """Owns an LLMEngine and its thread. `add` and `abort` are called from the event loop."""

    def __init__(self, make_engine: Callable[[], LLMEngine], metrics=None):
        """make_engine: builds the engine (and loads its model) on the engine's thread, since MLX
        arrays are computed on the thread whose stream made them. metrics: told of each request
        added and each output, on the engine's thread (impl.server.metrics.Metrics)."""
        self.make_engine, self.metrics = make_engine, metrics
        self.engine: LLMEngine | None = None
        self.commands: queue.Queue = queue.Queue()
        self.streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self.stats: dict = {}  # the engine's stats() snapshot, replaced after each step: readable from any thread
        self._ready = threading.Event()
        self.error: BaseException | None = None  # what stopped the loop, if anything did
        self._stopping = threading.Event()
        self._closed = False  # set, under _lock, once the thread refuses new commands for good
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> LLMEngine:
        """Start the thread and wait until it has built the engine; re-raises what building raised."""
        self._thread.start()
        self._ready.wait()
        if self.engine is None:
            self._thread.join()
            raise self.error
        return self.engine

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  outputs: asyncio.Queue | None = None) -> asyncio.Queue:
        """Queue a request; returns the queue its RequestOutputs arrive on (`outputs`, which
        several requests may share, or a new one); the last has finished=True, and
        finish_reason "abort" if it was aborted. Raises the engine's TinyLLMError if it
        refuses the request."""
        loop = asyncio.get_running_loop()
        outputs = outputs if outputs is not None else asyncio.Queue()
        command = _Add(request_id, prompt_token_ids, params, outputs, loop, Future())
        with self._lock:  # either the thread will take it, or it is refused here
            if self._closed or self._stopping.is_set():
                raise EngineStopped("the server is shutting down" if self.error is None
                                    else f"the engine stopped: {type(self.error).__name__}: {self.error}")
            self.commands.put(command)
        await asyncio.wrap_future(command.done)
        return command.outputs

    def abort(self, request_id: str) -> None:
        """End a request between steps (its blocks are freed then); unknown ids are ignored."""
        self.commands.put(("abort", request_id))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what runs, end the thread and wait for it."""
        self._stopping.set()
        self.commands.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------ the engine's thread

    def _run(self) -> None:
        # MLX streams belong to a thread: this one computes on a stream of its own.
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        try:
            self.engine = self.make_engine()
            self.stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001  (start() re-raises it in the caller's thread)
            self.error = e
            return
        finally:
            self._ready.set()
        try:
            while not self._stopping.is_set():
                busy = self.engine.has_unfinished_requests()
                self._take_commands(block=not busy)
                if self._stopping.is_set():
                    break
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
                    self.stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001  (reported to every waiting request, then re-raised)
            self.error = e
            raise
        finally:
            self._abort_all()

    def _take_commands(self, block: bool) -> None:
        """Apply the queued commands; when idle, wait for the first one."""
        try:
            command = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                        arrival_time=time.perf_counter())
            except TinyLLMError as e:
                command.done.set_exception(e)
                return
            self.streams[command.request_id] = (command.outputs, command.loop)
            command.done.set_result(None)
            self.stats = self.engine.stats()
            if self.metrics:
                self.metrics.added(len(command.prompt_token_ids))
        elif command[0] == "abort":
            if command[1] in self.streams:
                self.engine.abort_request(command[1])
                self._put(self.streams.pop(command[1]), _aborted(command[1]))
                self.stats = self.engine.stats()
        elif command[0] == "stop":
            self._stopping.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self.streams[out.request_id]
            if self.metrics:
                self.metrics.output(out)
            self._put(stream, out)

    @staticmethod
    def _put(stream, item) -> None:
        outputs, loop = stream
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _abort_all(self) -> None:
        if self.engine is None:
            return
        for request_id in list(self.streams):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001  (the engine may be what failed; the streams must still end)
                pass
            self._put(self.streams.pop(request_id), _aborted(request_id))
        with self._lock:
            self._closed = True
        while True:  # requests queued but never taken: refuse them
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add) and not command.done.done():
                command.done.set_exception(EngineStopped("the server is shutting down"))


def _aborted(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, None, [], finished=True, finish_reason="abort")
