"""A keeper that writes a capture to disk as its calls arrive: sharded safetensors.

The folder's layout is in ``disk_format.py``. Every tensor is one call's weights
``(batch, heads, query, key)`` (query: the rows kept).

What a reader may rely on:

- **A forward is written whole or not at all.** The calls of one forward of the model
  are listed in ``capture.json`` only once the forward has returned and every one of its
  calls is on disk; a forward that raised (a write error, an error of the model, an
  interrupt) is rolled back: none of its calls is listed, and its files are removed. So
  call ``k`` of every layer comes from the same forward, whatever failed in between.
- **"complete"** is written last, by ``close()``, atomically (written aside, then
  renamed), and only when nothing failed to be written: every forward that returned is
  there. After a write error the capture closes as **"partial"**: what is listed is whole
  (the index names the forwards rolled back, and why), and :func:`attention_hooker.load`
  reads it only when asked (``partial=True``). While it is written it reads "writing".
- **One writer per folder**: ``capture.lock`` is held from before the first byte to the
  last (``folder_lock.py``); a second writer is refused with who holds it.

A plan comes first: before a byte is written, the bytes the capture will write are
weighed against the free space of the folder's disk, and the capture is refused with
both figures when they do not fit. Every write error is an ``AttentionHookerError``
naming the folder, the call and the cause, chained to the OS error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._checks import positive_int, prepare_output_path
from .disk_format import INDEX_NAME, LOG_NAME, STREAM_FORMAT, is_our_file_name, mapped_tensors, read_index
from .errors import AttentionHookerError
from .folder_lock import FolderLock
from .store import _format_bytes

__all__ = ["StreamedCapture", "INDEX_NAME", "mapped_tensors", "format_bytes"]  # mapped_tensors: moved to disk_format

SHARD_BYTES = 256 * 2**20
_MARGIN_BYTES = 64 * 2**20  # left free on the disk for everything else writing there (a tenth of a small disk)
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_FAILURES_LISTED = 100


def format_bytes(n: float) -> str:
    """``12.4 GiB``-style size."""
    return _format_bytes(n, ("B", "KiB", "MiB", "GiB", "TiB"))


class _Unit:
    """What is written whole or not at all: one forward of the model, or one call made
    outside any forward of it."""

    __slots__ = ("number", "calls", "error", "cause", "in_forward")

    def __init__(self, number: int, in_forward: bool):
        self.number = number
        self.calls: List["_Written"] = []
        self.error: Optional[str] = None  # why it cannot be whole: a write of one of its calls failed
        self.cause: Optional[BaseException] = None  # the OS error behind it
        self.in_forward = in_forward


class _Written:
    """One call that reached the capture: where its tensor lies (or waits)."""

    __slots__ = ("layer", "unit", "file", "tensor", "data", "own_file")

    def __init__(self, layer: str, unit: _Unit, data: Optional[torch.Tensor], own_file: Optional[str]):
        self.layer, self.unit, self.data, self.own_file = layer, unit, data, own_file
        self.file: Optional[str] = own_file
        self.tensor: Optional[str] = "attention" if own_file else None


class StreamedCapture:
    """Writes each call a hooker captures into a folder of safetensors files (see the module).

    Made by ``hooker.stream_to(folder)``; it is a keeper of calls like the in-memory
    store, so the hooker's ``heads=``, ``rows=``, ``dtype=`` and ``max_calls=`` apply.
    On the sdpa route a large call is computed a tile of query rows at a time and each
    tile is written as it comes: memory holds one tile, never the call.

    Args:
        folder: where the capture goes (created; it must not hold another capture
            unless ``overwrite``).
        layer_order: the hooked layer names in model order (``capture.json`` keeps it).
        hooked_layers: how many layers may write calls (for the plan).
        calls_per_layer: how many calls each layer is expected to write (for the plan).
        shard_bytes: calls smaller than this are gathered into one shard per forward;
            larger ones are written into a file of their own, tile by tile.
        expected_bytes: the bytes the capture will write, when the caller knows them
            (the command line computes them from the model's configuration): the plan
            is then checked at once, before the model runs.
        overwrite: replace a capture already in ``folder`` (only our own files are removed).
        metadata: model class and selection, kept in ``capture.json``.

    Attributes:
        written: bytes of attention written so far.
        calls: ``{layer_name: calls listed}``.
        state: ``"writing"``, then ``"complete"`` or ``"partial"`` once closed.

    Raises:
        AttentionHookerError: when the folder holds another capture, another writer
            holds it, it cannot be written, or the plan does not fit the free space.
    """

    def __init__(self, folder, *, layer_order: Sequence[str], hooked_layers: int, calls_per_layer: int = 1,
                 shard_bytes: int = SHARD_BYTES, expected_bytes: Optional[int] = None, overwrite: bool = False,
                 metadata: Optional[dict] = None, on_close=None):
        self.shard_bytes = positive_int(shard_bytes, "shard_bytes")
        self.folder, self._lock_file = _prepare_folder(folder, overwrite)
        self._suffix = f".{os.getpid()}-{secrets.token_hex(4)}.partial"  # this writer's temporary names
        self._rank = {name: i for i, name in enumerate(layer_order)}
        self._hooked_layers = max(1, hooked_layers)
        self._calls_per_layer = max(1, calls_per_layer)
        self._metadata = dict(metadata or {})
        self._on_close = on_close
        self._lock = threading.RLock()
        self._local = threading.local()  # this thread's open forward (a _Unit)
        self._listed: Dict[str, List[_Written]] = {}  # per layer: the calls of whole units, in order
        self._pending: List[_Written] = []  # small calls waiting for their shard
        self._pending_bytes = 0
        self._open_units: set = set()
        self._units = 0
        self._whole = 0
        self._failed: List[dict] = []
        self._files = 0
        self._open: set = set()  # descriptors of large calls being written
        self._planned = False
        self._dtypes: set = set()
        self.written = 0
        self.closed = False
        self.tokens = None
        self._log_fd: Optional[int] = None  # capture.log, where each unit written whole is appended
        self._log_size = 0
        try:
            if expected_bytes is not None:
                self.check_plan(int(expected_bytes), "")
            self._open_log()
            self._write_index()
        except BaseException:
            if self._log_fd is not None:
                os.close(self._log_fd)
            self._lock_file.release()
            raise

    # ----------------------------------------------------------------- public
    @property
    def calls(self) -> Dict[str, int]:
        """``{layer_name: calls listed}`` (the calls of the forwards written whole), layers in model order."""
        with self._lock:
            return {name: len(self._listed[name]) for name in self._ordered_layers()}

    @property
    def state(self) -> str:
        """``"writing"`` while open; once closed ``"complete"``, or ``"partial"`` after a write error."""
        if not self.closed:
            return "writing"
        return "partial" if any(f["write_error"] for f in self._failed) else "complete"

    def partial(self, layer: str, padding_mask=None) -> "_StreamedCall":
        """One call of ``layer``, filled a block of query rows at a time (the keeper protocol)."""
        del padding_mask  # kept whole: padded positions are part of the capture
        if self.closed:
            raise AttentionHookerError(f"the capture streamed to {self.folder} is closed; call hooker.stream_to() again")
        return _StreamedCall(self, layer)

    def begin_forward(self) -> None:
        """A forward of the model starts on this thread: its calls are written whole or not at all."""
        with self._lock:
            if self.closed:
                return
            unit = _Unit(self._units, in_forward=True)
            self._units += 1
            self._open_units.add(unit)
        self._local.unit = unit

    def end_forward(self, *, returned: bool, reason: str = "the forward raised") -> None:
        """The forward of this thread ended: listed when it ``returned`` and all its calls
        are on disk; rolled back otherwise.

        Raises:
            AttentionHookerError: when a forward that returned could not be written whole.
        """
        unit = getattr(self._local, "unit", None)
        self._local.unit = None
        if unit is None:
            return
        with self._lock:
            self._open_units.discard(unit)
            if self.closed:
                return
            if not returned or unit.error is not None:
                self._roll_back(unit, unit.error or reason, write_error=unit.error is not None)
                if unit.error is not None and returned:
                    raise AttentionHookerError(unit.error) from unit.cause
                return
            try:
                self._flush_pending()
            except AttentionHookerError:
                if unit.error is not None:  # a call of this forward was in the shard that failed
                    self._roll_back(unit, unit.error, write_error=True)
                    raise
            self._list(unit)

    def check_plan(self, planned: int, how: str) -> None:
        """Refuses when ``planned`` bytes (plus a margin) do not fit the folder's free space.

        Raises:
            AttentionHookerError: with both figures, the margin, and the ways out.
        """
        try:
            usage = shutil.disk_usage(self.folder)
        except OSError as err:
            raise self._error(f"measuring the free space for {format_bytes(planned)}{how}", err) from err
        margin = min(_MARGIN_BYTES, usage.total // 10)
        if planned + margin > usage.free:
            raise AttentionHookerError(
                f"this capture writes about {format_bytes(planned)}{how}, and {format_bytes(margin)} are kept free "
                f"for everything else; {format_bytes(usage.free)} free on {self.folder}: free some space, stream to "
                "another disk, or keep less (heads=, rows=, dtype=torch.float16, max_calls=)")

    def close(self, *, tokens: Optional[Sequence] = None) -> None:
        """Writes the calls still waiting and the final ``capture.json`` ("complete", or
        "partial" after a write error); lets the folder's lock go. Safe to call twice.

        Args:
            tokens: token labels to keep with the capture.

        Raises:
            AttentionHookerError: when what was waiting, or the index, cannot be written
                (the capture then reads as partial).
        """
        with self._lock:
            if tokens is not None:
                self.tokens = list(tokens)
            if self.closed:
                if tokens is not None:
                    self._relabel()
                return
            for unit in sorted(self._open_units, key=lambda u: u.number):  # forwards that never returned
                self._roll_back(unit, "still running (or interrupted) when the capture was closed", write_error=False)
            self._open_units.clear()
            failure = None
            try:
                self._flush_pending()
            except AttentionHookerError as err:
                failure = err
            for fd in self._open:
                os.close(fd)
            self._open.clear()
            self.closed = True
            try:
                self._remove_temporary_files()
                self._write_index()  # final: lists everything, so the log is no longer needed
                self._close_log(remove=True)
            finally:
                self._close_log(remove=False)
                self._lock_file.release()
                if self._on_close is not None:  # the hooker lets go of this capture, whatever failed
                    self._on_close(self)
        if failure is not None:
            raise failure

    def _relabel(self) -> None:
        """Writes the tokens into the index of a closed capture: under the folder's lock again,
        and only while the folder still holds this writer's capture."""
        lock = FolderLock.acquire(self.folder)
        try:
            try:
                on_disk = read_index(self.folder).get("writer")
            except AttentionHookerError:
                on_disk = None
            if on_disk != self._suffix:
                raise AttentionHookerError(f"{self.folder} no longer holds the capture this writer closed: another "
                                           "writer replaced it; the tokens were not written")
            self._write_index()
        finally:
            lock.release()

    def __enter__(self) -> "StreamedCapture":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        calls = self.calls
        return (f"StreamedCapture({self.folder!r}, {len(calls)} layers, {sum(calls.values())} calls, "
                f"{format_bytes(self.written)} written, {self.state})")

    # ------------------------------------------------------------ the units
    @contextlib.contextmanager
    def _failing_forward(self):
        """An error of this capture inside a forward makes that forward fail to be whole
        (rolled back when it ends, and the capture partial)."""
        try:
            yield
        except AttentionHookerError as err:
            unit = getattr(self._local, "unit", None)
            if unit is None:  # a call made outside any forward of the model: it alone is lost
                with self._lock:
                    self._failed.append({"forward": None, "call_unit": None, "reason": str(err), "write_error": True})
            elif unit.error is None:
                unit.error, unit.cause = str(err), err.__cause__
            raise

    def _commit(self, layer: str, data: Optional[torch.Tensor], own_file: Optional[str], nbytes: int) -> None:
        """A finished call of this thread's forward (or a unit of its own outside any forward)."""
        with self._lock:
            if self.closed:  # a forward still running on another thread when the capture was closed
                if own_file is not None:
                    _remove_quietly(os.path.join(self.folder, own_file))
                return
            unit = getattr(self._local, "unit", None)
            if unit is None:
                unit = _Unit(self._units, in_forward=False)
                self._units += 1
            call = _Written(layer, unit, data, own_file)
            unit.calls.append(call)
            self.written += nbytes
            if own_file is None:
                self._pending.append(call)
                self._pending_bytes += nbytes
                if self._pending_bytes >= self.shard_bytes:
                    self._flush_pending()
            elif not unit.in_forward:
                self._list(unit)

    def _list(self, unit: _Unit) -> None:
        """Lists a unit written whole, in the index on disk too; rolled back if that fails."""
        for call in unit.calls:
            call.data = None
            self._listed.setdefault(call.layer, []).append(call)
        self._whole += 1
        try:
            self._append_log(unit)
        except AttentionHookerError as err:
            for call in unit.calls:
                self._listed[call.layer].remove(call)
            self._whole -= 1
            self._roll_back(unit, str(err), write_error=True)
            raise

    def _roll_back(self, unit: _Unit, reason: str, *, write_error: bool) -> None:
        """Forgets every call of ``unit``: out of the waiting shard, its own files removed."""
        self._pending = [c for c in self._pending if c.unit is not unit]
        self._pending_bytes = sum(c.data.numel() * c.data.element_size() for c in self._pending)
        for call in unit.calls:
            if call.own_file is not None:
                _remove_quietly(os.path.join(self.folder, call.own_file))
        self._failed.append({"forward": unit.number if unit.in_forward else None, "call_unit": unit.number,
                             "reason": reason, "write_error": write_error})

    def _flush_pending(self) -> None:
        """Writes the waiting small calls as one shard; after a failure, every unit with a call
        in it is marked (a forward) or rolled back (a lone call), and the error raised."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        self._files += 1
        name = f"calls-{self._files:05d}.safetensors"
        what = f"the shard {name} ({len(pending)} calls, the first of layer {pending[0].layer!r})"
        try:
            self.check_plan(sum(c.data.numel() * c.data.element_size() for c in pending), " more (a shard of small calls)")
            self._write_shard(name, [c.data for c in pending], what)
        except AttentionHookerError as err:
            for unit in {id(c.unit): c.unit for c in pending}.values():
                if unit.in_forward:
                    if unit.error is None:
                        unit.error, unit.cause = str(err), err.__cause__
                else:
                    self._roll_back(unit, str(err), write_error=True)
            raise
        for i, call in enumerate(pending):
            call.file, call.tensor, call.data = name, str(i), None
        for unit in {id(c.unit): c.unit for c in pending if not c.unit.in_forward}.values():
            self._list(unit)

    # ---------------------------------------------------------------- files
    def _plan_first_call(self, nbytes: int) -> None:
        """At the first call: the capture writes about this call's size for every hooked layer and call."""
        with self._lock:
            if self._planned:
                return
            self._planned = True
            planned = nbytes * self._hooked_layers * self._calls_per_layer
        self.check_plan(planned, f" ({format_bytes(nbytes)} per call x {self._hooked_layers} hooked layers"
                                 f" x {self._calls_per_layer} call(s) each)")

    def _write_shard(self, name: str, tensors: List[torch.Tensor], what: str) -> None:
        """A safetensors file of ``tensors`` (named ``"0"``, ``"1"``, ...), written at its final
        name: no index lists it before it is whole, and it is removed when a write fails."""
        header, offset = {}, 0
        for i, tensor in enumerate(tensors):
            nbytes = tensor.numel() * tensor.element_size()
            header[str(i)] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        path = os.path.join(self.folder, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as err:
            raise self._error(what, err) from err
        try:
            parts = [_header_bytes(header)] + [_raw_bytes(t.contiguous().reshape(-1)) for t in tensors]
            _write_all(fd, parts)
        except OSError as err:
            _remove_quietly(path)
            raise self._error(what, err) from err
        finally:
            os.close(fd)

    def _write_file(self, name: str, data: bytes, what: str) -> None:
        """``data`` into ``name`` whole: written aside under this writer's temporary name, then renamed."""
        path = os.path.join(self.folder, name)
        try:
            with open(path + self._suffix, "wb") as handle:
                handle.write(data)
            os.replace(path + self._suffix, path)
        except OSError as err:
            _remove_quietly(path + self._suffix)
            raise self._error(what, err) from err

    def _error(self, what: str, err: OSError) -> AttentionHookerError:
        return AttentionHookerError(f"cannot write the capture streamed to {self.folder}: {what} failed: "
                                    f"{err.strerror or err} (errno {err.errno})")

    def _open_large(self, layer: str, shape: Tuple[int, ...], dtype: torch.dtype) -> Tuple[str, int, int]:
        """A file of its own for one large call: header written, space reserved.

        Returns:
            ``(file name, data_offset, file descriptor)``; the file lies under this writer's
            temporary name until the call is committed.
        """
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            self._files += 1
            name = f"call-{self._files:05d}.safetensors"
        self.check_plan(nbytes, f" more (a {tuple(shape)} call)")
        header = _header_bytes({"attention": {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                                              "data_offsets": [0, nbytes]}})
        path = os.path.join(self.folder, name + self._suffix)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as err:
            raise self._error(f"creating {name} for a {tuple(shape)} call of layer {layer!r}", err) from err
        try:
            os.write(fd, header)
            data_offset = len(header)
            if hasattr(os, "posix_fallocate") and nbytes:
                os.posix_fallocate(fd, data_offset, nbytes)  # no "disk full" halfway through the call
        except OSError as err:
            os.close(fd)
            _remove_quietly(path)
            raise self._error(f"reserving {format_bytes(nbytes)} in {name} for a call of layer {layer!r}", err) from err
        with self._lock:
            self._open.add(fd)
        return name, data_offset, fd

    def _release(self, fd: int) -> None:
        with self._lock:
            if fd in self._open:
                self._open.discard(fd)
                os.close(fd)

    def _remove_temporary_files(self) -> None:
        try:
            names = os.listdir(self.folder)
        except OSError:
            return  # the folder is gone: writing the index says so
        for name in names:
            if name.endswith(self._suffix):  # calls cut short (an exception, a refused layer call)
                _remove_quietly(os.path.join(self.folder, name))

    def _ordered_layers(self) -> List[str]:
        return sorted(self._listed, key=lambda name: self._rank.get(name, len(self._rank)))

    def _open_log(self) -> None:
        path = os.path.join(self.folder, LOG_NAME)
        try:
            self._log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        except OSError as err:
            raise self._error(f"creating {LOG_NAME}", err) from err

    def _close_log(self, *, remove: bool) -> None:
        fd, self._log_fd = self._log_fd, None
        if fd is not None:
            os.close(fd)
        if remove:
            _remove_quietly(os.path.join(self.folder, LOG_NAME))

    def _append_log(self, unit: _Unit) -> None:
        """One line in ``capture.log`` for a unit written whole (cheap whatever the capture's
        size; ``capture.json`` is written whole at close). A line that cannot be written
        whole is cut off again; if even that fails, the log is dropped and ``capture.json``
        is rewritten for each unit instead."""
        if self._log_fd is None:
            self._write_index()
            return
        line = (json.dumps({"unit": unit.number, "calls": [[c.layer, c.file, c.tensor] for c in unit.calls]},
                           separators=(",", ":")) + "\n").encode()
        try:
            written = os.write(self._log_fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(line)} bytes")
        except OSError as err:
            try:
                os.ftruncate(self._log_fd, self._log_size)
            except OSError:
                self._close_log(remove=False)
                self._write_index()  # lists every unit so far, and tells readers to ignore the log
            raise self._error(f"appending forward {unit.number} to {LOG_NAME}", err) from err
        self._log_size += written

    def _write_index(self) -> None:
        """``capture.json``: the calls of every unit written whole, and the state (written
        aside, then renamed: a reader sees the old index or the new one, never half)."""
        layers = self._ordered_layers()
        from . import __version__

        state = self.state
        index = {"format": STREAM_FORMAT, "state": state, "complete": state == "complete", "layers": layers,
                 "calls": [len(self._listed[n]) for n in layers],
                 "files": [[[c.file, c.tensor] for c in self._listed[n]] for n in layers],
                 "forwards": [[c.unit.number for c in self._listed[n]] for n in layers],
                 "whole_units": self._whole, "failed_units": len(self._failed),
                 "failures": self._failed[:_FAILURES_LISTED],
                 "layer_order": list(self._rank), "log": LOG_NAME if self._log_fd is not None else None,
                 "writer": self._suffix, "tokens": self.tokens, "dtype": sorted(self._dtypes), "library_version": __version__,
                 **self._metadata}
        self._write_file(INDEX_NAME, json.dumps(index, separators=(",", ":")).encode(), f"writing {INDEX_NAME}")


class _StreamedCall:
    """One call being written: its rows arrive in order, a block at a time."""

    def __init__(self, owner: StreamedCapture, layer: str):
        self._owner, self._layer = owner, layer
        self._shape: Optional[Tuple[int, ...]] = None
        self._dtype: Optional[torch.dtype] = None
        self._buffer: Optional[torch.Tensor] = None  # small calls: (B, H, R, K) on the CPU
        self._file: Optional[Tuple[str, int, int]] = None  # large calls: (file name, data offset, fd)
        self._row = 0

    def begin(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        """Told before the first block: the stored ``(batch, heads, rows, key)`` and dtype."""
        with self._owner._failing_forward():
            self._begin(shape, dtype)

    def _begin(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        self._shape = tuple(int(n) for n in shape)
        self._dtype = dtype if dtype in _SAFETENSORS_DTYPES else torch.float32
        nbytes = math.prod(self._shape) * torch.empty((), dtype=self._dtype).element_size()
        self._owner._plan_first_call(nbytes)
        self._owner._dtypes.add(str(self._dtype).replace("torch.", ""))
        if nbytes >= self._owner.shard_bytes:
            self._file = self._owner._open_large(self._layer, self._shape, self._dtype)
        else:
            self._buffer = torch.empty(self._shape, dtype=self._dtype)

    def add(self, block: torch.Tensor, rows: torch.Tensor, n_query: int) -> None:
        """Writes the next ``block`` ``(batch, heads, r, key)`` of query rows."""
        del rows, n_query  # rows arrive in order; the stored shape was given to begin()
        with self._owner._failing_forward():
            self._add(block)

    def _add(self, block: torch.Tensor) -> None:
        if self._shape is None:
            self._begin(block.shape, block.dtype)
        block = block.detach().to("cpu", self._dtype)
        first, last = self._row, self._row + block.shape[2]
        if last > self._shape[2] or tuple(block.shape[:2]) != self._shape[:2] or block.shape[3] != self._shape[3]:
            raise AttentionHookerError(
                f"a block {tuple(block.shape)} at row {first} does not fit the call {self._shape} of {self._layer!r}")
        if self._buffer is not None:
            self._buffer[:, :, first:last].copy_(block)
        else:
            self._write_rows(block, first)
        self._row = last

    def _write_rows(self, block: torch.Tensor, first: int) -> None:
        name, data_offset, fd = self._file
        _, heads, n_rows, n_key = self._shape
        row_bytes = n_key * block.element_size()
        block = block.contiguous()
        try:
            for b in range(block.shape[0]):
                for h in range(block.shape[1]):
                    os.pwrite(fd, _raw_bytes(block[b, h]), data_offset + ((b * heads + h) * n_rows + first) * row_bytes)
        except OSError as err:
            self.discard()
            raise self._owner._error(f"writing rows {first}-{first + block.shape[2] - 1} of a call of layer "
                                     f"{self._layer!r} into {name}", err) from err

    def commit(self) -> None:
        """Hands the finished call to the capture (under the store's lock, in call order)."""
        with self._owner._failing_forward():
            self._commit()

    def _commit(self) -> None:
        if self._shape is None:
            return
        if self._row != self._shape[2]:
            self.discard()
            raise AttentionHookerError(f"a call of {self._layer!r} ended after {self._row} of {self._shape[2]} rows")
        nbytes = math.prod(self._shape) * torch.empty((), dtype=self._dtype).element_size()
        name = None
        if self._file is not None:
            name, _, fd = self._file
            self._owner._release(fd)
            self._file = None
            path = os.path.join(self._owner.folder, name)
            try:
                os.replace(path + self._owner._suffix, path)
            except OSError as err:
                _remove_quietly(path + self._owner._suffix)
                raise self._owner._error(f"finishing {name} (a call of layer {self._layer!r})", err) from err
        self._owner._commit(self._layer, self._buffer, name, nbytes)
        self._buffer = None

    def discard(self) -> None:
        """Drops a call that will not be kept (its layer call was refused, or cut short)."""
        if self._file is not None:
            name, _, fd = self._file
            self._owner._release(fd)
            _remove_quietly(os.path.join(self._owner.folder, name + self._owner._suffix))
            self._file = None
        self._buffer = None


def _header_bytes(header: dict) -> bytes:
    """A safetensors header: its length (8 bytes, little-endian), then the JSON padded with
    spaces so that the data starts 8-byte aligned, as safetensors writes it."""
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _write_all(fd: int, parts: List) -> None:
    """Every byte of ``parts`` (bytes or memoryviews) to ``fd``, as few system calls as it takes."""
    parts = [memoryview(p).cast("B") for p in parts if len(p)]
    while parts:
        written = os.writev(fd, parts[:1024])
        while parts and written >= len(parts[0]):
            written -= len(parts[0])
            parts.pop(0)
        if written:
            parts[0] = parts[0][written:]


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (bfloat16 through int16)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass  # already gone, or the folder is: nothing of ours is left to list


def _prepare_folder(folder, overwrite: bool) -> Tuple[str, FolderLock]:
    """The folder, made, locked, and emptied of our files when ``overwrite``."""
    if not isinstance(folder, (str, os.PathLike)):
        raise AttentionHookerError(f"the stream folder must be a str or os.PathLike, got {type(folder).__name__}")
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise AttentionHookerError(f"cannot stream a capture to {folder}: it is a file; expected a folder")
    if not os.path.isdir(folder):
        prepare_output_path(os.path.join(folder, INDEX_NAME), what="streamed capture")
    if not os.access(folder, os.W_OK):
        raise AttentionHookerError(f"cannot stream a capture to {folder}: the folder is not writable")
    lock = FolderLock.acquire(folder)  # before anything is looked at or removed: one writer at a time
    try:
        ours = [n for n in os.listdir(folder) if is_our_file_name(n)]
        if ours and not overwrite:
            raise AttentionHookerError(
                f"{folder} already holds a capture ({len(ours)} files); pass overwrite=True (--overwrite) "
                "to replace it, or pick another folder")
        for name in ours:
            os.remove(os.path.join(folder, name))
    except OSError as err:
        lock.release()
        raise AttentionHookerError(f"cannot replace the capture in {folder}: {err}") from err
    except BaseException:
        lock.release()
        raise
    return folder, lock
