"""Nystromformer (issue 24): the stored map is the one that multiplies the values,
``kernel_1 @ iterative_inv(kernel_2) @ kernel_3`` plus the depthwise value convolution as a banded
matrix (or, on the plain path, the softmax plus that band), never one of the kernels.

Oracles: the layer's own context (its output before the output dense) equals the stored map times
``value(x)``; transformers' own ``attentions`` (``kernel_1 @ Z``, ``(batch, heads, L, m)``) times a
``kernel_3`` computed by hand from the module's weights, plus a band built by loops from
``conv.weight``, equals the stored map; outputs unchanged, and the module code the capture calls
(``iterative_inv``) is seen by no function mode.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.overrides import TorchFunctionMode

from attention_hooker import TransformerAttentionHooker, attention_rollout
from attention_hooker.errors import AttentionHookerError

transformers = pytest.importorskip("transformers")

HEADS, WIDTH, LENGTH, TAPS = 4, 32, 16, 5


def _model(landmarks: int, conv_scale: float = 0.5):
    torch.manual_seed(0)
    config = transformers.NystromformerConfig(
        vocab_size=64, hidden_size=WIDTH, num_attention_heads=HEADS, num_hidden_layers=2, intermediate_size=64,
        segment_means_seq_len=LENGTH, num_landmarks=landmarks, conv_kernel_size=TAPS, max_position_embeddings=40)
    model = transformers.NystromformerModel(config).eval()
    with torch.no_grad():  # a conv term as large as the attention's (initialised at std 0.02, it would hide)
        for layer in _layers(model):
            layer.conv.weight.normal_(0.0, conv_scale)
    return model


def _layers(model):
    return [m for m in model.modules() if type(m).__name__ == "NystromformerSelfAttention"]


def _ids(batch=2, length=LENGTH):
    torch.manual_seed(1)
    return torch.randint(3, 60, (batch, length))


class _Contexts:
    """Each layer's input and its context (output before the output dense), per call."""

    def __init__(self, model):
        self.calls = {layer: [] for layer in _layers(model)}
        self.handles = [layer.register_forward_hook(
            lambda m, args, kwargs, out: self.calls[m].append((args[0] if args else kwargs["hidden_states"], out[0])),
            with_kwargs=True) for layer in _layers(model)]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _values(layer, hidden):
    """``value(x)`` as ``(B, H, L, d)``."""
    with torch.no_grad():
        return layer.value(hidden).view(hidden.shape[0], hidden.shape[1], HEADS, -1).transpose(1, 2)


def _band(layer, length):
    """The depthwise conv as a matrix, by loops: ``(H, L, L)``."""
    weight = layer.conv.weight.detach()
    band = torch.zeros(HEADS, length, length)
    for i in range(length):
        for t in range(TAPS):
            j = i + t - TAPS // 2
            if 0 <= j < length:
                band[:, i, j] = weight[:, 0, t, 0]
    return band


def _kernel_3(layer, hidden, mask=None):
    """``softmax(q̃ kᵀ + mask)`` from the module's weights: ``(B, H, m, L)``; ``mask`` ``(B, L)``, 0 = padding
    (its keys left out; the landmarks average every position, padded ones too, as the model's do)."""
    b, n, _ = hidden.shape
    d = WIDTH // HEADS
    with torch.no_grad():
        q = layer.query(hidden).view(b, n, HEADS, d).transpose(1, 2) / d ** 0.25
        k = layer.key(hidden).view(b, n, HEADS, d).transpose(1, 2) / d ** 0.25
        m = layer.num_landmarks
        q_landmarks = q.reshape(b, HEADS, m, n // m, d).mean(-2)
        scores = q_landmarks @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return scores.softmax(-1)


def _merged(x):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def test_landmark_map_times_values_is_the_layers_context_and_equals_transformers_attentions_through_kernel_3():
    model, ids = _model(landmarks=4), _ids()
    seen = _Contexts(model)
    try:
        with torch.no_grad():
            plain = model(ids, output_attentions=True)
            with TransformerAttentionHooker(model) as hooker:
                hooked = model(ids)
    finally:
        seen.remove()
    assert torch.equal(hooked.last_hidden_state, plain.last_hidden_state)
    assert hooker.report().missing == []
    names = list(hooker.values)
    assert len(names) == 2
    for number, (layer, name) in enumerate(zip(_layers(model), names)):
        stored = hooker.values[name]
        assert len(stored) == 1 and stored[0].shape == (2, HEADS, LENGTH, LENGTH)
        (_, first_context), (hidden, context) = seen.calls[layer]  # unhooked, then hooked
        assert torch.equal(first_context, context)
        torch.testing.assert_close(_merged(stored[0] @ _values(layer, hidden)), context, atol=1e-6, rtol=0)
        hand = plain.attentions[number] @ _kernel_3(layer, hidden) + _band(layer, LENGTH)
        assert plain.attentions[number].shape == (2, HEADS, LENGTH, 4)  # query x landmark: not a token map
        torch.testing.assert_close(stored[0], hand, atol=1e-6, rtol=0)
    # Not probabilities: the conv term makes entries negative, and the analyses that need
    # probabilities refuse it by its numbers.
    assert (hooker.values[names[0]][0] < -1e-3).any()
    with pytest.raises(AttentionHookerError, match="negative"):
        attention_rollout([hooker.values[n][0] for n in names])


def test_the_plain_path_stores_the_softmax_plus_the_conv_band_on_a_padded_batch():
    model = _model(landmarks=LENGTH)  # as many landmarks as segment_means_seq_len: one masked softmax
    ids = _ids(length=9)  # the plain path takes any length
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, -3:] = 0
    seen = _Contexts(model)
    try:
        with torch.no_grad():
            plain = model(ids, attention_mask=mask, output_attentions=True)
            with TransformerAttentionHooker(model) as hooker:
                hooked = model(ids, attention_mask=mask)
    finally:
        seen.remove()
    assert torch.equal(hooked.last_hidden_state, plain.last_hidden_state)
    for number, (layer, name) in enumerate(zip(_layers(model), hooker.values)):
        stored = hooker.values[name][0]
        _, (hidden, context) = seen.calls[layer]
        torch.testing.assert_close(stored, plain.attentions[number] + _band(layer, 9), atol=1e-6, rtol=0)
        torch.testing.assert_close(_merged(stored @ _values(layer, hidden)), context, atol=1e-6, rtol=0)
        # The softmax alone misses the conv path: it is not the map that multiplies the values.
        assert (_merged(plain.attentions[number] @ _values(layer, hidden)) - context).abs().max() > 1e-2
        # The conv term does not look at the mask: a real row near padding weighs the padded keys.
        assert (stored[1, :, 5, 6:8] != 0).all()  # keys 6, 7 are padding, within 2 taps of row 5


