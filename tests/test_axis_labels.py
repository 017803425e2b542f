"""Issue 21: one token-to-axis rule (AxisLabels) for the plots, the page, saving and the command line.

Before it, each decided on its own: the plot labelled the axis one list fits and left the other
bare, the page refused such a call; saving accepted tokens that label some axis of some call, the
page then refused the saved capture; the plot drew a label whole, the page cut it to 64
characters; no view read one list per batch item (the page labelled every item with the first).
"""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from attention_hooker import AttentionHookerError, load, plot_attention_grid, render_html
from attention_hooker.views.labels import AxisLabels, kept_labels, shown_label, thinned_positions

SOURCE, TARGET = ["s0", "s1", "s2", "s3", "s4"], ["t0", "t1", "t2"]


def _meta(page):
    return json.loads(re.search(r'id="ah-meta">(.*?)</script>', page.html, re.S).group(1))


def _page_axes(page, layer=0, call=0):
    """``(query labels, key labels)`` of a call as the page carries them (an index per batch item
    becomes a list of label lists)."""
    meta = _meta(page)
    entry = meta["layers"][layer]["calls"][call]

    def labels(index):
        if isinstance(index, list):
            return [labels(i) for i in index]
        return None if index is None else meta["tokenSets"][index]

    return labels(entry["queryTokens"]), labels(entry["keyTokens"])


def _plot_axes(fig):
    """``(query labels, key labels)`` of a grid's first panel (one head drawn)."""
    ax = next(ax for ax in fig.axes if ax.get_title().startswith("head"))
    return [t.get_text() for t in ax.get_yticklabels()] or None, [t.get_text() for t in ax.get_xticklabels()] or None


# --------------------------------------------------------------------------------- the rule itself
def test_one_flat_list_labels_both_axes_of_self_attention_and_the_axis_it_fits_of_another_call():
    labels = AxisLabels(SOURCE)
    assert labels.axes((1, 4, 5, 5)) == (SOURCE, SOURCE)
    assert labels.axes((2, 4, 5, 5), batch_index=1) == (SOURCE, SOURCE), "one list: every batch item"
    assert labels.axes((1, 4, 1, 5)) == (None, SOURCE), "a generation step: one query row, the keys labelled"
    assert labels.axes((1, 4, 3, 3)) == (None, None)
    assert not AxisLabels(None).given and AxisLabels(None).axes((1, 1, 2, 2)) == (None, None)


def test_one_list_per_batch_item_labels_that_item():
    first, second = ["a", "b", "c"], ["x", "y", "z"]
    labels = AxisLabels([first, second])
    assert labels.per_batch(2) and not labels.per_batch(1) and not labels.per_batch(3)
    assert labels.axes((2, 4, 3, 3), batch_index=0) == (first, first)
    assert labels.axes((2, 4, 3, 3), batch_index=1) == (second, second)
    assert labels.axes((2, 4, 3, 3), batch_index=-1) == (second, second)
    assert labels.axes((1, 4, 3, 3)) == (first, first), "one batch item: the lists are lists of a length, the first wins"


def test_a_cross_attention_pair_labels_each_axis_with_the_list_of_its_length():
    labels = AxisLabels([SOURCE, TARGET])
    assert not labels.per_batch(2), "lists of different lengths are never one per batch item"
    assert labels.axes((2, 4, 5, 5)) == (SOURCE, SOURCE)  # the encoder
    assert labels.axes((2, 4, 3, 3)) == (TARGET, TARGET)  # the decoder
    assert labels.axes((2, 4, 3, 5)) == (TARGET, SOURCE)  # the decoder's queries over the encoder's keys
    explicit = AxisLabels(query_tokens=TARGET, key_tokens=SOURCE)
    assert explicit.axes((1, 4, 3, 5)) == (TARGET, SOURCE)
    assert explicit.axes((1, 4, 5, 3)) == (None, None), "an axis's own list labels that axis only"
    assert AxisLabels(SOURCE, query_tokens=list("qrstu")).axes((1, 1, 5, 5)) == (list("qrstu"), SOURCE), \
        "an axis's own list comes before tokens"


def test_a_capture_that_kept_some_rows_or_keys_labels_them_with_their_tokens():
    assert AxisLabels(SOURCE, rows="last").axes((1, 4, 1, 5)) == (["s4"], SOURCE)
    assert AxisLabels(SOURCE, rows=slice(0, None, 2), keys=[0, -1]).axes((1, 4, 3, 2)) == (["s0", "s2", "s4"],
                                                                                          ["s0", "s4"])
    assert AxisLabels(SOURCE, rows=[9]).axes((1, 4, 1, 5)) == (None, SOURCE), "a selection the tokens lack: no pair"
    assert kept_labels(SOURCE, [0, -1], "the text") == ["s0", "s4"]
    with pytest.raises(AttentionHookerError, match=r"rows=\[7\] names row\(s\) \[7\], but the text has 5 query rows"):
        kept_labels(SOURCE, [7], "the text")


