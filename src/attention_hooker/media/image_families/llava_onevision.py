"""LLaVA-OneVision (``llava_onevision``): LLaVA-NeXT's base view + unpadded any-resolution tiles, with the
tiles' grid shrunk (bilinearly) when it holds too many patches, and untiled images in multi-image rows.

Per image, as for LLaVA-NeXT (:mod:`.llava_next`): the base view's ``side^2`` patches (no row end), then the
tiles put back and unpadded, row by row, each row followed by a row-end ``image_newline`` token (a marker:
no source, no cell); as views, the tiles are view 0 (the image itself, its tiles put back) and the base
view 1, whatever their order in the sequence. Two differences:

* ``vision_aspect_ratio = "anyres_max_N"``: when the unpadded grid of ``h x w`` patches holds more than
  about ``N`` tiles' worth (``ratio = sqrt(h * w / (N * side^2)) > 1.1``), the model resizes it to
  ``int(h // ratio) x int(w // ratio)`` with bilinear interpolation. The ``"tiles"`` view is then that
  smaller grid over the same part of the image, one token per cell, and each token's sources are the
  (up to 2 x 2) patches the interpolation weighs in.
* Rows holding several images (``batch_num_images`` > 1): the processor pads each image to a square (the
  image centered) and the model takes it as one crop, ``side^2`` tokens and one row end: view ``"image"``,
  whose box reaches past the image on the sides the padding was added.

Videos. A call whose inputs hold videos (``pixel_values_videos``, ``(videos, frames, 3, S, S)``, each
frame resized to the square) and no images is read as a table of *video* tokens (``video_token_id``): per
video (its ``image`` index), each frame's ``side x side`` patch features shrunk bilinearly to
``ceil(side / 2)`` a side (view ``"frame f"``, each token's sources the up to 2 x 2 patches weighed in),
frames in order, then one row-end token after the last frame (a marker on the last frame's view). Their
``source`` units are those of ``pixel_values_videos`` (frames counted over all videos, as crops are). A
call holding both images and videos is refused: one table has one kind of unit.
"""

from __future__ import annotations

import math
from typing import List, Tuple

from ...errors import AttentionHookerError
from ..image_tokens import ImageView, image_sizes_of, register_image_tokens, require, table, tokens_where
from .llava_next import anyres_tiles, check_square_processor
from .paligemma import square_side

__all__ = ["llava_onevision_image_tokens", "bilinear_sources"]


def bilinear_sources(n_in: int, n_out: int) -> List[List[int]]:
    """For each of ``n_out`` outputs of a 1-D bilinear resize (``align_corners=False``) of ``n_in`` inputs,
    the inputs it weighs in with a non-zero weight.

    Example:
        >>> bilinear_sources(4, 2)
        [[0, 1], [2, 3]]
        >>> bilinear_sources(3, 3)
        [[0], [1], [2]]
    """
    scale = n_in / n_out
    out = []
    for dst in range(n_out):
        src = max((dst + 0.5) * scale - 0.5, 0.0)
        low = int(math.floor(src))
        high = min(low + 1, n_in - 1)
        out.append([low] + ([high] if src - low > 0 and high != low else []))
    return out


