"""What a run's heads computed, kept to patch another run with (or to take a mean from)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn


__all__ = ["HeadRecording", "record_heads"]


class HeadRecording:
    """The head outputs (and, when asked, weights) of every call of some layers in one run.

    Made by :func:`record_heads`; used by :meth:`HeadIntervention.patch` (write them into a
    run on another input) and :meth:`HeadIntervention.knock_out` (``mode="mean"``).

    Attributes:
        outputs: ``{layer: [tensor per call]}``, each ``(batch, heads, query, head_dim)``: each
            head's output (its weights times its values), before the heads are merged.
        weights: ``{layer: [tensor per call]}``, each ``(batch, heads, query, key)``; empty
            unless recorded with ``weights=True``.
    """

    def __init__(self, model: nn.Module, layers: Optional[Sequence[str]], keep_weights: bool):
        from .plans import refuse_compiled

        refuse_compiled(model)
        self.outputs: Dict[str, List[torch.Tensor]] = {}
        self.weights: Dict[str, List[torch.Tensor]] = {}
        self.keep_weights = keep_weights
        self._model = model
        self._layers = layers
        self._engine = None

    def keep(self, layer: str, output: torch.Tensor, weights: Optional[torch.Tensor]) -> None:
        """Keeps one call of ``layer``: ``output`` ``(batch, heads, query, head_dim)``, ``weights``
        ``(batch, heads, query, key)`` or ``None`` (both detached copies)."""
        self.outputs.setdefault(layer, []).append(output.detach().clone())
        if weights is not None:
            self.weights.setdefault(layer, []).append(weights.detach().clone())

    def __enter__(self) -> "HeadRecording":
        from .engine import Engine
        from .plans import resolve_layers

        if self._engine is not None:
            raise RuntimeError("this recording is already on the model")
        plans = resolve_layers(self._model, self._layers, recorder=self)
        self._engine = Engine(self._model, plans)
        self._engine.install()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        from .engine import take_off

        engine, self._engine = self._engine, None
        take_off(engine, ran=exc_type is not None or bool(self.outputs),
                 nothing_ran="the recording holds no call: no recorded layer ran inside its block")

    def __repr__(self) -> str:
        calls = sum(len(c) for c in self.outputs.values())
        return (f"HeadRecording({len(self.outputs)} layers, {calls} calls"
                f"{', with weights' if self.weights else ''})")


def record_heads(model: nn.Module, layers: Optional[Sequence[str]] = None, *, weights: bool = False) -> HeadRecording:
    """Records each head's output (and weights) on a run, to patch another run with.

    Use it as a context around the run (the clean input): the model computes exactly what it
    computes without it (the outputs are read, never changed).

    Args:
        model: any ``nn.Module``.
        layers: names of attention modules (``model.named_modules()`` names, as
            :func:`~attention_hooker.find_attention_modules` gives them); ``None``: every one.
        weights: also keep each call's weights ``(batch, heads, query, key)`` (for
            ``patch(..., what="weights")``).

    Returns:
        A :class:`HeadRecording` to enter with ``with``; filled when the run is over.

    Raises:
        InterventionError: on a layer name the model does not have.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True).eval()
        >>> with record_heads(layer) as clean:
        ...     _ = layer(torch.randn(1, 5, 8))
        >>> clean.outputs["self_attn"][0].shape
        torch.Size([1, 2, 5, 4])
    """
    return HeadRecording(model, layers, weights)
