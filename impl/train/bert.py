"""BERT-style masked language modelling (topic 4.6): the masking of the inputs and an encoder.

Masking (BERT's recipe, transformers' DataCollatorForLanguageModeling's): each token that is not
special is chosen with probability 0.15; the label of a chosen token is the token, every other
label -100 (ignored by 4.2's loss). Of the chosen inputs 80% become [MASK], 10% a random token,
10% stay as they are, so the model cannot learn that only [MASK] positions matter.

The encoder is BERT's: token + position + segment embeddings, LayerNorm; per layer, attention
over every position (no causal mask: each token sees the ones after it too; padding is masked
out as keys), then add and LayerNorm *after* each sublayer (post-norm), an exact-GELU MLP; the
masked-LM head (dense, GELU, LayerNorm, the output tied to the token embedding, a bias). The
weights sit in an mlx.nn.Module tree under Hugging Face's names (`bert.encoder.layer.0.attention
.self.query.weight`), so BertForMaskedLM's state dict loads as it is.

The same encoder without the head (`BertEncoder`, BertModel's names) loads all-MiniLM-L6-v2, a
6-layer, 384-wide BERT trained for sentence embeddings: `sentence_embeddings` averages its last
hidden states over each sentence's tokens (padding left out) and scales the mean to unit length,
so a dot product of two is their cosine similarity (week 3's retrieval uses it).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn
from mlx.utils import tree_unflatten

from impl.attention import scaled_dot_product_attention_simple
from impl.basics import linear
from impl.train.layers import layer_norm
from impl.train.loss import IGNORE_INDEX, cross_entropy, value_and_grad_wrt


def mask_tokens(ids: mx.array, key: mx.array, mask_token_id: int, vocab_size: int,
                special: mx.array | None = None, mlm_probability: float = 0.15,
                mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1) -> tuple[mx.array, mx.array]:
    """(inputs, labels) for masked-LM training from ids (N, L): each position not marked in `special`
    (bool (N, L): [CLS], [SEP], padding) is chosen with probability mlm_probability; labels are the
    ids at the chosen positions and -100 elsewhere; a chosen input becomes [MASK] with probability
    mask_replace_prob, a uniformly random token id with random_replace_prob, else stays (topic 4.6)."""
    k_choose, k_kind, k_word = mx.random.split(key, 3)
    chosen = mx.random.uniform(shape=ids.shape, key=k_choose) < mlm_probability
    if special is not None:
        chosen = chosen & ~special
    labels = mx.where(chosen, ids, IGNORE_INDEX)
    # One draw decides the kind: [0, p_mask) masked, [p_mask, p_mask + p_random) random, the rest kept.
    u = mx.random.uniform(shape=ids.shape, key=k_kind)
    masked = chosen & (u < mask_replace_prob)
    randomized = chosen & (u >= mask_replace_prob) & (u < mask_replace_prob + random_replace_prob)
    words = mx.random.randint(0, vocab_size, ids.shape, key=k_word).astype(ids.dtype)
    inputs = mx.where(masked, mask_token_id, mx.where(randomized, words, ids))
    return inputs, labels


@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder, with transformers' BertConfig field names (topic 4.6)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """From config.json's fields, ignoring the ones this encoder does not use (topic 4.6)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def gelu_exact(x: mx.array) -> mx.array:
    """x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2))): BERT's GELU, not GPT-2's tanh approximation (topic 4.6)."""
    return 0.5 * x * (1.0 + mx.erf(x / math.sqrt(2.0)))


class BertMaskedLM(mlx.nn.Module):
    """BERT's encoder and masked-LM head; the weights under Hugging Face's names (topic 4.6)."""

    def __init__(self, config: BertConfig, weights: dict[str, mx.array]):
        """weights: BertForMaskedLM's parameters by name; the decoder's weight and bias are tied to the
        token embedding and cls.predictions.bias, so they are not given apart (topic 4.6)."""
        super().__init__()
        self.config = config
        tree = tree_unflatten([(k, v) for k, v in weights.items() if not k.startswith("cls.predictions.decoder.")])
        self.bert, self.cls = tree["bert"], tree["cls"]

    def __call__(self, ids: mx.array, attention_mask: mx.array | None = None,
                 token_type_ids: mx.array | None = None) -> mx.array:
        """ids (N, L) -> logits (N, L, V); attention_mask (N, L): 1 for a token, 0 for padding (topic 4.6)."""
        c = self.config
        h = encode(self.bert, c, ids, attention_mask, token_type_ids)
        p = self.cls["predictions"]
        t = _norm(gelu_exact(_dense(h, p["transform"]["dense"])), p["transform"]["LayerNorm"], c.layer_norm_eps)
        return linear(t, self.bert["embeddings"]["word_embeddings"]["weight"], p["bias"])  # (N, L, V): the tied decoder


