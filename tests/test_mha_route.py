"""The nn.MultiheadAttention route, checked by hand from the module's own weights."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attention_hooker import TransformerAttentionHooker


def manual_mha_weights(mha: nn.MultiheadAttention, query, key, attn_mask=None, key_padding_mask=None):
    """Per-head probabilities ``(batch, heads, query, key)`` computed by hand from
    the module's projection weights (no call into torch's attention code)."""
    if not mha.batch_first and query.dim() == 3:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    if query.dim() == 2:
        query, key = query.unsqueeze(0), key.unsqueeze(0)
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk = mha.in_proj_weight[:e], mha.in_proj_weight[e : 2 * e]
    else:
        wq, wk = mha.q_proj_weight, mha.k_proj_weight
    bq = bk = None
    if mha.in_proj_bias is not None:
        bq, bk = mha.in_proj_bias[:e], mha.in_proj_bias[e : 2 * e]
    q = query @ wq.T + (0 if bq is None else bq)  # (B, L, E)
    k = key @ wk.T + (0 if bk is None else bk)  # (B, S, E)
    b, length, source = q.shape[0], q.shape[1], k.shape[1]
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.reshape(1, 1, e).expand(b, 1, e)], dim=1)
        source += 1
    q = q.view(b, length, h, e // h).transpose(1, 2)  # (B, H, L, Dh)
    k = k.view(b, source, h, e // h).transpose(1, 2)  # (B, H, S, Dh)
    scores = q @ k.transpose(-2, -1) / math.sqrt(e // h)  # (B, H, L, S)
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(b, h, length, -1)
        if mha.bias_k is not None and m.shape[-1] == source - 1:
            m = F.pad(m, (0, 1))
        scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m
    if key_padding_mask is not None:
        kpm = key_padding_mask
        if mha.bias_k is not None:
            kpm = F.pad(kpm, (0, 1))
        scores = scores.masked_fill(kpm[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def _record_inputs(module):
    seen = []
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True
    )
    return seen, handle


GRAD_MODES = {
    "train": (True, contextlib.nullcontext),
    "eval": (False, contextlib.nullcontext),
    "eval_no_grad": (False, torch.no_grad),
    "eval_inference_mode": (False, torch.inference_mode),
}


@pytest.mark.parametrize("mode", sorted(GRAD_MODES))
def test_transformer_encoder_with_padding_mask(mode, monkeypatch):
    """The fast paths are kept off by the hooker's function mode alone (per thread): the
    process-wide ``torch.backends.mha`` flag is never touched."""
    flag_calls = []
    real_set = torch.backends.mha.set_fastpath_enabled
    monkeypatch.setattr(torch.backends.mha, "set_fastpath_enabled", lambda value: flag_calls.append(value) or real_set(value))
    training, context = GRAD_MODES[mode]
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).train(training)
    x = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 3:] = True
    inputs = [_record_inputs(model.layers[i].self_attn) for i in range(2)]
    with context():
        expected = model(x, src_key_padding_mask=pad)
        with TransformerAttentionHooker(model, r"self_attn$") as hooker:
            out = model(x, src_key_padding_mask=pad)
    assert flag_calls == [], "the process-wide fast-path flag was switched"
    for _, handle in inputs:
        handle.remove()
    # Padded positions hold no meaning (the fast path writes zeros there); real ones match.
    torch.testing.assert_close(out[~pad], expected[~pad], atol=1e-5, rtol=1e-5)
    for i in range(2):
        (captured,) = hooker.values[f"layers.{i}.self_attn"]
        assert captured.shape == (3, 4, 7, 7)
        args, kwargs = inputs[i][0][-1]
        q = args[0]
        with torch.no_grad():
            oracle = manual_mha_weights(model.layers[i].self_attn, q, q, key_padding_mask=pad)
        torch.testing.assert_close(captured, oracle, atol=1e-5, rtol=1e-5)
        assert (captured.masked_select(pad[:, None, None, :].expand_as(captured)) == 0).all()
        torch.testing.assert_close(captured.sum(-1), torch.ones(3, 4, 7))


def test_fast_path_is_really_skipped_in_eval_no_grad(monkeypatch):
    """Without the hooker, eval + no_grad takes torch's fused kernel and skips self_attn."""
    fused = []
    real_kernel = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a, **k: fused.append(1) or real_kernel(*a, **k))
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = layer(x)
        assert fused == [1], "expected torch's fused fast path without the hooker"
        with TransformerAttentionHooker(layer) as hooker:
            out = layer(x)
        assert fused == [1], "the fused path must be skipped while capturing"
        layer(x)
    assert fused == [1, 1], "the fast path must come back after capture"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert hooker.values["self_attn"][0].shape == (2, 2, 5, 5)


