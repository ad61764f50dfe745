"""Topic 1.6: generating a response.

A prompt becomes token ids (byte-level BPE tokenizer, chat template), the
model is run token by token (decode loop), and the ids become text again as
they arrive (streaming detokenization).

Checked against: transformers' tokenizer built from the same GGUF (the HF
`tokenizers` library underneath) for ids, bytes and text, all exact (the
bookkeeping rung of the ladder); tokenizer.json folders against `tokenizers`
reading the same file; the chat template against transformers'
apply_chat_template; the decode loop's stop rules (EOS, stop strings, max
tokens, context) exactly, on a scripted model; the greedy answer of the real
model against transformers' generate; the chat command's output and errors.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spec.chat_command import (
    GENERATED,
    WEEK1,
    assert_one_line_error,
    interrupt_chat,
    run_chat,
    stats_lines,
)

# --- tokenizer ---

# Each entry is one kind of text a byte-level BPE gets wrong in its own way.
CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock!",
    "code": "def f(x):\n    if x:\n        return [i**2 for i in range(x)]  # squares\n\treturn None\n",
    "whitespace": "a  b   c\t\td\n\ne \r\n  \n   f    \t \n",
    "space_before_digit": "a  1 x   22\n 3",
    "numbers": "1234567890123456789 3.14159 -42 1e-10 0x1F 2,024,000",
    "emoji": "I ❤️ this 👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 England 🏴󠁧󠁢󠁥󠁮󠁧󠁿",
    "cjk": "你好，世界！日本語のテキストです。한국어 문장입니다.",
    "accented": "héllo wörld, café naïve façade Ångström e\u0301 (combining)",
    "scripts": "Привет мир, مرحبا بالعالم, नमस्ते दुनिया, Γειά σου",
    "mixed": "abc日本語123мир😀x'sé\u00a0\u3000end",
    "contractions": "don't can't I'm we'll you've they're she'd DON'T It'S",
    "special_tokens": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "special_glued": "x<|im_end|>y  <|endoftext|>  <|im_start|><|im_start|>",
    # \s is Unicode White_Space: \x85 and \u2028 are, \x1c-\x1f (Python's \s) are not.
    "control_chars": "a\x1c\x1c b  \x1c \x00\x06\x7f\x1d c  \x0b\x0c  \x85 d  \u2028 e  \x1f",
    "empty": "",
}

# Pieces that exercise the pre-tokenizer's edges, mixed into drawn text.
FRAGMENTS = [" ", "  ", "\t", "\n", "\r\n", " \n ", "'s", "'T", "'ll", "don't", "7", "2024", " 99",
             "3.14", "👨\u200d👩\u200d👧", "🇫🇷", "👍🏽", "中文", "é", "e\u0301", "\u00a0", "\u3000",
             "\x1c", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

# SmolLM2's vocab has no token for these control bytes: they vanish in encode
# (HF drops them too, checked by the id tests), so no round trip for them.
NO_TOKEN_CHARS = "\x04\x06\x13\x14\x16\x1d"

# Lone surrogates have no UTF-8; unassigned code points are left out because
# their category depends on the Unicode version of each regex engine.
CHARS = st.characters(exclude_categories=("Cs", "Cn"))


def texts(chars=CHARS, max_pieces: int = 12):
    """Text built from drawn runs of characters and pre-tokenizer edge cases."""
    piece = st.one_of(st.text(chars, max_size=8), st.sampled_from(FRAGMENTS))
    return st.lists(piece, max_size=max_pieces).map("".join)


def _reference():
    try:
        import transformers  # noqa: F401

        import reference.tokenizer as ref
    except ImportError as e:
        pytest.fail(f"the reference tokenizer needs transformers ({e}); install the references with:"
                    " pip install --group reference (or: pip install 'transformers>=4.56' gguf)")
    return ref


@pytest.fixture(scope="session")
def gguf_meta(default_model) -> dict:
    import mlx.core as mx

    return mx.load(str(default_model), return_metadata=True)[1]


@pytest.fixture(scope="session")
def tokenizer(impl, gguf_meta):
    return impl.tokenizer.Tokenizer.from_gguf_metadata(gguf_meta)


@pytest.fixture(scope="session")
def hf(default_model):
    return _reference().hf_tokenizer(default_model)


def hf_ids(hf, text: str, allow_special: bool = True) -> list[int]:
    return hf(text, add_special_tokens=False, split_special_tokens=not allow_special)["input_ids"]


def first_difference(got, expected) -> int:
    return next((k for k, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))


def assert_same_ids(got: list[int], expected: list[int], what: str) -> None:
    if got != expected:
        i = first_difference(got, expected)
        raise AssertionError(f"{what}: ids differ first at position {i} (of {len(got)} got, {len(expected)}"
                             f" expected): got {got[i:i + 4]}, expected {expected[i:i + 4]}")


def assert_same_text(got: str, expected: str, what: str) -> None:
    if got == expected:
        return
    i = first_difference(got, expected)
    raise AssertionError(f"{what}: text differs first at character {i}:"
                         f" got {got[i:i + 10]!r}, expected {expected[i:i + 10]!r} (whole: {expected!r})")


def stream(impl, tokenizer, ids: list[int]) -> tuple[list[str], str]:
    """Pieces emitted id by id, then the finalize piece; and the detokenizer's `text`."""
    detok = impl.tokenizer.StreamingDetokenizer(tokenizer)
    pieces = [detok.add_token(i) for i in ids]
    pieces.append(detok.finalize())
    return pieces, detok.text


