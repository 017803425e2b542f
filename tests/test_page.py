"""The offline interactive page: its contents, and its behaviour in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import zlib

import pytest
import torch
from torch import nn

from attention_hooker import AttentionHookerError, TransformerAttentionHooker, render_html
from attention_hooker._blocks import block_edges
from attention_hooker.views.page import RELATIVE_ERROR, decode_weights, encode_weights

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium for the browser tests (apt-get install chromium)")
        pytest.skip("no chromium here: apt-get install chromium")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"],
        )
        yield browser
        browser.close()


class _Page:
    """An opened page that records console errors and any network request."""

    def __init__(self, browser, path):
        self.errors, self.requests = [], []
        self.page = browser.new_page(viewport={"width": 1500, "height": 950})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url) if not r.url.startswith(("file:", "data:", "blob:")) else None)
        self.page.goto(f"file://{path}")
        self.page.wait_for_selector("body[data-ready]", timeout=30_000)

    def canvas(self, selector):
        return self.page.eval_on_selector(selector, "c => c.toDataURL()")

    def close(self):
        self.page.close()


@pytest.fixture(scope="module")
def minilm_page(tmp_path_factory, minilm_sdpa, minilm_tokenizer):
    enc = minilm_tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    tokens = minilm_tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
        minilm_sdpa(**enc)
    page = render_html(hooker, tokens=tokens, title="MiniLM test")
    path = page.save(tmp_path_factory.mktemp("page") / "minilm.html")
    return hooker, tokens, page, path


def _payload(html):
    meta = json.loads(re.search(r'<script type="application/json" id="ah-meta">(.*?)</script>', html, re.S).group(1))
    raw = re.search(r'<script type="application/octet-stream" id="ah-payload">(.*?)</script>', html, re.S).group(1)
    return meta, zlib.decompress(base64.b64decode(raw))


def test_page_is_one_self_contained_file_without_network_references(minilm_page):
    _, tokens, page, path = minilm_page
    html = page.html
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", html), "no http(s) reference of any kind"
    assert "<link" not in html and " src=" not in html and "@import" not in html
    assert "function drawOverview" in html and ".ah-main" in html  # view.js and view.css inlined
    assert os.path.getsize(path) == len(html.encode("utf-8"))
    meta, blob = _payload(html)
    assert meta["tokenSets"] == [tokens]
    assert len(blob) == meta["bytes"] == 6 * 12 * len(tokens) ** 2


def test_payload_decodes_to_the_weights_within_the_stated_relative_error(minilm_page):
    """Issue 26: the codes are log-spaced, each weight from 1e-6 of its head's largest up within 2.8%."""
    hooker, _, page, _ = minilm_page
    meta, blob = _payload(page.html)
    assert meta["encoding"]["relativeError"] == pytest.approx(RELATIVE_ERROR, abs=1e-5) and RELATIVE_ERROR < 0.028
    for layer_meta, (name, calls) in zip(meta["layers"], hooker.values.items()):
        assert layer_meta["name"] == name
        call = layer_meta["calls"][0]
        b, h, q, k = call["shape"]
        codes = torch.frombuffer(bytearray(blob[call["offset"] : call["offset"] + b * h * q * k]), dtype=torch.uint8)
        scales = torch.tensor(call["scales"]).view(b, h)
        decoded = decode_weights(codes.view(b, h, q, k), scales)
        floor = scales[..., None, None] * 1e-6
        kept = calls[0] >= floor
        torch.testing.assert_close(decoded[kept], calls[0][kept], rtol=RELATIVE_ERROR * 1.0001, atol=0)
        assert (decoded[~kept] <= floor.expand_as(decoded)[~kept] * 1.0001).all(), "smaller ones read as the floor"


def test_encoding_marks_non_finite_weights():
    w = torch.rand(1, 2, 3, 3)
    w[0, 0, 1, 1] = float("inf")
    codes, scales = encode_weights(w)
    decoded = decode_weights(codes, scales)
    assert torch.isnan(decoded[0, 0, 1, 1]) and torch.isfinite(decoded[0, 1]).all()


def test_page_draws_and_reacts_in_headless_chromium(browser, minilm_page, tmp_path):
    _, tokens, _, path = minilm_page
    view = _Page(browser, path)
    page = view.page
    try:
        assert page.evaluate("document.body.dataset.ready") == "true"
        assert view.errors == [] and view.requests == []
        shown = page.inner_text("#ah-queries")
        for token in ("[CLS]", "quick", "fox", "[SEP]"):
            assert token in shown
        assert page.locator("#ah-overview canvas").count() == 72
        matrix = view.canvas("#ah-matrix")
        page.select_option("#ah-layer", "3")
        assert view.canvas("#ah-matrix") != matrix, "choosing a layer redraws the matrix"
        matrix = view.canvas("#ah-matrix")
        page.select_option("#ah-head", "7")
        assert view.canvas("#ah-matrix") != matrix, "choosing a head redraws the matrix"
        lines = view.canvas("#ah-lines")
        page.hover(f"#ah-queries div:nth-child({tokens.index('fox') + 1})")
        assert view.canvas("#ah-lines") != lines, "hovering a token redraws its lines"
        assert "ah-active" in page.get_attribute(f"#ah-queries div:nth-child({tokens.index('fox') + 1})", "class")
        lines = view.canvas("#ah-lines")
        page.click("#ah-head-toggles button[data-head='0']")
        assert view.canvas("#ah-lines") != lines, "toggling a head redraws the lines"
        page.click("#ah-overview canvas[data-layer='5'][data-head='2']")
        assert page.input_value("#ah-layer") == "5" and page.input_value("#ah-head") == "2"
        box = page.locator("#ah-matrix").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.1)
        assert re.search(r'query \d+ ".*" -> key \d+ ".*": (~[\d.e-]+|below [\d.e-]+)$', page.inner_text("#ah-readout"))
        drawn = {}
        for scale in ("linear", "sqrt", "log"):  # each colour scale draws the matrix differently
            page.select_option("#ah-scale", scale)
            drawn[scale] = view.canvas("#ah-matrix")
        assert len(set(drawn.values())) == 3
        page.select_option("#ah-scale", "sqrt")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 20_000
        assert view.errors == [] and view.requests == []
    finally:
        view.close()


