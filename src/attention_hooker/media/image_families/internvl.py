"""InternVL (``internvl``): pixel-shuffled blocks of patches, on dynamic tiles plus a thumbnail.

The image processor (``GotOcr2ImageProcessor``) resizes each image to the tower's square ``image_size``
``S``, or, with ``crop_to_patches``, picks a ``cols x rows`` canvas of ``S``-pixel tiles (between
``min_patches`` and ``max_patches`` tiles, the aspect ratio closest to the image's), resizes the image onto
it (aspect ratio not kept, no padding), cuts it into tiles in raster order and, when there is more than
one tile, adds the whole image resized to ``S`` (the thumbnail) last. ``pixel_values`` are
``(crops, 3, S, S)``, every image's crops in turn.

The tower turns a crop into ``P x P`` patch features (``P = S / patch_size``, class token dropped); the
pixel shuffle stacks each ``k x k`` block of them (``k = 1 / downsample_ratio``) into one feature, blocks
in raster order, and each fills one image token. So a token covers ``k x k`` cells (a cell = a patch) of
its view: ``"image"`` for an untiled image; ``"tiles"`` (the tiles put back, ``rows * P x cols * P``
cells over the whole image) and ``"thumbnail"`` for a tiled one.

Reading the tiling. The image tokens of one image are one contiguous run (the processor wraps each
image's in ``<img> ... </img>``), so a run's length says how many crops its image has. When it has more
than one, the canvas is recomputed with the processor's own rule from the image's original size: pass
``image_sizes`` with the inputs and the ``processor``. ``image_sizes`` gives the original
``(height, width)`` of every run, or of the tiled runs only (those of more than one crop), in order; in any
form :func:`~attention_hooker.media.image_tokens.image_sizes_of` reads.

Videos. ``InternVLProcessor`` writes each video frame as its own ``<img> ... </img>`` run of one crop (the
frame resized whole to ``S``) and merges the frames into ``pixel_values`` with the images, in text order;
its outputs keep nothing that says which runs are frames (``input_ids``, ``pixel_values`` and
``attention_mask`` only; the ``FrameN:`` text before a run is ordinary text a prompt may hold too). So a
frame is read as an untiled image: its own ``image`` index and one ``"image"`` view over the whole frame
(its sources and box are exact; only the name does not say "frame"). Give ``image_sizes`` for the tiled
images only when the batch holds frames (or one size per run, frames included); any other count is
refused.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from ...errors import AttentionHookerError
from ..image_tokens import ImageView, image_sizes_of, register_image_tokens, table, tokens_where
from .paligemma import square_side

__all__ = ["internvl_image_tokens", "tiled_canvas"]


def _runs(batch: torch.Tensor, position: torch.Tensor) -> List[Tuple[int, int]]:
    """``(first index, length)`` of each contiguous run of image tokens (same row, consecutive positions)."""
    runs: List[Tuple[int, int]] = []
    for i in range(len(position)):
        if i and int(batch[i]) == int(batch[i - 1]) and int(position[i]) == int(position[i - 1]) + 1:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def tiled_canvas(size: Tuple[int, int], processor, tile: int) -> Tuple[int, int]:
    """``(rows, cols)`` of ``tile``-pixel tiles the GotOcr2 processor cuts an image of ``size`` (height,
    width) into, by its own rule and its ``min_patches`` / ``max_patches``."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    images = getattr(processor, "image_processor", processor)
    cols, rows = get_optimal_tiled_canvas(tuple(size), (tile, tile), int(images.min_patches),
                                          int(images.max_patches))
    return int(rows), int(cols)


def _sizes_of_tiled(value, crops: Sequence[int]) -> Dict[int, Tuple[int, int]]:
    """``{run: (height, width)}`` for the runs of more than one crop, from ``image_sizes`` given per run or
    per tiled run (see the module doc)."""
    tiled = [i for i, n in enumerate(crops) if n > 1]
    sizes = image_sizes_of(value, "internvl")
    if len(sizes) == len(crops):
        return {i: sizes[i] for i in tiled}
    if len(sizes) == len(tiled):
        return dict(zip(tiled, sizes))
    raise AttentionHookerError(
        f"image_token_map: internvl got {len(sizes)} image_sizes for {len(crops)} runs of image tokens, "
        f"{len(tiled)} of them tiled; give one (height, width) per run, or one per tiled run, in order (a video "
        "frame is a run of its own, read as an untiled image: the processor's outputs do not say which runs are "
        "frames)")


