"""Two captures of the same tokens, compared head by head: the difference ``A - B`` of every
layer's ``(batch, heads, query, key)`` weights, and the Jensen-Shannon distance of each head.

The distance of a head is the mean, over its query rows, of the Jensen-Shannon distance between
the row in A and the row in B (base 2: 0 for the same attention, 1 for attention on disjoint
keys). A row that sums to less than 1 (every key masked: 0; a learned sink took the rest) has
the rest as one more outcome, "no key", so that such rows compare too; rows with no weight in
either capture, and padded queries (``padding_mask``), are left out of the mean, as the head
statistics leave padded queries out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .._checks import check_probabilities, is_int, one_of
from .._tensor import as_batched, on_one_device, values_of
from ..errors import AttentionHookerError
from .core import row_mask

__all__ = ["compare", "AttentionComparison", "LayerComparison", "HeadDistance", "js_distance_rows"]

PAIRINGS = ("auto", "name", "order")
_SHOWN_NAMES = 4  # layer names an error lists before "..."


class HeadDistance(NamedTuple):
    """One head's Jensen-Shannon distance between the two captures (mean over its query rows and
    the batch items)."""

    layer: str
    head: int
    distance: float


@dataclass(frozen=True)
class LayerComparison:
    """One pair of layers compared.

    Attributes:
        name: the layer's name in A (the comparison's key).
        name_b: its name in B (the same, unless the layers were paired by order).
        a: A's call, ``(batch, heads, query, key)``.
        b: B's call, ``(batch, heads, query, key)``.
        distance: ``(batch, heads)`` float64 Jensen-Shannon distance (base 2, in ``[0, 1]``) of
            each head: the mean over its counted query rows; NaN where no row counted.
        row_distance: ``(batch, heads, query)`` float64, the distance of each query row; NaN for
            a row left out (a padded query, or no weight in either capture).
    """

    name: str
    name_b: str
    a: torch.Tensor
    b: torch.Tensor
    distance: torch.Tensor
    row_distance: torch.Tensor

    @property
    def difference(self) -> torch.Tensor:
        """``A - B``, ``(batch, heads, query, key)``, in float32 (float64 when either is), computed
        on each access (it is not kept)."""
        dtype = torch.promote_types(torch.promote_types(self.a.dtype, self.b.dtype), torch.float32)
        return self.a.to(dtype) - self.b.to(self.a.device, dtype)  # (B, H, Q, K)

    @property
    def head_distance(self) -> torch.Tensor:
        """``(heads,)`` float64: each head's distance, averaged over the batch items (NaN ones left out)."""
        return _nanmean(self.distance, dim=0)

    @property
    def mean(self) -> float:
        """The layer's distance: the mean of its heads' (NaN when no head has one)."""
        return float(_nanmean(self.head_distance, dim=0))

    @property
    def most_different_head(self) -> Optional[int]:
        """The head of the largest distance (``None`` when no head has one)."""
        heads = self.head_distance
        if torch.isnan(heads).all():
            return None
        return int(torch.nan_to_num(heads, nan=-1.0).argmax())

    def __repr__(self) -> str:
        shape = tuple(self.a.shape)
        return f"LayerComparison({self.name!r}, {shape}, mean JS distance {self.mean:.3f})"


