"""The in-memory keeper: per-layer call lists (values, gradients, value vectors), in model order.

Every stored tensor has shape ``(batch, heads, query, key)``.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .._map_kinds import PER_WINDOW, mark_kind
from .._torch_private import refcount
from ..values import AttentionValues
from .policy import StoragePolicy
from .allocator import Allocation, empty
from .device_budget import AUTO, DeviceBudget
from .host_copy import copy_to_host
from .protocol import NO_SOURCES, CallSources, GradientSource

__all__ = ["MemoryKeeper"]


class MemoryKeeper:
    """Keeps the calls of every layer in memory, in model order, on the policy's device and dtype.

    A keeper (:class:`~attention_hooker.keep.protocol.Keeper`); with ``max_calls`` and
    ``keep="last"`` it keeps the most recent calls of each layer.

    Args:
        policy: the storage policy (device, dtype, max_calls, keep_grad, keep_values).
        layer_order: every hooked layer name, in model order; ``values`` keeps this order.
        lock: held while a call is added (forwards on several threads keep into one keeper).
        allocation: where stored calls come from (by default, a new one of this keeper's own).
        budget: what ``device="auto"`` counts against (by default, one of this keeper's own; the
            requests of a serving engine share the capture's).
    """

    def __init__(self, policy: StoragePolicy, layer_order: Sequence[str], lock: threading.RLock,
                 allocation: Optional[Allocation] = None, budget: Optional[DeviceBudget] = None):
        self.policy = policy
        self._rank = {name: i for i, name in enumerate(layer_order)}
        self._lock = lock
        self.values = self._new_values()
        self.gradients: dict = {}  # with keep_grad: {name: [[grad or None] per call]}
        self.value_vectors = AttentionValues()  # with keep_values: {name: [value or None per call]}
        # windows="keep": {name: [WindowIndex per call]} for the layers whose calls are kept per window
        self.window_index: dict = {}
        # Spare buffers and the arena (keep/allocator.py); the requests of a serving engine share the
        # capture's, so that their small step calls lie side by side in the same chunks.
        self.allocation = allocation or Allocation()
        # device="auto": the bytes held on each accelerator (a request's keeper uses the capture's,
        # whose keeper alone reads the free memory again at each forward)
        self._owns_budget = budget is None
        self.budget = budget or DeviceBudget()
        self._counted: Dict[torch.device, int] = {}  # what this keeper told the budget it holds
        self._copied_values: Dict[str, list] = {}  # per layer and call: the value vector we copied, or None

    def _new_values(self) -> AttentionValues:
        values = AttentionValues()
        values._guard = self._lock
        return values

    # The keeper protocol.
    def begin_call(self, layer: str, shape: Tuple[int, ...], dtype: torch.dtype,
                   sources: CallSources = NO_SOURCES) -> "_MemoryCall":
        return _MemoryCall(self, layer, tuple(shape), sources)

    def begin_forward(self) -> None:
        """Calls in memory are kept one by one; ``device="auto"`` reads the free memory again."""
        if self._owns_budget:
            self.budget.begin_forward()

    def end_forward(self, *, returned: bool, reason: Optional[str] = None) -> None:
        """Nothing to do: a forward that did not return keeps the calls it made, as ever."""

    def close(self) -> None:
        """Nothing waits (every committed call is in ``values``); the spare buffers and the
        arena's chunks being filled are let go."""
        self.allocation.release()

    def allocator(self, layer: str) -> Callable:
        """``allocate(shape, dtype, device)`` for the next stored call of ``layer``."""
        return self.allocation.for_call(repeated=bool(dict.get(self.values, layer)))  # no lock: a read

    def buffer(self, layer: str) -> Callable:
        """``buffer(shape, dtype, device)`` for the next call of ``layer`` computed straight
        into what is stored (a spare tensor when there is one)."""
        return self.allocation.buffer(repeated=bool(dict.get(self.values, layer)))  # no lock: a read

    # Placing and forgetting.
    def target_device(self, computed_on: torch.device, nbytes: int) -> torch.device:
        """Where a call of ``nbytes`` (as stored) computed on ``computed_on`` is kept."""
        device = self.policy.device
        if device is None:
            return computed_on
        if device == AUTO:
            return self.budget.target(computed_on, nbytes)
        return device

    def stored_bytes(self, shape, dtype: torch.dtype) -> int:
        """Bytes of a call of ``shape`` computed in ``dtype``, as stored; twice that with
        ``keep_grad`` (its gradient, of the same size, comes beside it)."""
        return math.prod(shape) * (self.policy.dtype or dtype).itemsize * (2 if self.policy.keep_grad else 1)

    def stores_as_computed(self, dtype: torch.dtype, device: torch.device, shape=()) -> bool:
        """Whether weights of ``shape`` computed with this dtype and device are stored as they
        are (``shape`` matters with ``device="auto"`` only)."""
        p = self.policy
        if p.dtype is not None and p.dtype != dtype:
            return False
        if p.device is None:
            return True
        if p.device == AUTO:
            return self.budget.target(device, self.stored_bytes(shape, dtype)) == device
        return p.device == device

    def place(self, tensor: torch.Tensor, allocate: Optional[Callable] = None, *,
              beside: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tensor on the policy's device and dtype: itself, or a copy (from ``allocate``).
        A view of a larger tensor (a request's block of a packed map) is copied too: kept as
        it is, it would keep all of that tensor alive. (The arena's tensors share a chunk's
        storage without being views: they are kept as they are.) ``beside``: a stored call
        whose device ``device="auto"`` follows (its gradient, its value vectors)."""
        p = self.policy
        if beside is not None and p.device == AUTO:
            device = beside.device
            as_computed = (p.dtype is None or p.dtype == tensor.dtype) and device == tensor.device
        else:
            as_computed = self.stores_as_computed(tensor.dtype, tensor.device, tensor.shape)
            device = None
        if as_computed and (tensor._base is None or tensor._base.untyped_storage().nbytes() <= tensor.nbytes):
            return tensor
        if device is None:
            device = self.target_device(tensor.device, self.stored_bytes(tensor.shape, tensor.dtype))
        placed = (allocate or empty)(tensor.shape, p.dtype if p.dtype is not None else tensor.dtype, device)
        return copy_to_host(placed, tensor)

    def _count(self, tensor: Optional[torch.Tensor], sign: int = 1, *, call: bool = False) -> None:
        """Tells the budget (``device="auto"``) of a tensor held, or let go of (``sign=-1``);
        a ``call`` counts its gradient too with ``keep_grad`` (counted with the call, so that
        a gradient that backward fills late, twice or never leaves the count as it was)."""
        if tensor is None or tensor.device.type == "cpu":
            return
        nbytes = sign * tensor.nbytes * (2 if call and self.policy.keep_grad else 1)
        self._counted[tensor.device] = self._counted.get(tensor.device, 0) + nbytes
        self.budget.kept(tensor.device, nbytes)

    def clear(self, *, salvage: Optional[Callable[[dict], list]] = None) -> list:
        """Forgets every stored tensor: ``values`` (and the gradients and value vectors)
        start anew as new objects, so a dict of them a user kept keeps its calls.

        Args:
            salvage: called with the old ``values`` when nobody else holds that dict (under
                the lock, so no call is added in between); its result becomes the spare
                buffers of the next calls. The capture passes one, while its hooks are on,
                that picks the tensors nobody else can reach.

        Returns:
            What ``salvage`` returned, or ``[]``.
        """
        with self._lock:
            old, self.values = self.values, self._new_values()
            self.gradients, self.value_vectors, self.window_index = {}, AttentionValues(), {}
            self._copied_values = {}
            probe = AttentionValues()  # counted as ``old`` is: one local name
            alone = refcount(old) == refcount(probe)
            salvaged = salvage(old) if salvage is not None and alone else []
            del old, probe  # the arena's chunk is filled again only when nothing reaches its tensors
            counted, self._counted = self._counted, {}
            self.budget.released(counted)
        if salvage is not None:
            # On an accelerator its caching allocator reuses memory without page faults: spares
            # there would only hold memory that device="auto" counts as free and the model needs.
            self.allocation.recycle([t for t in salvaged if t.device.type == "cpu"])
        return salvaged

    def count_written(self, stored: torch.Tensor, value: Optional[torch.Tensor] = None) -> Optional[dict]:
        """Tells the budget (``device="auto"``) of a call's tensor (and of its value vectors, where
        we copied them) as soon as it is written, before the call is committed: the calls of one
        layer are committed together when the layer returns (a serving engine's requests), and each
        must be weighed with those before it. Returns the count it went into, which ``add`` and
        ``uncount`` compare with the current one (a ``clear()`` in between let it go); ``None``
        where nothing was counted (CPU tensors never are)."""
        if stored.device.type == "cpu" and (value is None or value.device.type == "cpu"):
            return None
        with self._lock:
            self._count(stored, call=True)
            self._count(value)
            return self._counted

    def uncount(self, stored: torch.Tensor, value: Optional[torch.Tensor], book: dict) -> None:
        """A written call discarded: what :meth:`count_written` told the budget, taken back."""
        with self._lock:
            if book is self._counted:
                self._count(stored, -1, call=True)
                self._count(value, -1)

    def place_value(self, value: Optional[torch.Tensor], stored: torch.Tensor):
        """``(placed, copied)``: a call's value vectors where the call went (``place(beside=)``), and
        the same tensor where it is a copy of ours, else ``None``: a value the model's cache holds
        (a view of a static cache, the same storage at every step) is the model's memory, not the
        capture's, and is not counted."""
        if value is None:
            return None, None
        detached = value.detach()
        placed = self.place(detached, beside=stored)
        return placed, (placed if placed is not detached else None)

    # Adding a committed call (under the lock).
    def add(self, name: str, stored: torch.Tensor, graph_tensor, sources: CallSources,
            counted_in: Optional[dict] = None, value=(None, None)) -> None:
        """``counted_in``: the count :meth:`count_written` put the call into, if any; ``value``: its
        value vectors as :meth:`place_value` placed them (with ``keep_values``)."""
        p = self.policy
        calls = self.values.get(name)
        if calls is None:
            calls = self._insert_layer(name)
        calls.append(stored)
        counted = counted_in is self._counted
        if not counted:
            self._count(stored, call=True)
        # (batch * windows, heads, N, N), or a map that is not probabilities over tokens: the readers that
        # need those refuse it; a reused buffer loses an old mark
        mark_kind(stored, PER_WINDOW if sources.windows is not None else sources.kind)
        if p.keep_grad:
            self._watch_gradient(name, stored, graph_tensor, sources.gradient_scale,
                                 kind=PER_WINDOW if sources.windows is not None else sources.kind)
        if p.keep_values:
            self._add_value(name, *value, counted=counted)
        if sources.windows is not None or name in self.window_index:  # aligned with the layer's calls
            self.window_index.setdefault(name, [None] * (len(calls) - 1)).append(sources.windows)
        if p.max_calls is not None and len(calls) > p.max_calls:
            self._count(calls[0], -1, call=True)
            del calls[0]  # keep == "last"
            if name in self.window_index:
                del self.window_index[name][0]
            if p.keep_grad:
                del self.gradients[name][0]
            if p.keep_values:
                self._count(self._copied_values[name].pop(0), -1)
                del self.value_vectors[name][0]

    def _add_value(self, name: str, placed: Optional[torch.Tensor], copied: Optional[torch.Tensor], *,
                   counted: bool) -> None:
        if name not in self.value_vectors:
            self.value_vectors[name] = []
            order = [n for n in self.values if n in self.value_vectors]  # model order, as values
            for n in order:
                self.value_vectors[n] = self.value_vectors.pop(n)
        self.value_vectors[name].append(placed)
        self._copied_values.setdefault(name, []).append(copied)
        if not counted:
            self._count(copied)

    def window_index_copy(self) -> Dict[str, list]:
        """``{layer: [WindowIndex or None per call]}`` in the order of ``values``, copied under the lock
        (forwards on other threads add calls and indices together)."""
        with self._lock:
            order = {name: rank for rank, name in enumerate(self.values)}
            return {name: list(self.window_index[name])
                    for name in sorted(self.window_index, key=lambda n: order.get(n, len(order)))}

    def _watch_gradient(self, name: str, stored: torch.Tensor, graph_tensor, scale=None, *,
                        kind=None) -> None:
        """Fills ``gradients[name][i]`` when backward reaches ``graph_tensor`` (a tensor, or a
        :class:`~attention_hooker.keep.protocol.GradientSource`)."""
        slots = self.gradients.setdefault(name, [])
        slot = [None]
        slots.append(slot)
        to_weights = None
        if isinstance(graph_tensor, GradientSource):
            graph_tensor, to_weights = graph_tensor
        if not graph_tensor.requires_grad:
            return

        def keep(grad: torch.Tensor) -> None:
            grad = grad.detach()
            if to_weights is not None:
                grad = to_weights(grad)
            if scale is not None:
                grad = grad * scale
            slot[0] = self.place(grad.reshape(stored.shape), beside=stored)  # counted with its call
            if kind is not None:
                mark_kind(slot[0], kind)

        graph_tensor.register_hook(keep)

    def _insert_layer(self, name: str) -> list:
        """Adds a layer to ``values`` so that the dict stays in model order."""
        self.values[name] = []
        rank = self._rank.get(name, len(self._rank))
        if any(self._rank.get(other, len(self._rank)) > rank for other in self.values if other != name):
            ordered = sorted(self.values.items(), key=lambda kv: self._rank.get(kv[0], len(self._rank)))
            self.values.clear()
            self.values.update(ordered)
        return self.values[name]


class _MemoryCall:
    """A call on its way into memory. A block of every row at once (the usual case) is
    kept as it is when it is already on the policy's device and dtype (the sdpa route
    computes it there), else copied once; blocks of rows fill one stored tensor."""

    def __init__(self, keeper: MemoryKeeper, layer: str, shape: Tuple[int, ...], sources: CallSources):
        self._keeper, self._layer, self._shape, self._sources = keeper, layer, shape, sources
        self._stored: Optional[torch.Tensor] = None
        self._value = (None, None)  # its value vectors, placed beside it (keep_values): (placed, copied)
        self._counted_in: Optional[dict] = None  # the budget's count it went into when written
        self._graph_tensor = sources.graph_tensor
        self._row = 0

    def write(self, rows: torch.Tensor, block: torch.Tensor) -> None:
        keeper = self._keeper
        if self._stored is None and block.shape[2] == self._shape[2]:
            self._stored = keeper.place(block.detach(), keeper.allocator(self._layer))
            self._written()
            if self._graph_tensor is None:
                self._graph_tensor = block  # its gradient is the weights' (a selection keeps the graph)
            self._row = block.shape[2]
            return
        if self._stored is None:
            p = keeper.policy
            self._stored = keeper.allocator(self._layer)(
                self._shape, p.dtype if p.dtype is not None else block.dtype,
                keeper.target_device(block.device, keeper.stored_bytes(self._shape, block.dtype)))
            self._written()
        copy_to_host(self._stored[:, :, self._row:self._row + block.shape[2]], block)
        self._row += block.shape[2]

    def _written(self) -> None:
        """The stored tensor is made: its value vectors are placed beside it, and both are counted."""
        keeper = self._keeper
        if keeper.policy.keep_values:
            self._value = keeper.place_value(self._sources.value, self._stored)
        self._counted_in = keeper.count_written(self._stored, self._value[1])

    def commit(self) -> None:
        if self._stored is None:
            return
        stored, self._stored = self._stored, None
        with self._keeper._lock:
            self._keeper.add(self._layer, stored, stored if self._graph_tensor is None else self._graph_tensor,
                             self._sources, self._counted_in, self._value)

    def discard(self) -> None:
        if self._stored is not None and self._counted_in is not None:
            self._keeper.uncount(self._stored, self._value[1], self._counted_in)
        self._stored, self._value = None, (None, None)  # nothing of it held on
