"""The serving engine, a tiny vLLM: continuous batching (topic 2.6), chunked prefill (2.7),
a paged KV cache with its block manager (3.1), paged attention and prefix caching (3.2).

Modules, in nano-vllm's vocabulary: sampling_params, sequence (a request's state), scheduler,
block_manager, contiguous_cache and kv_pool (the KV memory), attention_metadata, paged_attention,
model_runner, llm_engine (step = schedule, run, postprocess), llm (the offline API), outputs.
"""

from impl.engine.llm import LLM
from impl.engine.llm_engine import LLMEngine
from impl.engine.outputs import RequestOutput
from impl.engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams"]
