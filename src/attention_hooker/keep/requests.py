"""The requests of a serving engine, each kept apart: one router per request.

Under continuous batching (``capture/batching.py``) each request's part of a packed call goes
to a router of the request's own (its own memory, ``max_calls`` count and keepers), made at its
first call. What that router is called (its *label*) follows the request over time:

- its calls follow one another: each begins where the last ended (the prompt, or its chunks,
  then one position per step), and keep the request's label, its id;
- a request computed again from an earlier position (the engine evicted it and prefilled it
  again, or a finished request's id was given to a new one, or a new run of the engine reuses
  ``req_0``) never lands in the old calls: it is kept under a new label, ``req_0#2``, with a
  warning that says why.

Keepers attached to the capture reach each request's router lazily, at its next call: a shared
one (a reduction over every request) as it is, or the one made for the request (a stream into
the request's own folder). A request's router takes part in a forward of the model (a stream's
unit) only when it had a call in it.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import AttentionCaptureWarning

__all__ = ["RequestRouters"]


class RequestRouters:
    """``{label: router}`` of one capture's requests, and the keepers each router gets.

    Args:
        make_router: makes the router of a new request (the capture's policy and layers).
    """

    def __init__(self, make_router: Callable[[], object]):
        self._make = make_router
        self._lock = threading.Lock()
        self.routers: Dict[str, object] = {}  # label -> router, in the order requests came
        self._labels: Dict[str, str] = {}  # request id -> its current label
        self._restarts: Dict[str, int] = {}  # request id -> labels it had
        self._next: Dict[Tuple[str, str], int] = {}  # (label, layer) -> the position its next call begins at
        self._served_by: Dict[str, Callable] = {}  # label -> (weakly) the engine cache it was served from
        # Keepers attached to the capture: {id: (keeper, factory or None, shared)}, and per router the
        # keeper it uses for each: {id(router): {id(keeper): keeper used}}.
        self._keepers: Dict[int, Tuple[object, Optional[Callable], bool]] = {}
        self._made: Dict[int, Dict[int, object]] = {}
        self._forward = threading.local()  # this thread's open forward: the routers that took part
        self._runs_warned: set = set()  # ids of engine caches whose reused request ids were warned about

    # ------------------------------------------------------------------ routes
    def route(self, request_id: str, layer: str, first: int, end: int, cache=None):
        """The router of ``request_id``'s call of ``layer`` over its positions ``first .. end - 1``
        (served from the engine's ``cache``): the request's, or a new label's when the request
        was computed again from an earlier position or by another run of the engine."""
        restarted, warned = None, None
        with self._lock:
            label = self._labels.get(request_id, request_id)
            expected = self._next.get((label, layer))
            served_by = self._served_by.get(label)
            other_run = served_by is not None and cache is not None and served_by() is not cache
            if other_run or (expected is not None and first < expected):
                count = self._restarts.get(request_id, 1) + 1
                self._restarts[request_id] = count
                label = f"{request_id}#{count}"
                self._labels[request_id] = label
                restarted = (request_id, label, other_run, first, expected)
            if cache is not None and label not in self._served_by:
                self._served_by[label] = _weak(cache)
            self._next[(label, layer)] = end
            router = self.routers.get(label)
            if router is None:
                router = self.routers[label] = self._make()
            made = self._made.setdefault(id(router), {})
            wanted = [entry for key, entry in self._keepers.items() if key not in made]
            stale = [key for key in made if key not in self._keepers]
        if restarted is not None:
            rid, new, other_run, first, expected = restarted
            if other_run:  # once per run of the engine: every request of a second run reuses an id
                with self._lock:
                    warned = id(cache) not in self._runs_warned
                    self._runs_warned.add(id(cache))
                if warned:
                    warnings.warn(f"another run of the serving engine (a new paged cache) reuses request ids kept "
                                  f"before, such as {rid!r}: its requests are kept as {new!r} and so on, never mixed "
                                  "with the earlier ones", AttentionCaptureWarning, stacklevel=2)
            else:
                warnings.warn(f"request {rid!r} was computed again from position {first} while its positions up to "
                              f"{expected} were kept (the engine evicted it and prefilled it again, or gave its id to "
                              f"a new request): its calls from here on are kept as {new!r}, never mixed with the "
                              "earlier ones", AttentionCaptureWarning, stacklevel=2)
        if wanted or stale:
            self._sync(label, router, wanted, stale)
        self._take_part(router)
        return router

    def _sync(self, label: str, router, wanted: list, stale: list) -> None:
        """Gives ``router`` the keepers attached since its last call, and takes off the detached ones."""
        made = self._made[id(router)]
        for key in stale:
            keeper = made.pop(key)
            router.detach(keeper)
            if key != id(keeper):  # made for this request: closed with it
                keeper.close()
        for keeper, factory, shared in wanted:
            use = factory(label, router) if factory is not None else (keeper if shared else None)
            made[id(keeper)] = use
            if use is not None:
                router.attach(use)

    # ------------------------------------------------------------------ keepers
    def attach(self, keeper, factory: Optional[Callable], shared: bool) -> None:
        """Each request's router gets ``keeper`` (or ``factory(label, router)``'s) at its next call."""
        with self._lock:
            self._keepers[id(keeper)] = (keeper, factory, shared)
            for made in self._made.values():  # attached again with another factory: made again
                made.pop(id(keeper), None)

    def detach(self, keeper) -> None:
        """Takes ``keeper`` (or the ones made for it) off every request's router now."""
        with self._lock:
            self._keepers.pop(id(keeper), None)
            owned = [(router, self._made.get(id(router), {}).pop(id(keeper), None))
                     for router in self.routers.values()]
        for router, used in owned:
            if used is None:
                continue
            router.detach(used)
            if used is not keeper:
                used.close()

    def attached(self) -> list:
        """Every keeper a request's router uses, each once."""
        with self._lock:
            used = [k for made in self._made.values() for k in made.values() if k is not None]
        found: list = []
        for keeper in used:
            if not any(keeper is known for known in found):
                found.append(keeper)
        return found

    # ------------------------------------------------------------------ forwards
    def _take_part(self, router) -> None:
        """Opens ``router``'s part of this thread's forward of the model, once."""
        taking = getattr(self._forward, "routers", None)
        if taking is None or any(r is router for r in taking):
            return
        taking.append(router)
        router.begin_forward()

    def begin_forward(self) -> None:
        self._forward.routers = []

    def end_forward(self, *, returned: bool, reason=None) -> List:
        """The routers that took part in this thread's forward (each told its end by the caller)."""
        taking, self._forward.routers = getattr(self._forward, "routers", None) or [], None
        return taking

    # ------------------------------------------------------------------ the end
    def clear(self) -> list:
        """Forgets every request (their routers are returned, for their memory to be cleared)."""
        with self._lock:
            routers = list(self.routers.values())
            self.routers, self._labels, self._restarts, self._next, self._served_by = {}, {}, {}, {}, {}
            self._made = {}
        return routers


def _weak(obj) -> Callable:
    try:
        return weakref.ref(obj)
    except TypeError:  # pragma: no cover - the engine's cache takes weak references
        return lambda: obj
