"""LongT5 local / transient-global and PEGASUS-X global-local encoder attention, assembled from their blocks
(capture/local_blocks.py, capture/global_tokens.py), checked against

- a hand computation from each layer's own weights: a dense softmax over every (query, key) of the
  layer with the locality (LongT5: ``|q - k| < block_len``; PEGASUS-X: the query's own block), the
  relative or side biases and the masks written out here, not the model's blocked code;
- transformers' own ``output_attentions`` (the raw blocks), placed by this file's own loops;
- invariants: outputs unchanged by the capture; the stored map times the values it multiplies equal to
  the layer's context before its output projection; a selection equal to a slice of the whole map.

Batches of 2, the first row with user padding; lengths that need padding to a block multiple and ones
that do not.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import TransformerAttentionHooker  # noqa: E402

LONGT5_KINDS = ("LongT5LocalAttention", "LongT5TransientGlobalAttention")


def _longt5(kind: str):
    torch.manual_seed(0)
    config = transformers.LongT5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=2,
        local_radius=2, global_block_size=4, encoder_attention_type=kind, dropout_rate=0.0)
    return transformers.LongT5Model(config).eval()


def _pegasus_x():
    torch.manual_seed(0)
    config = transformers.PegasusXConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_global_tokens=3, block_size=4,
        max_position_embeddings=64, stagger_local_blocks=True, dropout=0.0, attention_dropout=0.0)
    return transformers.PegasusXModel(config).eval()


def _batch(length: int, padding: int = 3):
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, -padding:] = 0
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :3])


def _encoder_layers(model, kinds):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in kinds]


def _calls(model, inputs, kinds, projection: str):
    """Each layer's call: (args, kwargs, [inputs of its output projection, in call order])."""
    seen, handles = {}, []
    for name, module in _encoder_layers(model, kinds):
        def pre(m, args, kwargs, name=name):
            seen[name] = (args, kwargs, [])
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(getattr(module, projection).register_forward_pre_hook(
            lambda m, args, name=name: seen[name][2].append(args[0])))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _capture(model, inputs, **options):
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        with TransformerAttentionHooker(model, **options) as hooker:
            hooked = model(**inputs).last_hidden_state
    assert torch.equal(plain, hooked), "the capture changed the model's output"
    return hooker


# --------------------------------------------------------------------------------------------- LongT5


