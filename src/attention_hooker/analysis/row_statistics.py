"""Per-row head statistics of one call, from blocks of its attention rows, each in one pass.

A block is ``(batch, heads, r, width)``: query rows ``rows`` of a call whose map is ``(batch,
heads, n_query, n_key)``, holding its keys ``first_key .. first_key + width - 1``, the others zeros
(the narrow tiles of a causal call, whose later keys are masked for every row of the tile; the
bands of a sliding window). Each quantity is a
reduction over the keys that costs about one read of the block: no ``(r, keys)`` matrix of
distances and no logarithm per weight when the block's log is given. The per-row values are
written into ``(batch, heads, n_query)`` tensors, so that a block costs a few tensor operations
whatever its size (a 32k-token call comes in thousands of blocks).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

__all__ = ["CallRowStatistics", "block_row_statistics"]


class CallRowStatistics:
    """The per-row statistics of one call, filled a block of rows at a time.

    Args:
        shape: the call's ``(batch, heads, n_query, n_key)``.
        dtype, device: of the blocks.
        sinks: key positions (non-negative, below ``n_key``) whose summed share is ``"sink_share"``.
        last: ``(batch,)`` each item's last real key, for ``"last_token_share"`` (else the last key).

    Attributes:
        values: ``{statistic: (batch, heads, n_query)}``: ``"entropy"`` (nats),
            ``"first_token_share"``, ``"distance"`` (``sum_j a_ij |i - j|`` when ``n_query ==
            n_key``, else NaN), ``"last_token_share"`` and, with ``sinks``, ``"sink_share"``;
            rows not written yet are 0.
        written: ``(n_query,)`` bool, the rows written.
    """

    def __init__(self, shape, dtype: torch.dtype, device, *, sinks: Optional[Sequence[int]] = None,
                 last: Optional[torch.Tensor] = None):
        batch, heads, self.n_query, self.n_key = (int(n) for n in shape)
        names = ["entropy", "first_token_share", "distance", "last_token_share"] + (["sink_share"] if sinks else [])
        self.values = {name: torch.zeros(batch, heads, self.n_query, dtype=dtype, device=device) for name in names}
        self.written = torch.zeros(self.n_query, dtype=torch.bool, device=device)
        self._sinks = None if sinks is None else list(sinks)
        self._last = None if last is None else last.to(device)
        # Offsets from a block's bounds, sliced for each block (no tensor made per block):
        # _down[n_key - lo:] = lo - j for j < lo; _keys = j.
        self._down = torch.arange(self.n_key, 0, -1, dtype=dtype, device=device)
        self._keys = torch.arange(self.n_key, dtype=dtype, device=device)

    def add(self, a: torch.Tensor, rows: torch.Tensor, log_a: Optional[torch.Tensor] = None,
            first_key: int = 0) -> None:
        """Adds the rows ``rows`` ``(r,)`` (absolute) of the call: ``a`` ``(batch, heads, r, width)``
        probabilities of the keys ``first_key .. first_key + width - 1``, every other key zero (a narrow
        tile, a sliding window's band); ``log_a``, when given, ``log(a)`` (0 wherever ``a`` is 0): the
        entropy is then ``-sum(a * log_a)``, a product per weight."""
        batch, heads, r, width = a.shape
        lo = int(first_key)
        end = lo + width  # keys lo .. end - 1 are in the block
        rows = rows.to(a.device)
        put = lambda name, value: self.values[name].index_copy_(2, rows, value)  # noqa: E731
        if log_a is not None:
            put("entropy", torch.linalg.vecdot(a, log_a).neg_())
        else:
            put("entropy", torch.special.entr(a).sum(-1))
        if width and lo == 0:
            put("first_token_share", a[..., 0])
        elif lo:  # key 0 is before the band: no weight
            self.values["first_token_share"].index_fill_(2, rows, 0.0)
        if self.n_query == self.n_key:
            put("distance", self._distance(a, rows, lo))
        else:
            self.values["distance"].index_fill_(2, rows, float("nan"))
        if self._sinks:
            inside = [s - lo for s in self._sinks if lo <= s < end]
            if inside:
                put("sink_share", a[..., inside].sum(-1))
            elif lo:
                self.values["sink_share"].index_fill_(2, rows, 0.0)
        if self._last is not None:
            index = (self._last - lo).clamp(min=0, max=max(width - 1, 0))[:, None, None, None].expand(batch, heads, r, 1)
            seen = ((self._last >= lo) & (self._last < end)).to(a.dtype)[:, None, None]
            put("last_token_share", a.gather(-1, index)[..., 0] * seen if width else a.new_zeros(batch, heads, r))
        elif end == self.n_key and width:
            put("last_token_share", a[..., -1])
        elif lo:
            self.values["last_token_share"].index_fill_(2, rows, 0.0)
        self.written.index_fill_(0, rows, True)

    def _distance(self, a: torch.Tensor, rows: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``(batch, heads, r)``: ``sum_j a_ij |i - j|`` over the block's keys ``start ..``.

        Keys before every row of the block (``j < min(rows)``) and after every row (``j >
        max(rows)``) are reduced by a product with a vector of offsets, each term counted from
        the nearest row bound so that no large terms cancel; only the keys between the block's
        first and last row take ``|i - j|`` one by one."""
        end = start + a.shape[-1]
        lo, hi = (int(v) for v in rows.aminmax())
        i = rows.to(a.dtype)  # (r,)
        left, right = min(max(lo, start), end), min(max(hi + 1, start), end)  # absolute keys
        total = None
        if left > start:  # j < lo <= i: |i - j| = (i - lo) + (lo - j)
            part = a[..., :left - start]
            offsets = self._down[self.n_key - lo + start:self.n_key - lo + left]  # lo - j
            total = torch.matmul(part, offsets).addcmul_(part.sum(-1), i - lo)
        if right > left:  # lo <= j <= hi: one by one
            near = (i[:, None] - self._keys[None, left:right]).abs_()  # (r, right - left)
            middle = (a[..., left - start:right - start] * near).sum(-1)
            total = middle if total is None else total.add_(middle)
        if end > right:  # j > hi >= i: |i - j| = (j - hi) + (hi - i)
            part = a[..., right - start:]
            after = torch.matmul(part, self._keys[right:end] - hi).addcmul_(part.sum(-1), hi - i)
            total = after if total is None else total.add_(after)
        return total if total is not None else a.new_zeros(a.shape[:3])


def block_row_statistics(a: torch.Tensor, rows: torch.Tensor, n_query: int, n_key: int, *,
                         log_a: Optional[torch.Tensor] = None, sinks: Optional[Sequence[int]] = None,
                         last: Optional[torch.Tensor] = None, first_key: int = 0) -> Dict[str, torch.Tensor]:
    """``{statistic: (batch, heads, r)}`` of one block ``a`` ``(batch, heads, r, width)`` (keys
    ``first_key ..``) of a call with ``n_query`` rows and ``n_key`` keys (see :class:`CallRowStatistics`)."""
    batch, heads, r, _ = a.shape
    call = CallRowStatistics((batch, heads, n_query, n_key), a.dtype, a.device, sinks=sinks, last=last)
    call.add(a, rows, log_a, first_key)
    return {name: value.index_select(2, rows.to(a.device)) for name, value in call.values.items()}
