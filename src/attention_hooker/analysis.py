"""Analyses of captured attention: pure tensor functions.

Shapes: attention is ``(batch, heads, query, key)``; a rollout is
``(batch, tokens, tokens)``; head statistics are ``(batch, heads)``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ._checks import check_flag, check_probabilities, index_list, non_negative_int, one_of
from ._tensor import as_batched
from .errors import AttentionHookerError

__all__ = [
    "attention_rollout",
    "gradient_weighted_rollout",
    "head_entropy",
    "mean_attention_distance",
    "sink_share",
    "HeadStatsAccumulator",
    "stitch_steps",
    "layer_sequence",
]

FUSIONS = ("mean", "max", "min")


def layer_sequence(
    attentions, *, call: int = 0, where: str = "attentions", allow_missing: bool = False
) -> List[Optional[torch.Tensor]]:
    """Per-layer tensors in model order from a list, a ``values`` mapping, or a hooker.

    Args:
        attentions: a sequence of ``(batch, heads, query, key)`` tensors, a mapping
            ``{layer_name: [tensor per call]}`` (``hooker.values``), or an object with
            a ``values`` attribute holding one.
        call: which call of each layer to take from a mapping.
        allow_missing: keep ``None`` entries (gradients backward has not reached).

    Raises:
        AttentionHookerError: when empty, not 4-D, or a layer lacks that call.
    """
    if hasattr(attentions, "values") and isinstance(getattr(attentions, "values"), Mapping):
        attentions = attentions.values
    if isinstance(attentions, Mapping):
        layers = []
        for name, calls in attentions.items():
            if isinstance(calls, torch.Tensor):
                layers.append(calls)
                continue
            if not -len(calls) <= call < len(calls):
                raise AttentionHookerError(f"layer {name!r} has {len(calls)} calls; call={call} is out of range")
            layers.append(calls[call])
        attentions = layers
    attentions = [None if a is None and allow_missing else to_tensor(a, f"{where}[{i}]") for i, a in enumerate(attentions)]
    if not attentions:
        raise AttentionHookerError(f"{where} is empty: expected at least one (batch, heads, query, key) tensor")
    for i, a in enumerate(attentions):
        if a is not None and a.dim() != 4:
            raise AttentionHookerError(
                f"Wrong shape for {where}[{i}]: expected 4 dims (batch, heads, query, key). "
                f"Received {a.dim()}-dim tensor of shape {tuple(a.shape)}."
            )
    return attentions


def to_tensor(a, where: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    try:
        return torch.as_tensor(a)
    except (TypeError, ValueError, RuntimeError):
        raise AttentionHookerError(
            f"{where} is a {type(a).__name__}; expected a (batch, heads, query, key) tensor or array of numbers"
        ) from None


def _fuse_heads(a: torch.Tensor, how: str) -> torch.Tensor:
    """``(B, H, T, T)`` -> ``(B, T, T)``."""
    if how == "mean":
        return a.mean(dim=1)
    if how == "max":
        return a.amax(dim=1)
    return a.amin(dim=1)  # "min": callers check head_fusion against FUSIONS first


def square_stack(attentions, where: str) -> List[torch.Tensor]:
    layers = layer_sequence(attentions, where=where)
    shape = layers[0].shape
    for i, a in enumerate(layers):
        if a.shape[-1] != a.shape[-2]:
            raise AttentionHookerError(
                f"{where}[{i}] is {tuple(a.shape)}: rollout needs square self-attention (query == key); "
                "leave cross-attention layers out"
            )
        if a.shape[0] != shape[0] or a.shape[-1] != shape[-1]:
            raise AttentionHookerError(
                f"{where}[{i}] is {tuple(a.shape)} but {where}[0] is {tuple(shape)}: every layer must share "
                "batch and token count"
            )
    for i, a in enumerate(layers):
        check_probabilities(a, f"{where}[{i}]")
    return layers


def attention_rollout(attentions, *, add_residual: bool = True, head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each token draws on each input token.

    Per layer ``A~ = rownorm(fuse_heads(A) + I)`` (without ``+ I`` when
    ``add_residual=False``), then ``R = A~_L @ ... @ A~_1``.

    Args:
        attentions: per-layer ``(batch, heads, tokens, tokens)`` in model order, or
            ``hooker.values`` (first call of each layer).
        add_residual: add the identity for the residual connection.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.

    Returns:
        ``(batch, tokens, tokens)``; row ``i`` sums to 1.

    Raises:
        AttentionHookerError: on layers that are not square attention
            probabilities of one shape, or, with ``add_residual=False``, a query
            row with no weight (all its keys masked): it cannot be renormalised.

    Example:
        >>> a = torch.softmax(torch.randn(2, 1, 4, 3, 3), -1).unbind(0)
        >>> r = attention_rollout(a)
        >>> r.shape, bool(torch.allclose(r.sum(-1), torch.ones(1, 3)))
        (torch.Size([1, 3, 3]), True)
    """
    one_of(head_fusion, "head_fusion", FUSIONS)
    add_residual = check_flag(add_residual, "add_residual")
    layers = square_stack(attentions, "attentions")
    rollout = None
    for fused in layer_graphs(layers, add_residual, head_fusion):
        rollout = fused if rollout is None else fused @ rollout
    return rollout.to(layers[0].dtype)


