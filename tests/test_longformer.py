"""Longformer and LED's encoder: the band, global columns and global rows of each layer call assembled
into one (batch, heads, query, key) map (capture/pieces.py, capture/bands.py), checked against

- a hand computation from each layer's own weights (local rows: a softmax of the local q.k over the
  band and the global keys, minus padding; global rows: a softmax of q_g.k_g over every real key);
- transformers' own returned ``attentions`` / ``global_attentions``, placed by this file's own loops;
- invariants: the model's outputs unchanged by the capture, and the map times the values each row
  multiplies (value(x) for local rows, value_global(x) for global rows) equal to the layer's output.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionCaptureWarning, TransformerAttentionHooker, load  # noqa: E402
from attention_hooker.analysis.stats import HeadStatsAccumulator  # noqa: E402

LENGTH = 10  # the model pads it to 12 (a multiple of the largest attention_window, 6)


def _longformer(heads=2, windows=(4, 6), hidden=16):
    torch.manual_seed(0)
    config = transformers.LongformerConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=len(windows), num_attention_heads=heads,
        intermediate_size=32, attention_window=list(windows), max_position_embeddings=64, pad_token_id=1,
        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    return transformers.LongformerModel(config, add_pooling_layer=False).eval()


def _led():
    torch.manual_seed(0)
    config = transformers.LEDConfig(
        vocab_size=100, d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, attention_window=[4, 6],
        max_encoder_position_embeddings=64, max_decoder_position_embeddings=64, pad_token_id=1,
        dropout=0.0, attention_dropout=0.0)
    return transformers.LEDModel(config).eval()


def _batch(led=False):
    """Two rows: the second with two tokens of user padding; global tokens {0} and {0, 5}."""
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, LENGTH))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, -2:] = 0
    glob = torch.zeros(2, LENGTH, dtype=torch.long)
    glob[0, 0] = 1
    glob[1, [0, 5]] = 1
    inputs = dict(input_ids=ids, attention_mask=mask, global_attention_mask=glob)
    if led:
        inputs["decoder_input_ids"] = torch.randint(3, 100, (2, 4))
    return inputs


def _layers(model):
    kinds = ("LongformerSelfAttention", "LEDEncoderSelfAttention")
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in kinds]


def _layer_calls(model, inputs):
    """Each self-attention layer's call: (hidden states (B, L, C), its keyword arguments, its output (B, L, C))."""
    seen, handles = {}, []
    for name, module in _layers(model):
        def hook(m, args, kwargs, out, name=name):
            seen[name] = (args[0] if args else kwargs["hidden_states"], kwargs, out[0])
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _hand(module, x, is_global, is_masked):
    """The layer's map from its own weights, without its band code: (B, H, L, L), and its two value sets."""
    b, l, _ = x.shape
    h, d, w = module.num_heads, module.head_dim, module.one_sided_attn_window_size

    def heads(t):
        return t.view(b, l, h, d).transpose(1, 2)

    with torch.no_grad():
        q, k = heads(module.query(x) / math.sqrt(d)), heads(module.key(x))
        qg, kg = heads(module.query_global(x) / math.sqrt(d)), heads(module.key_global(x))
        v, vg = heads(module.value(x)), heads(module.value_global(x))
    i = torch.arange(l)
    near = (i[:, None] - i[None, :]).abs() <= w
    local_keys = (near[None] | is_global[:, None, :]) & ~is_masked[:, None, :]  # (B, L, L)
    local = (q @ k.transpose(-1, -2)).masked_fill(~local_keys[:, None], float("-inf")).softmax(-1)
    glob = (qg @ kg.transpose(-1, -2)).masked_fill(is_masked[:, None, None, :], float("-inf")).softmax(-1)
    dense = torch.where(is_global[:, None, :, None], glob, local)
    return dense.masked_fill(is_masked[:, None, :, None], 0.0), v, vg


def _hf_placed(band, global_rows, is_global, is_masked, window, tokens):
    """transformers' returned band (B, H, T, G + 2w + 1) and global attentions (B, H, L, G) placed with loops."""
    b_n, h_n = band.shape[:2]
    g = band.shape[-1] - (2 * window + 1)
    dense = torch.zeros(b_n, h_n, tokens, tokens)
    for b in range(b_n):
        positions = [p for p in range(is_global.shape[1]) if is_global[b, p]]
        for i in range(tokens):
            if is_masked[b, i]:
                continue
            if i in positions:
                for j in range(tokens):
                    dense[b, :, i, j] = global_rows[b, :, j, positions.index(i)]
                continue
            for c in range(2 * window + 1):
                j = i - window + c
                if 0 <= j < tokens:
                    dense[b, :, i, j] += band[b, :, i, g + c]
            for n, p in enumerate(positions):
                dense[b, :, i, p] += band[b, :, i, n]
    return dense


