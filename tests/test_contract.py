"""The public contract: the seed's examples, hook lifetime, errors, storage, transparency."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from tiny_models import ExpOverSumAttention

from attention_hooker import (
    AttentionCaptureWarning,
    AttentionHookerError,
    TransformerAttentionHooker,
    plot_attention_grid,
)


def _encoder(layers=2, d_model=32, nhead=4):
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=d_model, nhead=nhead, batch_first=True), layers)


def _no_trace_left(model):
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a hook was left on the model"
    assert torch._C._len_torch_function_stack() == 0, "a function mode was left on"
    assert torch.backends.mha.get_fastpath_enabled(), "the fast path flag was left off"


# ------------------------------------------------------------------ the seed's examples
def test_seed_quick_start_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=32, nhead=4, batch_first=True), num_layers=2)
    hooker = TransformerAttentionHooker(model, layer_regex=r"self_attn$").setup()
    x = torch.randn(1, 10, 32)
    model(x)
    assert list(hooker.values.keys()) == ["layers.0.self_attn", "layers.1.self_attn"]
    for name, attn_list in hooker.values.items():
        assert attn_list[0].shape == (1, 4, 10, 10)
    hooker.remove_hooks()
    layer_name = "layers.0.self_attn"
    attn_tensor = hooker.values[layer_name][0]
    fig = plot_attention_grid(
        attn_tensor, tokens=[f"Token_{i}" for i in range(10)], layer_name=layer_name, save_path=f"plots/{layer_name}.png"
    )
    assert (tmp_path / "plots" / f"{layer_name}.png").stat().st_size > 1000
    assert fig is not None
    _no_trace_left(model)


def test_seed_custom_regex_and_loop_examples():
    model = _encoder()
    hooker = TransformerAttentionHooker(model, layer_regex=r".*attn.*").setup()
    model(torch.randn(1, 6, 32))
    model(torch.randn(1, 6, 32))
    hooker.remove_hooks()
    # out_proj matches the regex too but computes no attention: only the MHA records.
    assert list(hooker.values) == ["layers.0.self_attn", "layers.1.self_attn"]
    attn_calls = hooker.values["layers.0.self_attn"]
    assert len(attn_calls) == 2 and attn_calls[0].shape == (1, 4, 6, 6)


# ---------------------------------------------------------------------- hook lifetime
def test_setup_twice_does_not_double_record_and_remove_twice_is_safe():
    model = _encoder()
    hooker = TransformerAttentionHooker(model)
    assert hooker.setup() is hooker
    hooker.setup()
    model(torch.randn(2, 5, 32))
    assert [len(v) for v in hooker.values.values()] == [1, 1]
    hooker.remove_hooks()
    hooker.remove_hooks()
    _no_trace_left(model)
    model(torch.randn(2, 5, 32))
    assert [len(v) for v in hooker.values.values()] == [1, 1], "nothing recorded after removal"


def test_context_manager_clear_repr_and_hooked_layers():
    model = _encoder()
    with TransformerAttentionHooker(model) as hooker:
        assert hooker.is_setup
        model(torch.randn(2, 5, 32))
        text = repr(hooker)
        assert "\n" not in text and "2 hooked layers" in text and "hooks on" in text
        assert re.fullmatch(r"AttentionValues\(2 layers, 2 calls, [\d.]+ KB\)", repr(hooker.values))
        hooker.clear()
        assert dict(hooker.values) == {}
        model(torch.randn(2, 5, 32))
    assert not hooker.is_setup and "hooks off" in repr(hooker)
    assert hooker.hooked_layers == ["layers.0.self_attn", "layers.1.self_attn"]
    assert len(hooker.values["layers.1.self_attn"]) == 1
    _no_trace_left(model)


class _Boom(Exception):
    pass


class _ExplodingAttention(nn.Module):
    def __init__(self, exc):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.exc = exc

    def forward(self, x):
        y, _ = self.mha(x, x, x)
        if self.exc is not None:
            raise self.exc
        return y


@pytest.mark.parametrize("exc", [_Boom("inside forward"), KeyboardInterrupt()], ids=["exception", "keyboard_interrupt"])
def test_no_trace_left_after_an_exception_in_forward(exc):
    model = nn.Sequential(_ExplodingAttention(exc)).eval()
    with pytest.raises(type(exc)):
        with torch.no_grad(), TransformerAttentionHooker(model, r"^0$"):
            model(torch.randn(1, 3, 8))
    _no_trace_left(model)


def test_keyboard_interrupt_with_setup_hooker_recovers_on_next_forward_and_removal():
    inner = _ExplodingAttention(KeyboardInterrupt())
    model = nn.Sequential(inner)
    hooker = TransformerAttentionHooker(model, r"^0$").setup()
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(1, 3, 8))
    inner.exc = None
    model(torch.randn(1, 3, 8))  # the root's hook closes the scopes the interrupt left open
    assert len(hooker.values["0"]) == 2
    hooker.remove_hooks()
    _no_trace_left(model)


def test_hooker_leaves_other_models_and_the_flag_alone_between_forwards():
    model, other = _encoder(), _encoder()
    with TransformerAttentionHooker(model):
        assert torch._C._len_torch_function_stack() == 0, "the mode is on only while a hooked module runs"
        assert torch.backends.mha.get_fastpath_enabled()
        other(torch.randn(1, 4, 32))
    _no_trace_left(model)


# ----------------------------------------------------------------------------- errors
def test_invalid_regex_names_the_pattern_and_the_regex_error():
    with pytest.raises(AttentionHookerError, match=r"layer_regex 'self_attn\(' is not a valid regular expression: "):
        TransformerAttentionHooker(_encoder(), layer_regex="self_attn(")
    assert issubclass(AttentionHookerError, ValueError)


def test_regex_matching_nothing_lists_attention_modules():
    with pytest.raises(AttentionHookerError) as info:
        TransformerAttentionHooker(_encoder(), layer_regex=r"^decoder")
    message = str(info.value)
    assert "'^decoder'" in message and "layers.0.self_attn" in message and "(2 in all)" in message


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got dict"):
        TransformerAttentionHooker({"not": "a model"})


def test_model_without_attention_needs_a_regex():
    with pytest.raises(AttentionHookerError, match="found no attention module in Sequential"):
        TransformerAttentionHooker(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dtype=torch.int64), "not a floating torch dtype"),
        (dict(dtype="half"), "not a floating torch dtype"),
        (dict(device="tpu9"), "is not a torch device"),
        (dict(heads=[-1]), "non-negative"),
        (dict(heads="all"), "not a sequence of head indices"),
        (dict(max_calls=0), "positive int"),
        (dict(keep="middle"), "keep='middle' must be one of"),
        (dict(heads=[0], keep_grad=True), "cannot be combined"),
    ],
)
def test_bad_options_are_refused_clearly(options, message):
    with pytest.raises(AttentionHookerError, match=re.escape(message)):
        TransformerAttentionHooker(_encoder(), **options)


def test_head_index_beyond_the_layer_names_the_layer():
    model = _encoder()
    with TransformerAttentionHooker(model, heads=[1, 7]):
        with pytest.raises(AttentionHookerError, match=r"head\(s\) \[7\], but layer 'layers.0.self_attn' has 4 heads"):
            model(torch.randn(1, 3, 32))
    _no_trace_left(model)


class _Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = ExpOverSumAttention(8)

    def forward(self, x):
        return self.attention(x)


def test_a_forward_that_captured_nothing_warns_with_the_cause():
    model = _Wrapper()
    with TransformerAttentionHooker(model) as hooker:
        with pytest.warns(AttentionCaptureWarning, match=r"ran \(attention\) but no attention weights were captured"):
            model(torch.randn(1, 3, 8))
    assert dict(hooker.values) == {}


# ---------------------------------------------------------------------------- storage
def _looped_mha():
    class Looped(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            for _ in range(4):
                x = x + self.attn(x, x, x, need_weights=False)[0]
            return x

    return Looped().eval()


def test_max_calls_keep_first_and_last():
    model = _looped_mha()
    x = torch.randn(1, 3, 16)
    with TransformerAttentionHooker(model) as everything:
        model(x)
    with TransformerAttentionHooker(model, max_calls=2) as first:
        model(x)
    with TransformerAttentionHooker(model, max_calls=2, keep="last") as last:
        model(x)
    all_calls = everything.values["attn"]
    assert len(all_calls) == 4
    torch.testing.assert_close(first.values["attn"], all_calls[:2])
    torch.testing.assert_close(last.values["attn"], all_calls[2:])
    with TransformerAttentionHooker(model, max_calls=1) as once, warnings.catch_warnings():
        warnings.simplefilter("error")  # calls skipped by max_calls are not "nothing captured"
        model(x)
        model(x)
    torch.testing.assert_close(once.values["attn"], all_calls[:1])


@pytest.mark.parametrize("route", ["mha", "sdpa", "softmax"])
def test_head_subset_dtype_and_exact_bytes(route, minilm_sdpa, minilm_eager, minilm_batch):
    if route == "mha":
        model, inputs, n_layers, n_heads = _encoder(layers=2).eval(), (torch.randn(3, 5, 32),), 2, 4
        call = lambda: model(*inputs)  # noqa: E731
        batch, length = 3, 5
    else:
        model = minilm_sdpa if route == "sdpa" else minilm_eager
        call = lambda: model(**minilm_batch)  # noqa: E731
        n_layers, n_heads = 6, 12
        batch, length = minilm_batch["input_ids"].shape
    with torch.no_grad():
        with TransformerAttentionHooker(model) as full:
            call()
        with TransformerAttentionHooker(model, heads=[2, 0]) as part:
            call()
        with TransformerAttentionHooker(model, dtype=torch.float16) as half:
            call()
    minimum = n_layers * batch * n_heads * length * length * 4
    assert full.values.nbytes == minimum
    assert half.values.nbytes == minimum // 2
    assert part.values.nbytes == minimum * 2 // n_heads
    for name, calls in full.values.items():
        torch.testing.assert_close(part.values[name][0], calls[0][:, [2, 0]])
        assert part.values[name][0].is_contiguous()
        assert half.values[name][0].dtype == torch.float16
        torch.testing.assert_close(half.values[name][0].float(), calls[0], atol=1e-3, rtol=1e-3)
        assert calls[0].device.type == "cpu" and not calls[0].requires_grad


# ----------------------------------------------------------------------- transparency
def _tiny_bert(implementation="sdpa", state=None):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                     intermediate_size=64, vocab_size=100, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False)
    if state is not None:
        model.load_state_dict(state)
    model.set_attn_implementation(implementation)
    return model


def test_outputs_and_gradients_unchanged_on_an_hf_model_in_training():
    model = _tiny_bert().train()
    ids = torch.randint(0, 100, (2, 6))

    def loss_and_grads():
        model.zero_grad()
        out = model(input_ids=ids).last_hidden_state
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected_out, expected_grads = loss_and_grads()
    with TransformerAttentionHooker(model) as hooker:
        out, grads = loss_and_grads()
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0)
    assert len(hooker.values) == 2
    _no_trace_left(model)


def test_keep_grad_gradients_agree_across_routes():
    """d(loss)/d(weights) from the sdpa route equals the eager (softmax) route's."""
    sdpa = _tiny_bert("sdpa").eval()
    eager = _tiny_bert("eager", state=sdpa.state_dict()).eval()
    ids = torch.randint(0, 100, (2, 6))
    direction = torch.randn(32)  # a plain sum of a LayerNorm output would have zero gradient
    results = {}
    for name, model in (("sdpa", sdpa), ("eager", eager)):
        plain = model(input_ids=ids).last_hidden_state
        with TransformerAttentionHooker(model, keep_grad=True) as hooker:
            out = model(input_ids=ids).last_hidden_state
            (out[:, 0] @ direction).sum().backward()
        torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
        results[name] = hooker
    for layer in results["sdpa"].values:
        g_sdpa = results["sdpa"].gradients[layer][0]
        g_eager = results["eager"].gradients[layer][0]
        assert g_sdpa is not None and g_sdpa.shape == (2, 4, 6, 6) and g_sdpa.abs().sum() > 0
        torch.testing.assert_close(g_sdpa, g_eager, atol=1e-5, rtol=1e-4)


