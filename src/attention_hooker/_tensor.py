"""Small helpers that turn user input into numpy arrays with checked shapes."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from ._per_window import refuse_per_window
from .errors import AttentionHookerError

__all__ = ["to_numpy", "as_heads", "as_batched", "require_4d", "values_of", "require_positions", "on_one_device"]


def on_one_device(tensors: Sequence) -> list:
    """``tensors`` (``None`` entries kept) on one device: as they are when they share one, else
    all on the CPU, where every device's tensors can meet (a capture with ``device="auto"``
    keeps the calls that passed its GPU budget on the CPU; a model split over GPUs computes its
    layers on several).

    Example:
        >>> import torch
        >>> [t.device.type for t in on_one_device([torch.zeros(1), None, torch.ones(1)]) if t is not None]
        ['cpu', 'cpu']
    """
    devices = {t.device for t in tensors if t is not None}
    if len(devices) <= 1:
        return list(tensors)
    from ._map_kinds import kind_of, mark_kind

    moved = []
    for t in tensors:
        copy = None if t is None else t.cpu()
        if copy is not None and copy is not t:
            mark_kind(copy, kind_of(t))  # a per-window or non-probability map stays marked as one
        moved.append(copy)
    return moved


def to_numpy(x) -> np.ndarray:
    """A float numpy array from a torch tensor (any device/dtype) or array-like."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.number):
        raise AttentionHookerError(f"expected attention weights as a tensor or array of numbers, got {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def as_heads(attn, *, batch_index: int = 0, where: str = "attention") -> np.ndarray:
    """``(batch, heads, query, key)``, ``(heads, query, key)`` or ``(query, key)`` -> ``(heads, query, key)``.

    Raises:
        AttentionHookerError: on another number of dims or a batch index out of range.
    """
    if isinstance(batch_index, bool) or not isinstance(batch_index, (int, np.integer)):
        raise AttentionHookerError(f"batch_index={batch_index!r} must be an int (which batch item)")
    refuse_per_window(attn, where)
    arr = to_numpy(attn)
    if arr.ndim == 4:
        if not -arr.shape[0] <= batch_index < arr.shape[0]:
            raise AttentionHookerError(
                f"batch_index={batch_index} is out of range for {where} with batch size {arr.shape[0]}"
            )
        return arr[batch_index]
    if arr.ndim == 3:
        return arr
    if arr.ndim == 2:
        return arr[None]
    raise AttentionHookerError(
        f"Wrong shape for {where}: expected (batch, heads, query, key) or (heads, query, key). "
        f"Received {arr.ndim}-dim array of shape {tuple(arr.shape)}."
    )


def require_positions(shape, where: str) -> None:
    """Views need at least one query and one key position to draw.

    Raises:
        AttentionHookerError: naming ``where`` and the empty shape.
    """
    if 0 in tuple(shape)[-2:]:
        raise AttentionHookerError(
            f"{where} has no query or key positions (shape {tuple(shape)}): nothing to draw; "
            "was the input empty, or did it tokenize to nothing?"
        )


def values_of(source, *, layers: Optional[Sequence[str]] = None, require: bool = True) -> dict:
    """``{layer_name: [tensor per call]}`` from a hooker, a loaded capture or a mapping.

    Args:
        source: an object with a ``values`` mapping, or the mapping itself.
        layers: keep only these layer names, in this order.
        require: raise when no layer holds any call.

    Raises:
        AttentionHookerError: on another type, an unknown layer, or nothing captured.
    """
    values = source if isinstance(source, Mapping) else getattr(source, "values", None)
    if not isinstance(values, Mapping):
        raise AttentionHookerError(
            f"expected a hooker, a loaded capture or {{layer_name: [tensor per call]}}, got {type(source).__name__}"
        )
    if layers is not None:
        unknown = [name for name in layers if name not in values]
        if unknown:
            raise AttentionHookerError(f"unknown layer(s) {unknown}; known layers: {list(values)}")
        values = {name: values[name] for name in layers}
    values = {name: calls for name, calls in values.items() if len(calls)}
    if require and not values:
        raise AttentionHookerError("nothing to show: the capture holds no attention (run the model with hooks on first)")
    return values


def as_batched(attn, where: str = "attention"):
    """A torch tensor ``(batch, heads, query, key)``; ``(heads, query, key)`` gets batch 1.

    Raises:
        AttentionHookerError: on another number of dims, naming ``where`` and the shape.
    """
    import torch

    a = attn if isinstance(attn, torch.Tensor) else torch.as_tensor(attn)
    if a.dim() == 3:
        a = a.unsqueeze(0)
    require_4d(a, where)
    return a


def require_4d(a, where: str) -> None:
    """The one shape check of an attention tensor: ``(batch, heads, query, key)``.

    Raises:
        AttentionHookerError: on another number of dims, or a call kept per window
            (``(batch * windows, heads, N, N)``, see :mod:`attention_hooker._per_window`),
            naming ``where`` and the shape.
    """
    refuse_per_window(a, where)
    if a.dim() != 4:
        raise AttentionHookerError(
            f"Wrong shape for {where}: expected 4 dims (batch, heads, query, key). "
            f"Received {a.dim()}-dim tensor of shape {tuple(a.shape)}."
        )
