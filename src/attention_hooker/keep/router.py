"""The router between a capture and its keepers: one call handed to every keeper that
wants it, each told the call's shape first when it asks."""

from __future__ import annotations

import torch

__all__ = ["Fanout", "begin_partial"]


class Fanout:
    """One call handed to several keepers at once (a stream to disk and a pooled map for pictures)."""

    def __init__(self, parts: list):
        self.parts = parts

    def begin(self, shape, dtype) -> None:
        for part in self.parts:
            begin_partial(part, shape, dtype)

    def add(self, block, rows, n_query) -> None:
        for part in self.parts:
            part.add(block, rows, n_query)

    def commit(self) -> None:
        for part in self.parts:
            part.commit()

    def discard(self) -> None:
        for part in self.parts:
            getattr(part, "discard", lambda: None)()


def begin_partial(partial, shape, dtype: torch.dtype) -> None:
    """Tells a keeper's partial call its whole stored ``(batch, heads, rows, key)`` and
    dtype before its first block, when it asks (a streamed call needs them to lay out
    its file); reductions do not."""
    begin = getattr(partial, "begin", None)
    if begin is not None:
        begin(tuple(shape), dtype)
