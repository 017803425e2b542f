"""ViT pictures: one query's attention (or a rollout) over the image's patch grid, overlaid on the image.

Windowed ViTs (Swin) too: a layer's map over its whole ``height x width`` token grid (no class
token; rectangular images), or a :func:`~attention_hooker.analysis.stage_rollout.stage_rollout`,
drawn over the part of the image each token covers."""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import numpy as np

from .._checks import non_negative_int
from .._tensor import as_heads
from ..errors import AttentionHookerError
from ..window_index import WindowIndex
from .plot import colormap_named, figure_class, save_figure

__all__ = ["vit_attention_map", "plot_vit_attention", "swin_attention_map", "plot_swin_attention"]


def _patch_grid(n_patches: int, image_shape: Optional[Sequence[int]]) -> tuple:
    """(rows, cols) of ``n_patches``: square, or the factorisation closest to the image's aspect."""
    root = int(round(math.sqrt(n_patches)))
    if image_shape is None:
        if root * root != n_patches:
            raise AttentionHookerError(
                f"{n_patches} patch tokens do not form a square grid; pass grid=(rows, cols) or the image"
            )
        return root, root
    height, width = image_shape[0], image_shape[1]
    best = None
    for rows in range(1, n_patches + 1):
        if n_patches % rows:
            continue
        cols = n_patches // rows
        error = abs(math.log((cols / rows) / (width / height)))
        if best is None or error < best[0]:
            best = (error, rows, cols)
    return best[1], best[2]


