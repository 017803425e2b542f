"""Attention between words and spans (issue 26): ``to_words`` against hand computations with numpy on the
real MiniLM's word pieces, and against invariants (rows stay distributions under Clark et al.'s rule)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_hooker import (AttentionHookerError, AttentionHookerTypeError, TransformerAttentionHooker,
                              WordAttention, WordValues, plot_attention_grid, plot_attention_overview, render_html,
                              to_words)

TEXT = "The unbelievably tokenizable sentence stays unexplained."


def _units(word_ids, keep=None):
    """The test's own grouping: [positions] per unit, a run of one word id or a special token alone."""
    units, last = [], object()
    for p, wid in enumerate(word_ids):
        if keep is not None and not keep[p]:
            last = object()
            continue
        if wid is not None and wid == last:
            units[-1].append(p)
        else:
            units.append([p])
        last = wid if wid is not None else object()
    return units


def _by_hand(attn: np.ndarray, units, rule: str) -> np.ndarray:
    """``(heads, query, key)`` -> ``(heads, words, words)`` with loops, as the rules are written."""
    query_op = {"clark": np.mean, "mean": np.mean, "sum": np.sum, "max": np.max}[rule]
    key_op = {"clark": np.sum, "mean": np.mean, "sum": np.sum, "max": np.max}[rule]
    out = np.zeros((attn.shape[0], len(units), len(units)))
    for h in range(attn.shape[0]):
        for i, qs in enumerate(units):
            for j, ks in enumerate(units):
                per_query = [key_op(attn[h, q, ks]) for q in qs]
                out[h, i, j] = query_op(per_query)
    return out


@pytest.fixture(scope="module")
def minilm_words(minilm_eager, minilm_tokenizer):
    """MiniLM's own attention (Hugging Face eager output_attentions, not a capture) and the hooker's capture."""
    enc = minilm_tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        reference = minilm_eager(**enc, output_attentions=True).attentions
    with torch.no_grad(), TransformerAttentionHooker(minilm_eager) as hooker:
        minilm_eager(**enc)
    return enc, reference, hooker


def test_split_words_are_split_in_this_text(minilm_words):
    enc, _, _ = minilm_words
    tokens, ids = enc.tokens(0), enc.word_ids(0)
    assert tokens[2:7] == ["un", "##bel", "##ie", "##va", "##bly"] and len(set(ids[2:7])) == 1
    assert len(_units(ids)) < len(ids) - 5  # several words of several pieces


@pytest.mark.parametrize("rule", ["clark", "mean", "sum", "max"])
def test_each_rule_is_the_hand_computation_on_minilms_word_pieces(minilm_words, minilm_tokenizer, rule):
    enc, reference, hooker = minilm_words
    words = to_words(hooker.values, enc.word_ids(0), rule=rule, tokens=enc.tokens(0), tokenizer=minilm_tokenizer)
    units = _units(enc.word_ids(0))
    assert isinstance(words, WordValues) and list(words) == list(hooker.values) and words.rule == rule
    for (name, calls), attn in zip(words.items(), reference):
        expected = _by_hand(attn[0].double().numpy(), units, rule)
        assert calls[0].shape == (1, 12, len(units), len(units)) and calls[0].dtype == torch.float32
        np.testing.assert_allclose(calls[0][0].double().numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)
    assert words.tokens == [["[CLS]", "the", "unbelievably", "tokenizable", "sentence", "stays", "unexplained", ".",
                             "[SEP]"]]
    assert words.spans[0][2] == (2, 7) and words.positions == len(enc.tokens(0))
    sums = words[next(iter(words))][0].sum(-1)  # (B, H, W)
    pieces = torch.tensor([len(u) for u in units], dtype=sums.dtype)
    if rule == "clark":  # Clark et al.: attention from a word is still a distribution over the words
        torch.testing.assert_close(sums, torch.ones_like(sums))
    elif rule == "sum":  # a word's row sums to its pieces
        torch.testing.assert_close(sums, pieces.expand_as(sums))
    else:
        assert not torch.allclose(sums, torch.ones_like(sums), atol=1e-3)