def test_cross_attention_calls_and_batches_in_the_browser(browser, tmp_path):
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                           batch_first=True).eval()
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(src, tgt)
        model(src, tgt)  # every layer called twice
    source_tokens = ["s0", "s1", "s2", "s3", "s4"]
    target_tokens = ["t0", "t1", "t2"]
    page = render_html(hooker, tokens=[source_tokens, target_tokens])
    path = page.save(tmp_path / "cross.html")
    view = _Page(browser, path)
    try:
        assert view.errors == []
        view.page.select_option("#ah-layer", "2")  # decoder.layers.0.multihead_attn: 3 queries x 5 keys
        assert view.page.inner_text("#ah-queries").split() == target_tokens
        assert view.page.inner_text("#ah-keys").split() == source_tokens
        assert view.page.is_visible("#ah-call") and view.page.is_visible("#ah-batch")
        matrix = view.canvas("#ah-matrix")
        view.page.select_option("#ah-batch", "1")
        assert view.canvas("#ah-matrix") != matrix
        view.page.select_option("#ah-call", "1")
        assert view.errors == []
    finally:
        view.close()


def test_non_finite_weights_are_drawn_marked(browser, tmp_path):
    w = torch.rand(1, 1, 4, 4)
    w[0, 0, 0, 0] = float("nan")
    path = render_html({"layer": [w]}).save(tmp_path / "nan.html")
    view = _Page(browser, path)
    try:
        assert view.errors == []
        red = view.page.eval_on_selector("#ah-matrix", "c => Array.from(c.getContext('2d').getImageData(0, 0, 1, 1).data)")
        assert red[:3] == [220, 20, 20]
    finally:
        view.close()


def test_page_errors_and_notebook_repr():
    w = {"layer": [torch.rand(1, 2, 4, 4)]}
    with pytest.raises(AttentionHookerError, match=r"4 query and 4 key positions, while the number of tokens is 3"):
        render_html(w, tokens=["a", "b", "c"])
    with pytest.raises(AttentionHookerError, match="nothing to show"):
        render_html({})
    with pytest.raises(AttentionHookerError, match=r"unknown layer\(s\) \['x'\]"):
        render_html(w, layers=["x"])
    with pytest.raises(AttentionHookerError, match="Received 5-dim tensor"):
        render_html({"layer": [torch.rand(1, 1, 1, 2, 2)]})
    page = render_html(w, title="</script><b>x</b>")
    assert "</script><b>" not in page.html.split("<script>")[0].split("<title>")[1]
    assert page._repr_html_().startswith("<iframe srcdoc=") and "&lt;!DOCTYPE html&gt;" in page._repr_html_()
    assert re.fullmatch(r"AttentionPage\('.*', [\d.]+ MB\)", repr(page))


def test_layer_rows_read_the_part_of_the_names_that_differs(browser, tmp_path):
    """Issue 13: rows read "…ntion.self" (BERT) and BART's encoder and decoder rows looked alike."""
    names = ["model.encoder.layers.0.self_attn", "model.encoder.layers.1.self_attn",
             "model.decoder.layers.0.self_attn", "model.decoder.layers.0.encoder_attn"]
    values = {name: [torch.rand(1, 2, 3, 3).softmax(-1)] for name in names}
    path = render_html(values, tokens=["a", "b", "c"]).save(tmp_path / "bart.html")
    page = _Page(browser, path)
    try:
        rows = page.page.eval_on_selector_all(".ah-row-label", "els => els.map(e => [e.textContent, e.title])")
        options = page.page.eval_on_selector_all("#ah-layer option", "els => els.map(e => e.textContent)")
    finally:
        page.close()
    short = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "decoder.layers.0.self_attn",
             "decoder.layers.0.encoder_attn"]
    assert rows == [[s, n] for s, n in zip(short, names)], "the part that differs, the full name on hover"
    assert options == short


@pytest.mark.parametrize("size", ["small", "minilm"])
def test_the_page_in_a_notebook_takes_the_height_of_what_it_shows(browser, minilm_page, tmp_path, size):
    """Issue 13: the notebook's iframe had a fixed 760 px height, whatever the page held."""
    if size == "small":
        page = render_html({"layer": [torch.rand(1, 1, 3, 3).softmax(-1)]}, tokens=["a", "b", "c"])
    else:
        page = minilm_page[2]
    host = tmp_path / "notebook.html"
    host.write_text(f"<!DOCTYPE html><html><body>{page._repr_html_()}</body></html>")
    view = browser.new_page(viewport={"width": 1200, "height": 800})
    try:
        view.goto(f"file://{host}")
        view.wait_for_function("() => { const f = document.querySelector('iframe'); "
                               "return f.contentDocument && f.contentDocument.body.dataset.ready; }", timeout=30_000)
        view.wait_for_timeout(300)
        height, content = view.evaluate("() => { const f = document.querySelector('iframe'); "
                                        "return [f.getBoundingClientRect().height, Math.max(...Array.from("
                                        "f.contentDocument.body.querySelectorAll('*')).map("
                                        "e => e.getBoundingClientRect().bottom))]; }")
    finally:
        view.close()
    assert content <= height <= content + 32, (height, content)  # all of it shown, little left empty


def test_the_lines_of_a_uniform_head_are_thin_and_a_peaked_head_draws_one_bold_line(browser, tmp_path):
    """Issue 13: widths were relative to each head's largest weight for the query, so a
    diffuse head drew thick lines to every key (15 of 20 keys bold on the demo)."""
    uniform = torch.full((1, 1, 20, 20), 1 / 20)
    peaked = torch.full((1, 1, 20, 20), 0.01 / 19)
    peaked[..., 3] = 0.99
    tokens = [f"t{i}" for i in range(20)]
    widths = {}
    for name, weights in (("uniform", uniform), ("peaked", peaked)):
        path = render_html({"layer": [weights]}, tokens=tokens).save(tmp_path / f"{name}.html")
        view = _Page(browser, path)
        try:
            keys = view.page.eval_on_selector_all("#ah-keys div", "els => els.map(e => [Number(e.dataset.width), "
                                                                  "e.classList.contains('ah-hot'), e.title])")
            view.page.select_option("#ah-lines-scale", "relative")
            relative = view.page.eval_on_selector_all("#ah-keys div", "els => els.map(e => Number(e.dataset.width))")
            view.page.hover("#ah-keys div:nth-child(4)")
            readout = view.page.inner_text("#ah-readout")
        finally:
            view.close()
        widths[name] = (keys, relative, readout)
    keys, relative, _ = widths["uniform"]
    assert all(w > 0 for w, _, _ in keys), "1/20 each: thin lines, drawn"
    assert all(w < 1.0 for w, _, _ in keys) and not any(hot for _, hot, _ in keys), "thin, none bold"
    assert all(w == 3.0 for w in relative), "the relative option, chosen, draws them all at full width"
    assert "weight 0.05" in keys[0][2]
    keys, _, readout = widths["peaked"]
    assert keys[3][0] > 2.9 and keys[3][1] and sum(w > 0 for w, _, _ in keys) == 1
    assert readout.startswith("key 3: t3, weight 0.99"), "hovering a key reads its weight"


