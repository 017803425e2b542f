"""The Swin overlay with batches, rollouts and padded images (review of the keep change, findings 1,
2, 6, 8 and 9): a rollout is told from a layer's map by its dims and drawn for ``batch_index``; the
pixels a token covers are never guessed from a padded grid that happens to divide the image; the
image drawn is the batch's ``batch_index``; bad input gets the library's error.

Oracles: transformers' Swin itself (its stage grids on a padded image, its maps in a dense capture),
and the rollout's rows read by hand.
"""

import numpy as np
import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker, stage_rollout
from attention_hooker.views.vit import _image_array, plot_swin_attention, plot_vit_attention, swin_attention_map

pytest.importorskip("matplotlib")
transformers = pytest.importorskip("transformers")


def _swin(depths=(2, 2), heads=(2, 2)):
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=40, patch_size=4, embed_dim=16, depths=list(depths),
                                     num_heads=list(heads), window_size=4, attn_implementation="eager")
    return transformers.SwinModel(config).eval()


def _two_images():
    model = _swin()
    x = torch.randn(2, 3, 36, 52)  # 9 x 13 tokens (padded), then 5 x 7
    with torch.no_grad():
        with TransformerAttentionHooker(model, windows="keep") as kept:
            model(x)
        with TransformerAttentionHooker(model) as dense:
            model(x)
    return x, kept, dense


def test_a_rollout_is_drawn_for_its_batch_index_with_the_default_heads():
    x, kept, _ = _two_images()
    rollout = stage_rollout(kept)  # (2, 35, 117)
    assert rollout.shape == (2, 35, 117)
    by_hand = [rollout[b].mean(0).reshape(9, 13).numpy() for b in range(2)]
    assert not np.allclose(by_hand[0], by_hand[1])
    for b in range(2):
        for heads in ("mean", None):  # the default, or said
            np.testing.assert_allclose(swin_attention_map(rollout, grid=(9, 13), batch_index=b, heads=heads),
                                       by_hand[b], rtol=1e-6)
    np.testing.assert_allclose(swin_attention_map(rollout[1], grid=(9, 13), query=4), rollout[1, 4].reshape(9, 13))
    with pytest.raises(AttentionHookerError, match=r"batch_index=5 is out of range for a rollout of 2 image"):
        swin_attention_map(rollout, grid=(9, 13), batch_index=5)
    with pytest.raises(AttentionHookerError, match=r"batch_index=1 is out of range for a rollout of 1 image"):
        swin_attention_map(rollout[0], grid=(9, 13), batch_index=1)
    with pytest.raises(AttentionHookerError, match=r"heads='max': a 3-D map .* read as a rollout .* has no heads"):
        swin_attention_map(rollout, grid=(9, 13), heads="max")


def test_a_layer_map_is_drawn_for_its_batch_index_and_refuses_heads_none():
    x, kept, dense = _two_images()
    name = "encoder.layers.0.blocks.1.attention"
    layer, index = dense.values[name][0], kept.window_index[name][0]
    for b in range(2):
        expected = layer[b, :, 2 * 13 + 9].mean(0).reshape(9, 13).numpy()
        np.testing.assert_array_equal(swin_attention_map(layer, grid=(9, 13), query=(2, 9), batch_index=b), expected)
        np.testing.assert_array_equal(swin_attention_map(kept.values[name][0], window_index=index, query=(2, 9),
                                                         batch_index=b), expected)
    with pytest.raises(AttentionHookerError, match=r"heads=None is for a rollout .* 4-D"):
        swin_attention_map(layer, grid=(9, 13), heads=None)
    with pytest.raises(AttentionHookerError, match=r"batch_index=2 is out of range .* batch size 2"):
        swin_attention_map(layer, grid=(9, 13), batch_index=2)
    with pytest.raises(AttentionHookerError, match=r"kept per window"):  # the call without its index
        swin_attention_map(kept.values[name][0], grid=(4, 4))
    with pytest.raises(AttentionHookerError, match=r"kept per window"):  # nor as a ViT's map
        plot_vit_attention(kept.values[name][0], x[0], prefix_tokens=0)
    with pytest.raises(AttentionHookerError, match=r"window_index must be one call's WindowIndex .* got dict"):
        swin_attention_map(kept.values[name][0], window_index=kept.window_index)


