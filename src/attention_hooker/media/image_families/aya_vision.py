"""Aya Vision (``aya_vision``): pixel-shuffled blocks of SigLIP patches, on tiles plus a global thumbnail.

The image processor (``GotOcr2ImageProcessor``, as InternVL's, :mod:`.internvl`) hands the model, per image,
either one square crop of the tower's ``image_size`` ``S`` or, with ``crop_to_patches``, the tiles of a
``rows x cols`` canvas in raster order then the whole image resized to ``S`` (the thumbnail). The SigLIP tower
gives ``P x P`` patch features per crop (``P = S / patch_size``, no class token: the config's
``vision_feature_select_strategy`` must be ``"full"``, keeping them all); the projector's pixel shuffle stacks
each ``k x k`` block (``k = downsample_factor``) into one feature, blocks in raster order, one image token each.

Unlike InternVL, the processor writes each crop's tokens after a marker of its own (``TILE_1``, ...,
``TILE_GLOBAL``) between the image's ``<|START_OF_IMG|>`` and ``<|END_OF_IMG|>``, so the image tokens of one
image are not one run and the images cannot be told apart from the image tokens alone: the reader needs the
``processor`` (an ``AyaVisionProcessor``; its tokenizer gives the start and end markers' ids). An image with
more than one crop also needs ``image_sizes`` (each image's original ``(height, width)``) in the inputs, to
recompute its canvas with the processor's own rule.

Views: ``"image"`` for a one-crop image; ``"tiles"`` (``rows * P x cols * P`` cells, the tiles put back over
the whole image) and ``"global"`` (the thumbnail, ``P x P``) for a tiled one. A cell is a patch; a token covers
``k x k`` cells. Sources: patch units of ``pixel_values`` ``(crops, 3, S, S)``, crops in order.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch

from ...errors import AttentionHookerError
from ..image_tokens import ImageView, register_image_tokens, table
from .internvl import tiled_canvas
from .paligemma import square_side

__all__ = ["aya_vision_image_tokens"]


def _marker_ids(processor):
    """``(start, end)`` token ids of the image markers, from the processor's tokenizer."""
    if processor is None or not hasattr(processor, "start_of_img_token"):
        raise AttentionHookerError(
            "image_token_map: aya_vision needs its processor (an AyaVisionProcessor) to tell images apart: each "
            "crop's image tokens follow a tile marker, so only the <|START_OF_IMG|> / <|END_OF_IMG|> markers show "
            "where an image begins and ends")
    ids = processor.tokenizer.convert_tokens_to_ids([processor.start_of_img_token, processor.end_of_img_token])
    return int(ids[0]), int(ids[1])


def _images(ids: torch.Tensor, token_id: int, start: int, end: int, family: str):
    """Per image, in reading order: ``(batch row, positions of its image tokens)``."""
    out = []
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        opened = None
        for p, t in enumerate(row):
            if t == start:
                if opened is not None:
                    raise AttentionHookerError(f"image_token_map: {family} row {b} opens an image at {p} inside "
                                               f"the image opened at {opened}")
                opened = p
            elif t == end:
                if opened is None:
                    raise AttentionHookerError(f"image_token_map: {family} row {b} closes an image at {p} that "
                                               "was never opened")
                out.append((b, [q for q in range(opened + 1, p) if row[q] == token_id]))
                opened = None
        if opened is not None:
            raise AttentionHookerError(f"image_token_map: {family} row {b} leaves the image opened at {opened} "
                                       "unclosed")
    return out


