"""The finalizer of a hooker that nobody can reach any more: its hooks off, its keepers closed.

Where the last reference goes (a notebook cell rebinding the name), the take-off runs there and
then. Where only the garbage collector finds the hooker (it sits in a reference cycle), the
collection may have started inside code of ours that holds a lock the take-off needs, so the
take-off runs on a thread of its own (see :func:`finalize_take_off`).
"""

from __future__ import annotations

import _thread
import atexit
import gc
import os
import threading
import time
from typing import List

from .live import take_off

__all__ = ["TAKE_OFF_WAIT", "finalize_take_off", "watch_collections"]

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
