"""LLaVA-NeXT-Video (``llava_next_video``): LLaVA-NeXT's images, and videos as pooled frames.

Images are read exactly as LLaVA-NeXT's (:mod:`.llava_next`: a base view, then the unpadded tiles with a
row-end token after each row; ``image_sizes`` needed).

Videos. ``pixel_values_videos`` is ``(videos, frames, 3, S, S)``: every frame is resized and cropped to the
tower's square ``image_size`` ``S`` and cut into ``side x side`` patches (class token dropped). The model's
pooler then pools each frame's patch grid with a ``stride x stride`` window at stride ``stride``
(``spatial_pool_stride``; average, max or a strided convolution, ``spatial_pool_mode``), dropping a last
row or column of patches that does not fill a window, and each pooled cell fills one video token: per
frame ``(side // stride)^2`` tokens in raster order, frames one after another, videos in order. Each frame
is a view named ``"frame f"`` of ``side x side`` cells (patches); a token covers ``stride x stride`` of them.
The video tokens of a video must be one contiguous run of ``frames * (side // stride)^2`` tokens.

Sources of video tokens count the units of ``pixel_values_videos`` *after* those of ``pixel_values``:
``(crops in pixel_values) * side^2 + (video * frames + frame) * side^2 + patch``, crops counted with the
processor's zero padding (``pixel_values.reshape(-1, 3, S, S)``), 0 without images. Images and videos are
numbered in the order their tokens appear.

Only ``vision_feature_select_strategy="default"`` is read (with the class token kept a frame's features are
not a square grid the pooler can reshape; LLaVA-NeXT's reader refuses it for images likewise).
"""

from __future__ import annotations

from ...errors import AttentionHookerError
from ..image_tokens import ImageView, register_image_tokens, require, table, tokens_where
from .llava_next import llava_next_image_tokens
from .paligemma import square_side

__all__ = ["llava_next_video_image_tokens"]


def _image_entries(config, inputs, processor):
    """LLaVA-NeXT's table of the images as ``(row tuples, sources, views, patch units used)``; empty without
    image tokens."""
    if not bool((inputs["input_ids"] == int(config.image_token_id)).any()):
        return [], [], [], 0
    tokens = llava_next_image_tokens(config, inputs, processor=processor)
    pixels = inputs["pixel_values"]
    side = square_side(config.vision_config)
    units = pixels.reshape(-1, *pixels.shape[-3:]).shape[0] * side * side
    rows = [tuple(int(t[i]) for t in (tokens.batch, tokens.position, tokens.image, tokens.view, tokens.row,
                                       tokens.col, tokens.height, tokens.width)) for i in range(len(tokens))]
    sources = [[int(u) for u in s if u >= 0] for s in tokens.source]
    return rows, sources, list(tokens.views), units


def _video_entries(config, inputs, offset: int):
    """The video tokens' ``(row tuples, sources, views)``, images numbered from 0 among videos."""
    ids = inputs["input_ids"]
    video_id = getattr(config, "video_token_id", None)
    if video_id is None or not bool((ids == int(video_id)).any()):
        return [], [], []
    videos = require(inputs, "pixel_values_videos", "llava_next_video", "its shape says how many frames each "
                     "video has")
    if videos.dim() != 5:
        raise AttentionHookerError(f"image_token_map: llava_next_video expects pixel_values_videos (videos, frames, "
                                   f"3, S, S), got {tuple(videos.shape)}")
    side = square_side(config.vision_config)
    stride = int(config.spatial_pool_stride)
    pooled = side // stride
    n_videos, frames = int(videos.shape[0]), int(videos.shape[1])
    per_video = frames * pooled * pooled
    batch, position = tokens_where(ids, video_id)
    if len(position) != n_videos * per_video:
        raise AttentionHookerError(
            f"image_token_map: llava_next_video has {len(position)} video tokens in input_ids, but "
            f"pixel_values_videos holds {n_videos} video(s) of {frames} frames, {pooled} x {pooled} pooled cells "
            f"each ({side} x {side} patches pooled by stride {stride}): {n_videos * per_video}")
    rows, sources, views = [], [], []
    for video in range(n_videos):
        first = video * per_video
        b, p = batch[first:first + per_video], position[first:first + per_video]
        if bool((b != b[0]).any()) or bool((p[1:] - p[:-1] != 1).any()):
            raise AttentionHookerError(f"image_token_map: llava_next_video's video {video} tokens "
                                       f"{first}..{first + per_video - 1} are not one run in one batch row")
        for frame in range(frames):
            views.append(ImageView(video, frame, f"frame {frame}", side, side))
        for k in range(per_video):
            frame, cell = divmod(k, pooled * pooled)
            r, c = divmod(cell, pooled)
            rows.append((int(b[k]), int(p[k]), video, len(views) - frames + frame, r * stride, c * stride,
                         stride, stride))
            base = offset + (video * frames + frame) * side * side
            sources.append([base + (r * stride + dr) * side + c * stride + dc
                            for dr in range(stride) for dc in range(stride)])
    return rows, sources, views


@register_image_tokens("llava_next_video")
def llava_next_video_image_tokens(config, inputs, *, processor=None):
    """Image and video tokens of LLaVA-NeXT-Video: images as LLaVA-NeXT's, each video frame's pooled patch
    blocks in raster order. See the module doc.

    Example:
        >>> import torch
        >>> from transformers import LlavaNextVideoConfig
        >>> from attention_hooker.media import image_token_map
        >>> config = LlavaNextVideoConfig(vision_config=dict(image_size=32, patch_size=8, hidden_size=16,
        ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        ...     text_config=dict(model_type="llama", hidden_size=16, num_attention_heads=2, vocab_size=64),
        ...     image_token_index=50, video_token_index=51)
        >>> ids = torch.tensor([[3] + [51] * 8 + [4]])  # 2 frames of 4 x 4 patches, 2 x 2 pooled cells each
        >>> tokens = image_token_map(config, dict(input_ids=ids, pixel_values_videos=torch.zeros(1, 2, 3, 32, 32)))
        >>> [v.name for v in tokens.views], tokens.row.tolist()[:4], tokens.source[5].tolist()
        (['frame 0', 'frame 1'], [0, 0, 2, 2], [18, 19, 22, 23])
    """
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise AttentionHookerError("image_token_map: llava_next_video is read with vision_feature_select_strategy="
                                   f"'default' only (got {config.vision_feature_select_strategy!r})")
    rows, sources, views, units = _image_entries(config, inputs, processor)
    v_rows, v_sources, v_views = _video_entries(config, inputs, units)
    n_images = len({r[2] for r in rows})
    rows += [(b, p, n_images + m, len(views) + v, *rest) for b, p, m, v, *rest in v_rows]
    views += [ImageView(n_images + w.image, w.index, w.name, w.rows, w.cols, w.box) for w in v_views]
    sources += v_sources
    # number images and videos in the order their tokens appear
    first = {}
    for b, p, m, *_ in rows:
        first[m] = min(first.get(m, (b, p)), (b, p))
    order = {m: i for i, m in enumerate(sorted(first, key=first.get))}
    view_order = sorted(range(len(views)), key=lambda v: (order[views[v].image], views[v].index))
    new_view = {v: i for i, v in enumerate(view_order)}
    rows = [(b, p, order[m], new_view[v], *rest) for b, p, m, v, *rest in rows]
    views = [ImageView(order[views[v].image], views[v].index, views[v].name, views[v].rows, views[v].cols,
                       views[v].box) for v in view_order]
    patch = int(config.vision_config.patch_size)
    return table("llava_next_video", "sequence", rows, sources, patch, views)
