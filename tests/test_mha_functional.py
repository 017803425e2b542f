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


def test_keep_grad_reaches_the_weights_the_functional_call_multiplied_the_values_with():
    """The gradient kept is d(loss)/d(weights) of the weights torch used, equal to eager's by hand."""
    torch.manual_seed(0)
    module = FunctionalAttention(average_attn_weights=False).eval()
    x, bias = torch.randn(2, 5, E), torch.randn(2 * H, 5, 5)
    with TransformerAttentionHooker(module, layer_regex="^$", keep_grad=True) as hooker:
        out, _ = module(x, bias)
        out.square().sum().backward()
    got = hooker.gradients[""][0]
    assert got is not None and got.shape == (2, H, 5, 5)
    weights = by_hand(module, x, bias).detach().requires_grad_(True)  # the oracle: the same product by hand
    b, length = 2, 5
    v = module.v(x).view(b, length, H, E // H).transpose(1, 2)  # (B, H, L, d)
    mixed = (weights @ v).transpose(1, 2).reshape(b, length, E)
    module.out(mixed).square().sum().backward()
    torch.testing.assert_close(got, weights.grad, atol=1e-5, rtol=1e-4)


def test_keep_values_keeps_the_value_projection_of_the_functional_call():
    torch.manual_seed(0)
    module = FunctionalAttention().eval()
    x, bias = torch.randn(2, 5, E), torch.randn(2 * H, 5, 5)
    with torch.no_grad(), TransformerAttentionHooker(module, layer_regex="^$", keep_values=True) as hooker:
        module(x, bias)
    expected = module.v(x).view(2, 5, H, E // H).transpose(1, 2)  # (B, H, S, d)
    torch.testing.assert_close(hooker.value_vectors[""][0], expected.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["causal hint without weights", "keep_grad without weights"])
def test_calls_whose_map_cannot_be_the_one_used_are_refused_with_the_reason(case):
    torch.manual_seed(0)
    if case == "causal hint without weights":
        module, options = FunctionalAttention(need_weights=False, is_causal=True).eval(), {}
    else:
        module, options = FunctionalAttention(need_weights=False).eval(), dict(keep_grad=True)
    x, bias = torch.randn(2, 5, E), torch.randn(2 * H, 5, 5)
    plain = module(x, bias)[0]
    with TransformerAttentionHooker(module, layer_regex="^$", **options) as hooker:
        hooked = module(x, bias)[0]
    assert torch.equal(plain, hooked)
    assert "" not in hooker.values
    reason = hooker.report()[""].reason
    assert ("is_causal=True" if case.startswith("causal") else "keep_grad") in reason


@pytest.mark.parametrize("call", [dict(), dict(need_weights=False)], ids=["asks for weights", "asks for none"])
def test_knocking_out_a_head_of_a_module_calling_the_function_itself_equals_the_hand_computation(call):
    """WavLM's attention calls F.multi_head_attention_forward itself: a knock-out acts on that call's heads."""
    from attention_hooker import HeadIntervention

    torch.manual_seed(0)
    module = FunctionalAttention(**call).eval()
    x, bias = torch.randn(2, 5, E), torch.randn(2 * H, 5, 5)
    with torch.no_grad():
        with HeadIntervention(module).knock_out("", heads=[1]):
            out, returned = module(x, bias)
        weights = by_hand(module, x, bias)  # (B, H, L, L)
        v = module.v(x).view(2, 5, H, E // H).transpose(1, 2)  # (B, H, L, d)
        heads = weights @ v
        heads[:, 1] = 0
        expected = module.out(heads.transpose(1, 2).reshape(2, 5, E))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, module(x, bias)[0], atol=1e-4)
        if call.get("need_weights") is False:
            assert returned is None  # the caller gets what it asked for
        else:
            torch.testing.assert_close(returned, weights.mean(1), atol=1e-6, rtol=1e-5)
