"""Topic 4.1: training data, checked exactly against Python's own codecs and a numpy reference.

- `impl.train.data.ByteTokenizer()`: encode(text) is the list of text's UTF-8 bytes (str.encode),
  256 ids; decode(encode(text)) == text for any text (Hypothesis draws arbitrary Unicode);
  bytes that are not valid UTF-8 decode as bytes.decode(errors="replace") does; an id outside
  [0, 256) is a ValueError.
- `impl.train.data.CharVocab(text)`: the distinct characters of text in code-point order, one id
  each; round trips; a character it lacks is a ValueError naming the character.
- `impl.train.data.windows(tokens, block_size, stride)`: (inputs, targets), both (n, block_size),
  every window start i * stride that leaves room for the last target, targets = inputs shifted by
  one token; against numpy's sliding_window_view.
- `impl.train.data.train_val_split(tokens, val_fraction)`: the last round(len * fraction) tokens
  are validation, the rest training, in order; deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

NAMES = {"ByteTokenizer", "CharVocab", "windows", "train_val_split"}


@pytest.mark.presence
def test_has_names(impl):
    missing = sorted(n for n in NAMES if not hasattr(impl.train.data, n))
    assert not missing, f"impl.train.data lacks {missing}"


@pytest.fixture
def data(impl):  # Hypothesis probes a test's first argument: hand tests the module
    return impl.train.data


# -- the byte tokenizer ----------------------------------------------------------------


@given(text=st.text(max_size=200))
def test_byte_round_trip(data, text):
    tok = data.ByteTokenizer()
    ids = tok.encode(text)
    assert list(ids) == list(text.encode("utf-8")), f"encode({text!r}) = {ids}, not its UTF-8 bytes"
    assert tok.decode(ids) == text, f"decode(encode({text!r})) = {tok.decode(ids)!r}"


def test_byte_vocab_and_multibyte(data):
    tok = data.ByteTokenizer()
    assert tok.vocab_size == 256
    assert list(tok.encode("aé€😀")) == [97, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80]
    assert list(tok.encode("")) == []


@given(ids=st.lists(st.integers(0, 255), max_size=64))
def test_byte_decode_invalid_utf8_replaces(data, ids):
    want = bytes(ids).decode("utf-8", errors="replace")
    assert data.ByteTokenizer().decode(ids) == want, f"decode({ids}): expected {want!r}"


@pytest.mark.parametrize("bad", [[256], [-1], [65, 1000]])
def test_byte_decode_out_of_range(data, bad):
    with pytest.raises(ValueError):
        data.ByteTokenizer().decode(bad)


# -- the character vocabulary ---------------------------------------------------------------


@given(text=st.text(min_size=1, max_size=200))
def test_char_vocab_round_trip(data, text):
    vocab = data.CharVocab(text)
    chars = sorted(set(text))
    assert vocab.vocab_size == len(chars), f"{vocab.vocab_size} ids for {len(chars)} distinct characters"
    ids = vocab.encode(text)
    assert list(ids) == [chars.index(c) for c in text], "ids are not the characters' code-point ranks"
    assert vocab.decode(ids) == text


def test_char_vocab_unknown_character(data):
    vocab = data.CharVocab("to be or not to be")
    with pytest.raises(ValueError, match="'!'"):
        vocab.encode("to be!")
    with pytest.raises(ValueError):
        vocab.decode([vocab.vocab_size])


def test_char_vocab_is_deterministic(data):
    a, b = data.CharVocab("hello world"), data.CharVocab("dlrow olleh")
    assert a.encode("hello") == b.encode("hello"), "the same characters must get the same ids, whatever their order"


# -- windows and their shifted targets -------------------------------------------------------


@given(n=st.integers(2, 120), block=st.integers(1, 16), stride=st.integers(1, 20))
def test_windows(data, n, block, stride):
    if n < block + 1:
        with pytest.raises(ValueError):
            data.windows(list(range(n)), block, stride)
        return
    tokens = np.arange(1000, 1000 + n)
    x, y = data.windows(tokens.tolist(), block, stride)
    x, y = np.array(x), np.array(y)
    view = np.lib.stride_tricks.sliding_window_view(tokens, block + 1)[::stride]  # (n_windows, block + 1)
    assert x.shape == y.shape == (view.shape[0], block), f"shapes {x.shape}, {y.shape}; expected {(view.shape[0], block)}"
    np.testing.assert_array_equal(x, view[:, :-1], err_msg="inputs")
    np.testing.assert_array_equal(y, view[:, 1:], err_msg="targets: the inputs shifted by one")


def test_windows_default_stride_is_block_size(data):
    x, y = data.windows(list(range(10)), 3)
    assert np.array(x).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert np.array(y).tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


# -- the train/validation split -----------------------------------------------------------


@given(n=st.integers(0, 500), frac=st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5, 0.9]))
def test_train_val_split(data, n, frac):
    tokens = list(range(n))
    train, val = data.train_val_split(tokens, frac)
    assert list(train) + list(val) == tokens, "the split must keep every token, in order"
    assert len(val) == round(n * frac), f"{len(val)} validation tokens of {n} at fraction {frac}"
    again = data.train_val_split(tokens, frac)
    assert (list(again[0]), list(again[1])) == (list(train), list(val)), "not deterministic"


@pytest.mark.parametrize("frac", [-0.1, 1.0, 1.5])
def test_train_val_split_rejects_fraction(data, frac):
    with pytest.raises(ValueError):
        data.train_val_split(list(range(10)), frac)
