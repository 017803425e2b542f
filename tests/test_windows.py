"""Windowed (Swin) attention stored as the layer's (batch, heads, tokens, tokens) map (issue 24).

Each layer's stored map is checked against a dense hand computation from the module's
own weights over the whole token grid (tests/window_oracle.py: shift, -100 region mask,
relative position bias, padding), never against the library's placement; padding is
exercised (grids that are not window multiples) and so are shifts.
"""

import math

import pytest
import torch

from attention_hooker import TransformerAttentionHooker
from attention_hooker.analysis.rollout import attention_rollout
from window_oracle import PAD_THEN_ROLL, ROLL_THEN_PAD, dense_by_hand, index_grid_windows

transformers = pytest.importorskip("transformers")


def _randomise_bias_tables(model):
    with torch.no_grad():  # zero at init: a placement that ignores positions would pass
        for module in model.modules():
            if hasattr(module, "relative_position_bias_table"):
                module.relative_position_bias_table.normal_(0, 1)


def _inputs_of(model, kind, with_kwargs=False):
    seen = {}
    handles = [m.register_forward_pre_hook((lambda m, a, kw: seen.__setitem__(m, (a, kw))) if with_kwargs
                                           else (lambda m, a: seen.__setitem__(m, (a, {}))), with_kwargs=with_kwargs)
               for m in model.modules() if isinstance(m, kind)]
    return seen, handles


def _run(model, x, kind, with_kwargs=False, output=lambda out: out):
    """The model run on ``x`` unhooked, then hooked, with the inputs of its ``kind`` modules seen:
    ``(hooker, seen)``, once the outputs are equal bitwise and no layer is missing."""
    seen, handles = _inputs_of(model, kind, with_kwargs)
    with torch.no_grad():
        expected = output(model(x))
        try:
            with TransformerAttentionHooker(model) as hooker:
                out = output(model(x))
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert not hooker.report().missing
    return hooker, seen


def _check(got, oracle, padding_mass, where):
    assert got.shape == oracle.shape, f"{where}: {tuple(got.shape)} != {tuple(oracle.shape)}"
    torch.testing.assert_close(got, oracle, atol=2e-6, rtol=1e-5, msg=where)
    # The weight real queries put on padding keys is what their stored rows miss: never renormalised.
    torch.testing.assert_close(1 - got.sum(-1), padding_mass, atol=2e-6, rtol=0, msg=where)


def _hf_swin(image, impl, depths=(2, 2), heads=(2, 4)):
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=image, patch_size=4, embed_dim=16, depths=list(depths),
                                     num_heads=list(heads), window_size=4, attn_implementation=impl)
    model = transformers.SwinModel(config).eval()
    _randomise_bias_tables(model)
    return model


def _check_hf_swin_layers(model, image, batch=2):
    """Each SwinLayer's stored map against :func:`dense_by_hand` from its weights, as its forward
    set window and shift; returns the layers, and how many were shifted and padded."""
    from transformers.models.swin.modeling_swin import SwinLayer

    hooker, seen = _run(model, torch.randn(batch, 3, image, image), SwinLayer, with_kwargs=True,
                        output=lambda out: out.last_hidden_state)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SwinLayer)]
    assert len(hooker.values) == len(layers)
    padded = shifted = 0
    for name, layer in layers:
        (args, kwargs) = seen[layer]
        hidden, (h, w) = args[0], args[1]
        att = layer.attention
        ws, s = layer.window_size, layer.shift_size  # as the forward set them (the last stage: 3, 0)
        padded += h % ws != 0
        shifted += s > 0
        heads = att.num_attention_heads
        b, _, c = hidden.shape
        d = c // heads
        with torch.no_grad():
            oracle, padding_mass = dense_by_hand(
                layer.layernorm_before(hidden).view(b, h, w, c),
                lambda t: att.q_proj(t).view(b, -1, heads, d).transpose(1, 2) * att.scaling,
                lambda t: att.k_proj(t).view(b, -1, heads, d).transpose(1, 2),
                att.relative_position_bias.relative_position_bias_table, (ws, ws), (s, s), PAD_THEN_ROLL)
        (got,) = hooker.values[name + ".attention"]
        _check(got, oracle, padding_mass, name)
    return layers, shifted, padded


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("image", [40, 32])
def test_hf_swin_every_layer_is_the_dense_map_of_its_weights(impl, image):
    # 40: tokens 10x10 (padded to 12) then 5x5 (padded to 8), both shifted; 32: 8x8, then 4x4,
    # where the block sets its shift to 0 inside its forward (one window covers the grid).
    layers, shifted, padded = _check_hf_swin_layers(_hf_swin(image, impl), image)
    assert len(layers) == 4
    assert shifted == (2 if image == 40 else 1) and padded == (4 if image == 40 else 0)


