"""Issue 14: head importance (Michel et al. 2019) and value-weighted norms (Kobayashi et al. 2020).

Oracles: autograd through a gate on each head's output (Michel's definition itself), and the
real MiniLM's own modules (its value projection, its output projection, its attention output).
"""

from __future__ import annotations

import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker
from attention_hooker.attribution import head_importance, value_weighted_norms

HEADS, HEAD_DIM = 12, 32


def _sentences(tokenizer):
    return [tokenizer(text, return_tensors="pt") for text in
            ("The cat sat on the mat because it was tired.", "Attention is not explanation, they said.")]


def _loss(out):
    return out.last_hidden_state[:, 0].pow(2).sum() + out.last_hidden_state[:, -1].sum()


def test_head_importance_equals_the_gradient_of_a_gate_on_each_heads_output(minilm_sdpa, minilm_tokenizer):
    model = minilm_sdpa
    layers = model.encoder.layer
    for enc in _sentences(minilm_tokenizer):
        # The oracle: Michel's gate xi_h multiplying head h's part of each layer's attention output.
        gates = [torch.ones(HEADS, requires_grad=True) for _ in layers]

        def gate(index):
            def hook(module, args, output):
                context = output[0]
                shaped = context.view(*context.shape[:-1], HEADS, HEAD_DIM) * gates[index][:, None]
                return (shaped.view_as(context),) + tuple(output[1:])
            return hook

        handles = [layer.attention.self.register_forward_hook(gate(i)) for i, layer in enumerate(layers)]
        try:
            _loss(model(**enc)).backward()
        finally:
            for handle in handles:
                handle.remove()
        with TransformerAttentionHooker(model, keep_grad=True) as hooker:
            _loss(model(**enc)).backward()
        for (name, weights), grads, xi in zip(hooker.values.items(), hooker.gradients.values(), gates):
            got = head_importance(weights[0], grads[0])
            assert got.shape == (1, HEADS)
            torch.testing.assert_close(got[0], xi.grad.abs().double(), rtol=1e-4, atol=1e-6, msg=name)


def test_head_importance_refuses_a_gradient_of_another_shape():
    with pytest.raises(AttentionHookerError, match=r"grad is \(1, 2, 3, 3\), expected the weights' shape \(1, 2, 3, 4\)"):
        head_importance(torch.full((1, 2, 3, 4), 0.25), torch.zeros(1, 2, 3, 3))


def _minilm_layer_parts(model, enc, index):
    """Layer ``index``'s weights (our capture), its value vectors and attention output (the model's own)."""
    seen = {}
    attention = model.encoder.layer[index].attention
    def keep(name, pick=lambda o: o):
        def hook(module, args, output):
            seen[name] = pick(output)  # returns None: the output is left as it is
        return hook

    handles = [
        attention.self.value.register_forward_hook(keep("value")),
        attention.self.register_forward_hook(keep("context", lambda o: o[0])),
        attention.output.dense.register_forward_hook(keep("dense")),
    ]
    try:
        with torch.no_grad(), TransformerAttentionHooker(model, rf"layer\.{index}\.attention\.self$") as hooker:
            model(**enc)
    finally:
        for handle in handles:
            handle.remove()
    batch, tokens = enc["input_ids"].shape
    value = seen["value"].view(batch, tokens, HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, T, Dh)
    return next(iter(hooker.values.values()))[0], value, seen, attention.output.dense


def test_value_weighted_norms_of_the_real_minilm_against_its_own_modules(minilm_sdpa, minilm_tokenizer):
    enc = _sentences(minilm_tokenizer)[0]
    weights, value, seen, dense = _minilm_layer_parts(minilm_sdpa, enc, 2)
    norms = value_weighted_norms(weights, value, dense.weight)
    tokens = weights.shape[-1]
    assert norms.shape == (1, HEADS, tokens, tokens)
    # Oracle 1: each head's f_h(x_j) through the output projection, by masking the other heads' features.
    flat = value.transpose(1, 2).reshape(1, tokens, HEADS * HEAD_DIM)  # (B, T, H*Dh) as the layer lays it out
    with torch.no_grad():
        for h in (0, 5, 11):
            only = torch.zeros_like(flat)
            only[..., h * HEAD_DIM:(h + 1) * HEAD_DIM] = flat[..., h * HEAD_DIM:(h + 1) * HEAD_DIM]
            f = torch.nn.functional.linear(only, dense.weight)  # (B, T, D), no bias
            want = weights[:, h].double() * f.norm(dim=-1).double()[:, None, :]
            torch.testing.assert_close(norms[:, h], want, rtol=1e-5, atol=1e-7)
    # Oracle 2: the contributions add up to what the model computed: sum_j sum_h alpha f_h(x_j) + b_O.
    transformed = torch.einsum("bhkd,ehd->bhke", value.double(),
                               dense.weight.double().view(-1, HEADS, HEAD_DIM))  # (B, H, K, D)
    rebuilt = torch.einsum("bhqk,bhke->bqe", weights.double(), transformed) + dense.bias.double()
    torch.testing.assert_close(rebuilt.float(), seen["dense"], rtol=1e-4, atol=1e-4)
    summed = value_weighted_norms(weights, value, dense.weight, summed=True)
    explicit = torch.einsum("bhqk,bhke->bqke", weights.double(), transformed).norm(dim=-1)
    torch.testing.assert_close(summed, explicit, rtol=1e-6, atol=1e-9)


def test_value_weighted_norms_with_grouped_kv_heads_and_their_checks():
    torch.manual_seed(0)
    attn = torch.rand(2, 4, 3, 5).softmax(-1)
    value = torch.randn(2, 2, 5, 3)  # 2 kv heads, each serving 2 query heads
    weight = torch.randn(6, 12)
    got = value_weighted_norms(attn, value, weight)
    for h in range(4):
        f = value[:, h // 2] @ weight[:, 3 * h:3 * h + 3].T  # (B, K, D)
        torch.testing.assert_close(got[:, h], attn[:, h].double() * f.norm(dim=-1).double()[:, None])
    with pytest.raises(AttentionHookerError, match=r"value is \(2, 3, 5, 3\), expected \(batch, kv_heads, key"):
        value_weighted_norms(attn, torch.randn(2, 3, 5, 3), weight)
    with pytest.raises(AttentionHookerError, match=r"out_weight is \(12, 6\), expected \(model_dim, heads \* head_dim\)"):
        value_weighted_norms(attn, value, weight.T)
