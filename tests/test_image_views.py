"""Views of text-to-image attention (issue 23, part 4): the overlay on the original image, checked pixel by
pixel against hand-placed boxes and against the eager model's own attentions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from attention_hooker import AttentionHookerError  # noqa: E402
from attention_hooker.media.image_tokens import ImageView, table  # noqa: E402
from attention_hooker.views.image_overlay import (image_panels, image_weight_map, overlay_rgb,  # noqa: E402
                                                  plot_image_attention, processed_region)
from attention_hooker.views.plot import color_norm, colormap_named  # noqa: E402


def grid_tokens(rows=2, cols=2, extra_views=()):
    """One image on a rows x cols grid (tokens at positions 1..), plus 1 x 1 tokens on ``extra_views``."""
    views = [ImageView(0, 0, "image", rows, cols)] + list(extra_views)
    entries = [(0, 1 + r * cols + c, 0, 0, r, c, 1, 1) for r in range(rows) for c in range(cols)]
    entries += [(0, 1 + rows * cols + k, 0, 1 + k, 0, 0, 1, 1) for k in range(len(extra_views))]
    return table("demo", "sequence", entries, [[i] for i in range(len(entries))], 8, views)


def test_one_token_with_all_the_weight_lights_exactly_its_box_in_the_rendered_overlay():
    tokens = grid_tokens()
    weights = np.array([0.0, 1.0, 0.0, 0.0])  # token (row 0, col 1): the top right quarter
    image = np.zeros((8, 12, 3))
    fig = plot_image_attention(image, weights, tokens, alpha=0.5)
    shown = fig.axes[0].images[0].get_array()
    top = np.asarray(colormap_named("inferno")(1.0)[:3])
    bottom = np.asarray(colormap_named("inferno")(0.0)[:3])
    expected = np.broadcast_to(0.5 * bottom, (8, 12, 3)).copy()
    expected[:4, 6:] = 0.5 * top
    np.testing.assert_allclose(shown, expected, atol=1e-12)
    assert "100.0% on image 0" in fig.axes[0].get_ylabel()


def test_weights_are_not_renormalised_and_the_colour_scale_says_what_it_is():
    tokens = grid_tokens()
    amap = image_weight_map([0.1, 0.0, 0.0, 0.02], tokens, [0], (4, 4))
    np.testing.assert_allclose(amap, [[0.1, 0.1, 0, 0], [0.1, 0.1, 0, 0], [0, 0, .02, .02], [0, 0, .02, .02]])
    fig = plot_image_attention(np.ones((4, 4, 3)), np.array([0.1, 0.0, 0.0, 0.02]), tokens)
    assert "12.0% on image 0" in fig.axes[0].get_ylabel()
    assert "stretched to the largest value drawn (0.1)" in fig.axes[-1].get_ylabel()
    fig = plot_image_attention(np.ones((4, 4, 3)), np.array([0.1, 0.0, 0.0, 0.02]), tokens, vmax=1.0)
    assert "colour scale 0 to 1" in fig.axes[-1].get_ylabel()


def test_a_global_view_gets_its_own_panel_and_tiles_share_one():
    tiles = [ImageView(0, 0, "left tile", 1, 1, (0, 0, 1, .5)), ImageView(0, 1, "right tile", 1, 1, (0, .5, 1, 1)),
             ImageView(0, 2, "global", 2, 2)]
    entries = [(0, 1, 0, 0, 0, 0, 1, 1), (0, 2, 0, 1, 0, 0, 1, 1)] + [
        (0, 3 + 2 * r + c, 0, 2, r, c, 1, 1) for r in range(2) for c in range(2)]
    tokens = table("demo", "sequence", entries, [[i] for i in range(6)], 8, tiles)
    assert image_panels(tokens, 0) == [(0, 1), (2,)]
    weights = np.array([0.2, 0.0, 0.0, 0.0, 0.0, 0.3])
    tiles_map = image_weight_map(weights, tokens, [0, 1], (4, 4))
    global_map = image_weight_map(weights, tokens, [2], (4, 4))
    np.testing.assert_allclose(tiles_map[:, :2], 0.2)
    np.testing.assert_allclose(tiles_map[:, 2:], 0.0)
    np.testing.assert_allclose(global_map[2:, 2:], 0.3)
    assert global_map.sum() == pytest.approx(4 * 0.3)
    fig = plot_image_attention(np.ones((4, 4, 3)), weights, tokens)
    titles = [ax.get_title() for ax in fig.axes[:2]]
    assert titles == ["left tile, right tile: 20.0%", "global: 30.0%"]


def test_a_token_covering_two_by_two_cells_splits_its_weight_over_them():
    tokens = table("demo", "sequence", [(0, 1, 0, 0, 0, 0, 2, 2)], [[0, 1, 2, 3]], 8, [ImageView(0, 0, "merged", 2, 2)])
    np.testing.assert_allclose(image_weight_map([0.8], tokens, [0], (2, 2)), 0.2)


def test_boxes_go_where_the_processor_took_them_from_in_the_original_image():
    tokens = dataclasses.replace(grid_tokens(), frame="processed")  # boxes of the square the processor made
    region = (0.0, 0.25, 1.0, 0.75)  # the center crop of a 40 x 80 image
    amap = image_weight_map([1.0, 0, 0, 0], tokens, [0], (40, 80), region=region)
    assert np.isnan(amap[:, :20]).all() and np.isnan(amap[:, 60:]).all()  # cropped off: the bare image
    assert (amap[:20, 20:40] == 1).all() and (amap[20:, 20:60][~np.isnan(amap[20:, 20:60])] == 0).all()


def test_processed_region_is_where_the_real_clip_processor_crops():
    transformers = pytest.importorskip("transformers")
    from image_token_oracle import coordinate_image

    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for height, width in ((40, 80), (64, 48)):
        pixels = processor(images=coordinate_image(height, width), return_tensors="pt")["pixel_values"][0].double()
        mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
        rgb = (pixels * std[:, None, None] + mean[:, None, None]).numpy()
        x, y = rgb[0], rgb[1]  # fractions of the original image at each processed pixel
        top, left, bottom, right = processed_region(processor, (height, width))
        # the processed pixels' centres, placed on the original through the region
        centres = (np.arange(32) + 0.5) / 32
        np.testing.assert_allclose(x.mean(0), left + centres * (right - left), atol=0.02)
        np.testing.assert_allclose(y.mean(1), top + centres * (bottom - top), atol=0.02)


def test_processed_region_of_llava_padding_and_refusals():
    from types import SimpleNamespace

    padded = SimpleNamespace(do_pad=True, do_resize=True, size={"height": 32, "width": 32}, do_center_crop=False)
    assert processed_region(padded, (20, 40)) == (-0.5, 0.0, 1.5, 1.0)
    odd = SimpleNamespace(do_resize=True, size={"longest_edge": 32}, do_center_crop=False)
    with pytest.raises(AttentionHookerError, match="does not model"):
        processed_region(odd, (20, 40))


def test_bad_inputs_are_refused_by_name():
    tokens = grid_tokens()
    with pytest.raises(AttentionHookerError, match="3 weights for 4 image tokens|do not match the 4"):
        plot_image_attention(np.ones((4, 4, 3)), np.ones(3) / 3, tokens)
    with pytest.raises(AttentionHookerError, match="non-negative"):
        plot_image_attention(np.ones((4, 4, 3)), np.array([-0.1, 0, 0, 0]), tokens)
    with pytest.raises(AttentionHookerError, match="image 1 has no image token"):
        image_panels(tokens, 1)
    with pytest.raises(AttentionHookerError, match="pass the image tokens"):
        plot_image_attention(np.ones((4, 4, 3)), np.ones(4) / 4)


def test_overlay_of_a_captured_llava_is_the_eager_attention_on_each_patch():
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from attention_hooker import TransformerAttentionHooker
    from attention_hooker.analysis.image_attention import image_attention
    from attention_hooker.media import image_token_map
    from test_image_tokens import llava_inputs, tiny_llava

    model, eager = tiny_llava(), tiny_llava()
    eager.set_attn_implementation("eager")
    inputs, _ = llava_inputs(16)
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True).attentions[0]  # (B, H, Q, K) of the LM's layer 0
    hooker = TransformerAttentionHooker(model, r"language_model\.layers\.0\.self_attn$")
    with torch.no_grad(), hooker:
        model(**inputs)
    captured = next(iter(hooker.values.values()))[0]
    tokens = image_token_map(model, inputs)
    last = inputs["input_ids"].shape[1] - 1
    result = image_attention(captured, tokens, batch=0, queries=[last])
    picture = Image.new("RGB", (32, 32), (90, 120, 30))
    fig = plot_image_attention(picture, result, vmax=1.0, alpha=1.0)
    expected = reference[0, :, last].mean(0).double()[tokens.in_row(0).position]  # (16,) the patches in raster order
    amap = image_weight_map(result.weights.mean(0)[0], result.tokens, [0], (32, 32))
    np.testing.assert_allclose(amap[::8, ::8].reshape(-1), expected.numpy(), atol=1e-6)
    colours = colormap_named("inferno")(color_norm("linear", 0.0, 1.0)(expected.numpy()))[:, :3]
    np.testing.assert_allclose(fig.axes[0].images[0].get_array()[::8, ::8].reshape(-1, 3), colours, atol=1e-5)
    assert f"{float(expected.sum()):.1%} on image 0" in fig.axes[0].get_ylabel()


def _page_meta(html):
    import json
    import re

    return json.loads(re.search(r'<script type="application/json" id="ah-meta">(.*?)</script>', html, re.S).group(1))


def test_the_page_carries_the_image_inline_and_each_token_s_key_and_box():
    import base64
    import io
    import re
    import zlib

    from PIL import Image

    from attention_hooker import render_html
    from attention_hooker.views.page import RELATIVE_ERROR, decode_weights
    from attention_hooker.views.page.image_meta import image_page_meta

    tiles = [ImageView(0, 0, "left tile", 1, 1, (0, 0, 1, .5)), ImageView(0, 1, "right tile", 1, 1, (0, .5, 1, 1)),
             ImageView(0, 2, "global", 2, 2)]
    entries = [(0, 1, 0, 0, 0, 0, 1, 1), (0, 2, 0, 1, 0, 0, 1, 1), (0, 3, 0, 2, 0, 0, 2, 2)]
    tokens = dataclasses.replace(table("demo", "sequence", entries, [[0], [1], [2]], 8, tiles), frame="processed")
    picture = Image.new("RGB", (40, 20), (10, 200, 30))
    meta = image_page_meta(picture, tokens, keys=5, region=(0.0, 0.25, 1.0, 0.75))
    assert meta["positions"] == [1, 2, 3] and meta["cells"] == [1, 1, 4]
    assert meta["boxes"] == [[0.0, 0.25, 1.0, 0.5], [0.0, 0.5, 1.0, 0.75], [0.0, 0.25, 1.0, 0.75]]
    assert meta["panels"] == [{"name": "left tile, right tile", "tokens": [0, 1]}, {"name": "global", "tokens": [2]}]
    assert (meta["width"], meta["height"]) == (280, 140)  # shown larger, the picture's aspect kept
    png = base64.b64decode(meta["src"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (40, 20)
    html = render_html({"lm": [torch.rand(1, 2, 5, 5).softmax(-1)]}, tokens=list("abcde"), image=meta).html
    carried = _page_meta(html)["image"]
    assert carried["positions"] == [1, 2, 3] and carried["src"] == meta["src"]
    assert "http://" not in html and "https://" not in html  # nothing fetched: the picture travels inline
    # a long call travels pooled: the page carries the heads' mean on the image tokens for the other rows
    attention = torch.rand(1, 2, 5, 5).softmax(-1)
    html = render_html({"lm": [attention]}, image=meta, pool_above=4, pool_size=2).html
    call = _page_meta(html)["layers"][0]["calls"][0]
    assert "pooled" in call and call["image"]["rows"] == [0, 4]
    payload = zlib.decompress(base64.b64decode(re.search(r'id="ah-payload">(.*?)</script>', html, re.S).group(1)))
    codes = torch.frombuffer(bytearray(payload[call["image"]["offset"]:call["image"]["offset"] + 6]), dtype=torch.uint8)
    carried = decode_weights(codes.view(1, 1, 2, 3), torch.tensor([[call["image"]["scale"]]]))[0, 0]
    expected = attention[0][:, [0, 4]][:, :, [1, 2, 3]].mean(0)
    torch.testing.assert_close(carried, expected, rtol=RELATIVE_ERROR, atol=0)
    with pytest.raises(AttentionHookerError, match="no call of the page has 9 keys"):
        render_html({"lm": [torch.rand(1, 2, 5, 5).softmax(-1)]}, image=dict(meta, keys=9))
    with pytest.raises(AttentionHookerError, match="past the 3 keys"):
        image_page_meta(picture, tokens, keys=3)


def test_hovering_a_word_on_the_page_lights_its_patches_with_its_weights_in_chromium(tmp_path):
    import re
    import shutil

    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not __import__("os").path.exists(chromium):
        pytest.skip("no chromium here: apt-get install chromium")
    from PIL import Image

    from attention_hooker import TransformerAttentionHooker, render_html
    from attention_hooker.analysis.image_attention import image_attention
    from attention_hooker.media import image_token_map
    from attention_hooker.views.page.image_meta import image_page_meta
    from test_image_tokens import llava_inputs, tiny_llava

    model = tiny_llava()
    inputs, _ = llava_inputs(16)
    hooker = TransformerAttentionHooker(model, r"language_model\.layers\.0\.self_attn$")
    with torch.no_grad(), hooker:
        model(**inputs)
    captured = next(iter(hooker.values.values()))[0]
    tokens = image_token_map(model, inputs)
    length = inputs["input_ids"].shape[1]
    last = length - 1
    expected = image_attention(captured, tokens, batch=0, queries=[last]).mean_heads()
    meta = image_page_meta(Image.new("RGB", (32, 32), (128, 128, 128)), tokens, keys=length)
    path = render_html(hooker, tokens=[f"t{i}" for i in range(length)], image=meta).save(tmp_path / "vlm.html")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                    "--disable-background-networking", "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            errors, requests = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:", "blob:"))
                    else None)
            page.goto(f"file://{path}")
            page.wait_for_selector("body[data-ready]", timeout=30_000)
            page.hover(f"#ah-queries div:nth-child({last + 1})")
            readout = page.inner_text("#ah-image-readout")
            share = float(re.search(r"([\d.]+)% of its attention on the image", readout).group(1)) / 100
            assert share == pytest.approx(float(expected.share), abs=0.03 * float(expected.share) + 0.0006)
            assert f'query {last} "t{last}"' in readout and "mean of its 2 heads" in readout
            # a hand-made map: the last query's weights on the four image tokens of a 2 x 2 grid are
            # 0, 0.1, 0.2 and 0.4; each patch takes its viridis colour at that weight over the largest
            attention = torch.zeros(1, 1, 6, 6)
            attention[..., 0] = 1.0
            attention[0, 0, 5] = torch.tensor([0.05, 0.0, 0.1, 0.2, 0.4, 0.25])
            small = grid_tokens()
            path = render_html({"lm": [attention]}, tokens=list("abcdef"),
                               image=image_page_meta(np.zeros((16, 16, 3)), small, keys=6)).save(tmp_path / "h.html")
            page.goto(f"file://{path}")
            page.wait_for_selector("body[data-ready]", timeout=30_000)
            page.hover("#ah-queries div:nth-child(6)")
            readout = page.inner_text("#ah-image-readout")
            assert readout.startswith('query 5 "f": ') and readout.endswith("of its attention on the image (its only head)")
            assert float(re.search(r"([\d.]+)%", readout).group(1)) == pytest.approx(70.0, abs=70 * 0.028)
            anchors = np.array([[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
                                [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]])
            for k, ratio in enumerate([0.0, 0.25, 0.5, 1.0]):
                x = ratio * (len(anchors) - 1)
                a = min(int(x), len(anchors) - 2)
                colour = anchors[a] + (x - a) * (anchors[a + 1] - anchors[a])
                r, c = divmod(k, 2)
                pixel = page.evaluate(f"""() => {{ const cv = document.getElementById('ah-image-0');
                    const x = Math.floor(({c} + 0.5) * cv.width / 2), y = Math.floor(({r} + 0.5) * cv.height / 2);
                    return Array.from(cv.getContext('2d').getImageData(x, y, 1, 1).data); }}""")
                # drawn at 70% opacity; each weight travels within 2.8% (the page's 8-bit log codes)
                assert pixel[3] == pytest.approx(178, abs=1)
                np.testing.assert_allclose(pixel[:3], colour, atol=4 + 30 * ratio * 0.03)
            # a long call (pooled on the page) carries the heads' mean on the image tokens for the text rows
            two_heads = torch.cat([attention, attention.flip(-2)], 1)  # head 1: the rows reversed
            two_heads[0, 1, 5] = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1, 0.0])  # its last row: 40% on the image
            path = render_html({"lm": [two_heads]}, tokens=list("abcdef"), pool_above=4, pool_size=3,
                               image=image_page_meta(np.zeros((16, 16, 3)), small, keys=6)).save(tmp_path / "l.html")
            page.goto(f"file://{path}")
            page.wait_for_selector("body[data-ready]", timeout=30_000)
            page.hover("#ah-queries div:nth-child(6)")
            readout = page.inner_text("#ah-image-readout")
            assert "(mean of all 2 heads: a long call carries only that)" in readout
            assert float(re.search(r"([\d.]+)%", readout).group(1)) == pytest.approx(55.0, abs=55 * 0.028)
            page.hover("#ah-queries div:nth-child(2)")
            assert "query 1 is an image token" in page.inner_text("#ah-image-readout")
            assert errors == [] and requests == []
        finally:
            browser.close()


def test_a_region_is_refused_for_boxes_already_on_the_original_image():
    """LLaVA-NeXT's, Qwen's, Idefics3's boxes (and LLaVA's given image_sizes) are fractions of the original
    image: a processor's crop region applied to them would shrink the picture towards the middle."""
    from attention_hooker.views.page.image_meta import image_page_meta

    tokens = grid_tokens()
    assert tokens.frame == "image"
    with pytest.raises(AttentionHookerError, match="already fractions of the original image"):
        image_weight_map([1.0, 0, 0, 0], tokens, [0], (40, 80), region=(0.0, 0.25, 1.0, 0.75))
    with pytest.raises(AttentionHookerError, match="already fractions of the original image"):
        image_page_meta(np.zeros((40, 80, 3)), tokens, keys=6, region=(0.0, 0.25, 1.0, 0.75))
    amap = image_weight_map([1.0, 0, 0, 0], tokens, [0], (40, 80), region=(0.0, 0.0, 1.0, 1.0))
    assert (amap[:20, :40] == 1).all()


def test_tokens_that_cover_no_cell_are_drawn_nowhere_and_leave_the_scale_finite():
    """A row-end marker (LLaVA-NeXT's newline: no cell) with weight divided 0/0 into an infinite map, and the
    page divided by its 0 cells."""
    from attention_hooker.views.page.image_meta import image_page_meta

    entries = [(0, 1 + k, 0, 0, k // 2, k % 2, 1, 1) for k in range(4)] + [(0, 5, 0, 0, 1, 2, 0, 0)]  # + a marker
    tokens = table("demo", "sequence", entries, [[k] for k in range(4)] + [[]], 8, [ImageView(0, 0, "image", 2, 2)])
    amap = image_weight_map([0.1, 0.0, 0.0, 0.0, 0.5], tokens, [0], (8, 8))
    assert np.isfinite(amap).all() and amap.max() == pytest.approx(0.1)
    meta = image_page_meta(np.zeros((8, 8, 3)), tokens, keys=7)
    assert meta["positions"] == [1, 2, 3, 4] and 0 not in meta["cells"]