def _tile_unit(r: int, c: int, crop: int, side: int, tiles_wide: int) -> int:
    """The ``pixel_values`` unit of patch ``(r, c)`` of the tiles' grid put back (the image's base is crop
    ``crop``, its tiles follow in raster order)."""
    n = 1 + (r // side) * tiles_wide + c // side
    return (crop + n) * side * side + (r % side) * side + c % side


def _video_tokens(config, inputs):
    """Video tokens of LLaVA-OneVision (see the module doc): per video, its frames' shrunk patch grids, then
    one row end."""
    side = square_side(config.vision_config)
    patch = int(config.vision_config.patch_size)
    videos = inputs["pixel_values_videos"]
    if videos.dim() != 5:
        raise AttentionHookerError(f"image_token_map: llava_onevision expected pixel_values_videos as (videos, "
                                   f"frames, 3, H, W), got {tuple(videos.shape)}")
    n_videos, frames = videos.shape[:2]
    small = math.ceil(side / 2)
    pick = bilinear_sources(side, small)
    per_video = frames * small * small + 1
    batch, position = tokens_where(inputs["input_ids"], config.video_token_id)
    if len(position) != n_videos * per_video:
        raise AttentionHookerError(
            f"image_token_map: llava_onevision's {n_videos} video(s) of {frames} frames take {per_video} video tokens "
            f"each ({small} x {small} per frame + a row end), but input_ids hold {len(position)}")
    views, rows, sources = [], [], []
    for video in range(n_videos):
        for f in range(frames):
            views.append(ImageView(video, f, f"frame {f}", small, small))
            unit = (video * frames + f) * side * side
            for r in range(small):
                for c in range(small):
                    t = video * per_video + f * small * small + r * small + c
                    rows.append((int(batch[t]), int(position[t]), video, len(views) - 1, r, c, 1, 1))
                    sources.append([unit + i * side + j for i in pick[r] for j in pick[c]])
        t = (video + 1) * per_video - 1
        rows.append((int(batch[t]), int(position[t]), video, len(views) - 1, small - 1, small, 0, 0))
        sources.append([])
    return table("llava_onevision", "sequence", rows, sources, patch, views)


def _max_tiles(config) -> int:
    text = str(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
    if not text.startswith("anyres_max_") or not text[len("anyres_max_"):].isdigit():
        raise AttentionHookerError(f"image_token_map: llava_onevision reads vision_aspect_ratio 'anyres_max_N' only, "
                                   f"got {text!r}")
    return int(text[len("anyres_max_"):])


@register_image_tokens("llava_onevision")
def llava_onevision_image_tokens(config, inputs, *, processor=None):
    """Image tokens of LLaVA-OneVision, per image: base view, then tiles (shrunk where the model shrinks
    them) row by row with a row end after each row; or, in multi-image rows, one square view and a row end.
    See the module doc.

    Example:
        >>> import torch
        >>> from transformers import LlavaOnevisionConfig
        >>> from attention_hooker.media import image_token_map
        >>> config = LlavaOnevisionConfig(vision_config=dict(model_type="siglip_vision_model", image_size=32,
        ...     patch_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        ...     text_config=dict(model_type="qwen2", hidden_size=16, num_attention_heads=2, vocab_size=64),
        ...     image_grid_pinpoints=[[32, 64], [64, 32]], image_token_index=50, vision_aspect_ratio="anyres_max_1")
        >>> ids = torch.tensor([[50] * (16 + 2 * 6) + [7]])  # base 4 x 4; tiles 4 x 8 shrunk to 2 x 5, row ends
        >>> tokens = image_token_map(config, dict(input_ids=ids, image_sizes=torch.tensor([[30, 60]]),
        ...     pixel_values=torch.zeros(1, 3, 3, 32, 32)))
        >>> [(v.name, v.rows, v.cols) for v in tokens.views]
        [('tiles', 2, 5), ('base', 4, 4)]
    """
    if inputs.get("pixel_values_videos") is not None:
        if inputs.get("pixel_values") is not None:
            raise AttentionHookerError("image_token_map: llava_onevision reads images or videos in one call, not both "
                                       "(their source units are of different tensors); pass them separately")
        return _video_tokens(config, inputs)
    vision = config.vision_config
    # the features must be exactly the patches: drop the class token of a CLIP tower, keep all of SigLIP's
    wanted = "default" if str(getattr(vision, "model_type", "")).startswith("clip") else "full"
    if getattr(config, "vision_feature_select_strategy", wanted) != wanted:
        raise AttentionHookerError(
            f"image_token_map: llava_onevision with a {vision.model_type} tower is read with "
            f"vision_feature_select_strategy={wanted!r} only (got {config.vision_feature_select_strategy!r}): "
            "otherwise its features are not one per patch")
    side = square_side(vision)
    tile = int(vision.image_size if not isinstance(vision.image_size, (list, tuple)) else vision.image_size[0])
    patch = tile // side
    most = _max_tiles(config)
    check_square_processor(processor, tile)
    sizes = require(inputs, "image_sizes", "llava_onevision", "each image's original (height, width) decides "
                    "its tiles")
    pixels = require(inputs, "pixel_values", "llava_onevision", "its shape says where each image's crops are")
    sizes = image_sizes_of(sizes, "llava_onevision")
    counts = inputs.get("batch_num_images")
    tiled = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts.reshape(-1).tolist()
                                                         for _ in range(int(n))]
    if len(tiled) != len(sizes):
        raise AttentionHookerError(f"image_token_map: llava_onevision batch_num_images={counts.tolist()} counts "
                                   f"{len(tiled)} images, image_sizes {len(sizes)}")
    crops_per_image = pixels.shape[1] if pixels.dim() == 5 else None
    batch, position = tokens_where(inputs["input_ids"], config.image_token_id)
    views, rows, sources = [], [], []
    t, crop = 0, 0
    for image, (size, patched) in enumerate(zip(sizes, tiled)):
        cells: List[Tuple[int, int, int, int, List[int]]] = []  # (view offset, row, col, extent, units), in
        # sequence order: an image's base (view offset 1) comes before its tiles (view offset 0)
        first = len(views)
        if not patched:  # padded to a square, one crop, a row end after it
            h, w = size
            m = max(h, w)
            py, px = (m - h) // 2, (m - w) // 2
            views.append(ImageView(image, 0, "image", side, side, (-py / h, -px / w, (m - py) / h, (m - px) / w)))
            cells += [(0, r, c, 1, [crop * side * side + r * side + c]) for r in range(side) for c in range(side)]
            cells.append((0, side - 1, side, 0, []))
            n_crops = 1
        else:
            (g_rows, g_cols), (top, bottom, left, right), box = anyres_tiles(size, config.image_grid_pinpoints,
                                                                            tile, patch)
            tiles_wide = g_cols // side
            n_crops = 1 + (g_rows // side) * tiles_wide
            cells += [(1, r, c, 1, [crop * side * side + r * side + c]) for r in range(side) for c in range(side)]
            h, w = bottom - top, right - left
            ratio = math.sqrt(h * w / (most * side * side))
            if ratio > 1.1:
                out_h, out_w = int(h // ratio), int(w // ratio)
                by_row, by_col = bilinear_sources(h, out_h), bilinear_sources(w, out_w)
            else:
                out_h, out_w = h, w
                by_row, by_col = [[r] for r in range(h)], [[c] for c in range(w)]
            views += [ImageView(image, 0, "tiles", out_h, out_w, box), ImageView(image, 1, "base", side, side)]
            for r in range(out_h):
                for c in range(out_w):
                    cells.append((0, r, c, 1, [_tile_unit(top + i, left + j, crop, side, tiles_wide)
                                               for i in by_row[r] for j in by_col[c]]))
                cells.append((0, r, out_w, 0, []))
        if t + len(cells) > len(position):
            raise AttentionHookerError(
                f"image_token_map: llava_onevision image {image} (size {size}) needs {len(cells)} image tokens, but "
                f"input_ids hold only {len(position) - t} more")
        for j, (offset, r, c, extent, units) in enumerate(cells):
            rows.append((int(batch[t + j]), int(position[t + j]), image, first + offset, r, c, extent, extent))
            sources.append(units)
        t += len(cells)
        if crops_per_image is not None and n_crops > crops_per_image:
            raise AttentionHookerError(f"image_token_map: llava_onevision image {image} needs {n_crops} crops, but "
                                       f"pixel_values hold {crops_per_image} per image")
        crop += crops_per_image if crops_per_image is not None else n_crops
    if t != len(position):
        raise AttentionHookerError(f"image_token_map: llava_onevision images of sizes {sizes} take {t} image tokens, "
                                   f"but input_ids hold {len(position)}")
    return table("llava_onevision", "sequence", rows, sources, patch, views)
