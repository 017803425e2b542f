"""Comparing two captures (issue 26): Jensen-Shannon distances against scipy, the invariants,
pairing of layers, and every refusal naming what differs."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import attention_hooker
from attention_hooker import AttentionComparison, AttentionHookerError, TransformerAttentionHooker, compare, load
from attention_hooker.io.saved import save_values

scipy_distance = pytest.importorskip("scipy.spatial.distance")


def _attention(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * 2).softmax(-1)


def test_compare_and_its_result_are_exported():
    assert "compare" in attention_hooker.__all__ and "AttentionComparison" in attention_hooker.__all__
    assert attention_hooker.compare is compare


def test_row_distances_are_scipys_jensen_shannon_in_base_2():
    a, b = _attention(2, 3, 5, 7, seed=1), _attention(2, 3, 5, 7, seed=2)
    b[0, 1, 2] = a[0, 1, 2]  # one row the same in both
    c = compare({"layer": [a]}, {"layer": b})  # a mapping's value: a list of calls, or the call itself
    rows = c["layer"].row_distance
    assert rows.shape == (2, 3, 5) and rows.dtype == torch.float64
    expected = np.array([[[scipy_distance.jensenshannon(a[i, h, q].numpy(), b[i, h, q].numpy(), base=2)
                           for q in range(5)] for h in range(3)] for i in range(2)])
    np.testing.assert_allclose(rows.numpy(), expected, atol=1e-12)
    assert rows[0, 1, 2] == 0
    np.testing.assert_allclose(c["layer"].distance.numpy(), expected.mean(-1), atol=1e-12)  # (batch, heads)
    torch.testing.assert_close(c["layer"].difference, (a - b))
    assert c["layer"].difference.shape == (2, 3, 5, 7)


def test_rows_that_sum_to_less_than_one_compare_with_the_rest_as_one_more_outcome():
    a, b = _attention(1, 2, 3, 4, seed=3), _attention(1, 2, 3, 4, seed=4)
    a[..., 1, :] *= 0.6  # a learned sink took 40% of these rows (gpt-oss)
    rows = compare({"l": a}, {"l": b})["l"].row_distance
    for h in range(2):
        for q in range(3):
            p, r = a[0, h, q].numpy(), b[0, h, q].numpy()
            expected = scipy_distance.jensenshannon(np.append(p, 1 - p.sum()), np.append(r, 1 - r.sum()), base=2)
            assert rows[0, h, q].item() == pytest.approx(expected, abs=1e-12)


def test_invariants_identical_symmetric_bounded_and_disjoint_is_one():
    a, b = _attention(2, 4, 6, 6, seed=5), _attention(2, 4, 6, 6, seed=6)
    same = compare({"l": a}, {"l": a.clone()})
    assert same["l"].distance.abs().max() == 0 and same["l"].difference.abs().max() == 0
    ab, ba = compare({"l": a}, {"l": b}), compare({"l": b}, {"l": a})
    torch.testing.assert_close(ab["l"].row_distance, ba["l"].row_distance, rtol=0, atol=1e-15)
    torch.testing.assert_close(ab["l"].difference, -ba["l"].difference)
    assert bool(((ab["l"].row_distance >= 0) & (ab["l"].row_distance <= 1)).all())
    one_hot = torch.eye(4, dtype=torch.float64)[None, None]  # (1, 1, 4, 4): each query on itself
    disjoint = compare({"l": one_hot}, {"l": one_hot.roll(1, dims=-1)})
    assert disjoint["l"].distance.item() == pytest.approx(1.0)


def test_padded_queries_and_rows_without_weight_are_left_out_of_the_mean():
    a, b = _attention(2, 2, 4, 4, seed=7), _attention(2, 2, 4, 4, seed=8)
    a[1, :, 3], b[1, :, 3] = 0.0, 0.0  # batch item 1, query 3: every key masked in both
    c = compare({"l": a}, {"l": b})
    rows = c["l"].row_distance
    assert torch.isnan(rows[1, :, 3]).all()
    torch.testing.assert_close(c["l"].distance[1], rows[1, :, :3].mean(-1))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # item 1: its last two tokens are padding
    masked = compare({"l": a}, {"l": b}, padding_mask=mask)
    torch.testing.assert_close(masked["l"].distance[1], rows[1, :, :2].mean(-1))
    torch.testing.assert_close(masked["l"].distance[0], rows[0].mean(-1))
    one_empty = a.clone()
    one_empty[0, 0, 0] = 0.0  # a row with weight in B only is as far as can be: all of A's is on "no key"
    assert compare({"l": one_empty}, {"l": b})["l"].row_distance[0, 0, 0].item() == pytest.approx(1.0)
    with pytest.raises(AttentionHookerError, match=r"padding_mask is \(3, 4\), but layer 'l' has batch 2"):
        compare({"l": a}, {"l": b}, padding_mask=torch.ones(3, 4))


def test_heads_ranked_by_distance_and_the_per_layer_summary():
    base = {f"layer.{i}": _attention(1, 4, 5, 5, seed=10 + i) for i in range(3)}
    other = {name: w.clone() for name, w in base.items()}
    other["layer.1"][:, 2] = _attention(1, 5, 5, seed=99)  # layer 1 head 2 changed a lot
    other["layer.2"][:, 0] = (base["layer.2"][:, 0] * 0.9 + 0.1 / 5)  # layer 2 head 0 a little
    c = compare(base, other)
    ranked = c.ranked_heads()
    assert len(ranked) == 12 and [(h.layer, h.head) for h in ranked[:2]] == [("layer.1", 2), ("layer.2", 0)]
    assert all(h.distance == 0 for h in ranked[2:])
    assert c.ranked_heads(top=1) == ranked[:1]
    assert c.layer_distances["layer.0"] == 0 and c.layer_distances["layer.1"] == pytest.approx(ranked[0].distance / 4)
    assert c["layer.1"].most_different_head == 2
    assert c.table().shape == (3, 4) and c.table()[1, 2] == ranked[0].distance
    assert list(c) == ["layer.0", "layer.1", "layer.2"] and len(c) == 3
    assert "3 layers paired by name, 12 heads; most different: layer.1 head 2" in repr(c)
    with pytest.raises(AttentionHookerError, match="top=0 must be a positive int"):
        c.ranked_heads(top=0)


def test_hooker_values_and_saved_captures_compare_alike(tmp_path, minilm_sdpa, minilm_eager, minilm_tokenizer):
    enc = minilm_tokenizer("Attention is all you need.", return_tensors="pt")
    tokens = minilm_tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as sdpa:
        minilm_sdpa(**enc)
    with torch.no_grad(), TransformerAttentionHooker(minilm_eager) as eager:
        minilm_eager(**enc)
    live = compare(sdpa.values, eager.values)  # the same model by two attention routes: the same attention
    assert isinstance(live, AttentionComparison) and len(live) == 6 and live.pairing == "name"
    assert max(h.distance for h in live.ranked_heads()) < 1e-3
    save_values(sdpa.values, tmp_path / "a.safetensors", tokens=tokens)
    save_values(eager.values, tmp_path / "b.safetensors", tokens=tokens)
    saved = compare(load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors"))
    assert saved.tokens == tokens
    for name in live:
        torch.testing.assert_close(saved[name].distance, live[name].distance)


def test_layers_named_differently_are_paired_by_order_and_say_so():
    a = {"bert.encoder.layer.0": _attention(1, 2, 3, 3, seed=1), "bert.encoder.layer.1": _attention(1, 2, 3, 3, seed=2)}
    b = {"encoder.layer.0": a["bert.encoder.layer.0"], "encoder.layer.1": _attention(1, 2, 3, 3, seed=3)}
    c = compare(a, b)
    assert c.pairing == "order" and c.pairs == [("bert.encoder.layer.0", "encoder.layer.0"),
                                                ("bert.encoder.layer.1", "encoder.layer.1")]
    assert c["bert.encoder.layer.0"].distance.max() == 0 and c["bert.encoder.layer.1"].name_b == "encoder.layer.1"
    assert "paired by order" in repr(c)
    renamed = {"z": a["bert.encoder.layer.0"], "bert.encoder.layer.1": a["bert.encoder.layer.1"]}
    with pytest.raises(AttentionHookerError, match="only in A: 'bert.encoder.layer.0'; only in B: 'z'"):
        compare(a, renamed)  # some names shared: a mistake, not another model's names
    by_order = compare(a, renamed, pair_by="order")  # asked for: by position, whatever the names
    assert by_order.pairs[0] == ("bert.encoder.layer.0", "z") and max(h.distance for h in by_order.ranked_heads()) == 0


def test_refusals_name_what_differs(tmp_path):
    w = _attention(1, 2, 3, 3, seed=1)
    with pytest.raises(AttentionHookerError, match=r"different layers \(only in A: 'b'; only in B: 'c'\)"):
        compare({"a": w, "b": w}, {"a": w, "c": w})
    with pytest.raises(AttentionHookerError, match="A has 2 layers and B has 1, with no name in common"):
        compare({"a": w, "b": w}, {"c": w})
    with pytest.raises(AttentionHookerError, match="only in B: 'b'"):
        compare({"a": w}, {"a": w, "b": w}, pair_by="name")
    with pytest.raises(AttentionHookerError, match=r"layer 'a' has 2 heads in A and 4 in B: heads are compared one to one"):
        compare({"a": w}, {"a": _attention(1, 4, 3, 3)})
    with pytest.raises(AttentionHookerError, match=r"layer 'a' is \(1, 2, 3, 3\) in A and \(1, 2, 4, 4\) in B .*"
                                                   r"its query and key differ; compare captures of the same tokens"):
        compare({"a": w}, {"a": _attention(1, 2, 4, 4)})
    with pytest.raises(AttentionHookerError, match=r"layer 'x' \(A\) / 'y' \(B\) has 2 heads in A and 3"):
        compare({"x": w}, {"y": _attention(1, 3, 3, 3)})
    with pytest.raises(AttentionHookerError, match=r"token 1 is 'cat' in A and 'dog' in B"):
        compare({"a": w}, {"a": w}, tokens_a=["the", "cat", "sat"], tokens_b=["the", "dog", "sat"])
    save_values({"a": [w]}, tmp_path / "a.safetensors", tokens=["x", "y", "z"])
    save_values({"a": [w]}, tmp_path / "b.safetensors", tokens=["x", "y", "w"])
    with pytest.raises(AttentionHookerError, match=r"token 2 is 'z' in base and 'w' in tuned"):
        compare(load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors"), names=("base", "tuned"))
    with pytest.raises(AttentionHookerError, match=r"layer 'a' of A has 1 call\(s\); call=1 is out of range"):
        compare({"a": [w]}, {"a": [w]}, call=1)
    with pytest.raises(AttentionHookerError, match="layer 'a' of B holds negative weights"):
        compare({"a": w}, {"a": w - 0.5})
    with pytest.raises(AttentionHookerError, match="capture B: expected a hooker, a loaded capture"):
        compare({"a": w}, 3)
    with pytest.raises(AttentionHookerError, match=r"pair_by='size' must be one of \('auto', 'name', 'order'\)"):
        compare({"a": w}, {"a": w}, pair_by="size")
    with pytest.raises(AttentionHookerError, match="names=.* must be two different non-empty strings"):
        compare({"a": w}, {"a": w}, names=("A", "A"))


def test_the_call_compared_is_chosen():
    first, second = _attention(1, 1, 2, 2, seed=1), _attention(1, 1, 2, 2, seed=2)
    c = compare({"a": [first, second]}, {"a": [first, first]}, call=1)
    assert c.call == 1 and c["a"].distance.item() > 0
    assert compare({"a": [first, second]}, {"a": [first, first]})["a"].distance.item() == 0
    assert math.isnan(compare({"a": torch.zeros(1, 1, 2, 2)}, {"a": torch.zeros(1, 1, 2, 2)})["a"].mean)


def _changed_head():
    """Three layers of 4 heads; in B, layer 1 head 2 attends elsewhere."""
    base = {f"encoder.layer.{i}.attention.self": _attention(1, 4, 6, 6, seed=20 + i) for i in range(3)}
    other = {name: w.clone() for name, w in base.items()}
    other["encoder.layer.1.attention.self"][:, 2] = _attention(1, 6, 6, seed=98)
    return compare(base, other, tokens_a=list("abcdef"), names=("base", "tuned"))


def test_head_picture_shows_a_b_and_their_difference_on_a_scale_centred_at_zero(tmp_path):
    from attention_hooker import plot_head_comparison

    c = _changed_head()
    fig = plot_head_comparison(c, save_path=tmp_path / "head.png")  # default: the most different head
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["base", "tuned", "base - tuned"]
    assert "encoder.layer.1.attention.self head 2" in fig.texts[0].get_text()
    pair = c["encoder.layer.1.attention.self"]
    shown = [np.asarray(ax.images[0].get_array()) for ax in panels]
    np.testing.assert_allclose(shown[0], pair.a[0, 2].numpy(), rtol=1e-6)
    np.testing.assert_allclose(shown[1], pair.b[0, 2].numpy(), rtol=1e-6)
    np.testing.assert_allclose(shown[2], (pair.a - pair.b)[0, 2].numpy(), rtol=1e-6)
    a_norm, b_norm, diff_image = panels[0].images[0].norm, panels[1].images[0].norm, panels[2].images[0]
    assert (a_norm.vmin, a_norm.vmax) == (b_norm.vmin, b_norm.vmax)  # one scale for A and B
    largest = float((pair.a - pair.b)[0, 2].abs().max())
    assert diff_image.norm.vmin == pytest.approx(-largest) and diff_image.norm.vmax == pytest.approx(largest)
    assert diff_image.get_cmap().name.startswith("RdBu_r")
    assert (tmp_path / "head.png").stat().st_size > 10_000
    same = plot_head_comparison(c, "encoder.layer.0.attention.self", 1)  # an unchanged head: all the centre colour
    centre = same.axes[[ax.get_title() for ax in same.axes].index("base - tuned")].images[0]
    colours = centre.to_rgba(np.asarray(centre.get_array()))[..., :3]
    assert np.allclose(colours, centre.get_cmap()(0.5)[:3]) and colours.min() > 0.95  # near white
    with pytest.raises(AttentionHookerError, match="layer 'nope' is not in the comparison"):
        plot_head_comparison(c, "nope", 0)
    with pytest.raises(AttentionHookerError, match="expected the result of attention_hooker.compare"):
        plot_head_comparison({"l": [torch.ones(1, 1, 1, 1)]})


def test_distance_grid_draws_every_heads_distance_from_0_to_1(tmp_path):
    from attention_hooker import plot_distance_grid

    c = _changed_head()
    fig = plot_distance_grid(c, save_path=tmp_path / "grid.png")
    image = fig.axes[0].images[0]
    np.testing.assert_allclose(np.asarray(image.get_array()), c.table().numpy())
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 1.0)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["layer.0", "layer.1", "layer.2"]
    assert f"{c.ranked_heads(1)[0].distance:.2f}" in [t.get_text() for t in fig.axes[0].texts]
    assert (tmp_path / "grid.png").stat().st_size > 5_000


# --- the page's compare mode, in a real Chromium -------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    import os

    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium here: apt-get install chromium")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        yield browser
        browser.close()


def _shot(page, selector):
    """The element as Chromium drew it: ``(height, width, 3)`` floats in 0..1, and its box."""
    import io

    import matplotlib.image

    box = page.locator(selector).bounding_box()
    pixels = matplotlib.image.imread(io.BytesIO(page.screenshot(clip=box)), format="png")[..., :3]
    return pixels, box


def test_compare_page_shows_a_b_and_a_minus_b_by_pixels(browser, tmp_path):
    from attention_hooker import render_html

    c = _changed_head()
    path = render_html(c).save(tmp_path / "compare.html")
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        page.goto(f"file://{path}")
        page.wait_for_selector("body[data-ready='true']", timeout=30_000)
        assert page.is_visible("#ah-compare-panel") and page.is_visible("#ah-compare-show")
        assert page.input_value("#ah-overview-colour") == "JS distance base vs tuned"  # opens coloured by distance
        page.click("#ah-overview canvas[data-layer='1'][data-head='2']")
        distance = c["encoder.layer.1.attention.self"].head_distance[2].item()
        assert f"head 2: Jensen-Shannon distance {distance:.3f}" in page.inner_text("#ah-compare-caption")
        a, box = _shot(page, "#ah-compare-a")
        diff, _ = _shot(page, "#ah-compare-diff")
        assert a.shape == diff.shape and np.abs(a - diff).mean() > 0.2, "the A - B panel is not a copy of A"
        d = (c["encoder.layer.1.attention.self"].a - c["encoder.layer.1.attention.self"].b)[0, 2]  # (Q, K)

        def colour_at(pixels, q, k):  # the middle of cell (q, k), away from the 1 px border
            y = int((q + 0.5) / d.shape[0] * (pixels.shape[0] - 2)) + 1
            x = int((k + 0.5) / d.shape[1] * (pixels.shape[1] - 2)) + 1
            return pixels[y, x]

        q, k = divmod(int(d.argmax()), d.shape[1])
        red = colour_at(diff, q, k)
        assert red[0] > 0.3 and red[0] > red[2] + 0.2, f"A attends more at ({q}, {k}): red, got {red}"
        q, k = divmod(int(d.argmin()), d.shape[1])
        blue = colour_at(diff, q, k)
        assert blue[2] > blue[0] + 0.2, f"B attends more at ({q}, {k}): blue, got {blue}"
        page.click("#ah-overview canvas[data-layer='0'][data-head='1']")  # a head the same in both
        a, _ = _shot(page, "#ah-compare-a")
        diff, _ = _shot(page, "#ah-compare-diff")
        inner = diff[3:-3, 3:-3]
        assert np.abs(inner - 247 / 255).max() < 0.02, "a head that agrees draws A - B white"
        assert a[3:-3, 3:-3].std() > 0.05, "while A shows its attention"
        page.click("#ah-overview canvas[data-layer='1'][data-head='2']")
        matrix_a = page.eval_on_selector("#ah-matrix", "c => c.toDataURL()")
        page.select_option("#ah-compare-show", "b")  # every view now draws B
        assert page.eval_on_selector("#ah-matrix", "c => c.toDataURL()") != matrix_a
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
        assert re.search(r'query \d+ ".*" -> key \d+ ".*": base ~[\d.e-]+, tuned ~[\d.e-]+, difference ~-?[\d.e-]+$',
                         page.inner_text("#ah-compare-readout"))
        assert errors == []
    finally:
        page.close()


def test_compare_page_difference_codes_round_trip_and_refusals():
    from attention_hooker import render_html
    from attention_hooker.views.page.compare import decode_difference, encode_difference

    d = torch.randn(2, 3, 5, 4)
    codes, scales = encode_difference(d)
    assert torch.allclose(decode_difference(codes, scales), d, atol=float(scales.max()) / 254 + 1e-7)
    assert (encode_difference(torch.zeros(1, 1, 2, 2))[0] == 127).all()
    long = {"l": _attention(1, 1, 600, 600, seed=1).float()}
    with pytest.raises(AttentionHookerError, match=r"a compare page carries whole maps, up to pool_above=512"):
        render_html(compare(long, {"l": long["l"].flip(-1)}))
    with pytest.raises(AttentionHookerError, match=r"unknown layer\(s\) \['x'\]"):
        render_html(_changed_head(), layers=["x"])


# --- attention-hooker compare ---------------------------------------------------------------------

def _cli_error(capsys, *argv):
    from attention_hooker.cli import main

    status = main(list(argv))
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    return err.splitlines()[0]


@pytest.fixture(scope="module")
def perturbed_minilm(tmp_path_factory, minilm_path):
    """The real MiniLM with layer 3's query weights scaled by 3, saved with its tokenizer."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(minilm_path)
    with torch.no_grad():
        model.encoder.layer[3].attention.self.query.weight.mul_(3)
    path = tmp_path_factory.mktemp("perturbed") / "minilm-perturbed"
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return path


