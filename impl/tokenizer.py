"""Byte-level BPE (GPT-2 style), from GGUF metadata or a Hugging Face tokenizer.json.

encode: split out special tokens, pre-tokenize with a regex, map each word's
UTF-8 bytes to printable stand-in characters, then apply merges by rank.
decode: token strings -> bytes -> UTF-8 text.
"""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from functools import cache
from pathlib import Path

# Pre-tokenizer regexes as the references write them; \p{..} and \s are
# translated for Python's `re` by _compile below.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> split regex. "smollm" is GPT-2's regex: transformers
# builds exactly that from this GGUF (our ground truth). llama.cpp instead
# splits every digit first, like SmolLM2's own tokenizer.json; the two differ
# on a run of spaces before a digit ("a  1").
GGUF_PRE_SPLITS = {
    "default": GPT2_SPLIT, "gpt2": GPT2_SPLIT, "smollm": GPT2_SPLIT,
    "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT,
}

# Unicode White_Space, what \s means in the Rust/Oniguruma regexes of the
# references (Python's \s would also match \x1c-\x1f).
_WHITESPACE = "\\t\\n\\x0b\\x0c\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
CACHE_WORDS = 1 << 16  # pre-token words whose BPE result is kept


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (so every byte is a visible symbol)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


@cache
def _category_classes() -> dict[str, str]:
    """Regex class bodies (ranges) for the major Unicode categories L, N, M."""
    ranges: dict[str, list[list[int]]] = {"L": [], "N": [], "M": []}
    for cp in range(0x110000):
        major = unicodedata.category(chr(cp))[0]
        if major in ranges:
            r = ranges[major]
            if r and r[-1][1] == cp - 1:
                r[-1][1] = cp
            else:
                r.append([cp, cp])
    esc = lambda cp: f"\\U{cp:08x}"  # noqa: E731
    return {k: "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in v) for k, v in ranges.items()}


@cache
def _compile(pattern: str) -> re.Pattern:
    """Translate \\p{L}, \\p{N}, \\p{M}, \\s, \\S into explicit classes for Python's `re`."""
    body = {f"\\p{{{k}}}": v for k, v in _category_classes().items()}
    body["\\s"] = _WHITESPACE
    out, i, in_class = [], 0, False
    while i < len(pattern):
        token = pattern[i:i + 2] if pattern[i] == "\\" else pattern[i]
        token = next((t for t in body if pattern.startswith(t, i)), token)
        if token in body:  # inside [...] only the ranges, outside a class of its own
            out.append(body[token] if in_class else f"[{body[token]}]")
        elif token == "\\S":  # these regexes use \S only outside classes
            out.append(f"[^{_WHITESPACE}]")
        elif token == "\\p":
            raise ValueError(f"unsupported class {pattern[i:i + 6]!r} in a pre-tokenizer regex;"
                             " supported: \\p{L}, \\p{N}, \\p{M}")
        else:
            in_class = token == "[" or (in_class and token != "]")
            out.append(token)
        i += len(token)
    return re.compile("".join(out))


def _split_isolated(pattern: re.Pattern, pieces: list[str]) -> list[str]:
    """Split each piece into the matches and the gaps between them (HF's "isolated")."""
    out = []
    for piece in pieces:
        start = 0
        for m in pattern.finditer(piece):
            if m.start() > start:
                out.append(piece[start:m.start()])
            out.append(m.group())
            start = m.end()
        if start < len(piece):
            out.append(piece[start:])
    return out


def added_tokens_regex(words) -> re.Pattern | None:
    """One regex for the added tokens `words`, None for none; longest first: at one position the longest
    added token wins, as in HF."""
    ordered = sorted(words, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def encode_with_added_tokens(text: str, pattern: re.Pattern | None, added: dict[str, int],
                             encode_ordinary) -> list[int]:
    """Text -> token ids: each match of `pattern` (an added token written in the text) becomes its id in
    `added`, the text around the matches goes through `encode_ordinary`."""
    ids, start = [], 0
    for m in pattern.finditer(text) if pattern else ():
        ids += encode_ordinary(text[start:m.start()])
        ids.append(added[m.group()])
        start = m.end()
    return ids + encode_ordinary(text[start:])


def _value(x):
    """A GGUF metadata value as plain Python (mx.load gives 0-d arrays for scalars)."""
    return x.item() if hasattr(x, "item") and getattr(x, "ndim", 1) == 0 else x


class Tokenizer:
    """Byte-level BPE tokenizer: vocab, merge ranks, pre-tokenizer splits, special tokens."""

    def __init__(self, tokens: list[str], merges: list[tuple[str, str]], splits: list[str],
                 special: dict[str, int], added: dict[str, int] | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None, nfc: bool = False):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.tokens = tokens
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.splits = [_compile(s) for s in splits]
        self.nfc = nfc
        self.special = special
        self.added = {**(added or {}), **special}  # matched whole in text
        self.special_ids = set(special.values())
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.vocab_size = len(tokens)
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self._char_of = [bytes_to_unicode()[b] for b in range(256)]
        self._cache: dict[str, list[int]] = {}
        self._added_re = added_tokens_regex(self.added)
        self._nonspecial_re = added_tokens_regex({t: i for t, i in self.added.items() if t not in special})

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> Tokenizer:
        """Build from the `tokenizer.ggml.*` metadata of a GGUF file (as `mx.load` returns it)."""
        model, pre = _value(meta.get("tokenizer.ggml.model")), _value(meta.get("tokenizer.ggml.pre", "default"))
        if model == "llama":  # SentencePiece (Gemma): pieces of text, not of bytes
            from impl.sentencepiece import SentencePieceTokenizer

            return SentencePieceTokenizer.from_gguf_metadata(meta)
        if model != "gpt2":
            raise ValueError(f"unsupported tokenizer model {model!r}; supported: 'gpt2' (byte-level BPE),"
                             " 'llama' (SentencePiece)")
        if pre not in GGUF_PRE_SPLITS:
            raise ValueError(f"unsupported pre-tokenizer {pre!r}; supported: {sorted(GGUF_PRE_SPLITS)}")
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        types = types.tolist() if hasattr(types, "tolist") else list(types)
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        special = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == GGUF_CONTROL}
        added = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == GGUF_USER_DEFINED}
        ids = {k: _value(meta.get(f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos")}
        return cls(tokens, merges, [GGUF_PRE_SPLITS[pre]], special, added, ids["bos"], ids["eos"])

    @classmethod
    def from_hf_folder(cls, path) -> Tokenizer:
        """Build from a Hugging Face folder's tokenizer.json (BPE + ByteLevel), as safetensors models ship."""
        folder = Path(path)
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"unsupported tokenizer model {model.get('type')!r}; supported: 'BPE' (byte-level)")
        splits = _hf_splits(spec.get("pre_tokenizer"))
        nfc = _hf_nfc(spec.get("normalizer"))
        tokens = [""] * (max(model["vocab"].values()) + 1)
        for t, i in model["vocab"].items():
            tokens[i] = t
        added = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
        for t, i in added.items():
            tokens.extend([""] * (i + 1 - len(tokens)))
            tokens[i] = tokens[i] or t
        special = {a["content"]: a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        bos, eos = _hf_bos_eos(folder, {**model["vocab"], **added})
        return cls(tokens, merges, splits, special, added, bos, eos, nfc)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> token ids; special tokens written in the text become single ids when allow_special."""
        pattern = self._added_re if allow_special else self._nonspecial_re
        return encode_with_added_tokens(text, pattern, self.added, self._encode_ordinary)

    def _encode_ordinary(self, text: str) -> list[int]:
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        words = [text] if text else []
        for split in self.splits:
            words = _split_isolated(split, words)
        return [i for w in words for i in self._bpe(w)]

    def _bpe(self, word: str) -> list[int]:
        if word not in self._cache:
            if len(self._cache) >= CACHE_WORDS:  # bounded, for a long-running server
                self._cache.clear()
            # A byte with no token of its own is dropped, as HF's BPE does with no unk token.
            symbols = [c for c in map(self._char_of.__getitem__, word.encode("utf-8")) if c in self.vocab]
            self._cache[word] = [self.vocab[s] for s in self._merge(symbols)]
        return self._cache[word]

    def _merge(self, symbols: list[str]) -> list[str]:
        # Repeatedly merge every occurrence of the best-ranked adjacent pair.
        while len(symbols) > 1:
            ranked = [(self.ranks[p], p) for p in zip(symbols, symbols[1:], strict=False) if p in self.ranks]
            if not ranked:
                break
            best = min(ranked)[1]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token (special tokens as their UTF-8 text)."""
        token = self.tokens[id]
        if id in self.special_ids or token in self.added:
            return token.encode("utf-8")
        # A character outside the byte alphabet stands for itself (as HF's decoder does).
        return b"".join(bytes([self._byte_of[c]]) if c in self._byte_of else c.encode("utf-8") for c in token)

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text; invalid UTF-8 becomes U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def _hf_splits(pre: dict | None) -> list[str]:
    """tokenizer.json pre_tokenizer -> list of isolated-split regexes, applied in order."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    splits, byte_level = [], False
    for step in steps:
        kind = (step or {}).get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            byte_level = True
            if step.get("use_regex", True):
                splits.append(GPT2_SPLIT)
        elif kind == "Digits":
            splits.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "Split" and "Regex" in step.get("pattern", {}) and step.get("behavior") == "Isolated" \
                and not step.get("invert"):
            splits.append(step["pattern"]["Regex"])
        else:
            raise ValueError(f"unsupported pre-tokenizer {kind!r}; supported: ByteLevel (no prefix space),"
                             " optionally after Digits or an isolated regex Split")
    if not byte_level:
        raise ValueError("unsupported pre-tokenizer: no ByteLevel step; supported: byte-level BPE only")
    return splits


def _hf_nfc(normalizer: dict | None) -> bool:
    if normalizer is None or normalizer.get("type") == "NFC":
        return normalizer is not None
    raise ValueError(f"unsupported normalizer {normalizer.get('type')!r}; supported: none or NFC")


def _hf_bos_eos(folder: Path, ids: dict[str, int]) -> tuple[int | None, int | None]:
    """bos/eos ids from tokenizer_config.json (token strings), else config.json (ids)."""
    found = {}
    for name, key in (("tokenizer_config.json", "{}_token"), ("config.json", "{}_token_id")):
        if (folder / name).is_file():
            cfg = json.loads((folder / name).read_text(encoding="utf-8"))
            for k in ("bos", "eos"):
                v = cfg.get(key.format(k))
                v = v.get("content") if isinstance(v, dict) else v
                v = ids.get(v) if isinstance(v, str) else v
                if v is not None:
                    found.setdefault(k, v)
    return found.get("bos"), found.get("eos")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A plain-text prompt (no chat template) as ids, after <bos> where the tokenizer asks for
    one (Gemma's GGUF does: tokenizer.ggml.add_bos_token; GPT-2-style ones here do not)."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
    return bos + tokenizer.encode(text)


class StreamingDetokenizer:
    """Turns ids into text one token at a time, never emitting a broken UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # The incremental decoder holds back an incomplete trailing sequence, so the
        # pieces join to exactly bytes.decode("utf-8", "replace") of the whole.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []

    def add_token(self, id: int) -> str:
        """Feed one id; return the text it completes (possibly "")."""
        return self._emit(self._decoder.decode(self.tokenizer.token_bytes(id)))

    def finalize(self) -> str:
        """Flush what is held back (an incomplete character becomes U+FFFD)."""
        return self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, piece: str) -> str:
        self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)
