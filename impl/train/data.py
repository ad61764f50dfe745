"""Training data (topic 4.1): a byte-level tokenizer, a character vocabulary, windows of a
token stream with their targets shifted by one, and a train/validation split."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx


class ByteTokenizer:
    """Text <-> the bytes of its UTF-8 encoding: 256 ids, nothing to learn (topic 4.1)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """'hé' -> [104, 195, 169] (topic 4.1)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """The inverse of encode. A sequence that is not valid UTF-8 (a model's sample may cut a
        character in two) decodes with U+FFFD in place of the bad bytes, as bytes.decode does with
        errors="replace"; an id outside [0, 256) is a ValueError (topic 4.1)."""
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte ids lie in [0, 256); got {bad[:5]}")
        return bytes(ids).decode("utf-8", errors="replace")


class CharVocab:
    """One id per distinct character of a text, in code-point order (topic 4.1)."""

    def __init__(self, text: str):
        """The vocabulary of `text`: its distinct characters, sorted (topic 4.1)."""
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        """Each character's id; a character the vocabulary lacks is a ValueError naming it (topic 4.1)."""
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise ValueError(f"character {c!r} (U+{ord(c):04X}) at index {text.index(c)} is not in the"
                             f" vocabulary of {self.vocab_size} characters") from None

    def decode(self, ids: Sequence[int]) -> str:
        """The characters of the ids; an id outside [0, vocab_size) is a ValueError (topic 4.1)."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids lie in [0, {self.vocab_size}); got {bad[:5]}")
        return "".join(self.chars[i] for i in ids)


def windows(tokens: Sequence[int] | mx.array, block_size: int, stride: int | None = None) -> tuple[mx.array, mx.array]:
    """(inputs, targets), each (n, block_size) int32: window i starts at token i * stride (default
    block_size: no overlap), and its targets are the same window shifted by one token, so
    targets[i, t] is the token that follows inputs[i, t]. Every full window is kept (its last
    target included); a stream shorter than block_size + 1 tokens is a ValueError (topic 4.1)."""
    stride = block_size if stride is None else stride
    if block_size < 1 or stride < 1:
        raise ValueError(f"block_size and stride must be >= 1; got {block_size} and {stride}")
    tokens = mx.array(tokens, dtype=mx.int32) if not isinstance(tokens, mx.array) else tokens.astype(mx.int32)
    if tokens.size < block_size + 1:
        raise ValueError(f"{tokens.size} tokens make no window of {block_size} inputs and their targets")
    n = (tokens.size - block_size - 1) // stride + 1  # starts 0, stride, ... with start + block_size < size
    starts = mx.arange(n)[:, None] * stride  # (n, 1)
    index = starts + mx.arange(block_size)[None, :]  # (n, block_size)
    return tokens[index], tokens[index + 1]


def train_val_split(tokens: Sequence[int], val_fraction: float) -> tuple[Sequence[int], Sequence[int]]:
    """(train, validation): the first tokens and the last round(len * val_fraction), in order, so no
    window straddles the two and the same input always gives the same split (topic 4.1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1); got {val_fraction}")
    n_val = round(len(tokens) * val_fraction)
    cut = len(tokens) - n_val
    return tokens[:cut], tokens[cut:]
