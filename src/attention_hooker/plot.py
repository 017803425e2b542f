"""Matplotlib views: head grids, the layers x heads overview, ViT overlays.

matplotlib is imported inside the functions; every function returns a
``matplotlib.figure.Figure`` built without pyplot (no global figure state).
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ._tensor import as_heads, check_tokens
from .errors import AttentionHookerError

__all__ = ["plot_attention_grid"]


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib: pip install 'transformer-attention-hooker[plot]' (or pip install matplotlib)"
        ) from None
    return Figure


def _save(fig, save_path) -> None:
    if save_path is None:
        return
    folder = os.path.dirname(os.fspath(save_path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(save_path, bbox_inches="tight")


def _tick_positions(n: int, max_labels: int) -> list:
    step = max(1, math.ceil(n / max_labels))
    return list(range(0, n, step))


def _label_axes(ax, query_tokens, key_tokens, n_query, n_key, max_labels, show_query):
    if key_tokens is not None:
        ticks = _tick_positions(n_key, max_labels)
        ax.set_xticks(ticks)
        ax.set_xticklabels([key_tokens[i] for i in ticks], rotation=90, fontsize=7)
    else:
        ax.set_xticks([])
    if query_tokens is not None and show_query:
        ticks = _tick_positions(n_query, max_labels)
        ax.set_yticks(ticks)
        ax.set_yticklabels([query_tokens[i] for i in ticks], fontsize=7)
    else:
        ax.set_yticks([])


def resolve_tokens(tokens, query_tokens, key_tokens, n_query: int, n_key: int):
    """Query and key labels from ``tokens`` (one list for a square matrix, or the axis it fits)."""
    if tokens is not None:
        tokens = list(tokens)
        if n_query == n_key:
            query_tokens = query_tokens if query_tokens is not None else tokens
            key_tokens = key_tokens if key_tokens is not None else tokens
        elif len(tokens) == n_key and key_tokens is None:
            key_tokens = tokens
        elif len(tokens) == n_query and query_tokens is None:
            query_tokens = tokens
        else:
            raise AttentionHookerError(
                f"attention has {n_query} query and {n_key} key positions, while the number of tokens is "
                f"{len(tokens)}; for cross-attention pass query_tokens= and key_tokens="
            )
    return (
        check_tokens(query_tokens, n_query, "query"),
        check_tokens(key_tokens, n_key, "key"),
    )


def plot_attention_grid(
    attn,
    tokens: Optional[Sequence[str]] = None,
    *,
    layer_name: Optional[str] = None,
    save_path: Union[str, os.PathLike, None] = None,
    batch_index: int = 0,
    heads: Optional[Sequence[int]] = None,
    query_tokens: Optional[Sequence[str]] = None,
    key_tokens: Optional[Sequence[str]] = None,
    max_labels: int = 40,
    ncols: Optional[int] = None,
    cmap: str = "viridis",
    panel_size: float = 2.8,
):
    """One heatmap per head of one layer, on one shared colour scale.

    Args:
        attn: ``(batch, heads, query, key)`` or ``(heads, query, key)``; torch or
            numpy, any float dtype.
        tokens: labels for both axes (square), or for the axis whose length they
            match (cross-attention).
        layer_name: shown in the title.
        save_path: file to write; missing folders are created; the format comes
            from the extension (png, svg, pdf, ...).
        batch_index: which batch item to draw.
        heads: which heads to draw (default: all).
        query_tokens: labels of the query axis (rows), for cross-attention.
        key_tokens: labels of the key axis (columns).
        max_labels: at most this many labels per axis; longer sequences are thinned.
        ncols: panels per row (default: about square).
        cmap: matplotlib colormap; non-finite weights are drawn in red.
        panel_size: inches per panel.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        AttentionHookerError: on a wrong shape, token count, or head index.

    Example:
        >>> import torch
        >>> fig = plot_attention_grid(torch.rand(1, 2, 3, 3).softmax(-1), tokens=["a", "b", "c"])
        >>> len([ax for ax in fig.axes if ax.get_title().startswith("head")])
        2
    """
    Figure = _matplotlib()
    weights = as_heads(attn, batch_index=batch_index)  # (H, Q, K)
    n_heads, n_query, n_key = weights.shape
    if heads is None:
        heads = list(range(n_heads))
    else:
        heads = [int(h) for h in heads]
        bad = [h for h in heads if not 0 <= h < n_heads]
        if bad or not heads:
            raise AttentionHookerError(f"heads={heads} must be indices in 0..{n_heads - 1} (the attention has {n_heads} heads)")
    query_tokens, key_tokens = resolve_tokens(tokens, query_tokens, key_tokens, n_query, n_key)

    shown = weights[heads]
    finite = np.isfinite(shown)
    vmax = float(shown[finite].max()) if finite.any() else 1.0
    vmin = min(0.0, float(shown[finite].min())) if finite.any() else 0.0
    ncols = ncols or max(1, math.ceil(math.sqrt(len(heads))))
    nrows = math.ceil(len(heads) / ncols)
    fig = Figure(figsize=(panel_size * ncols + 1.2, panel_size * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colormap = _colormap(cmap)
    image = None
    for slot, ax in enumerate(axes.flat):
        if slot >= len(heads):
            ax.set_axis_off()
            continue
        head = heads[slot]
        panel = np.ma.masked_invalid(weights[head])
        image = ax.imshow(panel, cmap=colormap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        title = f"head {head}"
        if not np.isfinite(weights[head]).all():
            title += " (non-finite in red)"
        ax.set_title(title, fontsize=9)
        _label_axes(ax, query_tokens, key_tokens, n_query, n_key, max_labels, show_query=slot % ncols == 0)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    fig.suptitle(
        f"{layer_name + ' - ' if layer_name else ''}{n_query} queries x {n_key} keys"
        + (f", batch {batch_index}" if np.ndim(attn) == 4 else "")
    )
    _save(fig, save_path)
    return fig


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="red")