def encode(bert: dict, c: BertConfig, ids: mx.array, attention_mask: mx.array | None = None,
           token_type_ids: mx.array | None = None) -> mx.array:
    """The encoder's last hidden states (N, L, E) from ids (N, L), given BertModel's weights as a tree
    (`embeddings`, `encoder`); attention_mask (N, L): 1 for a token, 0 for padding (topic 4.6)."""
    e = bert["embeddings"]
    N, L = ids.shape
    types = mx.zeros_like(ids) if token_type_ids is None else token_type_ids
    h = (e["word_embeddings"]["weight"][ids] + e["position_embeddings"]["weight"][:L]
         + e["token_type_embeddings"]["weight"][types])  # (N, L, E)
    h = _norm(h, e["LayerNorm"], c.layer_norm_eps)
    mask = None
    if attention_mask is not None:  # padding is no key for anyone: (N, 1, 1, L), added to the scores
        mask = mx.where(attention_mask[:, None, None, :].astype(mx.bool_), 0.0, -mx.inf)
    for layer in bert["encoder"]["layer"]:
        h = _layer(h, layer, mask, c)
    return h


class BertEncoder(mlx.nn.Module):
    """BERT's encoder alone (transformers' BertModel without its pooler), weights under BertModel's
    names (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`) (topic 4.6)."""

    def __init__(self, config: BertConfig, weights: dict[str, mx.array]):
        """weights: BertModel's parameters by name; the pooler and the position_ids buffer are
        dropped, a `bert.` prefix (BertForMaskedLM's names) is taken off (topic 4.6)."""
        super().__init__()
        self.config = config
        kept = [(k.removeprefix("bert."), v) for k, v in weights.items()
                if k.removeprefix("bert.").split(".")[0] in ("embeddings", "encoder") and not k.endswith("position_ids")]
        tree = tree_unflatten(kept)
        self.embeddings, self.encoder = tree["embeddings"], tree["encoder"]

    def __call__(self, ids: mx.array, attention_mask: mx.array | None = None,
                 token_type_ids: mx.array | None = None) -> mx.array:
        """ids (N, L) -> last hidden states (N, L, E); attention_mask (N, L): 1 for a token, 0 for
        padding (topic 4.6)."""
        return encode({"embeddings": self.embeddings, "encoder": self.encoder}, self.config, ids,
                      attention_mask, token_type_ids)


def load_bert_encoder(folder: str | Path) -> BertEncoder:
    """The encoder of a Hugging Face BERT folder: config.json and model.safetensors, read with mx.load,
    fp32 as stored (all-MiniLM-L6-v2's, impl.model_files.minilm_folder()) (topic 4.6)."""
    folder = Path(folder)
    config = BertConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return BertEncoder(config, mx.load(str(folder / "model.safetensors")))