@pytest.fixture(scope="module")
def longformer_capture():
    model, inputs = _longformer(), _batch()
    with torch.no_grad():
        plain = model(**inputs, output_attentions=True)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooked = model(**inputs)
    return model, inputs, plain, hooked, hooker


def test_each_layer_is_the_hand_computation_from_its_weights_and_multiplies_the_values_into_its_output(
        longformer_capture):
    model, inputs, plain, hooked, hooker = longformer_capture
    assert torch.equal(plain.last_hidden_state, hooked.last_hidden_state), "the capture changed the model's output"
    assert hooker.report().missing == []
    calls = _layer_calls(model, inputs)
    assert {bands_module.one_sided_attn_window_size for _, bands_module in _layers(model)} == {2, 3}
    for name, module in _layers(model):
        x, kwargs, out = calls[name]
        is_global, is_masked = kwargs["is_index_global_attn"], kwargs["is_index_masked"]
        hand, v, vg = _hand(module, x, is_global, is_masked)
        (got,) = hooker.values[name]
        assert got.shape == (2, 2, LENGTH, LENGTH)  # the model's padding (12 -> 10) cropped
        torch.testing.assert_close(got, hand[:, :, :LENGTH, :LENGTH], atol=1e-6, rtol=1e-5)
        real = ~is_masked[:, :LENGTH]
        sums = got.sum(-1).transpose(1, 2)  # (B, T, H)
        torch.testing.assert_close(sums[real], torch.ones_like(sums[real]))
        assert (got.transpose(1, 2)[~real] == 0).all(), "padded query rows are exact zeros"
        assert (got[1, :, :, 8:] == 0).all(), "no query attends to the user's padding"
        product = torch.where(is_global[:, None, :LENGTH, None], got @ vg[:, :, :LENGTH], got @ v[:, :, :LENGTH])
        output = out.view(2, 12, 2, -1).transpose(1, 2)[:, :, :LENGTH]  # (B, H, T, d)
        torch.testing.assert_close(product.transpose(1, 2)[real], output.transpose(1, 2)[real], atol=1e-6, rtol=1e-5)


def test_each_layer_equals_transformers_band_and_global_attentions_placed_independently(longformer_capture):
    model, inputs, plain, _, hooker = longformer_capture
    calls = _layer_calls(model, inputs)
    for number, (name, module) in enumerate(_layers(model)):
        kwargs = calls[name][1]
        expected = _hf_placed(plain.attentions[number], plain.global_attentions[number],
                              kwargs["is_index_global_attn"], kwargs["is_index_masked"],
                              module.one_sided_attn_window_size, LENGTH)
        torch.testing.assert_close(hooker.values[name][0], expected, atol=1e-6, rtol=1e-5)


def test_led_encoder_layers_are_assembled_and_its_decoder_is_unchanged():
    model, inputs = _led(), _batch(led=True)
    with torch.no_grad():
        plain = model(**inputs, output_attentions=True)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooked = model(**inputs)
    assert torch.equal(plain.last_hidden_state, hooked.last_hidden_state)
    assert hooker.report().missing == []
    calls = _layer_calls(model, inputs)
    encoder = _layers(model)
    assert len(encoder) == 2
    for number, (name, module) in enumerate(encoder):
        x, kwargs, _ = calls[name]
        is_global, is_masked = kwargs["is_index_global_attn"], kwargs["is_index_masked"]
        hand = _hand(module, x, is_global, is_masked)[0][:, :, :LENGTH, :LENGTH]
        (got,) = hooker.values[name]
        torch.testing.assert_close(got, hand, atol=1e-6, rtol=1e-5)
        expected = _hf_placed(plain.encoder_attentions[number], plain.encoder_global_attentions[number],
                              is_global, is_masked, module.one_sided_attn_window_size, LENGTH)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    decoder = [n for n in hooker.values if n.startswith("decoder.") and "encoder_attn" not in n]
    torch.testing.assert_close(hooker.values[decoder[0]][0], plain.decoder_attentions[0])


