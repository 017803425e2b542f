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
import os
import threading
import time
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
_AT_EXIT_WAIT = 30.0  # seconds the interpreter's exit waits, in all, for take-offs still held up then
# (the thread a garbage collection runs on, the count of collections when it started), while one runs
_COLLECTING = [None, 0]
_HELD_UP: List = []  # the take-offs still running after their collection's wait (their `done` locks)
_WATCHING = threading.Lock()  # taken by set-ups only, never by a finalizer
_start_thread = _thread.start_new_thread  # a bare thread (tests stand in for it)
_interrupt_main = _thread.interrupt_main


def watch_collections() -> None:
    """Notes from now on which thread a garbage collection runs on (a ``gc.callbacks`` entry), so
    that a hooker's finalizer can tell whether the collector runs it (:func:`finalize_take_off`).
    Called by every set-up: put first among the callbacks (CPython skips the entry after one that
    removes itself; another library may have put its own first since), and kept for the process."""
    with _WATCHING:
        if gc.callbacks[:1] != [_on_collection]:
            if _on_collection in gc.callbacks:
                gc.callbacks.remove(_on_collection)
            else:
                atexit.register(_wait_at_exit)
            gc.callbacks.insert(0, _on_collection)


def _collections() -> int:
    return sum(generation["collections"] for generation in gc.get_stats())


def _on_collection(phase: str, info: dict) -> None:
    if phase == "start":
        _COLLECTING[:] = [_thread.get_ident(), _collections()]
    else:
        _COLLECTING[0] = None


def _collecting_here() -> bool:
    """Whether a garbage collection runs on this thread now. CPython counts a collection before
    its "stop" callbacks, so a "stop" that never reached us (skipped) still reads as over."""
    thread, count = _COLLECTING
    return thread == _thread.get_ident() and count == _collections()


def finalize_take_off(hooks, session, router) -> None:
    """The finalizer of a hooker that nobody can reach any more: :func:`take_off`.

    Where the last reference went (a notebook cell rebinding the name), at once, on that thread,
    which also closes what an interrupted forward left on it (its scopes, its function mode).

    Where the garbage collector finds the hooker (in a reference cycle), on a thread of its own,
    waited for up to :data:`TAKE_OFF_WAIT` seconds: a collection starts at any allocation, also
    one made by this library while it holds a lock that the take-off needs (a route's, a
    keeper's, the session's), and inline the take-off would wait for its own thread forever.
    Aside, it waits until that lock is let go; those still held up after the wait are waited for
    at the interpreter's exit, :data:`_AT_EXIT_WAIT` seconds in all (a stream's last shard and
    ``capture.json``). The thread is a bare one (``_thread``): starting it takes none of
    ``threading``'s locks, which the collection may have interrupted too. A Ctrl-C during the wait
    is passed on to the main thread (a finalizer's exception would be lost)."""
    if not _collecting_here():
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
    finished = False
    try:
        finished = done.acquire(timeout=TAKE_OFF_WAIT)
    except KeyboardInterrupt:
        _interrupt_main()
    finally:
        if not finished:
            _HELD_UP[:] = [other for other in _HELD_UP if other.locked()] + [done]


def _wait_at_exit() -> None:
    """Waits for the take-offs still held up, :data:`_AT_EXIT_WAIT` seconds in all."""
    deadline = time.monotonic() + _AT_EXIT_WAIT
    while _HELD_UP:
        done = _HELD_UP.pop()
        if done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            done.release()


os.register_at_fork(after_in_child=_HELD_UP.clear)  # a forked child has none of their threads


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