def _bare_cases():
    torch.manual_seed(0)
    return {
        "batch_first": (nn.MultiheadAttention(16, 4, batch_first=True), (2, 5, 16), (2, 6, 16)),
        "seq_first": (nn.MultiheadAttention(16, 4), (5, 2, 16), (6, 2, 16)),
        "kdim_vdim": (nn.MultiheadAttention(16, 4, kdim=8, vdim=12, batch_first=True), (2, 5, 16), (2, 6, 8)),
        "bias_kv": (nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True), (2, 5, 16), (2, 6, 16)),
        "unbatched": (nn.MultiheadAttention(16, 4), (5, 16), (6, 16)),
    }


@pytest.mark.parametrize("case", sorted(_bare_cases()))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "key_padding"])
def test_bare_mha_matches_hand_computation(case, mask_kind):
    mha, q_shape, k_shape = _bare_cases()[case]
    mha.eval()
    query, key = torch.randn(q_shape), torch.randn(k_shape)
    value = torch.randn(k_shape[:-1] + (mha.vdim,))
    length, source = (q_shape[0], k_shape[0]) if len(q_shape) == 2 or not mha.batch_first and len(q_shape) == 3 else (q_shape[1], k_shape[1])
    if len(q_shape) == 3 and not mha.batch_first:
        length, source = q_shape[0], k_shape[0]
    kwargs = {}
    if mask_kind == "bool":
        kwargs["attn_mask"] = torch.rand(length, source) > 0.6
        kwargs["attn_mask"][:, 0] = False
    elif mask_kind == "float":
        kwargs["attn_mask"] = torch.randn(length, source)
    elif mask_kind == "key_padding":
        unbatched = len(q_shape) == 2
        kpm = torch.zeros(1 if unbatched else 2, source, dtype=torch.bool)
        kpm[-1, -2:] = True
        kwargs["key_padding_mask"] = kpm[0] if unbatched else kpm
    expected_out, expected_avg = mha(query, key, value, **kwargs)
    with TransformerAttentionHooker(mha) as hooker:
        out, avg = mha(query, key, value, **kwargs)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(avg, expected_avg, atol=1e-6, rtol=1e-5)  # the caller asked for the average
    (captured,) = hooker.values[""]
    kpm = kwargs.get("key_padding_mask")
    if kpm is not None and kpm.dim() == 1:
        kpm = kpm.unsqueeze(0)
    oracle = manual_mha_weights(mha, query, key, kwargs.get("attn_mask"), kpm)
    assert captured.shape == oracle.shape
    torch.testing.assert_close(captured, oracle, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: m(x, x, x, None, False),  # positional need_weights=False
        lambda m, x: m(x, x, x, need_weights=False),
        lambda m, x: m(x, x, x, None, True, None, False),  # positional average_attn_weights=False
        lambda m, x: m(x, x, x),
    ],
    ids=["positional_false", "keyword_false", "positional_per_head", "defaults"],
)
def test_caller_gets_back_exactly_what_it_asked_for(call):
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    expected_out, expected_w = call(mha, x)
    with TransformerAttentionHooker(mha) as hooker:
        out, w = call(mha, x)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-5)
    if expected_w is None:
        assert w is None
    else:
        assert w.shape == expected_w.shape
        torch.testing.assert_close(w, expected_w)
    assert hooker.values[""][0].shape == (2, 4, 5, 5)


def test_decoder_self_and_rectangular_cross_attention():
    model = nn.Transformer(
        d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64, dropout=0.0, batch_first=True
    ).eval()
    src, tgt = torch.randn(2, 9, 32), torch.randn(2, 4, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    cross_inputs = _record_inputs(model.decoder.layers[1].multihead_attn)
    expected = model(src, tgt, tgt_mask=causal, tgt_is_causal=True)
    with TransformerAttentionHooker(model) as hooker:
        out = model(src, tgt, tgt_mask=causal, tgt_is_causal=True)
    cross_inputs[1].remove()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert list(hooker.values) == [
        "encoder.layers.0.self_attn",
        "decoder.layers.0.self_attn",
        "decoder.layers.0.multihead_attn",
        "decoder.layers.1.self_attn",
        "decoder.layers.1.multihead_attn",
    ]
    self_w = hooker.values["decoder.layers.0.self_attn"][0]
    assert self_w.shape == (2, 4, 4, 4)
    assert (self_w.triu(1) == 0).all(), "the causal mask must show"
    cross_w = hooker.values["decoder.layers.1.multihead_attn"][0]
    assert cross_w.shape == (2, 4, 4, 9)
    args, _ = cross_inputs[0][-1]
    oracle = manual_mha_weights(model.decoder.layers[1].multihead_attn, args[0], args[1])
    torch.testing.assert_close(cross_w, oracle, atol=1e-5, rtol=1e-5)


def test_transformer_decoder_alone():
    layer = nn.TransformerDecoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=False)
    model = nn.TransformerDecoder(layer, num_layers=2).eval()
    tgt, memory = torch.randn(3, 2, 16), torch.randn(5, 2, 16)  # sequence first
    with TransformerAttentionHooker(model, r"multihead_attn$") as hooker:
        model(tgt, memory)
    assert {k: v[0].shape for k, v in hooker.values.items()} == {
        "layers.0.multihead_attn": (2, 2, 3, 5),
        "layers.1.multihead_attn": (2, 2, 3, 5),
    }


