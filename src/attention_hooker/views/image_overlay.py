"""Text-to-image attention drawn on the original image: where one query token (or each generated step)
looked, image token by image token.

Each image token stands for a box of its image (:meth:`~attention_hooker.media.ImageTokens.boxes`,
fractions of the image as the processor handed it to the model). A token's weight is split evenly
over the cells of its view's grid that it covers (as :func:`~attention_hooker.analysis.image_attention`
places it on its grid), and each cell is drawn over the part of the image it covers. Views of one image
whose boxes overlap (a global or second, coarser look at the whole image beside its tiles, LLaVA's
class token) are drawn in panels of their own, never mixed; views that tile the image (disjoint boxes)
share one panel.

Nothing is renormalised: each row's title says the share of the query's attention that went to the
image (the rest went to text or to other images), each panel the share its views received. The colour
scale runs from 0 to the largest value drawn unless ``vmax`` is given, and the colour bar says which.

The views may not import the analysis: this module takes the weights ``(q, n)`` (or an object with
``weights (heads, q, n)`` and ``tokens``, such as an :class:`~attention_hooker.analysis.image_attention.ImageAttention`)
and the :class:`~attention_hooker.media.ImageTokens` of one batch row.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import AttentionHookerError
from ..media.image_tokens import ImageTokens
from .plot import color_norm, colormap_named, figure_class, save_figure
from .vit import image_array

__all__ = ["check_region", "image_panels", "image_weight_map", "overlay_rgb", "plot_image_attention", "processed_region"]

Box = Tuple[float, float, float, float]


def _overlaps(a: Box, b: Box) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def image_panels(tokens: ImageTokens, image: int) -> List[Tuple[int, ...]]:
    """The panels image ``image`` is drawn in: groups of view indices (into ``tokens.views``) whose boxes
    do not overlap, each view joining the first panel it overlaps nothing of (tiles share a panel; a
    global view over the whole image gets its own). Only views that hold a token of ``tokens`` count.

    Example:
        >>> from attention_hooker.media.image_tokens import ImageView, table
        >>> views = [ImageView(0, 0, "left tile", 1, 1, (0, 0, 1, .5)), ImageView(0, 1, "right tile", 1, 1,
        ...          (0, .5, 1, 1)), ImageView(0, 2, "global", 1, 1)]
        >>> tokens = table("demo", "sequence", [(0, k, 0, k, 0, 0, 1, 1) for k in range(3)], [[0]] * 3, 8, views)
        >>> image_panels(tokens, 0)
        [(0, 1), (2,)]
    """
    used = sorted(set(tokens.view[tokens.image == image].tolist()))
    if not used:
        raise AttentionHookerError(f"image {image} has no image token in this table (images: "
                                   f"{sorted(set(tokens.image.tolist()))})")
    panels: List[List[int]] = []
    for k in used:
        box = tokens.views[k].box
        for panel in panels:
            if not any(_overlaps(box, tokens.views[j].box) for j in panel):
                panel.append(k)
                break
        else:
            panels.append([k])
    return [tuple(p) for p in panels]


def _pixel_span(start: float, stop: float, size: int) -> Tuple[int, int]:
    """Pixels ``[a, b)`` of ``size`` whose centres lie in ``[start, stop)`` (fractions)."""
    a = max(0, math.ceil(start * size - 0.5))
    b = min(size, math.ceil(stop * size - 0.5))
    return a, max(a, b)


def image_weight_map(weights, tokens: ImageTokens, views: Sequence[int], size: Tuple[int, int], *,
                     region: Box = (0.0, 0.0, 1.0, 1.0)) -> np.ndarray:
    """One query's weights on the pixels of the original image, from the tokens on ``views``.

    Args:
        weights: ``(n,)``: the query's weight on each token of ``tokens`` (one batch row).
        tokens: the row's image tokens.
        views: the view indices drawn (one panel, see :func:`image_panels`).
        size: ``(height, width)`` of the original image in pixels.
        region: ``(top, left, bottom, right)``, the fractions of the original image the processor handed
            to the model (the boxes are fractions of that; see :func:`processed_region`).

    Returns:
        ``(height, width)`` float64: at each pixel whose centre lies in a token's box, the token's weight
        divided by the cells it covers (a pixel under no token's box is NaN, drawn as the bare image).

    Example:
        >>> from attention_hooker.media.image_tokens import ImageView, table
        >>> tokens = table("demo", "sequence", [(0, 1 + k, 0, 0, k // 2, k % 2, 1, 1) for k in range(4)],
        ...                [[k] for k in range(4)], 8, [ImageView(0, 0, "image", 2, 2)])
        >>> image_weight_map([0.0, 0.5, 0.0, 0.0], tokens, [0], (2, 4))
        array([[0. , 0. , 0.5, 0.5],
               [0. , 0. , 0. , 0. ]])
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != len(tokens):
        raise AttentionHookerError(f"image_weight_map: {w.shape[0]} weights for {len(tokens)} image tokens; pass "
                                   "one weight per token of the table (one batch row)")
    height, width = int(size[0]), int(size[1])
    out = np.full((height, width), np.nan)
    top0, left0, bottom0, right0 = check_region(tokens, region, "image_weight_map")
    rh, rw = bottom0 - top0, right0 - left0
    boxes = tokens.boxes().numpy()
    cells = (tokens.height * tokens.width).numpy()
    # a token that covers no cell (a row-end marker, a query token of a view without cells) is on no pixel
    on = np.isin(tokens.view.numpy(), list(views)) & (cells > 0)
    for k in np.nonzero(on)[0]:
        top, left, bottom, right = boxes[k]
        r0, r1 = _pixel_span(top0 + top * rh, top0 + bottom * rh, height)
        c0, c1 = _pixel_span(left0 + left * rw, left0 + right * rw, width)
        block = out[r0:r1, c0:c1]
        out[r0:r1, c0:c1] = np.where(np.isnan(block), 0.0, block) + w[k] / cells[k]
    return out


def overlay_rgb(picture: np.ndarray, amap: np.ndarray, *, norm, cmap: str = "inferno",
                alpha: float = 0.6) -> np.ndarray:
    """The picture ``(H, W, 3)`` (in [0, 1]) with ``amap (H, W)`` blended over it: ``(1 - alpha) * picture +
    alpha * colour`` where the map is finite, the bare picture where it is NaN. Returns ``(H, W, 3)``."""
    colours = colormap_named(cmap)(norm(np.nan_to_num(amap, nan=0.0)))[..., :3]
    blended = (1 - alpha) * picture + alpha * colours
    return np.where(np.isfinite(amap)[..., None], blended, picture)


def check_region(tokens: ImageTokens, region: Optional[Box], where: str) -> Box:
    """``region`` as four floats (default: the whole image), refused where the table's boxes are already
    fractions of the original image (``tokens.frame == "image"``) and ``region`` is not the whole image: the
    processor's crop would be applied twice."""
    box = (0.0, 0.0, 1.0, 1.0) if region is None else tuple(float(x) for x in region)
    if tokens.frame == "image" and box != (0.0, 0.0, 1.0, 1.0):
        raise AttentionHookerError(
            f"{where}: the {tokens.family} table's boxes are already fractions of the original image (its reader "
            f"placed them: image_sizes given, or a family whose processor only resizes or tiles), so region={box} "
            "would apply the processor's crop twice; leave region out")
    return box


def processed_region(processor, size: Tuple[int, int]) -> Box:
    """The part of an original image of ``size = (height, width)`` that a CLIP-like image processor hands
    the model, as ``(top, left, bottom, right)`` fractions: the whole image, padded to a square first
    (``do_pad``, LLaVA's), less what a center crop after a shortest-edge resize cuts off.

    Raises:
        AttentionHookerError: the processor resizes in a way this does not model (then the boxes cannot
            be placed on the original image honestly: draw on the processed image instead).

    Example:
        >>> from types import SimpleNamespace
        >>> clip = SimpleNamespace(do_resize=True, size={"shortest_edge": 32}, do_center_crop=True,
        ...                        crop_size={"height": 32, "width": 32})
        >>> processed_region(clip, (40, 80))
        (0.0, 0.25, 1.0, 0.75)
    """
    image = getattr(processor, "image_processor", processor)
    height, width = float(size[0]), float(size[1])
    top, left, bottom, right = 0.0, 0.0, height, width  # in original pixels; padding may take them outside
    if getattr(image, "do_pad", False):
        side = max(height, width)
        top, left = -((side - height) // 2), -((side - width) // 2)
        bottom, right = top + side, left + side
    h, w = bottom - top, right - left
    resize = getattr(image, "size", None) if getattr(image, "do_resize", True) else None
    resize = _size_dict(resize)
    if getattr(image, "do_center_crop", False):
        crop = _size_dict(getattr(image, "crop_size", None)) or {}
        if not (isinstance(resize, dict) and set(resize) == {"shortest_edge"}) or set(crop) != {"height", "width"}:
            raise AttentionHookerError(f"processed_region: {type(image).__name__} center-crops after a resize of "
                                       f"{resize!r}; only a shortest-edge resize is modelled")
        short = resize["shortest_edge"]  # the long side follows, rounded down (as transformers resizes)
        rh, rw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        ch, cw = min(crop["height"], rh), min(crop["width"], rw)
        y0, x0 = (rh - ch) // 2, (rw - cw) // 2
        top, bottom = top + y0 / rh * h, top + (y0 + ch) / rh * h
        left, right = left + x0 / rw * w, left + (x0 + cw) / rw * w
    elif resize is not None and not (isinstance(resize, dict) and set(resize) in ({"height", "width"},
                                                                                   {"shortest_edge"})):
        raise AttentionHookerError(f"processed_region: {type(image).__name__} resizes to {resize!r}, which this does "
                                   "not model; draw the boxes on the processed image instead")
    return (top / height, left / width, bottom / height, right / width)


def _size_dict(size):
    """A processor's size setting (a dict, or transformers' ``SizeDict``) as a dict of its set entries."""
    if size is None:
        return None
    items = size.items() if hasattr(size, "items") else vars(size).items() if hasattr(size, "__dict__") else None
    if items is None:
        return size
    return {k: v for k, v in items if v is not None}


def _row_weights(attention, tokens: Optional[ImageTokens], heads) -> Tuple[np.ndarray, ImageTokens, Optional[list], str]:
    """``(weights (q, n), tokens, query positions or None, what the heads are)`` from a tensor or an
    ImageAttention-like object."""
    queries, which = None, "as given"
    if hasattr(attention, "weights") and hasattr(attention, "tokens"):
        tokens = attention.tokens if tokens is None else tokens
        queries = getattr(attention, "queries", None)
        queries = None if queries is None else [int(q) for q in queries]
        attention = attention.weights
    if tokens is None:
        raise AttentionHookerError("plot_image_attention: pass the image tokens (tokens=...) with bare weights")
    w = np.asarray(attention.detach().cpu() if hasattr(attention, "detach") else attention, dtype=np.float64)
    if w.ndim == 3:
        if heads == "mean":
            w, which = w.mean(0), f"mean of {w.shape[0]} heads"
        elif isinstance(heads, (int, np.integer)) and not isinstance(heads, bool) and -w.shape[0] <= heads < w.shape[0]:
            w, which = w[heads], f"head {heads}"
        else:
            raise AttentionHookerError(f"plot_image_attention: heads={heads!r}; expected 'mean' or a head index below "
                                       f"{w.shape[0]}")
    elif w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[1] != len(tokens):
        raise AttentionHookerError(f"plot_image_attention: weights of shape {w.shape} do not match the {len(tokens)} "
                                   "image tokens; expected (n,), (q, n) or (heads, q, n)")
    if len(set(tokens.batch.tolist())) > 1:
        raise AttentionHookerError("plot_image_attention: the tokens span several batch rows; pass one row's "
                                   "(tokens.in_row(b))")
    if not np.isfinite(w).all() or (w < 0).any():
        raise AttentionHookerError("plot_image_attention: the weights must be finite and non-negative (attention "
                                   "probabilities)")
    return w, tokens, queries, which


def plot_image_attention(
    image,
    attention,
    tokens: Optional[ImageTokens] = None,
    *,
    image_index: int = 0,
    heads="mean",
    query_labels: Optional[Sequence[str]] = None,
    region: Optional[Box] = None,
    vmax: Optional[float] = None,
    color_scale: str = "linear",
    cmap: str = "inferno",
    alpha: float = 0.6,
    title: Optional[str] = None,
    save_path: Union[str, os.PathLike, None] = None,
):
    """Each query's attention on the image tokens, drawn over the original image: one row per query
    (a text token, or each generated step), one panel per group of non-overlapping views.

    Args:
        image: the original image: a PIL image, or an ``(H, W, 3)`` / ``(3, H, W)`` array or tensor.
        attention: ``(n,)``, ``(q, n)`` or ``(heads, q, n)`` weights on the row's ``n`` image tokens, or an
            object with ``weights (heads, q, n)`` and ``tokens`` (``image_attention(...)``'s result).
        tokens: the batch row's image tokens (default: ``attention.tokens``).
        image_index: which image of the row ``image`` is (as in ``tokens.views``).
        heads: ``"mean"`` or a head index, for ``(heads, q, n)`` weights.
        query_labels: one label per row (default: ``query <position>`` where known).
        region: the fractions of ``image`` the processor handed the model (:func:`processed_region`);
            default the whole image.
        vmax: top of the colour scale (default: the largest value drawn, said on the colour bar).
        color_scale: ``"linear"``, ``"sqrt"`` or ``"log"``.
        cmap: the overlay's colormap (a matplotlib name).
        alpha: the overlay's opacity, in [0, 1].
        title: the figure's title.
        save_path: a file to write (format from the extension).

    Returns:
        The ``matplotlib.figure.Figure``; each row's title gives the share of its query's attention on
        this image, each panel the share on its views (not renormalised).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise AttentionHookerError(f"alpha={alpha!r} must be a number in [0, 1] (the overlay's opacity)")
    w, tokens, queries, which = _row_weights(attention, tokens, heads)
    picture = image_array(image)
    height, width = picture.shape[:2]
    panels = image_panels(tokens, image_index)
    labels = list(query_labels) if query_labels is not None else (
        [f"query {q}" for q in queries] if queries is not None and len(queries) == w.shape[0]
        else [f"query {i}" for i in range(w.shape[0])])
    if len(labels) != w.shape[0]:
        raise AttentionHookerError(f"plot_image_attention: {len(labels)} query labels for {w.shape[0]} rows of weights")
    maps = [[image_weight_map(row, tokens, views, (height, width), region=region or (0.0, 0.0, 1.0, 1.0))
             for views in panels] for row in w]
    drawn = [float(np.nanmax(m)) for rows in maps for m in rows if np.isfinite(m).any()]
    stretched = vmax is None
    top = max(drawn, default=0.0) if stretched else float(vmax)
    norm = color_norm(color_scale, 0.0, top if top > 0 else 1.0)
    Figure = figure_class()
    fig = Figure(figsize=(max(6.0, 3.2 * len(panels) + 2.4), 3.0 * len(w) + 1.0), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(w), len(panels), squeeze=False))
    on_image = tokens.image.numpy() == image_index
    for q, row in enumerate(w):
        share = float(row[on_image].sum())
        others = float(row[~on_image].sum())
        for p, views in enumerate(panels):
            ax = axes[q, p]
            ax.imshow(overlay_rgb(picture, maps[q][p], norm=norm, cmap=cmap, alpha=alpha),
                      extent=(0, width, height, 0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            names = ", ".join(dict.fromkeys(tokens.views[k].name for k in views))
            on_panel = float(row[np.isin(tokens.view.numpy(), list(views))].sum())
            ax.set_title(f"{names}: {on_panel:.1%}", fontsize=9)
        axes[q, 0].set_ylabel(f"{labels[q]}\n{share:.1%} on image {image_index}"
                              + (f", {others:.1%} on other images" if others > 0 else ""), fontsize=9)
    from matplotlib.cm import ScalarMappable

    scale = (f"colour stretched to the largest value drawn ({top:.3g})" if stretched else f"colour scale 0 to {top:.3g}")
    fig.colorbar(ScalarMappable(norm=norm, cmap=colormap_named(cmap)), ax=axes, shrink=min(0.8, 0.3 + 0.25 * len(w)),
                 label=f"attention weight per cell\n({scale})")
    fig.supxlabel("a token's weight is split evenly over the cells it covers; weights are not renormalised:\n"
                  "the rest of each query's attention went to text or to other images", fontsize=7)
    fig.suptitle(title or f"attention on image {image_index}" + ("" if which == "as given" else f" ({which})"),
                 fontsize=10, wrap=True)
    save_figure(fig, save_path)
    return fig
