"""timm and torchvision ViTs, against timm's AttentionExtract and hand computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from attention_hooker import TransformerAttentionHooker
from window_oracle import PAD_THEN_ROLL, ROLL_THEN_PAD, place_by_index_grid

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _timm_vit(**overrides):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


@pytest.mark.parametrize("reg_tokens", [0, 4], ids=["cls_only", "with_registers"])
def test_timm_fused_attention_matches_attention_extract_on_unfused_copy(reg_tokens):
    from timm.utils import AttentionExtract

    fused = _timm_vit(reg_tokens=reg_tokens)
    assert all(block.attn.fused_attn for block in fused.blocks), "timm should pick fused attention here"
    unfused = copy.deepcopy(fused)
    for block in unfused.blocks:
        block.attn.fused_attn = False
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = AttentionExtract(unfused, method="fx")(x)  # {"blocks.i.attn.softmax": (B, H, N, N)}
        expected = fused(x)
        with TransformerAttentionHooker(fused) as hooker:
            out = fused(x)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert list(hooker.values) == [f"blocks.{i}.attn" for i in range(3)]
    tokens = 1 + reg_tokens + 16
    for i in range(3):
        (ours,) = hooker.values[f"blocks.{i}.attn"]
        theirs = reference[f"blocks.{i}.attn.softmax"]
        assert ours.shape == theirs.shape == (2, 3, tokens, tokens)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_timm_unfused_attention_is_captured_by_its_softmax():
    from timm.utils import AttentionExtract

    model = _timm_vit()
    for block in model.blocks:
        block.attn.fused_attn = False
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = AttentionExtract(copy.deepcopy(model), method="fx")(x)
        with TransformerAttentionHooker(model) as hooker:
            model(x)
    for i in range(3):
        torch.testing.assert_close(hooker.values[f"blocks.{i}.attn"][0], reference[f"blocks.{i}.attn.softmax"])


def test_torchvision_vit_hidden_need_weights_false_is_captured():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64).eval()
    inputs = []
    handles = [
        layer.self_attention.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        for layer in model.encoder.layers
    ]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        inputs.clear()
        with TransformerAttentionHooker(model) as hooker:
            out = model(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    names = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert list(hooker.values) == names
    for name, layer, x_in in zip(names, model.encoder.layers, inputs):
        mha = layer.self_attention
        e, h = mha.embed_dim, mha.num_heads
        q = (x_in @ mha.in_proj_weight[:e].T + mha.in_proj_bias[:e]).view(2, -1, h, e // h).transpose(1, 2)
        k = (x_in @ mha.in_proj_weight[e : 2 * e].T + mha.in_proj_bias[e : 2 * e]).view(2, -1, h, e // h).transpose(1, 2)
        oracle = (q @ k.transpose(-2, -1) / math.sqrt(e // h)).softmax(-1)  # (B, H, N, N)
        torch.testing.assert_close(hooker.values[name][0], oracle, atol=1e-5, rtol=1e-5)


def _capture_with_inputs(model, modules: dict, x):
    """Captures one forward of ``model`` on ``x`` (its output checked unchanged) and
    returns ``(hooker, {name: first input of that module's call})`` for ``modules``."""
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda m, args, n=n: inputs.__setitem__(n, args[0]))
               for n, m in modules.items()]
    try:
        with torch.no_grad():
            expected = model(x)
            with TransformerAttentionHooker(model) as hooker:
                out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    return hooker, inputs


