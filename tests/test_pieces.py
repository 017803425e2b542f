"""The pieced-call seam (capture/pieces.py) with a family written here: a layer that loops over the
images packed in its input and calls ``F.scaled_dot_product_attention`` once per image (as Qwen2-VL's
vision tower does), whose map is block-diagonal. The family only says where each call's weights go;
the seam offers it the sdpa calls, applies the selection and hands the map to the keepers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attention_hooker import AttentionCaptureWarning, TransformerAttentionHooker
from attention_hooker.capture import pieces
from attention_hooker.capture.routes.sdpa import sdpa_attention_weights


class PerImageAttention(nn.Module):
    """``x`` (1, tokens, width) holds several images, split at ``bounds`` (a kwarg): one sdpa call each."""

    def __init__(self, width=16, heads=2):
        super().__init__()
        self.num_heads, self.head_dim = heads, width // heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.o_proj = nn.Linear(width, width)

    def heads(self, t):
        return t.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (1, H, n, d)

    def forward(self, x, bounds):
        q, k, v = self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
        out = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in bounds]
        return self.o_proj(torch.cat(out, 2).transpose(1, 2).reshape(x.shape))


class _PerImageCall(pieces.PieceCall):
    def __init__(self, bounds, tokens, heads, dtype):
        self.bounds, self.tokens, self.heads, self.dtype = bounds, tokens, heads, dtype
        self.calls = []

    def take_sdpa(self, call):
        a, b = self.bounds[len(self.calls)] if len(self.calls) < len(self.bounds) else (0, 0)
        if call["query"].shape[-2] != b - a:
            return f"an sdpa call over {call['query'].shape[-2]} queries where image {len(self.calls)} has {b - a}"
        self.calls.append(call)
        return None

    def assemble(self, keep_values):
        if len(self.calls) != len(self.bounds):
            return f"{len(self.calls)} sdpa calls for {len(self.bounds)} images"

        def rows(heads, chosen, keys):
            out = torch.zeros(1, self.heads if heads is None else len(heads), len(chosen), self.tokens)
            for (a, b), call in zip(self.bounds, self.calls):
                weights = sdpa_attention_weights(call["query"], call["key"], heads=heads)  # (1, h, n, n)
                inside = ((chosen >= a) & (chosen < b)).nonzero().squeeze(1)
                out[:, :, inside, a:b] = weights[:, :, chosen[inside] - a]
            return out if keys is None else out[..., list(keys)]

        return pieces.Assembly(1, self.heads, self.tokens, self.tokens, self.dtype, rows)


class PerImageLayer(pieces.PiecedLayer):
    family = "test per-image loop"

    def start(self, module, args, kwargs):
        bounds = kwargs.get("bounds")
        if bounds is None:
            return "called without bounds: where each image starts cannot be read"
        return _PerImageCall(list(bounds), args[0].shape[1], module.num_heads, args[0].dtype)


@pytest.fixture
def family(monkeypatch):
    rule = lambda module, parents: PerImageLayer() if isinstance(module, PerImageAttention) else None  # noqa: E731
    pieces.pieced_layer(nn.Linear(1, 1), {})  # the built-in families registered first
    monkeypatch.setattr(pieces, "FAMILIES", pieces.FAMILIES + [rule])


def _hand(module, x, bounds):
    """softmax(q k^T / sqrt(d)) from the module's weights, keys outside the query's image masked: (1, H, N, N)."""
    with torch.no_grad():
        q, k = module.heads(module.q_proj(x)), module.heads(module.k_proj(x))
    image = torch.zeros(x.shape[1], dtype=torch.long)
    for number, (a, b) in enumerate(bounds):
        image[a:b] = number
    same = image[:, None] == image[None, :]
    return (q @ k.transpose(-1, -2) / math.sqrt(module.head_dim)).masked_fill(~same, float("-inf")).softmax(-1)


def test_a_family_of_sdpa_pieces_is_assembled_into_one_block_diagonal_map(family):
    torch.manual_seed(0)
    module, x, bounds = PerImageAttention().eval(), torch.randn(1, 9, 16), [(0, 4), (4, 9)]
    plain = module(x, bounds=bounds)
    with torch.no_grad(), TransformerAttentionHooker(module) as hooker:
        hooked = module(x, bounds=bounds)
    assert torch.equal(plain, hooked)
    ((got,),) = hooker.values.values()
    torch.testing.assert_close(got, _hand(module, x, bounds), atol=1e-6, rtol=1e-5)
    with torch.no_grad(), TransformerAttentionHooker(module, rows=[2, 7], heads=[1], keys=[0, 5, 8]) as selected:
        module(x, bounds=bounds)
    ((part,),) = selected.values.values()
    torch.testing.assert_close(part, got[:, [1]][:, :, [2, 7]][..., [0, 5, 8]])


def test_a_call_the_family_cannot_assemble_is_refused_with_its_reason(family):
    torch.manual_seed(0)
    module, x = PerImageAttention().eval(), torch.randn(1, 9, 16)
    for call, reason in ((_call_with_missing_image, "1 sdpa calls for 2 images"),
                         (_call_without_bounds, "called without bounds")):
        with torch.no_grad(), TransformerAttentionHooker(module) as hooker:
            with pytest.warns(AttentionCaptureWarning, match=reason):
                call(module, x)
        assert hooker.values == {} and reason in hooker.report()[""].reason


def _call_with_missing_image(module, x):
    """Bounds that name two images while the forward only loops over the first (a family's check)."""
    original = module.forward

    def forward(x, bounds):
        return original(x[:, :4], bounds=bounds[:1])

    module.forward = forward
    try:
        module(x, bounds=[(0, 4), (4, 9)])
    finally:
        del module.forward


def _call_without_bounds(module, x):
    """The bounds given positionally: the family reads them from the keyword only, so it cannot read them."""
    return module(x, [(0, 9)])


def test_the_loop_is_refused_as_pieces_when_no_family_takes_it():
    torch.manual_seed(0)
    module, x = PerImageAttention().eval(), torch.randn(1, 9, 16)
    with torch.no_grad(), TransformerAttentionHooker(module) as hooker:
        with pytest.warns(AttentionCaptureWarning, match="computed in pieces"):
            module(x, bounds=[(0, 4), (4, 9)])
    assert hooker.values == {}