@pytest.mark.presence
def test_has_names(impl):
    mod = impl.tokenizer
    for name in ("Tokenizer", "StreamingDetokenizer"):
        assert hasattr(mod, name), f"impl.tokenizer has no {name}"
    for name in ("from_gguf_metadata", "from_hf_folder", "encode", "decode", "token_bytes"):
        assert hasattr(mod.Tokenizer, name), f"impl.tokenizer.Tokenizer has no {name}"
    for name in ("add_token", "finalize", "text"):
        assert hasattr(mod.StreamingDetokenizer, name), f"impl.tokenizer.StreamingDetokenizer has no {name}"
    for module, name in (("chat_template", "ChatTemplate"), ("generate", "generate_step"),
                         ("generate", "stream_generate"), ("generate", "generate"), ("cli", "main")):
        assert hasattr(getattr(impl, module), name), f"impl.{module} has no {name}"


def test_attributes_match_hf(tokenizer, hf):
    assert tokenizer.vocab_size == len(hf), f"vocab_size {tokenizer.vocab_size}, expected {len(hf)}"
    assert tokenizer.bos_token_id == hf.bos_token_id, f"bos {tokenizer.bos_token_id}, expected {hf.bos_token_id}"
    assert tokenizer.eos_token_id == hf.eos_token_id, f"eos {tokenizer.eos_token_id}, expected {hf.eos_token_id}"
    special = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert set(tokenizer.special_ids) == special, f"special_ids {sorted(tokenizer.special_ids)}, expected {sorted(special)}"


def test_token_bytes_match_hf(tokenizer, default_model):
    expected = _reference().hf_token_bytes(default_model)
    bad = [i for i in range(len(expected)) if tokenizer.token_bytes(i) != expected[i]]
    assert not bad, (f"{len(bad)} tokens have other bytes; first id {bad[0]}:"
                     f" got {tokenizer.token_bytes(bad[0])!r}, expected {expected[bad[0]]!r}")


@pytest.mark.parametrize("name", CORPUS)
def test_encode_matches_hf(tokenizer, hf, name):
    text = CORPUS[name]
    assert_same_ids(tokenizer.encode(text), hf_ids(hf, text), f"encode({text!r})")


@pytest.fixture(scope="session")
def coder_tokenizers(impl, coder_gguf):
    """(impl's, transformers') tokenizers of Qwen2.5-Coder-0.5B: Qwen2's pre-tokenizer, 151k tokens.
    The metadata comes from the gguf package's reader (mx.load cannot read this file's k-quants)."""
    import gguf

    meta = {k: f.contents() for k, f in gguf.GGUFReader(coder_gguf).fields.items()}
    return impl.tokenizer.Tokenizer.from_gguf_metadata(meta), _reference().hf_tokenizer(coder_gguf)