def test_the_encoding_itself_gives_word_ids_labels_and_padding(minilm_eager, minilm_tokenizer):
    """A padded batch: the padding is in no word, rows with fewer words are padded with zero units, and each
    sentence's words read the same as when it ran alone (the model masks the padding)."""
    texts = [TEXT, "Shortish overthinking."]
    batch = minilm_tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad(), TransformerAttentionHooker(minilm_eager) as hooker:
        minilm_eager(**batch)
    words = to_words(hooker, batch)
    assert len(words.tokens) == 2 and len(words.tokens[0]) == len(words.tokens[1])
    short = words.tokens[1]
    assert short[:6] == ["[CLS]", "shortish", "overthinking", ".", "[SEP]", ""] and set(short[5:]) == {""}
    n_short = 5
    for b, text in enumerate(texts):
        alone = minilm_tokenizer(text, return_tensors="pt")
        with torch.no_grad(), TransformerAttentionHooker(minilm_eager) as single:
            minilm_eager(**alone)
        expected = to_words(single, alone)
        n = len(expected.tokens[0])
        assert expected.tokens[0] == words.tokens[b][:n]
        for name in words:
            torch.testing.assert_close(words[name][0][b:b + 1, :, :n, :n], expected[name][0], atol=2e-5, rtol=1e-4)
    padded = words[next(iter(words))][0][1]  # (H, W, W)
    assert (padded[:, n_short:, :] == 0).all() and (padded[:, :, n_short:] == 0).all()
    torch.testing.assert_close(padded[:, :n_short].sum(-1), torch.ones(12, n_short))


def test_spans_make_a_prompts_parts_units_and_every_other_token_its_own(minilm_words):
    enc, reference, hooker = minilm_words
    tokens = enc.tokens(0)
    parts = {"subject": (1, 11), "rest": (11, len(tokens) - 1)}
    words = to_words(hooker.values, spans=parts, tokens=tokens)
    assert words.tokens == [["[CLS]", "subject", "rest", "[SEP]"]]
    units = [[0], list(range(1, 11)), list(range(11, len(tokens) - 1)), [len(tokens) - 1]]
    for (name, calls), attn in zip(words.items(), reference):
        np.testing.assert_allclose(calls[0][0].double().numpy(), _by_hand(attn[0].double().numpy(), units, "clark"),
                                   rtol=1e-5, atol=1e-6)
    unnamed = to_words(hooker.values, spans=[(11, len(tokens) - 1), (1, 11)], tokens=tokens)
    assert unnamed.tokens[0][1] == "the unbelievably tokenizable sentence"  # pieces joined, without a tokenizer
    torch.testing.assert_close(unnamed[next(iter(unnamed))][0], words[next(iter(words))][0])  # same units, any order
    labels = to_words(hooker.values, spans=[(1, 3, "first two")]).tokens[0]
    assert labels[:3] == ["t0", "first two", "t3"]  # without tokens: positions


def test_a_tensor_gives_word_attention_in_its_dtype_and_a_selection_of_rows_keeps_its_rows(minilm_words):
    enc, reference, hooker = minilm_words
    attn = reference[0]  # (1, 12, T, T)
    one = to_words(attn.to(torch.bfloat16), enc)
    assert isinstance(one, WordAttention) and one.weights.dtype == torch.bfloat16
    torch.testing.assert_close(one.weights.float().sum(-1), torch.ones(1, 12, 9), atol=2e-2, rtol=0)
    three_dims = to_words(attn[0], enc.word_ids(0))  # (heads, query, key): batch 1
    torch.testing.assert_close(three_dims.weights, to_words(attn, enc).weights)
    last_row = to_words(attn[:, :, -1:], enc)  # a capture that kept the last row: only its keys become words
    assert last_row.weights.shape == (1, 12, 1, 9)
    torch.testing.assert_close(last_row.weights, to_words(attn, enc, rule="sum").weights[:, :, -1:])


def test_word_values_pickle_and_copy_with_their_labels(minilm_words):
    enc, _, hooker = minilm_words
    words = to_words(hooker.values, enc)
    for again in (pickle.loads(pickle.dumps(words)), words.copy()):
        assert isinstance(again, WordValues) and again.tokens == words.tokens and again.rule == "clark"
        assert again.spans == words.spans and list(again) == list(words)
    assert repr(words).startswith(f"WordValues(6 layers, 6 calls, 9 words of {len(enc.tokens(0))} tokens, rule 'clark'")