class _Looped(nn.Module):
    """One attention layer applied three times (weight sharing / recurrence)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.alias = self.attn  # the same module under a second name

    def forward(self, x):
        for _ in range(3):
            x = x + self.attn(x, x, x, need_weights=False)[0]
        return x


def test_layer_called_in_a_loop_keeps_every_call_in_order():
    model = _Looped().eval()
    x = torch.randn(1, 4, 16)
    inputs = _record_inputs(model.attn)
    with TransformerAttentionHooker(model) as hooker:
        model(x)
    inputs[1].remove()
    assert list(hooker.values) == ["attn"], "a module registered twice is one module"
    calls = hooker.values["attn"]
    assert len(calls) == 3
    for (args, _), captured in zip(inputs[0], calls):
        torch.testing.assert_close(captured, manual_mha_weights(model.attn, args[0], args[0]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(calls[0], calls[2])


def test_training_with_dropout_records_what_the_module_used_and_gradients_match():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True), 2
    ).train()
    x = torch.randn(2, 5, 16)
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with TransformerAttentionHooker(model) as hooker:
        model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-5, rtol=1e-4)
    assert not hooker.values["layers.0.self_attn"][0].requires_grad


def test_training_with_dropout_records_weights_before_dropout_as_every_route_does():
    """In training with dropout the module returns its weights after dropout (zeros, and
    rows scaled by 1/(1-p)); the sdpa and softmax routes record them before dropout, so
    this route does too: the probabilities of the call, rows summing to one."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.5, batch_first=True)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    layer.train()
    with TransformerAttentionHooker(layer) as hooker:
        out = layer(x, src_key_padding_mask=mask)
        out.sum().backward()
    weights = hooker.values["self_attn"][0]  # (2, 2, 5, 5)
    expected = manual_mha_weights(layer.self_attn, x, x, key_padding_mask=mask)
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 5))
    assert len(hooker.values["self_attn"]) == 1


def test_training_with_dropout_returns_the_caller_what_it_asked_for():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True).train()
    x = torch.randn(2, 5, 16)
    with TransformerAttentionHooker(mha) as hooker:
        torch.manual_seed(3)
        out, averaged = mha(x, x, x)
    torch.manual_seed(3)
    plain_out, plain_averaged = mha(x, x, x)
    torch.testing.assert_close(out, plain_out)
    torch.testing.assert_close(averaged, plain_averaged)
    torch.testing.assert_close(hooker.values[""][0].sum(-1), torch.ones(2, 2, 5))


def test_training_with_dropout_keep_grad_gives_the_gradient_with_respect_to_weights_before_dropout():
    """The weights after dropout are ``mask * w / (1 - p)``; the gradient with respect to
    ``w`` is the one reaching them times ``mask / (1 - p)``."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True).train()
    x = torch.randn(2, 5, 16)
    torch.manual_seed(3)
    out, dropped = mha(x, x, x, average_attn_weights=False)  # (2, 2, 5, 5) after dropout
    used = dropped._base  # (2 * 2, 5, 5): what multiplied the values
    used.retain_grad()
    out.square().sum().backward()
    before = manual_mha_weights(mha, x, x)
    expected = used.grad.view(2, 2, 5, 5) * torch.where(before > 0, dropped.detach() / before, torch.zeros_like(before))
    mha.zero_grad()
    with TransformerAttentionHooker(mha, keep_grad=True) as hooker:
        torch.manual_seed(3)
        out2, _ = mha(x, x, x, need_weights=False)
        out2.square().sum().backward()
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(hooker.values[""][0], before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooker.gradients[""][0], expected, atol=1e-5, rtol=1e-4)