def layer_graphs(layers: List[torch.Tensor], add_residual: bool, head_fusion: str) -> List[torch.Tensor]:
    """Each layer's ``rownorm(fuse_heads(A) + I)`` ``(B, T, T)`` float64: the edges of rollout's and
    flow's layered graph (Abnar & Zuidema 2020), token ``i`` of a layer drawing on token ``j`` below."""
    graphs = []
    for i, a in enumerate(layers):
        fused = _fuse_heads(a.double(), head_fusion)  # (B, T, T)
        if add_residual:
            fused = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        else:
            empty = (fused.sum(dim=-1) <= 0).nonzero()
            if len(empty):
                batch, row = (int(v) for v in empty[0])
                raise AttentionHookerError(
                    f"row {row} of attentions[{i}] (batch item {batch}) sums to 0 over every head: a query whose keys "
                    "are all masked cannot be renormalised with add_residual=False; keep add_residual=True, or "
                    "leave such queries out"
                )
        graphs.append(fused / fused.sum(dim=-1, keepdim=True))
    return graphs


def gradient_weighted_rollout(attentions, gradients) -> torch.Tensor:
    """Gradient-weighted relevance (Chefer, Gur & Wolf 2021, "Generic attention-model explainability").

    ``R = I``; for each layer in model order ``R <- R + mean_heads(relu(grad(A) * A)) @ R``.

    Args:
        attentions: per-layer ``(batch, heads, tokens, tokens)``, or ``hooker.values``.
        gradients: d(score)/d(A) of the same shapes, or ``hooker.gradients`` from a
            hooker made with ``keep_grad=True`` after ``score.backward()``.

    Returns:
        ``(batch, tokens, tokens)`` relevance; row ``i`` says which tokens made token ``i``'s output.

    Example:
        >>> a = [torch.softmax(torch.randn(1, 2, 3, 3), -1)]
        >>> gradient_weighted_rollout(a, [torch.ones(1, 2, 3, 3)]).shape
        torch.Size([1, 3, 3])
    """
    layers = square_stack(attentions, "attentions")
    grads = layer_sequence(gradients, where="gradients", allow_missing=True)
    if len(grads) != len(layers):
        raise AttentionHookerError(f"{len(layers)} attention layers but {len(grads)} gradient layers")
    relevance = None
    for i, (a, g) in enumerate(zip(layers, grads)):
        if g is None or g.shape != a.shape:
            raise AttentionHookerError(
                f"gradients[{i}] is {None if g is None else tuple(g.shape)}, expected {tuple(a.shape)}: "
                "capture with keep_grad=True and call backward() on the score first"
            )
        cam = (g.double() * a.double()).clamp(min=0).mean(dim=1)  # (B, T, T)
        if relevance is None:
            relevance = torch.eye(cam.shape[-1], dtype=cam.dtype, device=cam.device).expand_as(cam).clone()
        relevance = relevance + cam @ relevance
    return relevance.to(layers[0].dtype)


