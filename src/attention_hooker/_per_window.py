"""Which stored tensors are per-window calls: ``(batch * windows, heads, N, N)``, not ``(batch, heads, query, key)``.

A ``windows="keep"`` capture stores a windowed layer's calls as the model computed them (and a
loaded capture reads them back so). Such a call is 4-D like any attention map, but its axis 0
counts windows of every image and its slots include padding: read as ``(batch, heads, query,
key)`` it gives numbers with a wrong meaning. The keeper and ``load()`` mark each such tensor
here (weakly: a mark goes with its tensor), and every reader of maps asks
:func:`refuse_per_window` first. A tensor made from a marked one (``.float()``, ``.clone()``)
is not marked: the mark says what the library stored, not what was computed from it.

This module is at the bottom of the package (every reader of maps asks it).
"""

from __future__ import annotations

import threading
import weakref
from typing import Dict

from .errors import AttentionHookerError

__all__ = ["mark_per_window", "is_per_window", "refuse_per_window"]

_marked: Dict[int, "weakref.ref"] = {}  # id(tensor) -> a weak reference to it
_lock = threading.Lock()


def mark_per_window(tensor, per_window: bool = True) -> None:
    """Records that ``tensor`` is a call kept per window (until the tensor is freed), or, with
    ``per_window=False``, that it is not (a stored tensor the keeper reuses as a buffer for
    another call loses its mark)."""
    key = id(tensor)
    if not per_window:
        if key not in _marked:  # the usual case, every call of every other capture: no lock taken
            return
        with _lock:
            ref = _marked.get(key)
            if ref is not None and ref() is tensor:
                del _marked[key]
        return

    def forget(_ref, key=key) -> None:
        with _lock:
            if _marked.get(key) is _ref:
                del _marked[key]

    with _lock:
        _marked[key] = weakref.ref(tensor, forget)


def is_per_window(tensor) -> bool:
    """Whether ``tensor`` itself is a call the library stored per window."""
    ref = _marked.get(id(tensor))
    return ref is not None and ref() is tensor


def refuse_per_window(tensor, where: str) -> None:
    """Raises when ``tensor`` is a call kept per window.

    Raises:
        AttentionHookerError: naming ``where``, what the tensor is and how to read it.
    """
    if is_per_window(tensor):
        raise AttentionHookerError(
            f"{where} is a call kept per window (windows=\"keep\"), {tuple(tensor.shape)} = (batch * windows, heads, "
            "N, N): its axis 0 counts windows and its slots include padding, not (batch, heads, query, key); pass "
            "window_index=hooker.window_index (the analyses that take it), the hooker or loaded capture itself, "
            "or place the calls at their tokens first with attention_hooker.window_index.dense_values(values, "
            "window_index) (WindowIndex.dense(call) for one call)")
