"""Text-to-image attention chained through a Q-Former (BLIP-2, InstructBLIP).

In BLIP-2 the language model attends to ``num_query_tokens`` query tokens per image, and each query
reads the vision tower's tokens (class token first, then the patches in raster order) through the
Q-Former's cross-attention. Chaining the two maps gives, for a text token, a weight on every vision
token::

    weights[h, q, v] = sum_j  lm[h, q, query j] * qformer[j, v]

where ``lm`` is one language-model layer call (each of its heads kept) and ``qformer`` is the
Q-Former's query -> vision-token cross-attention of the chosen layers and heads, averaged (arithmetic
mean over layers and heads; each row of the mean still sums to 1). Nothing is renormalised: a text
token's chained weights sum to the share of its attention that went to the image's query tokens (the
rest went to text). The class token's weight is reported beside the patch grid, not spread over it.

This is a chain of two attention maps, not an attribution: it leaves out the Q-Former's self-attention
between queries (and, in InstructBLIP, with the instruction), its feed-forward blocks and residual paths,
as attention rollout does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import torch

from .._checks import check_probabilities
from .._tensor import on_one_device
from ..errors import AttentionHookerError
from ..media.image_tokens import ImageTokens

__all__ = ["QueryChainAttention", "image_attention_through_queries"]


@dataclass(frozen=True)
class QueryChainAttention:
    """One batch row's text-to-patch attention through the Q-Former, per image of the row.

    Attributes:
        queries: ``(q,)`` the language-model query positions read.
        images: the images of the row (indices as in the token table), in order.
        query_weights: ``{image: (heads, q, num_query_tokens)}``: each text token's weight on the image's
            query tokens, as the language-model layer gave it.
        qformer: ``{image: (num_query_tokens, 1 + patches)}``: the averaged Q-Former cross-attention used.
        weights: ``{image: (heads, q, 1 + patches)}``: the chain, vision tokens in the tower's order.
        share: ``{image: (heads, q)}``: the share of each text token's attention that went to the image's
            query tokens (= ``weights`` summed); as one ``(heads, q, images)`` tensor: :meth:`share_by_image`.
        class_token: ``{image: (heads, q)}``: the chained weight on the tower's class token.
        grids: ``{image: (heads, q, side, side)}``: the chained weights of the patches on the patch grid
            (the whole image, as the processor resized it).
        layers, heads: the Q-Former layers (indices into the maps passed) and heads averaged.
    """

    queries: torch.Tensor
    images: Sequence[int]
    query_weights: Dict[int, torch.Tensor]
    qformer: Dict[int, torch.Tensor]
    weights: Dict[int, torch.Tensor]
    share: Dict[int, torch.Tensor]
    class_token: Dict[int, torch.Tensor]
    grids: Dict[int, torch.Tensor]
    layers: Sequence[int]
    heads: Sequence[int]

    def share_by_image(self) -> torch.Tensor:
        """``(heads, q, images)``: :attr:`share` as one tensor, columns in the order of :attr:`images` (the form
        ``ImageAttention.share_by_image()`` gives)."""
        return torch.stack([self.share[image] for image in self.images], -1)

    def __repr__(self) -> str:
        return (f"QueryChainAttention({self.queries.numel()} queries over {len(self.images)} image(s) through "
                f"Q-Former layers {list(self.layers)}, heads {list(self.heads)} averaged)")


def _averaged_qformer(maps, layers, heads, images: int):
    maps = [maps] if isinstance(maps, torch.Tensor) else list(maps)
    if not maps:
        raise AttentionHookerError("image_attention_through_queries: no Q-Former cross-attention map was given")
    for i, m in enumerate(maps):
        if not isinstance(m, torch.Tensor) or m.dim() != 4:
            raise AttentionHookerError(
                "image_attention_through_queries: each Q-Former cross-attention map must be one layer call "
                f"(images, heads, num_query_tokens, vision_tokens); map {i} is "
                f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
        if m.shape != maps[0].shape:
            raise AttentionHookerError(f"image_attention_through_queries: Q-Former maps differ in shape: "
                                       f"{tuple(maps[0].shape)} and {tuple(m.shape)} (map {i})")
        check_probabilities(m, f"Q-Former cross-attention map {i}")
    if maps[0].shape[0] != images:
        raise AttentionHookerError(f"image_attention_through_queries: the Q-Former maps hold {maps[0].shape[0]} images "
                                   f"but the token table {images}")
    layers = list(range(len(maps))) if layers is None else [int(x) for x in layers]
    heads = list(range(maps[0].shape[1])) if heads is None else [int(x) for x in heads]
    if not layers or not all(0 <= x < len(maps) for x in layers):
        raise AttentionHookerError(f"image_attention_through_queries: Q-Former layers {layers} out of range for "
                                   f"{len(maps)} maps")
    if not heads or not all(0 <= x < maps[0].shape[1] for x in heads):
        raise AttentionHookerError(f"image_attention_through_queries: Q-Former heads {heads} out of range for "
                                   f"{maps[0].shape[1]} heads")
    stacked = torch.stack(on_one_device([maps[x].double() for x in layers]))[:, :, heads]  # (L, images, h, Nq, V)
    return stacked.mean(dim=(0, 2)), layers, heads  # (images, Nq, V)


def image_attention_through_queries(attention: torch.Tensor, tokens: ImageTokens,
                                    qformer_cross: Union[torch.Tensor, Sequence[torch.Tensor]], *, batch: int = 0,
                                    queries: Optional[Sequence[int]] = None,
                                    heads: Optional[Sequence[int]] = None,
                                    qformer_layers: Optional[Sequence[int]] = None,
                                    qformer_heads: Optional[Sequence[int]] = None) -> QueryChainAttention:
    """Each text token's attention on the image's patches, through the Q-Former's query tokens.

    Args:
        attention: one language-model layer call, ``(batch, heads, query, key)``.
        tokens: the batch's query tokens (:func:`attention_hooker.media.image_token_map` of a BLIP-2 or
            InstructBLIP model: views named "queries").
        qformer_cross: the Q-Former's cross-attention, one map per layer call, each
            ``(images, heads, num_query_tokens, vision_tokens)`` (a capture of
            ``qformer.encoder.layer.N.crossattention.attention``, or the eager ``cross_attentions``).
        batch: the batch row to read.
        queries: language-model query positions (default: every row of the map).
        heads: language-model heads to keep (default: all; each kept apart; negative: from the end).
        qformer_layers: indices into ``qformer_cross`` to average (default: all).
        qformer_heads: Q-Former heads to average (default: all).

    Returns:
        A :class:`QueryChainAttention`, per image of the row.

    Raises:
        AttentionHookerError: the table is not of query tokens, the maps are not 4-D probabilities, their
            images, query tokens or vision tokens disagree with the table, or a selection is out of range.

    Example:
        >>> import torch
        >>> from attention_hooker.media.image_tokens import ImageView, table
        >>> tokens = table("blip-2", "sequence", [(0, j, 0, 0, 0, 0, 0, 0) for j in range(2)],
        ...                [list(range(4))] * 2, 8, [ImageView(0, 0, "queries", 0, 0)])
        >>> lm = torch.tensor([[[[0.25, 0.25, 0.5]]]])  # one head, one text token, keys: 2 queries + itself
        >>> qformer = torch.full((1, 1, 2, 5), 0.2)  # each query spread evenly on class token + 4 patches
        >>> chain = image_attention_through_queries(lm, tokens, [qformer], queries=[0])
        >>> float(chain.share[0]), chain.grids[0].shape, round(float(chain.class_token[0]), 3)
        (0.5, torch.Size([1, 1, 2, 2]), 0.1)
    """
    if not isinstance(attention, torch.Tensor) or attention.dim() != 4:
        got = tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__
        raise AttentionHookerError("image_attention_through_queries: expected one layer call's map (batch, heads, "
                                   f"query, key), got {got}")
    check_probabilities(attention, "image_attention_through_queries' language-model map")
    if tokens.views and any(v.name != "queries" or v.rows or v.cols for v in tokens.views):
        raise AttentionHookerError(f"image_attention_through_queries: expected a table of Q-Former query tokens "
                                   f"(views named 'queries' with no cells), got {tokens.family} views "
                                   f"{sorted({v.name for v in tokens.views})}; use image_attention for patch tokens")
    if not 0 <= batch < attention.shape[0]:
        raise AttentionHookerError(f"image_attention_through_queries: batch row {batch} is out of range for a map of "
                                   f"{attention.shape[0]} rows")
    row = tokens.in_row(batch)
    if len(row) == 0:
        raise AttentionHookerError(f"image_attention_through_queries: batch row {batch} holds no query token")
    if tokens.keys is not None and attention.shape[-1] < tokens.keys:
        raise AttentionHookerError(
            f"image_attention_through_queries: the map has {attention.shape[-1]} keys, fewer than the {tokens.keys} "
            "positions of the prompt the table was read from: pass a language-model self-attention map captured "
            "whole (no keys= selection)")
    if int(row.position.max()) >= attention.shape[-1]:
        raise AttentionHookerError(f"image_attention_through_queries: query tokens reach key {int(row.position.max())}"
                                   f" but the map has {attention.shape[-1]} keys")
    all_images = sorted({v.image for v in tokens.views})
    qformer, layers, qheads = _averaged_qformer(qformer_cross, qformer_layers, qformer_heads, len(all_images))
    per_image = qformer.shape[1]
    units = int((row.source[0] >= 0).sum())
    side = math.isqrt(units)
    if side * side != units or qformer.shape[2] != 1 + units:
        raise AttentionHookerError(
            f"image_attention_through_queries: the Q-Former's maps have {qformer.shape[2]} vision tokens, expected "
            f"the class token + the {units} patches each query token's image has ({side} x {side} expected square)")
    qs = torch.arange(attention.shape[2]) if queries is None else torch.as_tensor(list(queries), dtype=torch.long)
    if qs.numel() and (int(qs.min()) < -attention.shape[2] or int(qs.max()) >= attention.shape[2]):
        raise AttentionHookerError(f"image_attention_through_queries: queries {qs.tolist()} out of range for "
                                   f"{attention.shape[2]} query rows")
    hs = torch.arange(attention.shape[1]) if heads is None else torch.as_tensor(list(heads), dtype=torch.long)
    if hs.numel() and (int(hs.min()) < -attention.shape[1] or int(hs.max()) >= attention.shape[1]):
        raise AttentionHookerError(f"image_attention_through_queries: heads {hs.tolist()} out of range for "
                                   f"{attention.shape[1]} heads")
    qs, hs = qs % attention.shape[2], hs % attention.shape[1]
    a = attention[batch].index_select(0, hs).index_select(1, qs).double()  # (H, q, K)
    images = sorted(set(row.image.tolist()))
    out = {name: {} for name in ("query_weights", "qformer", "weights", "share", "class_token", "grids")}
    for image in images:
        positions = row.position[row.image == image]  # query tokens of this image, query 0 first
        if positions.numel() != per_image:
            raise AttentionHookerError(
                f"image_attention_through_queries: image {image} has {positions.numel()} query tokens in batch row "
                f"{batch} but the Q-Former maps have {per_image} queries")
        lm = a.index_select(2, positions)  # (H, q, Nq)
        chain = lm @ qformer[all_images.index(image)]  # (H, q, 1 + patches)
        out["query_weights"][image] = lm
        out["qformer"][image] = qformer[all_images.index(image)]
        out["weights"][image] = chain
        out["share"][image] = lm.sum(-1)
        out["class_token"][image] = chain[..., 0]
        out["grids"][image] = chain[..., 1:].reshape(*chain.shape[:2], side, side)
    return QueryChainAttention(qs, images, layers=layers, heads=qheads, **out)