def test_mistakes_are_refused_with_a_message_naming_them(minilm_words):
    enc, _, hooker = minilm_words
    values, ids, n = hooker.values, enc.word_ids(0), len(enc.word_ids(0))
    cases = [
        (dict(word_ids=ids, rule="first"), AttentionHookerError, "rule='first' is not one of 'clark', 'mean', 'sum', 'max'"),
        (dict(word_ids=ids[:-1]), AttentionHookerError, f"word_ids has {n - 1} positions, while the attention has {n} keys"),
        (dict(spans=[(0, 4), (3, 6)]), AttentionHookerError, r"spans \(0, 4\) and \(3, 6\) overlap \(positions 3..3\)"),
        (dict(spans={"a": (2, 40)}), AttentionHookerError, f"span 'a' = \\(2, 40\\) is outside the {n} token positions"),
        (dict(spans=[(3, 3)]), AttentionHookerError, "or empty; expected 0 <= start < end"),
        (dict(), AttentionHookerTypeError, "give word_ids .* or spans="),
        (dict(word_ids=ids, spans=[(0, 1)]), AttentionHookerTypeError, "one of them"),
        (dict(word_ids=[None] + [-1] * (n - 1)), AttentionHookerError, r"word_ids\[1\] is -1; expected a word index"),
        (dict(word_ids=[None, "a"] + [0] * (n - 2)), AttentionHookerTypeError, r"word_ids\[1\] is 'a'"),
        (dict(spans=[(0, 1.5)]), AttentionHookerTypeError, r"spans\[0\] is \(0, 1.5\); expected \(start, end\)"),
        (dict(word_ids="abc"), AttentionHookerTypeError, "word_ids must be a list"),
        (dict(word_ids=ids, tokens=["a"] * (n + 1)), AttentionHookerError, f"tokens has {n + 1} positions"),
        (dict(word_ids=[ids, ids, ids]), AttentionHookerError, "the word ids hold 3 rows, while layer .* has batch 1"),
        (dict(word_ids=ids, tokenizer=object()), AttentionHookerTypeError, "tokenizer must have convert_tokens_to_string"),
        (dict(word_ids=ids, layers=["nope"]), AttentionHookerError, r"unknown layer\(s\) \['nope'\]"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            to_words(values, **kwargs)
    mixed = {"encoder": values[next(iter(values))], "decoder": [torch.rand(1, 2, 4, 4).softmax(-1)]}
    with pytest.raises(AttentionHookerError, match=r"layer 'decoder' call 0 has 4 keys, while the word ids cover"):
        to_words(mixed, enc)
    from transformers import BatchEncoding  # what a slow (Python) tokenizer gives: no encodings, no word ids

    slow = BatchEncoding({"input_ids": enc["input_ids"].tolist()})
    with pytest.raises(AttentionHookerTypeError, match="slow .* tokenizer"):
        to_words(values, slow)
    with pytest.raises(AttentionHookerError, match="unknown layer 'x'"):
        to_words(values, enc).attention("x")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=1, max_size=12), st.integers(1, 3),
       st.integers(0, 2**31 - 1))
def test_invariants_on_any_word_ids(ids, heads, seed):
    """Clark: each word's row is a distribution; sum: the whole weight is kept; max: no weight grows."""
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    attn = torch.randn(2, heads, n, n, generator=g, dtype=torch.float64).mul(3).softmax(-1)
    clark = to_words(attn, ids).weights
    units = _units(ids)
    assert clark.shape == (2, heads, len(units), len(units))
    torch.testing.assert_close(clark.sum(-1), torch.ones(2, heads, len(units), dtype=torch.float64))
    total = to_words(attn, ids, rule="sum").weights
    torch.testing.assert_close(total.sum((-2, -1)), torch.full((2, heads), float(n), dtype=torch.float64))
    assert to_words(attn, ids, rule="max").weights.max() <= attn.max()
    expected = _by_hand(attn[1].numpy(), units, "mean")
    np.testing.assert_allclose(to_words(attn, ids, rule="mean").weights[1].numpy(), expected, rtol=1e-10)


def test_the_views_label_their_axes_by_words(minilm_words, tmp_path):
    enc, _, hooker = minilm_words
    words = to_words(hooker.values, enc)
    name = next(iter(words))
    fig = plot_attention_grid(words.attention(name), layer_name=name)
    head = next(ax for ax in fig.axes if ax.get_title() == "head 0")
    assert [t.get_text() for t in head.get_yticklabels()] == words.tokens[0]
    assert "9 queries x 9 keys" in fig._suptitle.get_text()
    one = to_words(hooker.values[name][0], enc)  # one tensor: its labels travel with it
    fig = plot_attention_grid(one)
    bottom_left = next(ax for ax in fig.axes if ax.get_title() == "head 8")
    assert [t.get_text() for t in bottom_left.get_xticklabels()] == words.tokens[0]
    fig = plot_attention_overview(words)
    assert {ax.images[0].get_array().shape for ax in fig.axes if ax.images} == {(9, 9)}
    page = render_html(words)  # a page of words alone: the words label its axes
    assert '"unbelievably"' in page.html and '"##bel"' not in page.html


def test_spans_take_numpy_integers_as_word_ids_do():
    """Review of issue 26: spans=[(np.int64(0), 2)] was refused as "two ints"."""
    import numpy as np

    w = torch.rand(1, 2, 4, 4).softmax(-1)
    grouped = to_words(w, spans=[(np.int64(0), np.int32(2))])
    assert grouped.weights.shape == (1, 2, 3, 3)
    torch.testing.assert_close(grouped.weights, to_words(w, spans=[(0, 2)]).weights)
