"""Issue 27, part 1: interventions on heads, on every route, each against an oracle this library
did not compute: torch's own forward pre-hook on the output projection (zeroing or replacing a
head's slice of its input), or the layer computed by hand from its weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attention_hooker import (AttentionHookerError, HeadIntervention, InterventionError, TransformerAttentionHooker,
                              block_keys, record_heads, top_k_keys, uniform_weights)
from tiny_models import Stack

HF_LAYER, HF_PROJ = "encoder.layer.2.attention.self", "encoder.layer.2.attention.output.dense"


def _projection_input(model, projection: str, run):
    """(output of ``run()``, the merged heads ``(..., heads * head_dim)`` reaching ``projection``), read by a
    forward pre-hook of torch's."""
    seen = []
    handle = model.get_submodule(projection).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        out = run()
    finally:
        handle.remove()
    return out, seen[0]


def _with_slice(model, projection: str, head: int, head_dim: int, run, value=0.0):
    """``run()`` with head ``head``'s slice of ``projection``'s input set to ``value`` (a number, or a
    function of the slice): the oracle, torch's own pre-hook."""
    def hook(module, args):
        merged = args[0].clone()
        part = merged[..., head * head_dim:(head + 1) * head_dim]
        merged[..., head * head_dim:(head + 1) * head_dim] = value(part) if callable(value) else value
        return (merged,)

    handle = model.get_submodule(projection).register_forward_pre_hook(hook)
    try:
        return run()
    finally:
        handle.remove()


def _hooks_on(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=3, num_classes=10).eval()


# ---------------------------------------------------------------- knock-out, every route
@pytest.mark.parametrize("route", ["sdpa", "eager"])
def test_knocking_out_a_minilm_head_is_zeroing_its_slice_and_leaves_the_others_bitwise(route, minilm_sdpa, minilm_eager,
                                                                                       minilm_batch):
    model = minilm_sdpa if route == "sdpa" else minilm_eager
    head, head_dim = 5, 32
    with torch.no_grad():
        plain, merged = _projection_input(model, HF_PROJ, lambda: model(**minilm_batch).last_hidden_state)
        oracle = _with_slice(model, HF_PROJ, head, head_dim, lambda: model(**minilm_batch).last_hidden_state)
        with HeadIntervention(model).knock_out(HF_LAYER, heads=head) as iv:
            knocked, knocked_merged = _projection_input(model, HF_PROJ, lambda: model(**minilm_batch).last_hidden_state)
    assert iv.calls == {HF_LAYER: 1}
    torch.testing.assert_close(knocked, oracle, rtol=0, atol=1e-6)
    assert (knocked - plain).abs().max() > 1e-3  # the head mattered
    untouched = [h for h in range(12) if h != head]
    for h in untouched:  # bitwise the kernel's
        assert torch.equal(knocked_merged[..., h * head_dim:(h + 1) * head_dim], merged[..., h * head_dim:(h + 1) * head_dim])
    assert not knocked_merged[..., head * head_dim:(head + 1) * head_dim].any()


def test_knocking_out_a_timm_fused_head_is_zeroing_its_slice():
    vit = _timm_vit()
    assert all(block.attn.fused_attn for block in vit.blocks)  # the sdpa route
    x, head, head_dim, proj = torch.randn(2, 3, 32, 32), 1, 16, "blocks.1.attn.proj"
    with torch.no_grad():
        plain, merged = _projection_input(vit, proj, lambda: vit(x))
        oracle = _with_slice(vit, proj, head, head_dim, lambda: vit(x))
        with HeadIntervention(vit).knock_out("blocks.1.attn", heads=[head]):
            knocked, knocked_merged = _projection_input(vit, proj, lambda: vit(x))
    torch.testing.assert_close(knocked, oracle, rtol=0, atol=1e-6)
    assert not torch.allclose(knocked, plain)
    for h in (0, 2):
        assert torch.equal(knocked_merged[..., h * head_dim:(h + 1) * head_dim], merged[..., h * head_dim:(h + 1) * head_dim])


