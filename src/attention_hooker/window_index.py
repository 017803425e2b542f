"""Where a windowed attention call's windows lie in the image: the index kept beside a per-window call.

A windowed layer (Swin, MaxViT, Twins) computes its attention as ``(batch * windows,
heads, N, N)``: one ``N x N`` map per window, batch-major (row ``b * windows + w``), in which
slot ``n`` of window ``w`` holds token ``table[w, n]`` of the layer's ``height x width`` grid
(token ``t = y * width + x``), or ``-1`` for a padded slot the layer added for windowing.
With ``windows="keep"`` a capture stores such calls as the model computed them and this
index beside each; :meth:`WindowIndex.dense` places one at its tokens on demand, giving
exactly the ``(batch, heads, tokens, tokens)`` map the default (``windows="dense"``) stores.

This module is below every other layer of the package (captures, keepers, analyses, views
and saved captures all read the index), and owns the placement itself.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .errors import AttentionHookerError
from .values import AttentionValues

__all__ = ["WindowIndex", "place_windows", "dense_values", "checked_window_map"]


class WindowIndex:
    """The window-to-position index of one windowed attention call.

    Attributes:
        table: ``(windows, N)`` long: the token ``y * width + x`` in slot ``n`` of window ``w``,
            ``-1`` for padding; each real token is in one slot of one window.
        batch: images in the call.
        height, width: the layer's real token grid.

    The constructor checks all of this (an index that put two slots on one token would make
    :meth:`dense` overwrite one weight with another). Two indices are equal when their sizes
    and tables are.

    Raises:
        AttentionHookerError: on sizes that are not positive integers, or a table that does not
            hold each of the ``height * width`` tokens exactly once (and ``-1`` for padding).

    Example:
        >>> index = WindowIndex(torch.tensor([[0, 1, 2, 3]]), batch=1, height=2, width=2)
        >>> index.dense(torch.softmax(torch.randn(1, 3, 4, 4), -1)).shape
        torch.Size([1, 3, 4, 4])
    """

    __slots__ = ("table", "batch", "height", "width")

    def __init__(self, table: torch.Tensor, batch: int, height: int, width: int, *, where: str = "the window index"):
        sizes = [batch, height, width]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            raise AttentionHookerError(f"{where}: batch, height and width {sizes} are not positive integers")
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or 0 in table.shape or \
                table.dtype.is_floating_point or table.dtype.is_complex or table.dtype == torch.bool:
            got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise AttentionHookerError(f"{where}: its table is {got}, not a (windows, N) tensor of integers")
        table = table.to(torch.long)
        real = table[table >= 0].cpu()
        if bool((table < -1).any()) or len(real) != height * width or \
                not torch.equal(real.sort().values, torch.arange(height * width)):
            raise AttentionHookerError(f"{where}: its table does not hold each of the {height * width} tokens exactly "
                                       "once (and -1 for padding)")
        for name, value in zip(self.__slots__, (table, batch, height, width)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("a WindowIndex is read-only")

    def __eq__(self, other) -> bool:
        if not isinstance(other, WindowIndex):
            return NotImplemented
        return (self.batch, self.height, self.width) == (other.batch, other.height, other.width) and \
            self.table.shape == other.table.shape and torch.equal(self.table.cpu(), other.table.cpu())

    def __reduce__(self):  # pickled and copied through the checking constructor (its attributes are read-only)
        return WindowIndex, (self.table, self.batch, self.height, self.width)

    def __hash__(self) -> int:
        return hash((self.batch, self.height, self.width, tuple(self.table.shape)))

    def __repr__(self) -> str:
        return (f"WindowIndex({self.batch} images of {self.height}x{self.width} tokens in {self.windows} windows of "
                f"{self.slots} slots)")

    @property
    def windows(self) -> int:
        """Windows per image."""
        return self.table.shape[0]

    @property
    def slots(self) -> int:
        """``N``: slots per window."""
        return self.table.shape[1]

    @property
    def tokens(self) -> int:
        """``height * width``: the tokens of the layer's grid."""
        return self.height * self.width

    def check(self, per_window: torch.Tensor, where: str = "the call") -> None:
        """Raises unless ``per_window`` is ``(batch * windows, heads, N, N)`` of this index.

        Raises:
            AttentionHookerError: naming the shape expected and the one given.
        """
        rows, n = self.batch * self.windows, self.slots
        if not isinstance(per_window, torch.Tensor) or per_window.dim() != 4 or \
                (per_window.shape[0], per_window.shape[2], per_window.shape[3]) != (rows, n, n):
            got = tuple(per_window.shape) if isinstance(per_window, torch.Tensor) else type(per_window).__name__
            raise AttentionHookerError(
                f"{where} is {got}, while its window index ({self.batch} images of {self.height}x{self.width} tokens "
                f"in {self.windows} windows of {n} slots) gives ({rows}, heads, {n}, {n})")

    def dense(self, per_window: torch.Tensor, *, heads: Optional[Sequence[int]] = None,
              rows: Optional[Sequence[int]] = None, keys: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The call placed at its tokens: ``(batch, heads, tokens, tokens)`` (see :func:`place_windows`).

        Raises:
            AttentionHookerError: when ``per_window`` is not a call of this index.
        """
        self.check(per_window)
        return place_windows(per_window, self.table, self.batch, self.tokens, heads, rows, keys)

    def describe(self) -> dict:
        """The index as JSON-ready data (saved beside the call): ``{"batch", "height", "width", "table"}``."""
        return {"batch": self.batch, "height": self.height, "width": self.width, "table": self.table.tolist()}

    @classmethod
    def from_description(cls, data, where: str = "the window index") -> "WindowIndex":
        """The index :meth:`describe` gave, checked (a saved file is not trusted).

        Raises:
            AttentionHookerError: when ``data`` is not such an index.
        """
        if not isinstance(data, dict) or set(data) != {"batch", "height", "width", "table"}:
            raise AttentionHookerError(f"{where} is damaged: expected {{batch, height, width, table}}, got {data!r:.200}")
        sizes = [data[k] for k in ("batch", "height", "width")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            raise AttentionHookerError(f"{where} is damaged: batch, height and width {sizes} are not positive integers")
        table = data["table"]
        if not (isinstance(table, list) and table and all(isinstance(r, list) and r and len(r) == len(table[0])
                                                           for r in table)
                and all(isinstance(v, int) and not isinstance(v, bool) for r in table for v in r)):
            raise AttentionHookerError(f"{where} is damaged: its table is not a (windows, N) list of integers")
        batch, height, width = sizes
        return cls(torch.tensor(table, dtype=torch.long), batch, height, width, where=f"{where} is damaged")


def place_windows(per_window: torch.Tensor, table: torch.Tensor, batch: int, tokens: int,
                  heads: Optional[Sequence[int]] = None, rows: Optional[Sequence[int]] = None,
                  keys: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Places a windowed call's maps at their tokens.

    Args:
        per_window: ``(batch * windows, heads, N, N)``, batch-major.
        table: ``(windows, N)``: the token of each slot, ``-1`` for padding.
        batch: images in the call.
        tokens: the layer's tokens (``height * width``).
        heads, rows, keys: only these heads, query tokens and key tokens (distinct absolute
            indices), placed straight into a map of that size: a row of a large image costs
            a row, not the whole map first.

    Returns:
        ``(batch, heads, tokens, tokens)`` (or the selected heads, rows and keys): each window's
        weights at its tokens' positions, exact zeros between tokens of different windows,
        padded slots left out (their weight is missing from the rows it was in). Differentiable
        with respect to ``per_window``.

    Example:
        >>> p = torch.softmax(torch.randn(2, 1, 2, 2), -1)  # 1 image, 2 windows of 2 slots
        >>> dense = place_windows(p, torch.tensor([[0, 2], [1, -1]]), 1, 3)
        >>> dense[0, 0, 1].tolist() == [0.0, p[1, 0, 0, 0].item(), 0.0]
        True
    """
    nw, n = table.shape
    if heads is not None:
        per_window = per_window.index_select(1, torch.as_tensor(list(heads), device=per_window.device))
    pos = table.to(per_window.device)  # (nW, N), -1 for padding
    row_of, key_of = _slots(rows, tokens, pos.device), _slots(keys, tokens, pos.device)
    queries = row_of[pos][:, :, None].expand(nw, n, n)  # (nW, N, N): where each weight's query goes, or -1
    columns = key_of[pos][:, None, :].expand(nw, n, n)
    kept = (queries >= 0) & (columns >= 0)  # a real (and selected) query over a real (and selected) key
    windows = per_window.reshape(batch, nw, per_window.shape[1], n, n).permute(0, 2, 1, 3, 4)  # (B, h, nW, N, N)
    dense = per_window.new_zeros(batch, per_window.shape[1], tokens if rows is None else len(rows),
                                 tokens if keys is None else len(keys))  # compact: no padded row or column
    dense[:, :, queries[kept], columns[kept]] = windows[:, :, kept]
    return dense  # (B, h, rows, keys)


def _slots(chosen: Optional[Sequence[int]], tokens: int, device) -> torch.Tensor:
    """``(tokens + 1,)``: each token's place in the selection (or itself, for all), -1 for a token
    not chosen; entry ``-1`` (a padded slot's index) maps to -1."""
    where = torch.full((tokens + 1,), -1, dtype=torch.long, device=device)
    if chosen is None:
        where[:tokens] = torch.arange(tokens, device=device)
    else:
        where[torch.as_tensor(list(chosen), dtype=torch.long, device=device)] = torch.arange(len(chosen), device=device)
    return where


def checked_window_map(window_index, where: str = "window_index=") -> Dict[str, List[Optional[WindowIndex]]]:
    """``window_index`` checked to be ``{layer: [WindowIndex or None per call]}`` (``hooker.window_index``).

    Raises:
        AttentionHookerError: naming ``where`` and what was given instead (a single
            :class:`WindowIndex`, the index of one call, is for the views of one call).

    Example:
        >>> index = WindowIndex(torch.tensor([[0]]), 1, 1, 1)
        >>> checked_window_map({"a": [index, None]}) == {"a": [index, None]}
        True
    """
    expected = "{layer_name: [WindowIndex or None per call]} (hooker.window_index, or a loaded capture's)"
    if isinstance(window_index, WindowIndex):
        raise AttentionHookerError(f"{where} takes {expected}, got one WindowIndex (the index of one call, which "
                                   "swin_attention_map and plot_swin_attention take)")
    if not isinstance(window_index, Mapping):
        raise AttentionHookerError(f"{where} takes {expected}, got {type(window_index).__name__}")
    checked = {}
    for name, indices in window_index.items():
        if isinstance(indices, (str, bytes, WindowIndex)) or not isinstance(indices, Sequence):
            raise AttentionHookerError(f"{where}[{name!r}] is {type(indices).__name__}: expected a list of one "
                                       f"WindowIndex or None per call of the layer ({expected})")
        bad = [type(i).__name__ for i in indices if i is not None and not isinstance(i, WindowIndex)]
        if bad:
            raise AttentionHookerError(f"{where}[{name!r}] holds {bad[0]}: expected a list of one WindowIndex or None "
                                       f"per call of the layer ({expected})")
        checked[name] = list(indices)
    return checked


def dense_values(values: Mapping[str, Sequence[torch.Tensor]],
                 window_index: Mapping[str, Sequence[Optional[WindowIndex]]], *,
                 call: Optional[int] = None, where: str = "window_index=") -> AttentionValues:
    """``values`` with every call kept per window placed at its tokens: what the default
    ``windows="dense"`` capture stores, made on demand.

    Args:
        values: ``{layer: [call]}`` (``hooker.values``, or a loaded capture's), each call
            ``(batch, heads, query, key)`` or, for a windowed layer kept with ``windows="keep"``,
            ``(batch * windows, heads, N, N)``.
        window_index: ``{layer: [WindowIndex or None per call]}`` (``hooker.window_index``, or a
            loaded capture's); a layer not in it (or a ``None``) is passed on as it is, and so is
            a call that is ``None`` (a gradient backward has not reached).
        call: only this call of each layer (placed alone, the others not made): ``{layer: [call]}``.
        where: the argument's name in errors.

    Returns:
        ``{layer: [call]}`` in the same order, each ``(batch, heads, query, key)`` over tokens.

    Raises:
        AttentionHookerError: when ``window_index`` is not such a mapping, a layer's index does not
            match its calls, or a layer lacks ``call``.

    Example:
        >>> index = WindowIndex(torch.tensor([[0, 2], [1, 3]]), batch=1, height=2, width=2)
        >>> dense_values({"a": [torch.ones(2, 1, 2, 2) / 2]}, {"a": [index]})["a"][0][0, 0].tolist()
        [[0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.0, 0.5], [0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.0, 0.5]]
    """
    window_index = checked_window_map(window_index, where)
    out = AttentionValues()
    for name, calls in values.items():
        indices = window_index.get(name)
        if indices is not None and len(indices) != len(calls):
            raise AttentionHookerError(f"layer {name!r} has {len(calls)} calls but {len(indices)} window indices")
        chosen = range(len(calls))
        if call is not None:
            if not -len(calls) <= call < len(calls):
                raise AttentionHookerError(f"layer {name!r} has {len(calls)} calls; call={call} is out of range")
            chosen = [call % len(calls)]
        out[name] = [calls[i] if indices is None or indices[i] is None or calls[i] is None
                     else _dense_of(indices[i], calls[i], f"layer {name!r} call {i}") for i in chosen]
    return out


def _dense_of(index: WindowIndex, call: torch.Tensor, where: str) -> torch.Tensor:
    index.check(call, where)
    return place_windows(call, index.table, index.batch, index.tokens)
