"""Which stored tensors are per-window calls: ``(batch * windows, heads, N, N)``, not ``(batch, heads, query, key)``.

A ``windows="keep"`` capture stores a windowed layer's calls as the model computed them (and a
loaded capture reads them back so). Such a call is 4-D like any attention map, but its axis 0
counts windows of every image and its slots include padding: read as ``(batch, heads, query,
key)`` it gives numbers with a wrong meaning. The keeper and ``load()`` mark each such tensor
here (weakly: a mark goes with its tensor), and every reader of maps asks
:func:`refuse_per_window` first. A tensor made from a marked one (``.float()``, ``.clone()``)
is not marked: the mark says what the library stored, not what was computed from it.

This module is at the bottom of the package (every reader of maps asks it); the mark itself is the
``"per-window"`` kind of :mod:`._map_kinds`, which also knows the other kinds of stored map.
"""

from __future__ import annotations

from ._map_kinds import PER_WINDOW, kind_of, mark_kind, per_window_refusal
from .errors import AttentionHookerError

__all__ = ["mark_per_window", "is_per_window", "refuse_per_window"]


def mark_per_window(tensor, per_window: bool = True) -> None:
    """Records that ``tensor`` is a call kept per window (until the tensor is freed), or, with
    ``per_window=False``, that it is not (a stored tensor the keeper reuses as a buffer for
    another call loses its mark). The mark is the ``"per-window"`` kind of :mod:`._map_kinds`."""
    mark_kind(tensor, PER_WINDOW if per_window else None)


def is_per_window(tensor) -> bool:
    """Whether ``tensor`` itself is a call the library stored per window."""
    kind = kind_of(tensor)
    return kind is not None and kind.name == "per-window"


def refuse_per_window(tensor, where: str) -> None:
    """Raises when ``tensor`` is a call kept per window.

    Raises:
        AttentionHookerError: naming ``where``, what the tensor is and how to read it.
    """
    if is_per_window(tensor):
        raise AttentionHookerError(per_window_refusal(tensor, where))
