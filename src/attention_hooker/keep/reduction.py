"""A reduction as a keeper: the calls of a capture reduced as they come (statistics, pooled
maps, key reductions), a tile of query rows at a time, instead of kept."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .protocol import NO_SOURCES, CallSources

__all__ = ["Reduction"]


class Reduction:
    """Sends each call to ``accumulator.partial(layer, padding_mask, n_query=...)``.

    Args:
        accumulator: a :class:`~attention_hooker.analysis.stats.HeadStatsAccumulator`,
            :class:`~attention_hooker.keep.pooling.PooledAttention` or
            :class:`~attention_hooker.keep.pooling.KeyReductions`: anything whose
            ``partial()`` gives a :class:`~attention_hooker.keep.protocol.CallWriter`.
        padding_mask: ``(batch, tokens)``, 1 for real tokens, for the calls of this batch.
    """

    def __init__(self, accumulator, padding_mask=None):
        self.accumulator = accumulator
        self.padding_mask = padding_mask

    def begin_call(self, layer: str, shape: Tuple[int, ...], dtype: torch.dtype,
                   sources: CallSources = NO_SOURCES):
        del dtype, sources  # reduced in float; nothing but the weights is reduced
        return self.accumulator.partial(layer, self.padding_mask, n_query=shape[2])

    def begin_forward(self) -> None:
        """Nothing to do: each call is reduced on its own."""

    def end_forward(self, *, returned: bool, reason: Optional[str] = None) -> None:
        """Nothing to do: a reduced call stays reduced."""

    def close(self) -> None:
        """Nothing waits: each committed call is in the accumulator."""
