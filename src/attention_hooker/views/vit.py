"""ViT pictures: one query's attention (or a rollout) over the image's patch grid, overlaid on the image."""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import numpy as np

from .._checks import non_negative_int
from .._tensor import as_heads
from ..errors import AttentionHookerError
from .plot import colormap_named, figure_class, save_figure

__all__ = ["vit_attention_map", "plot_vit_attention"]


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
