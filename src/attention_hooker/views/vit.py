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


def _image_array(image) -> np.ndarray:
    """``(H, W, 3)`` floats in [0, 1] from a tensor ``(3, H, W)``/``(H, W, 3)``, an array, or a PIL image."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    else:
        from .._tensor import to_numpy

        arr = to_numpy(image)
        if arr.ndim == 4:
            arr = arr[0]
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

    arr = to_numpy(attn)
    prefix_tokens = non_negative_int(prefix_tokens, "prefix_tokens")
    query = non_negative_int(query, "query")
    row = _rollout_row(arr, query, batch_index) if heads is None else _heads_row(arr, query, heads, batch_index)
    return _on_patch_grid(row, prefix_tokens, grid, image_shape)


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
        image: ``(3, H, W)`` / ``(H, W, 3)`` tensor or array, or a PIL image.
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
    picture = _image_array(image)
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
            (pass ``heads=None``), whose keys are the first layer's tokens.
        grid: ``(height, width)`` of the key tokens (token ``y * width + x``); by default the
            window index's, or a square.
        window_index: the :class:`~attention_hooker.window_index.WindowIndex` of a call kept per window.
        query: a query token index, ``(y, x)`` on the grid (when queries and keys are the same
            tokens), or ``"mean"``: the mean over every query row (what a mean-pooled output,
            Swin's, draws on).
        heads: ``"mean"``, ``"max"``, a head index, or ``None`` for a rollout.
        batch_index: which image.

    Returns:
        ``(height, width)`` float array: the query's weights on the key tokens.

    Raises:
        AttentionHookerError: on a grid that does not hold the keys, a query out of range, or a
            per-window call that does not match its index.

    Example:
        >>> import torch
        >>> hot = torch.zeros(1, 1, 6, 6); hot[..., 4] = 1.0      # every query on token 4 = (1, 1)
        >>> swin_attention_map(hot, grid=(2, 3), query=(0, 2)).tolist()
        [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    """
    import torch

    if window_index is not None:
        if not isinstance(window_index, WindowIndex):
            raise AttentionHookerError(f"window_index must be a WindowIndex (hooker.window_index[layer][call]), got "
                                       f"{type(window_index).__name__}")
        attn = window_index.dense(attn if isinstance(attn, torch.Tensor) else torch.as_tensor(attn))
        index_grid = (window_index.height, window_index.width)
        if grid is not None and tuple(grid) != index_grid:
            raise AttentionHookerError(f"grid={tuple(grid)} but the window index says {index_grid}")
        grid = index_grid
    if heads is None:
        from .._tensor import to_numpy

        arr = to_numpy(attn)
        arr = arr[batch_index] if arr.ndim == 3 else arr
        if arr.ndim != 2:
            raise AttentionHookerError(f"Wrong shape for a rollout map: expected (batch, queries, tokens) or "
                                       f"(queries, tokens). Received {arr.shape}.")
        rows = arr[None]  # (1, Q, K)
    else:
        rows = as_heads(attn, batch_index=batch_index)  # (H, Q, K)
    keys = rows.shape[-1]
    if grid is None:
        grid = _patch_grid(keys, None)
    height, width = (int(grid[0]), int(grid[1]))
    if height * width != keys:
        raise AttentionHookerError(f"grid=({height}, {width}) holds {height * width} tokens, but the map has {keys} keys")
    picked = _query_rows(rows, query, (height, width))  # (H, K)
    if heads is None or heads == "mean":
        row = picked.mean(0)
    elif heads == "max":
        row = picked.max(0)
    elif isinstance(heads, int) and not isinstance(heads, bool) and 0 <= heads < picked.shape[0]:
        row = picked[heads]
    else:
        raise AttentionHookerError(f"heads={heads!r} must be 'mean', 'max', None or a head index < {picked.shape[0]}")
    return row.reshape(height, width)


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
        image: ``(3, H, W)`` / ``(H, W, 3)`` tensor or array, or a PIL image.
        grid: ``(height, width)`` of the key tokens.
        window_index: the index of a call kept per window.
        query: a query token index, ``(y, x)``, or ``"mean"`` over every query row.
        heads: ``"mean"``, ``"max"``, a head index, or ``None`` for a rollout.
        batch_index: which image.
        patch: ``(ph, pw)`` pixels per token; by default the image's size over the grid's
            where the grid divides the image evenly (else it must be given).
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
    picture = _image_array(image)
    amap = swin_attention_map(attn, grid=grid, window_index=window_index, query=query, heads=heads,
                              batch_index=batch_index)
    height, width = picture.shape[:2]
    rows, cols = amap.shape
    if patch is None:
        if height % rows or width % cols:  # a padded image: its patch size cannot be read from the sizes
            raise AttentionHookerError(
                f"the {rows}x{cols} token grid does not divide the {height}x{width} image evenly (the model padded "
                "it to whole patches): pass patch=(pixels per token down, across), 4 * 2**stage a side for a Swin")
        patch = (height // rows, width // cols)
    if not (isinstance(patch, (tuple, list)) and len(patch) == 2
            and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)):
        raise AttentionHookerError(f"patch={patch!r} must be (pixels per token down, across), two positive integers")
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
