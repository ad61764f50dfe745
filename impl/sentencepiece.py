"""SentencePiece-style BPE over characters, from a GGUF's `tokenizer.ggml.model = "llama"` (topic 1.6).

Gemma's tokenizer. Unlike GPT-2's byte-level BPE, its pieces are Unicode text: a space is
written "▁" (U+2581), and a character with no piece of its own falls back to one token per
UTF-8 byte ("<0x0A>"). encode:
1. control tokens ("<start_of_turn>") and user-defined ones ("\\n\\n") written in the text
   become their ids whole (the longest at a position wins);
2. the rest: spaces -> "▁", one symbol per character (no pre-tokenizer split);
3. merge adjacent symbols while some pair's concatenation is a piece, best pair first: the
   piece that comes first in the vocabulary, then the longer left part, then the leftmost
   (the GGUF lists Gemma's pieces in merge order; its scores do not follow that order);
4. a symbol that is no piece becomes its UTF-8 bytes' tokens.
Pieces of spaces only are stored with real spaces ("  ") and looked up as "▁▁".
"""

from __future__ import annotations

import heapq
import re

from impl.tokenizer import added_tokens_regex, encode_with_added_tokens

SPACE = "\u2581"
CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # tokenizer.ggml.token_type values
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SentencePieceTokenizer:
    """Character-level BPE with byte fallback, as Gemma's GGUF describes it (topic 1.6)."""

    def __init__(self, tokens: list[str], types: list[int], bos_token_id: int | None, eos_token_id: int | None,
                 add_bos_token: bool = False, unk_token_id: int | None = None):
        self.tokens = tokens
        self.add_bos_token = add_bos_token  # a plain-text prompt starts with <bos> (Gemma's does)
        self.vocab_size = len(tokens)
        # Spaces-only pieces are stored with real spaces; the text's spaces become "▁" before merging.
        pieces = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        self.vocab = {p: i for i, p in enumerate(pieces)}  # a repeated piece: its last id, as HF's
        self.special = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == CONTROL}
        user = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == USER_DEFINED and t == pieces[i]}
        self.added = {**user, **self.special}
        self.special_ids = set(self.special.values())
        self.bos_token_id, self.eos_token_id, self.unk_token_id = bos_token_id, eos_token_id, unk_token_id
        self._byte_id = {}
        for i, (t, k) in enumerate(zip(tokens, types, strict=True)):
            if k == BYTE and (m := _BYTE_PIECE.fullmatch(t)):
                self._byte_id[int(m.group(1), 16)] = i
        self._added_re = added_tokens_regex(self.added)
        self._user_re = added_tokens_regex(user)

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> SentencePieceTokenizer:
        """Build from a GGUF's `tokenizer.ggml.*` metadata (model "llama": SentencePiece)."""
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        types = types.tolist() if hasattr(types, "tolist") else list(types)
        bos, eos, unk = (_int(meta.get(f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos", "unknown"))
        return cls(tokens, [int(k) for k in types], bos, eos, bool(_int(meta.get("tokenizer.ggml.add_bos_token", 0))), unk)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> token ids; control tokens written in the text become single ids when allow_special."""
        pattern = self._added_re if allow_special else self._user_re
        return encode_with_added_tokens(text, pattern, self.added, self._encode_ordinary)

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for symbol in self._merge(list(text.replace(" ", SPACE))):
            if symbol in self.vocab:
                ids.append(self.vocab[symbol])
            else:  # byte fallback (<unk> for a byte the vocabulary lacks)
                ids += [self._byte_id.get(b, self.unk_token_id) for b in symbol.encode("utf-8")]
        return ids

    def _rank(self, left: str, right: str) -> tuple[int, int] | None:
        """A pair's priority (lower first), or None when it is no merge."""
        if left not in self.vocab or right not in self.vocab or (merged := self.vocab.get(left + right)) is None:
            return None
        return merged, -len(left)

    def _merge(self, symbols: list[str]) -> list[str]:
        # A linked list of symbols and a heap of candidate merges (rank, position); a popped
        # candidate whose symbols have changed since it was pushed is skipped.
        nxt = list(range(1, len(symbols) + 1))
        prev = list(range(-1, len(symbols) - 1))
        heap = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < len(symbols) and (r := self._rank(symbols[i], symbols[j])) is not None:
                heapq.heappush(heap, (r, i, symbols[i], symbols[j]))

        for i in range(len(symbols) - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i] if symbols[i] == left else len(symbols)
            if j >= len(symbols) or symbols[j] != right:
                continue  # stale
            symbols[i], symbols[j] = left + right, ""
            nxt[i] = nxt[j]
            if nxt[j] < len(symbols):
                prev[nxt[j]] = i
            if prev[i] >= 0:
                push(prev[i])
            push(i)
        return [s for s in symbols if s]

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token: "▁" is a space, "<0xNN>" a byte, control tokens their text."""
        token = self.tokens[id]
        if id in self.special_ids:
            return token.encode("utf-8")
        if (m := _BYTE_PIECE.fullmatch(token)) and self._byte_id.get(int(m.group(1), 16)) == id:
            return bytes([int(m.group(1), 16)])
        return token.replace(SPACE, " ").encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text. A run of byte tokens that is not valid UTF-8 becomes one U+FFFD per
        byte, as HF's ByteFallback decoder has it (streaming, by token_bytes, replaces per error)."""
        out, run = [], b""
        for i in ids:
            piece = self.token_bytes(i)
            if self._is_byte(i):
                run += piece
                continue
            out.append(_run_text(run))
            out.append(piece.decode("utf-8", errors="replace"))
            run = b""
        return "".join(out) + _run_text(run)

    def _is_byte(self, id: int) -> bool:
        m = _BYTE_PIECE.fullmatch(self.tokens[id])
        return m is not None and self._byte_id.get(int(m.group(1), 16)) == id


def _run_text(run: bytes) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def _int(v):
    return None if v is None else int(v.item() if hasattr(v, "item") else v)
