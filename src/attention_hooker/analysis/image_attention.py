"""Text-to-image attention: each query token's attention over the image tokens, placed on its image.

The language model's attention of one layer call, ``(batch, heads, query, key)``, is read at the keys
that are image tokens (an :class:`~attention_hooker.media.ImageTokens` table says which, and which
patches of which image each one stands for). Nothing is renormalised: the weight a query gave to the
image tokens stays the share of its attention that went to the image (:attr:`ImageAttention.share`);
the rest went to text. On each view's grid, a token's weight is spread evenly over the cells it covers,
so a grid sums to the weight its view received, less that of marker tokens that cover no cell (such as
LLaVA-NeXT's row ends, which count in ``share`` but lie on no cell).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from .._checks import check_probabilities
from ..errors import AttentionHookerError
from ..media.image_tokens import ImageTokens, ImageView

__all__ = ["ImageAttention", "image_attention"]


@dataclass(frozen=True)
class ImageAttention:
    """One batch row's attention from query tokens to its image tokens.

    Attributes:
        tokens: the row's image tokens (an :class:`ImageTokens` table).
        queries: ``(q,)`` the query positions read.
        weights: ``(heads, q, n)``: each query's weight on each image token (as the layer gave it).
        share: ``(heads, q)``: the share of each query's attention that went to image tokens (``weights``
            summed; the rest went elsewhere).
        grids: ``{view index: (heads, q, rows, cols)}``: the weights placed on each view's cells.
    """

    tokens: ImageTokens
    queries: torch.Tensor
    weights: torch.Tensor
    share: torch.Tensor
    grids: Dict[int, torch.Tensor]

    def __repr__(self) -> str:
        h, q, n = self.weights.shape
        return (f"ImageAttention({q} queries x {h} heads over {n} image tokens of "
                f"{len({v.image for v in self.views})} image(s); mean share {float(self.share.mean()):.3f})")

    @property
    def views(self) -> Sequence[ImageView]:
        return [self.tokens.views[k] for k in sorted(self.grids)]

    def share_by_image(self) -> torch.Tensor:
        """``(heads, q, images)``: the weight each image received (images as in ``tokens.views``)."""
        images = sorted({v.image for v in self.tokens.views})
        out = self.weights.new_zeros(*self.weights.shape[:2], len(images))
        for k, image in enumerate(images):
            out[..., k] = self.weights[..., self.tokens.image == image].sum(-1)
        return out

    def mean_heads(self) -> "ImageAttention":
        """The same, averaged over heads (``heads`` becomes 1)."""
        return ImageAttention(self.tokens, self.queries, self.weights.mean(0, keepdim=True),
                              self.share.mean(0, keepdim=True),
                              {k: g.mean(0, keepdim=True) for k, g in self.grids.items()})


def image_attention(attention: torch.Tensor, tokens: ImageTokens, *, batch: int = 0,
                    queries: Optional[Sequence[int]] = None,
                    heads: Optional[Sequence[int]] = None) -> ImageAttention:
    """Each query's attention over the image tokens of one batch row, on each image's own grid.

    Args:
        attention: one layer call's map, ``(batch, heads, query, key)``; its keys are the axis
            ``tokens`` was read along (the language model's sequence, or Mllama's cross-attention keys).
        tokens: the batch's image tokens (:func:`attention_hooker.media.image_token_map`).
        batch: the batch row to read.
        queries: query positions to read (default: every query row of the map).
        heads: heads to keep (default: all).

    Returns:
        An :class:`ImageAttention` with weights ``(heads, q, n)``, the share ``(heads, q)`` that went to
        image tokens, and each view's grid ``(heads, q, rows, cols)``.

    Raises:
        AttentionHookerError: the map is not 4-D, the batch row, a query or a head is out of range, the
            row has no image token, an image token lies past the map's keys, or the row's image tokens lie
            on a view with no cells (BLIP-2's query tokens: see ``image_attention_through_queries``).

    Example:
        >>> import torch
        >>> from attention_hooker.media.image_tokens import table, ImageView
        >>> tokens = table("demo", "sequence", [(0, 1 + 2 * r + c, 0, 0, r, c, 1, 1) for r in range(2)
        ...                for c in range(2)], [[2 * r + c] for r in range(2) for c in range(2)], 8,
        ...                [ImageView(0, 0, "image", 2, 2)])
        >>> attention = torch.full((1, 1, 6, 6), 1 / 6)
        >>> result = image_attention(attention, tokens, queries=[5])
        >>> round(float(result.share), 4), result.grids[0].shape
        (0.6667, torch.Size([1, 1, 2, 2]))
    """
    if not isinstance(attention, torch.Tensor) or attention.dim() != 4:
        raise AttentionHookerError("image_attention: expected one layer call's map (batch, heads, query, key), got "
                                   f"{tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__}")
    check_probabilities(attention, "image_attention's map")
    if not 0 <= batch < attention.shape[0]:
        raise AttentionHookerError(f"image_attention: batch row {batch} is out of range for a map of "
                                   f"{attention.shape[0]} rows")
    row = tokens.in_row(batch)
    if len(row) == 0:
        raise AttentionHookerError(f"image_attention: batch row {batch} holds no image token")
    cellless = sorted({tokens.views[k].name for k in set(row.view.tolist())
                       if tokens.views[k].rows == 0 or tokens.views[k].cols == 0})
    if cellless:
        raise AttentionHookerError(
            f"image_attention: the {row.family} image tokens of batch row {batch} lie on view(s) {cellless} with no "
            "cells: each stands for the whole image, not a patch, so their weights have no place on a grid; for "
            "query tokens of a Q-Former (BLIP-2, InstructBLIP) chain them to the patches with "
            "attention_hooker.analysis.query_image_attention.image_attention_through_queries")
    keys = attention.shape[-1]
    if int(row.position.max()) >= keys:
        raise AttentionHookerError(f"image_attention: image tokens reach key {int(row.position.max())}, but the map "
                                   f"has {keys} keys; pass the map of a layer that attends over the "
                                   f"{row.axis!r} axis the tokens were read along")
    qs = torch.arange(attention.shape[2]) if queries is None else torch.as_tensor(list(queries), dtype=torch.long)
    if qs.numel() and (int(qs.min()) < -attention.shape[2] or int(qs.max()) >= attention.shape[2]):
        raise AttentionHookerError(f"image_attention: queries {qs.tolist()} out of range for {attention.shape[2]} "
                                   f"query rows")
    hs = torch.arange(attention.shape[1]) if heads is None else torch.as_tensor(list(heads), dtype=torch.long)
    if hs.numel() and (int(hs.min()) < 0 or int(hs.max()) >= attention.shape[1]):
        raise AttentionHookerError(f"image_attention: heads {hs.tolist()} out of range for {attention.shape[1]} heads")
    qs = qs % attention.shape[2]
    a = attention[batch].index_select(0, hs).index_select(1, qs)  # (H, q, K)
    weights = a.index_select(2, row.position).double()  # (H, q, n)
    grids: Dict[int, torch.Tensor] = {}
    for k in sorted(set(row.view.tolist())):
        v = tokens.views[k]
        grid = weights.new_zeros(*weights.shape[:2], v.rows, v.cols)
        for i in (row.view == k).nonzero().flatten().tolist():
            r, c = int(row.row[i]), int(row.col[i])
            h, w = int(row.height[i]), int(row.width[i])
            if h * w:  # a marker token (a row end) covers no cell
                grid[..., r:r + h, c:c + w] += weights[..., i, None, None] / (h * w)
        grids[k] = grid
    return ImageAttention(row, qs, weights, weights.sum(-1), grids)
