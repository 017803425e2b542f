"""One call of a streamed capture being written, a block of query rows at a time.

Small calls gather in a buffer ``(batch, heads, rows, key)`` and go to their forward's
shard when committed; a call of ``shard_bytes`` or more gets a file of its own, reserved
before its first row and written tile by tile as the rows are computed (memory holds a
tile, never the call). Every failure marks the forward it belongs to (see
``keep/stream.py``) and is raised as the library's error.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch

from ..errors import AttentionHookerError
from .stream_folder import SAFETENSORS_DTYPES, raw_bytes

__all__ = ["StreamedCall"]


class StreamedCall:
    """One call being written: its rows arrive in order, a block at a time.

    A call with a file of its own owns that file's descriptor: it closes it when committed
    or discarded, and nothing else does (a capture closed from another thread meanwhile
    leaves it to finish; its file then goes, under this writer's temporary name only).

    Args:
        owner: the :class:`~attention_hooker.keep.stream.StreamedCapture` it belongs to.
        layer: the layer whose call it is.
    """

    takes_narrow_blocks = True  # a causal tile's zeros after its last row's key are never written
    takes_key_bands = True  # nor those before a sliding window's first key

    def __init__(self, owner, layer: str):
        self._owner, self._layer = owner, layer
        self._shape: Optional[Tuple[int, ...]] = None
        self._dtype: Optional[torch.dtype] = None
        self._buffer: Optional[torch.Tensor] = None  # small calls: (B, H, R, K) on the CPU
        self._file: Optional[Tuple[str, int, int]] = None  # large calls: (file name, data offset, fd)
        self._unit = None  # the forward it belongs to, which discards it when rolled back
        self._row = 0

    def begin(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        """Told before the first block: the stored ``(batch, heads, rows, key)`` and dtype."""
        with self._owner.failing_forward():
            self._begin(shape, dtype)

    def _begin(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        self._shape = tuple(int(n) for n in shape)
        self._dtype = dtype if dtype in SAFETENSORS_DTYPES else torch.float32
        if self._owner.closed:  # closed from another thread: this call is dropped as it comes
            return
        nbytes = math.prod(self._shape) * torch.empty((), dtype=self._dtype).element_size()
        self._owner.plan_first_call(nbytes)
        self._owner.dtypes.add(str(self._dtype).replace("torch.", ""))
        if nbytes >= self._owner.shard_bytes:
            self._file = self._owner.open_call_file(self._layer, self._shape, self._dtype)
            self._unit = self._owner.current_unit()
            if self._unit is not None:
                self._unit.open_calls.add(self)
        else:
            self._buffer = torch.empty(self._shape, dtype=self._dtype)

    def write(self, rows: torch.Tensor, block: torch.Tensor, first_key: int = 0) -> None:
        """Writes the next ``block`` ``(batch, heads, r, width)`` of query rows: keys ``first_key ..
        first_key + width - 1`` of them, every other key zero."""
        del rows  # rows arrive in order; the stored shape was given to begin()
        with self._owner.failing_forward():
            self._add(block, int(first_key))

    def _add(self, block: torch.Tensor, lo: int) -> None:
        first, last = self._row, self._row + block.shape[2]
        if (last > self._shape[2] or tuple(block.shape[:2]) != self._shape[:2] or lo < 0
                or lo + block.shape[3] > self._shape[3]):
            self.discard()
            raise AttentionHookerError(
                f"a block {tuple(block.shape)} at row {first}, key {lo} does not fit the call {self._shape} of "
                f"{self._layer!r}")
        hi = lo + block.shape[3]  # the keys outside lo .. hi are zeros (a narrow block, a band)
        if self._buffer is not None:
            self._buffer[:, :, first:last, lo:hi].copy_(block.detach())
            self._buffer[:, :, first:last, :lo].zero_()
            self._buffer[:, :, first:last, hi:].zero_()
        elif self._file is not None:
            self._write_rows(block.detach().to("cpu", self._dtype), first, lo)
        self._row = last

    def _write_rows(self, block: torch.Tensor, first: int, lo: int = 0) -> None:
        """Writes rows ``first ..`` of each item and head: one write per item and head, or, for a
        narrow block or a band, one per row, of its keys ``lo .. lo + width - 1`` only. The call's file
        was reserved whole (it reads zeros where nothing is written), so a causal map's zeros (and a
        sliding window's) are never written."""
        name, data_offset, fd = self._file
        _, heads, n_rows, n_key = self._shape
        row_bytes = n_key * block.element_size()
        block = block.contiguous()
        width_bytes = block.shape[3] * block.element_size()
        skip = lo * block.element_size()
        if not width_bytes:  # rows whose every key is masked: the reserved file's zeros are theirs
            return
        try:
            for b in range(block.shape[0]):
                for h in range(block.shape[1]):
                    start = data_offset + ((b * heads + h) * n_rows + first) * row_bytes
                    data = raw_bytes(block[b, h])
                    if width_bytes == row_bytes:
                        os.pwrite(fd, data, start)
                        continue
                    for i in range(block.shape[2]):
                        os.pwrite(fd, data[i * width_bytes:(i + 1) * width_bytes], start + i * row_bytes + skip)
        except OSError as err:
            self.discard()
            raise self._owner.disk.error(f"writing rows {first}-{first + block.shape[2] - 1} of a call of layer "
                                         f"{self._layer!r} into {name}", err) from err

    def commit(self) -> None:
        """Hands the finished call to the capture (under the router's lock, in call order)."""
        with self._owner.failing_forward():
            self._commit()

    def _commit(self) -> None:
        if self._row != self._shape[2]:
            self.discard()
            raise AttentionHookerError(f"a call of {self._layer!r} ended after {self._row} of {self._shape[2]} rows")
        nbytes = math.prod(self._shape) * torch.empty((), dtype=self._dtype).element_size()
        name = None
        if self._file is not None:
            name, _, fd = self._file
            self._close_file()
            if not self._owner.finish_call_file(name, self._layer):
                return  # the capture was closed meanwhile
        elif self._buffer is None:
            return  # begun after the capture was closed
        self._owner.commit_call(self._layer, self._buffer, name, nbytes)
        self._buffer = None

    def discard(self) -> None:
        """Drops a call that will not be kept (its layer call was refused, or cut short); safe twice."""
        if self._file is not None:
            name = self._file[0]
            self._close_file()
            self._owner.disk.remove(name, temporary=True)
        self._buffer = None

    def _close_file(self) -> None:
        _, _, fd = self._file
        self._file = None
        if self._unit is not None:
            self._unit.open_calls.discard(self)
        os.close(fd)