def _mha_by_hand(mha: nn.MultiheadAttention, x: torch.Tensor, *, zero=(), uniform=()):
    """nn.MultiheadAttention (batch_first, self-attention, no mask) from its weights, with heads
    ``zero`` given output 0 and heads ``uniform`` given equal weights on every key."""
    b, t, e = x.shape
    h = mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    q, k, v = (z.view(b, t, h, e // h).transpose(1, 2) for z in (q, k, v))  # (B, H, T, Dh)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // h), -1)  # (B, H, T, T)
    for head in uniform:
        weights[:, head] = 1.0 / t
    heads = weights @ v  # (B, H, T, Dh)
    for head in zero:
        heads[:, head] = 0
    return F.linear(heads.transpose(1, 2).reshape(b, t, e), mha.out_proj.weight, mha.out_proj.bias)


def test_knocking_out_a_multihead_attention_head_equals_the_hand_computation():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        with HeadIntervention(mha).knock_out("", heads=[2]):
            out, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(out, _mha_by_hand(mha, x, zero=[2]), rtol=0, atol=1e-6)
        assert not torch.allclose(out, mha(x, x, x)[0], atol=1e-4)
        # The weights the caller asked for are the module's own.
        assert torch.equal(weights, mha(x, x, x, need_weights=True, average_attn_weights=False)[1])
        with HeadIntervention(mha).replace_weights("", 1, uniform_weights()):
            uniform, returned = mha(x, x, x)  # the caller's request (averaged weights) is kept
        torch.testing.assert_close(uniform, _mha_by_hand(mha, x, uniform=[1]), rtol=0, atol=1e-6)
        assert returned.shape == (2, 6, 6)


def test_knocking_out_a_head_of_an_encoder_layer_equals_the_hand_computation():
    """nn.TransformerEncoderLayer in eval would take its fused fast path: kept off inside the context."""
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        with HeadIntervention(layer).knock_out("self_attn", heads=[0, 3]):
            out = layer(x)
        h = layer.norm1(x + _mha_by_hand(layer.self_attn, x, zero=[0, 3]))
        by_hand = layer.norm2(h + layer.linear2(F.relu(layer.linear1(h))))
    torch.testing.assert_close(out, by_hand, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------- replacing maps
@pytest.mark.parametrize("route", ["sdpa", "eager"])
def test_a_minilm_head_given_its_own_map_computes_what_it_computed(route, minilm_sdpa, minilm_eager, minilm_batch):
    model = minilm_sdpa if route == "sdpa" else minilm_eager
    with torch.no_grad():
        plain = model(**minilm_batch).last_hidden_state
        with HeadIntervention(model).replace_weights(HF_LAYER, None, lambda own: own):
            same = model(**minilm_batch).last_hidden_state
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_softmax", [False, True], ids=["sdpa", "eager"])
def test_a_uniform_map_equals_the_hand_computation(use_softmax):
    """Head 2 of a tiny block, uniform over its keys: its output is its values' mean."""
    model = Stack(2, use_softmax=use_softmax).eval()
    x = torch.randn(2, 5, 16)
    block, head, head_dim = model.blocks[1], 2, 4
    inputs = []
    stash = block.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    try:
        def values_mean(part):
            b, t, _ = inputs[-1].shape
            v = block.qkv(inputs[-1]).view(b, t, 3, 4, head_dim)[:, :, 2, head]  # (B, T, Dh)
            return v.mean(1, keepdim=True).expand(b, t, head_dim)

        with torch.no_grad():
            oracle = _with_slice(model, "blocks.1.out", head, head_dim, lambda: model(x), value=values_mean)
    finally:
        stash.remove()
    with torch.no_grad(), HeadIntervention(model).replace_weights("blocks.1", head, uniform_weights()):
        got = model(x)
    torch.testing.assert_close(got, oracle, rtol=0, atol=1e-6)
    with torch.no_grad(), HeadIntervention(model).replace_weights("blocks.1", head, torch.full((5, 5), 0.2)):
        given = model(x)  # the same map given as a tensor (query, key)
    torch.testing.assert_close(given, oracle, rtol=0, atol=1e-6)


def test_the_map_functions_keep_block_and_spread_as_they_say():
    w = torch.tensor([[[0.1, 0.6, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    torch.testing.assert_close(top_k_keys(2)(w)[0, 0], torch.tensor([0.0, 2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(block_keys([1])(w)[0, 0], torch.tensor([0.25, 0.0, 0.75, 0.0]))
    torch.testing.assert_close(uniform_weights()(w)[0, 0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(block_keys([0, 1, 2, 3])(w), torch.zeros_like(w))


# ----------------------------------------------------------------------------- scaling
@pytest.mark.parametrize("use_softmax", [False, True], ids=["sdpa", "eager"])
def test_a_gate_of_one_changes_nothing_a_gate_of_zero_knocks_out_and_gradients_reach_the_gates(use_softmax):
    model = Stack(2, use_softmax=use_softmax).eval()
    x = torch.randn(2, 5, 16)
    plain = model(x)
    with HeadIntervention(model).scale("blocks.0", torch.ones(4)):
        assert torch.equal(model(x), plain)
    with torch.no_grad():
        with HeadIntervention(model).scale("blocks.0", torch.tensor([1.0, 0.0, 1.0, 1.0])):
            gated = model(x)
        with HeadIntervention(model).knock_out("blocks.0", heads=1):
            knocked = model(x)
    assert torch.equal(gated, knocked)
    gates = torch.ones(4, requires_grad=True)
    with HeadIntervention(model).scale("blocks.0", gates):
        model(x).square().sum().backward()
    assert gates.grad is not None and gates.grad.abs().min() > 0
    # The gradient is the loss's slope in each gate (a central difference, in float64).
    model64, x64 = model.double(), x.double()
    for head in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[head] = 1e-4
        with torch.no_grad():
            with HeadIntervention(model64).scale("blocks.0", 1 + step):
                up = model64(x64).square().sum()
            with HeadIntervention(model64).scale("blocks.0", 1 - step):
                down = model64(x64).square().sum()
        assert abs((up - down).item() / 2e-4 - gates.grad[head].item()) < 1e-3 * max(1.0, abs(gates.grad[head].item()))


def test_gates_on_a_timm_vit_and_an_encoder_layer():
    vit = _timm_vit()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = vit(x)
        with HeadIntervention(vit).scale("blocks.0.attn", torch.ones(3)):
            assert torch.equal(vit(x), plain)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True).eval()
    y = torch.randn(2, 6, 16)
    mha = layer.self_attn
    with torch.no_grad():
        asked = mha(y, y, y, need_weights=True, average_attn_weights=False)
        with HeadIntervention(layer).scale("self_attn", torch.ones(4)):
            gated = mha(y, y, y, need_weights=True, average_attn_weights=False)
    # nn.MultiheadAttention under intervention is computed by its own per-head path: bitwise that path.
    assert torch.equal(gated[0], asked[0]) and torch.equal(gated[1], asked[1])


# ----------------------------------------------------------------------------- patching
def test_patching_every_head_from_a_clean_run_gives_the_clean_layer_output(minilm_sdpa, minilm_tokenizer):
    clean = minilm_tokenizer(["When Mary and John went to the store, John gave a drink to"], return_tensors="pt")
    corrupt = minilm_tokenizer(["When Mary and John went to the store, Anne gave a drink to"], return_tensors="pt")
    assert clean["input_ids"].shape == corrupt["input_ids"].shape
    outputs = []
    grab = minilm_sdpa.get_submodule(HF_LAYER).register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    try:
        with torch.no_grad():
            with record_heads(minilm_sdpa, [HF_LAYER], weights=True) as recording:
                minilm_sdpa(**clean)
            minilm_sdpa(**corrupt)
            with HeadIntervention(minilm_sdpa).patch(HF_LAYER, recording):
                minilm_sdpa(**corrupt)
    finally:
        grab.remove()
    clean_out, corrupt_out, patched_out = outputs
    assert (corrupt_out - clean_out).abs().max() > 1e-2
    torch.testing.assert_close(patched_out, clean_out, rtol=0, atol=1e-6)
    assert recording.outputs[HF_LAYER][0].shape == (1, 12, clean["input_ids"].shape[1], 32)
    assert recording.weights[HF_LAYER][0].shape[1:] == (12,) + (clean["input_ids"].shape[1],) * 2

    longer = minilm_tokenizer(["When Mary and John went to the big store, Anne gave a drink to"], return_tensors="pt")
    with pytest.raises(InterventionError, match=r"same batch and length"):
        with HeadIntervention(minilm_sdpa).patch(HF_LAYER, recording), torch.no_grad():
            minilm_sdpa(**longer)
    with pytest.raises(InterventionError, match=r"same batch and length"):
        with HeadIntervention(minilm_sdpa).patch(HF_LAYER, recording, heads=[3], what="weights"), torch.no_grad():
            minilm_sdpa(**longer)
    assert _hooks_on(minilm_sdpa) == 0


def test_patching_weights_is_replacing_by_the_recorded_map():
    model = Stack(2, use_softmax=True).eval()
    clean, corrupt = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        with record_heads(model, weights=True) as recording:
            model(clean)
        with TransformerAttentionHooker(model) as hooker:  # an oracle for the weights: the capture
            model(clean)
        torch.testing.assert_close(recording.weights["blocks.1"][0], hooker.values["blocks.1"][0], rtol=0, atol=0)
        with HeadIntervention(model).patch("blocks.1", recording, heads=[1, 3], what="weights"):
            patched = model(corrupt)
        with HeadIntervention(model).replace_weights("blocks.1", [1], hooker.values["blocks.1"][0][:, 1]) \
                .replace_weights("blocks.1", [3], hooker.values["blocks.1"][0][:, 3]):
            replaced = model(corrupt)
    assert torch.equal(patched, replaced)


def test_mean_knock_out_writes_each_heads_mean_over_the_reference():
    model = Stack(2).eval()
    reference, x, head = torch.randn(3, 7, 16), torch.randn(2, 5, 16), 0
    with torch.no_grad():
        _, merged = _projection_input(model, "blocks.0.out", lambda: model(reference))
        mean = merged[..., head * 4:(head + 1) * 4].reshape(-1, 4).mean(0)  # over items and positions
        oracle = _with_slice(model, "blocks.0.out", head, 4, lambda: model(x), value=lambda part: mean.expand_as(part))
        with record_heads(model, ["blocks.0"]) as recorded:
            model(reference)
        with HeadIntervention(model).knock_out("blocks.0", heads=head, mode="mean", reference=recorded):
            got = model(x)
    torch.testing.assert_close(got, oracle, rtol=0, atol=1e-6)


# ------------------------------------------------------------------- leaving nothing behind
def test_outside_the_context_the_model_is_as_before_and_a_hooker_composes_in_either_order():
    model = Stack(2, use_softmax=True).eval()
    x = torch.randn(2, 5, 16)
    plain = model(x)
    with TransformerAttentionHooker(model) as alone:
        model(x)
    with HeadIntervention(model).replace_weights("blocks.0", 1, uniform_weights()):
        intervened = model(x)
    assert torch.equal(model(x), plain) and _hooks_on(model) == 0
    assert torch.overrides._get_current_function_mode_stack() == []
    captured = []
    for order in ("intervention first", "hooker first"):
        iv = HeadIntervention(model).replace_weights("blocks.0", 1, uniform_weights())
        hooker = TransformerAttentionHooker(model)
        first, second = (iv, hooker) if order == "intervention first" else (hooker, iv)
        with first, second:
            got = model(x)
        assert torch.equal(got, intervened), order
        # The hooker records the weights the model computed, not the replacement (blocks.1's input
        # changed with blocks.0's head: its weights are the same in both orders).
        assert torch.equal(hooker.values["blocks.0"][0], alone.values["blocks.0"][0]), order
        captured.append(hooker.values["blocks.1"][0])
    assert torch.equal(captured[0], captured[1]) and not torch.equal(captured[0], alone.values["blocks.1"][0])
    assert torch.equal(model(x), plain) and _hooks_on(model) == 0


def test_an_exception_inside_the_context_leaves_nothing_behind():
    model = Stack(2).eval()
    layer = nn.TransformerEncoderLayer(16, 4, batch_first=True).eval()
    x = torch.randn(1, 5, 16)
    plain, plain_layer = model(x), layer(x)
    with pytest.raises(KeyError):
        with HeadIntervention(model).knock_out("blocks.0", heads=0):
            model(x)
            raise KeyError("the user's own error")
    with pytest.raises(InterventionError, match="replacement map has shape"):  # raised inside the forward
        with HeadIntervention(model).replace_weights("blocks.1", 0, torch.ones(5, 4)):
            model(x)
    with pytest.raises(InterventionError):
        with HeadIntervention(layer).replace_weights("self_attn", 0, torch.ones(3, 3)):
            layer(x)
    assert torch.equal(model(x), plain) and torch.equal(layer(x), plain_layer)
    assert _hooks_on(model) == 0 and _hooks_on(layer) == 0
    assert torch.overrides._get_current_function_mode_stack() == []


# ---------------------------------------------------------------------------- bad input
def test_bad_input_gets_a_clear_error():
    model = Stack(2).eval()
    x = torch.randn(1, 5, 16)
    with pytest.raises(InterventionError, match=r"layer 'blocks.0' has 4 heads \(0 to 3\); head 4 is not one of them"):
        HeadIntervention(model).knock_out("blocks.0", heads=4)
    with pytest.raises(InterventionError, match=r"no module named 'blocks.9'; its attention layers are: 'blocks.0', 'blocks.1'"):
        HeadIntervention(model).knock_out("blocks.9", heads=0)
    with pytest.raises(InterventionError, match=r"expected \(2,\), one gate per head"):
        HeadIntervention(model).scale("blocks.0", torch.ones(3), heads=[0, 1])
    with pytest.raises(InterventionError, match=r"already has an act on its output"):
        HeadIntervention(model).knock_out("blocks.0", heads=1).scale("blocks.0", torch.ones(4))
    with pytest.raises(InterventionError, match=r"\(batch, query, key\) = \(1, 5, 5\) or \(query, key\) = \(5, 5\)"):
        with HeadIntervention(model).replace_weights("blocks.0", 0, torch.ones(1, 5, 6)):
            model(x)
    with pytest.raises(InterventionError, match="no act"):
        with HeadIntervention(model):
            pass
    with pytest.raises(InterventionError, match="ran, but no attention call inside it"):
        with HeadIntervention(model).knock_out("blocks.0.out", heads=0):  # a Linear: nothing to act on
            model(x)
    training = nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True).train()
    with pytest.raises(InterventionError, match="dropout mask"):
        with HeadIntervention(training).knock_out("", heads=0):
            training(x, x, x)
    assert issubclass(InterventionError, AttentionHookerError) and issubclass(InterventionError, ValueError)
    assert _hooks_on(model) == 0 and _hooks_on(training) == 0


# ------------------------------------------------------------------ review of issue 27
def test_a_compiled_model_is_refused_and_a_block_where_nothing_ran_warns():
    """Review: under torch.compile an intervention (or a recording) silently did nothing."""
    import warnings as warnings_module

    from attention_hooker import AttentionCaptureWarning, record_heads

    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True).eval()
    compiled = torch.compile(layer, backend="eager")
    with pytest.raises(InterventionError, match="torch.compile wrapper: its compiled code does not run the hooks"):
        HeadIntervention(compiled)
    with pytest.raises(InterventionError, match="torch.compile wrapper"):
        record_heads(compiled)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50,
                                                                n_positions=16)).eval()
    built = torch.compile(gpt2, backend="eager")
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        built(ids)  # code built before the intervention: it runs no hook of ours
        with pytest.warns(AttentionCaptureWarning, match="no layer of this intervention .* ran inside its block"):
            with HeadIntervention(gpt2).knock_out("transformer.h.1.attn", 0) as intervention:
                built(ids)
        assert intervention.calls == {"transformer.h.1.attn": 0}
        with pytest.warns(AttentionCaptureWarning, match="the recording holds no call"):
            with record_heads(gpt2, ["transformer.h.1.attn"]):
                built(ids)
        with warnings_module.catch_warnings():
            warnings_module.simplefilter("error")
            with HeadIntervention(gpt2).knock_out("transformer.h.1.attn", 0) as intervention:
                gpt2(ids)  # the uncompiled model: acted on, no warning
        assert intervention.calls == {"transformer.h.1.attn": 1}


def test_review_mistakes_are_refused(minilm_sdpa):
    """Review: a layer added while the block ran was silently ignored; a container acted on all it held;
    block_keys('a') was a raw TypeError and heads=[1.0] passed for head 1."""
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True).eval()
    stack = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    intervention = HeadIntervention(stack).knock_out("layers.0.self_attn", 0)
    with torch.no_grad(), intervention:
        with pytest.raises(InterventionError, match="'layers.1.self_attn' is new to this intervention"):
            intervention.knock_out("layers.1.self_attn", 0)
        stack(torch.randn(1, 4, 8))
    with pytest.raises(InterventionError, match="holds attention modules .*'encoder.layer.0.attention.self'"):
        HeadIntervention(minilm_sdpa).knock_out("", 0)
    with pytest.raises(InterventionError, match="block_keys takes key positions"):
        from attention_hooker import block_keys
        block_keys("a")
    with pytest.raises(InterventionError, match="heads must be an int or a sequence of ints"):
        HeadIntervention(stack).knock_out("layers.0.self_attn", [1.0])


def test_a_mean_knock_out_leaves_the_references_padding_out(minilm_sdpa, minilm_tokenizer):
    from attention_hooker import record_heads

    name = "encoder.layer.2.attention.self"
    reference = minilm_tokenizer(["A short one.", "A rather longer sentence than the first."], padding=True,
                                 return_tensors="pt")
    with torch.no_grad(), record_heads(minilm_sdpa, [name]) as recording:
        minilm_sdpa(**reference)
    outputs, mask = recording.outputs[name][0], reference["attention_mask"]  # (B, H, Q, D), (B, Q)
    real = outputs.permute(0, 2, 1, 3)[mask.bool()]  # (real tokens, H, D): by hand
    expected_mean = real.double().mean(0).float()  # (H, D)
    probe = minilm_tokenizer("The cat sat.", return_tensors="pt")
    hooked = []
    dense = minilm_sdpa.encoder.layer[2].attention.output.dense
    handle = dense.register_forward_pre_hook(lambda m, args: hooked.append(args[0].clone()))
    try:
        with torch.no_grad(), HeadIntervention(minilm_sdpa).knock_out(name, 4, mode="mean", reference=recording,
                                                                       reference_mask=mask):
            minilm_sdpa(**probe)
    finally:
        handle.remove()
    head = hooked[0].view(1, -1, 12, 32)[0, :, 4]  # (Q, D): head 4's slice of the projection's input
    torch.testing.assert_close(head, expected_mean[4].expand_as(head), atol=1e-6, rtol=1e-5)
    with pytest.raises(InterventionError, match=r"reference_mask is \(1, 3\)"):
        HeadIntervention(minilm_sdpa).knock_out(name, 4, mode="mean", reference=recording,
                                                reference_mask=torch.ones(1, 3))
