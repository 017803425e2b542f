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
image processor's outputs; a flat list, a tensor or per-row lists) and ``image_sizes`` (each image's
``(height, width)`` before processing, in any form :func:`~attention_hooker.media.image_tokens.image_sizes_of`
reads) with the inputs when pan and scan made crops. Without ``num_crops``:

* one run of image tokens is one whole image, whatever the processor (a crop always follows its image's
  run);
* several runs are whole images only when the ``processor`` passed has pan and scan off (its own
  settings: a ``do_pan_and_scan=True`` given at call time is not seen, so pass ``num_crops`` then); with
  pan and scan on, or no processor, they are refused: crops and images look the same in ``input_ids``.

With ``num_crops`` and a ``processor``, the counts are checked against the processor's settings: none
when pan and scan is off, and, given ``image_sizes``, exactly :func:`pan_and_scan_count` of each size.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from ...errors import AttentionHookerError
from ..image_tokens import ImageView, image_sizes_of, register_image_tokens, table, tokens_where
from .paligemma import square_side

__all__ = ["gemma3_image_tokens", "pan_and_scan_boxes", "pan_and_scan_count"]

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


def pan_and_scan_count(height: int, width: int, min_crop: int, max_crops: int, min_ratio: float) -> int:
    """How many pan-and-scan crops Gemma 3's image processor cuts a ``height x width`` image into, with its
    ``pan_and_scan_min_crop_size``, ``pan_and_scan_max_num_crops`` and ``pan_and_scan_min_ratio_to_activate``:
    none unless the long side is at least ``min_ratio`` times the short one; else about the aspect ratio
    (rounded half up), at most ``long / min_crop`` and ``max_crops``, at least 2; none if a crop would be
    thinner than ``min_crop``.

    Example:
        >>> pan_and_scan_count(24, 72, 8, 4, 1.2), pan_and_scan_count(40, 44, 8, 4, 1.2)
        (3, 0)
    """
    long, short = (width, height) if width >= height else (height, width)
    if long / short < min_ratio:
        return 0
    n = min(max_crops, max(2, min(int(math.floor(long / short + 0.5)), int(math.floor(long / min_crop)))))
    return 0 if min(math.ceil(long / n), short) < min_crop else n


def _pan_and_scan_settings(processor):
    """``None`` when the processor's pan and scan is off, else its ``(min_crop, max_crops, min_ratio)``
    (entries ``None`` where it does not say)."""
    images = getattr(processor, "image_processor", processor)
    if not getattr(images, "do_pan_and_scan", False):
        return None
    return tuple(getattr(images, f"pan_and_scan_{k}", None)
                 for k in ("min_crop_size", "max_num_crops", "min_ratio_to_activate"))


def _check_counts(crops: Sequence[int], sizes, processor) -> None:
    settings = _pan_and_scan_settings(processor)
    if settings is None:
        if any(crops):
            raise AttentionHookerError(
                f"image_token_map: gemma3 num_crops={list(crops)} has crops, but the processor passed has "
                "do_pan_and_scan off, so it makes none; pass the processor that made the inputs")
        return
    if sizes is None or None in settings:
        return
    want = [pan_and_scan_count(h, w, *settings) for h, w in sizes]
    if list(crops) != want:
        raise AttentionHookerError(
            f"image_token_map: gemma3 num_crops={list(crops)} do not match the processor's pan and scan "
            f"(min crop {settings[0]}, at most {settings[1]} crops, from aspect ratio {settings[2]}), which cuts "
            f"images of sizes {sizes} into {want} crops; pass the num_crops, image_sizes and processor that go "
            "together")


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
        if runs > 1 and processor is not None and _pan_and_scan_settings(processor) is not None:
            raise AttentionHookerError(
                "image_token_map: gemma3's processor has do_pan_and_scan on, so some of the image token runs may "
                "be crops of one image; pass the image processor's 'num_crops' (one count per image) and "
                "'image_sizes' (each image's (height, width) before processing) with the inputs")
        if processor is None and runs > 1:
            raise AttentionHookerError(
                f"image_token_map: gemma3's input_ids hold {runs} runs of image tokens, and pan-and-scan crops "
                "cannot be told from separate images by the token ids; pass the processor that made the inputs "
                "(with do_pan_and_scan off, every run is an image), or 'num_crops' (one count per image, zeros "
                "when pan and scan was off) with the inputs")
        crops: Sequence[int] = [0] * runs
    else:
        crops = _flat_ints(inputs["num_crops"], "num_crops")
    if sum(c + 1 for c in crops) != runs:
        raise AttentionHookerError(
            f"image_token_map: gemma3 num_crops={list(crops)} gives {sum(c + 1 for c in crops)} runs of "
            f"{per_crop} image tokens (each image and each crop), but input_ids hold {runs}")
    sizes = image_sizes_of(inputs["image_sizes"], "gemma3", count=len(crops)) \
        if inputs.get("image_sizes") is not None and inputs.get("num_crops") is not None else None
    if processor is not None and inputs.get("num_crops") is not None:
        _check_counts(crops, sizes, processor)
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
