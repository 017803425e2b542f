"""How the page carries a long call: a pooled map to look at, each query's largest weights for detail.

A call of 2,000 x 2,000 tokens is 4 million weights per head: a page holding them all weighs tens of
megabytes, and no screen shows them at once. A call longer than the page's limit on either axis
travels instead as

- the **pooled map**: each head's ``(query, key)`` map cut into ``min(size, query) x min(size,
  key)`` blocks of tokens, each block's largest weight (a maximum, as the page draws any map
  larger than its canvas). The blocks are those of :class:`~attention_hooker.keep.pooling.PooledAttention`
  for the same length and size (one rule, :mod:`attention_hooker._blocks`: token ``p`` of ``L``
  falls in block ``p * P // L``, the blocks ``L // P`` or ``L // P + 1`` tokens wide), and the
  page is given each block's first token (``edges``), so that it names the tokens of a block by
  the same rule; and
- **each query's largest weights**: the ``top`` keys of every query row of every head with their
  weights, and the share of the row's attention they hold, so that a click on a block shows the
  tokens inside it, and the head view lists where each query looks.

The pooled map and the colours are 8-bit codes on a log scale under the head's largest weight
(:func:`attention_hooker.views.page.encode_weights`: six decades, each weight from 1e-6 of the head's
largest up within 2.8%), so that a late row of a causal head, whose weights are 1e-3 to 1e-5 next to
the head's 1.0 (its first row), shows. The largest weights also travel as float16 (3 significant
digits), for reading.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from ..._blocks import block_edges

__all__ = ["is_long", "encode_long_call"]


def is_long(shape, pool_above: int) -> bool:
    """Whether a call of ``(batch, heads, query, key)`` ``shape`` is carried pooled."""
    return shape[2] > pool_above or shape[3] > pool_above


def encode_long_call(weights: torch.Tensor, codes: torch.Tensor, size: int, top: int) -> Tuple[Dict, Dict]:
    """The pooled map and each query's largest weights of one call.

    Args:
        weights: ``(batch, heads, query, key)`` as captured.
        codes: ``(batch, heads, query, key)`` uint8, their codes (``encode_weights``).
        size: the most blocks along each axis of the pooled map (an axis of ``L`` tokens has
            ``min(size, L)``, laid out by :func:`attention_hooker._blocks.block_edges`).
        top: how many keys of each query row to keep (at most the number of keys).

    Returns:
        ``(arrays, meta)``: ``arrays`` are uint8 byte strings ``"pooled"`` ``(batch, heads,
        query blocks, key blocks)``, ``"top_codes"`` ``(batch, heads, query, top)``,
        ``"top_index"`` ``(batch, heads, query, top)`` little-endian uint16 (uint32 past 65,536
        keys), keys in decreasing weight, ``"top_values"`` their weights as little-endian float16,
        and ``"cover"`` ``(batch, heads, query)``: the percent
        (0-100, rounded) of each row's weight that its ``top`` keys hold. ``meta`` gives the
        pooled shape, ``"edges"`` (per axis, the first token of each block, then the axis's
        length), ``top`` and the index width in bytes.
    """
    batch, heads, n_query, n_key = codes.shape
    edges_q, edges_k = block_edges(n_query, size), block_edges(n_key, size)
    # The block maximum over each run of rows, then of keys; 255 (a non-finite weight) wins, so a
    # block holding one is marked.
    pooled = np.maximum.reduceat(codes.numpy(), edges_q[:-1], axis=2)
    pooled = np.maximum.reduceat(pooled, edges_k[:-1], axis=3)
    top = min(top, n_key)
    w = weights.detach().to("cpu", torch.float32)
    clean = torch.where(torch.isfinite(w), w, torch.zeros((), dtype=w.dtype)).clamp_(min=0)
    values, index = torch.topk(clean, top, dim=-1)  # (B, H, Q, top), largest first
    top_codes = codes.gather(-1, index)
    totals = clean.sum(-1)
    cover = torch.where(totals > 0, values.sum(-1) / torch.where(totals > 0, totals, 1.0), 0.0)
    index_dtype = torch.int32 if n_key > 65536 else torch.int16  # bit patterns: uint16 / uint32 in the page
    index_bytes = 4 if n_key > 65536 else 2
    arrays = {
        "pooled": np.ascontiguousarray(pooled).tobytes(),
        "top_codes": top_codes.contiguous().numpy().tobytes(),
        "top_index": index.to(index_dtype).contiguous().numpy().astype(f"<i{index_bytes}").tobytes(),
        "top_values": values.to(torch.float16).contiguous().numpy().astype("<f2").tobytes(),
        "cover": cover.mul(100).round().clamp(0, 100).to(torch.uint8).numpy().tobytes(),
    }
    meta = {"shape": list(pooled.shape), "edges": [edges_q, edges_k], "k": top,
            "indexBytes": index_bytes}
    return arrays, meta
