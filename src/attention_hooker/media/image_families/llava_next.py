"""LLaVA-NeXT (``llava_next``): a base view of the whole image, then any-resolution tiles put back, unpadded,
with a row-end token after each row (in the sequence; as views, the tiles are view 0 and the base view 1).

The image processor (``LlavaNextImageProcessor``) picks, from ``image_grid_pinpoints``, the resolution
that best fits the image's original size (``image_sizes``), resizes the image into it keeping its aspect
ratio, pads it evenly on both sides to that resolution and cuts it into square tiles of the tower's
``image_size``; before them it puts the whole image resized to one such square (the *base*). So
``pixel_values`` is ``(images, crops, 3, S, S)`` (crops zero-padded to the batch's most), base first.

The model turns each crop into ``side x side`` patch features (``side = S / patch_size``, class token
dropped), then writes, per image:

1. the base's ``side^2`` features in raster order: view ``"base"`` (index 1) over the whole image;
2. the tiles' patches put back into one ``(tiles_high * side) x (tiles_wide * side)`` patch grid, with
   the rows (or columns) of patches that are mostly padding removed (``unpad``), row by row, each row
   followed by one ``image_newline`` token: view ``"tiles"`` (index 0: the image itself, its tiles put back, as
   :class:`~attention_hooker.media.image_tokens.ImageView` defines view 0), whose ``box`` is the part of the image the
   kept patches cover (a kept edge patch may hold a few pixels of padding, so the box may reach a little
   past 0 or 1).

Row-end tokens. The ``image_newline`` token after each tile row is an image token of the sequence (it
takes the place of an image token id) but stands for no part of the image: it is in the table with no
source and no cell (``height = width = 0``, ``row`` = its row of the tiles view, ``col`` = the view's
``cols``, just past the row's last cell). Its weight counts in the share of attention that went to the
image; it lies on no grid cell. ``tokens.select(tokens.height > 0)`` leaves it out.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

from ...errors import AttentionHookerError
from ..image_tokens import (NO_TOKENS_HINT, ImageView, image_sizes_of, register_image_tokens, require, table,
                            tokens_where)
from .paligemma import square_side

__all__ = ["llava_next_image_tokens", "anyres_tiles", "check_square_processor"]


def _best_resolution(size: Tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> Tuple[int, int]:
    from transformers.image_processing_utils import select_best_resolution  # the processor's own choice

    return tuple(int(v) for v in select_best_resolution(tuple(size), [list(p) for p in pinpoints]))


def anyres_tiles(size: Tuple[int, int], pinpoints, tile: int, patch: int):
    """Where the tiles of an image of original ``size = (height, width)`` put its patches.

    Returns:
        ``(grid, kept, box)``: ``grid = (rows, cols)`` of the tiles' patch grid put back together;
        ``kept = (top, bottom, left, right)``, the patch rows ``[top, bottom)`` and columns ``[left, right)``
        the model keeps after unpadding; ``box``, the fractions of the image those kept patches cover.

    Example:
        >>> anyres_tiles((30, 60), [[32, 64], [64, 32], [64, 64]], tile=32, patch=8)
        ((4, 8), (0, 4, 0, 8), (0.0, 0.0, 1.0, 1.0))
    """
    height, width = (int(v) for v in size)
    best_h, best_w = _best_resolution((height, width), pinpoints)
    if best_h % tile or best_w % tile:
        raise AttentionHookerError(f"image_token_map: image_grid_pinpoints resolution {best_h} x {best_w} is not "
                                   f"made of whole {tile}-pixel tiles")
    rows, cols = best_h // tile * (tile // patch), best_w // tile * (tile // patch)
    # the processor: resize keeping the aspect ratio into (best_h, best_w), pad evenly (extra pixel after)
    if best_w / width < best_h / height:
        new_w, new_h = best_w, min(math.ceil(height * best_w / width), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
    pad_y, pad_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    # the model: unpad in patches, from the original size and the patch grid
    top, bottom, left, right = 0, rows, 0, cols
    if width / height > cols / rows:
        cut = (rows - int(round(height * (cols / width), 7))) // 2
        top, bottom = cut, rows - cut
    else:
        cut = (cols - int(round(width * (rows / height), 7))) // 2
        left, right = cut, cols - cut
    box = ((top * patch - pad_y) / new_h, (left * patch - pad_x) / new_w,
           (bottom * patch - pad_y) / new_h, (right * patch - pad_x) / new_w)
    return (rows, cols), (top, bottom, left, right), box


def check_square_processor(processor, tile: int) -> None:
    """Refuses (``AttentionHookerError``) a processor whose resize or crop size is not the tower's ``tile``:
    the tiles and base would then be cut or scaled again, which the readers here do not place."""
    images = getattr(processor, "image_processor", processor)
    if images is None:
        return
    crop, size = getattr(images, "crop_size", None), getattr(images, "size", None)
    get = (lambda d, k: d.get(k) if isinstance(d, dict) else getattr(d, k, None))
    sides = {get(crop, "height"), get(crop, "width"), get(size, "shortest_edge") or get(size, "height")} - {None}
    if sides and sides != {tile}:
        raise AttentionHookerError(
            f"image_token_map: llava_next's processor resizes to {size} and crops to {crop}, but the tower takes "
            f"{tile}-pixel squares; only a processor whose size and crop are both {tile} is read here")


@register_image_tokens("llava_next")
def llava_next_image_tokens(config, inputs, *, processor=None):
    """Image tokens of LLaVA-NeXT, per image: the base view's patches, then the unpadded tiles' patches row by
    row, each row followed by a row-end token (no source, no cell). Views per image: ``"tiles"`` (index 0),
    then ``"base"`` (index 1), whatever their order in the sequence. See the module doc.

    Example:
        >>> import torch
        >>> from transformers import LlavaNextConfig
        >>> from attention_hooker.media import image_token_map
        >>> config = LlavaNextConfig(vision_config=dict(image_size=32, patch_size=8, hidden_size=16,
        ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        ...     text_config=dict(model_type="llama", hidden_size=16, num_attention_heads=2, vocab_size=64),
        ...     image_grid_pinpoints=[[32, 64], [64, 32]], image_token_index=50)
        >>> ids = torch.tensor([[50] * (16 + 4 * 9) + [7]])  # base 4 x 4, tiles 4 x 8 + 4 row ends
        >>> tokens = image_token_map(config, dict(input_ids=ids, image_sizes=torch.tensor([[30, 60]]),
        ...     pixel_values=torch.zeros(1, 3, 3, 32, 32)))
        >>> [(v.name, v.rows, v.cols) for v in tokens.views], int((tokens.height == 0).sum())
        ([('tiles', 4, 8), ('base', 4, 4)], 4)
    """
    vision = config.vision_config
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise AttentionHookerError("image_token_map: llava_next is read with vision_feature_select_strategy="
                                   f"'default' only (got {config.vision_feature_select_strategy!r}): with the class "
                                   "token kept the tiles' patches do not form a grid")
    side = square_side(vision)
    tile = int(vision.image_size if not isinstance(vision.image_size, (list, tuple)) else vision.image_size[0])
    patch = tile // side
    check_square_processor(processor, tile)
    batch, position = tokens_where(inputs["input_ids"], config.image_token_id)
    if not len(position):
        raise AttentionHookerError(f"image_token_map: the inputs hold no image token of llava_next{NO_TOKENS_HINT}")
    sizes = require(inputs, "image_sizes", "llava_next", "each image's original (height, width) decides its tiles")
    pixels = require(inputs, "pixel_values", "llava_next", "its shape says where each image's crops are")
    sizes = image_sizes_of(sizes, "llava_next")
    crops_per_row = pixels.shape[1] if pixels.dim() == 5 else None
    views, rows, sources = [], [], []
    t, crop = 0, 0  # next image token; first crop of this image in the flattened pixel_values
    for image, size in enumerate(sizes):
        (g_rows, g_cols), (top, bottom, left, right), box = anyres_tiles(size, config.image_grid_pinpoints, tile,
                                                                        patch)
        tiles_wide = g_cols // side
        cells: List[Tuple[int, int, int, List[int]]] = [(r, c, 1, [crop * side * side + r * side + c])
                                                         for r in range(side) for c in range(side)]
        tiles = len(views)
        views.append(ImageView(image, 0, "tiles", bottom - top, right - left, box))
        views.append(ImageView(image, 1, "base", side, side))
        for r in range(top, bottom):
            for c in range(left, right):
                n = 1 + (r // side) * tiles_wide + c // side  # crop of this patch, after the base
                unit = (crop + n) * side * side + (r % side) * side + c % side
                cells.append((r - top, c - left, 1, [unit]))
            cells.append((r - top, right - left, 0, []))
        if t + len(cells) > len(position):
            raise AttentionHookerError(
                f"image_token_map: llava_next image {image} (size {size}) needs {len(cells)} image tokens, but "
                f"input_ids hold only {len(position) - t} more")
        for j, (r, c, extent, units) in enumerate(cells):
            view = tiles + 1 if j < side * side else tiles  # the base's tokens come first in the sequence
            rows.append((int(batch[t + j]), int(position[t + j]), image, view, r, c, extent, extent))
            sources.append(units)
        t += len(cells)
        n_crops = 1 + (g_rows // side) * tiles_wide
        if crops_per_row is not None and n_crops > crops_per_row:
            raise AttentionHookerError(f"image_token_map: llava_next image {image} needs {n_crops} crops, but "
                                       f"pixel_values hold {crops_per_row} per image")
        crop += crops_per_row if crops_per_row is not None else n_crops
    if t != len(position):
        raise AttentionHookerError(f"image_token_map: llava_next images of sizes {sizes} take {t} image tokens, but "
                                   f"input_ids hold {len(position)}")
    return table("llava_next", "sequence", rows, sources, patch, views)
