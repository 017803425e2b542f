"""Hiera's mask-unit attention (transformers and timm), assembled by capture/mask_units.py, checked against

- a hand computation from each layer's own weights: for every query of the layer's output order a dense
  softmax over the keys of its mask unit (keys ``k`` with ``k % units == query % units``), the pooled query
  the maximum of the stride's input queries, written here with a mask over the whole (query, key) grid,
  not the model's unit-blocked code;
- transformers' own ``output_attentions`` (per unit, ``(batch, heads, units, query, key)``), placed by this
  file's own loops;
- invariants: outputs unchanged by the capture; the stored map times the stored values equal to the layer's
  output before its projection (read from the projection's input); a selection equal to a slice of the map;
- the raster-order index against transformers' own ``unroll`` and ``reroll``.

transformers' Hiera runs eager only (it refuses sdpa); timm's is checked with its fused (sdpa) path and without.
A tiny random Hiera of 64 x 64 pixels (16 x 16 tokens, 4 mask units): mask-unit layers, mask-unit layers with
query pooling (query != key counts), global layers with and without pooling; batch 2.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import TransformerAttentionHooker  # noqa: E402
from attention_hooker.capture.mask_units import hiera_token_positions  # noqa: E402


def _hf_hiera():
    """transformers' Hiera has one attention implementation (eager: it refuses ``attn_implementation="sdpa"``)."""
    torch.manual_seed(0)
    config = transformers.HieraConfig(embed_dim=8, image_size=[64, 64], depths=[1, 2, 2, 1], num_heads=[1, 2, 2, 2])
    return transformers.HieraModel(config).eval()


def _timm_hiera(fused: bool):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", pretrained=False, img_size=64, embed_dim=8, num_heads=1,
                              stages=(1, 2, 2, 1)).eval()
    for module in model.modules():
        if type(module).__name__ == "MaskUnitAttention":
            module.fused_attn = fused
    return model


def _pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def _attention_modules(model):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in ("HieraMaskUnitAttention",
                                                                                    "MaskUnitAttention")]


def _heads_and_stride(module):
    if hasattr(module, "num_heads"):
        return module.num_heads, module.query_stride
    return module.heads, module.q_stride


def _record(model, pixels):
    """Each attention module's input (batch, L, C) and its projection's input (the context before ``proj``)."""
    seen, handles = {}, []
    for name, module in _attention_modules(model):
        def pre(m, args, name=name):
            seen.setdefault(name, {})["x"] = args[0].detach().clone()

        def proj(m, args, name=name):
            seen.setdefault(name, {})["context"] = args[0].detach().clone()
        handles += [module.register_forward_pre_hook(pre), module.proj.register_forward_pre_hook(proj)]
    try:
        with torch.no_grad():
            out = model(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


def _hand_map(module, x):
    """``(B, H, L / s, L)``: softmax over the query's unit, computed on the whole grid with a mask."""
    heads, stride = _heads_and_stride(module)
    b, tokens, _ = x.shape
    units = tokens // (stride * module.window_size) if module.use_mask_unit_attn else 1
    qkv = module.qkv(x).reshape(b, tokens, 3, heads, -1)  # token t's q, k, v
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, H, L, d)
    out_tokens = tokens // stride
    q = q.reshape(b, heads, stride, out_tokens, -1).amax(2)  # pooled query o: max over inputs o + r * L / s
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Lq, L)
    same_unit = (torch.arange(out_tokens)[:, None] % units) == (torch.arange(tokens)[None, :] % units)
    return torch.softmax(scores.masked_fill(~same_unit, float("-inf")), -1)


def _capture(model, pixels, layer_regex=r"attn$", **options):
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=layer_regex, **options) as hooker:
        out = model(pixels)
    return hooker, out


def _outputs_equal(a, b):
    a = a.last_hidden_state if hasattr(a, "last_hidden_state") else a
    b = b.last_hidden_state if hasattr(b, "last_hidden_state") else b
    torch.testing.assert_close(a, b, rtol=0, atol=0)


MODELS = [pytest.param(_hf_hiera, id="transformers-eager"),
          pytest.param(lambda: _timm_hiera(False), id="timm-softmax"),
          pytest.param(lambda: _timm_hiera(True), id="timm-sdpa")]


