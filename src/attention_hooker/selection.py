"""Which heads, query rows and keys a capture keeps of each call: one :class:`Selection`,
parsed from the options once, resolved against a call's sizes, applied to a map, and
written to (and read back from) a saved capture's metadata.

Every stored call is ``(batch, len(heads), len(rows), len(keys))`` of the model's
``(batch, heads, query, key)`` map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch

from ._checks import check_heads, index_list, is_int
from .errors import AttentionHookerError

__all__ = ["Selection", "Resolved", "row_selection", "resolve_rows", "describe_positions", "selected_rows"]

Positions = Union[None, slice, Tuple[int, ...]]


class Resolved(NamedTuple):
    """A selection resolved against one call: absolute indices, or ``None`` for all."""

    heads: Optional[Tuple[int, ...]]
    rows: Optional[Tuple[int, ...]]
    keys: Optional[Tuple[int, ...]]


@dataclass(frozen=True)
class Selection:
    """The heads, query rows and keys kept of each call (``None``: all of them).

    Attributes:
        heads: head indices (non-negative, distinct), checked against each layer's head count.
        rows: query rows: a tuple of indices (negative ones from the end of each call's
            rows) or a ``slice``.
        keys: the keys kept of each row, in the same forms.

    Example:
        >>> s = Selection.parse(heads=[1], rows="last")
        >>> s.apply(torch.rand(1, 2, 3, 3), "layer 'a'").shape
        torch.Size([1, 1, 1, 3])
        >>> s.describe()
        {'heads': [1], 'rows': 'last', 'keys': None}
        >>> Selection.from_saved({"selection": s.describe()}) == s
        True
    """

    heads: Optional[Tuple[int, ...]] = None
    rows: Positions = None
    keys: Positions = None

    @classmethod
    def parse(cls, *, heads=None, rows=None, keys=None) -> "Selection":
        """The selection the options ``heads=``, ``rows=`` and ``keys=`` ask for.

        Raises:
            AttentionHookerError: on an option of the wrong form.
        """
        return cls(None if heads is None else index_list(heads, "heads", noun="head"), row_selection(rows),
                   row_selection(keys, "keys"))

    @classmethod
    def from_saved(cls, source) -> "Selection":
        """The selection a capture kept: from a hooker (``selection``), a loaded capture
        (``metadata["selection"]``), or that dict itself; all of everything when it does not say."""
        saved = getattr(source, "selection", None)
        if saved is None and isinstance(getattr(source, "metadata", None), dict):
            saved = source.metadata.get("selection")
        if saved is None and isinstance(source, dict) and isinstance(source.get("selection"), dict):
            saved = source["selection"]
        if not isinstance(saved, dict):
            return cls()
        heads = saved.get("heads")
        return cls(None if heads is None else tuple(int(h) for h in heads), _saved_positions(saved, "rows"),
                   _saved_positions(saved, "keys"))

    @property
    def keeps_everything(self) -> bool:
        return self.heads is None and self.rows is None and self.keys is None

    def resolve(self, n_heads: int, n_query: int, n_key: int, where: str) -> Resolved:
        """The absolute indices kept of a call with these sizes (``None``: all).

        Raises:
            AttentionHookerError: when a head, row or key is outside the call, or a slice keeps none.
        """
        return Resolved(None if self.heads is None else check_heads(self.heads, n_heads, where),
                        None if self.rows is None else resolve_rows(self.rows, n_query, where),
                        None if self.keys is None else resolve_rows(self.keys, n_key, where, "keys"))

    def apply(self, weights: torch.Tensor, where: str) -> torch.Tensor:
        """The kept part of a whole map ``(batch, heads, query, key)``: ``(batch, len(heads),
        len(rows), len(keys))`` (the map itself when everything is kept; a compact copy otherwise)."""
        if self.keeps_everything:
            return weights
        kept = self.resolve(weights.shape[1], weights.shape[2], weights.shape[3], where)
        for dim, index in ((1, kept.heads), (2, kept.rows), (3, kept.keys)):
            if index is not None:
                weights = weights.index_select(dim, torch.tensor(index, device=weights.device))
        return weights

    def describe(self) -> dict:
        """As saved with a capture: ``{"heads": [...] or None, "rows": ..., "keys": ...}``
        (:func:`describe_positions` forms)."""
        return {"heads": None if self.heads is None else list(self.heads), "rows": describe_positions(self.rows),
                "keys": describe_positions(self.keys)}


def _saved_positions(saved: dict, axis: str) -> Positions:
    kept = saved.get(axis)
    if isinstance(kept, dict):
        return slice(kept.get("start"), kept.get("stop"), kept.get("step"))
    return row_selection(kept, axis)


def row_selection(value, name: str = "rows") -> Union[None, slice, Tuple[int, ...]]:
    """The query rows a capture keeps: ``None`` (all), a ``slice``, or a tuple of
    indices (negative ones count from the end of each call's rows); ``"last"`` is
    ``(-1,)``.

    Example:
        >>> row_selection("last"), row_selection([0, -1]), row_selection(slice(None, None, 4))
        ((-1,), (0, -1), slice(None, None, 4))
    """
    if value is None or isinstance(value, slice):
        if isinstance(value, slice) and not all(v is None or is_int(v) for v in (value.start, value.stop, value.step)):
            raise AttentionHookerError(f"{name}={value!r}: a slice of rows needs whole-number bounds")
        if isinstance(value, slice) and value.step is not None and int(value.step) < 1:
            raise AttentionHookerError(f"{name}={value!r}: the step of a slice of rows must be 1 or more")
        return value
    if isinstance(value, str):
        if value != "last":
            what = "query rows" if name == "rows" else "keys"
            raise AttentionHookerError(f"{name}={value!r} is not a selection of {what}; expected 'last', an index, "
                                       "a list of indices or a slice")
        return (-1,)
    return index_list(value, name, allow_negative=True, noun="query row" if name == "rows" else "key")


def resolve_rows(rows: Union[slice, Tuple[int, ...]], length: int, where: str, name: str = "rows") -> Tuple[int, ...]:
    """The absolute indices a selection (of query rows, or of keys with ``name="keys"``)
    keeps of a call with ``length`` of them.

    Raises:
        AttentionHookerError: when an index is outside the call's rows, or a slice keeps none.
    """
    noun, nouns = ("row", "query rows") if name == "rows" else ("key", "keys")
    if isinstance(rows, slice):
        kept = tuple(range(length)[rows])
        if not kept:
            raise AttentionHookerError(f"{name}={rows!r} keeps no {noun} of {where}, which has {length} {nouns}")
        return kept
    bad = [r for r in rows if not -length <= r < length]
    if bad:
        raise AttentionHookerError(
            f"{name}={list(rows)} names {noun}(s) {bad}, but {where} has {length} {nouns} (indices 0..{length - 1}, "
            f"or -{length}..-1 from the end)"
        )
    return tuple(dict.fromkeys(r % length for r in rows))  # [0, -1] of a one-row call is that row once


def describe_positions(selection: Union[None, slice, Tuple[int, ...]]):
    """A row or key selection as JSON: ``"last"``, a list, ``{"start", "stop", "step"}`` or ``None``.

    Example:
        >>> describe_positions((-1,)), describe_positions(slice(0, 4)), describe_positions((0, 2))
        ('last', {'start': 0, 'stop': 4, 'step': None}, [0, 2])
    """
    if isinstance(selection, slice):
        return {"start": selection.start, "stop": selection.stop, "step": selection.step}
    if selection == (-1,):
        return "last"
    return None if selection is None else list(selection)


def selected_rows(source, axis: str = "rows") -> Positions:
    """The query rows (or, with ``axis="keys"``, the keys) a capture kept, from a
    hooker's ``selection`` or a loaded capture's saved one (``None``: all of them, or a
    plain mapping that does not say).

    Example:
        >>> class Loaded: metadata = {"selection": {"heads": None, "rows": {"start": 2, "stop": None, "step": 3}}}
        >>> selected_rows(Loaded()), selected_rows({"layer": []}), selected_rows(Loaded(), "keys")
        (slice(2, None, 3), None, None)
    """
    selection = Selection.from_saved(source)
    return selection.rows if axis == "rows" else selection.keys
