"""The router between a capture and its keepers: it counts the calls of each layer against
``max_calls``, applies the selection to whole maps, and hands each call to the keepers in
use (memory, unless others are attached) through the keeper protocol (``keep/protocol.py``)."""

from __future__ import annotations

import functools
import threading
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .memory import MemoryKeeper
from .policy import StoragePolicy
from .protocol import NO_SOURCES, CallSources, CallWriter, check_keeper
from .requests import RequestRouters

__all__ = ["Router", "Fanout"]


class Router:
    """Where a capture sends its calls.

    Args:
        policy: the storage policy.
        layer_order: every hooked layer name, in model order.
        allocation: where memory's stored calls come from (a request's router: the capture's).

    Attributes:
        memory: the in-memory keeper; it takes the calls while no other keeper is attached.
        calls_seen: ``{layer: calls counted}`` against ``max_calls``.
        requests: ``{request id: Router}``: under continuous batching each request of the
            engine has a router of its own (:meth:`for_request`), with its own memory and
            ``max_calls`` count, so that the calls of different requests are never mixed.
    """

    def __init__(self, policy: StoragePolicy, layer_order: Sequence[str], allocation=None, budget=None):
        self.policy = policy
        self.layer_order = list(layer_order)
        self.lock = threading.RLock()  # forwards on several threads keep into the same keepers
        self.memory = MemoryKeeper(policy, layer_order, self.lock, allocation, budget)
        # Replaced whole, never changed in place, under its own lock that is never held while
        # a keeper runs: a keeper closing itself detaches while a forward commits into it.
        self._attached: Tuple = ()
        self._attaching = threading.Lock()
        self.calls_seen: Dict[str, int] = {}
        # A request's router: the same policy, layers and allocation (no reference back to this
        # router, which a closure would make a cycle that keeps every call alive until gc runs).
        # The requests share the capture's device budget too: together they keep within one share.
        self._requests = RequestRouters(functools.partial(Router, policy, self.layer_order, self.memory.allocation,
                                                          self.memory.budget))

    @property
    def keepers(self) -> list:
        """The keepers calls go to: the attached ones, or memory when there are none."""
        return list(self._attached) or [self.memory]

    @property
    def takes_tiles(self) -> bool:
        """Whether calls may be handed over a tile of rows at a time (no keeper holds the
        whole call itself: memory is not in use), so no whole layer needs computing at once."""
        return bool(self._attached)

    def attach(self, keeper, *, per_request: Optional[Callable[[str, "Router"], object]] = None,
               shared: bool = True) -> None:
        """Sends the following calls to ``keeper`` too (and no longer to memory).

        Args:
            keeper: the keeper.
            per_request: under continuous batching, makes the keeper of each request's own
                calls from the request's label and router (a stream into the request's own
                folder); without it, each request's calls go to ``keeper`` itself when
                ``shared`` (a reduction over every request).

        Raises:
            AttentionHookerError: when ``keeper`` lacks a method of the protocol.
        """
        check_keeper(keeper)
        with self._attaching:
            if not any(k is keeper for k in self._attached):
                self._attached = self._attached + (keeper,)
        self._requests.attach(keeper, per_request, shared)

    def detach(self, keeper) -> None:
        """Stops sending calls to ``keeper`` (memory takes them again when it was the last);
        each request's router stops too (a keeper made for the request is closed)."""
        with self._attaching:
            self._attached = tuple(k for k in self._attached if k is not keeper)
        self._requests.detach(keeper)

    @property
    def requests(self) -> Dict[str, "Router"]:
        """``{request label: Router}`` under continuous batching (``keep/requests.py``)."""
        return dict(self._requests.routers)

    def for_request(self, request_id: str, layer: str, first: int, end: int, cache=None) -> "Router":
        """The router of a request's call of ``layer`` over its positions ``first .. end - 1``
        (see :meth:`~.requests.RequestRouters.route`)."""
        return self._requests.route(request_id, layer, first, end, cache)

    # Counting against max_calls.
    def wants(self, name: str) -> bool:
        """Whether the next call of ``name`` would be kept (lets routes skip work)."""
        p = self.policy
        return p.max_calls is None or p.keep == "last" or self.calls_seen.get(name, 0) < p.max_calls

    def skip(self, name: str) -> None:
        """Counts a call that was not computed because :meth:`wants` said no."""
        with self.lock:
            self.calls_seen[name] = self.calls_seen.get(name, 0) + 1

    def uncount(self, name: str) -> None:
        """Counts out a call of ``name`` that a keeper rolled back (its forward was not written
        whole): it no longer takes a place of ``max_calls``."""
        with self.lock:
            if self.calls_seen.get(name, 0) > 0:
                self.calls_seen[name] -= 1

    # Calls.
    def begin_call(self, layer: str, shape: Tuple[int, ...], dtype: torch.dtype,
                   sources: CallSources = NO_SOURCES) -> CallWriter:
        """A writer for a call of ``layer`` whose blocks are already what is stored:
        ``shape`` ``(batch, heads, rows, keys)`` after the selection, in ``dtype``."""
        writers = []
        try:
            for keeper in self.keepers:
                writers.append(keeper.begin_call(layer, tuple(shape), dtype, sources))
        except BaseException:
            _each(writers, lambda writer: writer.discard())  # a stream's file of the call goes too
            raise
        return writers[0] if len(writers) == 1 else Fanout(writers)

    def whole_call(self, layer: str, weights: torch.Tensor, sources: CallSources = NO_SOURCES) -> CallWriter:
        """A call's whole map ``(batch, heads, query, key)``, the selection applied here,
        written to a writer of the keepers in use (not yet committed: see :meth:`commit`).

        Raises:
            AttentionHookerError: when the selection names a head, row or key the call lacks.
        """
        kept = self.policy.selection.apply(weights, f"layer {layer!r}")  # (B, heads, rows, keys)
        writer = self.begin_call(layer, kept.shape, self.policy.dtype or kept.dtype, sources)
        # Memory keeps the graph of the weights (keep_grad); other keepers take numbers only.
        writer.write(torch.arange(kept.shape[2]), kept if not self._attached else kept.detach())
        return writer

    def commit(self, layer: str, writer: CallWriter) -> None:
        """Keeps a finished call when its layer still wants one (counted either way)."""
        with self.lock:
            kept = self.wants(layer)
            self.calls_seen[layer] = self.calls_seen.get(layer, 0) + 1
            if kept:
                writer.commit()
                return
        writer.discard()

    # Forwards and the end.
    def begin_forward(self) -> None:
        self.memory.begin_forward()  # device="auto" reads the free memory again
        for keeper in self._attached:
            keeper.begin_forward()
        self._requests.begin_forward()  # a request's router takes part at its first call in the forward

    def end_forward(self, *, returned: bool, reason=None) -> None:
        """Tells every attached keeper, and those of the requests that had calls in this forward;
        the first error one raises is raised once all were told."""
        keepers = list(self._attached)
        for router in self._requests.end_forward(returned=returned, reason=reason):
            keepers.extend(k for k in router._attached if not any(k is known for known in keepers))
        _each(keepers, lambda keeper: keeper.end_forward(returned=returned, reason=reason))

    def close(self) -> None:
        """Closes memory and every attached keeper (what waits is written). A keeper that is done for
        good detaches itself (a closed stream does); a reduction stays attached, for the
        next time the hooks are on."""
        memories = [self.memory, *(router.memory for router in self._requests.routers.values())]
        keepers = list(self._attached)
        keepers.extend(k for k in self._requests.attached() if not any(k is known for known in keepers))
        _each([*memories, *keepers], lambda keeper: keeper.close())

    def clear(self, *, salvage=None) -> list:
        """Forgets the calls in memory, every call count and every request's calls (see
        :meth:`MemoryKeeper.clear`)."""
        with self.lock:
            self.calls_seen = {}
            spare = self.memory.clear(salvage=salvage)
        for router in self._requests.clear():
            router.clear()
        return spare