def _longt5_by_hand(model, module, hidden, mask):
    """softmax over every key of the layer, written densely: q.k (T5: no scaling) + the relative bias of
    layer 0 for k - q where |k - q| < block_len, keys of padding masked; transient-global also the side keys
    (the aggregates of global blocks, through the layer's norm and k/v) with their bias. Rows of real queries
    only: (B, H, L, L [+ G]) and the values (B, H, L [+ G], d)."""
    b, n, _ = hidden.shape
    h, d, bl = module.n_heads, module.key_value_proj_dim, module.block_len
    first = model.encoder.block[0].layer[0]
    first = getattr(first, "LocalSelfAttention", None) or first.TransientGlobalSelfAttention
    with torch.no_grad():
        q, k, v = (getattr(module, p)(hidden).view(b, n, h, d).transpose(1, 2) for p in "qkv")
        scores = q @ k.transpose(-1, -2)  # (B, H, L, L)
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # k - q
        bucket = first._relative_position_bucket(rel, bidirectional=True,
                                                 num_buckets=first.relative_attention_num_buckets,
                                                 max_distance=first.relative_attention_max_distance)
        scores = scores + first.relative_attention_bias(bucket).permute(2, 0, 1)[None]
        allowed = (rel.abs() < bl)[None, None] & mask.bool()[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        if hasattr(module, "global_block_size"):
            gbs = module.global_block_size
            count = n // gbs
            real = mask.bool()
            # block of each real token: g = t // gbs, the tokens left over joined to the last full block
            last_full = real.sum(1) // gbs - 1  # (B,)
            block_of = torch.minimum(torch.arange(n)[None, :] // gbs, last_full[:, None])
            block_of = torch.where(real, block_of, torch.full_like(block_of, -1))
            onehot = (block_of[..., None] == torch.arange(count)).to(hidden.dtype)  # (B, L, G)
            side = module.global_input_layer_norm(onehot.transpose(1, 2) @ hidden)  # (B, G, C)
            ks, vs = (getattr(module, p)(side).view(b, count, h, d).transpose(1, 2) for p in "kv")
            side_scores = q @ ks.transpose(-1, -2)  # (B, H, L, G)
            side_rel = torch.arange(count)[None, None, :] - block_of[..., None]  # (B, L, G)
            side_bucket = first._relative_position_bucket(
                side_rel, bidirectional=True, num_buckets=first.relative_attention_num_buckets,
                max_distance=first.relative_attention_max_distance)
            side_scores = side_scores + first.global_relative_attention_bias(side_bucket).permute(0, 3, 1, 2)
            exists = torch.arange(count)[None, :] <= last_full[:, None]  # (B, G): a block of the row's tokens
            side_scores = side_scores.masked_fill(~exists[:, None, None, :], float("-inf"))
            scores = torch.cat([scores, side_scores], -1)
            v = torch.cat([v, vs], 2)
        return scores.softmax(-1), v


def _place_longt5_blocks(blocks, n, bl):
    """transformers' 5-D (B, nb, H, bl, 3 bl [+ G]) placed at (B, H, L, L [+ G]) by loops."""
    b, nb, h, _, slots = blocks.shape
    extra = slots - 3 * bl
    dense = torch.zeros(b, h, n, n + extra)
    for i in range(nb):
        for s in range(bl):
            query = i * bl + s
            if query >= n:
                continue
            for slot in range(3 * bl):
                key = (i - 1) * bl + slot
                if 0 <= key < n:
                    dense[:, :, query, key] = blocks[:, i, :, s, slot]
            dense[:, :, query, n:] = blocks[:, i, :, s, 3 * bl:]
    return dense


@pytest.mark.parametrize("kind", ["local", "transient-global"])
@pytest.mark.parametrize("length", [11, 12])  # 11: padded to 12 by the layer (blocks of 3); 12: not
def test_longt5_layers_equal_a_dense_hand_computation_and_the_values_product(kind, length):
    model = _longt5(kind)
    inputs = _batch(length)
    hooker = _capture(model, inputs, keep_values=True)
    calls = _calls(model, inputs, LONGT5_KINDS, "o")
    assert len(calls) == 2
    real = inputs["attention_mask"].bool()
    for name, (args, kwargs, outs) in calls.items():
        module = model.get_submodule(name)
        hidden = args[0] if args else kwargs["hidden_states"]
        got = hooker.values[name][0]
        extra = length // 4 if kind == "transient-global" else 0
        assert got.shape == (2, 2, length, length + extra)
        expected, values = _longt5_by_hand(model, module, hidden, inputs["attention_mask"])
        rows = real[:, None, :, None].expand_as(got)
        torch.testing.assert_close(got[rows], expected[rows], rtol=1e-5, atol=1e-6)
        off_band = (~_band(length, 3))[None, None] & real[:, None, :, None]  # real queries: |q - k| >= bl
        assert bool((got[..., :length][off_band.expand(-1, 2, -1, -1)] == 0).all()), "weight off the band"
        torch.testing.assert_close(hooker.value_vectors[name][0], values)
        context = (got @ values).transpose(1, 2).reshape(2, length, -1)  # every row, padded ones too
        torch.testing.assert_close(context, outs[0][:, :length], rtol=1e-5, atol=1e-6)


def _band(n, bl):
    """(L, L): the keys a query's three blocks hold and |q - k| < bl keeps."""
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    return rel.abs() < bl


def test_longt5_padded_query_rows_keep_the_uniform_weights_the_model_gave_them():
    """A padded query's slots are all at -1e10: the model's softmax is uniform over its 3 bl slots; the
    stored row keeps 1 / (3 bl) on each of its blocks' tokens, and nothing elsewhere."""
    model = _longt5("local")
    length, bl = 11, 3
    inputs = _batch(length)
    hooker = _capture(model, inputs)
    got = hooker.values["encoder.block.1.layer.0.LocalSelfAttention"][0]
    for q in range(length - 3, length):
        block = q // bl
        expected = torch.zeros(length)
        expected[max(0, (block - 1) * bl):min(length, (block + 2) * bl)] = 1 / (3 * bl)
        torch.testing.assert_close(got[0, :, q], expected.expand(2, -1))


@pytest.mark.parametrize("kind", ["local", "transient-global"])
def test_longt5_equals_transformers_blocks_placed_by_loops(kind):
    model = _longt5(kind)
    inputs = _batch(11)
    hooker = _capture(model, inputs)
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True).encoder_attentions
    names = [name for name, _ in _encoder_layers(model, LONGT5_KINDS)]
    for name, blocks in zip(names, reference):
        assert blocks.dim() == 5  # transformers returns the raw blocks
        assert torch.equal(hooker.values[name][0], _place_longt5_blocks(blocks, 11, 3))


@pytest.mark.parametrize("kind", ["local", "transient-global"])
@pytest.mark.parametrize("selection", [dict(rows="last"), dict(heads=[1]), dict(keys=[0, 4, 10, 11]),
                                       dict(rows=[0, 5, 8], heads=[0], keys=[5, 0])])
def test_longt5_selection_equals_a_slice_of_the_whole_map(kind, selection):
    model = _longt5(kind)
    inputs = _batch(11)
    encoder = r"(LocalSelfAttention|TransientGlobalSelfAttention)$"
    whole = _capture(model, inputs, layer_regex=encoder).values
    if kind == "local" and 11 in selection.get("keys", ()):
        selection = dict(selection, keys=[0, 4, 10])  # key 11 is the second global aggregate's
    picked = _capture(model, inputs, layer_regex=encoder, **selection).values
    for name, _ in _encoder_layers(model, LONGT5_KINDS):
        full = whole[name][0]
        heads = selection.get("heads", list(range(full.shape[1])))
        rows = selection.get("rows", list(range(full.shape[2])))
        rows = [full.shape[2] - 1] if rows == "last" else rows
        keys = selection.get("keys", list(range(full.shape[3])))
        assert torch.equal(picked[name][0], full[:, heads][:, :, rows][..., keys])


def test_longt5_key_labels_name_the_global_aggregates():
    from attention_hooker.capture.local_blocks import longt5_key_labels

    labels = longt5_key_labels([f"t{i}" for i in range(11)], 4)
    assert len(labels) == 11 + 2 and labels[11:] == ["[global block 0: tokens 0-3]", "[global block 1: tokens 4-10]"]


# ------------------------------------------------------------------------------------------ PEGASUS-X


def _pegasus_x_by_hand(module, layer, hidden, glob, mask, length):
    """One dense softmax over the layer's positions [G globals; Lp tokens]: a global query sees every position,
    a token query the globals and the tokens of its own block; keys of padding (additive mask) masked. Cropped
    to [globals; the input's tokens] on both axes, with the values (B, H, G + L, d)."""
    b, lp, _ = hidden.shape
    g, h, bs = glob.shape[1], module.num_heads, module.block_size
    shift = layer.block_size // 2 if layer.stagger_blocks_this_layer else 0
    with torch.no_grad():
        x = torch.cat([glob, hidden], 1)  # (B, G + Lp, C)
        q, k, v = (getattr(module, p)(x).view(b, g + lp, h, -1).transpose(1, 2) for p in ("q_proj", "k_proj", "v_proj"))
        scores = (q @ k.transpose(-1, -2)) * module.scaling  # (B, H, G + Lp, G + Lp)
        block = torch.cat([torch.full((g,), -1), torch.arange(lp) // bs])
        allowed = (block[:, None] == -1) | (block[None, :] == -1) | (block[:, None] == block[None, :])
        key_ok = torch.cat([torch.ones(b, g, dtype=torch.bool), mask > torch.finfo(mask.dtype).min / 2], 1)
        scores = scores.masked_fill(~(allowed[None, None] & key_ok[:, None, None, :]), float("-inf"))
        dense = scores.softmax(-1)
    kept = torch.cat([torch.arange(g), g + shift + torch.arange(length)])
    return dense[:, :, kept][..., kept], v[:, :, kept]


@pytest.mark.parametrize("length", [10, 12])  # 10: padded to 12 by the encoder; 12: a multiple of the blocks
def test_pegasus_x_layers_equal_a_dense_hand_computation_and_the_values_product(length):
    model = _pegasus_x()
    inputs = _batch(length, padding=2)
    hooker = _capture(model, inputs, keep_values=True)
    calls = _calls(model, inputs, ("PegasusXGlobalLocalAttention",), "out_proj")
    assert len(calls) == 2
    for name, (args, kwargs, outs) in calls.items():
        module = model.get_submodule(name)
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        hidden, glob, mask = kwargs["token_hidden_states"], kwargs["global_hidden_states"], kwargs["attention_mask"]
        got = hooker.values[name][0]
        assert got.shape == (2, 2, 3 + length, 3 + length)
        expected, values = _pegasus_x_by_hand(module, layer, hidden, glob, mask, length)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # every row: no query row is masked
        torch.testing.assert_close(hooker.value_vectors[name][0], values)
        shift = layer.block_size // 2 if layer.stagger_blocks_this_layer else 0
        context = (got @ values).transpose(1, 2).reshape(2, 3 + length, -1)
        torch.testing.assert_close(context[:, :3], outs[0], rtol=1e-5, atol=1e-6)  # the globals' out_proj input
        torch.testing.assert_close(context[:, 3:], outs[1][:, shift:shift + length], rtol=1e-5, atol=1e-6)
    assert model.encoder.layers[1].stagger_blocks_this_layer  # the second layer's blocks are shifted


def _place_pegasus_x(pieces, shift, length):
    """transformers' {"global": (B, H, G, G + Lp), "local": (B, H, nb, bs, G + bs)} placed at
    (B, H, G + L, G + L) by loops, input token t at G + t (layer token shift + t)."""
    glob, local = pieces["global"], pieces["local"]
    b, h, g, _ = glob.shape
    nb, bs = local.shape[2], local.shape[3]
    dense = torch.zeros(b, h, g + length, g + length)

    def position(layer_token):
        t = layer_token - shift
        return g + t if 0 <= t < length else None

    for i in range(g):
        dense[:, :, i, :g] = glob[:, :, i, :g]
        for x in range(nb * bs):
            if position(x) is not None:
                dense[:, :, i, position(x)] = glob[:, :, i, g + x]
    for n in range(nb):
        for s in range(bs):
            row = position(n * bs + s)
            if row is None:
                continue
            dense[:, :, row, :g] = local[:, :, n, s, :g]
            for c in range(bs):
                if position(n * bs + c) is not None:
                    dense[:, :, row, position(n * bs + c)] = local[:, :, n, s, g + c]
    return dense


def test_pegasus_x_equals_transformers_pieces_placed_by_loops():
    model = _pegasus_x()
    inputs = _batch(10, padding=2)
    hooker = _capture(model, inputs)
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True).encoder_attentions
    for number, pieces in enumerate(reference):
        assert isinstance(pieces, dict)
        layer = model.encoder.layers[number]
        shift = layer.block_size // 2 if layer.stagger_blocks_this_layer else 0
        assert torch.equal(hooker.values[f"encoder.layers.{number}.self_attn"][0],
                           _place_pegasus_x(pieces, shift, 10))


@pytest.mark.parametrize("selection", [dict(rows="last"), dict(heads=[1]), dict(keys=[0, 4, 12]),
                                       dict(rows=[0, 5, 8], heads=[0], keys=[5, 0])])
def test_pegasus_x_selection_equals_a_slice_of_the_whole_map(selection):
    model = _pegasus_x()
    inputs = _batch(10, padding=2)
    encoder = r"encoder\.layers\.\d+\.self_attn$"
    whole = _capture(model, inputs, layer_regex=encoder).values
    picked = _capture(model, inputs, layer_regex=encoder, **selection).values
    for number in range(2):
        name = f"encoder.layers.{number}.self_attn"
        full = whole[name][0]
        heads = selection.get("heads", list(range(full.shape[1])))
        rows = selection.get("rows", list(range(full.shape[2])))
        rows = [full.shape[2] - 1] if rows == "last" else rows
        keys = selection.get("keys", list(range(full.shape[3])))
        assert torch.equal(picked[name][0], full[:, heads][:, :, rows][..., keys])


def test_pegasus_x_labels_put_the_global_tokens_first():
    from attention_hooker.capture.global_tokens import pegasus_x_labels

    assert pegasus_x_labels(["a", "b"], 3) == ["[global 0]", "[global 1]", "[global 2]", "a", "b"]


# ----------------------------------------------------------------------------------------- both families


def _family(which: str):
    if which == "pegasus_x":
        return _pegasus_x(), _batch(10, padding=2), r"encoder\.layers\.\d+\.self_attn$"
    return _longt5(which), _batch(11), r"(LocalSelfAttention|TransientGlobalSelfAttention)$"


@pytest.mark.parametrize("which", ["local", "transient-global", "pegasus_x"])
def test_streamed_and_reduced_captures_equal_the_capture_in_memory(which, tmp_path, monkeypatch):
    from attention_hooker import load
    from attention_hooker.analysis.stats import HeadStatsAccumulator
    from attention_hooker.capture import session

    model, inputs, encoder = _family(which)
    memory = _capture(model, inputs, layer_regex=encoder)
    monkeypatch.setattr(session, "ROWS_PER_TILE", 4)  # several tiles per call
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=encoder) as hooker:
        with hooker.stream_to(tmp_path / "capture", shard_bytes=1):
            model(**inputs)
    loaded = load(tmp_path / "capture")
    assert set(loaded.values) == set(memory.values) and len(memory.values) == 2
    for name, (want,) in memory.values.items():
        assert torch.equal(loaded.values[name][0], want)
    reduced = HeadStatsAccumulator()
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=encoder) as hooker:
        hooker.reduce_into(reduced)
        model(**inputs)
    direct = HeadStatsAccumulator()
    direct.update(memory.values)
    got, want = reduced.result(), direct.result()  # {statistic: (layers, heads) array}
    assert reduced.layers == direct.layers == list(memory.values) and set(got) == set(want)
    for key in want:
        assert want[key].shape == (2, 2), key
        torch.testing.assert_close(torch.as_tensor(got[key]), torch.as_tensor(want[key]), equal_nan=True)