def test_labels_that_fit_no_axis_are_one_message_naming_what_came_and_what_was_expected():
    calls = [("layer 'enc'", (1, 4, 5, 5)), ("layer 'dec'", (1, 4, 3, 3))]
    AxisLabels([SOURCE, TARGET]).check(calls)
    AxisLabels(SOURCE).check(calls)  # labels the encoder; the decoder shows its positions
    with pytest.raises(AttentionHookerError) as wrong:
        AxisLabels(["a", "b"]).check(calls)
    assert str(wrong.value) == ("2 tokens label no axis of the capture: layer 'enc' has 5 query and 5 key positions, "
                                "while the number of tokens is 2 (axis lengths there: [3, 5])")
    with pytest.raises(AttentionHookerError, match=r"^4 tokens label no axis .* the number of tokens is 4"):
        AxisLabels([SOURCE, list("abcd")]).check(calls)  # every list must label something
    with pytest.raises(AttentionHookerError) as wrong:
        AxisLabels(query_tokens=SOURCE).check([("it", (1, 2, 3, 5))], scope="the attention", hint="try again")
    assert str(wrong.value) == ("5 query tokens label no query axis of the attention: it has 3 query and 5 key "
                                "positions, while the number of query tokens is 5; try again")
    AxisLabels(SOURCE, rows="last").check([("layer 'x'", (1, 4, 1, 5))])
    with pytest.raises(AttentionHookerError, match="4 tokens label no axis"):
        AxisLabels(list("abcd"), rows="last").check([("layer 'x'", (1, 4, 1, 5))])
    for bad in ("abc", 3, [["a"], "b"]):
        with pytest.raises(AttentionHookerError, match="tokens must be a list|mixes labels and lists"):
            AxisLabels(bad)
    with pytest.raises(AttentionHookerError, match="query_tokens must be one list of token strings, got 2 lists"):
        AxisLabels(query_tokens=[["a"], ["b"]])


def test_a_label_is_shown_cut_to_64_characters_and_a_long_axis_every_nth():
    assert shown_label("fox") == "fox" and shown_label(7) == "7"
    assert shown_label("x" * 64) == "x" * 64 and shown_label("x" * 65) == "x" * 63 + "…"
    assert thinned_positions(3, 40) == [0, 1, 2] and thinned_positions(300, 30) == list(range(0, 300, 10))


# ------------------------------------------------------------------- each caller follows the rule
def test_the_plot_and_the_page_label_a_cross_attention_call_alike_from_one_list():
    """The plot labelled the keys one list fits and left the queries bare; the page refused the call."""
    cross = torch.rand(1, 2, 3, 5).softmax(-1)
    assert _plot_axes(plot_attention_grid(cross, tokens=SOURCE, heads=[0])) == (None, SOURCE)
    assert _page_axes(render_html({"cross": [cross]}, tokens=SOURCE)) == (None, SOURCE)
    assert _page_axes(render_html({"cross": [cross]}, query_tokens=TARGET)) == (TARGET, None)


def test_the_plot_cuts_long_labels_as_the_page_shows_them():
    """The plot drew a 100-character token whole across the figure; the page showed its first 64."""
    tokens = ["a", "x" * 100, "c"]
    weights = torch.rand(1, 1, 3, 3).softmax(-1)
    query, key = _plot_axes(plot_attention_grid(weights, tokens=tokens))
    assert query == key == ["a", "x" * 63 + "…", "c"]
    page = render_html({"layer": [weights]}, tokens=tokens)
    assert _meta(page)["labelChars"] == 64 and _page_axes(page)[1][1] == "x" * 100, "the page carries it whole"


def test_the_plot_and_the_page_read_one_list_per_batch_item():
    """The plot refused several lists; the page labelled batch item 1 with item 0's tokens."""
    first, second = ["a", "b", "c"], ["x", "y", "z"]
    weights = torch.rand(2, 1, 3, 3).softmax(-1)
    assert _plot_axes(plot_attention_grid(weights, tokens=[first, second], batch_index=1)) == (second, second)
    assert _page_axes(render_html({"layer": [weights]}, tokens=[first, second])) == ([first, second], [first, second])
    with pytest.raises(AttentionHookerError, match="tokens holds 2 lists; a plot takes one list"):
        plot_attention_grid(weights[:1], tokens=[first, second])


def test_the_page_shows_each_batch_items_own_tokens(tmp_path):
    api = pytest.importorskip("playwright.sync_api")
    from test_page import CHROMIUM, _Page

    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium here: apt-get install chromium")

    first, second = ["a", "b", "c"], ["x", "y", "z"]
    path = render_html({"layer": [torch.rand(2, 1, 3, 3).softmax(-1)]}, tokens=[first, second]).save(
        tmp_path / "per-item.html")
    with api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        view = _Page(chromium, path)
        try:
            shown = lambda: view.page.eval_on_selector_all("#ah-matrix-cols span", "els => els.map(e => e.textContent)")
            assert shown() == first and view.errors == []
            view.page.select_option("#ah-batch", "1")
            assert shown() == second
            assert view.page.inner_text("#ah-queries").split() == second
        finally:
            view.close()
            chromium.close()


