"""DiffLlama's differential attention: the two attention computations of each layer call assembled into the
map that multiplies the values, ``D = P[:, :H/2] - λ P[:, H/2:]`` (capture/pieces.py, capture/differential.py),
checked against

- a hand computation from each layer's own weights (q, k from its projections with the rotary embedding the
  layer is given, the causal and padding mask built here, λ from its four ``lambda_*`` vectors);
- transformers' own ``output_attentions``, which is ``P`` (the first softmax), made into ``D`` here;
- invariants: the model's outputs unchanged by the capture, ``cat(D @ V_a, D @ V_b)`` equal to the input of
  the layer's ``groupnorm`` (its attention output before the norm), rows summing to ``1 - λ``.

``D`` is not probabilities (rows sum to ``1 - λ``, entries may be negative): analyses that need probabilities
refuse it.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionCaptureWarning, TransformerAttentionHooker  # noqa: E402

LENGTH = 7


def _model(attn, heads=4, kv_heads=2, causal_lm=False):
    torch.manual_seed(0)
    config = transformers.DiffLlamaConfig(vocab_size=100, hidden_size=8 * heads, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=heads,
                                          num_key_value_heads=kv_heads, max_position_embeddings=64,
                                          lambda_std_dev=0.5, pad_token_id=0)
    config._attn_implementation = attn
    kind = transformers.DiffLlamaForCausalLM if causal_lm else transformers.DiffLlamaModel
    return kind(config).eval()


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, LENGTH))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask)


def _layers(model):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == "DiffLlamaAttention"]


def _lambda(module):
    with torch.no_grad():
        return (torch.exp((module.lambda_q1 * module.lambda_k1).sum()) - torch.exp((module.lambda_q2 * module.lambda_k2)
                                                                                   .sum()) + module.lambda_init).item()


def _calls(model, inputs):
    """Each layer's call without the library: (hidden (B, T, C), (cos, sin), v_proj output, groupnorm input)."""
    seen, handles = {}, []
    for name, module in _layers(model):
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: seen.__setitem__(name, [args[0] if args else kwargs["hidden_states"],
                                                                       kwargs["position_embeddings"]]),
            with_kwargs=True))
        handles.append(module.v_proj.register_forward_hook(lambda m, args, out, name=name: seen[name].append(out)))
        handles.append(module.groupnorm.register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(args[0])))
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _hand(module, hidden, cos, sin, mask):
    """D (B, H/2, T, T) from the layer's weights, and the probabilities P (B, H, T, T) it is made of."""
    b, t, _ = hidden.shape
    d = module.head_dim
    heads = module.config.num_attention_heads
    kv = module.config.num_key_value_heads
    with torch.no_grad():
        q = module.q_proj(hidden).view(b, t, heads, d).transpose(1, 2)
        k = module.k_proj(hidden).view(b, t, kv, d).transpose(1, 2)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        k = k.repeat_interleave(heads // kv, dim=1)
        allowed = torch.ones(t, t).tril().bool()[None, None] & mask.bool()[:, None, None, :]
        scores = (q @ k.transpose(-1, -2)) * d ** -0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    lam = _lambda(module)
    return probs[:, :heads // 2] - lam * probs[:, heads // 2:], probs


def _values(module, v_out):
    """V_a, V_b (B, H/2, T, d) of each differential head j: KV heads (j // n_rep) mod (KV/2) and KV/2 + that."""
    b, t, _ = v_out.shape
    heads, kv = module.config.num_attention_heads, module.config.num_key_value_heads
    v = v_out.view(b, t, kv, module.head_dim).transpose(1, 2)
    group = torch.arange(heads // 2) // (heads // kv)
    return v[:, group % (kv // 2)], v[:, kv // 2 + group % (kv // 2)]


def _capture(model, inputs, **options):
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"self_attn$", **options) as hooker:
        out = model(**inputs)
    return hooker, out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (8, 2), (4, 4)])
def test_each_layer_stores_the_differential_map_that_multiplies_the_values(attn, heads, kv_heads):
    model, inputs = _model(attn, heads, kv_heads), _inputs()
    calls, plain = _calls(model, inputs)
    hooker, hooked = _capture(model, inputs)
    assert torch.equal(plain.last_hidden_state, hooked.last_hidden_state), "the capture changed the model's output"
    assert hooker.report().missing == []
    real = inputs["attention_mask"].bool()  # fully masked (left-padded) query rows carry no meaning
    for name, module in _layers(model):
        hidden, (cos, sin), v_out, norm_in = calls[name]
        (got,) = hooker.values[name]
        hand, _ = _hand(module, hidden, cos, sin, inputs["attention_mask"])
        assert got.shape == (2, heads // 2, LENGTH, LENGTH)
        torch.testing.assert_close(got[real[:, None, :, None].expand_as(got)],
                                   hand[real[:, None, :, None].expand_as(hand)], atol=1e-6, rtol=1e-5)
        lam = _lambda(module)
        torch.testing.assert_close(got.sum(-1)[real[:, None].expand(-1, heads // 2, -1)],
                                   torch.full((2 * heads // 2 * LENGTH - 2 * heads // 2,), 1 - lam), atol=2e-6, rtol=0)
        va, vb = _values(module, v_out)
        context = torch.cat([got @ va, got @ vb], dim=-1).transpose(1, 2)  # (B, T, H/2, 2d)
        torch.testing.assert_close(context[real], norm_in[real], atol=1e-6, rtol=1e-5)


def test_differential_map_equals_transformers_attentions_made_differential():
    """transformers' output_attentions is P, the first softmax: D made from it here with λ equals the capture."""
    model, inputs = _model("eager"), _inputs()
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True).attentions
    hooker, _ = _capture(model, inputs)
    real = inputs["attention_mask"].bool()[:, None, :, None]
    for (name, module), probs in zip(_layers(model), reference):
        (got,) = hooker.values[name]
        want = probs[:, :2] - _lambda(module) * probs[:, 2:]
        torch.testing.assert_close(got[real.expand_as(got)], want[real.expand_as(want)], atol=1e-6, rtol=1e-5)
        assert not torch.equal(got, probs[:, :2]), "the raw softmax is not what is stored"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_float32_weights_under_bfloat16_autocast_store_the_map_in_the_float32_query_dtype_with_lambda_unrounded(attn):
    """Under torch.autocast(bfloat16) with float32 weights, the projections are bfloat16 but the rotary
    embedding (float32 cos/sin) makes the query float32: the model computes λ and returns its softmax in float32.
    The stored map is float32 and equals transformers' float32 P made differential with the float32 λ (the old
    rule took autocast's dtype for the query's: stored bfloat16, λ rounded, 2e-3 off)."""
    model, inputs = _model(attn), _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = _model("eager")(**inputs, output_attentions=True).attentions
        hooker, _ = _capture(model, inputs)
    real = inputs["attention_mask"].bool()[:, None, :, None]
    for (name, module), probs in zip(_layers(model), reference):
        (got,) = hooker.values[name]
        assert probs.dtype == torch.float32 and got.dtype == torch.float32
        want = probs[:, :2] - _lambda(module) * probs[:, 2:]
        tolerance = dict(atol=1e-6, rtol=1e-5) if attn == "eager" else dict(atol=2e-2, rtol=0)  # sdpa: bf16 kernel
        torch.testing.assert_close(got[real.expand_as(got)], want[real.expand_as(want)], **tolerance)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_stores_each_steps_differential_map(attn):
    model, inputs = _model(attn, causal_lm=True), _inputs()
    reference_model = _model("eager", causal_lm=True)
    kwargs = dict(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = reference_model.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"self_attn$") as hooker:
        produced = model.generate(**kwargs)
    assert torch.equal(produced, reference.sequences)
    assert hooker.report().missing == []
    real = inputs["attention_mask"].bool()
    for number, (name, module) in enumerate(_layers(model)):
        calls = hooker.values[name]
        assert [tuple(c.shape) for c in calls] == [(2, 2, 7, 7), (2, 2, 1, 8), (2, 2, 1, 9)]
        lam = _lambda(module)
        for step, got in enumerate(calls):
            probs = reference.attentions[step][number]
            want = probs[:, :2] - lam * probs[:, 2:]
            rows = real if step == 0 else torch.ones(2, 1, dtype=torch.bool)
            keep = rows[:, None, :, None].expand_as(got)
            torch.testing.assert_close(got[keep], want[keep], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("selection", [dict(rows="last"), dict(heads=[1]), dict(keys=[0, 4, 6]),
                                       dict(rows=[6, 3], heads=[1, 0], keys=[3, 2])])
def test_selections_are_slices_of_the_whole_map(attn, selection):
    model, inputs = _model(attn), _inputs()
    whole, _ = _capture(model, inputs)
    picked, _ = _capture(model, inputs, **selection)
    rows = [LENGTH - 1] if selection.get("rows") == "last" else selection.get("rows")
    for name, (full,) in whole.values.items():
        want = full
        for dim, index in ((1, selection.get("heads")), (2, rows), (3, selection.get("keys"))):
            if index is not None:
                want = want.index_select(dim, torch.tensor(index))
        got = picked.values[name][0]
        if attn == "eager":
            assert torch.equal(got, want), name
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)  # sdpa: a smaller product, last-bit rounding


def test_keep_values_keeps_each_differential_heads_two_values_with_sdpa_and_refuses_eager():
    model, inputs = _model("sdpa"), _inputs()
    calls, _ = _calls(model, inputs)
    hooker, _ = _capture(model, inputs, keep_values=True)
    for name, module in _layers(model):
        va, vb = _values(module, calls[name][2])
        (kept,) = hooker.value_vectors[name]
        torch.testing.assert_close(kept, torch.cat([va, vb], dim=-1))  # (B, H/2, T, 2d)
    model = _model("eager")
    with pytest.warns(AttentionCaptureWarning, match="keep_values"):
        hooker, _ = _capture(model, inputs, keep_values=True)
    assert len(hooker.report().missing) == 2 and hooker.values == {}
    assert "sdpa" in hooker.report()["layers.0.self_attn"].reason


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_third_attention_computation_refuses_the_layer(attn):
    model, inputs = _model(attn), _inputs()
    (name, module), _ = _layers(model)
    real = module.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        q = torch.randn(2, 4, 3, 8)
        if attn == "eager":
            torch.softmax(torch.randn(2, 4, 3, 3), -1)
        else:
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return out

    module.forward = forward
    try:
        with pytest.warns(AttentionCaptureWarning, match="DiffLlama"):
            hooker, _ = _capture(model, inputs)
    finally:
        del module.forward
    assert hooker.report().missing == [name]
    assert "(2, 4, 3" in hooker.report()[name].reason


def test_two_computations_that_are_not_the_same_map_are_refused():
    from attention_hooker.capture.differential import differential_layer

    model = _model("eager")
    (_, module), _ = _layers(model)
    rule = differential_layer(module)
    call = rule.start(module, (torch.randn(2, LENGTH, 32),), {})
    first = torch.softmax(torch.randn(2, 4, LENGTH, LENGTH), -1)
    assert call.take_softmax(first) is None
    refusal = call.take_softmax(torch.softmax(torch.randn(2, 4, LENGTH, LENGTH), -1))
    assert "differs from the first" in refusal
    q, k = torch.randn(2, 4, LENGTH, 8), torch.randn(2, 2, LENGTH, 8)
    call = rule.start(module, (torch.randn(2, LENGTH, 32),), {})
    assert call.take_sdpa(dict(query=q, key=k, value=k, attn_mask=None, is_causal=True, scale=None)) is None
    assert "differ from the first" in call.take_sdpa(dict(query=q, key=k + 1, value=k, attn_mask=None, is_causal=True,
                                                          scale=None))
    assert "not two" in call.assemble(False)


def test_continuous_batching_is_refused_rather_than_stored_with_requests_mixed():
    """generate_batch packs requests into one call: stored as one map, two prompts (3 + 2 tokens) became
    one (1, 2, 5, 5) map with each prompt attending to the other's keys."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = _model("sdpa", causal_lm=True)
    config = GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.warns(AttentionCaptureWarning, match="continuous-batching"), \
            TransformerAttentionHooker(model, layer_regex=r"self_attn$") as hooker:
        model.generate_batch([[1, 2, 3], [4, 5]], generation_config=config, progress_bar=False,
                             continuous_batching_config=ContinuousBatchingConfig(num_blocks=16, page_size=16))
    report = hooker.report()
    assert len(report.missing) == 2 and all("mix requests" in report[name].reason for name in report.missing)
    assert hooker.values == {} and hooker.requests == {}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_calls_past_max_calls_start_compare_and_hold_nothing(attn, monkeypatch):
    """max_calls=1 over three forwards: only the first call of each layer is started and handed its two
    computations; later calls neither compare their two softmaxes (a full-map torch.equal, a device sync per call
    in a generate) nor hold them."""
    from attention_hooker.capture import differential

    started, taken = [], []
    start, take_softmax, take_sdpa = (differential.DifferentialLayer.start,
                                      differential._DifferentialCall.take_softmax,
                                      differential._DifferentialCall.take_sdpa)
    monkeypatch.setattr(differential.DifferentialLayer, "start", lambda *a: started.append(1) or start(*a))
    monkeypatch.setattr(differential._DifferentialCall, "take_softmax", lambda *a: taken.append(1) or take_softmax(*a))
    monkeypatch.setattr(differential._DifferentialCall, "take_sdpa", lambda *a: taken.append(1) or take_sdpa(*a))
    model, inputs = _model(attn), _inputs()
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        with TransformerAttentionHooker(model, layer_regex=r"self_attn$", max_calls=1) as hooker:
            outs = [model(**inputs).last_hidden_state for _ in range(3)]
    assert all(torch.equal(out, plain) for out in outs)
    assert len(started) == 2 and len(taken) == 2 * 2, (len(started), len(taken))  # 2 layers, 2 computations, 1 call
    assert [len(maps) for maps in hooker.values.values()] == [1, 1]
    assert hooker.report().missing == []
