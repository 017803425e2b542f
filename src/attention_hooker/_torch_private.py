"""Every private torch or CPython API the library uses, each behind one small function.

Each is checked on torch 2.1-2.14 and CPython 3.9-3.13, and pinned by
``tests/test_torch_private.py``, which fails when a release moves or changes one. Nothing
else in the package touches ``torch._C``, private tensor methods, frames or reference
counts: a change in torch lands here and in that test, nowhere else.
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional

import torch

__all__ = ["tracing_state_active", "in_backward", "softmax_last_dim_into", "log_softmax_last_dim_into", "function_mode_stack",
           "take_mode_out", "REFCOUNTS_SUPPORTED", "refcount", "tensor_use_count", "storage_use_count",
           "caller_frame", "frame_local", "no_function_modes"]

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)

REFCOUNTS_SUPPORTED = _storage_use_count is not None and hasattr(torch.Tensor, "_use_count")
"""Whether :func:`tensor_use_count` and :func:`storage_use_count` can answer (else memory is never reused)."""


def tracing_state_active() -> bool:
    """Whether ``torch.jit.trace`` is tracing on this thread (``torch._C._get_tracing_state``)."""
    return torch._C._get_tracing_state() is not None


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (``torch._C._current_autograd_node``;
    ``False`` where torch lacks it)."""
    current = getattr(torch._C, "_current_autograd_node", None)
    return current is not None and current() is not None


def softmax_last_dim_into(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of a contiguous CPU tensor, written over it
    (``aten._softmax.out``: the CPU kernel reads each element before writing it)."""
    return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


def log_softmax_last_dim_into(scores: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last dim of a contiguous CPU tensor, written into ``out``
    (``aten._log_softmax.out``: no fresh tensor per call)."""
    return torch.ops.aten._log_softmax.out(scores, -1, False, out=out)


def function_mode_stack() -> List[Any]:
    """This thread's torch function modes, innermost last (``torch.overrides._get_current_function_mode_stack``)."""
    return torch.overrides._get_current_function_mode_stack()


def take_mode_out(mode) -> None:
    """Takes ``mode`` off this thread's function-mode stack from under the modes pushed above
    it, which go back in order (``torch._C._pop_torch_function_stack`` / ``_push_on_torch_function_stack``)."""
    above = []
    while True:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)


def refcount(obj) -> int:
    """CPython's reference count of ``obj`` (``sys.getrefcount``; counted alike each time:
    compare it only with a baseline taken through this same function)."""
    return sys.getrefcount(obj)


def tensor_use_count(tensor: torch.Tensor) -> int:
    """How many holders the tensor's ``TensorImpl`` has (``Tensor._use_count``): 1 when only its
    Python object holds it."""
    return tensor._use_count()


def storage_use_count(storage) -> Optional[int]:
    """How many holders a storage's ``StorageImpl`` has (``torch._C._storage_Use_Count`` of
    ``storage._cdata``), or ``None`` where torch lacks it."""
    if _storage_use_count is None:
        return None
    return _storage_use_count(storage._cdata)


def caller_frame(depth: int):
    """The frame ``depth`` calls above the caller of this function (``sys._getframe``)."""
    return sys._getframe(depth + 1)


def frame_local(frame, name: str):
    """A local variable of a running frame, or ``None`` (``frame.f_locals``)."""
    return frame.f_locals.get(name)


def no_function_modes():
    """A context in which no torch function mode (nor tensor subclass) sees a call
    (``torch._C.DisableTorchFunction``): an intervention's own arithmetic, kept out of the
    capture's sight."""
    return torch._C.DisableTorchFunction()
