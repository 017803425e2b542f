"""Pixtral's layout of image tokens (LLaVA with a Pixtral tower, e.g. pixtral-12b; Mistral 3 adds a merge).

Pixtral takes each image at its own size: the processor resizes it (keeping its aspect ratio) to a multiple
of ``patch * merge`` pixels, pads the batch's images to the largest one in ``pixel_values``
``(images, channels, H, W)`` and writes each image's resized ``(height, width)`` in ``image_sizes``. The
tower keeps only each image's own ``height/patch x width/patch`` patches, in raster order. With
``merge > 1`` (Mistral 3's patch merger) each token is a ``merge x merge`` block of those patches, blocks in
raster order. In the text each image is ``rows`` lines of ``cols`` image tokens, every line closed by one
``[IMG_BREAK]`` token and the last by ``[IMG_END]`` instead; those two are ordinary text tokens here (they
are not image tokens and are not in the table). The grid covers the whole image (the processor neither
crops nor pads an image inside its own size), so each view's box is the whole image.
"""

from __future__ import annotations

from typing import List, Mapping, Tuple

import torch

from ...errors import AttentionHookerError
from ..image_tokens import NO_TOKENS_HINT, ImageView, image_sizes_of, tokens_where

__all__ = ["pixtral_layout"]


def pixtral_layout(family: str, inputs: Mapping, image_token_id: int, patch: int,
                   merge: int = 1) -> Tuple[List[Tuple[int, ...]], List[List[int]], List[ImageView]]:
    """The rows, sources and views of Pixtral-laid-out image tokens, for :func:`~..image_tokens.table`.

    Args:
        family: the model type (for messages).
        inputs: the processor's outputs: ``input_ids`` ``(batch, sequence)``, ``pixel_values``
            ``(images, channels, H, W)`` and ``image_sizes`` (each image's resized ``(height, width)``; when
            absent every image is taken at the full ``H x W``, as the model does).
        image_token_id: the id of the ``[IMG]`` token.
        patch: the tower's patch size in pixels.
        merge: the side of the block of patches merged into one token (1 for Pixtral, 2 for Mistral 3).

    Returns:
        ``(rows, sources, views)``: per-token tuples ``(batch, position, image, view, row, col, height,
        width)``, per-token source units and one view per image (cells are patches; a token covers
        ``merge x merge`` of them).

    Raises:
        AttentionHookerError: pixel values or sizes missing or malformed, a size that is not a multiple of
            ``patch * merge``, a token count that disagrees with the sizes, or an image whose lines of tokens
            are not separated by exactly one (break) token.
    """
    pixels = inputs.get("pixel_values")
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
        raise AttentionHookerError(
            f"image_token_map: {family} (Pixtral layout) needs 'pixel_values' as (images, channels, H, W), got "
            f"{tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__}")
    n, height, width = pixels.shape[0], pixels.shape[-2], pixels.shape[-1]
    if inputs.get("image_sizes") is None:
        sizes = [(height, width)] * n
    else:
        sizes = image_sizes_of(inputs["image_sizes"], family, count=n)
    unit = patch * merge
    for k, (h, w) in enumerate(sizes):
        if h % unit or w % unit or h > height or w > width:
            raise AttentionHookerError(
                f"image_token_map: {family} image {k} has size {h} x {w}, which must be a multiple of {unit} "
                f"(patch {patch} x merge {merge}) and within pixel_values' {height} x {width}")
    batch, position = tokens_where(inputs["input_ids"], image_token_id)
    expected = sum((h // unit) * (w // unit) for h, w in sizes)
    if len(position) != expected:
        hint = NO_TOKENS_HINT if len(position) == 0 else ""
        raise AttentionHookerError(
            f"image_token_map: {family} has {len(position)} image tokens, but image_sizes {sizes} make "
            f"{expected} (one per {unit} x {unit} pixels){hint}")
    units_h, units_w = height // patch, width // patch
    rows, sources, views = [], [], []
    t = 0
    for k, (h, w) in enumerate(sizes):
        r_tokens, c_tokens = h // unit, w // unit
        views.append(ImageView(k, 0, "image", r_tokens * merge, c_tokens * merge))
        line_starts = []
        for r in range(r_tokens):
            for c in range(c_tokens):
                b, p = int(batch[t]), int(position[t])
                if c == 0:
                    line_starts.append((b, p))
                elif (b, p) != (int(batch[t - 1]), int(position[t - 1]) + 1):
                    raise AttentionHookerError(
                        f"image_token_map: {family} image {k}'s line {r} of {c_tokens} tokens is not contiguous at "
                        f"row {b}, position {p}: the text does not lay the image out as its image_sizes say")
                rows.append((b, p, k, k, r * merge, c * merge, merge, merge))
                sources.append([k * units_h * units_w + (r * merge + i) * units_w + c * merge + j
                                for i in range(merge) for j in range(merge)])
                t += 1
        for (b0, p0), (b1, p1) in zip(line_starts, line_starts[1:]):
            if b1 != b0 or p1 != p0 + c_tokens + 1:
                raise AttentionHookerError(
                    f"image_token_map: {family} image {k}'s lines of {c_tokens} tokens are not separated by exactly "
                    f"one [IMG_BREAK] token (lines start at row {b0} position {p0} and row {b1} position {p1}): the "
                    "text does not lay the image out as its image_sizes say")
    return rows, sources, views