def test_matrix_labels_padding_marks_head_focus_and_a_fresh_readout(browser, tmp_path, minilm_sdpa, minilm_batch,
                                                                    minilm_tokenizer):
    """Issue 13: no token labels on the matrix, padded keys not marked, a click in the overview
    did not focus the head view, and the readout kept the previous head's value."""
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
        minilm_sdpa(**minilm_batch)
    ids = minilm_batch["input_ids"]
    tokens = [minilm_tokenizer.convert_ids_to_tokens(row) for row in ids]
    long_tokens = [f"w{i}" for i in range(300)]
    long_page = render_html({"layer": [torch.rand(1, 1, 300, 300).softmax(-1)]}, tokens=long_tokens)
    path = render_html(hooker, tokens=tokens[0]).save(tmp_path / "padded.html")
    view = _Page(browser, path)
    page = view.page
    try:
        cols = page.eval_on_selector_all("#ah-matrix-cols span", "els => els.map(e => e.textContent)")
        rows = page.eval_on_selector_all("#ah-matrix-rows span", "els => els.map(e => e.textContent)")
        assert cols == tokens[0] and rows == tokens[0], "every token labels both axes when they fit"
        page.select_option("#ah-batch", "1")
        padded = [i for i, t in enumerate(minilm_batch["attention_mask"][1].tolist()) if t == 0]
        marked = page.eval_on_selector_all("#ah-keys div", "els => els.flatMap((e, i) => "
                                                           "e.classList.contains('ah-masked') ? [i] : [])")
        assert padded and marked == padded, "the padded keys are marked"
        colour = page.evaluate("""k => { const c = document.getElementById('ah-matrix');
            const x = Math.floor((k + 0.5) * c.width / %d);
            return Array.from(c.getContext('2d').getImageData(x, 0, 1, 1).data.slice(0, 3)); }""" % ids.shape[1],
                               padded[0])
        assert colour == [215, 215, 215], "their column of the matrix is grey, not the darkest weight"
        box = page.locator("#ah-matrix").bounding_box()
        page.mouse.move(box["x"] + 5, box["y"] + 5)
        assert page.inner_text("#ah-readout").startswith("query 0")
        page.click("#ah-overview canvas[data-layer='2'][data-head='4']")
        assert page.inner_text("#ah-readout") == "point at a cell", "no value of a head no longer shown"
        assert page.input_value("#ah-lines-heads") == "one"
        dimmed = page.eval_on_selector_all("#ah-head-toggles button", "els => els.map(e => e.classList.contains('ah-dim'))")
        assert dimmed == [h != 4 for h in range(12)], "the head view follows the head picked in the overview"
        assert view.errors == []
    finally:
        view.close()
    view = _Page(browser, long_page.save(tmp_path / "long.html"))
    try:
        cols = view.page.eval_on_selector_all("#ah-matrix-cols span", "els => els.map(e => e.textContent)")
    finally:
        view.close()
    assert 10 <= len(cols) <= 40 and cols[0] == "0 w0", "thinned when dense, each label with its place (issue 26)"


def test_a_diffuse_head_at_long_context_says_why_no_line_is_drawn(browser, tmp_path):
    path = render_html({"layer": [torch.full((1, 1, 100, 100), 0.01)]}).save(tmp_path / "diffuse.html")
    view = _Page(browser, path)
    try:
        note = view.page.inner_text("#ah-lines-note")
        view.page.select_option("#ah-lines-scale", "relative")
        after = view.page.inner_text("#ah-lines-note")
    finally:
        view.close()
    assert note.startswith("no key gets 2% of this query's attention") and after == ""


# ------------------------------------------------------------------ long inputs: pooled map, each query's largest weights
def _long_arrays(meta_call, blob):
    b, h, q, k = meta_call["shape"]
    pooled, top = meta_call["pooled"], meta_call["top"]
    pb, ph, pq, pk = pooled["shape"]
    o = pooled["offset"]
    pooled_codes = torch.frombuffer(bytearray(blob[o: o + pb * ph * pq * pk]), dtype=torch.uint8).view(pb, ph, pq, pk)
    n = b * h * q * top["k"]
    top_codes = torch.frombuffer(bytearray(blob[top["codes"]: top["codes"] + n]), dtype=torch.uint8)
    width = top["indexBytes"]
    raw = bytearray(blob[top["index"]: top["index"] + n * width])
    index = torch.frombuffer(raw, dtype=torch.int32 if width == 4 else torch.int16).long()
    if width == 2:
        index = index % 65536  # the page reads them as uint16
    cover = torch.frombuffer(bytearray(blob[top["cover"]: top["cover"] + b * h * q]), dtype=torch.uint8)
    assert all(offset % 4 == 0 for offset in (o, top["codes"], top["index"], top["values"], top["cover"])), "aligned"
    return pooled_codes, top_codes.view(b, h, q, -1), index.view(b, h, q, -1), cover.view(b, h, q)


