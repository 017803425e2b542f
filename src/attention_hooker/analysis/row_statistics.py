"""Per-row head statistics of a block of attention rows, each in one pass over the block.

A block is ``(batch, heads, r, width)``: query rows ``rows`` of a call whose map is ``(batch,
heads, n_query, n_key)``, its keys ``width ..`` zeros when ``width < n_key`` (the narrow tiles
of a causal call, whose later keys are masked for every row of the tile). Each quantity is a
reduction over the keys that costs about one read of the block: no ``(r, keys)`` matrix of
distances and no logarithm per weight when the block's log is given.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

__all__ = ["block_row_statistics"]


def block_row_statistics(a: torch.Tensor, rows: torch.Tensor, n_query: int, n_key: int, *,
                         log_a: Optional[torch.Tensor] = None, sinks: Optional[Sequence[int]] = None,
                         last: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """``{statistic: (batch, heads, r)}`` of a block ``a`` of probabilities.

    Args:
        a: ``(batch, heads, r, width)``, float32 or float64; keys from ``width`` on are zeros.
        rows: ``(r,)`` the absolute query rows of the block.
        n_query, n_key: the call's query rows and keys.
        log_a: ``log(a)`` (0 wherever ``a`` is 0), when known: the entropy is then
            ``-sum(a * log_a)``, a product per weight instead of a logarithm.
        sinks: key positions (non-negative, below ``n_key``) whose summed share is ``"sink_share"``.
        last: ``(batch,)`` each item's last real key, for ``"last_token_share"`` (else the last key).

    Returns:
        ``"entropy"`` (nats), ``"first_token_share"``, ``"distance"`` (``sum_j a_ij |i - j|``
        when ``n_query == n_key``, else NaN), ``"last_token_share"`` and, with ``sinks``,
        ``"sink_share"``.
    """
    batch, heads, r, width = a.shape
    if log_a is not None:
        entropy = -torch.linalg.vecdot(a, log_a)
    else:
        entropy = torch.special.entr(a).sum(-1)
    out = {"entropy": entropy, "first_token_share": a[..., 0] if width else a.new_zeros(batch, heads, r)}
    if n_query == n_key:
        out["distance"] = _distance(a, rows)
    else:
        out["distance"] = torch.full((batch, heads, r), float("nan"), dtype=a.dtype, device=a.device)
    if sinks is not None:
        inside = [s for s in sinks if s < width]
        out["sink_share"] = a[..., inside].sum(-1) if inside else a.new_zeros(batch, heads, r)
    if last is not None:
        last = last.to(a.device)
        index = last.clamp(max=max(width - 1, 0))[:, None, None, None].expand(batch, heads, r, 1)
        out["last_token_share"] = a.gather(-1, index)[..., 0] * (last < width).to(a.dtype)[:, None, None]
    else:
        out["last_token_share"] = a[..., -1] if width == n_key else a.new_zeros(batch, heads, r)
    return out


def _distance(a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, r)``: ``sum_j a_ij |i - j|`` over the block's keys.

    Keys before every row of the block (``j < min(rows)``) and after every row (``j >
    max(rows)``) are reduced by a product with a vector of offsets, each term counted from the
    nearest row bound so that no large terms cancel; only the keys between the block's first and
    last row take ``|i - j|`` one by one."""
    width = a.shape[-1]
    lo, hi = int(rows.min()), int(rows.max())
    i = rows.to(a.device, a.dtype)[:, None]  # (r, 1)
    left, right = min(lo, width), min(hi + 1, width)
    total = torch.zeros(a.shape[:3], dtype=a.dtype, device=a.device)
    if left > 0:  # j < lo <= i: |i - j| = (i - lo) + (lo - j)
        part = a[..., :left]
        offsets = torch.arange(lo, lo - left, -1, dtype=a.dtype, device=a.device)  # lo - j
        total += torch.matmul(part, offsets) + part.sum(-1) * (i[:, 0] - lo)
    if right > left:  # lo <= j <= hi: one by one
        keys = torch.arange(left, right, dtype=a.dtype, device=a.device)[None, :]
        total += torch.einsum("bhrk,rk->bhr", a[..., left:right], (i - keys).abs())
    if width > right:  # j > hi >= i: |i - j| = (j - hi) + (hi - i)
        part = a[..., right:]
        offsets = torch.arange(right - hi, width - hi, dtype=a.dtype, device=a.device)  # j - hi
        total += torch.matmul(part, offsets) + part.sum(-1) * (hi - i[:, 0])
    return total
