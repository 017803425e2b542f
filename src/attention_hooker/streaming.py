"""A keeper that writes a capture to disk as its calls arrive: sharded safetensors.

A streamed capture is a folder::

    capture.json                  layers, calls, tokens, selection, and where each call lies
    calls-00001.safetensors       small calls, gathered until a shard holds ``shard_bytes``
    call-00002.safetensors        a call larger than ``shard_bytes``: its own file, written
                                  a tile of query rows at a time as the rows are computed

Every tensor is one call's weights ``(batch, heads, query, key)`` (query: the rows kept).
``capture.json`` is rewritten after each file, so a capture cut short is readable up to
its last file. :func:`attention_hooker.load` opens the folder lazily: each call is a
tensor memory-mapped from its file, so touching one layer or head reads only that.

A plan comes first: before a byte is written, the bytes the capture will write are
weighed against the free space of the folder's disk, and the capture is refused with
both figures when they do not fit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._checks import positive_int, prepare_output_path
from .errors import AttentionHookerError
from .store import _format_bytes

__all__ = ["StreamedCapture", "INDEX_NAME", "mapped_tensors", "format_bytes"]

INDEX_NAME = "capture.json"
STREAM_FORMAT = "attention-hooker-stream/1"
SHARD_BYTES = 256 * 2**20
_MARGIN_BYTES = 64 * 2**20  # left free on the disk, for everything else writing there
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_NUMPY_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "F64": (np.float64, None),
                 "BF16": (np.int16, torch.bfloat16)}  # numpy has no bfloat16: mapped as int16, viewed back
_OUR_FILE_PREFIXES = ("calls-", "call-")


def format_bytes(n: float) -> str:
    """``12.4 GiB``-style size."""
    return _format_bytes(n, ("B", "KiB", "MiB", "GiB", "TiB"))


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
        shard_bytes: calls smaller than this are gathered into shards of about this
            size; larger ones are written into a file of their own, tile by tile.
        expected_bytes: the bytes the capture will write, when the caller knows them
            (the command line computes them from the model's configuration): the plan
            is then checked at once, before the model runs.
        overwrite: replace a capture already in ``folder`` (only our own files are removed).
        metadata: model class and selection, kept in ``capture.json``.

    Attributes:
        written: bytes of attention written so far.
        calls: ``{layer_name: calls written}``.

    Raises:
        AttentionHookerError: when the folder holds another capture, cannot be
            written, or the plan does not fit the free space.
    """

    def __init__(self, folder, *, layer_order: Sequence[str], hooked_layers: int, calls_per_layer: int = 1,
                 shard_bytes: int = SHARD_BYTES, expected_bytes: Optional[int] = None, overwrite: bool = False,
                 metadata: Optional[dict] = None, on_close=None):
        self.shard_bytes = positive_int(shard_bytes, "shard_bytes")
        self.folder = _prepare_folder(folder, overwrite)
        self._rank = {name: i for i, name in enumerate(layer_order)}
        self._hooked_layers = max(1, hooked_layers)
        self._calls_per_layer = max(1, calls_per_layer)
        self._metadata = dict(metadata or {})
        self._on_close = on_close
        self._lock = threading.RLock()
        self._entries: Dict[str, List[Optional[Tuple[str, str]]]] = {}  # per layer: (file, tensor) or None (pending)
        self._pending: List[Tuple[str, int, torch.Tensor]] = []  # small calls waiting for their shard
        self._pending_bytes = 0
        self._files = 0
        self._open: set = set()  # descriptors of large calls being written
        self._planned = False
        self._dtypes: set = set()
        self.written = 0
        self.closed = False
        self.tokens = None
        if expected_bytes is not None:
            self.check_plan(int(expected_bytes), "")
        self._write_index(complete=False)

    # ----------------------------------------------------------------- public
    @property
    def calls(self) -> Dict[str, int]:
        """``{layer_name: calls written or waiting for their shard}``, layers in model order."""
        with self._lock:
            return {name: len(self._entries[name]) for name in self._ordered_layers()}

    def partial(self, layer: str, padding_mask=None) -> "_StreamedCall":
        """One call of ``layer``, filled a block of query rows at a time (the keeper protocol)."""
        del padding_mask  # kept whole: padded positions are part of the capture
        if self.closed:
            raise AttentionHookerError(f"the capture streamed to {self.folder} is closed; call hooker.stream_to() again")
        return _StreamedCall(self, layer)

    def check_plan(self, planned: int, how: str) -> None:
        """Refuses when ``planned`` bytes (plus a margin) do not fit the folder's free space.

        Raises:
            AttentionHookerError: with both figures and the ways out.
        """
        free = shutil.disk_usage(self.folder).free
        if planned + _MARGIN_BYTES > free:
            raise AttentionHookerError(
                f"this capture writes about {format_bytes(planned)}{how}; {format_bytes(free)} free on {self.folder}: "
                "free some space, stream to another disk, or keep less (heads=, rows=, dtype=torch.float16, "
                "max_calls=)")

    def close(self, *, tokens: Optional[Sequence] = None) -> None:
        """Writes the calls still waiting and the final ``capture.json``; safe to call twice.

        Args:
            tokens: token labels to keep with the capture.
        """
        with self._lock:
            if tokens is not None:
                self.tokens = list(tokens)
            if self.closed:
                if tokens is not None:
                    self._write_index(complete=True)
                return
            self.closed = True
            self._flush_pending()
            for fd in self._open:
                os.close(fd)
            self._open.clear()
            for name in os.listdir(self.folder):
                if name.endswith(".partial"):  # calls cut short (an exception, a refused layer call)
                    os.remove(os.path.join(self.folder, name))
            self._write_index(complete=True)
        if self._on_close is not None:
            self._on_close(self)

    def __enter__(self) -> "StreamedCapture":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        calls = self.calls
        state = "closed" if self.closed else "open"
        return (f"StreamedCapture({self.folder!r}, {len(calls)} layers, {sum(calls.values())} calls, "
                f"{format_bytes(self.written)} written, {state})")

    # --------------------------------------------------------------- writing
    def _plan_first_call(self, nbytes: int) -> None:
        """At the first call: the capture writes about this call's size for every hooked layer and call."""
        with self._lock:
            if self._planned:
                return
            self._planned = True
            planned = nbytes * self._hooked_layers * self._calls_per_layer
        self.check_plan(planned, f" ({format_bytes(nbytes)} per call x {self._hooked_layers} hooked layers"
                                 f" x {self._calls_per_layer} call(s) each)")

    def _open_large(self, shape: Tuple[int, ...], dtype: torch.dtype) -> Tuple[str, int, int]:
        """A file of its own for one large call: header written, space reserved.

        Returns:
            ``(path, data_offset, file descriptor)``.
        """
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            self._files += 1
            name = f"call-{self._files:05d}.safetensors"
        self.check_plan(nbytes, f" more (a {tuple(shape)} call)")
        header = json.dumps({"attention": {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                                           "data_offsets": [0, nbytes]}}).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        path = os.path.join(self.folder, name + ".partial")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, len(header).to_bytes(8, "little") + header)
            data_offset = 8 + len(header)
            if hasattr(os, "posix_fallocate") and nbytes:
                os.posix_fallocate(fd, data_offset, nbytes)  # no "disk full" halfway through the call
        except OSError as err:
            os.close(fd)
            os.remove(path)
            raise AttentionHookerError(f"cannot write the streamed capture file {path}: {err}") from None
        with self._lock:
            self._open.add(fd)
        return path, data_offset, fd

    def _release(self, fd: int) -> None:
        with self._lock:
            if fd in self._open:
                self._open.discard(fd)
                os.close(fd)

    def _commit(self, layer: str, tensor: Optional[torch.Tensor], large_path: Optional[str], nbytes: int) -> None:
        with self._lock:
            calls = self._entries.setdefault(layer, [])
            index = len(calls)
            self.written += nbytes
            if large_path is not None:
                final = large_path[: -len(".partial")]
                os.replace(large_path, final)
                calls.append((os.path.basename(final), "attention"))
                self._write_index(complete=False)
                return
            calls.append(None)
            self._pending.append((layer, index, tensor))
            self._pending_bytes += nbytes
            if self._pending_bytes >= self.shard_bytes:
                self._flush_pending()
                self._write_index(complete=False)

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        self.check_plan(self._pending_bytes, " more (a shard of small calls)")
        self._files += 1
        name = f"calls-{self._files:05d}.safetensors"
        tensors = {f"{self._rank.get(layer, -1)}.{index}": t for layer, index, t in self._pending}
        path = os.path.join(self.folder, name)
        try:
            save_file(tensors, path + ".partial")
            os.replace(path + ".partial", path)
        except OSError as err:
            raise AttentionHookerError(f"cannot write the streamed capture shard {path}: {err}") from None
        for layer, index, _ in self._pending:
            self._entries[layer][index] = (name, f"{self._rank.get(layer, -1)}.{index}")
        self._pending, self._pending_bytes = [], 0

    def _ordered_layers(self) -> List[str]:
        return sorted(self._entries, key=lambda name: self._rank.get(name, len(self._rank)))

    def _write_index(self, *, complete: bool) -> None:
        """``capture.json``: every call on disk (a layer's calls up to its first one still waiting)."""
        layers, calls, files = [], [], []
        for name in self._ordered_layers():
            written = []
            for entry in self._entries[name]:
                if entry is None:
                    break
                written.append(list(entry))
            if written:
                layers.append(name)
                calls.append(len(written))
                files.append(written)
        from . import __version__

        index = {"format": STREAM_FORMAT, "layers": layers, "calls": calls, "files": files, "tokens": self.tokens,
                 "complete": complete, "dtype": sorted(self._dtypes), "library_version": __version__,
                 **self._metadata}
        path = os.path.join(self.folder, INDEX_NAME)
        with open(path + ".partial", "w", encoding="utf-8") as handle:
            json.dump(index, handle)
        os.replace(path + ".partial", path)