def test_a_long_call_travels_as_its_pooled_map_and_each_querys_largest_weights():
    """Issue 13: a 2,000-token page held every weight (22 MB). A call longer than pool_above now carries
    its block-maximum map and each query's top keys; oracles: torch's max_pool2d and topk."""
    torch.manual_seed(0)
    weights = (torch.randn(2, 3, 600, 700) * 3).softmax(-1)
    weights[1, :, :, 650:] = 0  # padded keys
    weights[1] = weights[1] / weights[1].sum(-1, keepdim=True)
    page = render_html({"layer": [weights]}, pool_above=512, pool_size=256, top_keys=8)
    meta, blob = _payload(page.html)
    call = meta["layers"][0]["calls"][0]
    assert "offset" not in call, "the whole map does not travel"
    qe, ke = block_edges(600, 256), block_edges(700, 256)  # PooledAttention's blocks (issue 21)
    assert call["pooled"]["edges"] == [qe, ke] and call["pooled"]["shape"] == [2, 3, 256, 256]
    pooled, top_codes, index, cover = _long_arrays(call, blob)
    codes, scales = encode_weights(weights)
    expected = torch.stack([torch.stack([codes[:, :, qe[i]:qe[i + 1], ke[j]:ke[j + 1]].amax((-2, -1))
                                         for j in range(256)], -1) for i in range(256)], -2)
    assert torch.equal(pooled, expected.to(torch.uint8))
    values, want_index = torch.topk(weights, 8, dim=-1)
    assert torch.equal(index, want_index)
    assert torch.equal(top_codes, codes.gather(-1, want_index))
    torch.testing.assert_close(cover.float(), (values.sum(-1) * 100).round(), atol=1, rtol=0)
    assert call["maskedKeys"][1] == list(range(650, 700))
    whole = render_html({"layer": [weights]}, pool_above=10_000)
    # Lighter than the whole map. Since the page cuts PooledAttention's blocks (issue 21), 600 x 700 tokens
    # travel as 256 x 256 blocks (200 x 234 before, at 1.5x lighter): 1.36x at this size, more as calls grow.
    assert len(page.html) < len(whole.html) / 1.3, (len(page.html), len(whole.html))
    short = render_html({"layer": [weights[:, :, :500, :500]]})
    assert "pooled" not in _payload(short.html)[0]["layers"][0]["calls"][0], "512 tokens and fewer travel whole"


def test_a_long_call_past_65536_keys_keeps_32_bit_key_indices():
    weights = torch.zeros(1, 1, 2, 70_000)
    weights[0, 0, 0, 69_999] = 1.0
    weights[0, 0, 1, 40_000] = 1.0
    call = _payload(render_html({"layer": [weights]}, top_keys=2).html)
    pooled, top_codes, index, cover = _long_arrays(call[0]["layers"][0]["calls"][0], call[1])
    assert call[0]["layers"][0]["calls"][0]["top"]["indexBytes"] == 4
    assert index[0, 0, :, 0].tolist() == [69_999, 40_000] and top_codes[0, 0, :, 0].tolist() == [254, 254]
    assert cover.flatten().tolist() == [100, 100]


@pytest.mark.parametrize("option, value", [("pool_above", 0), ("pool_size", -1), ("top_keys", "8"), ("top_keys", True)])
def test_page_pooling_options_are_checked(option, value):
    with pytest.raises(AttentionHookerError, match=f"{option}={value!r} must be a positive int"):
        render_html({"layer": [torch.rand(1, 1, 4, 4)]}, **{option: value})


def test_a_2000_token_page_shows_the_pooled_map_and_the_tokens_of_a_clicked_block(browser, tmp_path):
    torch.manual_seed(0)
    n = 2000
    weights = (torch.randn(1, 2, n, n) * 4).softmax(-1)
    tokens = [f"w{i}" for i in range(n)]
    page = render_html({"model.layers.0.attn": [weights]}, tokens=tokens)
    assert len(page.html) < 3_000_000, "the whole map was 22 MB at 2,000 tokens"
    codes, scales = encode_weights(weights)
    view = _Page(browser, page.save(tmp_path / "long.html"))
    p = view.page
    try:
        caption = p.inner_text("#ah-matrix-caption")
        assert "2000 queries x 2000 keys, pooled" in caption and "block of 7-8 x 7-8 tokens" in caption
        box = p.locator("#ah-matrix").bounding_box()
        blocks = 256  # min(256, 2000): PooledAttention's blocks, 7 or 8 tokens wide (issue 21)
        cell = (100, 37)  # (query block, key block) under the pointer
        at = lambda q, k, n_: (round(box["x"] + (k + 0.5) * box["width"] / n_),
                               round(box["y"] + (q + 0.5) * box["height"] / n_))  # whole pixels: 2 px a block
        p.mouse.move(*at(*cell, blocks))
        readout = p.inner_text("#ah-readout")
        block = weights[0, 0, 782:790, 290:297]
        assert readout.startswith('queries 782-789 "w782"... -> keys 290-296 "w290"...: largest ~')
        # log codes: within 2.8% (RELATIVE_ERROR), shown in 3 significant digits
        assert float(readout.split("~")[1]) == pytest.approx(block.max().item(), rel=RELATIVE_ERROR + 0.005)
        p.mouse.click(*at(*cell, blocks))
        caption = p.inner_text("#ah-matrix-caption")
        q0, k0 = 782 + 4 - 32, 290 + 3 - 32
        assert caption.startswith(f"model.layers.0.attn, head 0: queries {q0}-{q0 + 63} x keys {k0}-{k0 + 63}")
        assert "each query's 8 largest weights" in caption
        box = p.locator("#ah-matrix").bounding_box()  # the caption above it may have changed its number of lines
        # the detail of a cell that holds one of its query's largest weights reads that weight
        values, index = torch.topk(weights[0, 0, q0 + 10], 8)
        inside = [(v.item(), i.item()) for v, i in zip(values, index) if k0 <= i < k0 + 64]
        if inside:
            value, key = inside[0]
            p.mouse.move(*at(10, key - k0, 64))
            assert p.inner_text("#ah-readout").startswith(f'query {q0 + 10} "w{q0 + 10}" -> key {key} "w{key}": ~')
        p.mouse.move(*at(10, 0 if 0 not in index - k0 else 1, 64))
        assert "not among its 8 largest" in p.inner_text("#ah-readout")
        # the head view lists the clicked query's largest weights, per head, largest first
        rows = p.eval_on_selector_all("#ah-keys .ah-top", "els => els.map(e => e.textContent)")
        assert len(rows) == 2
        for h, row in enumerate(rows):
            values, index = torch.topk(weights[0, h, 782], 8)
            assert row.startswith(f"h{h}: w{index[0].item()} ({index[0].item()}) ~")
            assert [int(x) for x in re.findall(r"\((\d+)\)", row)] == index.tolist()
        assert p.inner_text("#ah-lines-note").startswith("long input (2000 x 2000 tokens)")
        labels = p.eval_on_selector_all("#ah-matrix-cols span", "els => els.map(e => e.textContent)")
        assert labels[0] == f"{k0} w{k0}"  # a thinned axis: the window's labels with their places (issue 26)
        p.click("#ah-matrix-back")
        assert "pooled" in p.inner_text("#ah-matrix-caption")
        assert view.errors == [] and view.requests == []
    finally:
        view.close()