@pytest.mark.parametrize("which", ["transient-global", "pegasus_x"])
def test_a_row_is_placed_without_the_whole_map(which, monkeypatch):
    """rows="last" places one row: the library's placement is called with one row and makes (batch, heads, 1, keys)."""
    from attention_hooker.capture import global_tokens, local_blocks

    module, function = ((global_tokens, "place_global_local_rows") if which == "pegasus_x"
                        else (local_blocks, "place_block_rows"))
    made, real = [], getattr(module, function)
    monkeypatch.setattr(module, function, lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    model, inputs, encoder = _family(which)
    keys = 3 + 10 if which == "pegasus_x" else 11 + 2
    hooker = _capture(model, inputs, layer_regex=encoder, rows="last")
    assert [tuple(m.shape) for m in made] == [(2, 2, 1, keys)] * 2
    assert all(v[0].shape == (2, 2, 1, keys) for v in hooker.values.values())


@pytest.mark.parametrize("which", ["local", "pegasus_x"])
def test_an_attention_computation_that_is_none_of_the_pieces_refuses_the_call(which):
    from attention_hooker import AttentionCaptureWarning

    model, inputs, encoder = _family(which)
    name, module = [(n, m) for n, m in model.named_modules() if __import__("re").search(encoder, n)][0]
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=encoder) as hooker:
        extra = module.register_forward_pre_hook(lambda m, args: [torch.softmax(torch.randn(4, 3, 5), -1)] and None)
        try:
            with pytest.warns(AttentionCaptureWarning, match="unknown piece"):
                model(**inputs)
        finally:
            extra.remove()
    assert hooker.report().missing == [name]
    assert "(4, 3, 5)" in hooker.report()[name].reason