def test_hf_swin_at_224_every_layer_of_every_stage_is_the_dense_map_of_its_weights():
    """Issue 24's done-when: Swin at 224 x 224, all four stages (56x56, 28x28, 14x14 and 7x7 tokens,
    windows of 4: the 14x14 and 7x7 stages padded to 16x16 and 8x8), each layer's assembled map equal to the hand
    computation from its weights with its shift, mask and padding."""
    model = _hf_swin(224, "eager", depths=(2, 2, 2, 2), heads=(1, 1, 2, 2))
    layers, shifted, padded = _check_hf_swin_layers(model, 224, batch=1)
    assert len(layers) == 8 and shifted == 4 and padded == 4


def test_timm_swin_every_layer_is_the_dense_map_of_its_weights():
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

    torch.manual_seed(0)
    model = SwinTransformer(img_size=40, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                            num_classes=0, strict_img_size=False).eval()  # 10x10 and 5x5 tokens: timm pads after rolling
    _randomise_bias_tables(model)
    hooker, seen = _run(model, torch.randn(2, 3, 40, 40), SwinTransformerBlock)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, SwinTransformerBlock)]
    assert len(blocks) == 4 and any(any(m.shift_size) for _, m in blocks)
    for name, block in blocks:
        with torch.no_grad():
            xn = block.norm1(seen[block][0][0])
            b, h, w, c = xn.shape
            att = block.attn
            heads = att.num_heads
            d = att.qkv.weight.shape[0] // 3 // heads

            def part(t, i):
                return att.qkv(t).view(b, t.shape[1], 3, heads, d)[:, :, i].transpose(1, 2)

            oracle, padding_mass = dense_by_hand(xn, lambda t: part(t, 0) * att.scale, lambda t: part(t, 1),
                                                 att.relative_position_bias_table, block.window_size,
                                                 block.shift_size, ROLL_THEN_PAD)
        (got,) = hooker.values[name + ".attn"]
        _check(got, oracle, padding_mass, name)


def test_torchvision_swin_t_every_layer_is_the_dense_map_of_its_weights():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None).eval()  # window 7 over 16x16, 8x8, 4x4, 2x2 tokens at 64x64
    _randomise_bias_tables(model)
    hooker, seen = _run(model, torch.randn(1, 3, 64, 64), ShiftedWindowAttention)
    attention = [(n, m) for n, m in model.named_modules() if isinstance(m, ShiftedWindowAttention)]
    assert len(attention) == 12 and len(hooker.values) == 12
    for name, module in attention:
        xin = seen[module][0][0]
        b, h, w, c = xin.shape
        ws = tuple(module.window_size)
        hp, wp = math.ceil(h / ws[0]) * ws[0], math.ceil(w / ws[1]) * ws[1]
        shift = tuple(0 if ws[i] >= (hp, wp)[i] else module.shift_size[i] for i in range(2))  # as the function does
        heads = module.num_heads
        d = c // heads

        def part(t, i):
            return torch.nn.functional.linear(t, module.qkv.weight, module.qkv.bias).view(
                b, t.shape[1], 3, heads, d)[:, :, i].transpose(1, 2)

        with torch.no_grad():
            oracle, padding_mass = dense_by_hand(xin, lambda t: part(t, 0) * d ** -0.5, lambda t: part(t, 1),
                                                 module.relative_position_bias_table, ws, shift, PAD_THEN_ROLL)
        (got,) = hooker.values[name]
        _check(got, oracle, padding_mass, name)


def test_rollout_runs_over_every_layer_of_a_swin():
    model = _hf_swin(40, "eager", depths=(4,), heads=(2,))  # one stage: 10x10 tokens in every layer, shifted and not
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(x)
    assert len(hooker.values) == 4
    rollout = attention_rollout(hooker.values)
    assert rollout.shape == (2, 100, 100)  # per image, over the image's tokens
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 100), atol=1e-5, rtol=0)
    # After a shifted layer, tokens draw on tokens of other (unshifted) windows: windows are crossed.
    blocks = index_grid_windows(10, 10, (4, 4), (0, 0), PAD_THEN_ROLL)
    window_of = torch.full((100,), -1)
    for win, slots in enumerate(blocks):
        window_of[slots[slots >= 0]] = win
    crossing = window_of[:, None] != window_of[None, :]
    assert rollout[:, crossing].abs().max() > 1e-3


