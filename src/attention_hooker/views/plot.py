"""Matplotlib views: head grids, the layers x heads overview, ViT overlays.

matplotlib is imported inside the functions; every function returns a
``matplotlib.figure.Figure`` built without pyplot (no global figure state).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import numpy as np

from .labels import AxisLabels, labelled, short_layer_names, thinned_positions, tick_label
from .._map_kinds import kind_of
from .._checks import check_heads, non_negative_int, positive_int, positive_number, prepare_output_path
from .._tensor import as_heads, require_positions, values_of
from ..errors import AttentionHookerError

__all__ = ["plot_attention_grid", "plot_attention_overview"]


_FIGURE = None


def figure_class():
    """The figure class our pictures are made with: matplotlib's ``Figure``, shown inline by
    notebooks on its own (as a PNG), without ``%matplotlib inline`` or pyplot."""
    global _FIGURE
    if _FIGURE is not None:
        return _FIGURE
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib: pip install 'transformer-attention-hooker[plot]' (or pip install matplotlib)"
        ) from None

    class AttentionFigure(Figure):
        """A ``matplotlib.figure.Figure`` that a notebook draws when it is a cell's value."""

        def _repr_png_(self) -> bytes:
            import io

            buffer = io.BytesIO()
            self.savefig(buffer, format="png")
            return buffer.getvalue()

    _FIGURE = AttentionFigure
    return _FIGURE


def save_figure(fig, save_path) -> None:
    """Writes ``fig`` to ``save_path`` (folders created, format from the extension), if given."""
    if save_path is None:
        return
    path = prepare_output_path(save_path, what="picture")
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if extension and extension not in supported:
        raise AttentionHookerError(
            f"cannot write {path!r}: the format {extension!r} is not one matplotlib writes; "
            f"use one of {', '.join(sorted(supported))}"
        )
    fig.savefig(path)  # constrained layout already fits everything: no second, "tight" pass


def _label_axes(ax, query_tokens, key_tokens, max_labels: int, show_query: bool, show_key: bool) -> None:
    """Token labels (each cut as :func:`~attention_hooker.views.labels.shown_label` cuts it, at most
    ``max_labels`` an axis, with their positions where the axis shows only some:
    :func:`~attention_hooker.views.labels.tick_label`) on the keys below a panel and the queries
    left of it, where shown."""
    if key_tokens is not None and show_key:
        ticks = thinned_positions(len(key_tokens), max_labels)
        ax.set_xticks(ticks)
        ax.set_xticklabels([tick_label(key_tokens, i, len(ticks) < len(key_tokens)) for i in ticks], rotation=90,
                           fontsize=7)
    else:
        ax.set_xticks([])
    if query_tokens is not None and show_query:
        ticks = thinned_positions(len(query_tokens), max_labels)
        ax.set_yticks(ticks)
        ax.set_yticklabels([tick_label(query_tokens, i, len(ticks) < len(query_tokens)) for i in ticks], fontsize=7)
    else:
        ax.set_yticks([])
    if show_query:
        ax.set_ylabel("query", fontsize=8)
    if show_key:
        ax.set_xlabel("key", fontsize=8)


