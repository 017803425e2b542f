"""Which captures are on which modules, while their hooks are on.

A notebook re-runs cells: ``hooker = TransformerAttentionHooker(model).setup()`` run five times
makes five captures. The registry lets a new one name the one already on the same modules,
and lets :func:`attention_hooker.remove_hooks` take every capture off a model. It holds
neither the captures nor the modules alive (weak references both ways).
"""

from __future__ import annotations

import _thread
import atexit
import gc
import threading
import weakref
from typing import Iterable, List

from torch import nn

from .discovery import check_module

__all__ = ["LiveCaptures", "LIVE", "remove_hooks", "take_off", "finalize_take_off", "TAKE_OFF_WAIT",
           "watch_collections", "weakly"]


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


TAKE_OFF_WAIT = 1.0  # seconds a collection waits for a take-off held up before it goes on
_AT_EXIT_WAIT = 30.0  # seconds the interpreter's exit waits for a take-off still held up then
_COLLECTING = [None]  # the thread a garbage collection runs on, while one runs (one at a time)
_WATCHING = threading.Lock()  # taken by set-ups only, never by a finalizer
_start_thread = _thread.start_new_thread  # a bare thread (tests stand in for it)


def watch_collections() -> None:
    """Notes from now on which thread a garbage collection runs on (a ``gc.callbacks`` entry of
    one assignment per phase), so that a hooker's finalizer can tell whether the collector runs
    it (:func:`finalize_take_off`). Called by every set-up; added once, kept for the process."""
    with _WATCHING:
        if _on_collection not in gc.callbacks:
            gc.callbacks.append(_on_collection)


def _on_collection(phase: str, info: dict) -> None:
    _COLLECTING[0] = _thread.get_ident() if phase == "start" else None


def finalize_take_off(hooks, session, router) -> None:
    """The finalizer of a hooker that nobody can reach any more: :func:`take_off`.

    Where the last reference went (a notebook cell rebinding the name), at once, on that thread,
    which also closes what an interrupted forward left on it (its scopes, its function mode).

    Where the garbage collector finds the hooker (in a reference cycle), on a thread of its own,
    waited for up to :data:`TAKE_OFF_WAIT` seconds: a collection starts at any allocation, also
    one made by this library while it holds a lock that the take-off needs (a route's, a
    keeper's, the session's), and inline the take-off would wait for its own thread forever.
    Aside, it waits until that lock is let go; one still held up after the wait is waited for at
    the interpreter's exit (a stream's last shard and ``capture.json``). The thread is a bare
    one (``_thread``): starting it takes none of ``threading``'s locks, which the collection
    may have interrupted too."""
    if _COLLECTING[0] != _thread.get_ident():
        take_off(hooks, session, router)
        return
    done = _thread.allocate_lock()
    done.acquire()

    def run() -> None:
        try:
            take_off(hooks, session, router)
        finally:
            done.release()

    try:
        _start_thread(run, ())
    except RuntimeError:  # no new thread to be had (the interpreter shutting down): inline, as before
        run()
        return
    if not done.acquire(timeout=TAKE_OFF_WAIT):
        atexit.register(_wait_at_exit, done)


def _wait_at_exit(done) -> None:
    if done.acquire(timeout=_AT_EXIT_WAIT):
        done.release()


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
