"""Idefics3 and SmolVLM (``idefics3``, ``smolvlm``): tiles plus a global image, ``scale_factor^2`` patches a token.

The image processor resizes each image (longest edge to ``size["longest_edge"]``), then, with image splitting,
stretches it to whole multiples of the tile side (``max_image_size["longest_edge"]``, the tower's
``image_size``) and cuts it into ``rows x cols`` square tiles, row after row, followed by the whole image
squeezed to one tile (the *global* image); an image that fits one tile (or any image without splitting) is
that one square crop alone. Every crop is one entry of ``pixel_values (batch, crops, C, S, S)``, the crops of
a batch row's images one after another; rows with fewer crops are padded with all-zero crops (and zeros in
``pixel_attention_mask``), which the model skips.

The tower cuts a crop into ``side x side`` patches (``side = image_size / patch_size``); the connector's
pixel shuffle gathers each ``scale x scale`` block of them into one token, blocks in raster order, so a
crop gives ``(side / scale)^2`` image tokens in a row (``image_seq_len``). In ``input_ids`` each crop's run is
preceded by marker text: ``<row_i_col_j>`` for tile ``(i, j)`` (1-based), ``<global-img>`` for the global
image; the markers are text, not image tokens.

Which crop is which tile is read from the processor (its tokenizer names the marker before each run), or from
``rows`` / ``cols`` in the inputs (the image processor's ``return_row_col_info=True``: per batch row, per
image, 0 and 0 for an image not split).

Views: a split image has view 0, ``"tiles"``, its tiles put back (``rows * side x cols * side`` patch cells
over the whole image), and view 1, ``"global"`` (``side x side`` cells over the whole image); an image not
split has one view, ``"image"``. A token covers ``scale x scale`` cells. Sources are patches of ``pixel_values``
flattened over ``(batch, crops)``, padding crops included in the count (see
:mod:`attention_hooker.media.image_tokens`). A real crop with padded pixels inside it is refused.
"""

from __future__ import annotations

import re
from typing import List, Sequence, Tuple

import torch

from ...errors import AttentionHookerError
from ..image_tokens import NO_TOKENS_HINT, ImageView, register_image_tokens, table, tokens_where

__all__ = ["idefics3_image_tokens"]

_MARKER = re.compile(r"<row_(\d+)_col_(\d+)>")


def _runs(position: torch.Tensor, length: int, family: str, row: int) -> List[torch.Tensor]:
    """The image-token positions of one batch row cut into crops of ``length`` tokens (each crop's tokens are
    contiguous)."""
    if len(position) % length:
        raise AttentionHookerError(f"image_token_map: {family} batch row {row} has {len(position)} image tokens, "
                                   f"not a multiple of the {length} each crop takes ((side / scale_factor)^2)")
    crops = list(position.split(length))
    for crop in crops:
        if int(crop[-1] - crop[0]) != length - 1:
            raise AttentionHookerError(f"image_token_map: {family} batch row {row}: the image tokens of one crop "
                                       f"are not contiguous (positions {crop.tolist()})")
    return crops


def _real_crops(inputs, batch: int, family: str, side: int, patch: int) -> Tuple[List[List[int]], int]:
    """The indices of the real (not padding) crops of each batch row, as the model finds them (a crop of
    ``pixel_values`` that is all zeros is padding), and the number of crops a row has room for. Partly
    padded real crops are refused."""
    pixels = inputs.get("pixel_values")
    mask = inputs.get("pixel_attention_mask")
    if pixels is None and mask is None:
        raise AttentionHookerError(f"image_token_map: {family} needs 'pixel_values' or 'pixel_attention_mask' in "
                                   f"the inputs (to tell real crops from padding); pass the processor's outputs")
    if pixels is not None:
        pixels = pixels.reshape(batch, -1, *pixels.shape[-3:])
        real = pixels.flatten(2).ne(0).any(-1)  # (batch, crops)
    else:
        real = mask.reshape(batch, -1, *mask.shape[-2:]).flatten(2).any(-1)
    if mask is not None:
        mask = mask.reshape(batch, -1, *mask.shape[-2:])
        partly = real & ~mask.flatten(2).bool().all(-1)
        if bool(partly.any()):
            b, c = partly.nonzero()[0].tolist()
            raise AttentionHookerError(
                f"image_token_map: {family} crop {c} of batch row {b} is partly padding (pixel_attention_mask); "
                f"only whole {side * patch} x {side * patch} crops, as the processor makes them, are mapped")
    crops = real.shape[1]
    return [[c for c in range(crops) if bool(real[b, c])] for b in range(batch)], crops


