"""Copies from an accelerator into CPU memory at the bus's speed: pinned, double-buffered, on a side stream.

A plain ``cpu_tensor.copy_(cuda_tensor)`` goes through pageable memory: the driver stages it
in small pinned pieces of its own, one after the other, and the computing stream waits for
all of it (2-3 GB/s where pinned copies run at 10-25 GB/s). :class:`HostCopies` instead takes
each source in pieces of at most :data:`STAGING_BYTES`, and for each piece:

1. copies it on the computing stream into one of two device buffers (converted to the
   destination's dtype there: a float16 store moves half the bytes over the bus);
2. copies that buffer on a side stream into one of two pinned host buffers;
3. later, when that pair of buffers is needed again (or at :meth:`HostCopies.finish`), waits
   for step 2 and copies the pinned buffer into its place on the CPU.

While the CPU places piece ``i``, the side stream moves piece ``i + 1`` and the computing
stream goes on with what follows (the next tile). A source may be overwritten by the
computing stream as soon as :meth:`HostCopies.copy` returns: step 1 is ordered before it.

On a CPU source the same pieces go through ordinary buffers, at once (no stream): the
bookkeeping is the same, and this is how it is tested on machines without an accelerator.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch

__all__ = ["HostCopies", "copy_to_host", "STAGING_BYTES", "DIRECT_BYTES"]

STAGING_BYTES = 32 * 2**20  # one piece: large enough for the bus's full speed, small enough to overlap
DIRECT_BYTES = 2**20  # below this a plain copy_ costs less than the staging


class _Slot:
    """One of the two buffer pairs: a device buffer, a pinned host buffer, and the piece in flight."""

    def __init__(self):
        self.stage: Optional[torch.Tensor] = None  # (n,) on the device, the destination's dtype
        self.host: Optional[torch.Tensor] = None  # (n,) pinned, the destination's dtype
        self.done = None  # the side stream's event after its copy into ``host``
        self.pending: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (destination, its piece in ``host``)


class HostCopies:
    """Copies from tensors on ``device`` into CPU tensors, two pieces in flight at a time.

    Args:
        device: where the sources are (``cuda``; any other device copies at once).
        staging_bytes: the largest piece (each of the four buffers holds one; they are made
            as large as the pieces that come, up to this).

    Example:
        >>> copies = HostCopies(torch.device("cpu"), staging_bytes=64)
        >>> source, target = torch.arange(48.).reshape(2, 3, 8), torch.zeros(2, 3, 8, dtype=torch.float16)
        >>> copies.copy(target, source); copies.finish()
        >>> bool((target == source).all())
        True
    """

    def __init__(self, device: torch.device, staging_bytes: int = STAGING_BYTES):
        self._device = torch.device(device)
        self._streamed = self._device.type == "cuda"
        self._bytes = max(1, int(staging_bytes))
        self._slots: List[_Slot] = [_Slot(), _Slot()]
        self._next = 0  # the slot the next piece takes: the one whose piece is the older
        self._side = torch.cuda.Stream(self._device) if self._streamed else None

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        """Copies ``source`` (on the device) into ``target`` (on the CPU, any strides, same
        shape; converted to its dtype); complete once :meth:`finish` returns."""
        if tuple(target.shape) != tuple(source.shape):
            raise ValueError(f"copy of {tuple(source.shape)} into {tuple(target.shape)}: the shapes differ")
        for target_piece, source_piece in _pieces(target, source, self._bytes // target.element_size()):
            self._put(target_piece, source_piece)

    def finish(self) -> None:
        """Waits for every piece and places it: the targets hold their values after this."""
        for slot in (self._slots[self._next], self._slots[1 - self._next]):  # the older piece first
            self._settle(slot)

    def _put(self, target: torch.Tensor, source: torch.Tensor) -> None:
        n = source.numel()
        if not n:  # a band whose keys are all masked: nothing to move
            return
        slot = self._slots[self._next]
        self._next = 1 - self._next
        self._settle(slot)  # its buffers are free again
        if slot.host is None or slot.host.numel() < n or slot.host.dtype != target.dtype:
            # as large as the pieces that come (a call's tiles are alike), not the largest allowed
            try:
                slot.host = torch.empty(n, dtype=target.dtype, pin_memory=self._streamed)
                slot.stage = torch.empty(n, dtype=target.dtype, device=self._device) if self._streamed else None
            except RuntimeError:  # no pinned (or device) memory to be had: the plain copy, as before
                slot.host = slot.stage = None
                target.copy_(source)
                return
            if self._streamed:
                slot.stage.record_stream(self._side)  # freed, it waits for the side stream's last copy
        host = slot.host[:n].view(source.shape)
        if self._streamed:
            stage = slot.stage[:n].view(source.shape)
            stage.copy_(source)  # on the computing stream: the source is free once this is queued
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(self._side):
                self._side.wait_event(ready)
                host.copy_(stage, non_blocking=True)
                slot.done = torch.cuda.Event()
                slot.done.record(self._side)
        else:
            host.copy_(source)
        slot.pending = (target, host)

    @staticmethod
    def _settle(slot: _Slot) -> None:
        if slot.pending is None:
            return
        if slot.done is not None:
            slot.done.synchronize()
            slot.done = None
        target, host = slot.pending
        slot.pending = None
        target.copy_(host)


def _pieces(target: torch.Tensor, source: torch.Tensor, most: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(target piece, source piece)`` pairs covering both, each of at most ``most`` elements
    (at least one): slices along the first dimension, or, where one index of it is already
    larger, the pieces of each index's sub-tensor."""
    most = max(1, most)
    if source.numel() <= most or source.dim() == 0:
        yield target, source
        return
    first = source.shape[0]
    each = source.numel() // first  # elements under one index of the first dimension
    if each <= most:
        step = most // each
        for start in range(0, first, step):
            yield target[start:start + step], source[start:start + step]
        return
    for index in range(first):
        yield from _pieces(target[index], source[index], most)


def copy_to_host(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``target.copy_(source)``; from a CUDA tensor of at least :data:`DIRECT_BYTES` into a CPU
    one, through :class:`HostCopies`. Returns ``target``, complete."""
    if (target.device.type != "cpu" or source.device.type != "cuda"
            or source.numel() * target.element_size() < DIRECT_BYTES):
        return target.copy_(source)
    copies = HostCopies(source.device)
    copies.copy(target, source)
    copies.finish()
    return target
