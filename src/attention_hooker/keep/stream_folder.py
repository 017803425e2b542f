"""The folder a streamed capture writes into: its files, each written whole or removed.

One job: bytes to disk, and every failure as an :class:`AttentionHookerError` naming the
folder, what was written and the cause, chained to the OS error. The folder is locked for
as long as a :class:`CaptureFolder` holds it (``keep/folder_lock.py``); what the files mean is
``keep/stream.py``'s, how they are laid out ``io/format.py``'s.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from typing import List, Optional, Sequence

import torch

from .._checks import prepare_output_path
from ..io.format import INDEX_NAME, LOG_NAME, is_our_file_name
from ..errors import AttentionHookerError
from .folder_lock import FolderLock
from ..values import format_size

__all__ = ["CaptureFolder", "SAFETENSORS_DTYPES", "format_bytes"]

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
MARGIN_BYTES = 64 * 2**20  # left free on the disk for everything else writing there (a tenth of a small disk)


def format_bytes(n: float) -> str:
    """``12.4 GiB``-style size."""
    return format_size(n, ("B", "KiB", "MiB", "GiB", "TiB"))


class CaptureFolder:
    """A capture folder, made, locked, and emptied of our files when ``overwrite``.

    Args:
        folder: the folder (created when missing).
        overwrite: remove a capture already in it (only our own files); without it, a
            folder holding one is refused.

    Raises:
        AttentionHookerError: when the folder is a file, is not writable, holds another
            capture, or another writer holds it.
    """

    def __init__(self, folder, *, overwrite: bool):
        self.path = _checked_folder(folder)
        self._lock = FolderLock.acquire(self.path)  # before anything is looked at or removed
        self.suffix = f".{os.getpid()}-{secrets.token_hex(4)}.partial"  # this writer's temporary names
        self._log_fd: Optional[int] = None
        self._log_size = 0
        try:
            ours = [n for n in os.listdir(self.path) if is_our_file_name(n)]
            if ours and not overwrite:
                raise AttentionHookerError(
                    f"{self.path} already holds a capture ({len(ours)} files); pass overwrite=True (--overwrite) "
                    "to replace it, or pick another folder")
            for name in ours:
                os.remove(os.path.join(self.path, name))
        except OSError as err:
            self._lock.release()
            raise AttentionHookerError(f"cannot replace the capture in {self.path}: {err}") from err
        except BaseException:
            self._lock.release()
            raise

    def error(self, what: str, err: OSError) -> AttentionHookerError:
        """The library's error for a failed ``what`` (chain it: ``raise ... from err``)."""
        return AttentionHookerError(f"cannot write the capture streamed to {self.path}: {what} failed: "
                                    f"{err.strerror or err} (errno {err.errno})")

    def check_space(self, planned: int, how: str) -> None:
        """Refuses when ``planned`` bytes (plus a margin) do not fit the folder's free space.

        Raises:
            AttentionHookerError: with both figures, the margin, and the ways out.
        """
        try:
            usage = shutil.disk_usage(self.path)
        except OSError as err:
            raise self.error(f"measuring the free space for {format_bytes(planned)}{how}", err) from err
        margin = min(MARGIN_BYTES, usage.total // 10)
        if planned + margin > usage.free:
            raise AttentionHookerError(
                f"this capture writes about {format_bytes(planned)}{how}, and {format_bytes(margin)} are kept free "
                f"for everything else; {format_bytes(usage.free)} free on {self.path}: free some space, stream to "
                "another disk, or keep less (heads=, rows=, dtype=torch.float16, max_calls=)")

    # ----------------------------------------------------------------- files
    def write_shard(self, name: str, tensors: List[torch.Tensor], what: str) -> None:
        """A safetensors file of ``tensors`` (named ``"0"``, ``"1"``, ...), written at its final
        name with one ``writev``: no index lists it before it is whole, and it is removed
        when a write fails."""
        header, offset = {}, 0
        for i, tensor in enumerate(tensors):
            nbytes = tensor.numel() * tensor.element_size()
            header[str(i)] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        path = os.path.join(self.path, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as err:
            raise self.error(what, err) from err
        try:
            _write_all(fd, [header_bytes(header)] + [raw_bytes(t.contiguous().reshape(-1)) for t in tensors])
        except OSError as err:
            remove_quietly(path)
            raise self.error(what, err) from err
        finally:
            os.close(fd)

    def write_atomically(self, name: str, data: bytes, what: str) -> None:
        """``data`` into ``name`` whole: written aside under this writer's temporary name, then
        renamed (a reader sees the old file or the new one, never half)."""
        path = os.path.join(self.path, name)
        try:
            with open(path + self.suffix, "wb") as handle:
                handle.write(data)
            os.replace(path + self.suffix, path)
        except OSError as err:
            remove_quietly(path + self.suffix)
            raise self.error(what, err) from err

    def open_call_file(self, name: str, header: dict, nbytes: int, what: str) -> tuple:
        """A call's own file under this writer's temporary name: header written, ``nbytes``
        reserved (no "disk full" halfway through the call), reading as zeros until written (the
        zeros of a causal map are never written).

        Returns:
            ``(file descriptor, data offset)``.
        """
        path = os.path.join(self.path, name + self.suffix)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as err:
            raise self.error(f"creating {name} for {what}", err) from err
        encoded = header_bytes(header)
        try:
            os.write(fd, encoded)
            if hasattr(os, "posix_fallocate") and nbytes:
                os.posix_fallocate(fd, len(encoded), nbytes)  # reads as zeros until written
            else:
                os.ftruncate(fd, len(encoded) + nbytes)  # a hole: zeros too
        except OSError as err:
            os.close(fd)
            remove_quietly(path)
            raise self.error(f"reserving {format_bytes(nbytes)} in {name} for {what}", err) from err
        return fd, len(encoded)

    def finish_call_file(self, name: str, what: str) -> None:
        """Gives a call's own file its final name."""
        path = os.path.join(self.path, name)
        try:
            os.replace(path + self.suffix, path)
        except OSError as err:
            remove_quietly(path + self.suffix)
            raise self.error(f"finishing {name} ({what})", err) from err

    def remove(self, name: str, *, temporary: bool = False) -> None:
        """Removes one of our files (its temporary name with ``temporary``), if it is there."""
        remove_quietly(os.path.join(self.path, name + (self.suffix if temporary else "")))

    def remove_temporary_files(self) -> None:
        """Removes what this writer left under its temporary names (calls cut short)."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return  # the folder is gone: writing the index says so
        for name in names:
            if name.endswith(self.suffix):
                remove_quietly(os.path.join(self.path, name))

    # ------------------------------------------------------------------- log
    @property
    def logging(self) -> bool:
        """Whether ``capture.log`` takes the units written whole."""
        return self._log_fd is not None

    def open_log(self) -> None:
        try:
            self._log_fd = os.open(os.path.join(self.path, LOG_NAME),
                                   os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        except OSError as err:
            raise self.error(f"creating {LOG_NAME}", err) from err

    def append_log(self, entry: dict, what: str) -> None:
        """One line in ``capture.log``, whole or not at all: a line cut short is cut off again;
        if even that fails, the log is dropped (:attr:`logging` turns false; the caller then
        writes the whole index, which tells readers to ignore the log) and the error raised."""
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        try:
            written = os.write(self._log_fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(line)} bytes")
        except OSError as err:
            try:
                os.ftruncate(self._log_fd, self._log_size)
            except OSError:
                self.drop_log(remove=False)
            raise self.error(f"appending {what} to {LOG_NAME}", err) from err
        self._log_size += written

    def drop_log(self, *, remove: bool) -> None:
        fd, self._log_fd = self._log_fd, None
        if fd is not None:
            os.close(fd)
        if remove:
            remove_quietly(os.path.join(self.path, LOG_NAME))

    def release(self) -> None:
        """Closes the log and lets the folder's lock go; safe to call twice."""
        self.drop_log(remove=False)
        self._lock.release()


def _checked_folder(folder) -> str:
    if not isinstance(folder, (str, os.PathLike)):
        raise AttentionHookerError(f"the stream folder must be a str or os.PathLike, got {type(folder).__name__}")
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise AttentionHookerError(f"cannot stream a capture to {folder}: it is a file; expected a folder")
    if not os.path.isdir(folder):
        prepare_output_path(os.path.join(folder, INDEX_NAME), what="streamed capture")
    if not os.access(folder, os.W_OK):
        raise AttentionHookerError(f"cannot stream a capture to {folder}: the folder is not writable")
    return folder


def header_bytes(header: dict) -> bytes:
    """A safetensors header: its length (8 bytes, little-endian), then the JSON padded with
    spaces so that the data starts 8-byte aligned, as safetensors writes it."""
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _write_all(fd: int, parts: Sequence) -> None:
    """Every byte of ``parts`` (bytes or memoryviews) to ``fd``, in as few system calls as it takes."""
    parts = [memoryview(p).cast("B") for p in parts if len(p)]
    while parts:
        written = os.writev(fd, parts[:1024])
        while parts and written >= len(parts[0]):
            written -= len(parts[0])
            parts.pop(0)
        if written:
            parts[0] = parts[0][written:]


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (bfloat16 through int16)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass  # already gone, or the folder is: nothing of ours is left to list
