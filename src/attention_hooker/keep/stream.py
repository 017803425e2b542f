"""A keeper that writes a capture to disk as its calls arrive: sharded safetensors.

The folder's layout is in ``io/format.py``. Every tensor is one call's weights
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
  last (``keep/folder_lock.py``); a second writer is refused with who holds it.

A plan comes first: before a byte is written, the bytes the capture will write are
weighed against the free space of the folder's disk, and the capture is refused with
both figures when they do not fit. Every write error is an ``AttentionHookerError``
naming the folder, the call and the cause, chained to the OS error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._checks import positive_int
from ..io.format import INDEX_NAME, mapped_tensors, read_index
from ..errors import AttentionHookerError
from .folder_lock import FolderLock
from .protocol import NO_SOURCES, CallSources
from .disk_speed import StreamPlan, write_speed
from .stream_call import StreamedCall
from .stream_folder import SAFETENSORS_DTYPES, CaptureFolder, format_bytes
from .stream_units import Unit, Written, index_of

__all__ = ["StreamedCapture", "INDEX_NAME", "mapped_tensors", "format_bytes"]  # mapped_tensors: moved to io/format.py

SHARD_BYTES = 256 * 2**20


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
                 metadata: Optional[dict] = None, on_close=None, forward_running=None, on_roll_back=None):
        self.shard_bytes = positive_int(shard_bytes, "shard_bytes")
        self.disk = CaptureFolder(folder, overwrite=overwrite)  # its files, written whole or removed
        self.folder = self.disk.path
        self._rank = {name: i for i, name in enumerate(layer_order)}
        self._hooked_layers = max(1, hooked_layers)
        self._calls_per_layer = max(1, calls_per_layer)
        self._metadata = dict(metadata or {})
        self._on_close = on_close
        self._settings = dict(layer_order=list(layer_order), hooked_layers=hooked_layers, calls_per_layer=calls_per_layer,
                              shard_bytes=shard_bytes, forward_running=forward_running)
        self._requests: Dict[str, str] = {}  # continuous batching: {request id: its folder, relative to this one}
        self._children: List["StreamedCapture"] = []
        # forward_running(): whether a forward of the model is running on this thread (one that began
        # before this capture, whose calls are not kept); on_roll_back(layer): a call of a forward
        # rolled back (the hooker counts it out of max_calls again).
        self._forward_running = forward_running or (lambda: False)
        self._on_roll_back = on_roll_back
        self._lock = threading.RLock()
        self._local = threading.local()  # this thread's open forward (a Unit)
        self._listed: Dict[str, List[Written]] = {}  # per layer: the calls of whole units, in order
        self._pending: List[Written] = []  # small calls waiting for their shard
        self._pending_bytes = 0
        self._open_units: set = set()
        self._units = 0
        self._whole = 0
        self._failed: List[dict] = []
        self._rolled_back: List[str] = []  # layers of calls rolled back, for on_roll_back
        self._files = 0
        self._planned = False
        self._planned_bytes: Optional[int] = None if expected_bytes is None else int(expected_bytes)
        self.dtypes: set = set()  # of the calls written, for the index
        # {layer: MapKind} of the layers whose calls are another kind of map than probabilities over tokens
        # (one kind per layer: a family's calls are all of its kind); written in every index from then on
        self._kinds: Dict[str, object] = {}
        self.written = 0
        self.closed = False
        self.tokens = None
        try:
            if expected_bytes is not None:
                self.check_plan(int(expected_bytes), "")
            self.disk.open_log()  # each unit written whole is appended there
            self._write_index()
        except BaseException:
            self.disk.release()
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

    def begin_call(self, layer: str, shape: Tuple[int, ...], dtype: torch.dtype,
                   sources: CallSources = NO_SOURCES) -> StreamedCall:
        """One call of ``layer``, stored ``shape`` ``(batch, heads, rows, keys)``, written a
        block of query rows at a time (the keeper protocol, ``keep/protocol.py``)."""
        # The weights only (gradients and value vectors are refused with stream_to()), and what kind of
        # map they are when they are not probabilities over tokens (the index names it per layer).
        if self.closed:
            raise AttentionHookerError(f"the capture streamed to {self.folder} is closed; call hooker.stream_to() again")
        if sources.kind is not None:
            with self._lock:
                self._kinds.setdefault(layer, sources.kind)
        call = StreamedCall(self, layer)
        call.begin(shape, dtype)
        return call

    def begin_forward(self) -> None:
        """A forward of the model starts on this thread: its calls are written whole or not at all."""
        with self._lock:
            if self.closed:
                return
            unit = Unit(self._units, in_forward=True)
            self._units += 1
            self._open_units.add(unit)
        self._local.unit = unit

    def end_forward(self, *, returned: bool, reason: Optional[str] = None) -> None:
        """The forward of this thread ended: listed when it ``returned`` and all its calls
        are on disk; rolled back otherwise.

        Raises:
            AttentionHookerError: when a forward that returned could not be written whole.
        """
        unit = getattr(self._local, "unit", None)
        self._local.unit = None
        if unit is None:
            return
        try:
            with self._lock:
                self._open_units.discard(unit)
                if self.closed:
                    return
                if not returned or unit.error is not None:
                    self._roll_back(unit, unit.error or reason or "the forward raised", write_error=unit.error is not None)
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
        finally:
            self._count_out_rolled_back()

    def plan(self) -> "StreamPlan":
        """What this capture is expected to write, the folder's free space, and the time the disk needs
        for it at its measured speed (the first plan on a filesystem writes a 64 MiB probe there).

        Example:
            >>> import tempfile
            >>> from torch import nn
            >>> from attention_hooker import TransformerAttentionHooker
            >>> model = nn.TransformerEncoder(
            ...     nn.TransformerEncoderLayer(d_model=16, nhead=4, batch_first=True), num_layers=2)
            >>> with TransformerAttentionHooker(model) as hooker:
            ...     stream = hooker.stream_to(tempfile.mkdtemp(), expected_bytes=2**30)
            ...     plan = stream.plan()
            ...     stream.close()
            >>> plan.bytes, plan.seconds is None or plan.seconds > 0
            (1073741824, True)
        """
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            free = None
        return StreamPlan(self.folder, self._planned_bytes, free, write_speed(self.folder))

    def check_plan(self, planned: int, how: str) -> None:
        """Refuses when ``planned`` bytes (plus a margin) do not fit the folder's free space.

        Raises:
            AttentionHookerError: with both figures, the margin, and the ways out.
        """
        self.disk.check_space(planned, how)

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
            for child in self._children:  # each request's capture is whole before this index lists it
                try:
                    child.close()
                except AttentionHookerError as err:
                    self._note_failure(f"request {child._metadata.get('request_id')!r}: {err}", write_error=True)
            for unit in sorted(self._open_units, key=lambda u: u.number):  # forwards that never returned
                self._roll_back(unit, "still running (or interrupted) when the capture was closed", write_error=False,
                                on_its_thread=unit is getattr(self._local, "unit", None))
            self._open_units.clear()
            failure = None
            try:
                self._flush_pending()
            except AttentionHookerError as err:
                failure = err
            self.closed = True  # calls still being written on other threads close their own files
            try:
                self.disk.remove_temporary_files()
                try:
                    self._write_index()  # final: lists everything, so the log is no longer needed
                except AttentionHookerError as err:
                    self._note_failure(str(err), write_error=True)
                    raise
                self.disk.drop_log(remove=True)
            finally:
                self.disk.release()
                if self._on_close is not None:  # the hooker lets go of this capture, whatever failed
                    self._on_close(self)
        self._count_out_rolled_back()
        if failure is not None:
            raise failure

    def for_request(self, request_id: str, on_roll_back=None) -> "StreamedCapture":
        """The capture of one request of a continuous-batching engine: written into a folder
        of its own, ``requests/<request id>``, listed in this capture's index (``load(folder)
        .requests``) and closed with it. Made at the request's first call: when that is inside
        a forward, the forward is the request's first unit."""
        with self._lock:
            if self.closed:
                raise AttentionHookerError(f"the capture streamed to {self.folder} is closed; call hooker.stream_to() "
                                           "again")
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(request_id))[:64].lstrip(".") or "request"
            taken = set(self._requests.values())
            stem, n = name, 1
            while f"requests/{name}" in taken:
                n += 1
                name = f"{stem}-{n}"
            own = {key: value for key, value in self._metadata.items() if key != "requests"}
            child = StreamedCapture(os.path.join(self.folder, "requests", name), overwrite=True,
                                    metadata={**own, "request_id": str(request_id)},
                                    on_roll_back=on_roll_back, **self._settings)
            self._requests[str(request_id)] = f"requests/{name}"
            self._metadata["requests"] = dict(self._requests)
            self._children.append(child)
            self._write_index()
        return child

    def _relabel(self) -> None:
        """Writes the tokens into the index of a closed capture: under the folder's lock again,
        and only while the folder still holds this writer's capture."""
        lock = FolderLock.acquire(self.folder)
        try:
            try:
                on_disk = read_index(self.folder).get("writer")
            except AttentionHookerError:
                on_disk = None
            if on_disk != self.disk.suffix:
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
    # The methods below are for this capture's own calls (``keep/stream_call.py``).
    @contextlib.contextmanager
    def failing_forward(self):
        """An error of this capture inside a forward makes that forward fail to be whole
        (rolled back when it ends, and the capture partial)."""
        try:
            yield
        except AttentionHookerError as err:
            unit = getattr(self._local, "unit", None)
            if unit is None:  # a call made outside any forward of the model: it alone is lost
                with self._lock:
                    self._note_failure(str(err), write_error=True)
            elif unit.error is None:
                unit.error, unit.cause = str(err), err.__cause__
            raise

    def commit_call(self, layer: str, data: Optional[torch.Tensor], own_file: Optional[str], nbytes: int) -> None:
        """A finished call of this thread's forward (or a unit of its own outside any forward)."""
        with self._lock:
            unit = getattr(self._local, "unit", None)
            if unit is None and self._forward_running():  # a forward that began before this capture
                if own_file is not None:
                    self.disk.remove(own_file)
                self._note_failure(f"a call of {layer!r} in a forward that began before stream_to()", write_error=False)
                return
            if unit is None:
                unit = Unit(self._units, in_forward=False)
                self._units += 1
            call = Written(layer, unit, data, own_file)
            unit.calls.append(call)
            self.written += nbytes
            if own_file is None:
                self._pending.append(call)
                self._pending_bytes += nbytes
                if self._pending_bytes >= self.shard_bytes:
                    self._flush_pending()
            elif not unit.in_forward:
                self._list(unit)

    def _list(self, unit: Unit) -> None:
        """Lists a unit written whole, in the index on disk too; rolled back if that fails."""
        for call in unit.calls:
            call.data = None
            self._listed.setdefault(call.layer, []).append(call)
        self._whole += 1
        try:
            if self.disk.logging:
                self.disk.append_log({"unit": unit.number, "calls": [[c.layer, c.file, c.tensor] for c in unit.calls]},
                                      f"forward {unit.number}")
            else:  # the log was dropped after a failure: the whole index, each time
                self._write_index()
        except AttentionHookerError as err:
            for call in unit.calls:
                self._listed[call.layer].remove(call)
            self._whole -= 1
            self._roll_back(unit, str(err), write_error=True)
            if not self.disk.logging:  # the log was dropped: the index alone tells readers what is whole
                self._write_index_quietly()
            raise

    def _roll_back(self, unit: Unit, reason: str, *, write_error: bool, on_its_thread: bool = True) -> None:
        """Forgets every call of ``unit``: out of the waiting shard, its own files removed, the
        calls it was still writing discarded (``on_its_thread``: else they are being written on
        another thread, and clean up after themselves); counted out of ``max_calls``."""
        self._pending = [c for c in self._pending if c.unit is not unit]
        self._pending_bytes = sum(c.data.numel() * c.data.element_size() for c in self._pending)
        for open_call in list(unit.open_calls) if on_its_thread else []:
            open_call.discard()
        for call in unit.calls:
            if call.own_file is not None:
                self.disk.remove(call.own_file)
        self._rolled_back.extend(call.layer for call in unit.calls)
        self._note_failure(reason, write_error=write_error, forward=unit.number if unit.in_forward else None)

    def _note_failure(self, reason: str, *, write_error: bool, forward: Optional[int] = None) -> None:
        """One entry of the index's ``failures``: the forward (``None``: a call outside any forward
        of the model), why, and whether a write failed (which makes the capture partial)."""
        self._failed.append({"forward": forward, "reason": reason, "write_error": write_error})

    def _count_out_rolled_back(self) -> None:
        """Tells the hooker which calls were rolled back, outside this capture's lock (the
        hooker's store takes its own lock, and calls into this capture under it)."""
        with self._lock:
            layers, self._rolled_back = self._rolled_back, []
        if self._on_roll_back is not None:
            for layer in layers:
                self._on_roll_back(layer)

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
            self.disk.write_shard(name, [c.data for c in pending], what)
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
    def plan_first_call(self, nbytes: int) -> None:
        """At the first call: the capture writes about this call's size for every hooked layer and call."""
        with self._lock:
            if self._planned:
                return
            self._planned = True
            planned = nbytes * self._hooked_layers * self._calls_per_layer
            if self._planned_bytes is None:
                self._planned_bytes = planned
        self.check_plan(planned, f" ({format_bytes(nbytes)} per call x {self._hooked_layers} hooked layers"
                                 f" x {self._calls_per_layer} call(s) each)")

    def _error(self, what: str, err: OSError) -> AttentionHookerError:
        return self.disk.error(what, err)

    def open_call_file(self, layer: str, shape: Tuple[int, ...], dtype: torch.dtype) -> Tuple[str, int, int]:
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
        header = {"attention": {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}}
        fd, data_offset = self.disk.open_call_file(name, header, nbytes, f"a {tuple(shape)} call of layer {layer!r}")
        return name, data_offset, fd

    def current_unit(self) -> Optional[Unit]:
        """This thread's open forward, or ``None``."""
        return getattr(self._local, "unit", None)

    def finish_call_file(self, name: str, layer: str) -> bool:
        """Gives a finished call's own file its final name, unless the capture was closed
        meanwhile (then only this writer's temporary name is touched, and removed).

        Returns:
            Whether the file was kept.
        """
        with self._lock:
            if self.closed:
                self.disk.remove(name, temporary=True)
                return False
            self.disk.finish_call_file(name, f"a call of layer {layer!r}")
            return True

    def _ordered_layers(self) -> List[str]:
        return sorted(self._listed, key=lambda name: self._rank.get(name, len(self._rank)))

    def _write_index_quietly(self) -> None:
        """The whole index after the log was dropped; its own failure leaves the older index
        (still "writing") as the last word."""
        try:
            self._write_index()
        except AttentionHookerError:
            pass

    def _write_index(self) -> None:
        """``capture.json``: the calls of every unit written whole, and the state (written
        aside, then renamed: a reader sees the old index or the new one, never half)."""
        listed = {name: self._listed[name] for name in self._ordered_layers()}
        index = index_of(listed, state=self.state, whole=self._whole, failed=self._failed, layer_order=list(self._rank),
                         logging=self.disk.logging, writer=self.disk.suffix, tokens=self.tokens, dtypes=self.dtypes,
                         metadata=self._metadata, kinds=self._kinds)
        self.disk.write_atomically(INDEX_NAME, json.dumps(index, separators=(",", ":")).encode(), f"writing {INDEX_NAME}")