@register_image_tokens("aya_vision")
def aya_vision_image_tokens(config, inputs, *, processor=None):
    """Image tokens of Aya Vision: per image (between its start and end markers), its tiles' pixel-shuffled
    blocks tile by tile, then the global thumbnail's (or the one crop's). See the module doc."""
    vision = config.vision_config
    if getattr(config, "vision_feature_select_strategy", "full") != "full" or \
            vision.model_type != "siglip_vision_model":
        raise AttentionHookerError(
            "image_token_map: aya_vision is read with a SigLIP tower (no class token) and "
            f"vision_feature_select_strategy='full' only (got {vision.model_type!r}, "
            f"{getattr(config, 'vision_feature_select_strategy', None)!r}): otherwise a crop's features are not the "
            "square patch grid the pixel shuffle assumes")
    return marked_tile_tokens("aya_vision", config, inputs, _marker_ids(processor),
                              lambda size, tile: tiled_canvas(size, processor, tile))


def marked_tile_tokens(family: str, config, inputs, markers: Tuple[int, int],
                       canvas: Callable[[Tuple[int, int], int], Tuple[int, int]]):
    """The table of pixel-shuffled ``k x k`` blocks (``k = config.downsample_factor``) of square crops, tiles
    in raster order then a global thumbnail, each image's tokens between the ``markers`` ``(start id, end
    id)``; ``canvas((height, width), tile)`` gives a tiled image's ``(rows, cols)`` by its processor's rule.
    Aya Vision's layout (module doc), shared with families that copy it."""
    vision = config.vision_config
    patches = square_side(vision)
    tile = int(vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size)
    k = int(config.downsample_factor)
    if patches % k:
        raise AttentionHookerError(f"image_token_map: {family}'s downsample_factor {k} does not divide the "
                                   f"{patches} patches of a side")
    per_side = patches // k
    per_crop = per_side * per_side
    ids = inputs["input_ids"]
    images = _images(ids, config.image_token_id, *markers, family)
    counted = int((ids == int(config.image_token_id)).sum())
    if sum(len(p) for _, p in images) != counted:
        raise AttentionHookerError(f"image_token_map: {family} has {counted} image tokens, but only "
                                   f"{sum(len(p) for _, p in images)} between image start and end markers")
    sizes = inputs.get("image_sizes")
    views, rows, sources = [], [], []
    crop = 0
    for image, (b, positions) in enumerate(images):
        if not positions or len(positions) % per_crop:
            raise AttentionHookerError(
                f"image_token_map: {family} image {image} has {len(positions)} image tokens, not a positive "
                f"multiple of the {per_crop} each crop takes ({per_side} x {per_side} blocks of {k} x {k} patches)")
        n = len(positions) // per_crop
        if n == 1:
            layout = [(0, 0, 0)]
            views.append(ImageView(image, 0, "image", patches, patches))
        else:
            if sizes is None:
                raise AttentionHookerError(
                    f"image_token_map: {family} image {image} has {n} crops (tiles and a thumbnail); pass "
                    "'image_sizes' (each image's original (height, width)) in the inputs to place its tiles")
            size = tuple(int(v) for v in torch.as_tensor(sizes).reshape(-1, 2)[image].tolist())
            g_rows, g_cols = canvas(size, tile)
            if g_rows * g_cols + 1 != n:
                raise AttentionHookerError(
                    f"image_token_map: {family} image {image} of size {size} is cut into {g_rows} x {g_cols} tiles "
                    f"+ a thumbnail by the processor's rule, but it has {n} crops of image tokens")
            layout = [(0, r, c) for r in range(g_rows) for c in range(g_cols)] + [(1, 0, 0)]
            views.append(ImageView(image, 0, "tiles", g_rows * patches, g_cols * patches))
            views.append(ImageView(image, 1, "global", patches, patches))
        first_view = len(views) - (1 if n == 1 else 2)
        for j, (view, tr, tc) in enumerate(layout):
            for block in range(per_crop):
                r, c = divmod(block, per_side)
                rows.append((b, positions[j * per_crop + block], image, first_view + view,
                             tr * patches + r * k, tc * patches + c * k, k, k))
                sources.append([crop * patches * patches + (r * k + dr) * patches + c * k + dc
                                for dr in range(k) for dc in range(k)])
            crop += 1
    return table(family, "sequence", rows, sources, tile // patches, views)