def test_the_largest_weights_of_a_long_causal_row_read_as_themselves_not_as_zero(browser, tmp_path):
    """A causal head's largest weight is 1.0 (its first row), so at row 1,000 every weight is
    ~0.001: 8-bit codes on the head's scale read them all as 0.00; they travel as float16."""
    n = 1200
    scores = torch.randn(1, 1, n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    weights = scores.softmax(-1)
    page = render_html({"layer": [weights]}, tokens=[f"w{i}" for i in range(n)])
    meta, blob = _payload(page.html)
    top = meta["layers"][0]["calls"][0]["top"]
    values = torch.frombuffer(bytearray(blob[top["values"]: top["values"] + n * 8 * 2]), dtype=torch.float16).view(n, 8)
    want, index = torch.topk(weights[0, 0], 8)
    torch.testing.assert_close(values.float(), want, rtol=1e-3, atol=1e-7)
    view = _Page(browser, page.save(tmp_path / "causal.html"))
    try:
        view.page.click("#ah-queries div:nth-child(1001)")
        row = view.page.inner_text("#ah-keys .ah-top")
    finally:
        view.close()
    shown = [float(x) for x in re.findall(r"~([0-9.e-]+)", row)]
    assert len(shown) == 8 and shown[0] > 0, row
    torch.testing.assert_close(torch.tensor(shown), want[1000], rtol=5e-3, atol=0)
    assert view.errors == []


def test_a_weight_below_the_codes_floor_reads_as_below_it_not_as_zero(browser, tmp_path):
    """Issue 26: 0.001 next to 0.997 read "below 0.0020" (8-bit linear codes); now it reads as itself,
    and only a weight under 1e-6 of the head's largest reads "below"."""
    weights = torch.tensor([[[[0.997, 0.001, 1e-5, 1e-9]]]]).expand(1, 1, 4, 4)
    view = _Page(browser, render_html({"layer": [weights]}).save(tmp_path / "small.html"))
    try:
        box = view.page.locator("#ah-matrix").bounding_box()
        read = []
        for key in range(4):
            view.page.mouse.move(box["x"] + box["width"] * (key + 0.5) / 4, box["y"] + box["height"] * 0.1)
            read.append(view.page.inner_text("#ah-readout"))
    finally:
        view.close()
    values = [float(r.split("~")[1]) for r in read[:3]]
    assert read[0] == 'query 0 "0" -> key 0 "0": ~0.997'
    assert values == pytest.approx([0.997, 0.001, 1e-5], rel=RELATIVE_ERROR + 0.005) and "e-6" in read[2]
    assert read[3] == 'query 0 "0" -> key 3 "3": below 1.0e-6', "1e-9 is under 1e-6 of the largest"


# ------------------------------------------------------------------ the overview coloured by a score per head
def test_the_overview_colours_each_head_by_a_chosen_score(browser, minilm_page, tmp_path):
    """Issue 14: the layers x heads grid coloured by a score (its own, or ones given) instead of the maps."""
    from attention_hooker.analysis.roles import previous_token_score

    hooker, tokens, _, _ = minilm_page
    names = list(hooker.values)
    importance = {name: [float(h) for h in range(12)] for name in names}
    importance[names[0]] = [float("nan")] * 12  # a layer where the score does not apply
    page = render_html(hooker, tokens=tokens, head_scores={"importance": importance})
    view = _Page(browser, page.save(tmp_path / "scores.html"))
    p = view.page
    try:
        options = p.eval_on_selector_all("#ah-overview-colour option", "els => els.map(e => e.value)")
        assert options == ["", "first-token share", "confidence", "entropy (nats)", "previous token", "importance"]
        maps = view.canvas("#ah-overview canvas[data-layer='0'][data-head='2']")
        p.select_option("#ah-overview-colour", "previous token")
        score = float(p.get_attribute("#ah-overview canvas[data-layer='0'][data-head='2']", "data-score"))
        title = p.get_attribute("#ah-overview canvas[data-layer='0'][data-head='2']", "title")
        assert view.canvas("#ah-overview canvas[data-layer='0'][data-head='2']") != maps
        assert p.inner_text("#ah-overview-legend").startswith("colour: previous token, 0.00 (dark) to 1.00 (bright)")
        p.select_option("#ah-overview-colour", "importance")
        grey = p.evaluate("""() => Array.from(document.querySelector("#ah-overview canvas[data-layer='0']")
            .getContext('2d').getImageData(0, 0, 1, 1).data.slice(0, 3))""")
        given = p.get_attribute("#ah-overview canvas[data-layer='1'][data-head='7']", "data-score")
        p.select_option("#ah-overview-colour", "")
        back = view.canvas("#ah-overview canvas[data-layer='0'][data-head='2']")
        assert view.errors == []
    finally:
        view.close()
    want = previous_token_score(hooker.values[names[0]][0])[0, 2].item()
    assert score == pytest.approx(want, abs=1e-6) and title.endswith(f"previous token {want:.2f}")  # toPrecision(3)
    assert grey == [215, 215, 215], "a head the score does not apply to is grey"
    assert given == "7" and back == maps


def test_head_scores_are_checked_against_the_layers_shown():
    w = {"layer": [torch.full((1, 2, 3, 3), 1 / 3)]}
    with pytest.raises(AttentionHookerError, match=r"head_scores\['x'\] names layer 'other', which the page does not"):
        render_html(w, head_scores={"x": {"other": [1, 2]}})
    with pytest.raises(AttentionHookerError, match=r"head_scores\['x'\]\['layer'\] has 3 numbers; the layer has 2 heads"):
        render_html(w, head_scores={"x": {"layer": [1, 2, 3]}})
    with pytest.raises(AttentionHookerError, match="head_scores must be"):
        render_html(w, head_scores=[1, 2])


def test_a_masked_key_in_the_detail_of_a_long_call_reads_as_masked(browser, tmp_path):
    torch.manual_seed(0)
    weights = (torch.randn(1, 1, 600, 1200) * 3).softmax(-1)
    weights[..., 1100:] = 0
    weights = weights / weights.sum(-1, keepdim=True)
    page = render_html({"cross": [weights]}, query_tokens=[f"q{i}" for i in range(600)],
                       key_tokens=[f"k{i}" for i in range(1200)])
    view = _Page(browser, page.save(tmp_path / "masked.html"))
    try:
        box = view.page.locator("#ah-matrix").bounding_box()
        view.page.mouse.click(box["x"] + box["width"] * 0.99, box["y"] + box["height"] * 0.99)
        view.page.mouse.move(box["x"] + box["width"] * 0.99, box["y"] + box["height"] * 0.5)
        readout = view.page.inner_text("#ah-readout")
    finally:
        view.close()
    assert readout.endswith('-> key 1199 "k1199": masked (weight exactly 0 from every query and head)'), readout
    assert view.errors == []


# ------------------------------------------------------------------ text the page cannot write or show whole
def test_a_lone_surrogate_in_the_title_a_token_or_a_name_is_saved_as_the_replacement_character(tmp_path):
    """A title or token holding a lone surrogate (``os.fsdecode`` of undecodable bytes) rendered, but
    ``save`` raised UnicodeEncodeError: each becomes U+FFFD (a surrogate pair, its character)."""
    weights = {"layer.\udcff": [torch.rand(1, 2, 3, 3).softmax(-1)]}
    page = render_html(weights, tokens=["a", "b\udc80", "\ud83d\ude00"], title="bad \ud800 title",
                       head_scores={"score \udc80": {"layer.\udcff": [1.0, 2.0]}})
    path = page.save(tmp_path / "surrogates.html")
    with open(path, encoding="utf-8") as handle:  # strict: it is UTF-8
        text = handle.read()
    assert "<title>bad \ufffd title</title>" in text and not re.search("[\ud800-\udfff]", text)
    meta, _ = _payload(text)
    assert meta["title"] == page.title == "bad \ufffd title"
    assert meta["tokenSets"] == [["a", "b\ufffd", "\U0001f600"]]
    layer = meta["layers"][0]
    assert layer["name"] == "layer.\ufffd" and list(layer["scores"]) == ["score \ufffd"]
    assert "bad \ufffd title" in page._repr_html_().encode("utf-8").decode("utf-8")


def test_a_100_kb_token_title_and_layer_name_travel_shortened():
    """A 100 KB token, title or layer name grew the page by 100 KB each time it was written."""
    weights = torch.rand(1, 2, 3, 3).softmax(-1)
    page = render_html({"L" * 100_000: [weights]}, tokens=["a", "x" * 100_000, "c"], title="T" * 100_000)
    plain = render_html({"L": [weights]}, tokens=["a", "x", "c"], title="T")
    meta, _ = _payload(page.html)
    texts = [meta["tokenSets"][0][1], meta["title"], meta["layers"][0]["name"], meta["layers"][0]["short"]]
    for text, letter in zip(texts, "xTLL"):
        assert 64 < len(text) <= 1000 and text == letter * (len(text) - 1) + "…", (len(text), text[-3:])
    assert len(page.html.encode("utf-8")) < len(plain.html.encode("utf-8")) + 6_000


@pytest.mark.parametrize("n", [20, 600])  # lines between tokens; a long call's lists of largest weights
def test_a_100_kb_token_is_shortened_on_screen_and_the_head_view_still_draws(browser, tmp_path, n):
    """A 100 KB token made its token column 100 KB wide (``1fr`` grows to its longest label):
    the head view showed a slice of that label, its lines and other tokens far off to the side."""
    weights = torch.full((1, 1, n, n), 0.5 / (n - 1))
    weights[..., 3] = 0.5  # every query looks at the long token
    tokens = [f"t{i}" for i in range(n)]
    tokens[3] = "x" * 100_000
    parts = ["ah-queries", "ah-lines", "ah-keys"] if n == 20 else ["ah-queries", "ah-keys"]  # a long call: no lines
    view = _Page(browser, render_html({"layer": [weights]}, tokens=tokens).save(tmp_path / f"long-token-{n}.html"))
    p = view.page
    try:
        boxes = p.evaluate("""ids => ids.map(id => {
            const r = document.getElementById(id).getBoundingClientRect(); return [r.left, r.right]; })""",
                           ["ah-headview"] + parts)
        shown = p.eval_on_selector("#ah-queries div:nth-child(4)", "e => [e.textContent, e.title]")
        wide = p.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        if n == 20:
            ink = p.eval_on_selector("#ah-lines", """c => { let drawn = 0;
                const pixels = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                for (let i = 3; i < pixels.length; i += 4) drawn += pixels[i] > 0; return drawn; }""")
            key = p.eval_on_selector("#ah-keys div:nth-child(4)", "e => [e.textContent, Number(e.dataset.width)]")
        else:
            key = p.eval_on_selector("#ah-keys .ah-top", "e => [e.textContent, 1]")
        assert view.errors == []
    finally:
        view.close()
    (left, right), *columns = boxes
    for part, (start, end) in zip(parts, columns):
        assert left <= start < end <= right + 1, (part, boxes, "each part of the head view is inside it")
    assert wide <= 0, "nothing wider than the window (the matrix's column labels)"
    assert shown[0] == "x" * 63 + "…" and shown[1].startswith("query 3: xxx") and len(shown[1]) > 900
    assert "x" * 63 + "…" in key[0] and "x" * 64 not in key[0] and key[1] > 0
    if n == 20:
        assert ink > 0, "lines drawn"


def test_the_page_opens_in_the_colour_scale_it_was_made_with(tmp_path, browser):
    """Issue 26: --color-scale sqrt reached the PNGs, but the page opened in linear."""
    torch.manual_seed(0)
    values = {"layer": [torch.softmax(torch.randn(1, 2, 12, 12) * 3, -1)]}
    pages = {}
    for scale in ("linear", "sqrt"):
        path = tmp_path / f"{scale}.html"
        render_html(values, color_scale=scale).save(path)
        pages[scale] = _Page(browser, path)
    try:
        assert pages["sqrt"].page.eval_on_selector("#ah-scale", "s => s.value") == "sqrt"
        opened_in_sqrt = pages["sqrt"].canvas("#ah-matrix")
        assert opened_in_sqrt != pages["linear"].canvas("#ah-matrix")
        pages["linear"].page.select_option("#ah-scale", "sqrt")  # the same pixels as choosing it by hand
        assert pages["linear"].canvas("#ah-matrix") == opened_in_sqrt
        assert not pages["sqrt"].errors and not pages["linear"].errors
    finally:
        for page in pages.values():
            page.close()
    with pytest.raises(AttentionHookerError, match="color_scale='cubic' must be one of"):
        render_html(values, color_scale="cubic")


@pytest.mark.parametrize("cell_width", [700, 1100])
def test_the_notebook_frame_fits_its_cell(browser, minilm_page, tmp_path, cell_width):
    """Issue 26: in a notebook at 1400 px the page was wider than the cell (the frame's border outside its 100%)."""
    _, _, page, _ = minilm_page
    notebook = tmp_path / "cell.html"
    notebook.write_text(f"<html><body style='margin:0'><div id='cell' style='width:{cell_width}px'>"
                        f"{page._repr_html_()}</div></body></html>", encoding="utf-8")
    opened = browser.new_page(viewport={"width": 1400, "height": 900})
    opened.goto(f"file://{notebook}")
    opened.frames[1].wait_for_selector("body[data-ready]", timeout=30_000)
    frame, cell = opened.evaluate("[document.querySelector('iframe').getBoundingClientRect().width,"
                                  " document.getElementById('cell').getBoundingClientRect().width]")
    assert frame <= cell == cell_width
    inner = opened.frames[1].evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert inner[0] <= inner[1]  # nothing inside the frame is wider than it either
    opened.close()


def _viridis_lut():
    """The page's colour table (view.js): viridis anchors interpolated to 256 entries, rounded as a Uint8ClampedArray."""
    anchors = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
               [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]]
    lut = []
    for i in range(256):
        x = i / 255 * (len(anchors) - 1)
        k = min(int(x), len(anchors) - 2)
        f = x - k
        lut.append([min(255, max(0, round(anchors[k][c] + f * (anchors[k + 1][c] - anchors[k][c])))) for c in range(3)])
    return torch.tensor(lut, dtype=torch.float32)  # (256, 3)


