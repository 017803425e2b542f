"""keep_values on the pieced families (capture/pieces.py, capture/value_tap.py) keeps what the layer's
own value projection returned to the model in the call, never a second run of it.

Each family's value projection is wrapped in a dropout (as LoRA's ``lora_dropout`` does) and the
model run in train mode, so a second call of the projection would draw other values, shift the
model's later randomness and fire the user's hooks twice. Checked against the projection itself (a
user forward hook recording what it returned to the model, laid out by this file as the model's code
does) and against invariants: outputs bitwise equal with and without the capture (same seed), the
projection called as often, and the tap's hooks gone with the capture.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from attention_hooker import TransformerAttentionHooker  # noqa: E402


def _longformer():
    torch.manual_seed(0)
    config = transformers.LongformerConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        attention_window=[4, 6], max_position_embeddings=64, pad_token_id=1, attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0)
    model = transformers.LongformerModel(config, add_pooling_layer=False)
    ids = torch.randint(3, 100, (2, 10))  # padded by the model to 12, cropped back to 10
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, -2:] = 0

    def values(name, module, outputs):  # value(x.transpose(0, 1)): (L, B, C)
        (out,) = outputs
        length, batch, width = out.shape
        return out.view(length, batch, 2, width // 2).permute(1, 2, 0, 3)[:, :, :10]

    return model, lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state, "LongformerSelfAttention", \
        "value", values


def _qwen2_vision():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(0)
    config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                                 spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config._attn_implementation = "sdpa"
    model = Qwen2VisionTransformerPretrainedModel(config)
    grid = torch.tensor([[1, 4, 4], [2, 2, 2]])
    patches = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2)

    def values(name, module, outputs):  # qkv(x): (S, 3C) -> v (1, H, S, d)
        (out,) = outputs
        return out.reshape(out.shape[0], 3, 2, -1)[:, 2].transpose(0, 1)[None]

    run = lambda m: m(patches, grid_thw=grid)  # noqa: E731
    return model, lambda m: _first_tensor(run(m)), "VisionAttention", "qkv", values


def _first_tensor(out):
    return out if isinstance(out, torch.Tensor) else (out.last_hidden_state if hasattr(out, "last_hidden_state")
                                                      else out[0])


def _longt5(attention, kind):
    def make():
        torch.manual_seed(0)
        config = transformers.LongT5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=2,
            local_radius=2, global_block_size=4, encoder_attention_type=attention, dropout_rate=0.0)
        model = transformers.LongT5EncoderModel(config)
        ids = torch.randint(3, 100, (2, 10))
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[0, -3:] = 0

        def values(name, module, outputs):  # v(x): (B, L, C); transient-global then v(aggregates): (B, G, C)
            parts = [out.view(out.shape[0], out.shape[1], 2, -1).transpose(1, 2) for out in outputs]
            return torch.cat(parts, 2)

        return model, lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state, kind, "v", values
    return make


def _pegasus_x():
    torch.manual_seed(0)
    config = transformers.PegasusXConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_global_tokens=3, block_size=4,
        max_position_embeddings=64, stagger_local_blocks=True, dropout=0.0, attention_dropout=0.0)
    model = transformers.PegasusXModel(config)
    ids = torch.randint(3, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, -3:] = 0

    def values(name, module, outputs):  # v_proj(tokens) (B, Lp, C), then v_proj(globals) (B, G, C)
        tokens, globals_ = (out.view(out.shape[0], out.shape[1], 2, -1).transpose(1, 2) for out in outputs)
        shift = 2 if name.endswith("layers.1.self_attn") else 0  # the odd layers are staggered by block_size / 2
        return torch.cat([globals_, tokens[:, :, shift:shift + 10]], 2)

    return model, lambda m: m.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, \
        "PegasusXGlobalLocalAttention", "v_proj", values


def _prophetnet():
    torch.manual_seed(0)
    config = transformers.ProphetNetConfig(
        vocab_size=64, hidden_size=32, num_encoder_attention_heads=4, num_decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=1, num_decoder_layers=2, ngram=2,
        num_buckets=8, relative_max_distance=16, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = transformers.ProphetNetModel(config)
    ids, decoder = torch.randint(3, 60, (2, 7)), torch.randint(3, 60, (2, 5))

    def values(name, module, outputs):  # value_proj(x): (B, 3T, C); the main stream's are the first T
        (out,) = outputs
        return out.view(2, 15, 4, -1).transpose(1, 2)[:, :, :5]

    return model, lambda m: m(input_ids=ids, decoder_input_ids=decoder, use_cache=False).last_hidden_state, \
        "ProphetNetNgramSelfAttention", "value_proj", values


def _nystromformer(landmarks):
    def make():
        torch.manual_seed(0)
        config = transformers.NystromformerConfig(
            vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
            segment_means_seq_len=16, num_landmarks=landmarks, conv_kernel_size=5, max_position_embeddings=40,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = transformers.NystromformerModel(config)
        ids = torch.randint(3, 60, (2, 16))

        def values(name, module, outputs):  # value(x): (B, L, C)
            (out,) = outputs
            return out.view(2, 16, 4, -1).transpose(1, 2)

        return model, lambda m: m(ids).last_hidden_state, "NystromformerSelfAttention", "value", values
    return make


def _hiera():
    torch.manual_seed(0)
    config = transformers.HieraConfig(embed_dim=8, image_size=[64, 64], depths=[1, 2, 2, 1], num_heads=[1, 2, 2, 2],
                                      drop_path_rate=0.0)
    model = transformers.HieraModel(config)
    pixels = torch.randn(2, 3, 64, 64)

    def values(name, module, outputs):  # qkv(x): (B, L, 3 * heads * d), the values its third part, in the layer's order
        (out,) = outputs
        b, n = out.shape[:2]
        return out.reshape(b, n, 3, module.num_heads, -1)[:, :, 2].transpose(1, 2)

    return model, lambda m: m(pixels).last_hidden_state, "HieraMaskUnitAttention", "qkv", values


FAMILIES = {
    "longformer": _longformer,
    "qwen2-vl vision": _qwen2_vision,
    "longt5 local": _longt5("local", "LongT5LocalAttention"),
    "longt5 transient-global": _longt5("transient-global", "LongT5TransientGlobalAttention"),
    "pegasus-x": _pegasus_x,
    "prophetnet": _prophetnet,
    "nystromformer": _nystromformer(16),
    "nystromformer landmarks": _nystromformer(4),
    "hiera": _hiera,
}


def _layers(model, kind):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == kind]


class _Watch:
    """A user's forward hook on each layer's (wrapped) value projection: its calls, and what it returned."""

    def __init__(self, layers, projection):
        self.calls = {name: [] for name, _ in layers}
        self.handles = [getattr(module, projection).register_forward_hook(
            lambda m, args, out, name=name: self.calls[name].append(out.detach().clone())) for name, module in layers]

    def clear(self):
        for calls in self.calls.values():
            calls.clear()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kept_values_are_what_the_projection_returned_and_nothing_runs_twice(family):
    model, run, kind, projection, values = FAMILIES[family]()
    layers = _layers(model, kind)
    assert layers, family
    for _, module in layers:  # a projection that is not deterministic: a different draw each call
        setattr(module, projection, nn.Sequential(nn.Dropout(0.3), getattr(module, projection)))
    model.train()
    watch = _Watch(layers, projection)
    hooks_before = {name: len(getattr(m, projection)._forward_hooks) for name, m in layers}
    with torch.no_grad():
        torch.manual_seed(5)
        plain = run(model)
        plain_calls = {name: len(calls) for name, calls in watch.calls.items()}
        watch.clear()
        torch.manual_seed(5)
        with TransformerAttentionHooker(model, layer_regex="|".join(f"^{name}$" for name, _ in layers),
                                        keep_values=True) as hooker:
            hooked = run(model)
    assert torch.equal(plain, hooked), "keep_values changed the model's output"
    assert {name: len(calls) for name, calls in watch.calls.items()} == plain_calls, "a projection ran twice"
    assert {name: len(getattr(m, projection)._forward_hooks) for name, m in layers} == hooks_before
    for name, module in layers:
        assert hooker.report()[name].captured == 1, (name, hooker.report()[name].reason)
        kept = hooker.value_vectors[name][0]
        assert kept is not None, name
        assert torch.equal(kept, values(name, module, watch.calls[name])), name


def test_the_longt5_transient_global_aggregates_values_are_the_second_call_of_v():
    model, run, kind, projection, _ = FAMILIES["longt5 transient-global"]()
    model.eval()
    name, module = _layers(model, kind)[0]
    watch = _Watch([(name, module)], projection)
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=f"^{name}$", keep_values=True) as hooker:
        run(model)
    tokens, aggregates = watch.calls[name]
    kept = hooker.value_vectors[name][0]
    assert kept.shape == (2, 2, 10 + 2, 8)  # 10 tokens, then 10 // global_block_size aggregates
    assert torch.equal(kept[:, :, 10:], aggregates.view(2, 2, 2, 8).transpose(1, 2))


def test_without_keep_values_no_hook_is_put_on_the_projection():
    model, run, kind, projection, _ = FAMILIES["nystromformer landmarks"]()
    layers = _layers(model, kind)
    seen = []

    def count(m, args, out):
        seen.append(len(m._forward_hooks))

    for _, module in layers:
        getattr(module, projection).register_forward_hook(count)
    with torch.no_grad():
        with TransformerAttentionHooker(model) as plain:
            run(model.eval())
        during_plain, seen[:] = list(seen), []
        with TransformerAttentionHooker(model, keep_values=True):
            run(model)
    assert during_plain == [1, 1] and seen == [2, 2]  # the user's hook alone, then with the tap's
    assert all(len(getattr(m, projection)._forward_hooks) == 1 for _, m in layers)
    assert len(plain.values) == 2


def test_a_projection_the_layer_calls_more_often_than_its_code_does_is_refused_not_guessed():
    model, run, kind, projection, _ = FAMILIES["nystromformer"]()
    name, module = _layers(model, kind)[0]
    inner = getattr(module, projection)

    class Twice(nn.Module):  # stands for a projection reached through a wrapper that calls it again
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    wrapped = Twice()
    setattr(module, projection, wrapped)
    module.register_forward_pre_hook(lambda m, args: (wrapped(args[0]), None)[1])  # an extra call inside the call
    with torch.no_grad(), TransformerAttentionHooker(model.eval(), layer_regex=f"^{name}$",
                                                     keep_values=True) as hooker, \
            pytest.warns(Warning):
        run(model)
    report = hooker.report()[name]
    assert report.captured == 0 and "value projection value returned 2 tensors" in report.reason


def test_the_tap_sees_only_the_running_call_of_its_layer_on_its_own_thread():
    import threading

    from attention_hooker.capture.value_tap import ValueTap, seen_outputs

    layer = nn.Module()
    layer.v = nn.Linear(2, 2)
    inside, other_done = threading.Event(), threading.Event()

    def forward(x):
        out = layer.v(x)
        inside.set()
        assert other_done.wait(10)
        return out

    layer.forward = forward
    tap, handles = ValueTap(layer, ["v", "missing"]), []
    tap.install(handles.append)
    assert len(handles) == 3  # the layer's open and close, and "v" only: the layer has no "missing"
    records = []
    layer.register_forward_pre_hook(lambda m, args: records.append(tap.current()))
    worker = threading.Thread(target=lambda: layer(torch.ones(1, 2)))
    worker.start()
    assert inside.wait(10)
    layer.v(torch.zeros(3, 2))  # this thread, while the layer runs on the other: not its call
    other_done.set()
    worker.join(10)
    (record,) = records
    assert [tuple(o.shape) for o in record.outputs["v"]] == [(1, 2)]
    assert "missing returned 0 tensors" in seen_outputs(record, "missing", 1, "test")
    assert tap.current() is None
    for handle in handles:
        handle.remove()
    assert not layer.v._forward_hooks and not layer._forward_hooks