@register_image_tokens("internvl")
def internvl_image_tokens(config, inputs, *, processor=None):
    """Image tokens of InternVL: per image, its tiles' pixel-shuffled blocks tile by tile, then the
    thumbnail's (or the one crop's of an untiled image). See the module doc.

    Example:
        >>> import torch
        >>> from transformers import InternVLConfig
        >>> from attention_hooker.media import image_token_map
        >>> config = InternVLConfig(vision_config=dict(image_size=[32, 32], patch_size=[8, 8], hidden_size=16,
        ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        ...     text_config=dict(model_type="qwen2", hidden_size=16, num_attention_heads=2, vocab_size=64),
        ...     image_token_id=50)
        >>> tokens = image_token_map(config, dict(input_ids=torch.tensor([[3] + [50] * 4 + [4]])))
        >>> tokens.row.tolist(), tokens.col.tolist(), tokens.source[1].tolist()  # 2 x 2 blocks of 4 x 4
        ([0, 0, 2, 2], [0, 2, 0, 2], [2, 3, 6, 7])
    """
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise AttentionHookerError("image_token_map: internvl is read with vision_feature_select_strategy="
                                   f"'default' only (got {config.vision_feature_select_strategy!r})")
    vision = config.vision_config
    patches = square_side(vision)
    tile = int(vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size)
    k = round(1 / float(config.downsample_ratio))
    if abs(k * float(config.downsample_ratio) - 1) > 1e-9 or patches % k:
        raise AttentionHookerError(f"image_token_map: internvl's downsample_ratio={config.downsample_ratio} must be "
                                   f"1 / k for a whole k dividing the {patches} patches of a side")
    per_side = patches // k
    per_crop = per_side * per_side
    batch, position = tokens_where(inputs["input_ids"], config.image_token_id)
    runs = _runs(batch, position)
    for image, (first, length) in enumerate(runs):
        if length % per_crop:
            raise AttentionHookerError(
                f"image_token_map: internvl image {image} has a run of {length} image tokens, not a multiple of "
                f"the {per_crop} each crop takes ({per_side} x {per_side} blocks of {k} x {k} patches)")
    crops = [length // per_crop for _, length in runs]
    tiled = next((i for i, n in enumerate(crops) if n > 1), None)
    if tiled is not None and (inputs.get("image_sizes") is None or processor is None):
        raise AttentionHookerError(
            f"image_token_map: internvl image {tiled} has {crops[tiled]} crops (tiles and a thumbnail); pass "
            "'image_sizes' (each image's original (height, width)) in the inputs and the processor, to place its "
            "tiles")
    sizes = _sizes_of_tiled(inputs["image_sizes"], crops) if tiled is not None else {}
    views, rows, sources = [], [], []
    crop = 0
    for image, ((first, length), n) in enumerate(zip(runs, crops)):
        if n == 1:
            layout = [("image", 1, 1, 0, 0)]
        else:
            g_rows, g_cols = tiled_canvas(sizes[image], processor, tile)
            if g_rows * g_cols + 1 != n:
                raise AttentionHookerError(
                    f"image_token_map: internvl image {image} of size {sizes[image]} is cut into "
                    f"{g_rows} x {g_cols} tiles + a thumbnail by the processor's rule, but its run of image "
                    f"tokens holds {n} crops")
            layout = [("tiles", g_rows, g_cols, r, c) for r in range(g_rows) for c in range(g_cols)]
            layout.append(("thumbnail", 1, 1, 0, 0))
        names = list(dict.fromkeys(name for name, *_ in layout))
        first_view = len(views)
        for index, name in enumerate(names):
            g_rows, g_cols = next((gr, gc) for nm, gr, gc, _, _ in layout if nm == name)
            views.append(ImageView(image, index, name, g_rows * patches, g_cols * patches))
        for j, (name, _, _, tr, tc) in enumerate(layout):
            view = first_view + names.index(name)
            for b in range(per_crop):
                t = first + j * per_crop + b
                r, c = divmod(b, per_side)
                rows.append((int(batch[t]), int(position[t]), image, view,
                             tr * patches + r * k, tc * patches + c * k, k, k))
                sources.append([crop * patches * patches + (r * k + dr) * patches + c * k + dc
                                for dr in range(k) for dc in range(k)])
            crop += 1
    return table("internvl", "sequence", rows, sources, tile // patches, views)