def test_a_window_attention_called_outside_its_block_is_refused_with_the_reason():
    model = _hf_swin(32, "eager", depths=(2,), heads=(2,))
    attention = model.encoder.layers[0].blocks[0].attention
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"blocks\.0\.attention$") as hooker:
        attention(torch.randn(4, 16, 16), None)  # (batch * windows, N, C): 1 image of 4 windows, or 4 of 1?
    report = hooker.report()
    assert list(report.missing) == ["encoder.layers.0.blocks.0.attention"]
    assert "outside a call of its block" in report["encoder.layers.0.blocks.0.attention"].reason
    assert not hooker.values.get("encoder.layers.0.blocks.0.attention")


def test_a_dense_map_over_the_limit_is_refused_with_its_size(monkeypatch):
    """Placed at the image's tokens, a windowed call's map grows with the tokens squared (Swin-T's
    first stage at 224 x 224: 118 MB per image and layer); over DENSE_WINDOWS_BYTES the call is
    refused with its size, never allocated."""
    from attention_hooker.capture import session

    model = _hf_swin(40, "eager", depths=(2,), heads=(2,))
    monkeypatch.setattr(session, "DENSE_WINDOWS_BYTES", 2 * 2 * 100 * 100 * 4 - 1)  # one byte short for 2 images
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(torch.randn(1, 3, 40, 40))  # one image fits
        model(torch.randn(2, 3, 40, 40))  # two do not
    for name, coverage in hooker.report().items():
        assert (coverage.runs, coverage.captured, coverage.refused) == (2, 1, 1)
        assert "map of 156.2 KB, over the 156.2 KB a windowed call may take" in coverage.reason
        assert [tuple(c.shape) for c in hooker.values[name]] == [(1, 2, 100, 100)]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_keep_grad_on_a_windowed_layer_is_refused_with_the_reason(impl):
    """The loss reaches the model's per-window weights, never the assembled map: with keep_grad
    the eager route stored the map and its gradient stayed None, silently."""
    model = _hf_swin(40, impl, depths=(2,), heads=(2,))
    with TransformerAttentionHooker(model, keep_grad=True) as hooker:
        model(torch.randn(1, 3, 40, 40)).last_hidden_state.pow(2).sum().backward()
    report = hooker.report()
    assert len(report.missing) == 2
    assert all("keep_grad on a windowed (Swin) layer" in report[name].reason for name in report.missing)
    assert not any(hooker.values.get(name) for name in report.missing)


def test_a_blocks_inputs_and_outputs_are_not_held_after_its_call():
    """The block's pre-hook kept its last call's frame, and with it the block's input and output
    (with their autograd graph in training), until the next call."""
    import gc
    import weakref

    model = _hf_swin(32, "eager", depths=(2,), heads=(2,))
    block = model.encoder.layers[0].blocks[0]
    refs = []
    probe = block.register_forward_hook(lambda m, a, o: refs.extend([weakref.ref(a[0]), weakref.ref(o[0])]))
    with torch.no_grad(), TransformerAttentionHooker(model):
        model(torch.randn(2, 3, 32, 32))
        gc.collect()
        assert [r() is None for r in refs] == [True, True]
    probe.remove()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_selections_are_made_straight_into_their_size(impl, monkeypatch):
    """heads=, rows= and keys= on a windowed layer equal the whole map's slices, and only the
    selected part is made: a call whose whole map is over the limit is kept when its selection
    fits (it was refused by the whole map's size)."""
    from attention_hooker.capture import session

    model = _hf_swin(40, impl, depths=(2,), heads=(2,))
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad(), TransformerAttentionHooker(model) as whole:
        model(x)
    monkeypatch.setattr(session, "DENSE_WINDOWS_BYTES", 2 * 2 * 100 * 100 * 4 - 1)  # the whole map does not fit
    rows, keys = [99, 0, 57], slice(10, 60, 7)
    with torch.no_grad(), TransformerAttentionHooker(model, heads=[1], rows=rows, keys=keys) as picked:
        model(x)
    assert picked.report().missing == []
    for name, (call,) in picked.values.items():
        expected = whole.values[name][0][:, [1]][:, :, rows][:, :, :, keys]
        assert call.shape == expected.shape == (2, 1, 3, 8)
        torch.testing.assert_close(call, expected, atol=0, rtol=0)