def _layouts_from_processor(ids: torch.Tensor, runs: Sequence[torch.Tensor], processor, family: str,
                            row: int) -> List[Tuple[int, int, List[Tuple[int, int]]]]:
    """``[(rows, cols, [(tile row, tile col) or (-1, -1) for the global crop, ...]), ...]`` per image of a batch
    row, read from the marker token before each crop's run."""
    tokenizer = getattr(processor, "tokenizer", None)
    tag = getattr(processor, "global_image_token", None) or getattr(processor, "global_image_tag", None)
    if tokenizer is None or tag is None:
        raise AttentionHookerError(
            f"image_token_map: {family} needs its processor (whose tokenizer names the <row_i_col_j> and "
            f"<global-img> markers) or 'rows' and 'cols' in the inputs (the image processor's "
            f"return_row_col_info=True) to tell tiles from global images; got processor={type(processor).__name__}")
    images, tiles = [], []
    for run in runs:
        before = int(run[0]) - 1
        name = tokenizer.convert_ids_to_tokens(int(ids[before])) if before >= 0 else None
        if name == tag:
            rows = max((i for i, _ in tiles), default=-1) + 1
            cols = max((j for _, j in tiles), default=-1) + 1
            if sorted(tiles) != [(i, j) for i in range(rows) for j in range(cols)] or tiles != sorted(tiles):
                raise AttentionHookerError(f"image_token_map: {family} batch row {row}: tiles {tiles} before a "
                                           f"global image are not a full grid in row order")
            images.append((rows, cols, tiles + [(-1, -1)]))
            tiles = []
            continue
        marker = _MARKER.fullmatch(name or "")
        if marker is None:
            raise AttentionHookerError(
                f"image_token_map: {family} batch row {row}: the crop at position {int(run[0])} follows {name!r}, "
                f"neither a <row_i_col_j> marker nor {tag!r}; pass 'rows' and 'cols' in the inputs instead")
        tiles.append((int(marker.group(1)) - 1, int(marker.group(2)) - 1))
    if tiles:
        raise AttentionHookerError(f"image_token_map: {family} batch row {row} ends with tiles {tiles} and no "
                                   f"global image after them")
    return images


def _layouts_from_counts(rows: Sequence[int], cols: Sequence[int]) -> List[Tuple[int, int, List[Tuple[int, int]]]]:
    out = []
    for r, c in zip(rows, cols):
        r, c = int(r), int(c)
        out.append((r, c, [(i, j) for i in range(r) for j in range(c)] + [(-1, -1)]))
    return out


@register_image_tokens("idefics3", "smolvlm")
def idefics3_image_tokens(config, inputs, *, processor=None):
    """Image tokens of Idefics3 / SmolVLM: tiles put back plus a global view, ``scale x scale`` patches a
    token. See the module doc.

    Example:
        >>> from transformers import Idefics3Config
        >>> import torch
        >>> from attention_hooker.media import image_token_map
        >>> config = Idefics3Config(vision_config=dict(image_size=32, patch_size=8), scale_factor=2,
        ...                         image_token_id=60)
        >>> ids = torch.tensor([[1, 8] + [60] * 4 + [9] + [60] * 4 + [7, 6] + [60] * 4 + [7]])  # 1 x 2 tiles
        >>> inputs = dict(input_ids=ids, pixel_values=torch.ones(1, 3, 3, 32, 32), rows=[[1]], cols=[[2]])
        >>> tokens = image_token_map(config, inputs)
        >>> [(v.name, v.rows, v.cols) for v in tokens.views]
        [('tiles', 4, 8), ('global', 4, 4)]
        >>> tokens.col.tolist()[:8], tokens.source[5].tolist()
        ([0, 2, 0, 2, 4, 6, 4, 6], [18, 19, 22, 23])
    """
    family = config.model_type
    vision = config.vision_config
    patch, scale = int(vision.patch_size), int(config.scale_factor)
    side = int(vision.image_size) // patch
    if side % scale:
        raise AttentionHookerError(f"image_token_map: {family} tiles of {side} x {side} patches do not split into "
                                   f"scale_factor {scale} blocks")
    grid = side // scale
    ids = inputs["input_ids"]
    batch, position = tokens_where(ids, config.image_token_id)
    real, crops = _real_crops(inputs, ids.shape[0], family, side, patch)
    counts = (inputs.get("rows"), inputs.get("cols"))
    views, rows, sources = [], [], []
    image = 0
    for b in range(ids.shape[0]):
        runs = _runs(position[batch == b], grid * grid, family, b)
        if counts[0] is not None and counts[1] is not None:
            layouts = _layouts_from_counts(counts[0][b], counts[1][b])
        else:
            layouts = _layouts_from_processor(ids[b], runs, processor, family, b)
        if sum(len(t) for _, _, t in layouts) != len(runs) or len(runs) != len(real[b]):
            raise AttentionHookerError(
                f"image_token_map: {family} batch row {b} has {len(runs)} crops of image tokens, "
                f"{len(real[b])} real crops in pixel_values and {sum(len(t) for _, _, t in layouts)} crops in its "
                f"images' tile layout {[(r, c) for r, c, _ in layouts]} (rows x cols + 1 global each)"
                + (NO_TOKENS_HINT if not len(position) else ""))
        run = 0
        for n_rows, n_cols, tiles in layouts:
            split = n_rows * n_cols > 0
            if split:
                tiles_view, global_view = len(views), len(views) + 1
                views += [ImageView(image, 0, "tiles", n_rows * side, n_cols * side),
                          ImageView(image, 1, "global", side, side)]
            else:
                global_view = len(views)
                views.append(ImageView(image, 0, "image", side, side))
            for tile_row, tile_col in tiles:
                view = global_view if tile_row < 0 else tiles_view
                top, left = (0, 0) if tile_row < 0 else (tile_row * side, tile_col * side)
                crop = b * crops + real[b][run]
                for k, p in enumerate(runs[run].tolist()):
                    r, c = divmod(k, grid)
                    rows.append((b, p, image, view, top + r * scale, left + c * scale, scale, scale))
                    sources.append([crop * side * side + (r * scale + i) * side + c * scale + j
                                    for i in range(scale) for j in range(scale)])
                run += 1
            image += 1
    return table(family, "sequence", rows, sources, patch, views)