@pytest.mark.parametrize("grid", [(9,), "ab", (-9, -13), (9.0, 13), (True, 13), 9])
def test_a_bad_grid_is_refused_with_what_was_expected(grid):
    rollout = torch.softmax(torch.randn(1, 4, 117), -1)
    with pytest.raises(AttentionHookerError, match=r"grid=.* must be \(height, width\) of the key tokens: two "
                                                   r"positive integers"):
        swin_attention_map(rollout, grid=grid)


@pytest.mark.parametrize("size", [100, 217])
def test_the_pixels_per_token_are_never_read_from_a_padded_grid_that_divides_the_image(size):
    # transformers' Swin on a size x size image: stage grids ceil(size / (4 * 2**s)); at 100 the last
    # is 4 (100 / 4 = 25, but a token there covers 32 pixels), at 217 it is 7 (31 read, 32 right).
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=size, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                     num_heads=[1, 1, 1, 1], window_size=4, attn_implementation="eager")
    model = transformers.SwinModel(config).eval()
    x = torch.rand(1, 3, size, size)
    with torch.no_grad(), TransformerAttentionHooker(model, windows="keep") as kept:
        model(x)
    indices = [i[0] for i in kept.window_index.values()]
    side = -(-size // 32)
    assert [i.height for i in indices] == [-(-size // (4 * 2 ** s)) for s in range(4)] and indices[-1].height == side
    name, (index,) = list(kept.window_index.items())[-1]
    call = kept.values[name][0]
    with pytest.raises(AttentionHookerError, match=rf"{side}x{side} token grid on a {size}x{size} image cannot be "
                                                   r"read from the sizes .* pass patch_size="):
        plot_swin_attention(call, x[0], window_index=index)
    for fig in (plot_swin_attention(call, x[0], window_index=index, patch_size=4),
                plot_swin_attention(call, x[0], window_index=index, patch=(32, 32))):
        assert fig.axes[1].images[-1].get_extent() == [0, 32 * side, 32 * side, 0]
        assert fig.axes[1].get_xlim() == (0, size) and fig.axes[1].get_ylim() == (size, 0)
    with pytest.raises(AttentionHookerError, match=rf"patch=\(24, 24\) cuts the {size}x{size} image into"):
        plot_swin_attention(call, x[0], window_index=index, patch=(24, 24))
    with pytest.raises(AttentionHookerError, match=rf"is no stage of a model with patch_size=3 on a {size}x{size}"):
        plot_swin_attention(call, x[0], window_index=index, patch_size=3)


def test_the_image_drawn_is_the_batch_s_batch_index():
    x, kept, dense = _two_images()
    name = "encoder.layers.0.blocks.1.attention"
    index = kept.window_index[name][0]
    images = torch.rand(2, 3, 36, 52)
    fig = plot_swin_attention(kept.values[name][0], images, window_index=index, batch_index=1, query=(2, 9))
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_array_equal(drawn, images[1].permute(1, 2, 0).numpy())
    overlay = np.asarray(fig.axes[1].images[-1].get_array())
    np.testing.assert_array_equal(overlay, dense.values[name][0][1, :, 2 * 13 + 9].mean(0).reshape(9, 13).numpy())
    assert fig.axes[1].images[-1].get_extent() == [0, 52, 36, 0]  # 4 pixels a token: the only whole number that fits
    vit = torch.softmax(torch.randn(2, 1, 5, 5), -1)
    fig = plot_vit_attention(vit, images[:, :, :8, :8], batch_index=1)
    np.testing.assert_array_equal(np.asarray(fig.axes[0].images[0].get_array()), images[1, :, :8, :8].permute(1, 2, 0))
    with pytest.raises(AttentionHookerError, match=r"batch_index=2 is out of range for the image batch of 2"):
        _image_array(images, 2)
