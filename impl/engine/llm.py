"""The offline entry point (topic 2.6), in vLLM's words: `LLM().generate(prompts, SamplingParams(...))`.

    from impl.engine import LLM, SamplingParams
    llm = LLM()                                   # the default model; or LLM("model.gguf")
    outs = llm.generate(["The capital of France is", {"prompt_token_ids": [1, 2, 3]}],
                        SamplingParams(max_tokens=32))
    print(outs[0].text, outs[0].finish_reason, outs[0].metrics.ttft)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from impl.engine.llm_engine import LLMEngine
from impl.engine.outputs import RequestOutput
from impl.engine.sampling_params import SamplingParams
from impl.errors import TinyLLMError
from impl.tokenizer import encode_prompt

Prompt = str | list[int] | dict


class LLM:
    """A model and an engine over it."""

    def __init__(self, model=None, **engine_args):
        """model: a path (GGUF or HF folder), a LoadedModel, or None for the default model;
        engine_args: LLMEngine's (max_num_seqs, max_num_batched_tokens, kv_cache_memory, ...)."""
        from impl.loader import LoadedModel, load_model

        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.tokenizer = self.loaded.tokenizer
        self.engine = LLMEngine(self.loaded.model, self.tokenizer, **engine_args)
        self._ids = itertools.count()

    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """A prompt as (text or None, token ids): text is encoded as it is, with no chat template
        (after <bos> where the tokenizer asks for one)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            return prompt, encode_prompt(self.tokenizer, prompt)
        if isinstance(prompt, list):
            return None, prompt
        raise TinyLLMError(f"a prompt is text, a list of token ids or {{'prompt_token_ids': [...]}}, got {prompt!r:.60}")

    def add(self, prompt: Prompt, params: SamplingParams | None = None) -> str:
        """Queue one prompt; returns its request id."""
        text, ids = self.tokenize(prompt)
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, ids, params, prompt=text)
        return request_id

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list | None = None
                 ) -> list[RequestOutput]:
        """Run every prompt to the end, batched; outputs in the prompts' order. Every request is
        checked before any runs: a bad one raises and none is queued."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise TinyLLMError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.add(prompt, p))
        except TinyLLMError:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        done = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """One request's outputs as they come, step by step (other requests may share the steps).
        Closing the iterator early aborts the request and frees its blocks."""
        request_id = self.add(prompt, params)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort_request(request_id)