def test_cli_ranks_the_perturbed_layers_heads_first(minilm_path, perturbed_minilm, tmp_path, capsys):
    import csv

    from attention_hooker.cli import main

    out = tmp_path / "out"
    assert main(["compare", "--model", str(minilm_path), "--model", str(perturbed_minilm),
                 "--text", "The cat sat on the mat because it was tired.", "--out", str(out), "--top", "13"]) == 0
    printed = capsys.readouterr().out
    assert "layers:  6 paired by name, 12 heads each" in printed and "tokens:  13, the same for both" in printed
    assert "A:       all-MiniLM-L6-v2 (BertModel)" in printed and "B:       minilm-perturbed (BertModel)" in printed
    ranked = re.findall(r"^\s+(\d+)\. (\S+)\s+head (\d+)\s+([\d.]+)$", printed, re.M)
    assert [int(r[0]) for r in ranked] == list(range(1, 14))
    assert {r[1] for r in ranked[:12]} == {"encoder.layer.3.attention.self"}  # all 12 heads of the layer changed
    assert sorted(int(r[2]) for r in ranked[:12]) == list(range(12))
    assert ranked[12][1] != "encoder.layer.3.attention.self"
    distances = [float(r[3]) for r in ranked]
    assert distances == sorted(distances, reverse=True) and distances[11] > 2 * distances[12]
    for layer in range(3):  # before the changed layer, nothing changed
        assert re.search(rf"^  encoder\.layer\.{layer}\.attention\.self  0\.000$", printed, re.M)
    rows = list(csv.DictReader(open(out / "distances.csv")))
    assert len(rows) == 72 and {r["layer"] for r in rows[:12]} == {"encoder.layer.3.attention.self"}
    assert float(rows[0]["js_distance"]) == pytest.approx(distances[0], abs=1e-3)
    assert (out / "distances.png").stat().st_size > 10_000 and (out / "compare.html").stat().st_size > 10_000
    pictures = sorted(p.name for p in (out / "heads").glob("*.png"))
    assert len(pictures) == 3 and pictures[0].startswith(f"1_encoder.layer.3.attention.self_head{ranked[0][2]}")


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory):
    """A tiny BERT with its own word-level tokenizer: it makes other tokens of any text than MiniLM's."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "the", "cat", "sat", "on", "mat", "."]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]",
                                                     sep_token="[SEP]", pad_token="[PAD]")
    model = transformers.BertModel(transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                                           intermediate_size=64, vocab_size=len(words)))
    path = tmp_path_factory.mktemp("other") / "word-level"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_bad_inputs_are_one_line_with_status_2(minilm_path, other_tokenizer_model, tmp_path, capsys):
    text = ["--text", "the cat sat on the mat", "--out", str(tmp_path / "out")]
    assert _cli_error(capsys, "compare", "--model", str(minilm_path), *text) == (
        "attention-hooker compare: error: compare needs two models, --model A --model B; got 1")
    assert "compare needs two models" in _cli_error(capsys, "compare", *text)
    missing = tmp_path / "missing"
    assert f"model path {missing} does not exist" in _cli_error(
        capsys, "compare", "--model", str(minilm_path), "--model", str(missing), *text)
    message = _cli_error(capsys, "compare", "--model", str(minilm_path), "--model", str(other_tokenizer_model), *text)
    assert message == ("attention-hooker compare: error: the two models tokenize the text differently: token 0 is "
                       "'[CLS]' (id 101) for all-MiniLM-L6-v2 and '[CLS]' (id 1) for word-level; compare needs models that share "
                       "a tokenizer")
    longer = _cli_error(capsys, "compare", "--model", str(minilm_path), "--model", str(other_tokenizer_model),
                        "--text", "the cat sat on the zxqv mat", "--out", str(tmp_path / "out"))
    assert "the two models tokenize the text differently: all-MiniLM-L6-v2 makes 12 tokens and word-level makes 9" in longer
    assert "pass --text" in _cli_error(capsys, "compare", "--model", str(minilm_path), "--model", str(minilm_path),
                                       "--out", str(tmp_path / "out"))
    assert "is given twice" in _cli_error(capsys, "compare", "--model", str(minilm_path), "--model", str(minilm_path),
                                          *text)


def test_the_compare_panels_put_a_and_b_on_one_scale_of_the_pages_log_codes(browser, tmp_path):
    """A and B are drawn under the larger of their two largest weights. The page's codes are log-spaced
    (issue 26): the weaker map's codes must move down by log steps, not be multiplied (which drew a
    weight of half the shared largest as one of 1e-3 of it)."""
    from test_page import _viridis_lut

    from attention_hooker import render_html

    a = torch.full((1, 1, 4, 4), 0.25)
    a[0, 0, :, 0], a[0, 0, :, 1:] = 0.85, 0.05  # A's largest: 0.85
    b = torch.full((1, 1, 4, 4), 0.25)
    b[0, 0, :, 0], b[0, 0, :, 1:] = 0.4, 0.2    # B's largest: 0.4, under A's
    c = compare({"layer": a}, {"layer": b}, tokens_a=list("abcd"))
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    try:
        page.goto(f"file://{render_html(c, color_scale='linear').save(tmp_path / 'scale.html')}")
        page.wait_for_selector("body[data-ready='true']", timeout=30_000)
        drawn = np.array(page.eval_on_selector("#ah-compare-b", """c => Array.from(
            c.getContext('2d').getImageData(0, 0, 1, 1).data)"""))[:3]
    finally:
        page.close()
    expected = _viridis_lut()[round(0.4 / 0.85 * 255)].numpy()  # B's 0.4 under the shared 0.85, linear scale
    assert np.abs(drawn - expected).max() <= 6, (drawn, expected)  # within the codes' 2.8%


# ------------------------------------------------------------------ review of issue 26: compare's lengths and names
@pytest.fixture(scope="module")
def long_position_berts(tmp_path_factory, minilm_path):
    """Two small random BERTs with 1,024 positions and MiniLM's tokenizer (limit 1,024)."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path, model_max_length=1024)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=16,
                                         intermediate_size=32, max_position_embeddings=1024)
        path = tmp_path_factory.mktemp("long") / f"bert-{seed}"
        transformers.BertModel(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def test_cli_cuts_a_text_longer_than_the_page_shows_before_any_work_and_says_so(long_position_berts, tmp_path,
                                                                                 capsys):
    """A 700-word text through models of 1,024 positions failed after both forwards: the page refused maps over 512."""
    from attention_hooker.cli import main

    a, b = map(str, long_position_berts)
    text = "word " * 700
    assert main(["compare", "--model", a, "--model", b, "--text", text, "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "tokens:  512, the same for both" in printed
    assert "note:    the text is 702 tokens; only the first 512 were compared (the compare page shows at most 512)" \
        in printed
    assert (tmp_path / "o" / "compare.html").is_file()
    assert main(["compare", "--model", a, "--model", b, "--text", text, "--out", str(tmp_path / "p"),
                 "--max-tokens", "600"]) == 2
    err = capsys.readouterr().err.splitlines()[0]
    assert err.endswith("--max-tokens 600: the compare page shows whole maps, up to 512 tokens; give at most 512")
    assert main(["compare", "--model", a, "--model", b, "--text", text, "--out", str(tmp_path / "q"),
                 "--max-tokens", "40"]) == 0
    assert "only the first 40 were compared (--max-tokens 40)" in capsys.readouterr().out


def test_cli_captures_both_models_at_the_length_it_checked(minilm_path, tmp_path, capsys):
    """The tokens were checked cut at the shorter limit, but each model captured its own length (42 vs 16)."""
    transformers = pytest.importorskip("transformers")
    from attention_hooker.cli import main

    short = tmp_path / "short-minilm"
    transformers.AutoModel.from_pretrained(minilm_path).save_pretrained(short)
    transformers.AutoTokenizer.from_pretrained(minilm_path, model_max_length=16).save_pretrained(short)
    assert main(["compare", "--model", str(minilm_path), "--model", str(short), "--text", "word " * 40,
                 "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "tokens:  16, the same for both" in printed and "the shorter of the two models' limits" in printed
    assert "A:       all-MiniLM-L6-v2 (BertModel)" in printed and "B:       short-minilm (BertModel)" in printed


def test_cli_names_two_models_of_one_title_by_title_and_folder(minilm_path, tmp_path, capsys):
    import shutil

    from attention_hooker.cli import main

    copy = tmp_path / "copy" / "tuned"
    shutil.copytree(minilm_path, copy)  # the same model card: the same title
    assert main(["compare", "--model", str(minilm_path), "--model", str(copy), "--text", "the cat sat",
                 "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "A:       all-MiniLM-L6-v2 (model) (BertModel)" in printed
    assert "B:       all-MiniLM-L6-v2 (tuned) (BertModel)" in printed


def test_the_same_tokens_listed_otherwise_are_named_not_a_bare_stop_iteration():
    w = torch.rand(1, 2, 5, 5).softmax(-1)
    with pytest.raises(AttentionHookerError, match="tokens are listed differently: A's are one list of 5 and B's 1"):
        compare({"l": [w]}, {"l": [w]}, tokens_a=list("abcde"), tokens_b=[list("abcde")])
