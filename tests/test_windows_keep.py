"""windows="keep": a windowed layer's calls stored as the model computed them, per window, with
the window-to-position index beside each (issue 24, part 3).

Oracles the project did not write: transformers' own ``output_attentions`` (per window) and
timm's ``AttentionExtract``; the index is compared with the model's own pad / roll / partition
run on a grid of token indices (tests/window_oracle.py), and the index's dense map with the
dense hand computation from the module's weights.
"""

import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker, attention_rollout, load
from attention_hooker.window_index import WindowIndex, dense_values
from window_oracle import PAD_THEN_ROLL, ROLL_THEN_PAD, dense_by_hand, index_grid_windows

transformers = pytest.importorskip("transformers")


def _hf_swin(image=40, impl="eager", depths=(2, 2), heads=(2, 4)):
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=image, patch_size=4, embed_dim=16, depths=list(depths),
                                     num_heads=list(heads), window_size=4, attn_implementation=impl)
    model = transformers.SwinModel(config).eval()
    with torch.no_grad():  # zero at init: an index that ignored positions could pass
        for module in model.modules():
            if hasattr(module, "relative_position_bias_table"):
                module.relative_position_bias_table.normal_(0, 1)
    return model


def _block_inputs(model):
    from transformers.models.swin.modeling_swin import SwinLayer

    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__(m, a), with_kwargs=True)
               for m in model.modules() if isinstance(m, SwinLayer)]
    return seen, handles


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_each_call_is_kept_as_computed_with_its_index(impl):
    # 10x10 tokens (padded to 12, shifted), then 5x5 (padded to 8, shifted): padding and shifts everywhere.
    model = _hf_swin(impl=impl)
    x = torch.randn(2, 3, 40, 40)
    seen, handles = _block_inputs(model)
    with torch.no_grad():
        reference = _hf_swin(impl="eager")(x, output_attentions=True)  # per window: the last block of each stage
        unhooked = model(x).last_hidden_state
        try:
            with TransformerAttentionHooker(model, windows="keep") as kept:
                out = model(x).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
        with TransformerAttentionHooker(model) as dense:
            model(x)
    torch.testing.assert_close(out, unhooked, atol=0, rtol=0)  # the model computes what it computed unhooked
    assert not kept.report().missing and list(kept.window_index) == list(kept.values)
    for stage, attentions in enumerate(reference.attentions):
        (call,) = kept.values[f"encoder.layers.{stage}.blocks.1.attention"]
        assert call.shape == attentions.shape  # (batch * windows, heads, N, N)
        torch.testing.assert_close(call, attentions, atol=0 if impl == "eager" else 2e-6, rtol=0)
    for layer, hidden_and_size in seen.items():
        name = next(n for n, m in model.named_modules() if m is layer) + ".attention"
        (call,), (index,) = kept.values[name], kept.window_index[name]
        (h, w), ws, s = hidden_and_size[1], layer.window_size, layer.shift_size
        assert (index.batch, index.height, index.width) == (2, h, w)
        assert torch.equal(index.table, index_grid_windows(h, w, (ws, ws), (s, s), PAD_THEN_ROLL))
        assert (index.table < 0).any()  # padded slots, -1
        placed = index.dense(call)
        assert torch.equal(placed, dense.values[name][0])  # what the default stores, exactly
        hidden = hidden_and_size[0]
        att, heads = layer.attention, layer.attention.num_attention_heads
        b, _, c = hidden.shape
        with torch.no_grad():
            oracle, _ = dense_by_hand(
                layer.layernorm_before(hidden).view(b, h, w, c),
                lambda t: att.q_proj(t).view(b, -1, heads, c // heads).transpose(1, 2) * att.scaling,
                lambda t: att.k_proj(t).view(b, -1, heads, c // heads).transpose(1, 2),
                att.relative_position_bias.relative_position_bias_table, (ws, ws), (s, s), PAD_THEN_ROLL)
        torch.testing.assert_close(placed, oracle, atol=2e-6, rtol=1e-5)
    assert dense_values(kept.values, kept.window_index).keys() == dense.values.keys()
    one_stage = {name: calls for name, calls in kept.values.items() if ".layers.0." in name}
    torch.testing.assert_close(attention_rollout(one_stage, window_index=kept.window_index),
                               attention_rollout({name: dense.values[name] for name in one_stage}), atol=0, rtol=0)


def test_timm_swin_calls_are_attention_extract_s_and_its_index_is_timm_s_layout():
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
    from timm.utils import AttentionExtract

    torch.manual_seed(0)
    model = SwinTransformer(img_size=40, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                            num_classes=0, strict_img_size=False).eval()  # 10x10, 5x5 tokens: rolled, then padded
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        reference = AttentionExtract(model, method="hook")(x)  # {"layers.s.blocks.i.attn.attn_drop": (B*nW, h, N, N)}
        with TransformerAttentionHooker(model, windows="keep") as kept:
            model(x)
        with TransformerAttentionHooker(model) as dense:
            model(x)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, SwinTransformerBlock)]
    assert len(kept.values) == len(blocks) == 4
    for name, block in blocks:
        (call,), (index,) = kept.values[name + ".attn"], kept.window_index[name + ".attn"]
        torch.testing.assert_close(call, reference[name + ".attn.attn_drop"], atol=0, rtol=0)
        table = index_grid_windows(index.height, index.width, block.window_size, block.shift_size, ROLL_THEN_PAD)
        assert torch.equal(index.table, table)
        assert torch.equal(index.dense(call), dense.values[name + ".attn"][0])


