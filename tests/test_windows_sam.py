"""SAM / ViTDet windowed attention stored as the layer's (batch, heads, tokens, tokens) map (issue 24).

Their windowed blocks pad the token grid right and bottom to whole windows (no shift, no
mask: padding is attended), so each layer's stored map is checked against a dense hand
computation over the whole padded grid from the module's own weights
(tests/window_oracle.py: ``dense_decomposed_by_hand``, which builds no windows); global
blocks are the same computation with one window of the whole grid. Image sizes that need
padding (10x10 tokens, windows of 4) and that do not (8x8) are both run, batch 2.
"""

import pytest
import torch

from attention_hooker import TransformerAttentionHooker
from test_windows import _check, _run
from window_oracle import dense_decomposed_by_hand

transformers = pytest.importorskip("transformers")


def _randomise_relative_positions(model):
    with torch.no_grad():  # zero at init: a placement that ignores positions inside windows would pass
        for name, parameter in model.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w")):
                parameter.normal_(0, 1)


def _check_layers(hooker, layers, expected_windowed):
    """``layers``: ``[(name, xn (B, H, W, C), qkv, heads, scale, rel_pos_h, rel_pos_w, window_size)]``."""
    windowed = padded = 0
    for name, xn, qkv, heads, scale, rel_h, rel_w, ws in layers:
        b, h, w, _ = xn.shape
        window = (ws, ws) if ws > 0 else (h, w)
        windowed += ws > 0
        padded += bool(ws > 0 and (h % ws or w % ws))
        with torch.no_grad():
            oracle, padding_mass = dense_decomposed_by_hand(xn, qkv, heads, scale, rel_h, rel_w, window)
        (got,) = hooker.values[name]
        _check(got, oracle, padding_mass, name)
        if ws > 0 and h % ws:
            assert padding_mass.max() > 0.05, name  # the padding check does check something
    assert windowed == expected_windowed
    return padded


def _hf_sam(kind, image, impl):
    torch.manual_seed(0)
    config = getattr(transformers, f"{kind}VisionConfig")(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=image, patch_size=4, window_size=4,
        global_attn_indexes=[1], output_channels=16, mlp_dim=64, attn_implementation=impl)
    model = getattr(transformers, f"{kind}VisionModel")(config).eval()
    _randomise_relative_positions(model)
    return model


@pytest.mark.parametrize("kind", ["Sam", "SamHQ"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("image", [40, 32])
def test_hf_sam_windowed_and_global_layers_are_the_dense_map_of_their_weights(kind, impl, image):
    module = getattr(transformers.models, "sam" if kind == "Sam" else "sam_hq")
    layer_class = getattr(getattr(module, f"modeling_{module.__name__.rpartition('.')[2]}"), f"{kind}VisionLayer")
    model = _hf_sam(kind, image, impl)
    hooker, seen = _run(model, torch.randn(2, 3, image, image), layer_class,
                        output=lambda out: out.last_hidden_state)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, layer_class)]
    assert len(layers) == 3 and len(hooker.values) == 3
    checks = []
    for name, layer in layers:
        att = layer.attn
        xn = layer.layer_norm1(seen[layer][0][0] if seen[layer][0] else seen[layer][1]["hidden_states"])
        checks.append((name + ".attn", xn, att.qkv, att.num_attention_heads, att.scale, att.rel_pos_h, att.rel_pos_w,
                       layer.window_size))
    assert _check_layers(hooker, checks, expected_windowed=2) == (2 if image == 40 else 0)


@pytest.mark.parametrize("image", [40, 32])
def test_hf_vitdet_windowed_and_global_layers_are_the_dense_map_of_their_weights(image):
    from transformers.models.vitdet.modeling_vitdet import VitDetLayer

    torch.manual_seed(0)
    config = transformers.VitDetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=image,
                                       patch_size=4, window_size=4, window_block_indices=[0], mlp_ratio=2,
                                       use_relative_position_embeddings=True)
    model = transformers.VitDetModel(config).eval()
    _randomise_relative_positions(model)
    hooker, seen = _run(model, torch.randn(2, 3, image, image), VitDetLayer, output=lambda out: out.last_hidden_state)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, VitDetLayer)]
    checks = []
    for name, layer in layers:
        att = layer.attention
        xn = layer.norm1(seen[layer][0][0].permute(0, 2, 3, 1))  # the block's input is (B, C, H, W)
        checks.append((name + ".attention", xn, att.qkv, att.num_heads, att.scale, att.rel_pos_h, att.rel_pos_w,
                       layer.window_size))
    assert _check_layers(hooker, checks, expected_windowed=1) == (1 if image == 40 else 0)