def test_cait_talking_heads_record_the_mixed_map_that_multiplies_the_values():
    """Issue 9: CaiT mixes heads after the softmax (proj_w); the softmax was stored, which
    is not what multiplies V. Oracle: the map recomputed from the module's own weights."""
    from timm.models.cait import Cait, TalkingHeadAttn

    torch.manual_seed(0)
    model = Cait(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, depth_token_only=1,
                 num_classes=5).eval()
    talking = {name: m for name, m in model.named_modules() if isinstance(m, TalkingHeadAttn)}
    hooker, inputs = _capture_with_inputs(model, talking, torch.randn(2, 3, 32, 32))
    assert len(talking) == 2
    for name, m in talking.items():
        x = inputs[name]
        b, n, c = x.shape
        with torch.no_grad():
            q, k, _ = m.qkv(x).reshape(b, n, 3, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)
            scores = m.proj_l(((q * m.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            mixed = m.proj_w(scores.softmax(-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, H, N, N)
        (got,) = hooker.values[name]
        torch.testing.assert_close(got, mixed, atol=1e-6, rtol=1e-5)
    assert not hooker.report().missing


# ------------------------------------------------------------------ timm zoo (issue 9)
# name: (layers that must be refused, with why; extra layers AttentionExtract's default
# pattern does not see, checked as probabilities instead). Swin's window attention is stored at
# the image's tokens (issue 24); AttentionExtract's per-window maps are placed to compare.
TIMM_ZOO = {
    "vit_tiny_patch16_224": (None, None),
    "swin_tiny_patch4_window7_224": (None, None),
    "maxvit_nano_rw_256": (None, None),
    "levit_128s": (None, r"attn_downsample"),
    "volo_d1_224": (r"network\.0\.\d+\.attn", None),  # outlook attention: a 5-D softmax, (B, H, N, k*k, k*k)
    "deit_tiny_patch16_224": (None, None),
    "eva02_tiny_patch14_224": (None, None),
    "twins_pcpvt_small": (None, None),
    "pvt_v2_b0": (None, None),
    "crossvit_tiny_240": (None, None),
    "mvitv2_tiny": (None, None),
    # Found by what they declare (a head count and a qkv projection), not by class name:
    # XCA: a softmax over channels, not tokens: the layer stores none (refused, naming its "<layer>:channels" entry)
    "xcit_nano_12_p16_224": (r"^blocks\.\d+\.attn$", None),
    "convit_tiny": (r"^blocks\.\d\.attn$", None),  # GPSA: patch and positional softmaxes mixed (two pieces)
    # SelfAttnBlock holds a lambda layer, whose softmax is over its keys: no attention map ("nothing captured")
    "lambda_resnet26rpt_256": (r"^stages\.\d\.\d$", None),
}
_TIMM_QUICK = ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "maxvit_nano_rw_256", "levit_128s", "volo_d1_224",
               "xcit_nano_12_p16_224"]


def _timm_zoo():
    import os

    return list(TIMM_ZOO) if os.environ.get("ATTENTION_HOOKER_ZOO") == "full" else _TIMM_QUICK


@pytest.mark.parametrize("name", _timm_zoo())
def test_timm_zoo_fused_capture_equals_attention_extract_of_an_unfused_copy(name):
    import re

    from timm.utils import AttentionExtract

    refused, extra = TIMM_ZOO[name]
    torch.manual_seed(0)
    fused = timm.create_model(name, pretrained=False, num_classes=10).eval()
    unfused = copy.deepcopy(fused)
    for module in unfused.modules():
        if getattr(module, "fused_attn", None):
            module.fused_attn = False
    x = torch.randn(2, *fused.pretrained_cfg["input_size"])
    with torch.no_grad():
        try:
            references = list(AttentionExtract(unfused, method="fx")(x).values())
        except RuntimeError as err:  # timm finds no attention softmax either (a lambda layer's is over keys)
            assert "No node names found" in str(err) and refused
            references = []
        expected = fused(x)
        with TransformerAttentionHooker(fused) as hooker:
            out = fused(x)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    report = hooker.report()
    assert all(refused and re.search(refused, n) for n in report.missing), report
    if refused:
        assert report.missing, f"{name}: the layers expected to be refused were captured"
    modules = dict(fused.named_modules())
    for layer, calls in hooker.values.items():
        for got in calls:
            if extra and re.search(extra, layer):
                assert got.shape[1] == modules[layer].num_heads
                torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), atol=1e-5, rtol=0)
                continue
            candidates = _placed_swin_windows(modules, layer, references, got.shape[0])
            match = [i for i, r in candidates if r.shape == got.shape
                     and torch.allclose(r, got, atol=1e-5, rtol=1e-4)]
            assert match, f"{name}: {layer} {tuple(got.shape)} equals none of AttentionExtract's maps"
            references.pop(match[0])
    assert not references or refused, f"{name}: {len(references)} of AttentionExtract's maps were not captured"


def _placed_swin_windows(modules, layer, references, batch):
    """``[(index, reference)]``: AttentionExtract's maps as they compare with ``layer``'s
    capture. A timm Swin block's window attention is stored at the image's tokens (issue 24),
    while AttentionExtract gives it per window ``(batch * windows, heads, N, N)``: those are
    placed here by the block's own pad/roll/partition of a grid of token indices."""
    block = modules.get(layer.rpartition(".")[0])
    if type(modules.get(layer)).__name__ != "WindowAttention" or not hasattr(block, "shift_size"):  # ":channels": none
        return list(enumerate(references))
    (h, w), window, shift = block.input_resolution, block.window_size, block.shift_size
    n = window[0] * window[1]
    windows = math.ceil(h / window[0]) * math.ceil(w / window[1])
    return [(i, place_by_index_grid(r, batch, h, w, window, shift, ROLL_THEN_PAD)) for i, r in enumerate(references)
            if r.dim() == 4 and r.shape[0] == batch * windows and r.shape[-1] == n]


# ------------------------------------------------------------------ torchvision Swin and MaxViT (issue 9)
def _swin_window_attention_by_hand(module, x):
    """``(batch * windows, heads, N, N)`` of a torchvision ``ShiftedWindowAttention`` from its
    own weights: windows of the (cyclically shifted) map, scaled q.kᵀ plus the relative
    position bias, keys from another region of the shifted map masked by -100 (the paper's
    constant), softmax."""
    b, h, w, c = x.shape
    ws, shift = module.window_size, [s if module.window_size[i] < (h, w)[i] else 0
                                     for i, s in enumerate(module.shift_size)]
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = x.view(b, h // ws[0], ws[0], w // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws[0] * ws[1], c)
    heads = module.num_heads
    q, k, _ = (windows @ module.qkv.weight.T + module.qkv.bias).view(
        windows.shape[0], -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # (B*nW, H, N, d)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(c // heads) + module.get_relative_position_bias()
    if any(shift):
        def regions(size, window, s):  # which of the shifted map's three bands each row/column is in
            index = torch.arange(size)
            return (index >= size - window).long() + (index >= size - s).long()

        label = regions(h, ws[0], shift[0])[:, None] * 3 + regions(w, ws[1], shift[1])[None, :]  # (H, W)
        label = label.view(h // ws[0], ws[0], w // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(-1, ws[0] * ws[1])
        blocked = (label[:, :, None] != label[:, None, :]).float() * -100.0  # (nW, N, N)
        scores = (scores.view(b, -1, heads, *scores.shape[-2:]) + blocked[None, :, None]).view_as(scores)
    return scores.softmax(-1)


def test_torchvision_swin_window_attention_equals_its_own_weights_by_hand():
    from torchvision.models import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=5).eval()
    attention = {n: m for n, m in model.named_modules() if type(m).__name__ == "ShiftedWindowAttention"}
    hooker, inputs = _capture_with_inputs(model, attention, torch.randn(2, 3, 32, 32))
    assert list(hooker.values) == list(attention) and len(attention) == 4
    assert any(m.shift_size[0] and m.window_size[0] < inputs[n].shape[1] for n, m in attention.items())
    for name, module in attention.items():
        (got,) = hooker.values[name]
        b, h, w, _ = inputs[name].shape
        shift = [s if module.window_size[i] < (h, w)[i] else 0 for i, s in enumerate(module.shift_size)]
        with torch.no_grad():
            windows = _swin_window_attention_by_hand(module, inputs[name])  # (batch * windows, heads, 16, 16)
        # Stored at the image's tokens (issue 24): the windows placed by the layer's own roll of a token grid.
        oracle = place_by_index_grid(windows, b, h, w, module.window_size, shift, PAD_THEN_ROLL)
        assert got.shape == oracle.shape == (b, module.num_heads, h * w, h * w)
        torch.testing.assert_close(got, oracle, atol=1e-5, rtol=1e-4)


def test_torchvision_maxvit_block_and_grid_attention_is_placed_at_its_tokens():
    # Its 5-D (batch, groups, heads, P, P) is placed into (batch, heads, H*W, H*W) (tests/test_windows.py
    # checks the values against a dense hand computation); a 5-D call of any other module stays refused.
    from torchvision.models import MaxVit

    torch.manual_seed(0)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16], block_layers=[1],
                   head_dim=8, stochastic_depth_prob=0.0, num_classes=5).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(image)
        with TransformerAttentionHooker(model) as hooker:
            out = model(image)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert not hooker.report().missing and len(hooker.values) == 2
    for (weights,) in hooker.values.values():
        assert weights.shape == (2, 2, 64, 64)