def test_maxvit_grid_index_places_strided_groups_like_the_dense_capture():
    pytest.importorskip("torchvision")
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
                   head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with TransformerAttentionHooker(model, windows="keep") as kept:
            model(x)
        with TransformerAttentionHooker(model) as dense:
            model(x)
    assert len(kept.window_index) == 4
    for name, (index,) in kept.window_index.items():
        (call,) = kept.values[name]
        assert call.shape[0] == 2 * index.windows and call.shape[0] != 2  # per window, not per image
        assert torch.equal(index.dense(call), dense.values[name][0])


def test_the_index_is_saved_and_loaded_with_its_calls(tmp_path):
    model = _hf_swin(depths=(2,), heads=(2,))
    with torch.no_grad(), TransformerAttentionHooker(model, windows="keep", max_calls=1, keep="last") as hooker:
        model(torch.randn(1, 3, 40, 40))
        model(torch.randn(3, 3, 40, 40))  # the last call is kept, with its own index (3 images)
    assert {len(v) for v in hooker.window_index.values()} == {1}
    assert {i[0].batch for i in hooker.window_index.values()} == {3}
    hooker.save(tmp_path / "c.safetensors")
    loaded = load(tmp_path / "c.safetensors")
    assert list(loaded.window_index) == list(hooker.window_index)
    for name, (index,) in hooker.window_index.items():
        (again,) = loaded.window_index[name]
        assert again == index and torch.equal(again.table, index.table)
        assert torch.equal(loaded.values[name][0], hooker.values[name][0])
        assert torch.equal(again.dense(loaded.values[name][0]), index.dense(hooker.values[name][0]))
    loaded.save(tmp_path / "d.safetensors")  # written again, with the index
    assert list(load(tmp_path / "d.safetensors").window_index) == list(hooker.window_index)


def test_a_damaged_index_is_refused():
    good = WindowIndex(torch.tensor([[0, 1], [2, -1]]), 1, 1, 3).describe()
    assert WindowIndex.from_description(good).tokens == 3
    for bad in ({**good, "table": [[0, 1], [1, -1]]}, {**good, "table": [[0, 1], [2, 5]]}, {**good, "batch": 0},
                {**good, "table": [[0, 1], [2]]}, {"table": []}):
        with pytest.raises(AttentionHookerError, match="is damaged"):
            WindowIndex.from_description(bad)
    index = WindowIndex.from_description(good)
    with pytest.raises(AttentionHookerError, match=r"is \(1, 2, 3, 3\), while its window index .* gives \(2, heads, 2, 2\)"):
        index.dense(torch.zeros(1, 2, 3, 3))


def test_bad_values_and_combinations_are_refused_with_what_was_expected(tmp_path):
    model = _hf_swin(depths=(2,), heads=(2,))
    with pytest.raises(AttentionHookerError, match=r"windows='sparse' must be one of \('dense', 'keep'\)"):
        TransformerAttentionHooker(model, windows="sparse")
    with pytest.raises(AttentionHookerError, match=r'windows="keep" cannot be combined with rows= or keys='):
        TransformerAttentionHooker(model, windows="keep", rows="last")
    hooker = TransformerAttentionHooker(model, windows="keep")
    with pytest.raises(AttentionHookerError, match=r'stream_to\(\) cannot be combined with windows="keep"'):
        hooker.stream_to(tmp_path / "s")
    from attention_hooker import HeadStatsAccumulator

    with pytest.raises(AttentionHookerError, match=r'reduce_into\(\) cannot be combined with windows="keep"'):
        hooker.reduce_into(HeadStatsAccumulator())


def test_over_the_dense_limit_the_refusal_names_keep_and_keep_stores_the_call(monkeypatch):
    from attention_hooker.capture import session

    model = _hf_swin(depths=(2,), heads=(2,))
    monkeypatch.setattr(session, "DENSE_WINDOWS_BYTES", 2 * 100 * 100 * 4 - 1)  # no dense map of one image fits
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad(), TransformerAttentionHooker(model) as dense:
        model(x)
    assert all('windows="keep"' in c.reason for c in dense.report().values())
    with torch.no_grad(), TransformerAttentionHooker(model, windows="keep", heads=[1]) as kept:
        model(x)
    assert not kept.report().missing
    assert {tuple(c[0].shape) for c in kept.values.values()} == {(9, 1, 16, 16)}  # heads= applies per window


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_keep_grad_gives_the_gradient_of_each_kept_window_map(impl):
    """Kept per window, the stored map is the one the loss reaches: its gradient is kept (the
    dense map's is refused). The oracle: autograd's gradient at transformers' own returned
    attentions (eager), the same weights in both runs."""
    x = torch.randn(1, 3, 40, 40)
    reference_model = _hf_swin(impl="eager", depths=(2,), heads=(2,))
    out = reference_model(x, output_attentions=True)
    (expected,) = torch.autograd.grad(out.last_hidden_state.pow(2).sum(), out.attentions)
    model = _hf_swin(impl=impl, depths=(2,), heads=(2,))
    with TransformerAttentionHooker(model, windows="keep", keep_grad=True) as hooker:
        model(x).last_hidden_state.pow(2).sum().backward()
    assert not hooker.report().missing
    (got,) = hooker.gradients["encoder.layers.0.blocks.1.attention"]
    assert got.shape == (9, 2, 16, 16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