def image_array(image, batch_index: int = 0) -> np.ndarray:
    """``(H, W, 3)`` floats in [0, 1] from a tensor ``(3, H, W)``/``(H, W, 3)``, an array, or a PIL
    image; of a batch of images ``(batch, 3, H, W)``/``(batch, H, W, 3)``, image ``batch_index``."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    else:
        from .._tensor import to_numpy

        arr = to_numpy(image)
        if arr.ndim == 4:  # a batch of images: the one the map is of
            if isinstance(batch_index, bool) or not isinstance(batch_index, (int, np.integer)) or \
                    not -arr.shape[0] <= batch_index < arr.shape[0]:
                raise AttentionHookerError(
                    f"batch_index={batch_index!r} is out of range for the image batch of {arr.shape[0]} image(s) "
                    f"{tuple(arr.shape)}: pass the batch the map is of, or that item's image (3, H, W)")
            arr = arr[batch_index]
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = np.transpose(arr, (1, 2, 0))
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise AttentionHookerError(f"image must be (H, W, 3), (3, H, W) or a PIL image, got shape {arr.shape}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:  # normalised or 0..255 input: stretch to [0, 1] for display
            arr = (arr - lo) / (hi - lo if hi > lo else 1.0)
    return arr


_image_array = image_array  # its earlier, private name


def _check_query(query: int, n_tokens: int) -> None:
    if query >= n_tokens:
        raise AttentionHookerError(f"query={query} is out of range for attention with {n_tokens} tokens")


def vit_attention_map(
    attn,
    *,
    query: int = 0,
    prefix_tokens: int = 1,
    grid: Optional[Sequence[int]] = None,
    image_shape: Optional[Sequence[int]] = None,
    heads="mean",
    batch_index: int = 0,
) -> np.ndarray:
    """A ViT's attention from one query token laid out on the patch grid.

    Args:
        attn: ``(batch, heads, tokens, tokens)`` or ``(heads, tokens, tokens)``
            attention, or a rollout ``(batch, tokens, tokens)`` / ``(tokens, tokens)``
            (pass ``heads=None`` for those).
        query: the query token (0: the class token).
        prefix_tokens: tokens before the patches (class + register/distillation tokens).
        grid: ``(rows, cols)`` of patches; default: square, or fitted to ``image_shape``.
        image_shape: ``(height, width, ...)`` of the image, to fit a non-square grid.
        heads: ``"mean"``, ``"max"``, a head index, or ``None`` for a rollout input.
        batch_index: which batch item.

    Returns:
        ``(rows, cols)`` float array: the query's weights on the patches.

    Example:
        >>> import torch
        >>> vit_attention_map(torch.rand(1, 2, 5, 5).softmax(-1)).shape
        (2, 2)
    """
    from .._tensor import to_numpy

    _refuse_not_over_tokens(attn)  # read as numpy below, where the mark is gone
    arr = to_numpy(attn)
    prefix_tokens = non_negative_int(prefix_tokens, "prefix_tokens")
    query = non_negative_int(query, "query")
    row = _rollout_row(arr, query, batch_index) if heads is None else _heads_row(arr, query, heads, batch_index)
    return _on_patch_grid(row, prefix_tokens, grid, image_shape)


def _refuse_not_over_tokens(attn) -> None:
    """Refuses a map whose axes are not the image's tokens: a call kept per window, or a map over
    channels (XCiT's cross-covariance attention), which has no patch grid to draw on."""
    from .._map_kinds import kind_of
    from .._per_window import refuse_per_window

    refuse_per_window(attn, "attn")
    kind = kind_of(attn)
    if kind is not None and kind.name == "channels":
        raise AttentionHookerError(f"attn is {kind}: its query and key axes are channels of each head, not the "
                                   "image's tokens, so it has no place on the patch grid")


def _rollout_row(arr: np.ndarray, query: int, batch_index: int) -> np.ndarray:
    """Row ``query`` of a rollout ``(batch, tokens, tokens)`` or ``(tokens, tokens)``: ``(tokens,)``."""
    if arr.ndim == 3:
        arr = arr[batch_index]
    if arr.ndim != 2:
        raise AttentionHookerError(
            f"Wrong shape for a rollout map: expected (batch, tokens, tokens) or (tokens, tokens). Received {arr.shape}."
        )
    _check_query(query, arr.shape[0])
    return arr[query]


def _heads_row(arr: np.ndarray, query: int, heads, batch_index: int) -> np.ndarray:
    """Row ``query`` of attention ``(batch, heads, tokens, tokens)`` or ``(heads, tokens, tokens)``,
    its heads' mean, largest, or one head: ``(tokens,)``."""
    per_head = as_heads(arr, batch_index=batch_index)
    _check_query(query, per_head.shape[1])
    per_head = per_head[:, query, :]  # (H, K)
    if heads == "mean":
        return per_head.mean(0)
    if heads == "max":
        return per_head.max(0)
    if isinstance(heads, int) and not isinstance(heads, bool) and 0 <= heads < per_head.shape[0]:
        return per_head[heads]
    raise AttentionHookerError(f"heads={heads!r} must be 'mean', 'max', None or a head index < {per_head.shape[0]}")


def _on_patch_grid(row: np.ndarray, prefix_tokens: int, grid: Optional[Sequence[int]],
                   image_shape: Optional[Sequence[int]]) -> np.ndarray:
    """The weights of ``row`` ``(tokens,)`` past its ``prefix_tokens``, as ``(rows, cols)`` patches."""
    if prefix_tokens >= row.size:
        raise AttentionHookerError(
            f"prefix_tokens={prefix_tokens} leaves no patch tokens of the {row.size} tokens; expected fewer prefix tokens"
        )
    patches = row[prefix_tokens:]
    rows, cols = tuple(grid) if grid is not None else _patch_grid(patches.size, image_shape)
    if rows * cols != patches.size:
        raise AttentionHookerError(
            f"grid=({rows}, {cols}) has {rows * cols} patches, but there are {patches.size} tokens after "
            f"{prefix_tokens} prefix token(s)"
        )
    return patches.reshape(rows, cols)


def plot_vit_attention(
    attn,
    image,
    *,
    query: int = 0,
    prefix_tokens: int = 1,
    grid: Optional[Sequence[int]] = None,
    heads="mean",
    batch_index: int = 0,
    alpha: float = 0.55,
    cmap: str = "inferno",
    title: Optional[str] = None,
    save_path: Union[str, os.PathLike, None] = None,
):
    """The image beside and under its attention map (see :func:`vit_attention_map`).

    Args:
        attn: attention ``(batch, heads, tokens, tokens)`` or a rollout map (with ``heads=None``).
        image: ``(3, H, W)`` / ``(H, W, 3)`` tensor or array, or a PIL image; of a batch
            ``(batch, 3, H, W)``, image ``batch_index`` is drawn.
        query: the query token (0: the class token), as in :func:`vit_attention_map`.
        prefix_tokens: tokens before the patches (class + register/distillation tokens).
        grid: ``(rows, cols)`` of patches; default: square, or fitted to the image.
        heads: ``"mean"``, ``"max"``, a head index, or ``None`` for a rollout input.
        batch_index: which batch item.
        alpha: opacity of the overlay.
        cmap: colormap of the map.
        title: the figure title.
        save_path: file to write (folders are created; format from the extension).

    Returns:
        The ``matplotlib.figure.Figure``: the image, and the image with the map over it.
    """
    Figure = figure_class()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise AttentionHookerError(f"alpha={alpha!r} must be a number in [0, 1] (the overlay's opacity)")
    picture = image_array(image, batch_index)
    amap = vit_attention_map(attn, query=query, prefix_tokens=prefix_tokens, grid=grid,
                             image_shape=picture.shape, heads=heads, batch_index=batch_index)
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    height, width = picture.shape[:2]
    for ax in (left, right):
        ax.imshow(picture, extent=(0, width, height, 0))
        ax.set_xticks([])
        ax.set_yticks([])
    left.set_title("image")
    overlay = right.imshow(np.ma.masked_invalid(amap), cmap=colormap_named(cmap), alpha=alpha,
                           extent=(0, width, height, 0), interpolation="nearest")
    right.set_title(f"attention from token {query} ({amap.shape[0]}x{amap.shape[1]} patches)")
    fig.colorbar(overlay, ax=right, shrink=0.8)
    if title:
        fig.suptitle(title)
    save_figure(fig, save_path)
    return fig


def swin_attention_map(
    attn,
    *,
    grid: Optional[Sequence[int]] = None,
    window_index: Optional[WindowIndex] = None,
    query="mean",
    heads="mean",
    batch_index: int = 0,
) -> np.ndarray:
    """A windowed layer's attention (or a Swin rollout) from one query, on the keys' token grid.

    Args:
        attn: a layer's map over its tokens ``(batch, heads, tokens, tokens)`` (``windows="dense"``,
            the default); a call kept per window ``(batch * windows, heads, N, N)`` with its
            ``window_index``; or a rollout ``(batch, queries, tokens)`` from ``stage_rollout``
            (or ``(queries, tokens)`` of one image), whose keys are the first layer's tokens.
            The number of dims tells them apart: 4-D is a layer's map, 3-D or 2-D a rollout.
        grid: ``(height, width)`` of the key tokens (token ``y * width + x``); by default the
            window index's, or a square.
        window_index: the :class:`~attention_hooker.window_index.WindowIndex` of a call kept per window.
        query: a query token index, ``(y, x)`` on the grid (when queries and keys are the same
            tokens), or ``"mean"``: the mean over every query row (what a mean-pooled output,
            Swin's, draws on).
        heads: ``"mean"``, ``"max"`` or a head index of a layer's map; ``None`` (or the default
            ``"mean"``) for a rollout, which has no heads.
        batch_index: which image.

    Returns:
        ``(height, width)`` float array: the query's weights on the key tokens.

    Raises:
        AttentionHookerError: on a grid that is not two positive integers or does not hold the
            keys, a query or ``batch_index`` out of range, ``heads`` that do not fit the map, a
            per-window call without its index (or one that does not match it).

    Example:
        >>> import torch
        >>> hot = torch.zeros(1, 1, 6, 6); hot[..., 4] = 1.0      # every query on token 4 = (1, 1)
        >>> swin_attention_map(hot, grid=(2, 3), query=(0, 2)).tolist()
        [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    """
    import torch

    if isinstance(batch_index, bool) or not isinstance(batch_index, (int, np.integer)):
        raise AttentionHookerError(f"batch_index={batch_index!r} must be an int (which image)")
    grid = None if grid is None else _checked_grid(grid)
    if window_index is not None:
        if not isinstance(window_index, WindowIndex):
            raise AttentionHookerError(f"window_index must be one call's WindowIndex (hooker.window_index[layer][call]), "
                                       f"got {type(window_index).__name__}")
        attn = window_index.dense(attn if isinstance(attn, torch.Tensor) else torch.as_tensor(attn))
        index_grid = (window_index.height, window_index.width)
        if grid is not None and grid != index_grid:
            raise AttentionHookerError(f"grid={grid} but the window index says {index_grid}")
        grid = index_grid
    rows = _swin_rows(attn, heads, batch_index)  # (H, Q, K); (1, Q, K) for a rollout
    keys = rows.shape[-1]
    if grid is None:
        grid = _patch_grid(keys, None)
    height, width = grid
    if height * width != keys:
        raise AttentionHookerError(f"grid=({height}, {width}) holds {height * width} tokens, but the map has {keys} keys")
    picked = _query_rows(rows, query, (height, width))  # (H, K)
    if heads is None or heads == "mean":
        row = picked.mean(0)
    elif heads == "max":
        row = picked.max(0)
    else:
        row = picked[heads]  # a head index, checked by _swin_rows
    return row.reshape(height, width)


def _checked_grid(grid) -> tuple:
    """``grid`` as ``(height, width)``, two positive integers, or the library's error."""
    if isinstance(grid, (str, bytes)) or not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in grid):
        raise AttentionHookerError(f"grid={grid!r} must be (height, width) of the key tokens: two positive integers")
    return int(grid[0]), int(grid[1])


