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
from ..selection import resolve_rows

__all__ = ["ImageAttention", "image_attention"]


@dataclass(frozen=True)
class ImageAttention:
    """One batch row's attention from query tokens to its image tokens.

    Attributes:
        tokens: the row's image tokens (an :class:`ImageTokens` table).
        queries: ``(q,)`` the query positions read, on the sequence (for a map of fewer query rows than keys,
            such as a decoding step's, the rows are the last positions; see :func:`image_attention`).
        weights: ``(heads, q, n)``: each query's weight on each image token (as the layer gave it).
        share: ``(heads, q)``: the share of each query's attention that went to image tokens, all of the
            row's images together (``weights`` summed; the rest went elsewhere). Per image:
            :meth:`share_by_image`.
        grids: ``{view index: (heads, q, rows, cols)}``: the weights placed on each view's cells (view indices
            into ``tokens.views``).
        heads: ``(heads,)`` the model's head index of each head read (through the capture's head selection).
    """

    tokens: ImageTokens
    queries: torch.Tensor
    weights: torch.Tensor
    share: torch.Tensor
    grids: Dict[int, torch.Tensor]
    heads: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        h, q, n = self.weights.shape
        return (f"ImageAttention({q} queries x {h} heads over {n} image tokens of "
                f"{len(self.images)} image(s); mean share {float(self.share.mean()):.3f})")

    @property
    def views(self) -> Sequence[ImageView]:
        return [self.tokens.views[k] for k in sorted(self.grids)]

    @property
    def images(self) -> Sequence[int]:
        """The row's images (indices as in the token table), in order: the columns of :meth:`share_by_image`."""
        return sorted(set(self.tokens.image.tolist()))

    def share_by_image(self) -> torch.Tensor:
        """``(heads, q, images)``: the weight each of the row's images received (columns: :attr:`images`)."""
        images = self.images
        out = self.weights.new_zeros(*self.weights.shape[:2], len(images))
        for k, image in enumerate(images):
            out[..., k] = self.weights[..., self.tokens.image == image].sum(-1)
        return out

    def mean_heads(self) -> "ImageAttention":
        """The same, averaged over heads (``heads`` becomes 1; :attr:`heads` becomes ``None``)."""
        return ImageAttention(self.tokens, self.queries, self.weights.mean(0, keepdim=True),
                              self.share.mean(0, keepdim=True),
                              {k: g.mean(0, keepdim=True) for k, g in self.grids.items()})


def _index(given, length: int, noun: str) -> torch.Tensor:
    idx = torch.arange(length) if given is None else torch.as_tensor(list(given), dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < -length or int(idx.max()) >= length):
        raise AttentionHookerError(f"image_attention: {noun} {idx.tolist()} out of range for a map of {length} "
                                   f"{noun} (indices 0..{length - 1}, or -{length}..-1 from the end)")
    return idx % max(length, 1)


