"""Gemma 3 (``gemma3``): SigLIP patches average-pooled in square blocks, plus pan-and-scan crops.

The image processor (``Gemma3ImageProcessor``) resizes each image to the tower's square ``image_size``
(aspect ratio not kept). The tower cuts it into ``P x P`` patches (``P = image_size / patch_size``); the
projector average-pools them in ``k x k`` blocks (``k = P / sqrt(mm_tokens_per_image)``) and each block,
in raster order, fills one image token: a token covers ``k x k`` cells of its view (a cell = a patch).

Pan and scan. With ``do_pan_and_scan``, the processor also cuts a very wide (tall) image into ``n``
side-by-side (stacked) crops of its original pixels, ``ceil(width / n)`` (``ceil(height / n)``) wide
(high), the last one cut short at the edge, each resized to the square on its own. ``pixel_values``
then hold, per image, the whole image and then its crops; the text holds the whole image's tokens
first, then each crop's, in the same order. Each crop is its own view (``"crop 0"``, ``"crop 1"``...)
whose ``box`` is the part of the image it was cut from; the whole image is view 0 (``"image"``).

The crops cannot be told from separate images by the token ids, and ``Gemma3Processor`` drops its
image processor's ``num_crops`` from its outputs. So: pass ``num_crops`` (one count per image, from the
image processor's outputs) and ``image_sizes`` (each image's ``(height, width)`` before processing)
with the inputs when pan and scan made crops. Without ``num_crops`` every image is taken to have no
crop, which is refused when the ``processor`` passed says pan and scan is on.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from ...errors import AttentionHookerError
from ..image_tokens import ImageView, register_image_tokens, table, tokens_where
from .paligemma import square_side

__all__ = ["gemma3_image_tokens", "pan_and_scan_boxes"]

Box = Tuple[float, float, float, float]


def pan_and_scan_boxes(height: int, width: int, crops: int) -> List[Box]:
    """The ``(top, left, bottom, right)`` fractions of a ``height x width`` image that each of its
    ``crops`` pan-and-scan crops was cut from (side by side if ``width >= height``, else stacked).

    Example:
        >>> pan_and_scan_boxes(30, 100, 3)  # 34 + 34 + 32 pixels wide
        [(0.0, 0.0, 1.0, 0.34), (0.0, 0.34, 1.0, 0.68), (0.0, 0.68, 1.0, 1.0)]
    """
    wide = width >= height
    length = width if wide else height
    step = math.ceil(length / crops)
    if step * (crops - 1) >= length:
        raise AttentionHookerError(f"image_token_map: gemma3 cannot cut a {height} x {width} image into {crops} "
                                   f"pan-and-scan crops ({step} pixels each leave the last one empty)")
    spans = [(i * step / length, min((i + 1) * step, length) / length) for i in range(crops)]
    return [(0.0, a, 1.0, b) if wide else (a, 0.0, b, 1.0) for a, b in spans]


def _flat_ints(value, name: str) -> List[int]:
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    out: List[int] = []
    for v in value:
        out.extend(_flat_ints(v, name) if isinstance(v, (list, tuple, torch.Tensor)) else [int(v)])
    return out


def _sizes(value, images: int) -> List[Tuple[int, int]]:
    sizes = torch.as_tensor(value).reshape(-1, 2) if not isinstance(value, torch.Tensor) else value.reshape(-1, 2)
    if sizes.shape[0] != images:
        raise AttentionHookerError(f"image_token_map: gemma3 got {sizes.shape[0]} image_sizes for {images} images "
                                   "(one (height, width) per image, before processing)")
    return [(int(h), int(w)) for h, w in sizes.tolist()]


def _pan_and_scan_on(processor) -> bool:
    images = getattr(processor, "image_processor", processor)
    return bool(getattr(images, "do_pan_and_scan", False))


@register_image_tokens("gemma3")
def gemma3_image_tokens(config, inputs, *, processor=None):
    """Image tokens of Gemma 3: per image, ``mm_tokens_per_image`` pooled blocks of the whole image, then
    as many for each pan-and-scan crop. See the module doc for ``num_crops`` and ``image_sizes``.

    Example:
        >>> import torch
        >>> from transformers import Gemma3Config
        >>> from attention_hooker.media import image_token_map
        >>> config = Gemma3Config(vision_config=dict(image_size=32, patch_size=8, hidden_size=16,
        ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        ...     text_config=dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        ...     vocab_size=64), mm_tokens_per_image=4, image_token_index=50, boi_token_index=48,
        ...     eoi_token_index=49)
        >>> tokens = image_token_map(config, dict(input_ids=torch.tensor([[48] + [50] * 4 + [49, 7]])))
        >>> tokens.row.tolist(), tokens.col.tolist(), tokens.height.tolist()  # 2 x 2 blocks of a 4 x 4 grid
        ([0, 0, 2, 2], [0, 2, 0, 2], [2, 2, 2, 2])
        >>> tokens.source[1].tolist()  # patches 2, 3, 6, 7 of the image
        [2, 3, 6, 7]
    """
    patches = square_side(config.vision_config)
    per_side = math.isqrt(int(config.mm_tokens_per_image))
    if per_side * per_side != config.mm_tokens_per_image or patches % per_side:
        raise AttentionHookerError(
            f"image_token_map: gemma3 pools {patches} x {patches} patches to mm_tokens_per_image="
            f"{config.mm_tokens_per_image}; expected a square number whose side divides {patches}")
    k = patches // per_side
    per_crop = per_side * per_side
    batch, position = tokens_where(inputs["input_ids"], config.image_token_id)
    if len(position) % per_crop:
        raise AttentionHookerError(
            f"image_token_map: gemma3 has {len(position)} image tokens, not a multiple of the "
            f"mm_tokens_per_image={per_crop} each image (and each pan-and-scan crop) takes")
    runs = len(position) // per_crop
    if inputs.get("num_crops") is None:
        if processor is not None and _pan_and_scan_on(processor):
            raise AttentionHookerError(
                "image_token_map: gemma3's processor has do_pan_and_scan on, so some of the image token runs may "
                "be crops of one image; pass the image processor's 'num_crops' (one count per image) and "
                "'image_sizes' (each image's (height, width) before processing) with the inputs")
        crops: Sequence[int] = [0] * runs
    else:
        crops = _flat_ints(inputs["num_crops"], "num_crops")
    if sum(c + 1 for c in crops) != runs:
        raise AttentionHookerError(
            f"image_token_map: gemma3 num_crops={list(crops)} gives {sum(c + 1 for c in crops)} runs of "
            f"{per_crop} image tokens (each image and each crop), but input_ids hold {runs}")
    sizes = _sizes(inputs["image_sizes"], len(crops)) if any(crops) and inputs.get("image_sizes") is not None \
        else None
    if any(crops) and sizes is None:
        raise AttentionHookerError("image_token_map: gemma3 needs 'image_sizes' (each image's (height, width) before "
                                   "processing) to place its pan-and-scan crops on the image")
    views, rows, sources = [], [], []
    crop = 0  # index of the crop in pixel_values (whole images and crops, in order)
    for image, n in enumerate(crops):
        boxes = [(0.0, 0.0, 1.0, 1.0)] + (pan_and_scan_boxes(*sizes[image], n) if n else [])
        for index, box in enumerate(boxes):
            view = len(views)
            views.append(ImageView(image, index, "image" if index == 0 else f"crop {index - 1}", patches, patches,
                                   box))
            for j in range(per_crop):
                t = crop * per_crop + j
                r, c = divmod(j, per_side)
                rows.append((int(batch[t]), int(position[t]), image, view, r * k, c * k, k, k))
                sources.append([crop * patches * patches + (r * k + dr) * patches + c * k + dc
                                for dr in range(k) for dc in range(k)])
            crop += 1
    return table("gemma3", "sequence", rows, sources, int(config.vision_config.patch_size), views)
