"""``device="auto"``: where a call's weights are kept, decided against a share of the device's memory.

Weights computed on the CPU stay on the CPU. Weights computed on an accelerator stay there
while what the capture holds on it stays within :data:`AUTO_DEVICE_SHARE` of the memory that
was free, or already the capture's, when the forward began; the call that would pass it goes
to the CPU (through pinned, double-buffered copies: :mod:`.host_copy`), and so does every later
call, until the capture lets go of what it holds there (``clear()``): a layer's calls are never
back and forth between devices. On a machine without an accelerator, ``"auto"`` is ``"cpu"``.

The budget is read once per forward (at the first call that asks), so that every call of
one forward is judged against the same figure, and the decision for a call does not change
between the moment its weights are computed and the moment they are kept. The requests of a
serving engine share their capture's budget.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional

import torch

__all__ = ["AUTO", "AUTO_DEVICE_SHARE", "DeviceBudget", "free_device_memory"]

AUTO = "auto"
AUTO_DEVICE_SHARE = 0.5  # of the device memory free (or ours) when a forward begins
_CPU = torch.device("cpu")


def free_device_memory(device: torch.device) -> Optional[int]:
    """Bytes a new tensor on ``device`` can take: the driver's free memory plus what torch's
    caching allocator holds unused. ``None`` where this cannot be read (the weights then go to
    the CPU)."""
    try:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        if device.type == "xpu" and hasattr(torch, "xpu"):
            free, _total = torch.xpu.mem_get_info(device)
            return int(free)
        if device.type == "mps" and hasattr(torch, "mps"):
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    except (RuntimeError, AttributeError):
        return None
    return None


class DeviceBudget:
    """How many bytes of weights a keeper holds on each accelerator, and where the next call goes.

    Args:
        share: the share of the device memory free (or this keeper's) at a forward's start
            that the kept weights may take.
        free_memory: ``free_memory(device)`` in bytes, or ``None`` when unknown
            (:func:`free_device_memory`; tests give their own).

    Example:
        >>> budget = DeviceBudget(free_memory=lambda device: 1000)
        >>> gpu = torch.device("cuda", 0)
        >>> budget.target(gpu, 400)
        device(type='cuda', index=0)
        >>> budget.kept(gpu, 400); budget.target(gpu, 200), budget.target(gpu, 50)
        (device(type='cpu'), device(type='cpu'))
        >>> budget.released({gpu: 400}); budget.target(gpu, 50)
        device(type='cuda', index=0)
    """

    def __init__(self, share: float = AUTO_DEVICE_SHARE,
                 free_memory: Callable[[torch.device], Optional[int]] = free_device_memory):
        self._share = share
        self._free_memory = free_memory
        self._held: Dict[torch.device, int] = {}
        self._limit: Dict[torch.device, int] = {}  # read once per forward
        self._spilled: set = set()  # devices a call was sent away from: later calls go to the CPU too
        self._lock = threading.Lock()

    def begin_forward(self) -> None:
        """The next call reads the device's free memory again."""
        with self._lock:
            self._limit.clear()

    def target(self, computed_on: torch.device, nbytes: int) -> torch.device:
        """Where a call of ``nbytes`` computed on ``computed_on`` is kept: there, while the
        bytes held there with it stay within the budget; else the CPU."""
        if computed_on.type in ("cpu", "meta"):
            return computed_on
        with self._lock:
            if computed_on in self._spilled:
                return _CPU
            held = self._held.get(computed_on, 0)
            limit = self._limit.get(computed_on)
            if limit is None:
                free = self._free_memory(computed_on)
                limit = -1 if free is None else int(self._share * (free + held))  # unknown: the CPU
                self._limit[computed_on] = limit
            if held + nbytes <= limit:
                return computed_on
            self._spilled.add(computed_on)
            return _CPU

    def kept(self, device: torch.device, nbytes: int) -> None:
        """``nbytes`` more (or fewer, when negative: a call pushed out by ``keep="last"``) held
        on ``device``."""
        if device.type in ("cpu", "meta"):
            return
        with self._lock:
            self._held[device] = max(0, self._held.get(device, 0) + nbytes)

    def released(self, counted: Dict[torch.device, int]) -> None:
        """A keeper let go of all it held (``{device: bytes}``, as it counted them): calls may
        stay on every device where nothing is held any more (also where a call too large for
        the budget alone was sent away)."""
        with self._lock:
            for device, nbytes in counted.items():
                self._held[device] = max(0, self._held.get(device, 0) - nbytes)
            self._spilled = {device for device in self._spilled if self._held.get(device, 0) > 0}
