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

from .discovery import check_module

__all__ = ["LiveCaptures", "LIVE", "remove_hooks", "take_off", "weakly"]


class LiveCaptures:
    """``{module: the captures whose hooks are on it}``, weak on both sides."""

    def __init__(self):
        self._on: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def add(self, capture, modules: Iterable[nn.Module]) -> None:
        """Registers ``capture`` on ``modules``."""
        with self._lock:
            for module in modules:
                self._on.setdefault(module, weakref.WeakSet()).add(capture)

    def sharing(self, capture) -> List:
        """The other captures on any module ``capture`` is on, each once."""
        others = []
        with self._lock:
            for on in self._on.values():
                if capture in on:
                    others.extend(c for c in on if c is not capture and not any(c is o for o in others))
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


def take_off(hooks, session, router) -> None:
    """Every hook of a capture off the model, and its keepers closed (a stream writes what
    waits for its shard; capture.json is final). Holds nothing of the hooker itself."""
    hooks.remove(session.close)
    router.close()


def remove_hooks(model: nn.Module) -> int:
    """Takes every hooker of this library off ``model`` (and off every module inside it): what a
    notebook needs after cells that set hookers up were run again. Their captured values stay.

    Returns:
        How many hookers were taken off.

    Example:
        >>> from torch import nn
        >>> from attention_hooker import TransformerAttentionHooker
        >>> model = nn.TransformerEncoder(
        ...     nn.TransformerEncoderLayer(d_model=16, nhead=4, batch_first=True), num_layers=2)
        >>> first = TransformerAttentionHooker(model).setup()
        >>> remove_hooks(model), first.is_setup
        (1, False)
    """
    check_module(model)
    hookers = LIVE.on(model)
    for hooker in hookers:
        hooker.remove_hooks()
    return len(hookers)


def weakly(method):
    """``method`` of an object, called only while the object lives (the model's hooks must not
    keep a hooker alive)."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()

    return call
