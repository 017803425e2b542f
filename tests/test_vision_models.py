"""timm and torchvision ViTs, against timm's AttentionExtract and hand computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from attention_hooker import TransformerAttentionHooker

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


def test_cait_talking_heads_record_the_mixed_map_that_multiplies_the_values():
    """Issue 9: CaiT mixes heads after the softmax (proj_w); the softmax was stored, which
    is not what multiplies V. Oracle: the map recomputed from the module's own weights."""
    from timm.models.cait import Cait, TalkingHeadAttn

    torch.manual_seed(0)
    model = Cait(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, depth_token_only=1,
                 num_classes=5).eval()
    inputs = {}
    talking = {name: m for name, m in model.named_modules() if isinstance(m, TalkingHeadAttn)}
    handles = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
               for name, m in talking.items()]
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected_out = model(image)
        with TransformerAttentionHooker(model) as hooker:
            out = model(image)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
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
