"""Long attention maps pooled down to pictures, block by block, without keeping the full map.

``hooker.reduce_into(PooledAttention(size=512))`` hands each call's weights to a
partial result a tile of query rows at a time (on the sdpa route the full
``(batch, heads, L, L)`` map is never held), and keeps, per call, the map pooled
to at most ``size x size`` blocks: ``(batch, heads, query blocks, key blocks)``.
Query row ``i`` of ``L`` falls in block ``i * P // L`` with ``P = min(size, L)``
(likewise for keys; the rule, shared with the page's pooled map, is
:mod:`attention_hooker._blocks`), so the blocks do not overlap and, when ``P`` divides
``L``, equal ``avg_pool2d`` / ``max_pool2d`` with an ``L / P`` kernel.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .._blocks import block_count, block_edges, block_of
from .._checks import one_of, positive_int
from ..analysis.core import real_rows, row_mask
from ..values import AttentionValues

__all__ = ["PooledAttention", "KeyReductions", "block_labels"]


class PooledAttention:
    """Keeps each call's attention pooled to at most ``size x size`` blocks.

    Args:
        size: the most blocks along each axis (a shorter axis keeps its length).
        how: ``"mean"`` (the block's average weight) or ``"max"`` (its largest).

    Attributes:
        values: ``{layer_name: [pooled map per call]}``, each ``(batch, heads,
            min(size, query), min(size, key))`` in float32.

    Example:
        >>> pooled = PooledAttention(size=2)
        >>> partial = pooled.partial("layer")
        >>> partial.write(torch.arange(4), torch.full((1, 1, 4, 4), 0.25))
        >>> partial.commit()
        >>> pooled.values["layer"][0]
        tensor([[[[0.2500, 0.2500],
                  [0.2500, 0.2500]]]])
    """

    def __init__(self, size: int = 512, how: str = "mean"):
        self.size = positive_int(size, "size")
        self.how = one_of(how, "how", ("mean", "max"))
        self.values = AttentionValues()

    def partial(self, name: str, padding_mask=None, *, n_query: Optional[int] = None) -> "_PooledCall":
        """The pooled map of one call of layer ``name`` (``n_query`` query rows; by default
        those of its first block), filled a block of query rows at a time (a
        :class:`~attention_hooker.keep.protocol.CallWriter`; ``padding_mask`` is accepted
        for symmetry with the statistics and unused)."""
        del padding_mask
        return _PooledCall(self, name, n_query)


def block_labels(tokens: Sequence[str], size: int) -> List[str]:
    """Labels of the blocks a pooled axis of ``len(tokens)`` positions has: the token
    itself for a block of one position, ``"first-last"`` positions for a longer one
    (blocks laid out as :class:`PooledAttention` lays them out).

    Example:
        >>> block_labels(["a", "b", "c", "d", "e"], 2), block_labels(["a", "b"], 4)
        (['0-2', '3-4'], ['a', 'b'])
    """
    first = block_edges(len(tokens), size)
    return [str(tokens[a]) if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(first, first[1:])]


class _PooledCall:
    takes_narrow_blocks = True  # a causal tile's keys after its last row are zeros: left out
    takes_key_bands = True  # and a sliding window's before its first key

    def __init__(self, owner: PooledAttention, name: str, n_query: Optional[int] = None):
        self._owner, self._name, self._n_query = owner, name, n_query
        self.n_key: Optional[int] = None  # the call's keys, when blocks may be narrower (told by the reduction)
        self._pooled: Optional[torch.Tensor] = None  # (B, H, Pq, Pk): sums or maxima
        self._counts: Optional[torch.Tensor] = None  # (Pq, Pk) cells per block (mean)

    def add(self, block: torch.Tensor, rows: torch.Tensor, n_query: int) -> None:
        """:meth:`write`, telling the call's number of query rows."""
        self._n_query = n_query
        self.write(rows, block)

    def write(self, rows: torch.Tensor, block: torch.Tensor, first_key: int = 0) -> None:
        """Adds query rows ``rows`` (absolute, ``(r,)``) of the call: ``block`` is
        ``(batch, heads, r, width)``, the call's keys ``first_key .. first_key + width - 1``, the others zeros."""
        if self._n_query is None:
            self._n_query = block.shape[2]
        n_query = self._n_query
        a = block if block.dtype == torch.float32 else block.float()
        batch, heads, _, width = a.shape
        n_key = self.n_key if self.n_key is not None else width
        size = self._owner.size
        p_query, p_key = block_count(n_query, size), block_count(n_key, size)
        rows = rows.to(a.device)
        row_block = block_of(rows, n_query, size)  # (r,)
        mean = self._owner.how == "mean"
        if self._pooled is None:
            fill = 0.0 if mean else float("-inf")
            self._pooled = torch.full((batch, heads, p_query, p_key), fill, dtype=torch.float32, device=a.device)
            self._counts = torch.zeros(p_query, p_key, dtype=torch.float32, device=a.device)
        by_key = _pooled_keys(a, n_key, p_key, mean, int(first_key))  # (B, H, r, Pk)
        if mean:
            self._pooled.index_add_(2, row_block, by_key)
            key_sizes = torch.bincount(block_of(torch.arange(n_key, device=a.device), n_key, size),
                                       minlength=p_key).float()  # (Pk,)
            row_sizes = torch.bincount(row_block, minlength=p_query).float()  # (Pq,)
            self._counts += row_sizes[:, None] * key_sizes[None, :]
        else:
            index = row_block[None, None, :, None].expand(batch, heads, len(rows), p_key)
            self._pooled.scatter_reduce_(2, index, by_key, "amax")

    def commit(self) -> None:
        if self._pooled is None:
            return
        pooled = self._pooled / self._counts.clamp(min=1) if self._owner.how == "mean" else self._pooled
        self._owner.values.setdefault(self._name, []).append(pooled.cpu())
        self._pooled = None

    def discard(self) -> None:
        self._pooled = self._counts = None


class KeyReductions:
    """Per call, what each key receives and which keys each query looks at most, from tiles.

    Args:
        top: how many keys to keep per query row (their indices and weights).

    Attributes:
        received: ``{layer_name: [per call (batch, heads, key)]}``: the attention each key
            receives, summed over the real query rows (``padding_mask``) of the call.
        top_keys: ``{layer_name: [per call (indices, weights)]}``, each ``(batch, heads,
            query, top)``, largest first.

    Example:
        >>> keys = KeyReductions(top=1)
        >>> partial = keys.partial("layer")
        >>> partial.write(torch.arange(2), torch.tensor([[[[0.9, 0.1], [0.3, 0.7]]]]))
        >>> partial.commit()
        >>> keys.received["layer"][0], keys.top_keys["layer"][0][0]
        (tensor([[[1.2000, 0.8000]]]), tensor([[[[0],
                  [1]]]]))
    """

    def __init__(self, top: int = 5):
        self.top = positive_int(top, "top")
        self.received = AttentionValues()
        self.top_keys: dict = {}

    def partial(self, name: str, padding_mask=None, *, n_query: Optional[int] = None) -> "_KeysCall":
        """The reductions of one call of layer ``name`` (``n_query`` query rows; by default
        those of its first block), filled a block of query rows at a time (a
        :class:`~attention_hooker.keep.protocol.CallWriter`)."""
        return _KeysCall(self, name, padding_mask, n_query)


class _KeysCall:
    def __init__(self, owner: KeyReductions, name: str, padding_mask, n_query: Optional[int] = None):
        self._owner, self._name, self._n_query = owner, name, n_query
        self._mask = row_mask(padding_mask)  # (B, T) or None
        self._received: Optional[torch.Tensor] = None  # (B, H, K)
        self._top: list = []  # [(first row, indices, weights)] per block

    def add(self, block: torch.Tensor, rows: torch.Tensor, n_query: int) -> None:
        """:meth:`write`, telling the call's number of query rows."""
        self._n_query = n_query
        self.write(rows, block)

    def write(self, rows: torch.Tensor, block: torch.Tensor) -> None:
        if self._n_query is None:
            self._n_query = block.shape[2]
        a = block.float()
        real = real_rows(self._mask, rows, self._n_query, a.shape[0], a.device)  # (B, r)
        column = torch.einsum("bhrk,br->bhk", a, real.float())  # (B, H, K): over the real rows
        self._received = column if self._received is None else self._received + column
        weights, indices = a.topk(min(self._owner.top, a.shape[-1]), dim=-1)  # (B, H, r, top)
        self._top.append((int(rows[0]), indices.cpu(), weights.cpu()))

    def commit(self) -> None:
        if self._received is None:
            return
        self._owner.received.setdefault(self._name, []).append(self._received.cpu())
        blocks = sorted(self._top, key=lambda block: block[0])
        indices = torch.cat([b[1] for b in blocks], 2)
        weights = torch.cat([b[2] for b in blocks], 2)
        self._owner.top_keys.setdefault(self._name, []).append((indices, weights))
        self._received, self._top = None, []

    def discard(self) -> None:
        self._received, self._top = None, []


def _pooled_keys(a: torch.Tensor, n_key: int, p_key: int, mean: bool, lo: int = 0) -> torch.Tensor:
    """``(batch, heads, r, p_key)``: each key block's sum (``mean``) or largest weight of a block
    ``a`` ``(batch, heads, r, width)`` holding the keys ``lo .. lo + width - 1`` of a call with ``n_key``
    keys, every other key zero (weights of narrow tiles or of a band, >= 0).

    Blocks of equal length (``p_key`` divides ``n_key``) are reduced along a reshaped last axis,
    one read of the block (the at most two blocks the band cuts, one by one); otherwise each key is
    added to its block (``index_add``)."""
    batch, heads, r, width = a.shape
    if width == 0:  # rows that see no key
        return a.new_zeros(batch, heads, r, p_key)
    hi = lo + width
    zeros_outside = lo > 0 or hi < n_key
    if n_key % p_key == 0:
        length = n_key // p_key
        first_whole, end_whole = -(-lo // length), hi // length  # blocks wholly inside the band
        cut = [b for b in (lo // length, end_whole) if b < p_key and b * length < hi
               and (b * length < lo or (b + 1) * length > hi)]  # blocks the band cuts
        out = (a.new_zeros(batch, heads, r, p_key) if zeros_outside or cut
               else a.new_empty(batch, heads, r, p_key))
        reduce = torch.sum if mean else torch.amax
        if first_whole < end_whole:
            whole = a[..., first_whole * length - lo:end_whole * length - lo]
            out[..., first_whole:end_whole] = reduce(whole.unflatten(-1, (end_whole - first_whole, length)), dim=-1)
        for block in dict.fromkeys(cut):  # a block cut by the band: its other keys are zeros
            part = reduce(a[..., max(lo, block * length) - lo:min(hi, (block + 1) * length) - lo], dim=-1)
            out[..., block] = part if mean else part.clamp(min=0.0)
        return out
    key_block = block_of(torch.arange(lo, hi, device=a.device), n_key, p_key)
    if mean:
        return a.new_zeros(batch, heads, r, p_key).index_add_(3, key_block, a)
    out = torch.full((batch, heads, r, p_key), 0.0 if zeros_outside else float("-inf"), device=a.device)
    return out.scatter_reduce_(3, key_block.expand_as(a), a, "amax")