def test_without_global_tokens_the_band_alone_is_placed():
    model, inputs = _longformer(), _batch()
    inputs.pop("global_attention_mask")
    with torch.no_grad(), TransformerAttentionHooker(model, keep_values=True) as hooker:
        model(**inputs)
    calls = _layer_calls(model, inputs)
    for name, module in _layers(model):
        x, kwargs, out = calls[name]
        hand, v, _ = _hand(module, x, kwargs["is_index_global_attn"], kwargs["is_index_masked"])
        (got,) = hooker.values[name]
        torch.testing.assert_close(got, hand[:, :, :LENGTH, :LENGTH], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(hooker.value_vectors[name][0], v[:, :, :LENGTH])


def test_keep_values_with_global_tokens_is_refused_with_the_reason():
    model, inputs = _longformer(), _batch()
    with torch.no_grad(), TransformerAttentionHooker(model, keep_values=True) as hooker, \
            pytest.warns(AttentionCaptureWarning, match="every attention call was refused"):
        model(**inputs)
    report = hooker.report()
    assert sorted(report.missing) == sorted(name for name, _ in _layers(model))
    assert "value_global" in report[report.missing[0]].reason
    assert hooker.values == {}


@pytest.mark.parametrize("selection", [dict(rows="last"), dict(heads=[1]), dict(keys=[0, 3, 5, 9]),
                                       dict(rows=[0, 5, 8], heads=[0], keys=[5, 0])])
def test_selections_are_slices_of_the_whole_map(longformer_capture, selection):
    model, inputs, _, _, whole = longformer_capture
    with torch.no_grad(), TransformerAttentionHooker(model, **selection) as hooker:
        model(**inputs)
    rows = [LENGTH - 1] if selection.get("rows") == "last" else selection.get("rows")
    assert set(hooker.values) == set(whole.values) == {name for name, _ in _layers(model)}
    for name, (full,) in whole.values.items():
        want = full
        for dim, index in ((1, selection.get("heads")), (2, rows), (3, selection.get("keys"))):
            if index is not None:
                want = want.index_select(dim, torch.tensor(index))
        assert torch.equal(hooker.values[name][0], want), name


def test_a_row_is_placed_without_the_whole_map(monkeypatch):
    """rows="last" places one row: nothing of (L, L) size is made (the library's placement is
    called with one row, and makes a (batch, heads, 1, T) map)."""
    from attention_hooker.capture import bands

    made = []
    real = bands.place_band_rows
    monkeypatch.setattr(bands, "place_band_rows", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    model, inputs = _longformer(), _batch()
    with torch.no_grad(), TransformerAttentionHooker(model, rows="last") as hooker:
        model(**inputs)
    assert [tuple(m.shape) for m in made] == [(2, 2, 1, LENGTH)] * 2
    assert all(v[0].shape == (2, 2, 1, LENGTH) for v in hooker.values.values())


def test_streamed_and_reduced_captures_equal_the_capture_in_memory(longformer_capture, tmp_path, monkeypatch):
    model, inputs, _, _, memory = longformer_capture
    from attention_hooker.capture import session
    monkeypatch.setattr(session, "ROWS_PER_TILE", 3)  # several tiles per call
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        with hooker.stream_to(tmp_path / "capture", shard_bytes=1):
            model(**inputs)
    loaded = load(tmp_path / "capture")
    for name, (want,) in memory.values.items():
        assert torch.equal(loaded.values[name][0], want)
    reduced = HeadStatsAccumulator()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.reduce_into(reduced, padding_mask=inputs["attention_mask"])
        model(**inputs)
    direct = HeadStatsAccumulator()
    direct.update(memory.values, padding_mask=inputs["attention_mask"])
    got, want = reduced.result(), direct.result()  # {statistic: (layers, heads) array}
    assert reduced.layers == direct.layers == list(memory.values) and set(got) == set(want)
    for key in want:
        assert want[key].shape == (2, 2), key
        torch.testing.assert_close(torch.as_tensor(got[key]), torch.as_tensor(want[key]), equal_nan=True)


def test_as_many_tokens_as_heads_is_not_read_as_heads():
    """4 heads, window 4, 4 tokens: the band (batch, 4 tokens, 4 heads, 5) has the shape the old
    code's labelling accepted as (batch, heads, query, key)."""
    model = _longformer(heads=4, windows=(4,), hidden=16)
    torch.manual_seed(3)
    inputs = dict(input_ids=torch.randint(3, 100, (2, 4)), attention_mask=torch.ones(2, 4, dtype=torch.long))
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(**inputs)
    calls = _layer_calls(model, inputs)
    ((name, module),) = _layers(model)
    x, kwargs, _ = calls[name]
    hand = _hand(module, x, kwargs["is_index_global_attn"], kwargs["is_index_masked"])[0]
    torch.testing.assert_close(hooker.values[name][0], hand, atol=1e-6, rtol=1e-5)


def test_an_attention_computation_that_is_none_of_the_pieces_refuses_the_call():
    model, inputs = _longformer(), _batch()
    (name, module), _ = _layers(model)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        extra = module.register_forward_pre_hook(lambda m, args: [torch.softmax(torch.randn(4, 3, 5), -1)] and None)
        try:
            with pytest.warns(AttentionCaptureWarning, match="unknown piece"):
                model(**inputs)
        finally:
            extra.remove()
    assert hooker.report().missing == [name]
    assert "(4, 3, 5)" in hooker.report()[name].reason and "unknown piece" in hooker.report()[name].reason


def test_keep_grad_and_a_map_over_the_size_limit_are_refused_with_their_reasons(monkeypatch):
    model, inputs = _longformer(), _batch()
    with TransformerAttentionHooker(model, keep_grad=True) as hooker, \
            pytest.warns(AttentionCaptureWarning, match="keep_grad on a layer whose map is assembled"):
        model(**inputs)
    assert hooker.values == {} and len(hooker.report().missing) == 2
    from attention_hooker.capture import session

    monkeypatch.setattr(session, "DENSE_WINDOWS_BYTES", 2 * 2 * LENGTH * LENGTH * 4 - 1)  # one byte short
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, \
            pytest.warns(AttentionCaptureWarning, match="fewer heads=, rows= or keys="):
        model(**inputs)
    assert hooker.values == {}
    with torch.no_grad(), TransformerAttentionHooker(model, rows="last") as hooker:  # a row fits
        model(**inputs)
    assert len(hooker.values) == 2


def test_rows_of_a_long_input_equal_the_hand_computation_of_those_rows():
    """4,000 tokens (the model pads them to 4,096), window 512, global tokens 0 and 1,999: the last
    row, a global row and a row near the start, made without the (4,000 x 4,000) map."""
    model = _longformer(heads=2, windows=(512,), hidden=16)
    model.config.max_position_embeddings = 4100
    model.embeddings.position_embeddings = torch.nn.Embedding(4100, 16, padding_idx=1)
    torch.manual_seed(5)
    tokens = 4000
    glob = torch.zeros(1, tokens, dtype=torch.long)
    glob[0, [0, 1999]] = 1
    inputs = dict(input_ids=torch.randint(3, 100, (1, tokens)), attention_mask=torch.ones(1, tokens, dtype=torch.long),
                  global_attention_mask=glob)
    rows = [tokens - 1, 1999, 100]
    with torch.no_grad(), TransformerAttentionHooker(model, rows=rows) as hooker:
        model(**inputs)
    ((name, module),) = _layers(model)
    x, kwargs, _ = _layer_calls(model, inputs)[name]
    assert x.shape[1] == 4096
    (got,) = hooker.values[name]
    assert got.shape == (1, 2, 3, tokens)
    d, w = module.head_dim, module.one_sided_attn_window_size
    with torch.no_grad():
        q, k = module.query(x[0]) / math.sqrt(d), module.key(x[0])  # (L, C)
        qg, kg = module.query_global(x[0]) / math.sqrt(d), module.key_global(x[0])
    real = torch.arange(4096) < tokens
    is_global = torch.zeros(4096, dtype=torch.bool)
    is_global[[0, 1999]] = True
    for n, i in enumerate(rows):
        for h in range(2):
            part = slice(h * d, (h + 1) * d)
            if i == 1999:
                scores = kg[:, part] @ qg[i, part]
                allowed = real
            else:
                scores = k[:, part] @ q[i, part]
                allowed = (((torch.arange(4096) - i).abs() <= w) | is_global) & real
            want = scores.masked_fill(~allowed, float("-inf")).softmax(-1)[:tokens]
            torch.testing.assert_close(got[0, h, n], want, atol=1e-6, rtol=1e-5)


def test_max_calls_keeps_the_first_calls_and_counts_the_rest(longformer_capture):
    model, inputs, _, _, whole = longformer_capture
    with torch.no_grad(), TransformerAttentionHooker(model, max_calls=1) as hooker:
        model(**inputs)
        model(**inputs)
    for name, calls in hooker.values.items():
        assert len(calls) == 1 and torch.equal(calls[0], whole.values[name][0])
    assert hooker.report().missing == []


def test_the_page_of_a_4096_token_capture_draws_the_band_and_the_global_row_and_column_pooled():
    """Issue 24 part 4: a Longformer capture at 4,096 tokens goes on the interactive page pooled
    (blocks of 16 x 16 tokens): the drawn map is non-zero exactly on the band's blocks and on the
    global token's row and column of blocks, and the page stays small."""
    from attention_hooker import render_html
    from attention_hooker._blocks import block_edges
    from attention_hooker.views.page import encode_weights
    from attention_hooker.views.page.long_calls import encode_long_call

    torch.manual_seed(0)
    config = transformers.LongformerConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32, attention_window=[64], max_position_embeddings=4200,
                                           pad_token_id=1)
    model = transformers.LongformerModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(5, 100, (1, 4096))
    glob = torch.zeros_like(ids)
    glob[0, 2000] = 1
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(input_ids=ids, global_attention_mask=glob)
    ((call,),) = hooker.values.values()
    assert call.shape == (1, 2, 4096, 4096)
    page = render_html(hooker, [f"t{i}" for i in range(4096)])
    assert len(page.html) < 2_000_000
    codes, _ = encode_weights(call)
    arrays, meta = encode_long_call(call, codes, 256, 8)
    pooled = torch.frombuffer(bytearray(arrays["pooled"]), dtype=torch.uint8).reshape(1, 2, 256, 256)
    edges = torch.tensor(block_edges(4096, 256))
    starts, ends = edges[:-1], edges[1:] - 1  # each block's first and last token
    # A block of queries [a, b] reaches keys [a - 32, b + 32] (one-sided window 32); the global token's
    # block row and column attend / are attended everywhere.
    near = (starts[None, :] <= ends[:, None] + 32) & (ends[None, :] >= starts[:, None] - 32)
    g = int(torch.searchsorted(edges, torch.tensor(2000), right=True)) - 1
    expected = near.clone()
    expected[g, :] = True
    expected[:, g] = True
    assert torch.equal(pooled[0, 0] > 0, expected) and torch.equal(pooled[0, 1] > 0, expected)


def test_led_wrapper_hooked_beside_its_inner_layer_is_captured_inside_not_warned_as_unseen():
    """layer_regex=r"encoder.*self_attn$" hooks LED's wrapper ...self_attn and its ...self_attn.longformer_self_attn:
    the map is kept under the inner name, and the wrapper is "captured inside" it, neither in report().missing
    nor named by a warning that it "computes attention in a way no route sees"."""
    import warnings

    model, inputs = _led(), _batch(led=True)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), \
            TransformerAttentionHooker(model, layer_regex=r"encoder.*self_attn$") as hooker:
        warnings.simplefilter("always")
        model(**inputs)
    assert not [w for w in caught if "gave no attention" in str(w.message)], [str(w.message) for w in caught]
    report = hooker.report()
    assert report.missing == []
    for i in range(2):
        wrapper, inner = f"encoder.layers.{i}.self_attn", f"encoder.layers.{i}.self_attn.longformer_self_attn"
        assert report[wrapper].status == "captured inside" and report[wrapper].inside == (inner,)
        assert report[inner].status == "captured" and inner in hooker.values and wrapper not in hooker.values


def test_a_wrapper_whose_inner_hooked_layer_captured_nothing_is_still_missing():
    """The wrapper is excused only by an inner layer that captured: with the inner refused, both need a look."""
    model, inputs = _led(), _batch(led=True)
    with pytest.warns(AttentionCaptureWarning), torch.no_grad(), \
            TransformerAttentionHooker(model, layer_regex=r"encoder.*self_attn$", keep_grad=True) as hooker:
        model(**inputs)
    report = hooker.report()
    assert "encoder.layers.0.self_attn" in report.missing and report["encoder.layers.0.self_attn"].inside == ()
