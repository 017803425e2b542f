"""Matplotlib views: head grids, the overview, ViT overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_hooker import (
    AttentionHookerError,
    TransformerAttentionHooker,
    attention_rollout,
    plot_attention_grid,
    plot_attention_overview,
    plot_vit_attention,
    vit_attention_map,
)

matplotlib = pytest.importorskip("matplotlib")


def _pixels(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def _head_axes(fig):
    return [ax for ax in fig.axes if ax.get_title().startswith("head")]


@pytest.fixture(scope="module")
def minilm_capture(minilm_sdpa, minilm_tokenizer):
    enc = minilm_tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    tokens = minilm_tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
        minilm_sdpa(**enc)
    return hooker, tokens


@pytest.mark.parametrize("ext, magic", [("png", b"\x89PNG"), ("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_grid_writes_valid_files_in_new_folders(tmp_path, minilm_capture, ext, magic):
    hooker, tokens = minilm_capture
    name = "encoder.layer.0.attention.self"
    path = tmp_path / "a" / "b" / f"grid.{ext}"
    fig = plot_attention_grid(hooker.values[name][0], tokens=tokens, layer_name=name, save_path=path)
    assert path.read_bytes()[:5].startswith(magic)
    assert len(_head_axes(fig)) == 12
    panels = _head_axes(fig)
    assert [t.get_text() for t in panels[-1].get_xticklabels()] == tokens  # keys under the bottom row
    assert [t.get_text() for t in panels[0].get_yticklabels()] == tokens  # queries left of the first column
    assert panels[-1].get_xlabel() == "key" and panels[0].get_ylabel() == "query"
    assert fig.axes[-1].get_ylabel() == "attention weight"  # one shared colour bar
    if ext == "png":
        assert _pixels(path).std() > 0.05, "the picture must not be blank"


def test_grid_accepts_numpy_3d_half_and_head_subset(minilm_capture):
    hooker, tokens = minilm_capture
    weights = hooker.values["encoder.layer.1.attention.self"][0]
    fig = plot_attention_grid(weights[0].half().numpy(), tokens=tokens, heads=[3, 5])
    assert [ax.get_title() for ax in _head_axes(fig)] == ["head 3", "head 5"]
    fig = plot_attention_grid(weights.repeat(2, 1, 1, 1), batch_index=1, heads=[0])
    assert len(_head_axes(fig)) == 1


def test_grid_long_sequences_thin_labels():
    fig = plot_attention_grid(torch.rand(1, 1, 300, 300), tokens=[f"t{i}" for i in range(300)], max_labels=30)
    labels = [t.get_text() for t in _head_axes(fig)[0].get_xticklabels()]
    assert 10 <= len(labels) <= 30 and labels[:2] == ["0 t0", "10 t10"]  # thinned: with their places (issue 26)


def test_grid_cross_attention_labels_each_axis(tmp_path):
    attn = torch.rand(1, 2, 3, 5).softmax(-1)
    q_tokens, k_tokens = ["a", "b", "c"], ["v", "w", "x", "y", "z"]
    fig = plot_attention_grid(attn, query_tokens=q_tokens, key_tokens=k_tokens, save_path=tmp_path / "cross.png")
    ax = _head_axes(fig)[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == k_tokens
    assert [t.get_text() for t in ax.get_yticklabels()] == q_tokens
    fig = plot_attention_grid(attn, tokens=k_tokens)  # one list: labels the axis it fits
    assert [t.get_text() for t in _head_axes(fig)[0].get_xticklabels()] == k_tokens


def test_grid_marks_non_finite_weights_instead_of_crashing(tmp_path):
    attn = torch.rand(1, 2, 4, 4)
    attn[0, 1, 2, 2] = float("nan")
    fig = plot_attention_grid(attn, save_path=tmp_path / "nan.png")
    assert [ax.get_title() for ax in _head_axes(fig)] == ["head 0", "head 1 (non-finite in red)"]


def test_grid_errors_say_what_was_expected():
    with pytest.raises(AttentionHookerError, match=r"12 query and 12 key positions, while the number of tokens is 10"):
        plot_attention_grid(torch.rand(1, 2, 12, 12), tokens=[str(i) for i in range(10)])
    with pytest.raises(AttentionHookerError, match=r"expected \(batch, heads, query, key\) or \(heads, query, key\). Received 5-dim"):
        plot_attention_grid(torch.rand(1, 1, 2, 3, 3))
    with pytest.raises(AttentionHookerError, match=r"heads=\[4\] names head\(s\) \[4\], but the attention has 2 heads \(indices 0..1\)"):
        plot_attention_grid(torch.rand(1, 2, 3, 3), heads=[4])
    with pytest.raises(AttentionHookerError, match="batch_index=3 is out of range"):
        plot_attention_grid(torch.rand(1, 2, 3, 3), batch_index=3)


@pytest.mark.parametrize("scale", ["shared", "row"])
def test_overview_has_a_panel_per_head_in_model_order(tmp_path, minilm_capture, scale):
    hooker, _ = minilm_capture
    path = tmp_path / f"overview_{scale}.png"
    fig = plot_attention_overview(hooker, scale=scale, save_path=path)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6 * 12
    row_labels = [ax.get_ylabel() for ax in panels if ax.get_ylabel()]
    assert row_labels == [f"layer.{i}" for i in range(6)], "the part of the names that differs"
    colorbars = [ax for ax in fig.axes if not ax.images and ax.collections]
    assert len(colorbars) == (1 if scale == "shared" else 6)
    assert _pixels(path).std() > 0.05


def test_overview_errors():
    with pytest.raises(AttentionHookerError, match="nothing to show"):
        plot_attention_overview({})
    with pytest.raises(AttentionHookerError, match=r"unknown layer\(s\) \['x'\]; known layers: \['a'\]"):
        plot_attention_overview({"a": [torch.rand(1, 1, 2, 2)]}, layers=["x"])
    with pytest.raises(AttentionHookerError, match="scale='log' must be"):
        plot_attention_overview({"a": [torch.rand(1, 1, 2, 2)]}, scale="log")


def test_vit_map_handles_class_register_tokens_and_non_square_grids():
    attn = torch.zeros(1, 2, 1 + 4 + 6, 1 + 4 + 6)
    attn[0, :, 0, 5:] = torch.arange(6.0)  # the class token looks at the 6 patches, increasingly
    amap = vit_attention_map(attn, prefix_tokens=5, grid=(2, 3))
    np.testing.assert_allclose(amap, np.arange(6.0).reshape(2, 3))
    assert vit_attention_map(attn, prefix_tokens=5, image_shape=(20, 30)).shape == (2, 3)
    assert vit_attention_map(attn, prefix_tokens=5, image_shape=(30, 20)).shape == (3, 2)
    with pytest.raises(AttentionHookerError, match="do not form a square grid"):
        vit_attention_map(attn, prefix_tokens=5)


def test_vit_overlay_on_a_timm_model_with_rollout(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(32, 48), patch_size=8, depth=2,
                              reg_tokens=2).eval()
    image = torch.rand(3, 32, 48)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(image[None])
    rollout = attention_rollout(hooker.values)  # (1, 1 + 2 + 24, 27)
    path = tmp_path / "vit.png"
    fig = plot_vit_attention(rollout, image, heads=None, prefix_tokens=3, save_path=path)
    assert "4x6 patches" in fig.axes[1].get_title()
    assert _pixels(path).std() > 0.05
    fig = plot_vit_attention(hooker.values["blocks.1.attn"][0], image.permute(1, 2, 0).numpy(), prefix_tokens=3, heads=1)
    assert fig.axes[1].images


def test_overview_rows_are_labelled_by_the_part_of_the_layer_names_that_differs():
    from attention_hooker import plot_attention_overview

    names = [f"encoder.layer.{i}.attention.self" for i in range(3)]
    fig = plot_attention_overview({name: [torch.rand(1, 2, 4, 4).softmax(-1)] for name in names})
    labels = [ax.get_ylabel() for ax in fig.axes if ax.images and ax.get_ylabel()]
    assert labels == ["layer.0", "layer.1", "layer.2"]


@pytest.mark.parametrize("heads", [4, 64])
def test_stats_heatmaps_read_well_with_few_heads_and_with_many(heads, tmp_path, monkeypatch):
    """Issue 13: with few heads the title was cut, ticks read "0.0 2.5", an offset sat over the
    title and the colour bar had no unit."""
    from attention_hooker import HeadStatsAccumulator
    from attention_hooker.cli import workflows
    from attention_hooker.views import plot

    accumulator = HeadStatsAccumulator()
    accumulator.update({f"encoder.layer.{i}.attention.self": [(torch.randn(1, heads, 5, 5) * 1e-3).softmax(-1)]
                        for i in range(2)})
    figures = []
    real_save = plot.save_figure
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path))
    workflows.write_statistics(accumulator, tmp_path)
    assert len(figures) == 4
    for fig in figures:
        fig.canvas.draw()
        ax = fig.axes[0]
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert all(t.isdigit() for t in ticks) and ticks[0] == "0", ticks
        assert len(ticks) <= 32
        title = ax.title.get_window_extent()
        assert title.x0 >= 0 and title.x1 <= fig.bbox.x1, "the title fits the picture"
        bar = fig.axes[1]
        assert bar.get_ylabel() in ("entropy (nats)", "mean distance (tokens)", "share of attention (0-1)")
        assert bar.yaxis.get_offset_text().get_text() == "", "no offset written over the title"


@pytest.mark.parametrize("tokens", [10, 512, 2000])
def test_grids_of_long_inputs_can_brighten_small_weights_and_thin_their_labels(tokens):
    """Issue 13: grids at 512 tokens were almost black, with no sqrt/log/vmax choice."""
    weights = torch.randn(1, 2, tokens, tokens).softmax(-1)  # most weights near 1/tokens
    labels = [f"t{i}" for i in range(tokens)]
    brightness = {}
    for scale in ("linear", "sqrt", "log"):
        fig = plot_attention_grid(weights, labels, color_scale=scale)
        image = fig.axes[0].images[0]
        brightness[scale] = float(np.asarray(image.norm(image.get_array())).mean())
        assert scale == "linear" or f"({scale} scale)" in fig.axes[-1].get_ylabel()
        assert len([t for t in fig.axes[0].get_xticklabels() if t.get_text()]) <= 40
    if tokens >= 512:
        assert brightness["sqrt"] > 3 * brightness["linear"] and brightness["log"] > brightness["sqrt"]
    fig = plot_attention_grid(weights, color_scale="linear", vmax=0.01)
    assert fig.axes[0].images[0].norm.vmax == 0.01
    with pytest.raises(AttentionHookerError, match="color_scale='gamma' must be one of linear, sqrt, log"):
        plot_attention_grid(weights, color_scale="gamma")


def test_the_image_views_refuse_a_map_over_channels():
    """XCiT's map is a softmax over each head's channels: drawn on the patch grid it would put channels where
    patches are. Before, vit_attention_map and swin_attention_map drew it (they refused only per-window calls)."""
    from attention_hooker import swin_attention_map
    from attention_hooker._map_kinds import channels, mark_kind

    over_channels = torch.softmax(torch.randn(1, 2, 5, 5), -1)
    mark_kind(over_channels, channels("XCiT's channel map", "over channels"))
    with pytest.raises(AttentionHookerError, match="channels of each head, not the image's tokens"):
        vit_attention_map(over_channels)
    with pytest.raises(AttentionHookerError, match="channels of each head, not the image's tokens"):
        swin_attention_map(over_channels, grid=(1, 5))
    with pytest.raises(AttentionHookerError, match="channels of each head"):
        vit_attention_map(over_channels[:, :1])  # a slice keeps the mark
    assert vit_attention_map(over_channels.clone()).shape == (2, 2)  # the user's own copy is drawn
