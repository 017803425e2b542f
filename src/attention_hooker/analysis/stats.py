"""Head statistics ``(batch, heads)``: entropy, mean attention distance, sink share, and their accumulator over batches."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .._checks import index_list, non_negative_int
from ..errors import AttentionHookerError
from .core import check_attention, mean_over_queries, query_mask_of, real_rows, row_mask
from .row_statistics import CallRowStatistics

__all__ = ["head_entropy", "mean_attention_distance", "sink_share", "HeadStatsAccumulator"]


def head_entropy(attn, *, padding_mask=None) -> torch.Tensor:
    """Mean entropy of each head's attention rows, in nats (``0 log 0 = 0``).

    Args:
        attn: ``(batch, heads, query, key)`` (or ``(heads, query, key)``).
        padding_mask: ``(batch, query)``, 1/True for real tokens; padded queries are left out.

    Returns:
        ``(batch, heads)``: ``log(n)`` for uniform rows over ``n`` keys, ``0`` for one-hot rows.

    Example:
        >>> head_entropy(torch.full((1, 1, 2, 4), 0.25))
        tensor([[1.3863]], dtype=torch.float64)
    """
    a = check_attention(attn, "attn")
    plogp = torch.where(a > 0, a * torch.log(a.clamp(min=1e-300)), torch.zeros_like(a))
    return mean_over_queries(-plogp.sum(-1), query_mask_of(a, padding_mask))


def _grid_positions(n: int, grid: Tuple[int, int], device) -> torch.Tensor:
    rows, cols = grid
    if rows * cols != n:
        raise AttentionHookerError(f"grid={grid} has {rows * cols} patches but the attention has {n} patch tokens")
    r = torch.arange(rows, device=device, dtype=torch.float64).repeat_interleave(cols)
    c = torch.arange(cols, device=device, dtype=torch.float64).repeat(rows)
    return torch.stack([r, c], dim=-1)  # (N, 2)


def mean_attention_distance(
    attn, *, padding_mask=None, grid: Optional[Tuple[int, int]] = None, prefix_tokens: int = 0
) -> torch.Tensor:
    """How far each head looks: ``sum_j p_ij * d(i, j)`` averaged over queries.

    Args:
        attn: self-attention ``(batch, heads, tokens, tokens)``.
        padding_mask: ``(batch, tokens)``, 1/True for real tokens; padded queries are left out.
        grid: ``(rows, cols)`` of a ViT's patches: distance is then Euclidean in
            patches, between patch tokens only (rows renormalised over patches).
        prefix_tokens: tokens before the patches (class, register tokens), with ``grid``.

    Returns:
        ``(batch, heads)`` distances in tokens (or patches).

    Example:
        >>> eye_shift = torch.eye(4).roll(1, dims=1)[None, None]  # each token looks one ahead
        >>> mean_attention_distance(eye_shift)
        tensor([[1.5000]], dtype=torch.float64)
    """
    a = check_attention(attn, "attn")
    if a.shape[-1] != a.shape[-2]:
        raise AttentionHookerError(
            f"attention is {tuple(a.shape)}: distance needs self-attention (query == key positions)"
        )
    prefix_tokens = non_negative_int(prefix_tokens, "prefix_tokens")
    query_mask = query_mask_of(a, padding_mask)
    if grid is not None:
        a = a[..., prefix_tokens:, prefix_tokens:]
        a = a / a.sum(-1, keepdim=True).clamp(min=1e-300)
        pos = _grid_positions(a.shape[-1], grid, a.device)
        dist = torch.cdist(pos, pos)  # (N, N)
        if query_mask is not None:
            query_mask = query_mask[:, prefix_tokens:]
    else:
        idx = torch.arange(a.shape[-1], device=a.device, dtype=torch.float64)
        dist = (idx[:, None] - idx[None, :]).abs()  # (T, T)
    return mean_over_queries((a * dist).sum(-1), query_mask)


def sink_share(attn, positions: Sequence[int] = (0,), *, padding_mask=None) -> torch.Tensor:
    """Share of attention that lands on given key positions (first token, [CLS], [SEP], ...).

    Args:
        attn: ``(batch, heads, query, key)``.
        positions: key indices; negative ones count from the end.
        padding_mask: ``(batch, query)``, 1/True for real tokens; padded queries are left out.

    Returns:
        ``(batch, heads)`` in ``[0, 1]``.

    Raises:
        AttentionHookerError: on a position outside ``-keys..keys-1`` (no wrap-around), or
            input that is not attention probabilities.

    Example:
        >>> sink_share(torch.tensor([[[[0.7, 0.2, 0.1]]]]), positions=[0])
        tensor([[0.7000]], dtype=torch.float64)
    """
    a = check_attention(attn, "attn")
    chosen = index_list(positions, "positions", length=a.shape[-1], where="the keys", allow_negative=True, noun="position")
    index = torch.as_tensor(chosen, dtype=torch.long, device=a.device)
    return mean_over_queries(a.index_select(-1, index).sum(-1), query_mask_of(a, padding_mask))


class HeadStatsAccumulator:
    """Averages head statistics over many inputs without keeping the matrices.

    Each input's statistics are weighted by its number of real queries, so
    the result equals the statistic over all real queries of all inputs.

    Args:
        sink_positions: key positions whose summed share is also kept, as
            ``"sink_share"`` (e.g. ``[0, 1, 2, 3]``: the four attention sinks of
            StreamingLLM); negative ones count from the end of each layer's keys.

    Example:
        >>> acc = HeadStatsAccumulator()
        >>> acc.update({"layer": [torch.full((1, 2, 3, 3), 1 / 3)]})
        >>> acc.result()["entropy"].shape
        (1, 2)
    """

    STATISTICS = ("entropy", "distance", "first_token_share", "last_token_share")
    needs_probabilities = True  # a reduction refuses calls of another kind of map (keep/reduction.py)

    def __init__(self, *, sink_positions: Optional[Sequence[int]] = None):
        self.sink_positions = None if sink_positions is None else index_list(
            sink_positions, "sink_positions", allow_negative=True, noun="key position")
        if self.sink_positions is not None:
            self.STATISTICS = HeadStatsAccumulator.STATISTICS + ("sink_share",)
        self.layers: List[str] = []
        self._sums: Dict[str, Dict[str, torch.Tensor]] = {}
        self._counts: Dict[str, float] = {}
        self.inputs = 0  # update() calls (forwards)
        self.sequences = 0  # batch items over all updates

    def update(self, values: Mapping, *, padding_mask=None) -> None:
        """Adds one forward's captures (``hooker.values``, a hooker or a loaded capture: first call of each layer).

        ``padding_mask``: ``(batch, tokens)`` 1/True for real tokens; also used to
        find each row's last real token. It must fit every self-attention layer
        (query == key); a cross-attention layer uses it where its query count is
        ``tokens``, and all its queries otherwise.

        Raises:
            AttentionHookerError: on values that are not ``{layer: [tensor per call]}``
                attention probabilities, a layer with no call, a layer whose head
                count differs from earlier updates, or a mask that fits no layer.
        """
        if not isinstance(values, Mapping):
            if not isinstance(getattr(values, "values", None), Mapping):
                raise AttentionHookerError(
                    f"expected {{layer_name: [tensor per call]}} (hooker.values), got {type(values).__name__}")
            values = values.values  # a hooker or a loaded capture
        checked = {}
        for name, calls in values.items():
            if not isinstance(calls, torch.Tensor) and not len(calls):
                raise AttentionHookerError(f"layer {name!r} has no call to take statistics of")
            a = check_attention(calls[0] if not isinstance(calls, torch.Tensor) else calls, f"layer {name!r}")
            self._check_heads(name, a.shape[1])
            if padding_mask is not None and a.shape[-1] == a.shape[-2]:
                query_mask_of(a, padding_mask)  # a self-attention layer: the mask must fit it
            checked[name] = a
        self.inputs += 1
        batch_sizes = set()
        for name, a in checked.items():
            batch_sizes.add(a.shape[0])
            partial = self.partial(name, padding_mask, n_query=a.shape[2])
            partial.write(torch.arange(a.shape[2]), a)
            partial.commit()
        self.sequences += max(batch_sizes, default=0)

    def add_input(self, batch: int) -> None:
        """Counts one forward of ``batch`` sequences whose calls came through
        :meth:`partial` (``hooker.reduce_into``) rather than :meth:`update`."""
        self.inputs += 1
        self.sequences += batch

    def partial(self, name: str, padding_mask=None, *, n_query: Optional[int] = None) -> "_PartialStats":
        """Statistics of one call of layer ``name`` (``n_query`` query rows; by default
        those of its first block), added a block of query rows at a time
        (:meth:`_PartialStats.write`) and merged by :meth:`_PartialStats.commit`: what a
        capture that keeps no matrices feeds, tile by tile (a
        :class:`~attention_hooker.keep.protocol.CallWriter`)."""
        return _PartialStats(self, name, padding_mask, n_query)

    def _check_heads(self, name: str, heads: int) -> None:
        if name in self._sums and heads != len(self._sums[name]["entropy"]):
            raise AttentionHookerError(
                f"layer {name!r} has {heads} heads in this update but {len(self._sums[name]['entropy'])} "
                "before: statistics of different models or head selections cannot be averaged together"
            )

    def _merge(self, name: str, sums: Dict[str, torch.Tensor], count: float) -> None:
        self._check_heads(name, len(sums["entropy"]))
        if name not in self._sums:
            self.layers.append(name)
            self._sums[name] = {k: torch.zeros_like(sums["entropy"]) for k in self.STATISTICS}
            self._counts[name] = 0.0
        for key in self.STATISTICS:
            self._sums[name][key] += sums[key]
        self._counts[name] += count

    def state(self) -> dict:
        """Everything this accumulator holds, as plain data (float64 sums per layer and
        statistic, counts): what other processes need to merge it (:meth:`merge_state`)."""
        return {"statistics": list(self.STATISTICS), "layers": list(self.layers),
                "sums": {name: {k: v.tolist() for k, v in sums.items()} for name, sums in self._sums.items()},
                "counts": dict(self._counts), "inputs": self.inputs, "sequences": self.sequences}

    def merge_state(self, state: dict) -> None:
        """Adds another accumulator's :meth:`state` (another process's share of the inputs):
        sums and counts are added, so the result equals one accumulator over all inputs.

        Raises:
            AttentionHookerError: when the two keep different statistics, or a layer's
                head count differs.
        """
        if list(state["statistics"]) != list(self.STATISTICS):
            raise AttentionHookerError(
                f"cannot merge statistics {state['statistics']} into {list(self.STATISTICS)}: "
                "give every process the same sink_positions")
        for name in state["layers"]:
            sums = {k: torch.tensor(v, dtype=torch.float64) for k, v in state["sums"][name].items()}
            self._merge(name, sums, float(state["counts"][name]))
        self.inputs += state["inputs"]
        self.sequences += state["sequences"]

    def result(self) -> Dict[str, "object"]:
        """``{statistic: (layers, heads) numpy array}`` in the order layers were seen."""
        import numpy as np

        if not self.layers:
            raise AttentionHookerError("no statistics yet: call update() with captured values first")
        out = {}
        for key in self.STATISTICS:
            rows = [(self._sums[name][key] / max(self._counts[name], 1.0)).numpy() for name in self.layers]
            width = max(len(r) for r in rows)
            out[key] = np.stack([np.pad(r, (0, width - len(r)), constant_values=np.nan) for r in rows])
        return out


class _PartialStats:
    """Row sums of the head statistics of one layer call, from blocks of its query rows.

    Every statistic is a mean over real query rows of a per-row quantity, so the
    sums over any split of the rows into blocks add up to the whole call's: tiles
    are exact. Nothing of the attention itself is kept.
    """

    def __init__(self, owner: HeadStatsAccumulator, name: str, padding_mask=None, n_query: Optional[int] = None):
        self._owner, self._name, self._n_query = owner, name, n_query
        self._mask = row_mask(padding_mask)  # (B, T) or None
        self._rows: Optional[CallRowStatistics] = None  # the per-row values of this call, as blocks come
        self.n_key: Optional[int] = None  # the call's keys, when blocks may be narrower (told by the reduction)

    def add(self, block: torch.Tensor, rows: torch.Tensor, n_query: int) -> None:
        """:meth:`write`, telling the call's number of query rows."""
        self._n_query = n_query
        self.write(rows, block)

    takes_narrow_blocks = True  # a causal tile's keys after its last row are zeros: left out
    takes_key_bands = True  # and a sliding window's before its first key
    wants_log_probabilities = True  # the entropy from log(block): a product, not a log per weight

    def write(self, rows: torch.Tensor, block: torch.Tensor, log_block: Optional[torch.Tensor] = None,
              first_key: int = 0) -> None:
        """Adds the query rows ``rows`` (absolute, ``(r,)``) of the call: ``block`` is
        ``(batch, heads, r, width)`` probabilities of the call's keys ``first_key ..``, the others zeros;
        ``log_block``, when given, its log (0 where ``block`` is 0)."""
        if self._n_query is None:
            self._n_query = block.shape[2]
        # Per-row quantities in the block's own dtype (one pass each over the block), kept per
        # row; they are summed in float64 over the real rows once, at commit.
        a = block if block.is_floating_point() and block.dtype not in (torch.float16, torch.bfloat16) else block.float()
        if log_block is not None and log_block.dtype != a.dtype:
            log_block = log_block.to(a.dtype)
        if self._rows is None:
            self._rows = self._begin(a)
        self._rows.add(a, rows, log_block, first_key)

    def _begin(self, a: torch.Tensor) -> CallRowStatistics:
        n_query, n_key = self._n_query, self.n_key if self.n_key is not None else a.shape[3]
        sinks = None
        if self._owner.sink_positions is not None:
            sinks = list(index_list(self._owner.sink_positions, "sink_positions", length=n_key,
                                    where=f"the keys of layer {self._name!r}", allow_negative=True,
                                    noun="key position"))
        mask = self._mask if self._mask is not None and self._mask.shape[-1] == n_query else None
        last = _last_real(mask.to(a.device)) if mask is not None and n_query == n_key else None  # (B,)
        return CallRowStatistics((a.shape[0], a.shape[1], n_query, n_key), a.dtype, a.device, sinks=sinks, last=last)

    def commit(self) -> None:
        """Merges this call into the accumulator (a call refused after its tiles is dropped instead)."""
        if self._rows is None:
            return
        call, self._rows = self._rows, None
        batch = next(iter(call.values.values())).shape[0]
        mask = self._mask if self._mask is not None and self._mask.shape[-1] == self._n_query else None
        real = real_rows(mask, torch.arange(self._n_query), self._n_query, batch, call.written.device)  # (B, L)
        real = real * call.written.to(real.dtype)[None, :]  # rows never written do not count
        sums = {k: (v.double() * real[:, None, :]).sum((0, 2)).cpu()
                for k, v in call.values.items()}  # (H,)
        if "sink_share" in self._owner.STATISTICS and "sink_share" not in sums:
            sums["sink_share"] = torch.zeros_like(sums["entropy"])
        self._owner._merge(self._name, sums, float(real.sum()))

    def discard(self) -> None:
        """Drops this call (its layer call was refused or cut short); safe twice."""
        self._rows = None


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """``(batch,)``: each item's last real position of a ``(batch, tokens)`` mask (-1 when it has none),
    wherever its padding lies (its count minus one only holds for padding on the right)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), positions, -1).amax(-1)
