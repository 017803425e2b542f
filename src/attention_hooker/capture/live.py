"""Which captures are on which modules, while their hooks are on.

A notebook re-runs cells: ``hooker = TransformerAttentionHooker(model).setup()`` run five times
makes five captures. The registry lets a new one name the one already on the same modules,
and lets :func:`attention_hooker.remove_hooks` take every capture off a model. It holds
neither the captures nor the modules alive (weak references both ways).
"""

from __future__ import annotations

import threading
import weakref
from typing import Iterable, List

from torch import nn

__all__ = ["LiveCaptures"]


class LiveCaptures:
    """``{module: the captures whose hooks are on it}``, weak on both sides."""

    def __init__(self):
        self._on: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def add(self, capture, modules: Iterable[nn.Module]) -> List:
        """Registers ``capture`` on ``modules``; returns the other captures already on any of them."""
        others = []
        with self._lock:
            for module in modules:
                on = self._on.setdefault(module, weakref.WeakSet())
                others.extend(c for c in on if c is not capture and not any(c is o for o in others))
                on.add(capture)
        return others

    def discard(self, capture) -> None:
        with self._lock:
            for on in list(self._on.values()):
                on.discard(capture)

    def on(self, model: nn.Module) -> List:
        """The captures on ``model`` or any module inside it, each once."""
        found = []
        with self._lock:
            for module in model.modules():
                for capture in self._on.get(module, ()):
                    if not any(capture is f for f in found):
                        found.append(capture)
        return found


LIVE = LiveCaptures()