def sentence_embeddings(encoder: BertEncoder, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
    """(N, E) unit vectors, one per sentence: the mean of the last hidden states over the sentence's
    tokens ([CLS] and [SEP] included, padding not), then divided by its L2 norm, as all-MiniLM-L6-v2's
    sentence-transformers pipeline does (modules.json: Transformer, Pooling (mean), Normalize) (topic 4.6)."""
    h = encoder(input_ids, attention_mask)  # (N, L, E)
    m = attention_mask.astype(h.dtype)[:, :, None]  # (N, L, 1)
    mean = (h * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)
    return mean / mx.maximum(mx.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def _dense(x: mx.array, w: dict) -> mx.array:
    return linear(x, w["weight"], w["bias"])


def _norm(x: mx.array, w: dict, eps: float) -> mx.array:
    return layer_norm(x, w["weight"], w["bias"], eps)


def _layer(h: mx.array, w: dict, mask: mx.array | None, c: BertConfig) -> mx.array:
    """One post-norm encoder layer: h = LN(h + attn(h)); h = LN(h + mlp(h))."""
    N, L, E = h.shape
    H = c.num_attention_heads
    a = w["attention"]

    def heads(x):  # (N, L, E) -> (N, H, L, D)
        return x.reshape(N, L, H, E // H).transpose(0, 2, 1, 3)

    q, k, v = (heads(_dense(h, a["self"][n])) for n in ("query", "key", "value"))
    out = scaled_dot_product_attention_simple(q, k, v, mask=mask)  # (N, H, L, D): every position, both ways
    h = _norm(h + _dense(out.transpose(0, 2, 1, 3).reshape(N, L, E), a["output"]["dense"]),
              a["output"]["LayerNorm"], c.layer_norm_eps)
    f = _dense(gelu_exact(_dense(h, w["intermediate"]["dense"])), w["output"]["dense"])
    return _norm(h + f, w["output"]["LayerNorm"], c.layer_norm_eps)


def mlm_loss_and_grad(model: BertMaskedLM, inputs: mx.array, labels: mx.array,
                      attention_mask: mx.array | None = None) -> tuple[mx.array, dict]:
    """(mean cross-entropy over the labelled (chosen) positions, no shift, its gradient with respect
    to every weight, a tree like model.trainable_parameters()) (topic 4.6)."""
    return value_and_grad_wrt(model, lambda: cross_entropy(model(inputs, attention_mask), labels))


# CJK ideographs (BERT's ranges): each becomes a word of its own, as BERT's normalizer spaces them out.
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class WordPieceTokenizer:
    """BERT's uncased tokenizer from a vocab.txt (topic 4.6): text -> [CLS] ids [SEP].

    Normalize: drop NUL, U+FFFD and control characters (not tab, newline, return), turn whitespace
    into spaces, put spaces around CJK ideographs, strip accents (NFD, then no combining marks),
    lowercase. Split on whitespace and around each punctuation character. Each word becomes the
    longest vocabulary entry that starts it, then the longest `##` entry that continues it, and so on;
    a word with no such split, or over 100 characters, is [UNK] as a whole. The special tokens
    ([CLS], [SEP], [MASK], ...) written in the text are kept as they are."""

    def __init__(self, vocab: list[str], max_input_chars_per_word: int = 100):
        """vocab: the tokens by id (vocab.txt's lines) (topic 4.6)."""
        self.vocab = {t: i for i, t in enumerate(vocab)}
        self.max_chars = max_input_chars_per_word
        self.specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in self.vocab]
        self.cls_id, self.sep_id, self.unk_id = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[UNK]"]

    @classmethod
    def from_folder(cls, folder: str | Path) -> WordPieceTokenizer:
        """From a Hugging Face BERT folder's vocab.txt (topic 4.6)."""
        return cls((Path(folder) / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of text, between [CLS] and [SEP] unless add_special_tokens is False (topic 4.6)."""
        ids = []
        for part in re.split("(" + "|".join(map(re.escape, self.specials)) + ")", text):
            if part in self.vocab and part in self.specials:
                ids.append(self.vocab[part])
                continue
            for word in _pre_split(_normalize(part)):
                ids += self._word(word)
        return [self.cls_id, *ids, self.sep_id] if add_special_tokens else ids

    def _word(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk_id]
        out, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    out.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk_id]
        return out


def _normalize(text: str) -> str:
    chars = []
    for c in text:
        if c in "\0\ufffd" or (unicodedata.category(c)[0] == "C" and c not in "\t\n\r"):
            continue
        if c in "\t\n\r" or unicodedata.category(c) == "Zs":
            chars.append(" ")
        elif any(lo <= ord(c) <= hi for lo, hi in _CJK):
            chars.append(f" {c} ")
        else:
            chars.append(c)
    text = "".join(c for c in unicodedata.normalize("NFD", "".join(chars)) if unicodedata.category(c) != "Mn")
    return text.lower()


def _pre_split(text: str) -> list[str]:
    words = []
    for chunk in text.split():
        word = ""
        for c in chunk:
            if (c.isascii() and not c.isalnum() and c.isprintable() and c != " ") or unicodedata.category(c)[0] == "P":
                words += [word, c] if word else [c]
                word = ""
            else:
                word += c
        if word:
            words.append(word)
    return words