class Fanout:
    """One call handed to several keepers at once (a stream to disk and a pooled map for pictures).
    It takes narrow blocks (and key bands) when every writer does, and the log of each block when
    one of them wants it (handed to those only)."""

    def __init__(self, writers: list):
        self.writers = writers
        self.takes_narrow_blocks = all(getattr(w, "takes_narrow_blocks", False) for w in writers)
        self._wants_log = [bool(getattr(w, "wants_log_probabilities", False)) for w in writers]
        self.wants_log_probabilities = any(self._wants_log)
        self.takes_key_bands = self.takes_narrow_blocks and all(getattr(w, "takes_key_bands", False) for w in writers)

    def write(self, rows: torch.Tensor, block: torch.Tensor, log_block: Optional[torch.Tensor] = None,
              first_key: int = 0) -> None:
        band = {"first_key": first_key} if first_key else {}  # given only to writers that take bands (all, then)
        for writer, wants_log in zip(self.writers, self._wants_log):
            if wants_log and log_block is not None:
                writer.write(rows, block, log_block=log_block, **band)
            else:
                writer.write(rows, block, **band)

    def commit(self) -> None:
        _each(self.writers, lambda writer: writer.commit())

    def discard(self) -> None:
        _each(self.writers, lambda writer: writer.discard())


def _each(items: list, act) -> None:
    """``act`` on every item; the first error raised is raised once every item had its turn."""
    error = None
    for item in items:
        try:
            act(item)
        except BaseException as err:  # noqa: B902 - re-raised below
            error = error or err
    if error is not None:
        raise error