def test_torchvision_maxvit_window_and_grid_layers_are_the_dense_map_of_their_weights():
    """MaxViT's 5-D softmax (batch, groups, heads, P, P): window groups are p x p blocks, grid groups
    take one token of every block (strided); the oracle is a masked dense softmax over all tokens."""
    pytest.importorskip("torchvision")
    from torchvision.models.maxvit import MaxVit, PartitionAttentionLayer

    torch.manual_seed(0)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
                   head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()  # 8x8 then 4x4 tokens
    _randomise_bias_tables(model)
    hooker, seen = _run(model, torch.randn(2, 3, 32, 32), PartitionAttentionLayer)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PartitionAttentionLayer)]
    assert len(layers) == 4 and len(hooker.values) == 4
    for name, lay in layers:
        x = seen[lay][0][0]
        b, c, h, w = x.shape
        att = lay.attn_layer[1]
        with torch.no_grad():
            xn = lay.attn_layer[0](x.permute(0, 2, 3, 1)).reshape(b, h * w, c)
            q, k, _ = att.to_qkv(xn).chunk(3, -1)
            nh, d = att.n_heads, att.head_dim
            q = q.view(b, -1, nh, d).transpose(1, 2)
            k = k.view(b, -1, nh, d).transpose(1, 2) * att.scale_factor
            hh, ww = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
            p = lay.p
            if lay.partition_type == "window":  # group: the p x p block; position inside it
                gh, gw, sh, sw, size = hh // p, ww // p, hh % p, ww % p, p
            else:  # grid: lay.p is the partition count; group: the place inside a p x p block, position: the block
                gh, gw, sh, sw, size = hh % p, ww % p, hh // p, ww // p, h // p
            same = (gh[:, None] == gh[None]) & (gw[:, None] == gw[None])
            idx = (sh[:, None] - sh[None] + size - 1) * (2 * size - 1) + (sw[:, None] - sw[None] + size - 1)
            table = att.relative_position_bias_table
            bias = table[idx.clamp(0, table.shape[0] - 1)].permute(2, 0, 1)
            oracle = (q @ k.transpose(-1, -2) + bias).masked_fill(~same, float("-inf")).softmax(-1)
        (got,) = hooker.values[name + ".attn_layer.1"]
        _check(got, oracle, torch.zeros(oracle.shape[:-1]), f"{name} ({lay.partition_type})")


@pytest.mark.parametrize("fused", [False, True])
def test_timm_twins_local_attention_is_the_dense_map_of_its_weights(fused):
    """Twins' LocallyGroupedAttn: a 5-D softmax (eager) or sdpa query (fused) over ws x ws windows of
    the grid padded right and bottom; padding is attended, so rows miss exactly its weight."""
    pytest.importorskip("timm")
    from timm.models.twins import LocallyGroupedAttn, Twins

    torch.manual_seed(0)
    model = Twins(img_size=40, patch_size=4, embed_dims=(16, 32), num_heads=(2, 4), mlp_ratios=(2, 2), depths=(2, 2),
                  sr_ratios=(2, 1), wss=(4, 4), num_classes=0).eval()  # 10x10 tokens (padded to 12), then 5x5 (to 8)
    for module in model.modules():
        if isinstance(module, LocallyGroupedAttn):
            module.fused_attn = fused
    hooker, seen = _run(model, torch.randn(2, 3, 40, 40), LocallyGroupedAttn)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LocallyGroupedAttn)]
    assert len(layers) == 2
    for name, att in layers:
        x, (h, w) = seen[att][0]
        b, _, c = x.shape
        ws = att.ws
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        with torch.no_grad():
            xp = torch.nn.functional.pad(x.view(b, h, w, c), (0, 0, 0, wp - w, 0, hp - h)).reshape(b, hp * wp, c)
            nh = att.num_heads
            qkv = att.qkv(xp).view(b, -1, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
            hh, wi = torch.arange(hp).repeat_interleave(wp), torch.arange(wp).repeat(hp)
            same = ((hh[:, None] // ws) == (hh[None] // ws)) & ((wi[:, None] // ws) == (wi[None] // ws))
            full = (qkv[0] * att.scale @ qkv[1].transpose(-1, -2)).masked_fill(~same, float("-inf")).softmax(-1)
            real = (hh < h) & (wi < w)
            oracle, padding_mass = full[:, :, real][:, :, :, real], full[:, :, real][:, :, :, ~real].sum(-1)
        (got,) = hooker.values[name]
        _check(got, oracle, padding_mass, name)
        assert padding_mass.max() > 0.01
