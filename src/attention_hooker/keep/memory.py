"""The in-memory keeper: per-layer call lists (values, gradients, value vectors), in model order.

Every stored tensor has shape ``(batch, heads, query, key)``.
"""

from __future__ import annotations

import threading
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .._checks import check_heads, resolve_rows
from .._torch_private import refcount
from ..values import AttentionValues, format_size
from .policy import StoragePolicy
from .router import Fanout, begin_partial

__all__ = ["StoragePolicy", "AttentionValues", "AttentionStore", "GradientSource", "begin_partial", "format_size"]

class GradientSource(NamedTuple):
    """Where the gradient of a stored call's weights comes from when the weights are not in
    the autograd graph themselves: ``tensor`` is, and ``to_weights(d(loss)/d(tensor))`` is
    d(loss)/d(weights) ``(batch, heads, query, key)`` (the sdpa route: ``tensor`` is the real
    kernel's output ``O = P V``, so ``d(loss)/d(P) = d(loss)/d(O) @ V^T``)."""

    tensor: torch.Tensor
    to_weights: Callable[[torch.Tensor], torch.Tensor]


class AttentionStore:
    """Applies a :class:`StoragePolicy` and keeps the calls of every layer in model order.

    Args:
        policy: the storage policy.
        layer_order: every hooked layer name, in model order; ``values`` keeps this order.
    """

    def __init__(self, policy: StoragePolicy, layer_order: Sequence[str]):
        self.policy = policy
        self._rank = {name: i for i, name in enumerate(layer_order)}
        self._lock = threading.RLock()  # forwards on several threads record into one store
        self.values = self._new_values()
        self.gradients: dict = {}  # with keep_grad: {name: [[grad or None] per call]}
        self.value_vectors = AttentionValues()  # with keep_values: {name: [value or None per call]}
        self.calls_seen: dict = {}
        # Keepers other than ``values``: each gives, per layer call, a partial that takes
        # blocks of query rows (add) and is merged by commit(). ``reducer`` reduces calls
        # (statistics, pooled maps); ``stream`` writes them to disk. Either one, or both.
        self.reducer: Optional[Callable[[str], object]] = None
        self.stream: Optional[Callable[[str], object]] = None
        # Where a stored copy of a call of a layer comes from: ``allocator(layer)`` gives an
        # ``allocate(shape, dtype, device)``; the capture plugs in its arena for the repeated
        # calls of a layer, so that generation steps lie side by side (see keep/allocator.py).
        self.allocator: Callable[[str], Callable] = lambda layer: empty

    def _new_values(self) -> AttentionValues:
        values = AttentionValues()
        values._guard = self._lock
        return values

    def clear(self, *, salvage: Optional[Callable[[dict], list]] = None) -> list:
        """Forgets every stored tensor and call count: ``values`` (and the gradients and
        value vectors) start anew as new objects, so a dict of them a user kept keeps its
        calls.

        Args:
            salvage: called with the old ``values`` when nobody else holds that dict (under
                the store's lock, so no call is recorded in between); its result is
                returned. The capture passes one that picks the tensors nobody else can
                reach, to reuse their memory.

        Returns:
            What ``salvage`` returned, or ``[]``.
        """
        with self._lock:
            old, self.values = self.values, self._new_values()
            self.gradients, self.value_vectors, self.calls_seen = {}, AttentionValues(), {}
            probe = AttentionValues()  # counted as ``old`` is: one local name
            alone = refcount(old) == refcount(probe)
            return salvage(old) if salvage is not None and alone else []

    def stores_as_computed(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether weights computed with this dtype and device are stored as they are."""
        p = self.policy
        return (p.dtype is None or p.dtype == dtype) and (p.device is None or p.device == device)

    def wants(self, name: str) -> bool:
        """Whether the next call of ``name`` would be kept (lets routes skip work)."""
        p = self.policy
        return p.max_calls is None or p.keep == "last" or self.calls_seen.get(name, 0) < p.max_calls

    def uncount(self, name: str) -> None:
        """Counts out a call of ``name`` that a keeper rolled back (its forward was not written
        whole): it no longer takes a place of ``max_calls``."""
        with self._lock:
            if self.calls_seen.get(name, 0) > 0:
                self.calls_seen[name] -= 1

    def skip(self, name: str) -> None:
        """Counts a call that was not computed because :meth:`wants` said no."""
        with self._lock:
            self.calls_seen[name] = self.calls_seen.get(name, 0) + 1

    def record(
        self,
        name: str,
        weights: torch.Tensor,
        *,
        selected: bool = False,
        graph_tensor: Optional[torch.Tensor] = None,
        gradient_scale: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
    ) -> None:
        """Stores one call's weights for ``name``.

        Args:
            name: the layer name.
            weights: ``(batch, heads, query, key)``.
            selected: the route already kept only ``policy.heads``, ``policy.rows`` and ``policy.keys``.
            graph_tensor: with ``keep_grad``, the tensor of the autograd graph
                that holds these weights (``weights`` itself or its base); its
                gradient lands in ``gradients[name]`` at the same call index.
            gradient_scale: the gradient with respect to ``weights`` is
                ``graph_tensor``'s times this (same shape as ``graph_tensor``):
                weights before dropout, ``graph_tensor`` the ones after it.
            value: with ``keep_values``, the call's value vectors ``(batch, kv_heads,
                key, head_dim)``, or ``None`` where the route does not see them.

        Raises:
            AttentionHookerError: when ``policy.heads`` names a head the layer lacks.
        """
        p = self.policy
        if p.heads is not None and not selected:
            weights = select_heads(weights, p.heads, name)
        if not selected:
            weights = _select_positions(weights, 2, p.rows, name, "rows")  # (B, H, rows, K)
            weights = _select_positions(weights, 3, p.keys, name, "keys")  # (B, H, rows, keys)
        if self.keeps_elsewhere:
            partial = self.partial(name)
            begin_partial(partial, weights.shape, p.dtype or weights.dtype)
            partial.add(weights.detach(), torch.arange(weights.shape[2]), weights.shape[2])
            self.commit_partial(name, partial)
            return
        stored = self._place(weights.detach(), self.allocator(name))
        with self._lock:
            self._append(name, stored, weights if graph_tensor is None else graph_tensor, gradient_scale, value)

    @property
    def keeps_elsewhere(self) -> bool:
        """Whether calls go to a reducer or a stream instead of ``values``."""
        return self.reducer is not None or self.stream is not None

    def partial(self, name: str):
        """The partial call of ``name`` for the keepers in use (one, or both through a fan-out)."""
        parts = [make(name) for make in (self.reducer, self.stream) if make is not None]
        return parts[0] if len(parts) == 1 else Fanout(parts)

    def commit_partial(self, name: str, partial) -> None:
        """Merges a reduced call of ``name`` (see ``reducer``); nothing is kept in ``values``."""
        with self._lock:
            self.calls_seen[name] = self.calls_seen.get(name, 0) + 1
            partial.commit()

    def _append(self, name: str, stored: torch.Tensor, graph_tensor: torch.Tensor, gradient_scale=None,
                value=None) -> None:
        p = self.policy
        kept = self.wants(name)
        self.calls_seen[name] = self.calls_seen.get(name, 0) + 1
        if not kept:
            return
        calls = self.values.get(name)
        if calls is None:
            calls = self._insert_layer(name)
        calls.append(stored)
        if p.keep_grad:
            self._watch_gradient(name, stored, graph_tensor, gradient_scale)
        if p.keep_values:
            if name not in self.value_vectors:
                self.value_vectors[name] = []
                order = [n for n in self.values if n in self.value_vectors]  # model order, as values
                for n in order:
                    self.value_vectors[n] = self.value_vectors.pop(n)
            self.value_vectors[name].append(None if value is None else self._place(value.detach()))
        if p.max_calls is not None and len(calls) > p.max_calls:
            del calls[0]  # keep == "last"
            if p.keep_grad:
                del self.gradients[name][0]
            if p.keep_values:
                del self.value_vectors[name][0]

    def _place(self, tensor: torch.Tensor, allocate: Callable = None) -> torch.Tensor:
        """The tensor on the policy's device and dtype: itself, or a copy (from ``allocate``)."""
        if self.stores_as_computed(tensor.dtype, tensor.device):
            return tensor
        p = self.policy
        placed = (allocate or empty)(tensor.shape, p.dtype if p.dtype is not None else tensor.dtype,
                               p.device if p.device is not None else tensor.device)
        return placed.copy_(tensor)

    def _watch_gradient(self, name: str, stored: torch.Tensor, graph_tensor, scale=None) -> None:
        """Fills ``gradients[name][i]`` when backward reaches ``graph_tensor`` (a tensor, or a
        :class:`GradientSource`)."""
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
            slot[0] = self._place(grad.reshape(stored.shape))

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


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` in the ``allocate(shape, dtype, device)`` form the store takes."""
    return torch.empty(shape, dtype=dtype, device=device)


def _select_positions(weights: torch.Tensor, dim: int, selection, layer: str, axis: str) -> torch.Tensor:
    """``weights`` keeping the query rows (``dim`` 2) or keys (``dim`` 3) of ``selection``."""
    if selection is None:
        return weights
    index = resolve_rows(selection, weights.shape[dim], f"layer {layer!r}", axis)
    return weights.index_select(dim, torch.tensor(index, device=weights.device))


def select_heads(weights: torch.Tensor, heads: Sequence[int], layer: str) -> torch.Tensor:
    """Keeps the given heads of ``(batch, heads, query, key)`` weights, as a compact copy.

    Raises:
        AttentionHookerError: when a head index is out of range.
    """
    index = torch.tensor(check_heads(heads, weights.shape[1], f"layer {layer!r}"), device=weights.device)
    return weights.index_select(1, index)