def image_attention(attention: torch.Tensor, tokens: ImageTokens, *, batch: int = 0,
                    queries: Optional[Sequence[int]] = None,
                    heads: Optional[Sequence[int]] = None, selection=None,
                    call_keys: Optional[int] = None, call_queries: Optional[int] = None) -> ImageAttention:
    """Each query's attention over the image tokens of one batch row, on each image's own grid.

    Args:
        attention: one layer call's map as captured, ``(batch, heads, query, key)``; its keys are the axis
            ``tokens`` was read along (the language model's sequence, or Mllama's cross-attention keys).
        tokens: the batch's image tokens (:func:`attention_hooker.media.image_token_map`), read from the
            prompt's inputs (a decoding step's map, with more keys, indexes the same positions).
        batch: the batch row to read (negative: from the end).
        queries: the map's query rows to read (default: all; negative: from the end).
        heads: the map's heads to keep (default: all; negative: from the end).
        selection: what the capture kept of each call (the hooker's ``heads=`` / ``rows=`` / ``keys=``): the
            hooker itself, a loaded capture, its ``selection`` dict, or a
            :class:`~attention_hooker.selection.Selection`. Required to read a capture taken with one: a
            map whose rows, keys or heads were selected cannot be told from a whole one.
        call_keys: how many keys the captured call had: the map's own when the capture kept every key; the
            table's cross-attention key count for a cross-axis table; required with a key selection on the
            sequence axis.
        call_queries: how many query rows the captured call had; required with a row selection, except one
            counted from the end (``rows="last"``, negative indices) on the sequence axis, whose rows are the
            call's last positions whether it was cached or not. On the sequence axis a map's query rows are the
            call's last positions (a decoding step's one row is its newest token).

    Returns:
        An :class:`ImageAttention` with weights ``(heads, q, n)``, the share ``(heads, q)`` that went to
        image tokens, each view's grid ``(heads, q, rows, cols)``, the query positions and the model's head
        index of each head.

    Raises:
        AttentionHookerError: the map is not 4-D, the batch row, a query or a head is out of range, the
            row has no image token, the map's key count does not fit the table's axis (fewer keys than the
            prompt for ``"sequence"``, not exactly the cross keys for ``"cross"``), a key selection dropped
            image tokens or cannot be placed, a selection disagrees with the map, or the row's image
            tokens lie on a view with no cells (BLIP-2's query tokens: see ``image_attention_through_queries``).

    Example:
        >>> import torch
        >>> from attention_hooker.media.image_tokens import table, ImageView
        >>> tokens = table("demo", "sequence", [(0, 1 + 2 * r + c, 0, 0, r, c, 1, 1) for r in range(2)
        ...                for c in range(2)], [[2 * r + c] for r in range(2) for c in range(2)], 8,
        ...                [ImageView(0, 0, "image", 2, 2)], keys=6)
        >>> attention = torch.full((1, 1, 6, 6), 1 / 6)
        >>> result = image_attention(attention, tokens, queries=[5])
        >>> round(float(result.share), 4), result.grids[0].shape
        (0.6667, torch.Size([1, 1, 2, 2]))
    """
    from ..selection import Selection

    if not isinstance(attention, torch.Tensor) or attention.dim() != 4:
        got = tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__
        raise AttentionHookerError(f"image_attention: expected one layer call's map (batch, heads, query, key), got "
                                   f"{got}")
    check_probabilities(attention, "image_attention's map")
    if not -attention.shape[0] <= batch < attention.shape[0]:
        raise AttentionHookerError(f"image_attention: batch row {batch} is out of range for a map of "
                                   f"{attention.shape[0]} rows")
    batch = batch % attention.shape[0]
    if selection is None:
        selection = Selection()
    elif not isinstance(selection, Selection):
        selection = Selection.from_saved(selection)
    n_heads, n_rows, n_keys = attention.shape[1:]
    # the captured call's key count, and the original key index of each key of the map
    if call_keys is None:
        if selection.keys is None:
            call_keys = n_keys
        elif tokens.axis == "cross" and tokens.keys is not None:
            call_keys = tokens.keys
        else:
            raise AttentionHookerError(
                f"image_attention: the capture kept keys {selection.keys!r} of each call; placing them (and the "
                "queries, which are the call's last positions) needs the captured call's key count: pass "
                "call_keys=")
    key_ids = list(resolve_rows(selection.keys, call_keys, f"a call of {call_keys} keys", "keys")) \
        if selection.keys is not None else list(range(n_keys))
    if selection.keys is None and call_keys != n_keys:
        raise AttentionHookerError(f"image_attention: call_keys={call_keys}, but the map, captured with every key, "
                                   f"has {n_keys}")
    if len(key_ids) != n_keys:
        raise AttentionHookerError(f"image_attention: the key selection {selection.keys!r} keeps {len(key_ids)} of "
                                   f"{call_keys} keys, but the map has {n_keys}")
    if tokens.keys is not None:
        if tokens.axis == "cross" and call_keys != tokens.keys:
            raise AttentionHookerError(
                f"image_attention: the map has {call_keys} keys, but the {tokens.family} table was read along the "
                f"'cross' axis of {tokens.keys} cross-attention keys: pass a cross-attention layer's map (a "
                "self-attention map's keys are text positions)")
        if tokens.axis == "sequence" and call_keys < tokens.keys:
            raise AttentionHookerError(
                f"image_attention: the map has {call_keys} keys, fewer than the {tokens.keys} positions of the "
                f"prompt the {tokens.family} table was read from: pass a map of the language model's self-attention "
                "over that sequence (a decoding step's map has more keys, and indexes the same positions)")
    # the query position of each row of the map
    if selection.rows is None:
        row_ids, offset = list(range(n_rows)), 0
        if tokens.axis == "sequence":
            offset = call_keys - n_rows  # self-attention's queries are the call's last positions (one, when cached)
    else:
        counted_from_end = isinstance(selection.rows, tuple) and all(r < 0 for r in selection.rows)
        if call_queries is None and tokens.axis == "sequence" and counted_from_end:
            call_queries = call_keys  # rows counted from the end are the last positions, cached or not
        if call_queries is None:
            raise AttentionHookerError(
                f"image_attention: the capture kept query rows {selection.rows!r} of each call; which positions "
                "those are depends on how many query rows the call had (the prompt's length for a call without a "
                "cache, 1 for a decoding step): pass call_queries=")
        row_ids = list(resolve_rows(selection.rows, call_queries, f"a call of {call_queries} query rows"))
        if len(row_ids) != n_rows:
            raise AttentionHookerError(f"image_attention: the row selection {selection.rows!r} keeps {len(row_ids)} "
                                       f"of {call_queries} query rows, but the map has {n_rows}")
        offset = call_keys - call_queries if tokens.axis == "sequence" else 0
    head_ids = list(selection.heads) if selection.heads is not None else list(range(n_heads))
    if len(head_ids) != n_heads:
        raise AttentionHookerError(f"image_attention: the capture kept heads {list(selection.heads)}, but the map has "
                                   f"{n_heads} heads")
    row = tokens.in_row(batch)
    if len(row) == 0:
        hint = ""
        if int(tokens.batch.max(initial=-1)) + 1 != attention.shape[0] and len(tokens):
            hint = f" (the table has {int(tokens.batch.max()) + 1} rows, the map {attention.shape[0]})"
        raise AttentionHookerError(f"image_attention: batch row {batch} holds no image token{hint}")
    cellless = sorted({tokens.views[k].name for k in set(row.view.tolist())
                       if tokens.views[k].rows == 0 or tokens.views[k].cols == 0})
    if cellless:
        raise AttentionHookerError(
            f"image_attention: the {row.family} image tokens of batch row {batch} lie on view(s) {cellless} with no "
            "cells: each stands for the whole image, not a patch, so their weights have no place on a grid; for "
            "query tokens of a Q-Former (BLIP-2, InstructBLIP) chain them to the patches with "
            "attention_hooker.analysis.query_image_attention.image_attention_through_queries")
    where = {k: j for j, k in enumerate(key_ids)}
    dropped = sorted(int(p) for p in row.position if int(p) not in where)
    if dropped:
        msg = "were not kept by the capture's key selection" if selection.keys is not None else \
            "lie past the map's keys"
        raise AttentionHookerError(
            f"image_attention: image token(s) at {row.axis} position(s) {dropped[:8]}"
            f"{'...' if len(dropped) > 8 else ''} of batch row {batch} {msg} ({n_keys} keys); pass the map of a "
            f"layer that attends over the {row.axis!r} axis the tokens were read along, captured with every image "
            "token among its keys")
    qs = _index(queries, n_rows, "query rows")
    hs = _index(heads, n_heads, "heads")
    a = attention[batch].index_select(0, hs).index_select(1, qs)  # (H, q, K)
    weights = a.index_select(2, torch.tensor([where[int(p)] for p in row.position], dtype=torch.long)).double()
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
    positions = torch.tensor([offset + row_ids[int(q)] for q in qs], dtype=torch.long)
    return ImageAttention(row, positions, weights, weights.sum(-1), grids,
                          torch.tensor([head_ids[int(h)] for h in hs], dtype=torch.long))