def test_the_three_kernel_path_on_a_padded_call_equals_the_hand_computation_with_kernel_3_masked():
    """Landmarks (4 of 16) with the second row's last 3 tokens padded. transformers 5's NystromformerModel cannot
    run this itself (it builds a (batch, 1, L, L) mask that kernel_3's (batch, heads, m, L) scores do not
    broadcast with, and raises: checked below, with and without the capture); the layer is therefore called as
    its code expects, with a (batch, 1, 1, L) additive mask. Only kernel_3 sees the mask, so the stored map is
    the layer's own kernel_1 @ Z (its returned attention_probs) times a kernel_3 made here with those keys left
    out, plus the conv band; times the values it is the layer's context; padded keys get the conv band only."""
    model, ids = _model(landmarks=4), _ids()
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, -3:] = 0
    with torch.no_grad(), pytest.raises(RuntimeError, match="must match the size"):
        model(ids, attention_mask=mask)
    with torch.no_grad(), TransformerAttentionHooker(model) as failed, pytest.raises(RuntimeError, match="must match"):
        model(ids, attention_mask=mask)
    assert dict(failed.values) == {}
    layer = _layers(model)[0]
    with torch.no_grad():
        hidden = model.embeddings(input_ids=ids)
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        context, probs = layer(hidden, additive, output_attentions=True)
        with TransformerAttentionHooker(model) as hooker:
            (again,) = layer(hidden, additive)
    assert torch.equal(again, context)
    (name,) = [n for n, m in model.named_modules() if m is layer]
    stored = hooker.values[name][0]
    band = _band(layer, LENGTH)
    assert probs.shape == (2, HEADS, LENGTH, 4)
    torch.testing.assert_close(stored, probs @ _kernel_3(layer, hidden, mask) + band, atol=1e-6, rtol=0)
    torch.testing.assert_close(_merged(stored @ _values(layer, hidden)), context, atol=1e-6, rtol=0)
    torch.testing.assert_close(stored[1, :, :, -3:], band[:, :, -3:].expand(HEADS, LENGTH, 3), atol=1e-7, rtol=0)
    unmasked = probs @ _kernel_3(layer, hidden) + band  # the mask matters: left out, row 1 differs
    assert (unmasked[1] - stored[1]).abs().max() > 1e-3


def test_float32_weights_under_bfloat16_autocast_store_the_map_in_bfloat16_the_dtype_its_values_are_multiplied_in():
    """Under torch.autocast("cpu", bfloat16) every product of the layer is a bfloat16 matmul, the context too:
    the map is stored in bfloat16 (it was stored float32) and times the values is the context to bf16 rounding."""
    model, ids = _model(landmarks=4), _ids()
    seen = _Contexts(model)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with TransformerAttentionHooker(model, keep_values=True) as hooker:
                model(ids)
    finally:
        seen.remove()
    for layer, name in zip(_layers(model), hooker.values):
        stored, values = hooker.values[name][0], hooker.value_vectors[name][0]
        ((_, context),) = seen.calls[layer]
        assert context.dtype == values.dtype == stored.dtype == torch.bfloat16
        product = _merged(stored.float() @ values.float())
        assert (product - context.float()).abs().max() <= 0.02 * context.float().abs().max()