def test_what_saving_accepts_the_page_shows_and_both_refuse_alike(tmp_path):
    """Saving took tokens that label some axis of some call; the page of that capture refused it."""
    values = {"encoder": [torch.rand(1, 2, 5, 5).softmax(-1)], "cross": [torch.rand(1, 2, 3, 5).softmax(-1)],
              "decoder": [torch.rand(1, 2, 3, 3).softmax(-1)]}
    from attention_hooker.io.saved import save_values

    save_values(values, tmp_path / "source-only.safetensors", tokens=SOURCE)
    page = render_html(load(tmp_path / "source-only.safetensors"))
    assert [_page_axes(page, layer) for layer in range(3)] == [(SOURCE, SOURCE), (None, SOURCE), (None, None)]
    messages = []
    for attempt in (lambda: save_values(values, tmp_path / "x.safetensors", tokens=["a", "b"]),
                    lambda: render_html(values, tokens=["a", "b"])):
        with pytest.raises(AttentionHookerError) as wrong:
            attempt()
        messages.append(str(wrong.value).split(";")[0])
    assert messages[0] == messages[1] == ("2 tokens label no axis of the capture: layer 'encoder' has 5 query and 5 "
                                          "key positions, while the number of tokens is 2 (axis lengths there: [3, 5])")


def test_the_command_line_saves_every_list_so_the_page_of_the_saved_capture_labels_every_axis(
        tmp_path, minilm_tokenizer, capsys):
    """``run --target --save`` saved the target's tokens only; the page of that file then refused
    the encoder's layers (no list of the source's length)."""
    transformers = pytest.importorskip("transformers")
    from attention_hooker.cli import main
    from attention_hooker.cli.models import token_labels

    folder = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        num_layers=1, num_decoder_layers=1, num_heads=2, d_model=16, d_kv=8, d_ff=32,
        vocab_size=minilm_tokenizer.vocab_size, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=102)).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    saved = tmp_path / "t5.safetensors"
    assert main(["run", "--model", str(folder), "--text", "translate this sentence", "--target", "das",
                 "--out", str(tmp_path / "o"), "--save", str(saved), "--no-grids"]) == 0
    capsys.readouterr()
    source = token_labels(minilm_tokenizer, minilm_tokenizer("translate this sentence")["input_ids"])
    target = token_labels(minilm_tokenizer, minilm_tokenizer("das")["input_ids"])
    capture = load(saved)
    assert capture.tokens == [source, target]
    page = render_html(capture)
    names = [layer["name"] for layer in _meta(page)["layers"]]
    axes = dict(zip(names, (_page_axes(page, i) for i in range(len(names)))))
    assert axes["encoder.block.0.layer.0.SelfAttention"] == (source, source)
    assert axes["decoder.block.0.layer.1.EncDecAttention"] == (target, source)
    run_page = SimpleNamespace(html=(tmp_path / "o" / "attention.html").read_text())
    assert [_page_axes(run_page, i) for i in range(len(names))] == list(axes.values()), \
        "the page of the run and the page of its saved capture label every axis alike"


# ------------------------------------------------------------------ issue 26: a thinned axis says where its labels are
def test_a_thinned_axis_of_a_plot_puts_each_labels_position_in_front_of_it():
    """Issue 26: long axes labelled sampled tokens without their positions ("the", "the", "." on 200 keys)."""
    tokens = [f"w{i % 7}" for i in range(200)]
    fig = plot_attention_grid(torch.rand(1, 1, 200, 200).softmax(-1), tokens=tokens, max_labels=40)
    ax = fig.axes[0]
    xs = [t.get_text() for t in ax.get_xticklabels()]
    assert xs[:3] == ["0 w0", "5 w5", "10 w3"] and len(xs) == 40
    fig = plot_attention_grid(torch.rand(1, 1, 6, 6).softmax(-1), tokens=tokens[:6])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == tokens[:6]  # every label shown: no positions


def test_kept_rows_are_labelled_with_their_places_in_the_input():
    tokens = [f"w{i}" for i in range(400)]
    kept = kept_labels(tokens, slice(None, None, 4), "the text")
    assert kept == tokens[::4] and kept.positions == list(range(0, 400, 4))
    fig = plot_attention_grid(torch.rand(1, 1, 100, 400).softmax(-1), query_tokens=kept, key_tokens=tokens)
    ys = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ys[:3] == ["0 w0", "12 w12", "24 w24"]  # rows 0, 3, 6 of the kept: input positions 0, 12, 24


def test_the_page_carries_the_places_of_kept_rows(tmp_path):
    weights = torch.rand(1, 2, 100, 400).softmax(-1)
    page = render_html({"layer": [weights]}, tokens=[f"w{i}" for i in range(400)],
                       query_tokens=kept_labels([f"w{i}" for i in range(400)], slice(None, None, 4), "x"))
    call = _meta(page)["layers"][0]["calls"][0]
    assert call["queryPositions"] == list(range(0, 400, 4)) and "keyPositions" not in call