def test_the_units_selector_swaps_the_tokens_for_their_words_in_every_view(browser, tmp_path, minilm_sdpa,
                                                                          minilm_tokenizer):
    """Issue 26: the page showed word pieces only. Given words=to_words(...), it carries both and its units
    selector swaps them: the matrix becomes words x words, each cell the colour of that word weight."""
    from io import BytesIO

    from PIL import Image

    from attention_hooker import to_words

    enc = minilm_tokenizer("The unbelievably tokenizable sentence stays unexplained.", return_tensors="pt")
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
        minilm_sdpa(**enc)
    words = to_words(hooker, enc)
    n_tokens, n_words = len(enc.tokens(0)), len(words.tokens[0])
    assert n_words < n_tokens
    both = render_html(hooker, tokens=enc.tokens(0), words=words).save(tmp_path / "both.html")
    opened_on_words = render_html(hooker, tokens=enc.tokens(0), words=words, units="words").save(tmp_path / "w.html")
    plain = render_html(hooker, tokens=enc.tokens(0)).save(tmp_path / "tokens.html")
    size = "c => [c.width, c.height]"
    view = _Page(browser, both)
    page = view.page
    try:
        assert page.is_visible("#ah-units") and page.input_value("#ah-units") == "tokens"
        assert page.eval_on_selector("#ah-matrix", size) == [n_tokens, n_tokens]
        assert "##bel" in page.inner_text("#ah-queries")
        tokens_matrix = view.canvas("#ah-matrix")
        page.select_option("#ah-units", "words")
        assert page.eval_on_selector("#ah-matrix", size) == [n_words, n_words], "the map is the words' size"
        assert page.eval_on_selector_all("#ah-queries div", "els => els.map(e => e.textContent)") == words.tokens[0]
        assert page.eval_on_selector_all("#ah-matrix-cols span", "els => els.map(e => e.textContent)") == words.tokens[0]
        assert {tuple(map(int, s.split(","))) for s in page.eval_on_selector_all(
            "#ah-overview canvas", "els => els.map(e => e.width + ',' + e.height)")} == {(n_words, n_words)}
        # Every cell's colour is the word weight's (layer 0, head 0), quantised and coloured as the page does.
        layer = next(iter(words))
        weights = words[layer][0][0, 0]  # (W, W)
        codes, scales = encode_weights(weights[None, None])  # the page's log codes (issue 26), decoded as it does
        ratio = (decode_weights(codes, scales) / scales[..., None, None])[0, 0]
        expected = _viridis_lut()[torch.round(ratio * 255).long()]  # the page opens in linear on a short text
        drawn = torch.tensor(page.eval_on_selector("#ah-matrix", """c => Array.from(
            c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"""), dtype=torch.float32)
        drawn = drawn.reshape(n_words, n_words, 4)[..., :3]
        assert (drawn - expected).abs().max() <= 1, "each cell is its word weight's colour"
        # What the screen shows (the canvas scaled up, pixelated): the same colour at the centre of each cell.
        shot = Image.open(BytesIO(page.locator("#ah-matrix").screenshot())).convert("RGB")
        width, height = shot.size
        for q in range(n_words):
            for k in range(n_words):
                pixel = shot.getpixel((int((k + 0.5) * width / n_words), int((q + 0.5) * height / n_words)))
                assert max(abs(a - b) for a, b in zip(pixel, drawn[q, k].tolist())) <= 2
        page.hover("#ah-queries div:nth-child(3)")  # "unbelievably": its lines go to the words
        assert page.get_attribute("#ah-keys div:nth-child(3)", "title").startswith("key 2: unbelievably")
        page.select_option("#ah-units", "tokens")
        assert page.eval_on_selector("#ah-matrix", size) == [n_tokens, n_tokens]
        assert view.canvas("#ah-matrix") == tokens_matrix, "back to the same token map"
        assert view.errors == [] and view.requests == []
    finally:
        view.close()
    for path, units, shown in ((opened_on_words, "words", [n_words, n_words]), (plain, None, [n_tokens, n_tokens])):
        view = _Page(browser, path)
        try:
            assert view.page.is_visible("#ah-units") == (units is not None)
            if units:
                assert view.page.input_value("#ah-units") == units
            assert view.page.eval_on_selector("#ah-matrix", size) == shown
            assert view.errors == []
        finally:
            view.close()


