"""What the hooker keeps: per-layer call lists and the storage policy.

Every stored tensor has shape ``(batch, heads, query, key)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .errors import AttentionHookerError

__all__ = ["StoragePolicy", "AttentionValues", "AttentionStore"]

_KEEP_CHOICES = ("first", "last")


@dataclass(frozen=True)
class StoragePolicy:
    """How captured weights are stored.

    Attributes:
        device: where stored tensors go (``"cpu"`` by default); ``None`` keeps them
            on the device they were computed on.
        dtype: stored floating dtype (``torch.float16`` halves memory); ``None``
            keeps the dtype the weights were computed in.
        heads: indices of the heads to keep; ``None`` keeps every head.
        max_calls: how many calls to keep per layer; ``None`` keeps all.
        keep: with ``max_calls``, ``"first"`` keeps the first calls (later ones are
            not computed at all) and ``"last"`` keeps the most recent ones.
        keep_grad: also keep the gradient of the loss with respect to each stored
            call's weights, filled in by ``backward()``.
    """

    device: Optional[torch.device] = torch.device("cpu")
    dtype: Optional[torch.dtype] = None
    heads: Optional[Tuple[int, ...]] = None
    max_calls: Optional[int] = None
    keep: str = "first"
    keep_grad: bool = False

    @classmethod
    def build(
        cls,
        *,
        device,
        dtype,
        heads: Optional[Sequence[int]],
        max_calls: Optional[int],
        keep: str,
        keep_grad: bool,
    ) -> "StoragePolicy":
        """Validates user options and returns a policy.

        Raises:
            AttentionHookerError: when an option has the wrong type or value.
        """
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as err:
                raise AttentionHookerError(
                    f"device={device!r} is not a torch device: {err}; expected e.g. 'cpu', 'cuda:0' or None"
                ) from None
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise AttentionHookerError(
                f"dtype={dtype!r} is not a floating torch dtype; expected e.g. torch.float16, torch.float32 or None"
            )
        if heads is not None:
            if isinstance(heads, int):
                heads = (heads,)
            try:
                heads = tuple(int(h) for h in heads)
            except (TypeError, ValueError):
                raise AttentionHookerError(
                    f"heads={heads!r} is not a sequence of head indices; expected e.g. [0, 3] or None"
                ) from None
            if not heads or any(h < 0 for h in heads):
                raise AttentionHookerError(
                    f"heads={heads!r} must be a non-empty sequence of non-negative head indices"
                )
        if max_calls is not None and (isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1):
            raise AttentionHookerError(f"max_calls={max_calls!r} must be a positive int or None")
        if keep not in _KEEP_CHOICES:
            raise AttentionHookerError(f"keep={keep!r} must be one of {_KEEP_CHOICES}")
        return cls(device, dtype, heads, max_calls, keep, bool(keep_grad))


class AttentionValues(dict):
    """``{layer_name: [tensor per call]}``, each tensor ``(batch, heads, query, key)``.

    A plain ``dict`` with a one-line ``repr`` that says how much it holds.
    """

    def __repr__(self) -> str:
        calls = sum(len(v) for v in self.values())
        return f"AttentionValues({len(self)} layers, {calls} calls, {_format_bytes(self.nbytes)})"

    @property
    def nbytes(self) -> int:
        """Bytes held by all stored tensors."""
        return sum(t.numel() * t.element_size() for v in self.values() for t in v if t is not None)


def _format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


class AttentionStore:
    """Applies a :class:`StoragePolicy` and keeps the calls of every layer in model order.

    Args:
        policy: the storage policy.
        layer_order: every hooked layer name, in model order; ``values`` keeps this order.
    """

    def __init__(self, policy: StoragePolicy, layer_order: Sequence[str]):
        self.policy = policy
        self._rank = {name: i for i, name in enumerate(layer_order)}
        self.values = AttentionValues()
        self.gradients: dict = {}  # with keep_grad: {name: [[grad or None] per call]}
        self.calls_seen: dict = {}
        self._spare: Dict[tuple, List[torch.Tensor]] = {}  # cleared buffers nobody else holds
        self._scratch: Dict[tuple, torch.Tensor] = {}  # working tensors, copied from before reuse

    def clear(self) -> None:
        """Forgets every stored tensor and call count.

        Tensors that nothing outside the store still references (no variable,
        view, or numpy array of them) are kept as spare buffers for the next
        calls, which then skip the cost of fresh memory. Spares left unused
        since the previous ``clear()`` are freed, so they never hold more than
        one clear's worth; :meth:`release_spares` frees them all (the hooker
        does on ``remove_hooks()``).
        """
        spares: Dict[tuple, List[torch.Tensor]] = {}
        for calls in self.values.values():
            for tensor in calls:
                if _only_the_store_holds(tensor):
                    spares.setdefault(_buffer_key(tensor.shape, tensor.dtype, tensor.device), []).append(tensor)
                del tensor
        self._spare = spares
        self.release_scratch()
        self.values.clear()
        self.gradients.clear()
        self.calls_seen.clear()

    @property
    def spare_bytes(self) -> int:
        """Bytes held as spare buffers."""
        return sum(t.numel() * t.element_size() for ts in self._spare.values() for t in ts)

    def release_spares(self) -> None:
        """Frees the spare buffers kept by :meth:`clear` and the scratch tensors."""
        self._spare.clear()
        self.release_scratch()

    def scratch(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A working tensor for weights that :meth:`record` copies (into another dtype
        or device) before the next call needs it: one per shape, reused by every
        layer instead of fresh memory per call; freed by :meth:`release_scratch`."""
        key = _buffer_key(shape, dtype, device)
        tensor = self._scratch.get(key)
        if tensor is None:
            tensor = self._scratch[key] = torch.empty(shape, dtype=dtype, device=device)
        return tensor

    def release_scratch(self) -> None:
        """Frees the scratch tensors (the hooker does at the end of each model forward)."""
        self._scratch.clear()

    def buffer(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor to store into: a spare one when there is one."""
        spares = self._spare.get(_buffer_key(shape, dtype, device))
        if spares:
            return spares.pop()
        return torch.empty(shape, dtype=dtype, device=device)

    def stores_as_computed(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether weights computed with this dtype and device are stored as they are."""
        p = self.policy
        return (p.dtype is None or p.dtype == dtype) and (p.device is None or p.device == device)

    def wants(self, name: str) -> bool:
        """Whether the next call of ``name`` would be kept (lets routes skip work)."""
        p = self.policy
        return p.max_calls is None or p.keep == "last" or self.calls_seen.get(name, 0) < p.max_calls

    def skip(self, name: str) -> None:
        """Counts a call that was not computed because :meth:`wants` said no."""
        self.calls_seen[name] = self.calls_seen.get(name, 0) + 1

    def record(
        self,
        name: str,
        weights: torch.Tensor,
        *,
        heads_selected: bool = False,
        graph_tensor: Optional[torch.Tensor] = None,
    ) -> None:
        """Stores one call's weights for ``name``.

        Args:
            name: the layer name.
            weights: ``(batch, heads, query, key)``.
            heads_selected: the route already kept only ``policy.heads``.
            graph_tensor: with ``keep_grad``, the tensor of the autograd graph
                that holds these weights (``weights`` itself or its base); its
                gradient lands in ``gradients[name]`` at the same call index.

        Raises:
            AttentionHookerError: when ``policy.heads`` names a head the layer lacks.
        """
        p = self.policy
        kept = self.wants(name)
        self.calls_seen[name] = self.calls_seen.get(name, 0) + 1
        if not kept:
            return
        if p.heads is not None and not heads_selected:
            weights = select_heads(weights, p.heads, name)
        stored = self._place(weights.detach())
        calls = self.values.get(name)
        if calls is None:
            calls = self._insert_layer(name)
        calls.append(stored)
        if p.keep_grad:
            self._watch_gradient(name, stored, graph_tensor if graph_tensor is not None else weights)
        if p.max_calls is not None and len(calls) > p.max_calls:
            del calls[0]  # keep == "last"
            if p.keep_grad:
                del self.gradients[name][0]

    def _place(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor on the policy's device and dtype: itself, or a copy into a buffer."""
        if self.stores_as_computed(tensor.dtype, tensor.device):
            return tensor
        p = self.policy
        out = self.buffer(
            tensor.shape, p.dtype if p.dtype is not None else tensor.dtype, p.device if p.device is not None else tensor.device
        )
        return out.copy_(tensor)

    def _watch_gradient(self, name: str, stored: torch.Tensor, graph_tensor: torch.Tensor) -> None:
        """Fills ``gradients[name][i]`` when backward reaches ``graph_tensor``."""
        slots = self.gradients.setdefault(name, [])
        slot = [None]
        slots.append(slot)
        if not graph_tensor.requires_grad:
            return

        def keep(grad: torch.Tensor) -> None:
            slot[0] = self._place(grad.detach().reshape(stored.shape))

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


def _buffer_key(shape, dtype: torch.dtype, device: torch.device) -> tuple:
    return tuple(shape), dtype, torch.device(device)


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _only_the_store_holds(tensor: torch.Tensor) -> bool:
    """True when the store's list holds the only reference to ``tensor`` and its memory.

    Counts Python references (the list, the caller's loop variable, and this
    call's argument) and the storage's own use count (the tensor, plus the
    temporary storage object made to ask), so a view or a numpy array of it
    also counts as a holder. Where torch lacks the counter, nothing is reused.
    """
    if _storage_use_count is None or tensor.requires_grad or tensor._base is not None:
        return False
    if sys.getrefcount(tensor) > 4:  # list + loop variable + argument + getrefcount's own
        return False
    try:
        return _storage_use_count(tensor.untyped_storage()._cdata) <= 2
    except (AttributeError, RuntimeError):
        return False


def select_heads(weights: torch.Tensor, heads: Sequence[int], layer: str) -> torch.Tensor:
    """Keeps the given heads of ``(batch, heads, query, key)`` weights, as a compact copy.

    Raises:
        AttentionHookerError: when a head index is out of range.
    """
    n_heads = weights.shape[1]
    bad = [h for h in heads if h >= n_heads]
    if bad:
        raise AttentionHookerError(
            f"heads={list(heads)} names head(s) {bad}, but layer {layer!r} has {n_heads} heads "
            f"(indices 0..{n_heads - 1})"
        )
    index = torch.tensor(heads, device=weights.device)
    return weights.index_select(1, index)