def query_mask_of(attn: torch.Tensor, padding_mask) -> Optional[torch.Tensor]:
    """``(B, Q)`` bool of real query positions, from an HF-style ``(B, T)`` mask (1 = real)."""
    if padding_mask is None:
        return None
    raw = to_tensor(padding_mask, "padding_mask").to(attn.device)
    if raw.dtype != torch.bool and not ((raw == 0) | (raw == 1)).all():
        raise AttentionHookerError("padding_mask must hold 0/1 or True/False (1 for real tokens, 0 for padding)")
    mask = raw.bool()
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != (attn.shape[0], attn.shape[2]):
        raise AttentionHookerError(
            f"padding_mask is {tuple(mask.shape)}, expected (batch, query) = {(attn.shape[0], attn.shape[2])}"
        )
    return mask


def mean_over_queries(per_query: torch.Tensor, query_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, H, Q)`` -> ``(B, H)``, over real queries only."""
    if query_mask is None:
        return per_query.mean(dim=-1)
    m = query_mask[:, None, :].to(per_query.dtype)  # (B, 1, Q)
    return (per_query * m).sum(-1) / m.sum(-1).clamp(min=1)


def row_mask(padding_mask) -> Optional[torch.Tensor]:
    """An HF-style padding mask as ``(batch, tokens)`` bool (True for real tokens), or ``None``."""
    if padding_mask is None:
        return None
    mask = to_tensor(padding_mask, "padding_mask").bool()
    return mask.unsqueeze(0) if mask.dim() == 1 else mask


def real_rows(mask: Optional[torch.Tensor], rows: torch.Tensor, n_query: int, batch: int, device) -> torch.Tensor:
    """``(batch, r)`` float64, 1 for the real ones among query rows ``rows`` of a call with
    ``n_query`` rows: ``mask`` applies where it has one entry per query row, else all count."""
    if mask is None or mask.shape[-1] != n_query:
        return torch.ones(batch, len(rows), dtype=torch.float64, device=device)
    return mask.to(device)[:, rows.to(device)].double()


def check_attention(attn, where: str) -> torch.Tensor:
    """``(batch, heads, query, key)`` probabilities as float64, or the library's error."""
    a = as_batched(to_tensor(attn, where), where)
    check_probabilities(a, where)
    return a.double()


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
            partial = self.partial(name, padding_mask)
            partial.add(a, torch.arange(a.shape[2]), a.shape[2])
            partial.commit()
        self.sequences += max(batch_sizes, default=0)

    def add_input(self, batch: int) -> None:
        """Counts one forward of ``batch`` sequences whose calls came through
        :meth:`partial` (``hooker.reduce_into``) rather than :meth:`update`."""
        self.inputs += 1
        self.sequences += batch

    def partial(self, name: str, padding_mask=None) -> "_PartialStats":
        """Statistics of one call of layer ``name`` added a block of query rows at a
        time (:meth:`_PartialStats.add`), and merged by :meth:`_PartialStats.commit`:
        what a capture that keeps no matrices feeds, tile by tile."""
        return _PartialStats(self, name, padding_mask)

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

    def __init__(self, owner: HeadStatsAccumulator, name: str, padding_mask=None):
        self._owner, self._name = owner, name
        self._mask = row_mask(padding_mask)  # (B, T) or None
        self._sums: Optional[Dict[str, torch.Tensor]] = None
        self._count = 0.0
        self._sinks: Optional[list] = None  # the sink key positions, resolved against this call's keys once

    def add(self, block: torch.Tensor, rows: torch.Tensor, n_query: int) -> None:
        """Adds the query rows ``rows`` (absolute, ``(r,)``) of a call with ``n_query``
        query rows: ``block`` is ``(batch, heads, r, key)`` probabilities."""
        # Per-row quantities in the block's own dtype (one fused pass each over the block);
        # only the (batch, heads, rows) results are summed in float64.
        a = block if block.is_floating_point() and block.dtype not in (torch.float16, torch.bfloat16) else block.float()
        batch, heads, _, n_key = a.shape
        rows = rows.to(a.device)
        mask = self._mask if self._mask is not None and self._mask.shape[-1] == n_query else None
        real = real_rows(mask, rows, n_query, batch, a.device)  # (B, r)
        per_row = {"entropy": torch.special.entr(a).sum(-1), "first_token_share": a[..., 0]}  # each (B, H, r)
        if n_query == n_key:
            keys = torch.arange(n_key, device=a.device, dtype=a.dtype)
            distance = (rows.to(a.dtype)[:, None] - keys[None, :]).abs()  # (r, K)
            per_row["distance"] = torch.einsum("bhrk,rk->bhr", a, distance)
        else:
            per_row["distance"] = torch.full(a.shape[:3], math.nan, dtype=a.dtype, device=a.device)
        if self._owner.sink_positions is not None:
            if self._sinks is None:
                self._sinks = list(index_list(self._owner.sink_positions, "sink_positions", length=n_key,
                                              where=f"the keys of layer {self._name!r}", allow_negative=True,
                                              noun="key position"))
            per_row["sink_share"] = a[..., self._sinks].sum(-1)
        if mask is not None and n_query == n_key:
            last = mask.to(a.device).sum(-1) - 1  # (B,) each row's last real token
            per_row["last_token_share"] = a.gather(-1, last[:, None, None, None].expand(batch, heads, len(rows), 1))[..., 0]
        else:
            per_row["last_token_share"] = a[..., -1]
        weights = real[:, None, :]  # (B, 1, r)
        sums = {k: (v.double() * weights).sum((0, 2)).cpu() for k, v in per_row.items()}  # (H,)
        if self._sums is None:
            self._sums = sums
        else:
            for k in sums:
                self._sums[k] += sums[k]
        self._count += float(real.sum())

    def commit(self) -> None:
        """Merges this call into the accumulator (a call refused after its tiles is dropped instead)."""
        if self._sums is not None:
            self._owner._merge(self._name, self._sums, self._count)
            self._sums = None