@pytest.mark.parametrize("make", MODELS)
def test_each_layer_equals_a_hand_computation_and_multiplies_the_values_into_the_context(make):
    model, pixels = make(), _pixels()
    seen, plain = _record(model, pixels)
    hooker, out = _capture(model, pixels, keep_values=True)
    _outputs_equal(plain, out)
    layers = _attention_modules(model)
    assert sorted(hooker.values) == sorted(name for name, _ in layers)
    shapes = set()
    for name, module in layers:
        (stored,) = hooker.values[name]
        with torch.no_grad():
            expected = _hand_map(module, seen[name]["x"])
        shapes.add(tuple(stored.shape[2:]))
        torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-6)
        assert bool((stored[expected == 0] == 0).all())  # other units: exact zeros
        torch.testing.assert_close(stored.sum(-1), torch.ones(stored.shape[:3]))
        values = hooker.value_vectors[name][0]  # (B, H, L, d)
        context = (stored @ values).transpose(1, 2).reshape(stored.shape[0], stored.shape[2], -1)
        torch.testing.assert_close(context, seen[name]["context"], rtol=1e-5, atol=1e-6)
    # the model has unit layers, pooled unit layers, global layers and a pooled global layer
    assert {(256, 256), (64, 256), (64, 64), (16, 64), (16, 16), (4, 16)} == shapes


def test_transformers_own_per_unit_attentions_placed_by_a_loop_equal_the_stored_maps():
    model, pixels = _hf_hiera(), _pixels()
    with torch.no_grad():
        reference = model(pixels, output_attentions=True).attentions  # one per stage: its last layer's
    hooker, _ = _capture(model, pixels)
    last_layers = [f"encoder.stages.{i}.layers.{len(stage.layers) - 1}.attn"
                   for i, stage in enumerate(model.encoder.stages)]
    assert len(reference) == len(last_layers)
    for name, per_unit in zip(last_layers, reference):
        b, h, units, queries, keys = per_unit.shape
        placed = torch.zeros(b, h, units * queries, units * keys)
        for w in range(units):
            for j in range(queries):
                for i in range(keys):
                    placed[:, :, j * units + w, i * units + w] = per_unit[:, :, w, j, i]
        torch.testing.assert_close(hooker.values[name][0], placed, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("selection", [dict(rows="last"), dict(heads=[1]), dict(rows=[0, 5, 13], heads=[0]),
                                       dict(keys=[3, 0, 12])])
def test_a_selection_is_the_slice_of_the_whole_map(selection):
    model, pixels = _hf_hiera(), _pixels()
    middle = r"stages\.[12]\.layers\.\d+\.attn$"  # 2 heads, 16 to 64 queries: pooled and unpooled unit layers
    whole, _ = _capture(model, pixels, layer_regex=middle)
    part, _ = _capture(model, pixels, layer_regex=middle, **selection)
    assert len(whole.values) == 4
    for name in whole.values:
        a = whole.values[name][0]
        rows = selection.get("rows")
        if rows is not None:
            a = a[:, :, [a.shape[2] - 1] if rows == "last" else rows]
        if "heads" in selection:
            a = a[:, selection["heads"]]
        if "keys" in selection:
            a = a[..., selection["keys"]]
        torch.testing.assert_close(part.values[name][0], a, rtol=0, atol=0)


def test_raster_positions_follow_transformers_unroll_and_reroll():
    from transformers.models.hiera.modeling_hiera import unroll

    model = _hf_hiera()
    config = model.config
    grid = torch.arange(256, dtype=torch.float32).view(1, 256, 1)  # raster ids of the 16 x 16 tokens
    unrolled = unroll(grid, config.image_size, config.patch_stride, model.unroll_schedule)
    torch.testing.assert_close(hiera_token_positions((16, 16), model.unroll_schedule),
                               unrolled.reshape(-1).long())
    for stage in range(len(config.depths)):
        schedule, size = model.encoder.schedule[stage]
        positions = hiera_token_positions(size, schedule)
        tokens = positions.numel()
        rerolled = model.encoder.reroll(torch.arange(tokens, dtype=torch.float32).view(1, tokens, 1), stage)
        # reroll puts the layer's token t at raster position positions[t]
        assert rerolled.reshape(-1).long().tolist() == positions.argsort().tolist()


def test_a_grid_the_stride_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="cannot be cut by a stride of 2x2"):
        hiera_token_positions((6, 5), [(2, 2)])