def _swin_rows(attn, heads, batch_index: int) -> np.ndarray:
    """``(heads, queries, keys)`` of image ``batch_index``: a layer's map ``(batch, heads, query, key)``
    (4-D), or a rollout ``(batch, queries, keys)`` (3-D) / ``(queries, keys)`` (2-D) as one head."""
    from .._tensor import to_numpy

    _refuse_not_over_tokens(attn)
    arr = to_numpy(attn)
    if arr.ndim == 4:
        if heads is None:
            raise AttentionHookerError(f"heads=None is for a rollout (batch, queries, tokens), but the map is 4-D "
                                       f"{arr.shape}, a layer's (batch, heads, query, key): pass heads='mean', 'max' "
                                       "or a head index")
        rows = as_heads(arr, batch_index=batch_index)  # (H, Q, K)
        if not (heads in ("mean", "max") or (isinstance(heads, (int, np.integer)) and not isinstance(heads, bool)
                                              and 0 <= heads < rows.shape[0])):
            raise AttentionHookerError(f"heads={heads!r} must be 'mean', 'max', None or a head index < {rows.shape[0]}")
        return rows
    if arr.ndim not in (2, 3):
        raise AttentionHookerError(f"Wrong shape for a Swin map: expected a layer's (batch, heads, query, key) or a "
                                   f"rollout (batch, queries, tokens) / (queries, tokens). Received {arr.shape}.")
    if heads is not None and not (isinstance(heads, str) and heads == "mean"):
        raise AttentionHookerError(f"heads={heads!r}: a {arr.ndim}-D map {arr.shape} is read as a rollout (batch, "
                                   "queries, tokens), which has no heads; pass heads=None (or a layer's 4-D map)")
    batch = arr[None] if arr.ndim == 2 else arr  # (B, Q, K)
    if not -batch.shape[0] <= batch_index < batch.shape[0]:
        raise AttentionHookerError(f"batch_index={batch_index} is out of range for a rollout of {batch.shape[0]} "
                                   f"image(s) {arr.shape}")
    return batch[batch_index][None]  # (1, Q, K)


