"""Qwen2-VL and Qwen2.5-VL (``qwen2_vl``, ``qwen2_5_vl``): 2 x 2 merges of the patch grid, in merge-block order.

The image processor resizes each image so both sides are multiples of ``patch_size * merge_size`` (no crop,
no padding), cuts it into a ``grid_h x grid_w`` grid of patches and hands the model one *row* of
``pixel_values`` per patch (its pixels flattened channel first, ``temporal_patch_size`` copies deep). The
rows are not in raster order: they go merge block after merge block (blocks of ``merge x merge`` patches,
raster order over blocks), and inside a block raster order again. The vision tower's merger turns every
``merge^2`` consecutive rows into one language-model token, so image token ``k`` of an image stands for
rows ``merge^2 k ... merge^2 k + merge^2 - 1`` of it: block ``divmod(k, grid_w / merge)`` of the grid.
``image_grid_thw`` gives ``(t, grid_h, grid_w)`` per image, in the order of their image tokens.

Videos (``pixel_values_videos``, ``video_grid_thw``, the video token) go the same way, ``grid_h x grid_w``
patches per temporal step ``t`` (``temporal_patch_size`` input frames each), steps one after another: each
step is a view named ``"frame t"``. Their sources index the rows of ``pixel_values_videos`` *after* those of
``pixel_values``: the unit ``u`` of a video token is row ``u - R`` of ``pixel_values_videos``, ``R`` being the
number of image rows (``image_grid_thw.prod(-1).sum()``, 0 without images).

Qwen2.5-VL's tower reorders the merged cells by attention window inside itself and puts them back in the
order above before they leave it, so its language-model layout is Qwen2-VL's (its tower's own windowed
positions are :func:`attention_hooker.capture.segments.qwen25_vision_positions`).

Images (and videos) are numbered in the order their tokens appear in the batch. Each view is the whole
image as resized, ``box = (0, 0, 1, 1)``, one cell per patch; a token covers ``merge x merge`` cells.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from ...errors import AttentionHookerError
from ..image_tokens import NO_TOKENS_HINT, ImageView, register_image_tokens, table, tokens_where

__all__ = ["qwen_vl_image_tokens"]


def _shown(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}: {value.tolist()!r:.160}"
    return f"{value!r:.160}"


def _grids(inputs, name: str, family: str = "qwen_vl") -> torch.Tensor:
    """``inputs[name]`` as ``(media, 3)`` long ``(t, h, w)`` rows of positive sizes, empty when absent."""
    grid = inputs.get(name)
    if grid is None:
        return torch.zeros(0, 3, dtype=torch.long)
    try:
        value = torch.as_tensor(grid)
    except (TypeError, ValueError, RuntimeError):
        value = None
    if value is not None and value.dim() == 1 and value.numel() == 3:
        value = value[None]
    if value is None or value.dim() != 2 or value.shape[1] != 3 or value.is_floating_point() \
            or value.is_complex() or bool((value <= 0).any()):
        raise AttentionHookerError(
            f"image_token_map: {family}'s {name!r} must be (media, 3) whole numbers (t, h, w) > 0, one row per "
            f"image or video as the processor writes it; got {_shown(grid)}")
    return value.long()


def _media(ids, token_id, grid, merge: int, kind: str, family: str):
    """For each image or video of ``kind``, in token order: ``((batch, first position), batch rows of its
    tokens, their positions, (t, h, w), its first row in its field)``; and the rows of the field in all."""
    batch, position = tokens_where(ids, token_id)
    for t, h, w in grid.tolist():
        if h % merge or w % merge:
            raise AttentionHookerError(
                f"image_token_map: {family} {kind} grid {t} x {h} x {w} is not a multiple of spatial_merge_size "
                f"{merge} in height and width")
    counts = [t * h * w // merge ** 2 for t, h, w in grid.tolist()]
    if sum(counts) != len(position):
        hint = NO_TOKENS_HINT if not len(position) else ""
        raise AttentionHookerError(
            f"image_token_map: {family} has {len(position)} {kind} tokens in input_ids but {kind}_grid_thw "
            f"{grid.tolist()} makes {sum(counts)} ({' + '.join(map(str, counts)) or 'none'}, "
            f"t * h * w / {merge}^2 each){hint}")
    out, start, rows = [], 0, 0
    for (t, h, w), n in zip(grid.tolist(), counts):
        b = batch[start:start + n]
        if bool((b != b[0]).any()):
            raise AttentionHookerError(f"image_token_map: {family} {kind} tokens {start}..{start + n - 1} of "
                                       f"one {kind} ({t} x {h} x {w}) span two batch rows")
        out.append(((int(b[0]), int(position[start])), b, position[start:start + n], (t, h, w), rows))
        start += n
        rows += t * h * w
    return out, rows


@register_image_tokens("qwen2_vl", "qwen2_5_vl")
def qwen_vl_image_tokens(config, inputs, *, processor=None):
    """Image (and video) tokens of Qwen2-VL / Qwen2.5-VL: merge blocks of each ``(t, h, w)`` grid in
    merge-block order. See the module doc.

    Example:
        >>> from transformers import Qwen2VLConfig
        >>> import torch
        >>> from attention_hooker.media import image_token_map
        >>> config = Qwen2VLConfig(vision_config=dict(spatial_merge_size=2), image_token_id=60)
        >>> ids = torch.tensor([[1, 5] + [60] * 6 + [7]])  # one image of 4 x 6 patches: 2 x 3 merges
        >>> tokens = image_token_map(config, dict(input_ids=ids, image_grid_thw=torch.tensor([[1, 4, 6]])))
        >>> tokens.row.tolist(), tokens.col.tolist(), tokens.source[1].tolist()
        ([0, 0, 0, 2, 2, 2], [0, 2, 4, 0, 2, 4], [4, 5, 6, 7])
    """
    family = config.model_type
    merge = int(config.vision_config.spatial_merge_size)
    ids = inputs["input_ids"]
    images, image_rows = _media(ids, config.image_token_id, _grids(inputs, "image_grid_thw", family), merge,
                                "image", family)
    video_id = getattr(config, "video_token_id", None)
    videos, _ = ([], 0) if video_id is None else _media(ids, video_id, _grids(inputs, "video_grid_thw", family),
                                                        merge, "video", family)
    media: List[Tuple] = [(m, 0) for m in images] + [(m, image_rows) for m in videos]
    media.sort(key=lambda item: item[0][0])
    views, rows, sources = [], [], []
    for image, ((_, batch, position, (t, h, w), offset), field_offset) in enumerate(media):
        first = len(views)
        for step in range(t):
            views.append(ImageView(image, step, "image" if t == 1 else f"frame {step}", h, w))
        per_step = (h // merge) * (w // merge)
        for k in range(len(position)):
            step, block = divmod(k, per_step)
            block_row, block_col = divmod(block, w // merge)
            rows.append((int(batch[k]), int(position[k]), image, first + step, block_row * merge,
                         block_col * merge, merge, merge))
            start = field_offset + offset + k * merge * merge
            sources.append(range(start, start + merge * merge))
    return table(family, "sequence", rows, sources, 0, views)