def test_streamed_and_reduced_captures_equal_the_capture_in_memory(tmp_path, monkeypatch):
    from attention_hooker import load
    from attention_hooker.analysis.stats import HeadStatsAccumulator
    from attention_hooker.capture import session

    model, pixels = _hf_hiera(), _pixels()
    middle = r"stages\.[12]\.layers\.\d+\.attn$"  # same head count in every layer: one statistics table
    memory, _ = _capture(model, pixels, layer_regex=middle)
    monkeypatch.setattr(session, "ROWS_PER_TILE", 8)  # several tiles per call
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=middle) as hooker:
        with hooker.stream_to(tmp_path / "capture", shard_bytes=1):
            model(pixels)
    loaded = load(tmp_path / "capture")
    assert set(loaded.values) == set(memory.values) and len(memory.values) == 4
    for name, (want,) in memory.values.items():
        assert torch.equal(loaded.values[name][0], want)
    reduced = HeadStatsAccumulator()
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=middle) as hooker:
        hooker.reduce_into(reduced)
        model(pixels)
    direct = HeadStatsAccumulator()
    direct.update(memory.values)
    got, want = reduced.result(), direct.result()  # {statistic: (layers, heads) array}
    assert reduced.layers == direct.layers == list(memory.values) and set(got) == set(want)
    for key in want:
        torch.testing.assert_close(torch.as_tensor(got[key]), torch.as_tensor(want[key]), equal_nan=True)


def test_a_row_is_placed_without_the_whole_map(monkeypatch):
    """rows="last" places one row: the library's placement is called with one row and makes (batch, heads, 1, keys)."""
    from attention_hooker.capture import mask_units

    made, real = [], mask_units.place_unit_rows
    monkeypatch.setattr(mask_units, "place_unit_rows", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    model, pixels = _hf_hiera(), _pixels()
    hooker, _ = _capture(model, pixels, layer_regex=r"stages\.1\.layers\.0\.attn$", rows="last")
    assert [tuple(m.shape) for m in made] == [(2, 2, 1, 256)]
    assert tuple(hooker.values["encoder.stages.1.layers.0.attn"][0].shape) == (2, 2, 1, 256)


def test_a_layer_whose_units_cannot_be_read_is_refused_with_the_reason():
    """A mask-unit flag that is not a bool (the model only tests its truth) is not guessed at: refused, named."""
    model, pixels = _hf_hiera(), _pixels()
    model.encoder.stages[0].layers[0].attn.use_mask_unit_attn = 1
    plain = _record(model, pixels)[1]
    with pytest.warns(Warning):
        hooker, out = _capture(model, pixels)
    _outputs_equal(plain, out)
    name = "encoder.stages.0.layers.0.attn"
    assert name not in hooker.values and len(hooker.values) == 5
    assert "its mask units cannot be read" in hooker.report()[name].reason


def test_mae_pretraining_with_masked_units_is_placed_over_the_kept_tokens():
    """HieraForPreTraining drops masked units before the blocks: a layer's tokens are the kept units' only
    (2 of 4 here), which the layer order covers as it is (the raster order would not: half the image is gone)."""
    torch.manual_seed(0)
    config = transformers.HieraConfig(embed_dim=8, image_size=[64, 64], depths=[1, 2, 2, 1], num_heads=[1, 2, 2, 2],
                                      mask_ratio=0.5, decoder_hidden_size=16, decoder_depth=1, decoder_num_heads=2)
    model, pixels = transformers.HieraForPreTraining(config).eval(), _pixels()
    noise = torch.rand(2, 4)
    inputs, handles = {}, []
    for name, module in _attention_modules(model):
        handles.append(module.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0])))
    try:
        with torch.no_grad():
            plain = model(pixels, noise=noise).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"attn$") as hooker:
        hooked = model(pixels, noise=noise).logits
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    assert len(inputs) == 7 and inputs["hiera.encoder.stages.0.layers.0.attn"].shape[1] == 128  # 2 units of 64
    for name, module in _attention_modules(model):
        with torch.no_grad():
            torch.testing.assert_close(hooker.values[name][0], _hand_map(module, inputs[name]), rtol=1e-5, atol=1e-6)