def test_keep_grad_on_the_mha_route():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 4, 8, requires_grad=True)
    with TransformerAttentionHooker(mha, keep_grad=True) as hooker:
        out, _ = mha(x, x, x, need_weights=False)
        out.sum().backward()
    grad = hooker.gradients[""][0]
    assert grad is not None and grad.shape == (1, 2, 4, 4) and grad.abs().sum() > 0
    # Oracle: the gradient of sum(A @ V) w.r.t. A is V's row sums per head.
    e = 8
    v = (x @ mha.in_proj_weight[2 * e :].T + mha.in_proj_bias[2 * e :]).view(1, 4, 2, 4).transpose(1, 2)
    w_o = mha.out_proj.weight  # out = concat_h(A_h V_h) W_o^T: d sum / d A_h = V_h (W_o^T summed) per head
    col = w_o.sum(0).view(2, 4)  # (H, Dh)
    expected = torch.einsum("bhsd,hd->bhs", v, col)[:, :, None, :].expand(1, 2, 4, 4)
    torch.testing.assert_close(grad, expected.detach(), atol=1e-5, rtol=1e-4)


def test_capture_page_example_runs_as_written(tmp_path, monkeypatch):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "capture.md").read_text()
    block = re.search(r"## Capture a model\n\n```python\n(.*?)```", page, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    exec(compile(block, "docs/capture.md", "exec"), {})
    assert printed == ["AttentionValues(2 layers, 2 calls, 3.1 KB)", "torch.Size([1, 4, 10, 10])"]
    assert (tmp_path / "plots" / "layers.0.self_attn.png").exists()


def test_two_hookers_on_one_model_both_capture(minilm_sdpa, minilm_batch):
    with torch.no_grad():
        with TransformerAttentionHooker(minilm_sdpa) as everything, TransformerAttentionHooker(
            minilm_sdpa, r"layer\.5\.attention\.self$", dtype=torch.float16
        ) as last:
            minilm_sdpa(**minilm_batch)
    assert len(everything.values) == 6 and list(last.values) == ["encoder.layer.5.attention.self"]
    torch.testing.assert_close(
        last.values["encoder.layer.5.attention.self"][0].float(),
        everything.values["encoder.layer.5.attention.self"][0],
        atol=1e-3,
        rtol=1e-3,
    )
    _no_trace_left(minilm_sdpa)


def test_weights_stored_in_another_dtype_are_computed_in_tiles_never_a_whole_float32_layer(
        minilm_sdpa, minilm_batch, monkeypatch):
    """fp32 weights stored as float16 are computed a tile of query rows at a time and
    written into their float16 tensor: no float32 (batch, heads, query, key) tensor is
    made, and each stored call is its own tensor."""
    from attention_hooker.capture.routes import sdpa

    length = minilm_batch["input_ids"].shape[1]
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as full:
        minilm_sdpa(**minilm_batch)
    tiles = []
    original = sdpa._weights

    def counting(q, k, *args):
        result = original(q, k, *args)
        tiles.append(tuple(result.shape))
        return result

    monkeypatch.setattr(sdpa, "_weights", counting)
    monkeypatch.setattr(sdpa, "TILE_BYTES", 3 * 2 * 12 * length * 4)  # 3 rows of (batch 2, 12 heads, keys) float32
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa, dtype=torch.float16) as half:
        minilm_sdpa(**minilm_batch)
    assert len(tiles) == 6 * -(-length // 3) and all(shape[2] <= 3 for shape in tiles), tiles
    stored = [calls[0] for calls in half.values.values()]
    assert len({t.data_ptr() for t in stored}) == 6 and all(t.dtype == torch.float16 for t in stored)
    for name, calls in full.values.items():
        torch.testing.assert_close(half.values[name][0].float(), calls[0], atol=1e-3, rtol=0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recompute_is_not_recorded_twice(reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    encoder = _encoder(layers=2, d_model=16, nhead=2).train()
    for layer in encoder.layers:
        layer.dropout.p = layer.dropout1.p = layer.dropout2.p = layer.self_attn.dropout = 0.0

    def forward(x, use_checkpoint):
        for layer in encoder.layers:
            x = checkpoint(layer, x, use_reentrant=reentrant) if use_checkpoint else layer(x)
        return x

    x = torch.randn(2, 5, 16, requires_grad=True)
    forward(x, False).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    encoder.zero_grad()
    with TransformerAttentionHooker(encoder) as hooker:
        out = forward(x, True)
        out.square().sum().backward()
    assert [len(calls) for calls in hooker.values.values()] == [1, 1]
    for n, p in encoder.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-5, rtol=1e-4)


def test_private_torch_apis_still_exist():
    """The private torch functions the capture relies on (each behind one small function
    with a comment): this fails loudly when a torch release moves one."""
    from torch.overrides import TorchFunctionMode

    assert callable(torch._C._current_autograd_node)  # hooker._in_backward: checkpoint recompute
    assert torch._C._get_tracing_state() is None  # hooker._being_traced: torch.jit.trace
    assert callable(torch.ops.aten._softmax.out)  # sdpa._softmax_last_dim: in-place CPU softmax
    mode = TorchFunctionMode()
    with mode:  # session._remove_mode: taking our mode out from under another one
        other = TorchFunctionMode()
        other.__enter__()
        stack = torch.overrides._get_current_function_mode_stack()
        assert stack[-2:] == [mode, other]
        assert torch._C._pop_torch_function_stack() is other
        torch._C._push_on_torch_function_stack(other)
        other.__exit__(None, None, None)
    assert torch._C._len_torch_function_stack() == 0


def test_the_module_call_frame_is_the_one_running_the_hooks():
    """session.module_call_frame() counts frames up from a hook to nn.Module's call
    (CPython's sys._getframe): the frame must be the module call's, alive while the
    forward runs and gone after it, or stale scopes would not be recognised."""
    from attention_hooker.capture.session import frame_is_live, module_call_frame

    seen = []
    layer = nn.Linear(2, 2)
    layer.register_forward_pre_hook(lambda m, args: seen.append(module_call_frame()))
    layer.register_forward_hook(lambda m, args, out: seen.append(frame_is_live(seen[0])))
    layer(torch.randn(1, 2))
    assert seen[0].f_code.co_name in ("inner", "_call_impl") and seen[0].f_code.co_filename.endswith("module.py")
    assert seen[1] is True and not frame_is_live(seen[0])