def stitch_steps(calls: Sequence[torch.Tensor]) -> torch.Tensor:
    """One causal matrix from the per-step captures of a KV-cache generation loop.

    Call ``i`` is ``(batch, heads, q_i, k_i)``: the first is the prompt
    (``q_0 == k_0``), each later one adds ``q_i`` new queries over a context
    grown by ``q_i`` (``k_i == k_{i-1} + q_i``; ``q_i = 1`` for one token a step).

    Args:
        calls: one layer's calls in order (``hooker.values[layer]``).

    Returns:
        ``(batch, heads, T, T)`` with ``T = k_last``: the prompt block, then one
        row per generated position; zeros above the diagonal.

    Raises:
        AttentionHookerError: when the calls are not such a sequence.

    Example:
        >>> steps = [torch.ones(1, 1, 2, 2) / 2, torch.ones(1, 1, 1, 3) / 3]
        >>> stitch_steps(steps).shape
        torch.Size([1, 1, 3, 3])
    """
    calls = layer_sequence(list(calls), where="calls")
    first = calls[0]
    batch, heads, q0, k0 = first.shape
    if q0 != k0:
        raise AttentionHookerError(
            f"calls[0] is {tuple(first.shape)}: a generation sequence starts with the prompt, square (query == key)"
        )
    total = k0
    for i, c in enumerate(calls[1:], start=1):
        b, h, q, k = c.shape
        if (b, h) != (batch, heads):
            raise AttentionHookerError(f"calls[{i}] is {tuple(c.shape)}, but calls[0] has batch {batch} and {heads} heads")
        if k != total + q:
            raise AttentionHookerError(
                f"calls[{i}] is {tuple(c.shape)}: after {total} positions a step of {q} new queries must see "
                f"{total + q} keys, not {k}; these calls are not consecutive KV-cache generation steps"
            )
        total = k
    out = first.new_zeros(batch, heads, total, total)  # (B, H, T, T)
    out[..., :q0, :k0] = first
    for c in calls[1:]:
        q, k = c.shape[-2:]
        out[..., k - q : k, :k] = c
    return out
