"""JetMoE's mixture of attention heads (transformers ``JetMoeAttention``): each token's router picks
``top_k`` query experts, keys and values are shared, and the layer makes one attention call whose
heads are the slots: head ``j * kv_heads + h`` is token-by-token the ``j``-th chosen expert's query
head ``h`` (capture/mixture_heads.py). Checked against

- a hand computation from each layer's own weights (the router's top-k, the chosen experts' query
  projections, the rotary embedding the layer is given, the shared key projection, causal and
  padding mask built here);
- transformers' own eager ``output_attentions`` (forward and every ``generate`` step);
- invariants: the model's outputs unchanged by the capture; the map times the shared values equal to
  the layer's attention output before the experts' output projection (the input of
  ``experts.reduce``), slot by slot.

The head count comes from the sizes the forward uses (``top_k * num_key_value_heads``), not from
``num_attention_heads``, which the forward never reads and a loaded configuration may hold stale.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import TransformerAttentionHooker  # noqa: E402
from attention_hooker.capture.heads import declared_heads  # noqa: E402

LENGTH = 7


def _config(top_k=2, experts=4, kv_heads=2, **extra):
    return transformers.JetMoeConfig(vocab_size=100, hidden_size=32, kv_channels=8, intermediate_size=64,
                                     num_hidden_layers=2, num_key_value_heads=kv_heads, num_local_experts=experts,
                                     num_experts_per_tok=top_k, max_position_embeddings=64, pad_token_id=0, **extra)


def _model(attn, config=None, causal_lm=False):
    config = copy.deepcopy(config if config is not None else _config())
    config._attn_implementation = attn
    torch.manual_seed(0)
    kind = transformers.JetMoeForCausalLM if causal_lm else transformers.JetMoeModel
    return kind(config).eval()


def _inputs(left_padding=False):
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, LENGTH))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    if left_padding:
        mask[0, :2] = 0
    else:
        mask[1, -2:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _layers(model):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == "JetMoeAttention"]


def _calls(model, inputs):
    """Each layer's call seen without the library: (hidden (B, T, C), (cos, sin), input of experts.reduce
    (B, T, top_k, kv_heads * d)), and the model's output."""
    seen, handles, patched = {}, [], []
    for name, module in _layers(model):
        def pre(mod, args, kwargs, name=name):
            seen[name] = {"hidden": kwargs["hidden_states"], "rope": kwargs["position_embeddings"]}

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        original = module.experts.reduce

        def reduce(layer_input, topo_info, name=name, original=original):
            seen[name]["before_output_projection"] = layer_input
            return original(layer_input, topo_info)

        module.experts.reduce = reduce  # an instance attribute, deleted below: the class stays as it was
        patched.append(module.experts)
    try:
        with torch.no_grad():
            output = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        for experts in patched:
            del experts.reduce
    return seen, output


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _hand_map(module, hidden, rope, mask):
    """softmax(q_slot kᵀ / sqrt(d) + causal/padding mask) from the layer's weights, (B, top_k * H, T, T),
    head j * H + h being each token's j-th chosen expert (router logits' top-k order), query head h."""
    B, T, C = hidden.shape
    k_top, H, d = module.top_k, module.num_key_value_heads, module.head_dim
    with torch.no_grad():
        logits = hidden.reshape(-1, C) @ module.experts.router.layer.weight.T  # (B*T, experts)
        chosen = logits.float().topk(k_top, dim=1).indices.view(B, T, k_top)
        weight = module.experts.input_linear.weight  # (experts, H*d, C)
        q = torch.einsum("btjoc,btc->btjo", weight[chosen], hidden)  # (B, T, k, H*d)
        q = q.reshape(B, T, k_top, H, d).permute(0, 2, 3, 1, 4).reshape(B, k_top * H, T, d)  # (B, kH, T, d)
        keys = (hidden @ module.kv_proj.weight.T)[..., : H * d].view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        cos, sin = (r[:, None] for r in rope)
        q, keys = _rotate(q, cos, sin), _rotate(keys, cos, sin)
        keys = keys.repeat(1, k_top, 1, 1)  # slot j's head h reads key head h
        scores = q @ keys.transpose(-1, -2) / math.sqrt(d)  # (B, kH, T, T)
        allowed = torch.ones(T, T).tril().bool()[None] & mask.bool()[:, None, :]  # (B, T, T)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        return scores.softmax(-1), chosen