@pytest.mark.parametrize("which", ["local", "transient-global", "pegasus_x"])
def test_bfloat16_maps_are_stored_in_the_dtype_the_values_were_multiplied_in(which):
    model, inputs, encoder = _family(which)
    model = model.to(torch.bfloat16)
    hooker = _capture(model, inputs, layer_regex=encoder)
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True).encoder_attentions
    for number, (name, got) in enumerate(hooker.values.items()):
        assert got[0].dtype == torch.bfloat16
        if which == "pegasus_x":
            layer = model.encoder.layers[number]
            want = _place_pegasus_x(reference[number], layer.block_size // 2 if layer.stagger_blocks_this_layer
                                    else 0, 10)
        else:
            want = _place_longt5_blocks(reference[number], 11, 3)
        assert torch.equal(got[0].float(), want.float())


def test_pegasus_x_layer_called_without_its_encoder_keeps_the_block_padding_and_crops_the_stagger():
    """An encoder layer called on its own: the input's length cannot be read from the encoder, so the layer's
    tokens less the stagger are kept (12 here: all of them); the staggered layer's half blocks are still cropped."""
    model = _pegasus_x()
    layer = model.encoder.layers[1]
    assert layer.stagger_blocks_this_layer
    torch.manual_seed(2)
    hidden, glob = torch.randn(2, 12, 32), torch.randn(2, 3, 32)
    mask = torch.zeros(2, 12)
    mask[0, -3:] = torch.finfo(torch.float32).min  # the user's padding, additive
    seen = {}
    handle = layer.self_attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad(), TransformerAttentionHooker(layer, layer_regex=r"self_attn$") as hooker:
            layer(hidden, glob, mask)
    finally:
        handle.remove()
    (got,) = hooker.values["self_attn"]
    assert got.shape == (2, 2, 15, 15) and seen["token_hidden_states"].shape[1] == 16  # 12 + 2 half blocks
    expected, _ = _pegasus_x_by_hand(layer.self_attn, layer, seen["token_hidden_states"],
                                     seen["global_hidden_states"], seen["attention_mask"], 12)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_longt5_local_layer_called_without_a_mask_drops_only_the_weight_on_its_zero_padding():
    """Called on its own without a mask, the layer masks nothing: its rows attend all three blocks, the slots off
    the sequence included (zero keys and values). The stored map keeps every token's weight, so map @ v(x) is
    still the layer's context; rows of the first and last blocks miss exactly the weight on those slots."""
    model = _longt5("local")
    module = model.encoder.block[1].layer[0].LocalSelfAttention
    torch.manual_seed(3)
    hidden = torch.randn(2, 11, 32)
    contexts = []
    handle = module.o.register_forward_pre_hook(lambda m, args: contexts.append(args[0]))
    try:
        with torch.no_grad(), TransformerAttentionHooker(module, layer_regex=r"^$") as hooker:
            module(hidden)
    finally:
        handle.remove()
    (got,) = hooker.values[""]
    assert got.shape == (2, 2, 11, 11)
    with torch.no_grad():
        v = module.v(hidden).view(2, 11, 2, 8).transpose(1, 2)
    torch.testing.assert_close((got @ v).transpose(1, 2).reshape(2, 11, -1), contexts[0][:, :11], rtol=1e-5, atol=1e-6)
    sums = got.sum(-1)
    # blocks of 3: block 1 (tokens 3-5) sees blocks 0-2, all tokens; block 0 sees a zero block before it,
    # blocks 2 and 3 the slot 11 the layer padded
    assert bool((sums[..., 3:6] - 1).abs().max() < 1e-5)
    assert bool((sums[..., :3] < 1 - 1e-3).all()) and bool((sums[..., 6:] < 1 - 1e-3).all())


