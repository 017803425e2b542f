"""The files of a capture on disk, read without trusting them.

A streamed capture is a folder (written by ``keep/stream.py``)::

    capture.json                  the index: layers, calls, tokens, selection, where each call lies,
                                  and its state: "writing", "complete" or "partial"
    capture.log                   while "writing": a line per forward written whole since the index
                                  (its calls' layer, file and tensor); a last line cut short is ignored
    capture.lock                  held while a writer streams into the folder (``keep/folder_lock.py``)
    calls-00001.safetensors       small calls, one shard per forward
    call-00002.safetensors        a call of its own, written a tile of query rows at a time

Everything read here is checked before it is used: the index's types and counts, that
every file it names is a plain regular file inside the folder, and every tensor's dtype,
shape and byte range against its file's header and size, with sizes bounded before
anything is allocated. A failure is an :class:`AttentionHookerError` naming the file and
what was wrong, never a tensor made of the wrong bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import AttentionHookerError

__all__ = ["INDEX_NAME", "LOG_NAME", "STREAM_FORMAT", "STATES", "CheckedFile", "read_index", "mapped_tensors", "CheckedCalls",
           "is_our_file_name", "checked_file", "checked_path", "parse_json", "open_regular"]

INDEX_NAME = "capture.json"
LOG_NAME = "capture.log"  # while writing: one line per forward written whole, after the index's calls
STREAM_FORMAT = "attention-hooker-stream/1"
STATES = ("writing", "complete", "partial")
MAX_INDEX_BYTES = 256 * 2**20
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound on a header
_FILE_NAME = re.compile(r"calls?-[0-9]{5,}\.safetensors")
_OUR_NAMES = re.compile(r"(calls?-[0-9]{5,}\.safetensors|capture\.json|capture\.log)(\.[0-9a-z-]+\.partial|\.partial)?")
_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "F64": (np.float64, None),
           "BF16": (np.int16, torch.bfloat16)}  # numpy has no bfloat16: mapped as int16, viewed back
_ITEM_BYTES = {"F32": 4, "F16": 2, "F64": 8, "BF16": 2}


def is_our_file_name(name: str) -> bool:
    """Whether ``name`` is a file a capture writer makes (index, shard, or their temporary names)."""
    return _OUR_NAMES.fullmatch(name) is not None


def _damaged(where: str, what: str) -> AttentionHookerError:
    return AttentionHookerError(f"{where} is damaged: {what}")


def open_regular(folder: str, name: str, where: str) -> int:
    """A read-only descriptor of ``folder/name``: a plain file name, a regular file, not a link.

    Raises:
        AttentionHookerError: for a name with a path in it, a link, a FIFO or device, or a
            missing file.
    """
    if not isinstance(name, str) or _FILE_NAME.fullmatch(name) is None:
        raise _damaged(where, f"it names the file {name!r}; expected a shard name like 'calls-00001.safetensors' "
                              "inside the folder")
    path = os.path.join(folder, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _damaged(where, f"{name} is missing") from None
    except OSError as err:
        raise _damaged(where, f"{name} cannot be opened as a plain file ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _damaged(where, f"{name} is not a regular file")
    return fd


def read_index(folder: str) -> dict:
    """The index of a streamed capture, every field checked.

    Returns:
        The index, with ``layers`` (str), ``files`` (per layer, ``[file, tensor]`` per call)
        and ``forwards`` (per layer, the forward of each call, or ``None``) of equal length.

    Raises:
        AttentionHookerError: naming ``capture.json`` and the field that is wrong.
    """
    path = os.path.join(folder, INDEX_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise AttentionHookerError(f"{path}: cannot open the capture index ({err.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_INDEX_BYTES:
            raise AttentionHookerError(f"{path}: unreadable capture index (not a regular file of at most "
                                       f"{MAX_INDEX_BYTES} bytes); expected {STREAM_FORMAT}")
        raw = handle.read(MAX_INDEX_BYTES + 1)
    index = parse_json(raw, f"{path}: unreadable capture index", STREAM_FORMAT, ("layers", "files"))
    _check_index(index, path)
    if index["state"] == "writing" and index.get("log") is not None:
        _replay_log(folder, index, path)
        _check_index(index, path)
    return index


def _replay_log(folder: str, index: dict, where: str) -> None:
    """Adds the units ``capture.log`` lists to ``index`` (a capture being written, or whose
    writer stopped): every whole line; a last line without its end is one being written."""
    log = os.path.join(folder, LOG_NAME)
    try:
        fd = os.open(log, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as err:
        raise _damaged(where, f"its {LOG_NAME} cannot be opened as a plain file ({err.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _damaged(where, f"{LOG_NAME} is not a regular file")
        raw = handle.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES or not all(isinstance(index.get(k), list) for k in ("layers", "files")):
        raise _damaged(where, f"{LOG_NAME} is over {MAX_INDEX_BYTES} bytes, or the index lists no calls to add to")
    order = index.get("layer_order") if isinstance(index.get("layer_order"), list) else []
    calls_of = {name: list(zip(files, forwards)) for name, files, forwards in zip(
        index["layers"], index["files"], index.get("forwards", [[None] * len(f) for f in index["files"]]))}
    for number, line in enumerate(raw.split(b"\n")[:-1]):
        try:
            unit = json.loads(line)
            calls = unit["calls"]
            if not _is_int(unit["unit"]) or not all(
                    isinstance(c, list) and len(c) == 3 and all(isinstance(s, str) for s in c) for c in calls):
                raise ValueError("not a unit of [layer, file, tensor] calls")
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            raise _damaged(where, f"line {number + 1} of {LOG_NAME} is unreadable ({err})") from None
        for layer, file, tensor in calls:
            calls_of.setdefault(layer, []).append(([file, tensor], unit["unit"]))
    rank = {name: i for i, name in enumerate(order) if isinstance(name, str)}
    layers = sorted(calls_of, key=lambda name: rank.get(name, len(rank)))
    index.update(layers=layers, files=[[f for f, _ in calls_of[n]] for n in layers],
                 forwards=[[k for _, k in calls_of[n]] for n in layers], calls=[len(calls_of[n]) for n in layers])


def parse_json(raw, what: str, expected_format: str, keys: Sequence[str]) -> dict:
    """JSON metadata (bytes or str), checked for its format and ``keys``.

    Raises:
        AttentionHookerError: ``what``, why, and the format expected.
    """
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict) or meta.get("format") != expected_format:
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else None!r}")
        missing = [key for key in keys if key not in meta]
        if missing:
            raise KeyError(missing[0])
    except (ValueError, KeyError, TypeError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise AttentionHookerError(f"{what} ({err}); expected {expected_format}") from None
    return meta


def _check_index(index: dict, where: str) -> None:
    layers, files = index["layers"], index["files"]
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers) or len(set(layers)) != len(layers):
        raise _damaged(where, "'layers' is not a list of distinct layer names")
    if not isinstance(files, list) or len(files) != len(layers):
        raise _damaged(where, f"'files' has {_length(files)} entries for {len(layers)} layers")
    for name, calls in zip(layers, files):
        if not isinstance(calls, list) or not all(
                isinstance(c, list) and len(c) == 2 and all(isinstance(s, str) for s in c) for c in calls):
            raise _damaged(where, f"the calls of layer {name!r} are not [file, tensor] pairs")
    counts = index.get("calls", [len(c) for c in files])
    if counts != [len(c) for c in files]:
        raise _damaged(where, f"'calls' says {counts!r} but 'files' lists {[len(c) for c in files]}")
    forwards = index.setdefault("forwards", [[None] * len(c) for c in files])
    if (not isinstance(forwards, list) or len(forwards) != len(files)
            or any(not isinstance(f, list) or len(f) != len(c) for f, c in zip(forwards, files))
            or not all(_is_int(k) or k is None for f in forwards for k in f)):
        raise _damaged(where, "'forwards' does not give one forward number per call")
    state = index.setdefault("state", "complete" if index.get("complete") is True else "partial")
    if state not in STATES:
        raise _damaged(where, f"'state' is {state!r}; expected one of {STATES}")
    tokens = index.get("tokens")
    if tokens is not None and not (isinstance(tokens, list) and all(
            _is_label(t) or (isinstance(t, list) and all(_is_label(s) for s in t)) for t in tokens)):
        raise _damaged(where, "'tokens' is not a list of token labels")


def _is_label(value) -> bool:
    return value is None or isinstance(value, (str, int, float))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _length(value) -> str:
    return str(len(value)) if isinstance(value, list) else type(value).__name__


class CheckedFile:
    """A safetensors file whose header was checked against its size, and that is checked
    again before each use (a file truncated under a mapping would kill the process with
    SIGBUS; a changed one raises instead)."""

    def __init__(self, path: str, fd: int, where: str):
        self.path = path
        info = os.fstat(fd)
        self._identity = (info.st_dev, info.st_ino)
        self.size = info.st_size
        self.header, self.data_start = _read_header(fd, self.size, where)

    def check(self) -> None:
        """Raises when the file was replaced or cut since it was checked."""
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except OSError as err:
            raise AttentionHookerError(f"{self.path} changed on disk after the capture was loaded: {err.strerror}; "
                                       "load it again") from None
        if (info.st_dev, info.st_ino) != self._identity or info.st_size < self.size:
            raise AttentionHookerError(f"{self.path} changed on disk after the capture was loaded (replaced or "
                                       f"cut to {info.st_size} of {self.size} bytes); load it again")

    def tensors(self, *, lazy: bool) -> Dict[str, torch.Tensor]:
        """Every tensor of the file: mapped (``lazy``: one private mapping of the file, no
        descriptor kept, pages read when touched) or read from it.

        Raises:
            AttentionHookerError: when the file changed since it was checked.
        """
        data = self._mapped() if lazy else self._read()
        tensors = {}
        for name, (code, shape, begin, end) in self.header.items():
            np_dtype, torch_view = _DTYPES[code]
            dtype = torch_view or torch.from_numpy(np.empty(0, np_dtype)).dtype
            itemsize = _ITEM_BYTES[code]
            start = (self.data_start if lazy else 0) + begin
            if start % itemsize == 0:  # a tensor on the file's bytes (memory-mapped or read)
                tensor = torch.empty(0, dtype=dtype).set_(data, start // itemsize, shape)
            else:  # an unaligned tensor (a header not padded as safetensors pads it): copied out
                raw = torch.empty(0, dtype=torch.uint8).set_(data, start, (end - begin,)).clone()
                tensor = raw.view(dtype).reshape(shape)
            tensors[name] = tensor
        return tensors

    def _mapped(self) -> torch.UntypedStorage:
        self.check()
        try:
            storage = torch.UntypedStorage.from_file(self.path, shared=False, nbytes=self.size)
        except (RuntimeError, OSError) as err:
            raise AttentionHookerError(f"{self.path} cannot be mapped ({err}); load it again") from None
        self.check()  # the file mapped is the file checked (not replaced meanwhile)
        return storage

    def _read(self) -> torch.UntypedStorage:
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != self._identity or not stat.S_ISREG(info.st_mode):
                raise AttentionHookerError(f"{self.path} changed on disk while it was loaded; load it again")
            size = self.size - self.data_start
            data = bytearray(size)
            view, done = memoryview(data), 0
            while done < size:
                got = os.preadv(fd, [view[done:]], self.data_start + done)
                if got == 0:
                    raise AttentionHookerError(f"{self.path} was cut while it was read; load it again")
                done += got
        finally:
            os.close(fd)
        return torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if size else torch.UntypedStorage(0)


def _read_header(fd: int, size: int, where: str) -> Tuple[Dict[str, tuple], int]:
    """``{tensor: (dtype code, shape, begin, end)}`` and where the data starts, all checked."""
    name = os.path.basename(where)
    if size < 8:
        raise _damaged(where, f"{size} bytes, too short for a safetensors header")
    length = int.from_bytes(os.pread(fd, 8, 0), "little")
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise _damaged(where, f"its header claims {length} bytes; the file has {size}")
    try:
        header = json.loads(os.pread(fd, length, 8))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as err:
        raise _damaged(where, f"unreadable safetensors header ({err})") from None
    data_size = size - 8 - length
    found, spans = {}, []
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        found[tensor] = _check_tensor(info, tensor, data_size, name, where)
        spans.append(found[tensor][2:])
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise _damaged(where, f"its tensors' bytes overlap or leave a gap at byte {position}")
        position = end
    if position != data_size:
        raise _damaged(where, f"its tensors hold {position} bytes of data; the file holds {data_size}")
    return found, 8 + length


def _check_tensor(info, tensor: str, data_size: int, name: str, where: str) -> tuple:
    if not isinstance(info, dict):
        raise _damaged(where, f"tensor {tensor!r} has no dtype, shape and offsets")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str) or code not in _DTYPES:
        raise _damaged(where, f"tensor {tensor!r} has dtype {code!r}; expected one of {sorted(_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(n) and 0 <= n < 2**40 for n in shape):
        raise _damaged(where, f"tensor {tensor!r} has shape {shape!r}; expected a list of at most 8 sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(n) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size):
        raise _damaged(where, f"tensor {tensor!r} has offsets {offsets!r}; expected [begin, end] within the "
                              f"{data_size} bytes of data of {name}")
    if math.prod(shape) * _ITEM_BYTES[code] != offsets[1] - offsets[0]:
        raise _damaged(where, f"tensor {tensor!r} of shape {shape} and dtype {code} needs "
                              f"{math.prod(shape) * _ITEM_BYTES[code]} bytes; its offsets give {offsets[1] - offsets[0]}")
    return code, tuple(shape), offsets[0], offsets[1]


def checked_file(folder: str, name: str, where: str) -> CheckedFile:
    """:class:`CheckedFile` of ``folder/name`` (a plain file name, see :func:`open_regular`)."""
    fd = open_regular(folder, name, where)
    try:
        return CheckedFile(os.path.join(folder, name), fd, os.path.join(folder, name))
    finally:
        os.close(fd)


def checked_path(path: str) -> CheckedFile:
    """:class:`CheckedFile` of a safetensors file named by its path (a regular file).

    Raises:
        AttentionHookerError: when the file is not a well-formed safetensors file of float tensors.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise AttentionHookerError(f"{path} is not a readable safetensors file ({err.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AttentionHookerError(f"{path} is not a regular file")
        return CheckedFile(path, fd, path)
    finally:
        os.close(fd)


def mapped_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped (nothing is read until touched),
    after its header was checked against its size.

    Raises:
        AttentionHookerError: when the file is not a well-formed safetensors file of float tensors.
    """
    return checked_path(path).tensors(lazy=True)


class CheckedCalls(list):
    """A layer's calls from files on disk: each access checks first that the call's file
    is still the one that was loaded (:meth:`CheckedFile.check`). A list in every way (the
    mutators keep each call with its file; calls added by hand have none to check); torch
    functions that read a list in C (``torch.stack(calls)``) see the tensors unchecked."""

    def __init__(self, calls: List[torch.Tensor], files: List[Optional[CheckedFile]]):
        super().__init__(calls)
        self._files = list(files)

    def __getitem__(self, index):
        files = self._files[index]
        for file in files if isinstance(files, list) else [files]:
            if file is not None:
                file.check()
        return super().__getitem__(index)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __reduce__(self):
        return list, (list(list.__iter__(self)),)

    # The mutators keep ``_files`` in step with the calls.
    def append(self, call) -> None:
        super().append(call)
        self._files.append(None)

    def extend(self, calls) -> None:
        calls = list(calls)
        super().extend(calls)
        self._files.extend([None] * len(calls))

    def __iadd__(self, calls):
        self.extend(calls)
        return self

    def insert(self, index, call) -> None:
        super().insert(index, call)
        self._files.insert(index, None)

    def __setitem__(self, index, value) -> None:
        before = len(self)
        super().__setitem__(index, value)
        if not isinstance(index, slice):
            self._files[index] = None
        elif index.step not in (None, 1):  # an extended slice keeps the length
            self._files[index] = [None] * len(range(*index.indices(before)))
        else:
            start, stop, _ = index.indices(before)
            stop = max(start, stop)
            self._files[start:stop] = [None] * (len(self) - before + stop - start)

    def __delitem__(self, index) -> None:
        super().__delitem__(index)
        del self._files[index]

    def pop(self, index=-1):
        self._files.pop(index)
        return super().pop(index)

    def remove(self, call) -> None:
        del self[next(i for i, c in enumerate(list.__iter__(self)) if c is call or c == call)]

    def clear(self) -> None:
        super().clear()
        self._files.clear()

    def reverse(self) -> None:
        super().reverse()
        self._files.reverse()

    def sort(self, *args, **kwargs) -> None:
        raise TypeError("a capture's calls are in call order; sorted(calls, key=...) gives a sorted copy")

    @staticmethod
    def joined(first: Optional[list], second: list) -> list:
        """``first + second``, keeping the checks of either."""
        first = [] if first is None else first
        files = [getattr(calls, "_files", [None] * len(calls)) for calls in (first, second)]
        return CheckedCalls(list(list.__iter__(first)) + list(list.__iter__(second)), files[0] + files[1])
