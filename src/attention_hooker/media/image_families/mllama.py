"""Mllama (``mllama``): the text reads the image only through cross-attention, over tiles of patches.

Mllama's language model holds no image token in its sequence for attention purposes: the ``<|image|>``
token only marks where the image is. The image reaches the text through the cross-attention layers
(``config.text_config.cross_attention_layers``), whose keys are, per batch row, every image slot x every
tile slot x (one class token + the tile's patches in raster order)::

    key = ((image_slot * max_tiles) + tile) * (1 + side * side) + (0 for the class token, 1 + patch)

with ``side = image_size / patch_size`` (``image_size`` is the tile size) and ``max_tiles =
config.vision_config.max_num_tiles``. The table is read along that key axis (``axis="cross"``).

Tiling. ``MllamaImageProcessor`` picks a canvas of ``th x tw`` tiles (``aspect_ratio_ids`` indexes
``config.vision_config.supported_aspect_ratios``, as ``(tiles high, tiles wide)``, from 1), resizes the
image into it keeping its aspect ratio, pads the canvas at the bottom and right with zeros, and cuts it
into tiles in raster order. Here the tiles are put back: each image has one view "tiles" of
``th * side x tw * side`` cells. Its box covers the whole canvas; given the images' original sizes
(``inputs["image_sizes"]``, ``(height, width)`` per image), the part of the canvas the resized image
fills is recomputed and the box is in fractions of that image (``bottom``/``right`` above 1 where the
processor padded). Without the sizes the view is named "tiles (padded canvas)" and its box is in
fractions of the canvas, padding included.

Class tokens. Each tile's class token is a key too; it stands for no patch (its ``source`` is empty). It
lies on its own 1 x 1 view "class token of tile t", whose box is its tile's box.

Padding. Image slots with ``aspect_ratio_ids == 0`` (a row with fewer images than the batch's most) and
tile slots past an image's ``th * tw`` tiles are keys as well, computed from the processor's zero
padding and masked out by ``cross_attention_mask``; they are not image tokens and are left out.

Rows that mean nothing. A text token that ``cross_attention_mask`` lets see no image (text before the
first ``<|image|>``) has its whole row unmasked by Mllama (padding keys included) and the layer's output
for it multiplied by zero: its cross-attention row is computed but discarded, so read only the rows of
tokens after an image.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from ...errors import AttentionHookerError
from ..image_tokens import ImageView, image_sizes_of, register_image_tokens, require, table

__all__ = ["mllama_image_tokens", "mllama_fitted_size"]


def mllama_fitted_size(height: int, width: int, tiles_high: int, tiles_wide: int, tile: int) -> Tuple[int, int]:
    """The size ``(height, width)`` an image of ``height x width`` pixels is resized to inside a canvas of
    ``tiles_high x tiles_wide`` tiles of ``tile`` pixels (aspect ratio kept; never smaller than one tile
    nor larger than the canvas on a side, as MllamaImageProcessor does).

    Example:
        >>> mllama_fitted_size(20, 40, 1, 2, 16)
        (16, 32)
    """
    canvas_h, canvas_w = tiles_high * tile, tiles_wide * tile
    goal_h = min(max(height, tile), canvas_h)  # each side clamped into [tile, canvas side]
    goal_w = min(max(width, tile), canvas_w)
    ratio_h, ratio_w = goal_h / height, goal_w / width
    if ratio_w < ratio_h:  # width is the binding side: it takes its goal, height follows the ratio
        return min(math.floor(height * ratio_w) or 1, goal_h), goal_w
    return goal_h, min(math.floor(width * ratio_h) or 1, goal_w)


def _sizes(inputs, images: int) -> Optional[List[Tuple[int, int]]]:
    raw = inputs.get("image_sizes")
    return None if raw is None else image_sizes_of(raw, "mllama", count=images)


def _long(value, name: str) -> torch.Tensor:
    try:
        out = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        out = None
    if out is None or out.is_floating_point() or out.is_complex():
        raise AttentionHookerError(f"image_token_map: mllama's {name!r} must be whole numbers (a tensor or nested "
                                   f"lists, as the processor writes it); got {value!r:.200}")
    return out.long()


def _check_tile(config, processor) -> Tuple[int, int]:
    vision = config.vision_config
    tile, patch = int(vision.image_size), int(vision.patch_size)
    if tile % patch:
        raise AttentionHookerError(f"image_token_map: mllama tile size {tile} is not a multiple of the patch size "
                                   f"{patch}")
    processor = getattr(processor, "image_processor", processor)  # a whole MllamaProcessor, or its image processor
    size = getattr(processor, "size", None) if processor is not None else None
    if size is not None:
        height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
        if height is not None and int(height) != tile:
            raise AttentionHookerError(f"image_token_map: the processor cuts {height}-pixel tiles but the vision tower "
                                       f"takes image_size={tile}")
    return tile, patch


@register_image_tokens("mllama")
def mllama_image_tokens(config, inputs, *, processor=None):
    """Image keys of Mllama's cross-attention layers: every patch of every real tile, on its image's tile
    grid, and each tile's class token on a view of its own. See the module doc.

    Args:
        config: an ``MllamaConfig``.
        inputs: the processor's outputs: ``input_ids``, ``aspect_ratio_ids (batch, images)``,
            ``aspect_ratio_mask (batch, images, max_tiles)``; optionally ``image_sizes`` (the original
            ``(height, width)`` of each image, in batch order) to put boxes in fractions of the images.
        processor: optional; if given, its tile size must be the tower's ``image_size``.

    Returns:
        An :class:`~attention_hooker.media.ImageTokens` with ``axis="cross"``.
    """
    tile, patch = _check_tile(config, processor)
    side = tile // patch
    per_tile = 1 + side * side
    max_tiles = int(config.vision_config.max_num_tiles)
    ratios: Sequence = config.vision_config.supported_aspect_ratios
    ids = _long(require(inputs, "aspect_ratio_ids", "mllama", "which tile arrangement each image has"),
                "aspect_ratio_ids")
    mask = _long(require(inputs, "aspect_ratio_mask", "mllama", "which tile slots hold tiles"), "aspect_ratio_mask")
    batch_size = inputs["input_ids"].shape[0]
    if ids.dim() != 2 or ids.shape[0] != batch_size or tuple(mask.shape) != (*ids.shape, max_tiles):
        raise AttentionHookerError(
            f"image_token_map: mllama expects aspect_ratio_ids (batch={batch_size}, images) and aspect_ratio_mask "
            f"(batch, images, max_num_tiles={max_tiles}); got {tuple(ids.shape)} and {tuple(mask.shape)}")
    pixels = inputs.get("pixel_values")
    if pixels is not None and tuple(pixels.shape[:3]) + tuple(pixels.shape[-2:]) != (*ids.shape, max_tiles, tile, tile):
        raise AttentionHookerError(
            f"image_token_map: mllama pixel_values {tuple(pixels.shape)} do not match (batch, images) "
            f"{tuple(ids.shape)}, {max_tiles} tiles of {tile} x {tile} pixels")
    slots = [(b, m) for b in range(ids.shape[0]) for m in range(ids.shape[1]) if int(ids[b, m]) != 0]
    sizes = _sizes(inputs, len(slots))
    views: List[ImageView] = []
    rows, sources = [], []
    for image, (b, m) in enumerate(slots):
        code = int(ids[b, m])
        if not 1 <= code <= len(ratios):
            raise AttentionHookerError(f"image_token_map: mllama aspect_ratio_ids[{b}, {m}] = {code} is not one of the "
                                       f"{len(ratios)} supported aspect ratios (1..{len(ratios)}, 0 = no image)")
        high, wide = (int(x) for x in ratios[code - 1])
        used = [int(x) for x in mask[b, m].tolist()]
        if used != [1] * (high * wide) + [0] * (max_tiles - high * wide):
            raise AttentionHookerError(f"image_token_map: mllama image ({b}, {m}) has {high} x {wide} tiles "
                                       f"(aspect ratio id {code}) but aspect_ratio_mask marks {used}")
        if sizes is None:
            name, bottom, right = "tiles (padded canvas)", 1.0, 1.0
        else:
            fit_h, fit_w = mllama_fitted_size(*sizes[image], high, wide, tile)
            name, bottom, right = "tiles", high * tile / fit_h, wide * tile / fit_w
        grid = len(views)
        views.append(ImageView(image, 0, name, high * side, wide * side, (0.0, 0.0, bottom, right)))
        for t in range(high * wide):
            tr, tc = divmod(t, wide)
            box = (bottom * tr / high, right * tc / wide, bottom * (tr + 1) / high, right * (tc + 1) / wide)
            views.append(ImageView(image, 1 + t, f"class token of tile {t}", 1, 1, box))
            crop = (b * ids.shape[1] + m) * max_tiles + t
            first = (m * max_tiles + t) * per_tile
            rows.append((b, first, image, grid + 1 + t, 0, 0, 1, 1))
            sources.append([])
            for p in range(side * side):
                pr, pc = divmod(p, side)
                rows.append((b, first + 1 + p, image, grid, tr * side + pr, tc * side + pc, 1, 1))
                sources.append([crop * side * side + p])
    return table("mllama", "cross", rows, sources, patch, views, keys=ids.shape[1] * max_tiles * per_tile)