def test_the_map_of_a_sample_is_exact_in_a_batch_and_alone():
    """iterative_inv starts from a scale taken over the whole batch, so a sample's map may differ in a
    batch and alone (here its iterations converge to within float32 rounding either way); each
    capture is exact against the context the model computed in that batch."""
    model, ids = _model(landmarks=4), _ids(batch=3)
    layer = _layers(model)[0]
    maps = {}
    for label, batch in [("batch", ids)] + [(f"alone {i}", ids[i:i + 1]) for i in range(3)]:
        seen = _Contexts(model)
        try:
            with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"layer\.0\.attention\.self$") as hooker:
                model(batch)
        finally:
            seen.remove()
        (hidden, context), = seen.calls[layer]
        (stored,) = hooker.values["encoder.layer.0.attention.self"]
        torch.testing.assert_close(_merged(stored @ _values(layer, hidden)), context, atol=1e-6, rtol=0)
        maps[label] = stored
    for i in range(3):
        torch.testing.assert_close(maps["batch"][i], maps[f"alone {i}"][0], atol=1e-5, rtol=0)


def test_the_module_code_the_capture_calls_is_seen_by_no_function_mode_and_changes_nothing():
    model, ids = _model(landmarks=4), _ids()

    class CountMatmuls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
                self.count += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        with CountMatmuls() as alone:
            plain = model(ids)
        with TransformerAttentionHooker(model, keep_values=True) as first, \
                TransformerAttentionHooker(model) as second:
            with CountMatmuls() as watched:
                hooked = model(ids)
    assert torch.equal(plain.last_hidden_state, hooked.last_hidden_state)
    assert watched.count == alone.count > 0  # iterative_inv's 18 products per layer ran out of sight
    assert len(first.values) == len(second.values) == 2
    for name in first.values:
        assert len(first.values[name]) == len(second.values[name]) == 1
        assert torch.equal(first.values[name][0], second.values[name][0])
        assert first.report()[name].captured == second.report()[name].captured == 1


def test_selections_and_keep_values():
    model, ids = _model(landmarks=4), _ids()
    seen = _Contexts(model)
    try:
        with torch.no_grad():
            with TransformerAttentionHooker(model, keep_values=True) as whole:
                model(ids)
            with TransformerAttentionHooker(model, heads=[0, 2], rows=[3, 15], keys=[1, 2, 14]) as chosen:
                model(ids)
    finally:
        seen.remove()
    assert len(whole.values) == len(chosen.values) == 2
    for layer, name in zip(_layers(model), whole.values):
        full = whole.values[name][0]
        # made from the selected rows' kernels (kernel_1[rows] @ (Z @ kernel_3)): a product of other
        # sizes than the whole map's, equal up to float32 rounding
        torch.testing.assert_close(chosen.values[name][0], full[:, [0, 2]][:, :, [3, 15]][..., [1, 2, 14]],
                                   atol=1e-6, rtol=0)
        hidden, context = seen.calls[layer][0]
        value = whole.value_vectors[name][0]
        assert torch.equal(value, _values(layer, hidden))
        torch.testing.assert_close(_merged(full @ value), context, atol=1e-6, rtol=0)


def test_landmarks_that_are_not_the_layers_are_refused_and_nothing_is_stored():
    """An input shorter than segment_means_seq_len: the model's reshape folds the batch into the
    landmarks (it runs, mixing samples); its kernels are not (batch, heads, ...) and are refused."""
    model = _model(landmarks=4)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(_ids(length=8))
    report = hooker.report()
    assert report.missing == list(hooker.hooked_layers)
    reason = report[hooker.hooked_layers[0]].reason
    assert "Nystromformer" in reason and "(2, 4, 8, 4), (2, 4, 4, 4), (2, 4, 4, 8)" in reason
    assert dict(hooker.values) == {}


def test_every_family_is_registered_when_one_family_module_was_imported_first():
    """In a fresh process that imports the Longformer family before any capture, a Nystromformer
    (and ProphetNet) layer is still assembled: families do not register only while none is."""
    code = textwrap.dedent("""
        import attention_hooker.capture.bands
        import torch, transformers
        from attention_hooker.capture.pieces import pieced_layer
        config = transformers.NystromformerConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                                  intermediate_size=64, segment_means_seq_len=16, num_landmarks=4)
        layer = transformers.NystromformerModel(config).encoder.layer[0].attention.self
        ngram = transformers.ProphetNetModel(transformers.ProphetNetConfig(
            hidden_size=32, num_encoder_attention_heads=4, num_decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1)).decoder.layers[0].self_attn
        print(type(pieced_layer(layer, {})).__name__, type(pieced_layer(ngram, {})).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["LandmarkLayer", "NgramLayer"]