def _pixels_per_token(image: tuple, grid: tuple, patch, patch_size) -> tuple:
    """``(ph, pw)``: the pixels a token covers, such that the grid is the image padded to whole
    tokens (``ceil(H / ph) == rows``, ``ceil(W / pw) == cols``), from ``patch``, the model's
    ``patch_size`` (times ``2**stage``), or the sizes where one whole number fits; else the
    library's error (a padded grid that happens to divide the image says nothing of its patch)."""
    (height, width), (rows, cols) = image, grid

    def fits(p, pixels, tokens):
        return -(-pixels // p) == tokens

    if patch is not None:
        if not (isinstance(patch, (tuple, list)) and len(patch) == 2 and all(
                isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p > 0 for p in patch)):
            raise AttentionHookerError(f"patch={patch!r} must be (pixels per token down, across), two positive integers")
        if not (fits(patch[0], height, rows) and fits(patch[1], width, cols)):
            raise AttentionHookerError(
                f"patch={tuple(patch)} cuts the {height}x{width} image into {-(-height // patch[0])}x"
                f"{-(-width // patch[1])} tokens (padded to whole ones), not the map's {rows}x{cols}")
        return int(patch[0]), int(patch[1])
    if patch_size is not None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size <= 0:
            raise AttentionHookerError(f"patch_size={patch_size!r} must be the model's patch size, a positive integer")
        side = int(patch_size)
        while side < 2 * max(height, width, 1):
            if fits(side, height, rows) and fits(side, width, cols):
                return side, side
            side *= 2
        raise AttentionHookerError(
            f"the {rows}x{cols} token grid is no stage of a model with patch_size={patch_size} on a {height}x{width} "
            f"image (ceil(size / (patch_size * 2**stage)) tokens a side): pass patch=(pixels down, across)")
    found = []
    for pixels, tokens in ((height, rows), (width, cols)):
        lowest = -(-pixels // tokens)  # the least p with ceil(pixels / p) == tokens
        if tokens == 1:
            found.append(pixels)  # one token: any p >= pixels draws the same
        elif fits(lowest, pixels, tokens) and not fits(lowest + 1, pixels, tokens):
            found.append(lowest)
        else:
            break
    if len(found) == 2:
        return found[0], found[1]
    raise AttentionHookerError(
        f"the pixels per token of a {rows}x{cols} token grid on a {height}x{width} image cannot be read from the "
        "sizes (several fit: the model pads the image to whole tokens): pass patch_size= (the model's, "
        "config.patch_size: 4 for a Swin) or patch=(pixels per token down, across), patch_size * 2**stage a side")


def _query_rows(rows: np.ndarray, query, grid: tuple) -> np.ndarray:
    """``(heads, keys)``: the rows of ``query`` (an index, ``(y, x)`` or ``"mean"``) of ``rows`` ``(heads, Q, K)``."""
    n_query = rows.shape[1]
    if isinstance(query, str) and query == "mean":
        return rows.mean(1)
    if isinstance(query, (tuple, list)) and len(query) == 2:
        if n_query != rows.shape[2]:
            raise AttentionHookerError(f"query={tuple(query)} is a grid position, but the map's {n_query} queries are "
                                       f"not its {rows.shape[2]} keys; pass a query index or 'mean'")
        y, x = (non_negative_int(v, "query") for v in query)
        if y >= grid[0] or x >= grid[1]:
            raise AttentionHookerError(f"query={tuple(query)} is outside the {grid[0]}x{grid[1]} token grid")
        return rows[:, y * grid[1] + x]
    index = non_negative_int(query, "query") if not isinstance(query, str) else None
    if index is None:
        raise AttentionHookerError(f"query={query!r} must be a token index, (y, x) or 'mean'")
    _check_query(index, n_query)
    return rows[:, index]


def plot_swin_attention(
    attn,
    image,
    *,
    grid: Optional[Sequence[int]] = None,
    window_index: Optional[WindowIndex] = None,
    query="mean",
    heads="mean",
    batch_index: int = 0,
    patch: Optional[Sequence[int]] = None,
    patch_size: Optional[int] = None,
    alpha: float = 0.55,
    cmap: str = "inferno",
    title: Optional[str] = None,
    save_path: Union[str, os.PathLike, None] = None,
):
    """The image beside and under a windowed layer's attention or a Swin rollout (see :func:`swin_attention_map`).

    Token ``(y, x)`` of the grid covers pixels ``y * ph .. (y + 1) * ph`` and ``x * pw .. (x + 1) * pw``
    of the image, ``(ph, pw) = patch``: a Swin's tokens at stage ``s`` cover ``4 * 2**s``
    pixels a side (patch 4), and a grid that overhangs the image (the model padded it to whole
    patches) is cut at the image's edge.

    Args:
        attn: a layer's dense map, a call kept per window (with ``window_index``) or a rollout
            (with ``heads=None``), as in :func:`swin_attention_map`.
        image: ``(3, H, W)`` / ``(H, W, 3)`` tensor or array, or a PIL image; of a batch
            ``(batch, 3, H, W)``, image ``batch_index`` is drawn.
        grid: ``(height, width)`` of the key tokens.
        window_index: the index of a call kept per window.
        query: a query token index, ``(y, x)``, or ``"mean"`` over every query row.
        heads: ``"mean"``, ``"max"``, a head index, or ``None`` for a rollout.
        batch_index: which image.
        patch: ``(ph, pw)`` pixels per token (``patch_size * 2**stage`` a side for a Swin),
            checked against the image: the grid must be the image padded to whole tokens.
        patch_size: instead of ``patch``, the model's patch size (``config.patch_size``, 4 for
            a Swin): the stage is the one whose ``patch_size * 2**stage`` pixels per token give
            this grid on this image. Without either, the pixels per token are read from the
            sizes only where one whole number fits (``ceil(H / p) == height`` for one ``p``).
        alpha: opacity of the overlay.
        cmap: colormap of the map.
        title: the figure title.
        save_path: file to write (folders are created; format from the extension).

    Returns:
        The ``matplotlib.figure.Figure``: the image, and the image with the map over it.
    """
    Figure = figure_class()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise AttentionHookerError(f"alpha={alpha!r} must be a number in [0, 1] (the overlay's opacity)")
    picture = image_array(image, batch_index)
    amap = swin_attention_map(attn, grid=grid, window_index=window_index, query=query, heads=heads,
                              batch_index=batch_index)
    height, width = picture.shape[:2]
    rows, cols = amap.shape
    patch = _pixels_per_token((height, width), (rows, cols), patch, patch_size)
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax in (left, right):
        ax.imshow(picture, extent=(0, width, height, 0))
        ax.set_xticks([])
        ax.set_yticks([])
    left.set_title("image")
    overlay = right.imshow(np.ma.masked_invalid(amap), cmap=colormap_named(cmap), alpha=alpha,
                           extent=(0, cols * patch[1], rows * patch[0], 0), interpolation="nearest")
    for ax in (left, right):
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    what = "mean over queries" if isinstance(query, str) and query == "mean" else f"query {query}"
    right.set_title(f"attention, {what} ({rows}x{cols} tokens)")
    fig.colorbar(overlay, ax=right, shrink=0.8)
    if title:
        fig.suptitle(title)
    save_figure(fig, save_path)
    return fig
