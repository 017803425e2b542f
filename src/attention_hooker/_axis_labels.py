"""Which label goes on which axis position: one rule for the plots, the page, saving and the
command line (issue 21; it lives below ``io`` so that saving checks tokens as the views place them).

Labels come as the user passes them:

- ``tokens``: one list (both axes of self-attention, or the axis it fits); one list per batch
  item (as many lists as the call has batch items, all of one length); or lists for axes of
  different lengths (``[source_tokens, target_tokens]``: an axis takes the first list of its
  length);
- ``query_tokens`` / ``key_tokens``: one list for that axis (cross-attention), taken before
  ``tokens`` wherever it fits;
- ``rows`` / ``keys``: the query rows and keys a capture kept (``hooker.selection``): a list of
  the whole input then labels the kept rows and keys of a call whose counts are theirs.

For a call of shape ``(batch, heads, query, key)`` and batch item ``b``, :meth:`AxisLabels.axes`
gives each axis the first of: its own list, when it fits; the kept rows' and keys' labels (a
selection); the first list of the axis's length; else ``None`` (the views number the positions).
Each list given must label some axis of some call (:meth:`AxisLabels.check`); otherwise one
message says how many labels came and how many positions the axes have.

A label is shown cut to 64 characters, "…" at the end (:func:`shown_label`; the page shows the
rest on hover), and an axis of many positions shows every n-th label (:func:`thinned_positions`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from ._checks import token_lists
from .selection import resolve_rows, row_selection
from .errors import AttentionHookerError

__all__ = ["AxisLabels", "SHOWN_CHARS", "shown_label", "thinned_positions", "kept_labels", "PositionedLabels",
           "positions_of", "tick_label"]

SHOWN_CHARS = 64  # the most characters of a label on an axis (plots and the page alike)

Labels = List[str]


def shown_label(text) -> str:
    """``text`` as an axis shows it: at most 64 characters, the last one "…" when cut.

    Example:
        >>> shown_label("the"), len(shown_label("x" * 100)), shown_label("x" * 100)[-1]
        ('the', 64, '…')
    """
    text = str(text)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


class PositionedLabels(list):
    """Labels of the positions an axis kept (``rows="::8"``): a list of the labels, and
    ``positions``, where each one is in the input (the views label a thinned axis with them).

    Example:
        >>> kept = PositionedLabels(["b", "d"], positions=[1, 3])
        >>> kept == ["b", "d"], kept.positions
        (True, [1, 3])
    """

    def __init__(self, labels=(), positions: Sequence[int] = ()):
        super().__init__(labels)
        self.positions = list(positions)
        if len(self.positions) != len(self):
            raise AttentionHookerError(f"{len(self)} labels with {len(self.positions)} positions; give one each")


def positions_of(labels) -> Optional[List[int]]:
    """Where each of ``labels`` is in the input: a :class:`PositionedLabels`'s positions, else
    ``None`` (the axis is the input: position ``i`` is ``i``)."""
    return list(labels.positions) if isinstance(labels, PositionedLabels) else None


def tick_label(labels: Sequence[str], i: int, thinned: bool) -> str:
    """The label of axis position ``i``: the token (cut as :func:`shown_label` cuts it), with its
    position in front where the axis shows only every n-th (``"512 the"``): a sampled token
    alone does not say where it is.

    Example:
        >>> tick_label(["a", "b"], 1, False), tick_label(["a", "b"], 1, True)
        ('b', '1 b')
        >>> tick_label(PositionedLabels(["x", "y"], positions=[8, 16]), 1, True)
        '16 y'
    """
    text = shown_label(labels[i])
    if not thinned:
        return text
    positions = positions_of(labels)
    return f"{positions[i] if positions is not None else i} {text}"


def thinned_positions(n: int, max_labels: int) -> List[int]:
    """The positions of an axis of ``n`` that carry a label: every one, or every ``ceil(n / max_labels)``-th.

    Example:
        >>> thinned_positions(5, 40), thinned_positions(10, 4)
        ([0, 1, 2, 3, 4], [0, 3, 6, 9])
    """
    step = max(1, math.ceil(n / max_labels))
    return list(range(0, n, step))


def kept_labels(labels: Sequence[str], selection, where: str, axis: str = "rows") -> Labels:
    """The labels of the query rows (or, with ``axis="keys"``, the keys) that ``selection`` keeps
    of an input labelled ``labels`` (all of them for ``None``).

    Raises:
        AttentionHookerError: when the selection names a position the input lacks (``where`` says which).

    Example:
        >>> kept_labels(["a", "b", "c"], "last", "the text"), kept_labels(["a", "b"], None, "x")
        (['c'], ['a', 'b'])
    """
    selection = row_selection(selection, axis)
    if selection is None:
        return list(labels)
    kept = list(resolve_rows(selection, len(labels), where, axis))
    return PositionedLabels([labels[i] for i in kept], positions=kept)


def _one_list(tokens, name: str) -> Labels:
    lists = token_lists(tokens, name)
    if len(lists) != 1:
        raise AttentionHookerError(f"{name} must be one list of token strings, got {len(lists)} lists")
    positions = positions_of(tokens)  # kept rows' labels keep where they are
    return lists[0] if positions is None else PositionedLabels(lists[0], positions=positions)


class AxisLabels:
    """Token labels as the user gave them, and the rule that puts them on a call's axes.

    Args:
        tokens: one list, one list per batch item, or lists for axes of different lengths.
        query_tokens: labels of the query axis (rows), for cross-attention.
        key_tokens: labels of the key axis (columns).
        rows: the query rows the capture kept: ``None`` (all), ``"last"``, indices or a slice.
        keys: the keys the capture kept, alike.

    Raises:
        AttentionHookerError: for labels that are not a list of strings (or of such lists), or
            a selection of rows or keys that is none.

    Example:
        >>> labels = AxisLabels([["s0", "s1", "s2"], ["t0", "t1"]])
        >>> labels.axes((1, 4, 2, 3))  # (batch, heads, query, key): decoder queries, encoder keys
        (['t0', 't1'], ['s0', 's1', 's2'])
        >>> AxisLabels([["a", "b"], ["c", "d"]]).axes((2, 1, 2, 2), batch_index=1)  # one list per item
        (['c', 'd'], ['c', 'd'])
    """

    def __init__(self, tokens=None, *, query_tokens=None, key_tokens=None, rows=None, keys=None):
        self.lists: List[Labels] = token_lists(tokens) or []
        self.query: Optional[Labels] = None if query_tokens is None else _one_list(query_tokens, "query_tokens")
        self.key: Optional[Labels] = None if key_tokens is None else _one_list(key_tokens, "key_tokens")
        self.rows, self.keys = row_selection(rows, "rows"), row_selection(keys, "keys")
        self._kept: Dict[Tuple[int, str], Optional[Labels]] = {}  # (list index, axis) -> its kept labels

    @property
    def given(self) -> bool:
        """Whether any labels were given."""
        return bool(self.lists) or self.query is not None or self.key is not None

    def per_batch(self, batch: int) -> bool:
        """Whether ``tokens`` are one list per batch item of a call with ``batch`` items."""
        return batch > 1 and len(self.lists) == batch and len({len(t) for t in self.lists}) == 1

    def axes(self, shape: Sequence[int], batch_index: int = 0) -> Tuple[Optional[Labels], Optional[Labels]]:
        """``(query labels, key labels)`` of batch item ``batch_index`` of a call of ``shape``
        ``(batch, heads, query, key)``; ``None`` for an axis no list fits.

        Example:
            >>> AxisLabels(["a", "b", "c"]).axes((1, 2, 1, 3))  # one query row: the keys are labelled
            (None, ['a', 'b', 'c'])
            >>> AxisLabels(["a", "b", "c"], rows="last").axes((1, 2, 1, 3))  # the kept row is the last
            (['c'], ['a', 'b', 'c'])
        """
        batch, _, n_query, n_key = tuple(shape)
        candidates = list(enumerate(self.lists))
        if self.per_batch(batch):
            candidates = [candidates[batch_index]]
        query = self.query if self.query is not None and len(self.query) == n_query else None
        key = self.key if self.key is not None and len(self.key) == n_key else None
        if (query is None or key is None) and (self.rows is not None or self.keys is not None):
            pair = next(filter(None, (self._through_selection(i, n_query, n_key) for i, _ in candidates)), None)
            if pair is not None:
                query, key = query if query is not None else pair[0], key if key is not None else pair[1]
        if query is None:
            query = next((t for _, t in candidates if len(t) == n_query), None)
        if key is None:
            key = next((t for _, t in candidates if len(t) == n_key), None)
        return query, key

    def _through_selection(self, index: int, n_query: int, n_key: int) -> Optional[Tuple[Labels, Labels]]:
        """List ``index``'s labels of the kept rows and keys, when their counts are ``(n_query, n_key)``."""
        kept = []
        for axis, selection in (("rows", self.rows), ("keys", self.keys)):
            if (index, axis) not in self._kept:  # the same list object each time: the page shares it
                try:
                    self._kept[(index, axis)] = kept_labels(self.lists[index], selection, "the tokens", axis)
                except AttentionHookerError:
                    self._kept[(index, axis)] = None
            kept.append(self._kept[(index, axis)])
        query, key = kept
        return (query, key) if query is not None and key is not None and (len(query), len(key)) == (n_query, n_key) \
            else None

    def check(self, calls: Sequence[Tuple[str, Sequence[int]]], *, scope: str = "the capture", hint: str = "") -> None:
        """Every list given labels some axis of some call.

        Args:
            calls: ``(what the call is, its shape)`` per call, e.g. ``("layer 'h.0.attn'", (1, 12, 9, 9))``;
                only the last two sizes (query, key) are read.
            scope: what the calls are, for the message ("the capture", "the attention").
            hint: what to do instead, appended to the message.

        Raises:
            AttentionHookerError: naming the list's length, the first call's query and key
                positions, and the axis lengths there are.

        Example:
            >>> AxisLabels(["a", "b"]).check([("layer 'x'", (1, 2, 3, 3))])
            Traceback (most recent call last):
            ...
            attention_hooker.errors.AttentionHookerError: 2 tokens label no axis of the capture: layer 'x' has 3 query and 3 key positions, while the number of tokens is 2
        """
        if not calls:  # nothing to label: nothing to check against
            return
        sizes = [tuple(shape)[-2:] for _, shape in calls]
        given = [("tokens", t, (0, 1), i) for i, t in enumerate(self.lists)]
        given += [(what, t, (axis,), None) for what, t, axis in (("query tokens", self.query, 0),
                                                                 ("key tokens", self.key, 1)) if t is not None]
        for what, labels, axes, index in given:
            if any(len(labels) == size[a] for size in sizes for a in axes):
                continue
            if index is not None and any(self._through_selection(index, *size) for size in sizes):
                continue
            lengths = sorted({size[a] for size in sizes for a in axes})
            name, (n_query, n_key) = calls[0][0], sizes[0]
            axis = "axis" if what == "tokens" else f"{what.split()[0]} axis"
            found = f" ({axis} lengths there: {lengths})" if len(set(sizes)) > 1 else ""
            raise AttentionHookerError(
                f"{len(labels)} {what} label no {axis} of {scope}: {name} has {n_query} query and {n_key} key "
                f"positions, while the number of {what} is {len(labels)}{found}" + (f"; {hint}" if hint else ""))
