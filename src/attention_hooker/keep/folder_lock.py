"""One writer per capture folder: an advisory lock with its owner written in it.

The lock is ``capture.lock`` in the folder, held with ``fcntl.flock`` for as long as the
writer streams; it names its owner (pid, host, start time) so that a second writer is
refused with who holds it. The kernel releases a ``flock`` when its process dies, so a
lock file that nobody holds is stale: it is taken over, with a warning naming the writer
that left it.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> lock = FolderLock.acquire(folder)
    >>> FolderLock.acquire(folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    attention_hooker.errors.AttentionHookerError: ... is being written by pid ...
    >>> lock.release()
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from typing import Optional

from ..errors import AttentionCaptureWarning, AttentionHookerError

__all__ = ["FolderLock", "LOCK_NAME"]

LOCK_NAME = "capture.lock"


class FolderLock:
    """A held lock on one capture folder (see the module). Made by :meth:`acquire`."""

    def __init__(self, folder: str, fd: int):
        self.folder = folder
        self._fd: Optional[int] = fd

    @classmethod
    def acquire(cls, folder: str) -> "FolderLock":
        """Takes the folder's lock, or refuses.

        Raises:
            AttentionHookerError: when another live writer holds it (naming it), or the
                lock file cannot be made.
        """
        import fcntl

        path = os.path.join(folder, LOCK_NAME)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                raise AttentionHookerError(f"cannot lock the capture folder {folder}: {err}") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = _read_owner(fd)
                os.close(fd)
                raise AttentionHookerError(
                    f"{folder} is being written by {owner}: one writer per folder; wait for it to finish, "
                    "or stream to another folder") from None
            if _same_file(fd, path):  # not a lock file its last holder removed meanwhile
                break
            os.close(fd)
        previous = _read_owner(fd, default=None)
        if previous is not None:
            warnings.warn(f"took over the lock of {folder} left by {previous}: that writer is no longer running",
                          AttentionCaptureWarning, stacklevel=3)
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(owner).encode())
        except OSError as err:
            os.close(fd)
            raise AttentionHookerError(f"cannot lock the capture folder {folder}: {err}") from err
        return cls(folder, fd)

    def release(self) -> None:
        """Removes the lock file and lets the lock go; safe to call twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, os.path.join(self.folder, LOCK_NAME)):
                os.remove(os.path.join(self.folder, LOCK_NAME))  # removed while held: see acquire's loop
        except OSError:
            pass  # the folder went away: nothing to release but the descriptor
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this lock is still held."""
        return self._fd is not None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # the kernel lets the flock go; the file stays, stale


def _same_file(fd: int, path: str) -> bool:
    """Whether ``fd`` is the file now at ``path``."""
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_owner(fd: int, default: Optional[str] = "another writer") -> Optional[str]:
    """``pid N on host H (started T)`` from a lock file, or ``default`` when it names nobody."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {int(owner['pid'])} on host {owner['host']} (started {owner['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return default
