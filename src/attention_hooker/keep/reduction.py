"""A reduction as a keeper: the calls of a capture reduced as they come (statistics, pooled
maps, key reductions), a tile of query rows at a time, instead of kept."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import AttentionHookerError
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

    An accumulator whose ``needs_probabilities`` is true (head statistics) refuses a call the
    capture says is another kind of map (``sources.kind``: DiffLlama's differential map, a map
    over channels, ...), naming it: its statistics would be numbers with a wrong meaning.
    """

    def __init__(self, accumulator, padding_mask=None):
        self.accumulator = accumulator
        self.padding_mask = padding_mask

    def begin_call(self, layer: str, shape: Tuple[int, ...], dtype: torch.dtype,
                   sources: CallSources = NO_SOURCES):
        del dtype  # reduced in float
        if sources.kind is not None and getattr(self.accumulator, "needs_probabilities", False):
            raise AttentionHookerError(
                f"layer {layer!r} stores {sources.kind}, not attention probabilities over tokens: its head "
                "statistics would not mean what they say; leave the layer out (layer_regex=) of the reduction")
        writer = self.accumulator.partial(layer, self.padding_mask, n_query=shape[2])
        if getattr(writer, "takes_narrow_blocks", False):
            writer.n_key = shape[3]  # blocks may stop before the last key: the call's keys are told
        return writer

    def begin_forward(self) -> None:
        """Nothing to do: each call is reduced on its own."""

    def end_forward(self, *, returned: bool, reason: Optional[str] = None) -> None:
        """Nothing to do: a reduced call stays reduced."""

    def close(self) -> None:
        """Nothing waits: each committed call is in the accumulator."""
