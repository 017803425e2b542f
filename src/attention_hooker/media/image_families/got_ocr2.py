"""GOT-OCR 2 (``got_ocr2``): a SAM tower whose convolutions pool 4 x 4 patch blocks, on dynamic tiles.

The image processor (``GotOcr2ImageProcessor``, InternVL's: :mod:`.internvl`) hands the model one square crop
of the tower's ``image_size`` ``S`` per image, or, with ``crop_to_patches``, the tiles of a ``rows x cols``
canvas in raster order then the whole image as a thumbnail. The processor writes each image's tokens as one
run between ``<img>`` and ``</img>``, so a run's length says how many crops it has.

Per crop the SAM tower gives ``P x P`` patch features (``P = S / patch_size``); its neck (a 1 x 1 then a
3 x 3 convolution, padding 1) and the projector's two 3 x 3 convolutions of stride 2 (padding 1) turn them into
``ceil(ceil(P / 2) / 2)`` squared features, raster order, one image token each. Token ``(i, j)`` covers the
4 x 4 block of patches from ``(4i, 4j)`` (its cells), but is *computed from* the patches its convolutions reach:
rows and columns ``4i - 4 ... 4i + 4`` (clipped to the crop), which overlap its neighbours' — its ``source``.

Views: ``"image"`` for a one-crop image; ``"tiles"`` (``rows * P x cols * P`` cells) and ``"thumbnail"`` for a
tiled one, which needs ``image_sizes`` (each image's original ``(height, width)``) and the ``processor`` to
recompute the canvas with the processor's own rule.
"""

from __future__ import annotations

import torch

from ...errors import AttentionHookerError
from ..image_tokens import ImageView, register_image_tokens, table, tokens_where
from .internvl import tiled_canvas
from .paligemma import square_side

__all__ = ["got_ocr2_image_tokens"]

_STRIDE = 4  # the projector's two stride-2 convolutions
_REACH = 4  # the neck's 3 x 3 convolution (1) and the projector's (1, then 2 x 1 at stride 2): 4i - 4 ... 4i + 4


def _runs(batch: torch.Tensor, position: torch.Tensor):
    runs = []
    for i in range(len(position)):
        if i and int(batch[i]) == int(batch[i - 1]) and int(position[i]) == int(position[i - 1]) + 1:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return runs


@register_image_tokens("got_ocr2")
def got_ocr2_image_tokens(config, inputs, *, processor=None):
    """Image tokens of GOT-OCR 2: per image, its tiles' 4 x 4-patch blocks tile by tile, then the thumbnail's
    (or the one crop's); each token's sources are the patches its convolutions reach. See the module doc.

    Example:
        >>> import torch
        >>> from transformers import GotOcr2Config
        >>> from attention_hooker.media import image_token_map
        >>> config = GotOcr2Config(vision_config=dict(image_size=32, patch_size=4), image_token_index=50)
        >>> tokens = image_token_map(config, dict(input_ids=torch.tensor([[3] + [50] * 4 + [4]])))
        >>> tokens.row.tolist(), tokens.col.tolist(), [u for u in tokens.source[0].tolist() if u >= 0][:6]
        ([0, 0, 4, 4], [0, 4, 0, 4], [0, 1, 2, 3, 4, 8])
    """
    vision = config.vision_config
    patches = square_side(vision)
    tile = int(vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size)
    per_side = (patches + _STRIDE - 1) // _STRIDE  # ceil(ceil(P / 2) / 2) = ceil(P / 4)
    per_crop = per_side * per_side
    batch, position = tokens_where(inputs["input_ids"], config.image_token_id)
    runs = _runs(batch, position)
    sizes = inputs.get("image_sizes")
    views, rows, sources = [], [], []
    crop = 0
    for image, (first, length) in enumerate(runs):
        if length % per_crop:
            raise AttentionHookerError(
                f"image_token_map: got_ocr2 image {image} has a run of {length} image tokens, not a multiple of the "
                f"{per_crop} each crop takes ({per_side} x {per_side} of {patches} x {patches} patches)")
        n = length // per_crop
        if n == 1:
            layout = [(0, 0, 0)]
            views.append(ImageView(image, 0, "image", patches, patches))
        else:
            if sizes is None or processor is None:
                raise AttentionHookerError(
                    f"image_token_map: got_ocr2 image {image} has {n} crops (tiles and a thumbnail); pass "
                    "'image_sizes' (each image's original (height, width)) in the inputs and the processor, to "
                    "place its tiles")
            size = tuple(int(v) for v in torch.as_tensor(sizes).reshape(-1, 2)[image].tolist())
            g_rows, g_cols = tiled_canvas(size, processor, tile)
            if g_rows * g_cols + 1 != n:
                raise AttentionHookerError(
                    f"image_token_map: got_ocr2 image {image} of size {size} is cut into {g_rows} x {g_cols} tiles "
                    f"+ a thumbnail by the processor's rule, but its run of image tokens holds {n} crops")
            layout = [(0, r, c) for r in range(g_rows) for c in range(g_cols)] + [(1, 0, 0)]
            views.append(ImageView(image, 0, "tiles", g_rows * patches, g_cols * patches))
            views.append(ImageView(image, 1, "thumbnail", patches, patches))
        first_view = len(views) - (1 if n == 1 else 2)
        for j, (view, tr, tc) in enumerate(layout):
            for block in range(per_crop):
                i, k = divmod(block, per_side)
                t = first + j * per_crop + block
                top, left = i * _STRIDE, k * _STRIDE
                rows.append((int(batch[t]), int(position[t]), image, first_view + view, tr * patches + top,
                             tc * patches + left, min(_STRIDE, patches - top), min(_STRIDE, patches - left)))
                reach_r = range(max(0, top - _REACH), min(patches, top + _REACH + 1))
                reach_c = range(max(0, left - _REACH), min(patches, left + _REACH + 1))
                sources.append([crop * patches * patches + r * patches + c for r in reach_r for c in reach_c])
            crop += 1
    return table("got_ocr2", "sequence", rows, sources, tile // patches, views)