def test_words_must_cover_the_layers_shown_and_units_words_needs_them(minilm_sdpa, minilm_tokenizer):
    from attention_hooker import to_words

    enc = minilm_tokenizer("Unbelievably so.", return_tensors="pt")
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
        minilm_sdpa(**enc)
    first = next(iter(hooker.values))
    some = to_words(hooker, enc, layers=[first])
    with pytest.raises(AttentionHookerError, match=r"words lacks the layer\(s\) \['encoder.layer.1"):
        render_html(hooker, words=some)
    assert '"words":' in render_html(hooker, words=some, layers=[first]).html
    with pytest.raises(AttentionHookerError, match="units='words' opens the page on words: pass words="):
        render_html(hooker, units="words")
    with pytest.raises(AttentionHookerError, match="units='letters' must be one of"):
        render_html(hooker, words=to_words(hooker, enc), units="letters")


def test_a_thinned_axis_of_the_page_puts_each_labels_position_in_front_of_it(browser, tmp_path):
    """Issue 26: long axes labelled sampled tokens without their positions."""
    from attention_hooker.views.labels import kept_labels

    tokens = [f"w{i % 7}" for i in range(300)]
    page = render_html({"layer": [torch.rand(1, 2, 75, 300).softmax(-1)]}, tokens=tokens,
                       query_tokens=kept_labels(tokens, slice(None, None, 4), "the text"))
    opened = _Page(browser, page.save(tmp_path / "thinned.html"))
    try:
        keys = opened.page.eval_on_selector_all("#ah-matrix-cols span", "s => s.map(x => x.textContent)")
        rows = opened.page.eval_on_selector_all("#ah-matrix-rows span", "s => s.map(x => x.textContent)")
        assert 1 < len(keys) < 300 and 1 < len(rows) < 75
        key_step, row_step = int(keys[1].split()[0]), int(rows[1].split()[0])
        assert keys[:2] == ["0 w0", f"{key_step} w{key_step % 7}"]
        assert row_step % 4 == 0 and rows[1] == f"{row_step} w{row_step % 7}"  # the kept row's place in the input
        assert opened.errors == []
    finally:
        opened.close()