class AttentionComparison(MappingABC):
    """``{layer name: LayerComparison}`` of two captures of the same tokens, in A's layer order.

    Attributes:
        names: the two captures' labels (``("A", "B")`` unless given), for pictures and pages.
        pairing: ``"name"`` (layers paired by their names) or ``"order"`` (by position: the
            two models name their modules differently); ``pairs`` lists them.
        pairs: ``[(name in A, name in B)]``.
        tokens: the tokens both captures are of, where known (else ``None``).
        call: which call of each layer was compared.
    """

    def __init__(self, layers: Sequence[LayerComparison], *, names: Tuple[str, str], pairing: str,
                 tokens: Optional[list], call: int):
        self._layers: Dict[str, LayerComparison] = {layer.name: layer for layer in layers}
        self.names = names
        self.pairing = pairing
        self.pairs = [(layer.name, layer.name_b) for layer in layers]
        self.tokens = tokens
        self.call = call

    def __getitem__(self, name: str) -> LayerComparison:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"no layer {name!r} in this comparison; its layers: {list(self._layers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def layer_distances(self) -> Dict[str, float]:
        """``{layer: mean Jensen-Shannon distance of its heads}`` (the per-layer summary)."""
        return {name: layer.mean for name, layer in self._layers.items()}

    def table(self) -> torch.Tensor:
        """``(layers, heads)`` float64: each head's distance (batch-averaged) in layer order; NaN
        past a layer's last head where layers have different head counts."""
        width = max(layer.a.shape[1] for layer in self._layers.values())
        rows = [torch.nn.functional.pad(layer.head_distance, (0, width - layer.a.shape[1]), value=math.nan)
                for layer in self._layers.values()]
        return torch.stack(on_one_device(rows)).cpu()  # a small table, read on the host

    def ranked_heads(self, top: Optional[int] = None) -> List[HeadDistance]:
        """Every head, most different first (heads without a distance last).

        Args:
            top: keep only the first ``top``.

        Example:
            >>> a = {"l": [torch.tensor([[[[1.0, 0.0]], [[0.5, 0.5]]]])]}  # (1, 2, 1, 2)
            >>> b = {"l": [torch.tensor([[[[0.0, 1.0]], [[0.5, 0.5]]]])]}
            >>> [(h.head, round(h.distance, 3)) for h in compare(a, b).ranked_heads()]
            [(0, 1.0), (1, 0.0)]
        """
        if top is not None and (not is_int(top) or top < 1):
            raise AttentionHookerError(f"top={top!r} must be a positive int (how many heads) or None")
        heads = [HeadDistance(name, head, float(d)) for name, layer in self._layers.items()
                 for head, d in enumerate(layer.head_distance.tolist())]
        heads.sort(key=lambda h: (math.isnan(h.distance), -h.distance if not math.isnan(h.distance) else 0.0))
        return heads if top is None else heads[:top]

    def __repr__(self) -> str:
        heads = sum(layer.a.shape[1] for layer in self._layers.values())
        best = self.ranked_heads(1)
        most = (f"; most different: {best[0].layer} head {best[0].head}, JS {best[0].distance:.3f}"
                if best and not math.isnan(best[0].distance) else "")
        return (f"AttentionComparison({self.names[0]} vs {self.names[1]}: {len(self)} layers paired by "
                f"{self.pairing}, {heads} heads{most})")


def compare(
    a,
    b,
    *,
    call: int = 0,
    pair_by: str = "auto",
    padding_mask=None,
    tokens_a: Optional[Sequence] = None,
    tokens_b: Optional[Sequence] = None,
    names: Tuple[str, str] = ("A", "B"),
) -> AttentionComparison:
    """Compares two captures of the same tokens (two checkpoints, base and fine-tuned, two models).

    Each layer of A is paired with one of B: by name when both have the same layer names; by
    position when no name is shared and both have as many layers (two models that name their
    modules differently; ``pairing`` and ``pairs`` say so); ``pair_by="order"`` pairs by
    position always. Paired calls must have the same shape ``(batch, heads, query, key)``.

    Args:
        a: capture A: a hooker's ``values`` (:class:`~attention_hooker.values.AttentionValues`), a
            hooker, a loaded capture (:class:`~attention_hooker.io.saved.SavedAttention`), or
            ``{layer name: tensor (batch, heads, query, key)}`` (or a list of such tensors, one
            per call) with attention probabilities.
        b: capture B, as ``a``.
        call: which call of each layer to compare (a layer called several times has several).
        pair_by: ``"auto"``, ``"name"`` or ``"order"``.
        padding_mask: ``(batch, query)`` HF-style, 1/True for real tokens: padded queries are left
            out of the mean (applied to layers with as many query rows as the mask has tokens).
        tokens_a: A's tokens; default a loaded capture's own. When both are known they must be the same.
        tokens_b: B's tokens, as ``tokens_a``.
        names: labels of the two captures, for the pictures and the page.

    Returns:
        An :class:`AttentionComparison`: ``comparison[layer].difference`` is ``A - B``,
        ``comparison[layer].distance`` the ``(batch, heads)`` Jensen-Shannon distances (base 2),
        ``comparison.ranked_heads()`` the heads most different first.

    Raises:
        AttentionHookerError: when the layers cannot be paired (names only in one of them,
            another number of layers), a paired layer has another shape or head count, the
            tokens differ, a call is missing, or a call is not attention probabilities.

    Example:
        >>> w = torch.rand(1, 2, 3, 3).softmax(-1)
        >>> c = compare({"layer": [w]}, {"layer": [w.flip(-1)]})
        >>> c["layer"].distance.shape, c["layer"].difference.shape
        (torch.Size([1, 2]), torch.Size([1, 2, 3, 3]))
        >>> compare({"layer": [w]}, {"layer": [w]})["layer"].distance.abs().max().item()
        0.0
    """
    pair_by = one_of(pair_by, "pair_by", PAIRINGS)
    if isinstance(call, bool) or not is_int(call):
        raise AttentionHookerError(f"call={call!r} must be an int (which call of each layer)")
    call = int(call)
    names = _checked_names(names)
    values_a, values_b = _values(a, "A"), _values(b, "B")
    tokens = _same_tokens(tokens_a if tokens_a is not None else getattr(a, "tokens", None),
                          tokens_b if tokens_b is not None else getattr(b, "tokens", None), names)
    pairs, pairing = _pairs(list(values_a), list(values_b), pair_by, names)
    mask = row_mask(padding_mask)
    layers = []
    for name_a, name_b in pairs:
        wa = _call(values_a[name_a], call, f"layer {name_a!r} of {names[0]}")
        wb = _call(values_b[name_b], call, f"layer {name_b!r} of {names[1]}")
        _same_shape(wa, wb, name_a, name_b, names)
        rows = js_distance_rows(wa, wb)  # (B, H, Q)
        counted = ~torch.isnan(rows)
        if mask is not None and mask.shape[-1] == rows.shape[-1]:
            if mask.shape[0] != rows.shape[0]:
                raise AttentionHookerError(f"padding_mask is {tuple(mask.shape)}, but layer {name_a!r} has batch "
                                           f"{rows.shape[0]}; expected (batch, query) = {tuple(rows.shape[::2])}")
            counted &= mask.to(rows.device)[:, None, :]
            rows = rows.masked_fill(~counted, math.nan)
        distance = _nanmean(rows, dim=-1)  # (B, H)
        layers.append(LayerComparison(name_a, name_b, wa.detach(), wb.detach(), distance, rows))
    return AttentionComparison(layers, names=names, pairing=pairing, tokens=tokens, call=call)