class _StreamedCall:
    """One call being written: its rows arrive in order, a block at a time."""

    def __init__(self, owner: StreamedCapture, layer: str):
        self._owner, self._layer = owner, layer
        self._shape: Optional[Tuple[int, ...]] = None
        self._dtype: Optional[torch.dtype] = None
        self._buffer: Optional[torch.Tensor] = None  # small calls: (B, H, R, K) on the CPU
        self._file: Optional[Tuple[str, int, int]] = None  # large calls: (path, data offset, fd)
        self._row = 0

    def begin(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        """Told before the first block: the stored ``(batch, heads, rows, key)`` and dtype."""
        self._shape = tuple(int(n) for n in shape)
        self._dtype = dtype if dtype in _SAFETENSORS_DTYPES else torch.float32
        nbytes = math.prod(self._shape) * torch.empty((), dtype=self._dtype).element_size()
        self._owner._plan_first_call(nbytes)
        self._owner._dtypes.add(str(self._dtype).replace("torch.", ""))
        if nbytes >= self._owner.shard_bytes:
            self._file = self._owner._open_large(self._shape, self._dtype)
        else:
            self._buffer = torch.empty(self._shape, dtype=self._dtype)

    def add(self, block: torch.Tensor, rows: torch.Tensor, n_query: int) -> None:
        """Writes the next ``block`` ``(batch, heads, r, key)`` of query rows."""
        del rows, n_query  # rows arrive in order; the stored shape was given to begin()
        if self._shape is None:
            self.begin(block.shape, block.dtype)
        block = block.detach().to("cpu", self._dtype)
        first, last = self._row, self._row + block.shape[2]
        if last > self._shape[2] or tuple(block.shape[:2]) != self._shape[:2] or block.shape[3] != self._shape[3]:
            raise AttentionHookerError(
                f"a block {tuple(block.shape)} at row {first} does not fit the call {self._shape} of {self._layer!r}")
        if self._buffer is not None:
            self._buffer[:, :, first:last].copy_(block)
        else:
            path, data_offset, fd = self._file
            _, _, n_rows, n_key = self._shape
            row_bytes = n_key * block.element_size()
            block = block.contiguous()
            for b in range(block.shape[0]):
                for h in range(block.shape[1]):
                    offset = data_offset + ((b * self._shape[1] + h) * n_rows + first) * row_bytes
                    os.pwrite(fd, _raw_bytes(block[b, h]), offset)
        self._row = last

    def commit(self) -> None:
        """Hands the finished call to the capture (under the store's lock, in call order)."""
        if self._shape is None:
            return
        if self._row != self._shape[2]:
            self.discard()
            raise AttentionHookerError(f"a call of {self._layer!r} ended after {self._row} of {self._shape[2]} rows")
        nbytes = math.prod(self._shape) * torch.empty((), dtype=self._dtype).element_size()
        path = None
        if self._file is not None:
            path, _, fd = self._file
            self._owner._release(fd)
            self._file = None
        self._owner._commit(self._layer, self._buffer, path, nbytes)
        self._buffer = None

    def discard(self) -> None:
        """Drops a call that will not be kept (its layer call was refused, or cut short)."""
        if self._file is not None:
            path, _, fd = self._file
            self._owner._release(fd)
            if os.path.exists(path):
                os.remove(path)
            self._file = None
        self._buffer = None


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (bfloat16 through int16)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _prepare_folder(folder, overwrite: bool) -> str:
    if not isinstance(folder, (str, os.PathLike)):
        raise AttentionHookerError(f"the stream folder must be a str or os.PathLike, got {type(folder).__name__}")
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise AttentionHookerError(f"cannot stream a capture to {folder}: it is a file; expected a folder")
    if os.path.isdir(folder):
        ours = [n for n in os.listdir(folder)
                if n.startswith(INDEX_NAME) or (n.startswith(_OUR_FILE_PREFIXES) and ".safetensors" in n)]
        if ours and not overwrite:
            raise AttentionHookerError(
                f"{folder} already holds a capture ({len(ours)} files); pass overwrite=True (--overwrite) "
                "to replace it, or pick another folder")
        for name in ours:
            os.remove(os.path.join(folder, name))
    else:
        prepare_output_path(os.path.join(folder, INDEX_NAME), what="streamed capture")
    if not os.access(folder, os.W_OK):
        raise AttentionHookerError(f"cannot stream a capture to {folder}: the folder is not writable")
    return folder


def mapped_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped (nothing is read until touched).

    Raises:
        AttentionHookerError: when the file is not a safetensors file of float tensors.
    """
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
    except (OSError, ValueError) as err:
        raise AttentionHookerError(f"{path} is not a readable safetensors file ({err})") from None
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _NUMPY_DTYPES:
            raise AttentionHookerError(f"{path}: tensor {name!r} has dtype {info.get('dtype')}; expected a float dtype")
        np_dtype, torch_view = _NUMPY_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=torch_view or torch.from_numpy(np.empty(0, np_dtype)).dtype)
            continue
        # copy-on-write: a writable array (torch needs one), changes never reach the file
        array = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + size + begin, shape=shape)
        tensor = torch.from_numpy(array)
        tensors[name] = tensor.view(torch_view) if torch_view is not None else tensor
    return tensors