def test_a_generation_page_marks_where_the_prompt_ends(browser, tmp_path):
    """Issue 26: the --generate page did not mark where the prompt ends."""
    import io

    import numpy as np
    from PIL import Image

    from attention_hooker import stitch_steps

    prompt, new = 6, 4
    steps = [torch.tril(torch.rand(1, 2, prompt, prompt)).softmax(-1)]
    steps += [torch.rand(1, 2, 1, prompt + i + 1).softmax(-1) for i in range(new)]
    tokens = [f"p{i}" for i in range(prompt)] + [f"g{i}" for i in range(new)]
    page = render_html({"layer": [stitch_steps(steps)]}, tokens=tokens, prompt_length=prompt)
    opened = _Page(browser, page.save(tmp_path / "generated.html"))
    try:
        p = opened.page
        generated = p.eval_on_selector_all("#ah-matrix-cols span.ah-generated", "s => s.map(x => x.textContent)")
        assert generated == [f"g{i}" for i in range(new)]
        assert p.eval_on_selector_all("#ah-matrix-rows span.ah-generated", "s => s.length") == new
        assert "the prompt is tokens 0-5, 4 generated after it" in p.inner_text("#ah-matrix-caption")
        # the line lies between the last prompt token's label and the first generated one's, on screen
        line = p.eval_on_selector("#ah-matrix-cols .ah-prompt-end", "e => e.getBoundingClientRect().left")
        canvas = p.eval_on_selector("#ah-matrix", "e => { const r = e.getBoundingClientRect(); return [r.left, r.width]; }")
        assert abs(line - (canvas[0] + canvas[1] * prompt / (prompt + new))) < 3
        shot = np.asarray(Image.open(io.BytesIO(p.locator("#ah-matrix-cols").screenshot())).convert("RGB"))
        assert (np.abs(shot.astype(int) - (180, 83, 9)).sum(-1) < 40).any(), "the line is drawn"
        assert opened.errors == []
    finally:
        opened.close()
    with pytest.raises(AttentionHookerError, match="prompt_length"):
        render_html({"layer": [stitch_steps(steps)]}, prompt_length=0)


def test_the_grid_of_a_generation_draws_a_line_where_the_prompt_ends():
    from attention_hooker import plot_attention_grid

    fig = plot_attention_grid(torch.rand(1, 2, 10, 10).softmax(-1), prompt_length=6)
    lines = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert sorted(tuple(line.get_xdata()) + tuple(line.get_ydata()) for line in lines) == \
        sorted([(5.5, 5.5, 0, 1), (0, 1, 5.5, 5.5)])
    with pytest.raises(AttentionHookerError, match="prompt_length=11 is more than the 10 keys"):
        plot_attention_grid(torch.rand(1, 2, 10, 10).softmax(-1), prompt_length=11)


def test_page_options_of_issue_26_refuse_what_they_cannot_show():
    """Review of issue 26: score_ranges='abc' was a raw TypeError; a prompt longer than the keys, or with words,
    was taken silently; the words of one tensor were 'lacking layers'."""
    from attention_hooker import AttentionHookerTypeError, to_words

    w = torch.rand(1, 2, 5, 5).softmax(-1)
    with pytest.raises(AttentionHookerTypeError, match="score_ranges must map score names to values"):
        render_html({"l": [w]}, score_ranges="abc")
    with pytest.raises(AttentionHookerTypeError, match="not_applicable must map score names"):
        render_html({"l": [w]}, not_applicable=["importance"])
    with pytest.raises(AttentionHookerError, match="prompt_length=100 is more than the 5 keys of the longest call"):
        render_html({"l": [w]}, tokens=list("abcde"), prompt_length=100)
    words = to_words({"l": [w]}, [0, 0, 1, 2, 2])
    with pytest.raises(AttentionHookerError, match="give prompt_length= or words=, not both"):
        render_html({"l": [w]}, words=words, prompt_length=3)
    with pytest.raises(AttentionHookerTypeError, match="to_words of one tensor gives one map"):
        render_html({"l": [w]}, words=to_words(w, [0, 0, 1, 2, 2]))
