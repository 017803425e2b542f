"""LLaVA (``llava``): one image token per patch of the CLIP-like tower, in raster order.

The processor resizes (and, for CLIP's processor, center-crops) each image to the tower's square
``image_size``; the tower cuts it into ``(image_size / patch_size)^2`` patches; with
``vision_feature_select_strategy="default"`` the class token is dropped and every patch feature,
projected, fills one image token, images in order, row after row. With ``"full"`` the class token is
kept first: it is placed on its own 1 x 1 view named "class token" over the whole image, computed from
no patch of its own (its ``source`` is empty).
"""

from __future__ import annotations

from ...errors import AttentionHookerError
from ..image_tokens import ImageView, register_image_tokens, table, tokens_where

__all__ = ["llava_image_tokens"]


def _side(vision) -> int:
    size, patch = vision.image_size, vision.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int(size) // int(patch)


@register_image_tokens("llava")
def llava_image_tokens(config, inputs, *, processor=None):
    """Image tokens of LLaVA: image ``j // N``, patch ``j % N`` in raster order (``N = side^2``, plus the
    class token first with the "full" strategy). See the module doc."""
    side = _side(config.vision_config)
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    per_image = side * side + int(full)
    batch, position = tokens_where(inputs["input_ids"], config.image_token_id)
    if len(position) % per_image:
        raise AttentionHookerError(
            f"image_token_map: llava has {len(position)} image tokens, not a multiple of the {per_image} "
            f"each image takes ({side} x {side} patches{' + the class token' if full else ''})")
    views, rows, sources = [], [], []
    for image in range(len(position) // per_image):
        main = len(views)
        views.append(ImageView(image, 0, "image", side, side))
        if full:
            views.append(ImageView(image, 1, "class token", 1, 1))
        for j in range(per_image):
            t = image * per_image + j
            b, p = int(batch[t]), int(position[t])
            if full and j == 0:
                rows.append((b, p, image, main + 1, 0, 0, 1, 1))
                sources.append([])
                continue
            patch = j - int(full)
            r, c = divmod(patch, side)
            rows.append((b, p, image, main, r, c, 1, 1))
            sources.append([image * side * side + patch])
    return table("llava", "sequence", rows, sources, config.vision_config.patch_size, views)