@pytest.mark.parametrize("name", CORPUS)
def test_qwen2_pre_tokenizer_encodes_like_hf(coder_tokenizers, name):
    tokenizer, hf = coder_tokenizers
    text = CORPUS[name]
    assert_same_ids(tokenizer.encode(text), hf_ids(hf, text), f"Qwen2.5-Coder: encode({text!r})")


@pytest.fixture(scope="session")
def gemma_tokenizers(impl, gemma_gguf):
    """(impl's, transformers') tokenizers of Gemma 3 270M: SentencePiece-style BPE over characters
    ("▁" for a space, byte fallback, merges in vocabulary order), 262,144 tokens."""
    import gguf

    reader = gguf.GGUFReader(gemma_gguf)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return impl.tokenizer.Tokenizer.from_gguf_metadata(meta), _reference().hf_tokenizer(gemma_gguf)


@pytest.mark.parametrize("name", CORPUS)
def test_sentencepiece_encodes_like_hf(gemma_tokenizers, name):
    tokenizer, hf = gemma_tokenizers
    text = CORPUS[name]
    assert_same_ids(tokenizer.encode(text), hf_ids(hf, text), f"Gemma 3: encode({text!r})")
    assert_same_text(tokenizer.decode(tokenizer.encode(text)), hf.decode(hf_ids(hf, text)),
                     f"Gemma 3: decode(encode({text!r}))")


@given(data=st.data())
def test_sentencepiece_matches_hf_on_drawn_text_and_ids(gemma_tokenizers, data):
    tokenizer, hf = gemma_tokenizers
    text = data.draw(texts(), label="text")
    assert_same_ids(tokenizer.encode(text), hf_ids(hf, text), f"Gemma 3: encode({text!r})")
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=12), label="ids")
    assert_same_text(tokenizer.decode(ids), hf.decode(ids), f"Gemma 3: decode({ids})")


def test_sentencepiece_attributes_and_special_tokens_match_hf(gemma_tokenizers):
    tokenizer, hf = gemma_tokenizers
    assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        len(hf), hf.bos_token_id, hf.eos_token_id), "Gemma 3: vocab size, bos or eos differ from HF's"
    special = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert set(tokenizer.special_ids) == special, "Gemma 3: special ids differ from HF's"
    turn = "<start_of_turn>user\nWrite a poem<end_of_turn>\n<start_of_turn>model\n"
    assert_same_ids(tokenizer.encode(turn), hf_ids(hf, turn), "Gemma 3: a chat turn")
    assert_same_ids(tokenizer.encode(turn, allow_special=False), hf_ids(hf, turn, allow_special=False),
                    "Gemma 3: a chat turn with special tokens as text")
    long = "\n".join(CORPUS.values()) * 4  # one sequence of symbols: no pre-tokenizer splits it
    assert_same_ids(tokenizer.encode(long), hf_ids(hf, long), "Gemma 3: a long text")


def test_a_plain_prompt_starts_as_hf_starts_it(impl, tokenizer, hf, gemma_tokenizers):
    """A prompt with no chat template (a base model's; LLM.generate's text) gets what HF's tokenizer
    adds by default: <bos> for Gemma (its GGUF's add_bos_token), nothing for SmolLM2."""
    for (tok, ref), what in (((tokenizer, hf), "SmolLM2"), (gemma_tokenizers, "Gemma 3")):
        text = CORPUS["english"]
        assert_same_ids(impl.tokenizer.encode_prompt(tok, text), ref(text)["input_ids"], f"{what}: encode_prompt")


@given(data=st.data())
def test_encode_matches_hf_on_drawn_text(tokenizer, hf, data):
    text = data.draw(texts(), label="text")
    assert_same_ids(tokenizer.encode(text), hf_ids(hf, text), f"encode({text!r})")