def js_distance_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Jensen-Shannon distance (base 2) of each query row of two ``(batch, heads, query, key)``
    calls: ``(batch, heads, query)`` float64 in ``[0, 1]``; NaN for a row with no weight in either.

    A row summing to ``s < 1`` has ``1 - s`` on one more outcome ("no key"); one summing to more
    (rounding of half precision) is scaled to 1. Computed head by head, in float64.

    Example:
        >>> js_distance_rows(torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.5, 0.5]]]])).item()  # doctest: +ELLIPSIS
        0.5579...
    """
    out = torch.empty(a.shape[:3], dtype=torch.float64, device=a.device)  # (B, H, Q)
    for head in range(a.shape[1]):
        p, rest_p = _distribution(a[:, head])  # (B, Q, K), (B, Q)
        q, rest_q = _distribution(b[:, head].to(a.device))
        divergence = _js_divergence(p, q) + _js_divergence(rest_p[..., None], rest_q[..., None])  # (B, Q), bits
        d = divergence.clamp_(0.0, 1.0).sqrt_()
        empty = (a[:, head] == 0).all(-1) & (b[:, head].to(a.device) == 0).all(-1)
        out[:, head] = d.masked_fill_(empty, math.nan)
    return out


def _distribution(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(..., K)`` weights -> float64 ``(rows, what they leave over)``: the rows scaled down where they
    sum past 1, and ``1 - sum`` (the "no key" outcome)."""
    w = w.detach().double().clamp(min=0)
    total = w.sum(-1, keepdim=True)
    if bool((total > 1).any()):
        w = w / total.clamp(min=1.0)
        total = w.sum(-1, keepdim=True)
    return w, (1 - total[..., 0]).clamp_(min=0)


def _js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(KL(p || m) + KL(q || m)) / 2`` in bits over the last axis, ``m = (p + q) / 2``, summed as
    ``p log(p / m)`` (as scipy's ``rel_entr``: accurate for rows that nearly agree; ``0 log 0 = 0``)."""
    m = (p + q).mul_(0.5).clamp_(min=1e-300)  # only where p = q = 0 does the clamp act: those terms are 0
    kl = torch.special.xlogy(p, p / m).sum(-1) + torch.special.xlogy(q, q / m).sum(-1)
    return kl.mul_(0.5 / math.log(2))


def _nanmean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean over ``dim`` of the numbers that are not NaN; NaN where there are none (without
    torch.nanmean's warning-free but version-dependent behaviour on all-NaN slices)."""
    counted = ~torch.isnan(x)
    total = torch.where(counted, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim)
    n = counted.sum(dim)
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, math.nan))


def _checked_names(names) -> Tuple[str, str]:
    if (not isinstance(names, (tuple, list)) or len(names) != 2 or not all(isinstance(n, str) and n for n in names)
            or names[0] == names[1]):
        raise AttentionHookerError(f"names={names!r} must be two different non-empty strings, the labels of A and B")
    return tuple(names)


def _values(source, which: str) -> Dict[str, object]:
    """``{layer: calls}`` of one side; a mapping's tensor value is one call."""
    try:
        return values_of(source)
    except AttentionHookerError as err:
        raise AttentionHookerError(f"capture {which}: {err}") from None