def resolve_tokens(tokens, query_tokens, key_tokens, shape, batch_index: int = 0):
    """Query and key labels of batch item ``batch_index`` of attention of ``shape`` ``(batch, heads,
    query, key)``, by the one token-to-axis rule (:class:`~attention_hooker.views.labels.AxisLabels`).
    A plot takes one list of ``tokens`` (or one per batch item); ``None`` for an axis none fits.

    Raises:
        AttentionHookerError: for several lists that are not one per batch item, or labels
            that fit no axis of the attention.
    """
    labels = AxisLabels(tokens, query_tokens=query_tokens, key_tokens=key_tokens)
    if len(labels.lists) > 1 and not labels.per_batch(shape[0]):
        raise AttentionHookerError(
            f"tokens holds {len(labels.lists)} lists; a plot takes one list of labels (or one per batch item), "
            "or query_tokens= and key_tokens= for cross-attention"
        )
    labels.check([("it", shape)], scope="the attention", hint="for cross-attention pass query_tokens= and key_tokens=")
    return labels.axes(shape, batch_index)


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
    color_scale: str = "linear",
    vmax: Optional[float] = None,
    prompt_length: Optional[int] = None,
):
    """One heatmap per head of one layer, on one shared colour scale.

    Args:
        attn: ``(batch, heads, query, key)`` or ``(heads, query, key)``; torch or
            numpy, any float dtype; or attention between words (``to_words`` of one tensor, or
            ``WordValues.attention(layer)``), its words on the axes.
        tokens: labels for both axes (square), or for the axis whose length they
            match (cross-attention); or one list per batch item. Each label shows its
            first 64 characters (the page's rule: :class:`~attention_hooker.views.labels.AxisLabels`).
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
        color_scale: ``"linear"``, ``"sqrt"`` (small weights brighter: long inputs,
            where most weights are near 0, stop being a black square) or ``"log"``
            (down to 1e-4 of the largest weight); the colour bar says which.
        vmax: the weight drawn brightest (default: the largest one shown).
        prompt_length: generation: the prompt's tokens, the rest generated; a dashed line
            marks where the prompt ends, on each axis that is the whole sequence.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        AttentionHookerError: on a wrong shape, token count, head index, colour scale,
            vmax or prompt_length.

    Example:
        >>> import torch
        >>> fig = plot_attention_grid(torch.rand(1, 2, 3, 3).softmax(-1), tokens=["a", "b", "c"])
        >>> len([ax for ax in fig.axes if ax.get_title().startswith("head")])
        2
    """
    Figure = figure_class()
    kind = kind_of(attn)  # a map that is not probabilities over tokens is drawn, and its scale says so
    attn, tokens = labelled(attn, tokens)  # words carry their labels
    weights = as_heads(attn, batch_index=batch_index)  # (H, Q, K)
    require_positions(weights.shape, "the attention")
    n_heads, n_query, n_key = weights.shape
    heads = list(range(n_heads)) if heads is None else list(check_heads(heads, n_heads, "the attention"))
    max_labels = positive_int(max_labels, "max_labels")
    prompt_length = positive_int(prompt_length, "prompt_length", allow_none=True)
    if prompt_length is not None and prompt_length > n_key:
        raise AttentionHookerError(f"prompt_length={prompt_length} is more than the {n_key} keys of the attention")
    ncols = positive_int(ncols, "ncols", allow_none=True)
    panel_size = positive_number(panel_size, "panel_size")
    colormap = colormap_named(cmap)
    batch = np.shape(attn)[0] if np.ndim(attn) == 4 else 1
    query_tokens, key_tokens = resolve_tokens(tokens, query_tokens, key_tokens, (batch, n_heads, n_query, n_key),
                                              batch_index)
    norm = _grid_norm(weights[heads], color_scale, vmax)
    ncols = ncols or max(1, math.ceil(math.sqrt(len(heads))))
    nrows = math.ceil(len(heads) / ncols)
    fig = Figure(figsize=(panel_size * ncols + 1.2, panel_size * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for slot, ax in enumerate(axes.flat):
        if slot >= len(heads):
            ax.set_axis_off()
            continue
        image = _draw_head(ax, weights[heads[slot]], heads[slot], colormap, norm)
        _mark_prompt(ax, prompt_length, n_query, n_key)
        bottom = slot + ncols >= len(heads)  # nothing drawn below this panel
        _label_axes(ax, query_tokens, key_tokens, max_labels, show_query=slot % ncols == 0, show_key=bottom)
    fig.colorbar(image, ax=axes, shrink=0.8, label=_weight_label(color_scale, kind))
    fig.suptitle(
        f"{layer_name + ' - ' if layer_name else ''}{n_query} queries x {n_key} keys"
        + (f", batch {batch_index}" if np.ndim(attn) == 4 else "")
    )
    save_figure(fig, save_path)
    return fig


def _grid_norm(shown: np.ndarray, color_scale: str, vmax: Optional[float]):
    """One colour scale for the heads ``shown`` ``(heads, query, key)``: from 0 (or the smallest
    weight, if negative) to ``vmax`` (default: the largest finite weight)."""
    finite = np.isfinite(shown)
    if vmax is None:
        vmax = float(shown[finite].max()) if finite.any() else 1.0
    else:
        vmax = positive_number(vmax, "vmax")
    vmin = min(0.0, float(shown[finite].min())) if finite.any() else 0.0
    return color_norm(color_scale, vmin, vmax)


def _mark_prompt(ax, prompt_length: Optional[int], n_query: int, n_key: int) -> None:
    """A dashed line after the prompt's last token, across the keys (and across the queries when
    they are the whole sequence too): generated tokens lie right of it and below it."""
    if prompt_length is None or prompt_length >= n_key:
        return
    style = dict(color="white", linestyle="--", linewidth=0.8, alpha=0.9)
    ax.axvline(prompt_length - 0.5, **style)
    if n_query == n_key:
        ax.axhline(prompt_length - 0.5, **style)


def _draw_head(ax, panel: np.ndarray, head: int, colormap, norm):
    """One head's ``(query, key)`` map on ``ax``, titled; non-finite weights drawn in red. Returns the image."""
    image = ax.imshow(np.ma.masked_invalid(panel), cmap=colormap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_title(f"head {head}" + ("" if np.isfinite(panel).all() else " (non-finite in red)"), fontsize=9)
    return image


COLOR_SCALES = ("linear", "sqrt", "log")  # the plots' and the page's colour scales


def color_norm(color_scale: str, vmin: float, vmax: float):
    """The matplotlib norm of a colour scale: linear, square root, or log down to 1e-4 of ``vmax``.

    Raises:
        AttentionHookerError: on another scale.
    """
    from matplotlib import colors

    if color_scale not in COLOR_SCALES:
        raise AttentionHookerError(f"color_scale={color_scale!r} must be one of {', '.join(COLOR_SCALES)}")
    vmax = vmax if vmax > 0 else 1.0
    if color_scale == "sqrt":
        return colors.PowerNorm(gamma=0.5, vmin=max(vmin, 0.0), vmax=vmax, clip=True)
    if color_scale == "log":
        return colors.LogNorm(vmin=vmax * 1e-4, vmax=vmax, clip=True)
    return colors.Normalize(vmin=vmin, vmax=vmax)


def _weight_label(color_scale: str, kind=None) -> str:
    """The colour scale's label: "attention weight", and, for a map the library stored as another kind
    than probabilities over tokens (:mod:`attention_hooker._map_kinds`), which kind (a DiffLlama map is
    drawn, its negative entries too, but its scale must not read as probabilities)."""
    label = "attention weight" + ("" if color_scale == "linear" else f" ({color_scale} scale)")
    return label if kind is None else f"{label}\n{kind.name}: {kind.what}"


def colormap_named(name: str):
    """The matplotlib colormap ``name``, drawing non-finite values in red."""
    import matplotlib

    if not isinstance(name, str) or name not in matplotlib.colormaps:
        raise AttentionHookerError(
            f"cmap={name!r} is not a matplotlib colormap; expected a name such as 'viridis', 'magma' or 'Blues'"
        )
    return matplotlib.colormaps[name].with_extremes(bad="red")


def plot_attention_overview(
    source,
    *,
    call: int = 0,
    batch_index: int = 0,
    scale: str = "shared",
    layers: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    save_path: Union[str, os.PathLike, None] = None,
    cmap: str = "viridis",
    cell_size: float = 0.9,
    color_scale: str = "linear",
):
    """Every head of every layer at a glance: rows are layers (model order), columns heads.

    Args:
        source: a hooker, a loaded capture, or ``{layer_name: [tensor per call]}``.
        call: which call of each layer (a layer called fewer times shows its last call).
        batch_index: which batch item.
        scale: ``"shared"``: one colour scale for all panels (0 to the largest
            weight anywhere); ``"row"``: each layer on its own scale (0 to that
            layer's largest weight), so quiet layers stay readable.
        layers: the layer names to include (default: all).
        title: the figure title.
        save_path: file to write (folders are created; format from the extension).
        cmap: matplotlib colormap; non-finite weights are red.
        cell_size: inches per panel.
        color_scale: ``"linear"``, ``"sqrt"`` or ``"log"`` (see :func:`plot_attention_grid`).

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        AttentionHookerError: on empty values, an unknown layer or scale, or a wrong shape.

    Example:
        >>> import torch
        >>> v = {f"layer{i}": [torch.rand(1, 3, 4, 4).softmax(-1)] for i in range(2)}
        >>> fig = plot_attention_overview(v)
        >>> sum(1 for ax in fig.axes if ax.images)
        6
    """
    Figure = figure_class()
    if not isinstance(scale, str) or scale not in ("shared", "row"):
        raise AttentionHookerError(f"scale={scale!r} must be 'shared' or 'row'")
    call = non_negative_int(call, "call")
    cell_size = positive_number(cell_size, "cell_size")
    grids = _overview_grids(source, call, batch_index, layers)  # name -> (heads, query, key)
    n_heads = max(g.shape[0] for g in grids.values())
    colormap = colormap_named(cmap)
    shared_max = max(_largest_weight(g) for g in grids.values())
    fig = Figure(figsize=(cell_size * n_heads + 2.6, cell_size * len(grids) + 1.0), layout="constrained")
    axes = fig.subplots(len(grids), n_heads, squeeze=False)
    image = None
    labels = dict(zip(grids, short_layer_names(list(grids))))
    for row, (name, grid) in enumerate(grids.items()):
        vmax = shared_max if scale == "shared" else _largest_weight(grid)
        image = _draw_overview_row(axes[row], grid, labels[name], colormap, color_scale, vmax, first_row=row == 0)
        if scale == "row":
            fig.colorbar(image, ax=axes[row, :], shrink=0.9, aspect=8, pad=0.01, label=_weight_label(color_scale))
    if scale == "shared":
        fig.colorbar(image, ax=axes, shrink=0.8, label=_weight_label(color_scale))
    fig.suptitle(title or f"{len(grids)} layers x {n_heads} heads (rows: layers, columns: heads; {scale} colour scale)")
    save_figure(fig, save_path)
    return fig


def _overview_grids(source, call: int, batch_index: int, layers) -> dict:
    """``{layer name: (heads, query, key)}``: call ``call`` of each layer (its last, if called fewer
    times), batch item ``batch_index``.

    Raises:
        AttentionHookerError: on empty values, an unknown layer, a wrong shape or no positions.
    """
    values = values_of(source, layers=layers)
    grids = {
        name: as_heads(calls[min(call, len(calls) - 1)], batch_index=batch_index, where=f"layer {name!r}")
        for name, calls in values.items()
    }
    for name, grid in grids.items():
        require_positions(grid.shape, f"layer {name!r}")
    return grids


def _largest_weight(arr: np.ndarray) -> float:
    """The largest finite weight of ``arr`` (1.0 when it has none)."""
    finite = arr[np.isfinite(arr)]
    return float(finite.max()) if finite.size else 1.0


def _draw_overview_row(axes_row, grid: np.ndarray, label: str, colormap, color_scale: str, vmax: float, *,
                       first_row: bool):
    """One layer's heads ``grid`` ``(heads, query, key)`` along ``axes_row`` on a colour scale from 0 to
    ``vmax`` (panels past its heads left empty), its name on the left, the head numbers above the
    first row. Returns the last image drawn."""
    image = None
    for head, ax in enumerate(axes_row):
        ax.set_xticks([])
        ax.set_yticks([])
        if head >= grid.shape[0]:
            ax.set_axis_off()
            continue
        image = ax.imshow(np.ma.masked_invalid(grid[head]), cmap=colormap, norm=color_norm(color_scale, 0.0, vmax), aspect="auto",
                          interpolation="nearest")
        if first_row:
            ax.set_title(f"h{head}", fontsize=8)
        if head == 0:
            ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    return image
