"""The reference tokenizer: what transformers builds from the same GGUF.

transformers reads the GGUF's tokenizer metadata by its own means (its GGUF
reader and the HF `tokenizers` library), so a bug in impl/'s reading or BPE
cannot hide in a shared helper.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

# The pre-tokenizer of SmolLM2's own tokenizer.json on the Hub (and, in effect,
# llama.cpp's "smollm"): every digit split off before GPT-2's regex.
DIGITS = "digits"
# Qwen2's split regex with NFC: a pre-tokenizer of another shape, on the same vocab.
QWEN2 = "qwen2"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@lru_cache(maxsize=4)
def hf_tokenizer(gguf_path):
    """transformers' tokenizer built from the GGUF file (about 6 s, so cached)."""
    from transformers import AutoTokenizer

    path = Path(gguf_path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def write_hf_folder(gguf_path, folder, pre_tokenizer: str | None = None):
    """Write tokenizer.json (+ tokenizer_config.json) for the GGUF's vocab into folder.

    pre_tokenizer None keeps transformers' (GPT-2 regex); DIGITS or QWEN2 swap
    it. Returns the `tokenizers.Tokenizer` that reads that folder: the reference
    for a tokenizer loaded from it.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    hf = hf_tokenizer(gguf_path)
    backend = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre_tokenizer != QWEN2)
    if pre_tokenizer == DIGITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre_tokenizer == QWEN2:
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), byte_level])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": hf.bos_token, "eos_token": hf.eos_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@lru_cache(maxsize=4)
def hf_token_bytes(gguf_path) -> tuple[bytes, ...]:
    """Every token's raw bytes, through transformers' own byte-level table; special tokens as UTF-8."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    hf = hf_tokenizer(gguf_path)
    added = {i for i in hf.added_tokens_decoder}
    return tuple(
        token.encode("utf-8") if i in added else bytes(byte_of[c] for c in token)
        for i, token in enumerate(hf.convert_ids_to_tokens(list(range(len(hf)))))
    )