def test_rollout_of_transient_global_maps_says_their_extra_keys_are_global_aggregates():
    """A transient-global map (batch, heads, L, L + G) is self-attention with G aggregate keys, not
    cross-attention: rollout's refusal names the aggregates, not "leave cross-attention layers out"."""
    import attention_hooker as ah

    model, inputs = _longt5("transient-global"), _batch(11)
    hooker = _capture(model, inputs, layer_regex=r"TransientGlobalSelfAttention$")
    first = next(iter(hooker.values.values()))[0]
    assert first.shape == (2, 2, 11, 11 + 11 // 4)
    for given in (hooker, hooker.values):
        with pytest.raises(ah.AttentionHookerError, match="LongT5 transient-global") as refused:
            ah.attention_rollout(given)
        assert "global aggregates (keys 11 on)" in str(refused.value) and "cross-attention" not in str(refused.value)
    with pytest.raises(ah.AttentionHookerError, match="extra keys are not tokens"):  # a plain list: no names
        ah.attention_rollout([first])


@pytest.mark.parametrize("real", [[1] * 11, [1] * 9 + [0] * 2, [1] * 6 + [0] * 5, [1] * 3 + [0] * 8,
                                  [0] * 2 + [1] * 9, [1] * 5 + [0] + [1] * 5])
def test_global_blocks_of_a_padded_row_are_the_models_own(real):
    """Each token's aggregate and which aggregates exist, per row, equal transformers' own
    _make_global_fixed_block_ids (what the layer sums its aggregates with) and the per-row construction of
    the hand computation above (last full block = real // gbs - 1 for right padding)."""
    from transformers.models.longt5.modeling_longt5 import _make_global_fixed_block_ids

    from attention_hooker.capture.local_blocks import longt5_global_blocks

    mask = torch.tensor(real)
    block_of, exists = longt5_global_blocks(mask, 4)
    model_ids, model_exists = _make_global_fixed_block_ids(mask[None].float(), 4)
    assert block_of.tolist() == model_ids[0].long().tolist()
    assert exists.tolist() == model_exists[0].bool().tolist()
    if real == sorted(real, reverse=True):  # right padding: the hand computation's per-row rule
        last_full = sum(real) // 4 - 1
        assert block_of[:sum(real)].tolist() == [min(t // 4, last_full) for t in range(sum(real))]


def test_key_labels_of_a_padded_row_name_its_own_blocks_and_its_masked_aggregates():
    """11 tokens, 6 real, global_block_size 4: the labels from the length only say block 1 sums tokens 4-10;
    in this row tokens 4-5 end no block, so they join block 0 (0-5), and block 1 sums no real token (masked)."""
    from attention_hooker.capture.local_blocks import longt5_key_labels

    tokens = [f"t{i}" for i in range(11)]
    mask = torch.tensor([1] * 6 + [0] * 5)
    assert longt5_key_labels(tokens, 4, mask)[11:] == ["[global block 0: tokens 0-5]",
                                                       "[global block 1: masked in this row]"]
    assert longt5_key_labels(tokens, 4)[11:] == ["[global block 0: tokens 0-3]", "[global block 1: tokens 4-10]"]
    with pytest.raises(ValueError, match="one row's mask"):
        longt5_key_labels(tokens, 4, torch.ones(2, 11))