@pytest.mark.parametrize("name", ["special_tokens", "special_glued"])
def test_encode_special_tokens_as_text(tokenizer, hf, name):
    # allow_special=False: "<|im_start|>" in user text is ordinary characters.
    text = CORPUS[name]
    got = tokenizer.encode(text, allow_special=False)
    assert_same_ids(got, hf_ids(hf, text, allow_special=False), f"encode({text!r}, allow_special=False)")
    assert not set(got) & set(tokenizer.special_ids), f"{text!r}: special ids {set(got) & set(tokenizer.special_ids)} with allow_special=False"


@pytest.mark.parametrize("name", CORPUS)
def test_decode_round_trip(tokenizer, name):
    text = CORPUS[name]
    expected = "".join(c for c in text if c not in NO_TOKEN_CHARS)
    assert_same_text(tokenizer.decode(tokenizer.encode(text)), expected, f"decode(encode({text!r}))")


@given(data=st.data())
def test_decode_round_trip_on_drawn_text(tokenizer, data):
    text = data.draw(texts(st.characters(exclude_categories=("Cs", "Cn"), exclude_characters=NO_TOKEN_CHARS)),
                     label="text")
    assert_same_text(tokenizer.decode(tokenizer.encode(text)), text, f"decode(encode({text!r}))")


@given(data=st.data())
def test_decode_matches_hf_on_drawn_ids(tokenizer, hf, data):
    # Arbitrary ids: lone UTF-8 fragments must become U+FFFD exactly where HF puts them.
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=12), label="ids")
    assert_same_text(tokenizer.decode(ids), hf.decode(ids), f"decode({ids})")


@pytest.mark.parametrize("name", ["emoji", "cjk", "accented", "special_tokens"])
def test_streaming_holds_back_partial_characters(impl, tokenizer, name):
    text = CORPUS[name]
    ids = tokenizer.encode(text)
    pieces, joined = stream(impl, tokenizer, ids)
    whole = tokenizer.decode(ids)
    assert_same_text("".join(pieces), whole, f"streamed pieces of {text!r}")
    assert_same_text(joined, whole, f"StreamingDetokenizer.text for {text!r}")
    broken = [(k, p) for k, p in enumerate(pieces) if "\ufffd" in p]
    assert not broken, f"{text!r}: piece {broken[0][0]} {broken[0][1]!r} has a broken character (U+FFFD)"
    emitted = ""
    for k, piece in enumerate(pieces):
        emitted += piece
        assert whole.startswith(emitted), f"{text!r}: after {k + 1} pieces emitted {emitted!r}, not a prefix of {whole!r}"


def test_streaming_splits_a_character_across_tokens(impl, tokenizer):
    # An emoji split over several byte tokens: nothing comes out until its last byte.
    ids = tokenizer.encode("🦙")
    assert len(ids) > 1, f"'🦙' is one token {ids}; this check needs one split across tokens"
    pieces, _ = stream(impl, tokenizer, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == "🦙", f"pieces {pieces}, expected '' x {len(ids) - 1} then '🦙'"


@given(data=st.data())
def test_streaming_joins_to_decode_on_drawn_ids(impl, tokenizer, data):
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=12), label="ids")
    pieces, joined = stream(impl, tokenizer, ids)
    assert_same_text("".join(pieces), tokenizer.decode(ids), f"streamed pieces of {ids}")
    assert_same_text(joined, tokenizer.decode(ids), f"StreamingDetokenizer.text for {ids}")
    for piece in pieces:
        piece.encode("utf-8")  # raises on a lone surrogate


@pytest.mark.parametrize("pre", [None, "digits", "qwen2"])
def test_from_hf_folder_matches_tokenizers(impl, default_model, tmp_path, pre):
    # None: transformers' own; digits: SmolLM2's tokenizer.json on the Hub; qwen2: Split + NFC.
    reference = _reference().write_hf_folder(default_model, tmp_path, pre)
    tok = impl.tokenizer.Tokenizer.from_hf_folder(tmp_path)
    for text in CORPUS.values():
        expected = reference.encode(text, add_special_tokens=False).ids
        assert_same_ids(tok.encode(text), expected, f"pre-tokenizer {pre}: encode({text!r})")
    # The folder's tokenizer_config.json names bos and eos as transformers' GGUF tokenizer has them.
    hf = _reference().hf_tokenizer(default_model)
    want = (reference.token_to_id(hf.bos_token), reference.token_to_id(hf.eos_token))
    assert (tok.bos_token_id, tok.eos_token_id) == want, f"bos/eos {(tok.bos_token_id, tok.eos_token_id)}, expected {want}"


