"""How fast a folder's disk takes a stream's writes, measured, and what a streamed capture will cost.

One job: the plan of a stream in bytes, free space and seconds. The speed is measured once per
filesystem and process, by writing a probe file of :data:`PROBE_BYTES` in large blocks that
bypass the page cache (``O_DIRECT``; where the filesystem refuses it, written through the cache
and ``fsync``-ed), timed, and removed: the page cache alone would answer at memory speed, which
says nothing about a capture of many gigabytes.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import shutil
import threading
import time
from typing import Dict, NamedTuple, Optional

from ..values import format_size

__all__ = ["PROBE_BYTES", "write_speed", "StreamPlan"]

PROBE_BYTES = 64 * 2**20  # about 30 ms on a disk that writes 2 GB/s; a second at 64 MB/s
_BLOCK = 4 * 2**20  # each write; page-aligned (an anonymous mapping), as O_DIRECT needs

_measured: Dict[int, Optional[float]] = {}  # st_dev -> bytes per second (None: could not be measured)
_lock = threading.Lock()


def write_speed(folder) -> Optional[float]:
    """Bytes per second at which ``folder``'s disk takes large sequential writes; ``None`` when it
    cannot be measured (the folder is missing or not writable, or the disk lacks the probe's space).

    Measured once per filesystem in this process (the first call writes :data:`PROBE_BYTES` there
    and removes them; later calls answer from memory). A failure is not remembered: another
    folder on the same disk, or the same one once space is freed, is measured again."""
    try:
        device = os.stat(folder).st_dev
    except OSError:
        return None
    with _lock:
        if device in _measured:
            return _measured[device]
    speed = _probe(os.fspath(folder))
    if speed is not None:
        with _lock:
            _measured.setdefault(device, speed)
    return speed


def _probe(folder: str) -> Optional[float]:
    try:
        if shutil.disk_usage(folder).free < 4 * PROBE_BYTES:
            return None  # the probe would take space the capture needs
        block = mmap.mmap(-1, _BLOCK)  # page-aligned: O_DIRECT refuses unaligned buffers
    except OSError:
        return None
    try:
        block.write(b"\x5a" * _BLOCK)  # written pages: a zero page could be deduplicated on the way
        for direct in (True, False):
            try:
                return _timed_write(folder, block, direct)
            except OSError as err:
                if not direct or err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    return None  # no space, not writable: no figure
        return None
    finally:
        block.close()


def _timed_write(folder: str, block: mmap.mmap, direct: bool) -> float:
    """Seconds to put :data:`PROBE_BYTES` on the disk through ``O_DIRECT`` (or the cache and an
    ``fsync``), as bytes per second. The probe is a file without a name where the system makes
    them (``O_TMPFILE``: nothing is left behind, even by a process killed meanwhile), else a named
    one, removed."""
    flags = os.O_WRONLY
    if direct:
        if not getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EOPNOTSUPP, "no O_DIRECT here")
        flags |= os.O_DIRECT
    fd, path = _open_probe(folder, flags)
    try:
        with memoryview(block) as view:
            start = time.perf_counter()
            for _ in range(PROBE_BYTES // _BLOCK):
                done = 0
                while done < _BLOCK:
                    done += os.write(fd, view[done:])
            os.fsync(fd)
            seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
    return PROBE_BYTES / max(seconds, 1e-9)


def _open_probe(folder: str, flags: int):
    """``(fd, path)`` of a new probe file in ``folder``: unnamed (``path`` None) where the
    filesystem offers ``O_TMPFILE``, else named and to be removed."""
    unnamed = getattr(os, "O_TMPFILE", 0)
    if unnamed:
        try:
            return os.open(folder, flags | unnamed, 0o600), None
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.ENOTSUP, errno.EINVAL):
                raise
            if err.errno == errno.EINVAL and flags & getattr(os, "O_DIRECT", 0):
                raise  # O_DIRECT refused: the caller measures through the cache instead
    path = os.path.join(folder, f".write-speed-{os.getpid()}-{secrets.token_hex(4)}.probe")
    return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), path


class StreamPlan(NamedTuple):
    """What a streamed capture is expected to write and how long the disk takes for it.

    Attributes:
        folder: where it writes.
        bytes: the bytes of attention it will write (``None`` until they are known: given as
            ``expected_bytes``, or from the first call's size x the hooked layers x the calls each).
        free_bytes: the folder's free space now (``None``: could not be read).
        write_speed: the disk's measured speed, bytes per second (``None``: not measured).
        seconds: ``bytes / write_speed``: the time the disk needs for it, at the least (the model's
            forward and the weights' computation overlap it, or come on top).
    """

    folder: str
    bytes: Optional[int]
    free_bytes: Optional[int]
    write_speed: Optional[float]

    @property
    def seconds(self) -> Optional[float]:
        if self.bytes is None or not self.write_speed:
            return None
        return self.bytes / self.write_speed

    def describe(self) -> str:
        """One line: what, where, the disk's speed and the time it needs for it."""
        size = "an unknown size until the first call" if self.bytes is None else f"about {_bytes(self.bytes)}"
        free = "free space unknown" if self.free_bytes is None else f"{_bytes(self.free_bytes)} free"
        if self.write_speed is None:
            return f"streaming {size} to {self.folder} ({free}; the disk's speed could not be measured)"
        speed = f"the disk writes {_bytes(self.write_speed)}/s (measured)"
        if self.seconds is None:
            return f"streaming {size} to {self.folder} ({free}; {speed})"
        return f"streaming {size} to {self.folder} ({free}; {speed}): at least {_duration(self.seconds)} of writing"


def _bytes(n: float) -> str:
    return format_size(n, ("B", "KiB", "MiB", "GiB", "TiB"))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"