def _values(module, hidden):
    """The shared values, repeated for the slots as the layer does: (B, top_k * H, T, d)."""
    B, T, _ = hidden.shape
    H, d = module.num_key_value_heads, module.head_dim
    with torch.no_grad():
        values = (hidden @ module.kv_proj.weight.T)[..., H * d:].view(B, T, H, d).transpose(1, 2)
    return values.repeat(1, module.top_k, 1, 1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_jetmoe_slots_are_heads_and_equal_a_hand_computation_from_the_weights(attn):
    model, inputs = _model(attn), _inputs()
    seen, plain = _calls(model, inputs)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        captured = model(**inputs)
    torch.testing.assert_close(captured.last_hidden_state, plain.last_hidden_state, atol=0, rtol=0)
    assert hooker.report().missing == []
    layers = dict(_layers(model))
    assert list(hooker.values) == list(layers)
    routed_apart = 0
    for name, module in layers.items():
        (got,) = hooker.values[name]
        assert got.shape == (2, 2 * 2, LENGTH, LENGTH)  # (B, top_k * kv_heads, T, T)
        expected, chosen = _hand_map(module, seen[name]["hidden"], seen[name]["rope"], inputs["attention_mask"])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, LENGTH), atol=1e-6, rtol=0)
        routed_apart += int((chosen[..., 0] != chosen[0, 0, 0]).any())  # tokens chose different first experts
    assert routed_apart  # the slots are per token, not one expert for all


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_jetmoe_map_times_the_shared_values_is_each_slots_output_before_the_expert_projection(attn):
    model, inputs = _model(attn), _inputs()
    seen, _ = _calls(model, inputs)
    with torch.no_grad(), TransformerAttentionHooker(model, keep_values=True) as hooker:
        model(**inputs)
    for name, module in _layers(model):
        (got,) = hooker.values[name]
        values = _values(module, seen[name]["hidden"])
        (kept,) = hooker.value_vectors[name]  # the call's own values, (B, k * H, T, d)
        torch.testing.assert_close(kept, values, atol=1e-6, rtol=1e-5)
        product = (got @ values).transpose(1, 2).reshape(2, LENGTH, module.top_k, -1)  # (B, T, k, H*d)
        torch.testing.assert_close(product, seen[name]["before_output_projection"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_jetmoe_capture_equals_transformers_eager_output_attentions(attn):
    eager, inputs = _model("eager"), _inputs()
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True).attentions  # (layers) x (B, top_k * H, T, T)
    model = _model(attn)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(**inputs)
    assert [tuple(r.shape) for r in reference] == [(2, 4, LENGTH, LENGTH)] * 2
    for (_, (got,)), expected in zip(hooker.values.items(), reference):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_jetmoe_with_a_stale_num_attention_heads_is_captured_by_the_heads_its_forward_computes():
    """A configuration loaded with ``num_attention_heads`` not equal to ``kv_heads * top_k`` keeps it
    (``from_dict``); the layer's ``num_heads`` says 4 while its call has 2 heads. Read from
    ``num_heads``, the call was refused as "not the layer's 4 heads"."""
    config = transformers.JetMoeConfig.from_dict(dict(
        vocab_size=100, hidden_size=32, kv_channels=8, intermediate_size=64, num_hidden_layers=2,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=0))
    assert config.num_attention_heads == 4  # stale: the forward computes 2 * 1 heads
    for attn in ("eager", "sdpa"):
        model, inputs = _model(attn, config), _inputs()
        assert {m.num_heads for _, m in _layers(model)} == {4}
        assert {declared_heads(m) for _, m in _layers(model)} == {2}
        reference = _model("eager", config)
        with torch.no_grad():
            expected = reference(**inputs, output_attentions=True).attentions
            with TransformerAttentionHooker(model) as hooker:
                model(**inputs)
        assert hooker.report().missing == [], attn
        for (_, (got,)), want in zip(hooker.values.items(), expected):
            assert got.shape == (2, 2, LENGTH, LENGTH)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_jetmoe_generate_with_left_padding_is_captured_step_by_step():
    """Every decode step (cached keys repeated for the slots) equals the eager model's per-step
    output_attentions, on eager and sdpa."""
    eager = _model("eager", causal_lm=True)
    sdpa = _model("sdpa", causal_lm=True)
    inputs = _inputs(left_padding=True)
    kwargs = dict(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        steps = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True).attentions
    for implementation, model in (("eager", eager), ("sdpa", sdpa)):
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            model.generate(**kwargs)
        assert hooker.report().missing == [], implementation
        layers = list(hooker.values.values())
        assert [len(calls) for calls in layers] == [len(steps)] * len(steps[0]), implementation
        for step, expected_layers in enumerate(steps):
            real = torch.cat([inputs["attention_mask"], torch.ones(2, step, dtype=torch.long)], 1).bool()
            for calls, expected in zip(layers, expected_layers):
                got = calls[step]
                assert got.shape == expected.shape and got.shape[1] == 4, f"{implementation} step {step}"
                rows = real[:, -got.shape[2]:][:, None, :, None].expand_as(got)  # padded query rows left out
                torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=1e-4)


def test_jetmoe_slot_experts_are_the_models_router_logits_top_k_as_documented():
    """docs/capture.md: entry 2 i of ``router_logits`` is layer i's attention router, (B * T, experts),
    and its top-k indices give each token's expert per slot, the ones the captured slots used."""
    model, inputs = _model("eager", causal_lm=True), _inputs()
    seen, _ = _calls(model, inputs)
    with torch.no_grad():
        logits = model(**inputs, output_router_logits=True).router_logits
    for i, (name, module) in enumerate(_layers(model)):
        _, chosen = _hand_map(module, seen[name]["hidden"], seen[name]["rope"], inputs["attention_mask"])
        documented = logits[2 * i].topk(module.top_k, dim=1).indices.view(2, LENGTH, module.top_k)
        assert torch.equal(documented, chosen), name
