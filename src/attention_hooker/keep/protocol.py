"""What a keeper is: where the calls of a capture go (memory, a folder on disk, a reduction).

A capture hands each attention call it keeps to its keepers through one protocol, and
knows no particular keeper:

1. ``writer = keeper.begin_call(layer, shape, dtype, sources)``: a call of ``layer`` is
   coming, stored as ``shape = (batch, heads, rows, keys)`` in ``dtype`` (the selection
   already applied);
2. ``writer.write(rows, block)``, any number of times: the query rows ``rows`` (absolute
   indices of the call's rows, ``(r,)``) as ``block`` ``(batch, heads, r, keys)``, in
   order; a block is valid during the call only (a keeper copies what it keeps);
3. ``writer.commit()`` once every row came (the call is kept), or ``writer.discard()``
   (it is not: its layer call was refused, cut short or not wanted; safe twice).

Forwards are framed by ``begin_forward()`` and ``end_forward(returned, reason)`` (a keeper
that writes a forward whole or not at all needs them), and ``close()`` ends the keeper's
part in the capture (what waits is written). Both are required; a keeper with nothing to
do there does nothing.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import torch

from ..errors import AttentionHookerError

__all__ = ["CallWriter", "Keeper", "CallSources", "GradientSource", "NO_SOURCES", "check_keeper"]


class GradientSource(NamedTuple):
    """Where the gradient of a stored call's weights comes from when the weights are not in
    the autograd graph themselves: ``tensor`` is, and ``to_weights(d(loss)/d(tensor))`` is
    d(loss)/d(weights) ``(batch, heads, query, key)`` (the sdpa route: ``tensor`` is the real
    kernel's output ``O = P V``, so ``d(loss)/d(P) = d(loss)/d(O) @ V^T``)."""

    tensor: torch.Tensor
    to_weights: Callable[[torch.Tensor], torch.Tensor]


class CallSources(NamedTuple):
    """What the in-memory keeper keeps beside a call's weights (other keepers ignore it).

    Attributes:
        graph_tensor: with ``keep_grad``: the tensor of the autograd graph whose gradient
            gives the weights' (the weights themselves when ``None``), or a
            :class:`GradientSource`.
        gradient_scale: the gradient with respect to the weights is ``graph_tensor``'s
            times this (weights before dropout, ``graph_tensor`` the ones after it).
        value: with ``keep_values``: the call's value vectors ``(batch, kv_heads, key, head_dim)``.
        windows: a windowed call kept per window (``windows="keep"``): its
            :class:`~attention_hooker.window_index.WindowIndex`.
        kind: what the call is when it is not attention probabilities over tokens (a
            :class:`~attention_hooker._map_kinds.MapKind`: the map that multiplies the values
            but is not a softmax, a map over channels), or ``None``. Every keeper keeps it
            beside the call (memory marks the stored tensor, a folder's index names it, a
            reduction that needs probabilities refuses the call).
    """

    graph_tensor: Optional[object] = None
    gradient_scale: Optional[torch.Tensor] = None
    value: Optional[torch.Tensor] = None
    windows: Optional[object] = None
    kind: Optional[object] = None


NO_SOURCES = CallSources()


@runtime_checkable
class CallWriter(Protocol):
    """One call of one layer on its way into a keeper, a block of query rows at a time.

    Two optional attributes let a writer take blocks in a cheaper form (read by the sdpa
    route, :class:`~attention_hooker.capture.routes.sdpa.TileNeeds`):

    - ``takes_narrow_blocks = True``: a block may be ``(batch, heads, r, width)`` with
      ``width`` below the call's keys; the keys after ``width`` are zeros (a causal mask's).
      An accumulator's writer with it is told the call's keys in ``n_key`` by the reduction.
    - ``wants_log_probabilities = True``: ``write(rows, block, log_block=...)`` may also give
      ``log(block)``, 0 wherever ``block`` is 0.
    - ``takes_key_bands = True`` (with ``takes_narrow_blocks``): ``write(rows, block, first_key=lo)``
      may give a block ``(batch, heads, r, width)`` of the keys ``lo .. lo + width - 1`` only; every
      other key of those rows is zero (a sliding window's, a chunk's: keys a mask hides from all of them).
    """

    def write(self, rows: torch.Tensor, block: torch.Tensor) -> None:
        """Takes the query rows ``rows`` ``(r,)`` of the call: ``block`` is ``(batch, heads, r, keys)``."""

    def commit(self) -> None:
        """Keeps the call; every row has been written."""

    def discard(self) -> None:
        """Drops the call (and anything written of it); safe twice."""


@runtime_checkable
class Keeper(Protocol):
    """Where the calls of a capture go."""

    def begin_call(self, layer: str, shape: Tuple[int, ...], dtype: torch.dtype,
                   sources: CallSources = NO_SOURCES) -> CallWriter:
        """A writer for the next call of ``layer``, stored ``shape`` ``(batch, heads, rows, keys)`` in ``dtype``."""

    def begin_forward(self) -> None:
        """A forward of the model begins (with nothing of another forward open)."""

    def end_forward(self, *, returned: bool, reason: Optional[str] = None) -> None:
        """The forward that began last ended: ``returned``, or not (``reason``)."""

    def close(self) -> None:
        """No more calls come; what waits is kept."""


def check_keeper(keeper) -> None:
    """Raises unless ``keeper`` has every method of :class:`Keeper`."""
    missing = [name for name in ("begin_call", "begin_forward", "end_forward", "close")
               if not callable(getattr(keeper, name, None))]
    if missing:
        raise AttentionHookerError(
            f"{type(keeper).__name__} is not a keeper: it lacks {', '.join(missing)} "
            "(see attention_hooker.keep.protocol.Keeper)")
