"""The result type: ``{layer_name: [tensor per call]}``, each ``(batch, heads, query, key)``.

What a hooker, a loaded capture and the many-process helpers hand out; below every layer
that makes one.
"""

from __future__ import annotations

import re

from typing import Sequence

__all__ = ["AttentionValues", "format_size", "natural_order"]


class AttentionValues(dict):
    """``{layer_name: [tensor per call]}``, each tensor ``(batch, heads, query, key)``.

    A plain ``dict`` with a one-line ``repr`` that says how much it holds. The one a
    hooker fills can be read while other threads record into it: iterating it
    (``for name in values``, ``items()``, ``keys()``, ``values()``) goes over a snapshot
    taken under the store's lock, never "dictionary changed size during iteration".
    """

    _guard = None  # the store's lock, for the dict a hooker fills (a class default: unpickled ones have none)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._guard = None

    def _snapshot(self) -> list:
        """``[(layer_name, calls)]`` as they are now (dict views of a copy are handed out)."""
        guard = self._guard
        if guard is None:
            return list(dict.items(self))
        with guard:
            return list(dict.items(self))

    def __iter__(self):
        return iter([name for name, _ in self._snapshot()])

    def keys(self):
        return dict(self._snapshot()).keys()

    def values(self):
        return dict(self._snapshot()).values()

    def items(self):
        return dict(self._snapshot()).items()

    def __getitem__(self, name):
        guard = self._guard
        if guard is None:
            return dict.__getitem__(self, name)
        with guard:
            return dict.__getitem__(self, name)

    def get(self, name, default=None):
        guard = self._guard
        if guard is None:
            return dict.get(self, name, default)
        with guard:
            return dict.get(self, name, default)

    def __reduce__(self):
        return type(self), (self._snapshot(),)

    def copy(self) -> "AttentionValues":
        return AttentionValues(self._snapshot())

    def __repr__(self) -> str:
        calls = sum(len(v) for v in self.values())
        return f"AttentionValues({len(self)} layers, {calls} calls, {format_size(self.nbytes)})"

    @property
    def nbytes(self) -> int:
        """Bytes held by all stored tensors."""
        return sum(t.numel() * t.element_size() for v in self.values() for t in v if t is not None)


def format_size(n: float, units: Sequence[str] = ("B", "KB", "MB", "GB")) -> str:
    """``3.1 KB``-style size, in steps of 1024 up to the last of ``units``."""
    for unit in units:
        if n < 1024 or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == units[0] else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def natural_order(name: str) -> list:
    """A sort key that puts ``req_2`` before ``req_10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]