@pytest.mark.parametrize("key, value", [("tokenizer.ggml.model", "t5"), ("tokenizer.ggml.pre", "no-such-pre")])
def test_unsupported_tokenizer_raises(impl, gguf_meta, key, value):
    meta = {**gguf_meta, key: value}
    with pytest.raises(ValueError, match="supported"):
        impl.tokenizer.Tokenizer.from_gguf_metadata(meta)


# --- chat template ---

CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "What is the capital of France?"}],
    "with_system": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi!"}],
    "multi_turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke 😀"}],
}


@pytest.fixture(scope="session")
def chat_template(impl, gguf_meta, tokenizer):
    return impl.chat_template.ChatTemplate(gguf_meta["tokenizer.chat_template"], tokenizer)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(chat_template, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    got = chat_template.render(messages, add_generation_prompt=add_generation_prompt)
    want = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert_same_text(got, want, f"chat template {name}")


# --- the decode loop, with a scripted model (exact bookkeeping, no weights) ---


class ScriptedModel:
    """Predicts `script[i]` as the i-th new token, whatever the input: tests the loop, not the model."""

    def __init__(self, script: list[int], prompt_len: int, vocab: int, context: int = 8192):
        from types import SimpleNamespace

        import mlx.core as mx

        self.mx, self.script, self.prompt_len, self.vocab = mx, script, prompt_len, vocab
        self.args = SimpleNamespace(max_position_embeddings=context, eos_token_id=None)
        self.calls: list[int] = []

    def __call__(self, inputs, *args, **kwargs):
        mx = self.mx
        L = inputs.shape[1]
        self.calls.append(L)
        token = self.script[min(L - self.prompt_len, len(self.script) - 1)]
        return mx.broadcast_to(mx.where(mx.arange(self.vocab) == token, 10.0, 0.0), (1, L, self.vocab))


def run(impl, tokenizer, script, prompt=(1, 2, 3), **kw):
    model = ScriptedModel(script, len(prompt), tokenizer.vocab_size, kw.pop("context", 8192))
    pieces, stats = [], None
    for g in impl.generate.stream_generate(model, tokenizer, list(prompt), **kw):
        pieces.append(g.text)
        stats = g.stats
    return pieces, stats, model


def test_decode_loop_recomputes_the_whole_sequence(impl, tokenizer):
    script = tokenizer.encode("one two three")
    _, stats, model = run(impl, tokenizer, script, max_tokens=len(script), step=impl.generate.generate_step)
    # Week 1 has no KV cache: step i runs the model over prompt + i tokens.
    assert model.calls == [3 + i for i in range(len(script))], model.calls


def test_stops_at_eos_without_emitting_it(impl, tokenizer):
    script = tokenizer.encode("The capital is Paris.") + [tokenizer.eos_token_id]
    pieces, stats, _ = run(impl, tokenizer, script, max_tokens=100)
    assert "".join(pieces) == "The capital is Paris.", pieces
    assert (stats.finish_reason, stats.generated_tokens) == ("stop", len(script))


def test_stops_at_max_tokens(impl, tokenizer):
    script = tokenizer.encode("a b c d e f g h")
    pieces, stats, _ = run(impl, tokenizer, script, max_tokens=3)
    assert "".join(pieces) == tokenizer.decode(script[:3]), pieces
    assert (stats.finish_reason, stats.generated_tokens) == ("length", 3)


@pytest.mark.parametrize("stop", ["Paris", "is P", ".\n\n", "s P"])
def test_stop_strings_end_the_text_before_them(impl, tokenizer, stop):
    text = "The capital is Paris.\n\nNext question"
    pieces, stats, _ = run(impl, tokenizer, tokenizer.encode(text), max_tokens=100, stop_strings=[stop])
    assert "".join(pieces) == text[: text.index(stop)], pieces
    assert stats.finish_reason == "stop"


def test_text_held_for_a_possible_stop_string_is_released(impl, tokenizer):
    # "Par" could start "Paris!"; when "Part" follows it is plain text after all.
    text = "Part of it"
    pieces, stats, _ = run(impl, tokenizer, tokenizer.encode(text), max_tokens=len(tokenizer.encode(text)),
                           stop_strings=["Paris!"])
    assert "".join(pieces) == text and stats.finish_reason == "length", pieces


def test_streamed_pieces_are_whole_characters(impl, tokenizer):
    text = "日本語 🦙 👨‍👩‍👧 café"
    pieces, _, _ = run(impl, tokenizer, tokenizer.encode(text), max_tokens=len(tokenizer.encode(text)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces), pieces


def test_prompt_longer_than_context_is_a_clear_error(impl, tokenizer):
    with pytest.raises(impl.errors.TinyLLMError, match="context"):
        run(impl, tokenizer, [5], prompt=list(range(10, 30)), context=16, max_tokens=4)


def test_generation_stops_at_the_context_length(impl, tokenizer):
    pieces, stats, model = run(impl, tokenizer, tokenizer.encode("a b c d e f g h i j"), context=8, max_tokens=50)
    assert stats.generated_tokens == 5 and max(model.calls) <= 8, (stats, model.calls)


# --- the whole pipeline on the real model, against transformers ---


def transformers_answer(default_model, messages: list[dict], max_tokens: int = 24,
                        margin: float | None = None) -> tuple[str, bool]:
    """transformers' greedy answer to `messages` (prompt from its apply_chat_template), as text, up
    to the first step whose top-2 logit gap is under `margin` (default GREEDY_MARGIN); and whether
    that is all of it."""
    import torch

    from reference.models import hf_folder_from_gguf, transformers_model
    from spec.ladder import GREEDY_MARGIN, MIN_GREEDY_TOKENS

    hf = _reference().hf_tokenizer(default_model)
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    x = torch.tensor([list(ids)])
    out = transformers_model(str(hf_folder_from_gguf(default_model))).generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False, output_scores=True,
        return_dict_in_generate=True, pad_token_id=hf.eos_token_id, eos_token_id=hf.eos_token_id)
    new = out.sequences[0, len(ids):].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    margin = GREEDY_MARGIN if margin is None else margin
    clear = next((i for i, g in enumerate(gaps) if g < margin), len(gaps))
    assert clear >= MIN_GREEDY_TOKENS, f"only {clear} steps had a clear top-2 gap: a vacuous check"
    print(f"transformers: {clear} of {len(gaps)} steps had a clear top-2 gap")
    return hf.decode([t for t in new[:clear] if t != hf.eos_token_id]), clear == len(gaps)


def assert_answer(text: str, want: str, whole: bool, what: str) -> None:
    """`text` is transformers' answer `want`, or starts with it when `want` stops at a near tie."""
    assert text == want if whole else text.startswith(want), f"{what}: {text!r}, transformers: {want!r}"


def test_greedy_answer_matches_transformers(impl, default_model, hf):
    loaded = impl.loader.load_model(default_model, quantized=False)  # week 1: dequantized at load
    messages = CONVERSATIONS["one_user"]
    ids = loaded.tokenizer.encode(loaded.chat_template.render(messages))
    ref_ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == list(ref_ids), "prompt ids differ from transformers' apply_chat_template"
    text, stats = impl.generate.generate(loaded.model, loaded.tokenizer, ids, max_tokens=24)
    assert_answer(text, *transformers_answer(default_model, messages), "impl.generate.generate")
    print(f"answer {text!r}")


@pytest.mark.parametrize("case", ["gguf-unigram", "folder-without-tokenizer"])
def test_bad_tokenizer_gives_one_line_error(impl, tmp_path, default_model, case):
    # The loader reads the tokenizer when it is first used (loading the model, 1.5, needs none).
    from reference.models import hf_folder_from_gguf

    if case == "gguf-unigram":  # as T5's GGUFs have: neither byte-level BPE nor SentencePiece's BPE
        expect = "unsupported tokenizer model 't5'"
        metadata = {"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["<s>", "</s>", "a", "b"]}
        loaded = impl.loader.LoadedModel(model=None, args=None, path=tmp_path / "model.gguf", metadata=metadata)
    else:
        path, expect = tmp_path / "folder", "tokenizer.json is missing"
        path.mkdir()
        for f in hf_folder_from_gguf(default_model).iterdir():  # links, not copies: the weights are 500 MB
            if f.name != "tokenizer.json":
                (path / f.name).symlink_to(f)
        loaded = impl.loader.load_model(path)
    with pytest.raises(impl.errors.TinyLLMError) as e:
        loaded.tokenizer  # noqa: B018
    assert expect in str(e.value) and "\n" not in str(e.value), f"{case}: {str(e.value)!r}"


# --- the chat command: week 1's model and decode loop ---


def test_cli_answers_and_reports_speed(impl, default_model):
    messages = CONVERSATIONS["one_user"]
    r = run_chat(impl, *WEEK1, messages[0]["content"], "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert_answer(r.stdout.removesuffix("\n"), *transformers_answer(default_model, messages), "the chat command")
    stats = stats_lines(r.stderr)
    assert stats and "tok/s" in stats[-1] and stats[-1].endswith("no KV cache]"), r.stderr
    generated = GENERATED.search(stats[-1])
    assert generated and 1 < int(generated[1]) <= 24, f"the stats line should say what was generated: {stats[-1]}"
    assert int(generated[2]) == int(generated[1]) - 1, f"decode makes all but the prefill's token: {stats[-1]}"


def test_cli_one_token_reports_no_decode_rate(impl):
    # The prefill makes the first token: with one, no decode step ran, so there is no rate to report.
    r = run_chat(impl, *WEEK1, "Name a color.", "--max-tokens", "1")
    assert r.returncode == 0, r.stderr
    stats = stats_lines(r.stderr)
    assert stats and stats[-1].count("tok/s") == 1, f"only the prefill's rate was measured: {r.stderr}"
    generated = GENERATED.search(stats[-1])
    assert generated and generated[1] == "1" and generated[2] is None, stats[-1]


@pytest.mark.parametrize("prompt", ["", " \n"], ids=["empty", "blank"])
def test_cli_empty_prompt_is_an_error(impl, prompt):
    r = run_chat(impl, *WEEK1, prompt)
    assert_one_line_error(r, "empty")
    assert "interactive chat" in r.stderr and "[loaded " not in r.stderr, r.stderr  # before the model loads


def test_cli_chat_stop_and_exit_end_their_lines(impl):
    # Ctrl-C stops the reply and the chat goes on; Ctrl-D then exits. Each ends the line it leaves open on
    # stdout (the reply, the `>>> ` prompt), so what comes next starts a line of its own wherever stderr goes.
    r = interrupt_chat(impl, *WEEK1, "--max-tokens", "200", prompt="Count from 1 to 100.")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(">>> ") and r.stdout.endswith("\n>>> \n") and r.stdout.count(">>> ") == 2, r.stdout
    assert "[stopped]" in r.stderr and not stats_lines(r.stderr), f"a stopped reply has no stats line: {r.stderr}"


@pytest.mark.parametrize("flags, message", [
    (["--max-tokens", "0"], "max-tokens"),
    (["--kv-cache-dtype", "int8"], "invalid choice"),  # argparse's own errors keep the contract too
    (["--top-k", "abc"], "invalid int value"),
    (["--model", "/no/such/model.gguf"], "not found"),
])
def test_cli_bad_input_is_one_line_and_nonzero(impl, flags, message):
    # The sampling flags' ranges are topic 1.7's (day_1_7_sampling.py).
    assert_one_line_error(run_chat(impl, *WEEK1, "hi", *flags), message)


def test_cli_prompt_longer_than_context(impl):
    r = run_chat(impl, *WEEK1, "word " * 9000)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-500:]
    assert "context" in r.stderr.strip().splitlines()[-1], r.stderr[-500:]
