"""Swin V2 windowed attention (cosine attention, continuous position bias) stored as the layer's
(batch, heads, tokens, tokens) map (issue 24): transformers Swinv2 and Donut-Swin, timm
``swin_transformer_v2`` and ``swin_transformer_v2_cr``.

Each layer is checked against the dense hand computation of tests/window_oracle.py
(``dense_by_hand``: shift, region mask, relative position bias, padding; no windows built)
from the module's own weights. What each family computes is reproduced, not "fixed":
transformers' Swinv2 adds its -100 region mask twice (-200), timm rolls before padding.
"""

import pytest
import torch
from torch.nn import functional as F

from test_windows import _check, _run
from window_oracle import PAD_THEN_ROLL, ROLL_THEN_PAD, dense_by_hand

transformers = pytest.importorskip("transformers")


def _table_of(bias, window):
    """A window's bias ``(heads, N, N)`` (a function of the offset only) as the table
    ``((2wh-1)(2ww-1), heads)`` that ``dense_by_hand`` indexes by offset."""
    wh, ww = window
    n = torch.arange(wh * ww)
    y, x = n // ww, n % ww
    index = (y[:, None] - y[None] + wh - 1) * (2 * ww - 1) + (x[:, None] - x[None] + ww - 1)
    table = bias.new_zeros((2 * wh - 1) * (2 * ww - 1), bias.shape[0])
    table[index.reshape(-1)] = bias.reshape(bias.shape[0], -1).T
    return table


def _heads_of(linear_out, b, heads):
    return linear_out.view(b, linear_out.shape[1], heads, -1).transpose(1, 2)  # (B, heads, L, d)


@pytest.mark.parametrize("kind", ["Swinv2", "DonutSwin"])
@pytest.mark.parametrize("image", [40, 32])
def test_hf_swinv2_and_donut_every_layer_is_the_dense_map_of_its_weights(kind, image):
    module = getattr(transformers.models, "swinv2" if kind == "Swinv2" else "donut")
    layer_class = getattr(getattr(module, "modeling_swinv2" if kind == "Swinv2" else "modeling_donut_swin"),
                          f"{kind}Layer")
    torch.manual_seed(0)
    config = getattr(transformers, f"{kind}Config")(image_size=image, patch_size=4, embed_dim=16, depths=[2, 2],
                                                     num_heads=[2, 4], window_size=4)
    model = getattr(transformers, f"{kind}Model")(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0, 1)
    hooker, seen = _run(model, torch.randn(2, 3, image, image), layer_class, with_kwargs=True,
                        output=lambda out: out.last_hidden_state)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, layer_class)]
    assert len(layers) == 4 and len(hooker.values) == 4
    shifted = 0
    for name, layer in layers:
        (args, _) = seen[layer]
        hidden, (h, w) = args[0], args[1]
        b, _, c = hidden.shape
        att = layer.attention.self
        heads = att.num_attention_heads
        ws, s = layer.window_size, layer.shift_size
        shifted += s > 0
        with torch.no_grad():
            if kind == "Swinv2":  # post-norm: the raw states are windowed; cosine attention, mask added twice
                xn = hidden.view(b, h, w, c)
                scale = torch.clamp(att.logit_scale, max=torch.log(torch.tensor(100.0))).exp()  # (heads, 1, 1)
                table = 16 * torch.sigmoid(att.continuous_position_bias_mlp(att.relative_coords_table).view(-1, heads))
                q_of = lambda t: F.normalize(_heads_of(att.query(t), b, heads), dim=-1) * scale  # noqa: E731
                k_of = lambda t: F.normalize(_heads_of(att.key(t), b, heads), dim=-1)  # noqa: E731
                mask_value = -200.0
            else:
                xn = layer.layernorm_before(hidden).view(b, h, w, c)
                d = c // heads
                q_of = lambda t: _heads_of(att.query(t), b, heads) / d ** 0.5  # noqa: E731
                k_of = lambda t: _heads_of(att.key(t), b, heads)  # noqa: E731
                table, mask_value = att.relative_position_bias_table, -100.0
            oracle, padding_mass = dense_by_hand(xn, q_of, k_of, table, (ws, ws), (s, s), PAD_THEN_ROLL, mask_value)
        (got,) = hooker.values[name + ".attention.self"]
        _check(got, oracle, padding_mass, name)
    assert shifted == (2 if image == 40 else 1)


def _timm_v2(kind, image):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    if kind == "v2":
        from timm.models.swin_transformer_v2 import SwinTransformerV2 as Model, SwinTransformerV2Block as Block
    else:
        from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr as Model, SwinTransformerV2CrBlock as Block
    size = image if kind == "v2" else (image, image)
    model = Model(img_size=size, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                  num_classes=0, strict_img_size=False).eval()  # 40: 10x10 and 5x5 tokens, padded after rolling
    return model, Block


@pytest.mark.parametrize("kind", ["v2", "v2_cr"])
@pytest.mark.parametrize("image", [40, 32])
def test_timm_swin_v2_every_layer_is_the_dense_map_of_its_weights(kind, image):
    """They were stored per window, (batch * windows, heads, N, N)."""
    model, block_class = _timm_v2(kind, image)
    hooker, seen = _run(model, torch.randn(2, 3, image, image), block_class)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, block_class)]
    assert len(blocks) == 4 and len(hooker.values) == 4
    padded = 0
    for name, block in blocks:
        x = seen[block][0][0]  # post-norm: the block's raw input (B, H, W, C) is windowed
        b, h, w, c = x.shape
        att = block.attn
        heads = att.num_heads
        padded += bool(h % block.window_size[0])
        with torch.no_grad():
            if kind == "v2":
                bias = torch.cat((att.q_bias, att.k_bias, att.v_bias))
                qkv = lambda t: F.linear(t, att.qkv.weight, bias)  # noqa: E731
                table = 16 * torch.sigmoid(att.cpb_mlp(att.relative_coords_table).view(-1, heads))
            else:
                qkv = att.qkv
                table = _table_of(att._relative_positional_encodings()[0], block.window_size)
            scale = torch.clamp(att.logit_scale.reshape(heads, 1, 1), max=torch.log(torch.tensor(100.0))).exp()

            def part(t, i):
                return qkv(t).view(b, t.shape[1], 3, heads, c // heads)[:, :, i].transpose(1, 2)

            oracle, padding_mass = dense_by_hand(x, lambda t: F.normalize(part(t, 0), dim=-1) * scale,
                                                 lambda t: F.normalize(part(t, 1), dim=-1), table, block.window_size,
                                                 block.shift_size, ROLL_THEN_PAD)
        (got,) = hooker.values[name + ".attn"]
        _check(got, oracle, padding_mass, name)
    assert padded == (4 if image == 40 else 0)