def _timm_sam(image, fused):
    pytest.importorskip("timm")
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    torch.manual_seed(0)
    model = VisionTransformerSAM(img_size=image, patch_size=4, embed_dim=32, depth=3, num_heads=2, window_size=4,
                                 global_attn_indexes=(1,), use_rel_pos=True, neck_chans=16, num_classes=0).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    _randomise_relative_positions(model)
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "softmax"])
@pytest.mark.parametrize("image", [40, 32])
def test_timm_sam_windowed_and_global_layers_are_the_dense_map_of_their_weights(fused, image):
    """Fused (timm's default) calls sdpa on a 3-D query (batch * heads, N, dim): it was refused on
    every layer, global ones too ("36 query heads, while the layer declares 2")."""
    from timm.models.vision_transformer_sam import Block

    model = _timm_sam(image, fused)
    hooker, seen = _run(model, torch.randn(2, 3, image, image), Block)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, Block)]
    checks = []
    for name, block in blocks:
        att = block.attn
        assert isinstance(att.q_norm, torch.nn.Identity)
        checks.append((name + ".attn", block.norm1(seen[block][0][0]), att.qkv, att.num_heads, att.scale,
                       att.rel_pos_h, att.rel_pos_w, block.window_size))
    assert _check_layers(hooker, checks, expected_windowed=2) == (2 if image == 40 else 0)


@pytest.mark.parametrize("model_of", [lambda: _hf_sam("Sam", 40, "sdpa"), lambda: _hf_sam("Sam", 40, "eager"),
                                      lambda: _timm_sam(40, True)], ids=["hf_sdpa", "hf_eager", "timm_fused"])
def test_selections_on_sam_layers_equal_the_whole_maps_slices(model_of):
    model = model_of()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad(), TransformerAttentionHooker(model) as whole:
        model(x)
    rows, keys = [99, 0, 57], slice(10, 60, 7)
    with torch.no_grad(), TransformerAttentionHooker(model, heads=[1], rows=rows, keys=keys) as picked:
        model(x)
    assert picked.report().missing == [] and len(picked.values) == 3
    for name, (call,) in picked.values.items():
        expected = whole.values[name][0][:, [1]][:, :, rows][:, :, :, keys]
        assert call.shape == expected.shape == (2, 1, 3, 8)
        # A windowed layer's selection is taken from its whole per-window map: bitwise. A global sdpa
        # layer computes only the selected rows (another product shape): float rounding apart.
        exact = ".1." not in name
        torch.testing.assert_close(call, expected, atol=0 if exact else 1e-7, rtol=0 if exact else 1e-6)


def test_a_sam_block_turned_global_after_hooking_is_refused_with_the_reason():
    """The window is read from the block at each call: a block whose window_size was changed to 0
    after the hooks went on is not placed by the old window."""
    model = _hf_sam("Sam", 32, "eager")
    layer = model.vision_encoder.layers[0]
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        layer.window_size = 0
        model(torch.randn(1, 3, 32, 32))
    report = hooker.report()
    assert report.missing == ["vision_encoder.layers.0.attn"]
    assert "window_size is 0 at its call" in report["vision_encoder.layers.0.attn"].reason


@pytest.mark.parametrize("image", [40, 32])
@pytest.mark.parametrize("model_of", [lambda image: _hf_sam("Sam", image, "eager"),
                                      lambda image: _hf_sam("Sam", image, "sdpa"),
                                      lambda image: _timm_sam(image, True), lambda image: _timm_sam(image, False)],
                         ids=["hf_eager", "hf_sdpa", "timm_fused", "timm_softmax"])
def test_kept_values_times_the_placed_map_give_each_layers_context(model_of, image):
    """keep_values on a windowed layer: its value vectors are placed at the tokens too, and the
    placed map times them, plus each row's weight on padding times the value of a padded (zero)
    token (the value projection's bias), is the context the module projects, at every real token."""
    model = model_of(image)
    blocks = [m for m in model.modules() if hasattr(m, "window_size") and hasattr(m, "attn")]
    contexts = {}
    handles = [b.attn.proj.register_forward_pre_hook(lambda m, a, b=b: contexts.__setitem__(b, a[0])) for b in blocks]
    x = torch.randn(2, 3, image, image)
    try:
        with torch.no_grad(), TransformerAttentionHooker(model, keep_values=True) as hooker:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    names = {m: n for n, m in model.named_modules()}
    assert len(blocks) == 3
    for block in blocks:
        name = names[block.attn]
        (weights,), (value,) = hooker.values[name], hooker.value_vectors[name]
        b, heads, tokens, _ = weights.shape
        side = image // 4
        ws = block.window_size or side
        pad = -side % ws
        windows = contexts[block].reshape(-1, ws, ws, weights.shape[1] * value.shape[-1])  # (B * nW, ws, ws, C)
        n = (side + pad) // ws
        grid = windows.view(b, n, n, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, side + pad, side + pad, -1)
        context = grid[:, :side, :side].reshape(b, tokens, heads, -1).transpose(1, 2)  # (B, heads, T, d)
        padding_value = block.attn.qkv.bias.view(3, heads, -1)[2][None, :, None, :]  # v of a zero token
        rebuilt = weights @ value + (1 - weights.sum(-1, keepdim=True)) * padding_value
        assert value.shape == (b, heads, tokens, context.shape[-1])
        torch.testing.assert_close(rebuilt, context, atol=2e-5, rtol=1e-4, msg=name)