def _call(calls, call: int, where: str) -> torch.Tensor:
    """Call ``call`` of a layer (a tensor is its only call), ``(batch, heads, query, key)``, checked."""
    if isinstance(calls, torch.Tensor):
        calls = [calls]
    if not -len(calls) <= call < len(calls):
        raise AttentionHookerError(f"{where} has {len(calls)} call(s); call={call} is out of range")
    weights = calls[call]
    weights = as_batched(weights if isinstance(weights, torch.Tensor) else torch.as_tensor(weights), where)
    check_probabilities(weights, where)
    return weights


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN_NAMES])
    return shown + (f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else "")


def _pairs(names_a: List[str], names_b: List[str], pair_by: str, labels) -> Tuple[List[Tuple[str, str]], str]:
    """``([(name in A, name in B)], "name" | "order")``, or the library's error saying why not."""
    A, B = labels
    shared = set(names_a) & set(names_b)
    if pair_by == "name" or (pair_by == "auto" and shared):
        only_a = [n for n in names_a if n not in set(names_b)]
        only_b = [n for n in names_b if n not in set(names_a)]
        if only_a or only_b:
            parts = [f"only in {A}: {_listed(only_a)}" if only_a else "",
                     f"only in {B}: {_listed(only_b)}" if only_b else ""]
            raise AttentionHookerError(
                f"the two captures hold different layers ({'; '.join(p for p in parts if p)}); compare captures of "
                "the same layers (the same layer_regex), or pass pair_by='order' to pair them by position")
        return [(n, n) for n in names_a], "name"
    if len(names_a) != len(names_b):
        raise AttentionHookerError(
            f"{A} has {len(names_a)} layers and {B} has {len(names_b)}, with no name in common: layers are paired "
            "by position only when both have as many")
    return list(zip(names_a, names_b)), "order"


def _same_shape(wa: torch.Tensor, wb: torch.Tensor, name_a: str, name_b: str, labels) -> None:
    A, B = labels
    layer = repr(name_a) if name_a == name_b else f"{name_a!r} ({A}) / {name_b!r} ({B})"
    if wa.shape[1] != wb.shape[1]:
        raise AttentionHookerError(
            f"layer {layer} has {wa.shape[1]} heads in {A} and {wb.shape[1]} in {B}: heads are compared one to one, "
            "so a layer must have as many heads in both")
    if wa.shape != wb.shape:
        axes = [axis for axis, x, y in zip(("batch", "heads", "query", "key"), wa.shape, wb.shape) if x != y]
        raise AttentionHookerError(
            f"layer {layer} is {tuple(wa.shape)} in {A} and {tuple(wb.shape)} in {B} (batch, heads, query, key): "
            f"its {' and '.join(axes)} differ; compare captures of the same tokens")


def _same_tokens(tokens_a, tokens_b, labels) -> Optional[list]:
    """The tokens both are of (A's where both are known, else the known ones), or the error naming
    the first difference."""
    A, B = labels
    if tokens_a is None or tokens_b is None:
        return _as_list(tokens_a if tokens_a is not None else tokens_b)
    la, lb = _as_list(tokens_a), _as_list(tokens_b)
    if la == lb:
        return la
    flat_a, flat_b = _flat(la), _flat(lb)
    if len(flat_a) != len(flat_b):
        raise AttentionHookerError(f"the two captures are not of the same tokens: {A} has {len(flat_a)} tokens and "
                                   f"{B} has {len(flat_b)}")
    i = next((i for i, (x, y) in enumerate(zip(flat_a, flat_b)) if x != y), None)
    if i is None:  # the same tokens, listed otherwise (one list against one list per batch item)
        raise AttentionHookerError(f"the two captures' tokens are listed differently: {A}'s are "
                                   f"{_shape_of(la)} and {B}'s {_shape_of(lb)}; give both as one list, or both as "
                                   "one list per batch item")
    raise AttentionHookerError(f"the two captures are not of the same tokens: token {i} is {flat_a[i]!r} in {A} and "
                               f"{flat_b[i]!r} in {B}")


def _shape_of(tokens: list) -> str:
    """``"one list of 5"`` or ``"2 lists of 5"``."""
    if tokens and all(isinstance(t, list) for t in tokens):
        return f"{len(tokens)} list(s) of {'/'.join(sorted({str(len(t)) for t in tokens}))}"
    return f"one list of {len(tokens)}"


def _as_list(tokens) -> Optional[list]:
    if tokens is None:
        return None
    return [_as_list(t) if isinstance(t, (list, tuple)) else t for t in tokens]


def _flat(tokens: list) -> list:
    return [x for t in tokens for x in (_flat(t) if isinstance(t, list) else [t])]
