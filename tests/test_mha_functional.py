"""``F.multi_head_attention_forward`` called by a module of the model's own (WavLM's attention does), not
through ``nn.MultiheadAttention``: captured per head, checked by hand from the module's weights, with the
model's output and what the caller asked for unchanged."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attention_hooker import TransformerAttentionHooker

E, H = 16, 4


class FunctionalAttention(nn.Module):
    """Self-attention through ``F.multi_head_attention_forward`` with separate q/k/v projections and an
    additive per-head bias ``(batch * heads, L, L)`` (as WavLM passes its gated position bias)."""

    def __init__(self, dropout: float = 0.0, **call):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(E, E) for _ in range(4))
        self.dropout, self.call = dropout, call

    def forward(self, x, bias):  # x (B, L, E), bias (B * H, L, L)
        t = x.transpose(0, 1)  # (L, B, E)
        out, weights = F.multi_head_attention_forward(
            t, t, t, E, H, torch.empty([0]), torch.cat((self.q.bias, self.k.bias, self.v.bias)), None, None, False,
            self.dropout, self.out.weight, self.out.bias, self.training, attn_mask=bias, use_separate_proj_weight=True,
            q_proj_weight=self.q.weight, k_proj_weight=self.k.weight, v_proj_weight=self.v.weight, **self.call)
        return out.transpose(0, 1), weights


def by_hand(module: FunctionalAttention, x, bias):
    """softmax(q kᵀ / sqrt(d) + bias) per head from the module's weights: ``(batch, heads, query, key)``."""
    b, length, _ = x.shape
    q = module.q(x).view(b, length, H, E // H).transpose(1, 2)  # (B, H, L, d)
    k = module.k(x).view(b, length, H, E // H).transpose(1, 2)
    return (q @ k.transpose(-1, -2) / math.sqrt(E // H) + bias.view(b, H, length, length)).softmax(-1)


@pytest.mark.parametrize("call", [dict(), dict(average_attn_weights=False), dict(need_weights=False)],
                         ids=["averaged weights", "per-head weights", "no weights"])
def test_functional_mha_of_a_hooked_module_is_captured_per_head(call):
    torch.manual_seed(0)
    module = FunctionalAttention(**call).eval()
    x, bias = torch.randn(2, 5, E), torch.randn(2 * H, 5, 5)
    with torch.no_grad():
        plain = module(x, bias)
        with TransformerAttentionHooker(module, layer_regex="^$") as hooker:
            hooked = module(x, bias)
    got = hooker.values[""]
    assert len(got) == 1 and got[0].shape == (2, H, 5, 5)
    torch.testing.assert_close(got[0], by_hand(module, x, bias).detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(plain[0], hooked[0])  # the model computes what it computed
    if plain[1] is None:
        assert hooked[1] is None  # the caller gets what it asked for
    else:
        assert torch.equal(plain[1], hooked[1])


def test_functional_mha_with_dropout_runs_as_asked_and_keeps_weights_before_dropout():
    torch.manual_seed(0)
    module = FunctionalAttention(dropout=0.5).train()
    x, bias = torch.randn(2, 5, E), torch.randn(2 * H, 5, 5)
    torch.manual_seed(3)
    plain = module(x, bias)
    with TransformerAttentionHooker(module, layer_regex="^$") as hooker:
        torch.manual_seed(3)
        hooked = module(x, bias)
    assert torch.equal(plain[0], hooked[0]) and torch.equal(plain[1], hooked[1])  # same dropout drawn
    torch.testing.assert_close(hooker.values[""][0], by_hand(module, x, bias).detach(), atol=1e-6, rtol=1e-5)
