"""A Swin overlay on the whole image (issue 24, part 4): a windowed layer's map over its H x W token
grid (no class token, rectangular images) and a stage rollout, drawn where each token lies."""

import numpy as np
import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker, stage_rollout
from attention_hooker.views.vit import plot_swin_attention, swin_attention_map

pytest.importorskip("matplotlib")
transformers = pytest.importorskip("transformers")


def _rendered_patch_brightness(fig, grid, patch, image_size):
    """The brightness of the overlay at the centre of the visible part of each token's patch
    (pixels ``y * ph .. (y + 1) * ph`` cut at the image's edge), read from the rendered picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(float).mean(-1)
    right = fig.axes[1]
    out = np.zeros(grid)
    for y in range(grid[0]):
        for x in range(grid[1]):
            centre = ((x * patch[1] + min((x + 1) * patch[1], image_size[1])) / 2,
                      (y * patch[0] + min((y + 1) * patch[0], image_size[0])) / 2)
            dx, dy = right.transData.transform(centre)
            out[y, x] = pixels[pixels.shape[0] - int(round(dy)), int(round(dx))]
    return out


# Whole patches; and an image the 8-pixel grid overhangs (the model padded it), where a map stretched
# over the image would put token (4, 6) over the middle of patch (3, 5).
@pytest.mark.parametrize("image_size, hot", [((40, 56), (3, 5)), ((33, 49), (4, 6))])
def test_one_hot_key_lands_on_its_patch_of_a_rectangular_image(image_size, hot):
    grid, patch = (5, 7), (8, 8)
    attn = torch.zeros(1, 2, 35, 35)
    attn[..., hot[0] * 7 + hot[1]] = 1.0  # every query, every head: all weight on one token
    image = np.zeros(image_size + (3,))
    # Several whole pixels per token fit either image (8 or 9 down for 40 and 33): refused, then given.
    with pytest.raises(AttentionHookerError, match=rf"5x7 token grid on a {image_size[0]}x{image_size[1]} image "
                                                   r"cannot be read from the sizes .* pass patch_size="):
        plot_swin_attention(attn, image, grid=grid)
    fig = plot_swin_attention(attn, image, grid=grid, query=(0, 0), alpha=1.0, cmap="gray", patch=patch)
    assert fig.axes[1].get_xlim() == (0, image_size[1]) and fig.axes[1].get_ylim() == (image_size[0], 0)
    brightness = _rendered_patch_brightness(fig, grid, patch, image_size)
    assert brightness[hot] > 200
    assert (np.delete(brightness.flatten(), hot[0] * 7 + hot[1]) < 30).all()
    with pytest.raises(AttentionHookerError, match=r"grid=\(5, 6\) holds 30 tokens, but the map has 35 keys"):
        swin_attention_map(attn, grid=(5, 6))


def test_a_swin_layer_s_map_and_rollout_on_a_rectangular_image():
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=40, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                     window_size=4, attn_implementation="eager")
    model = transformers.SwinModel(config).eval()
    x = torch.randn(1, 3, 40, 56)  # 10 x 14 tokens, then 5 x 7
    with torch.no_grad(), TransformerAttentionHooker(model) as dense:
        model(x)
    with torch.no_grad(), TransformerAttentionHooker(model, windows="keep") as kept:
        model(x)
    name = "encoder.layers.0.blocks.1.attention"
    (layer,), (index,) = dense.values[name], kept.window_index[name]
    assert (index.height, index.width) == (10, 14)
    amap = swin_attention_map(layer, grid=(10, 14), query=(2, 9))
    np.testing.assert_array_equal(amap, layer[0, :, 2 * 14 + 9].mean(0).reshape(10, 14).numpy())
    np.testing.assert_array_equal(swin_attention_map(kept.values[name][0], window_index=index, query=(2, 9)), amap)
    rollout = stage_rollout(dense.values, grid=(10, 14))  # (1, 35, 140)
    pooled = swin_attention_map(rollout, grid=(10, 14), heads=None)  # what the mean-pooled output draws on
    np.testing.assert_allclose(pooled, rollout[0].mean(0).reshape(10, 14).numpy(), rtol=1e-6)
    assert abs(pooled.sum() - 1) < 1e-5
    fig = plot_swin_attention(rollout, x[0], grid=(10, 14), heads=None)
    assert fig.axes[1].images[-1].get_extent() == [0, 56, 40, 0]  # 4 pixels a token, the whole image
