"""What a streamed capture keeps track of: its units (a forward of the model, written whole or
not at all, or one call made outside any forward), the calls that reached it, and the index
(``capture.json``) that lists the calls of every unit written whole (``io/format.py``)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .._map_kinds import describe_kind
from ..io.format import LOG_NAME, STREAM_FORMAT

__all__ = ["Unit", "Written", "index_of"]

FAILURES_LISTED = 100  # the index lists the first failures; it counts them all


class Unit:
    """What is written whole or not at all: one forward of the model, or one call made
    outside any forward of it."""

    __slots__ = ("number", "calls", "error", "cause", "in_forward", "open_calls")

    def __init__(self, number: int, in_forward: bool):
        self.number = number
        self.calls: List["Written"] = []
        self.error: Optional[str] = None  # why it cannot be whole: a write of one of its calls failed
        self.cause: Optional[BaseException] = None  # the OS error behind it
        self.in_forward = in_forward
        self.open_calls: set = set()  # its calls whose own file is still being written (stream_call)


class Written:
    """One call that reached the capture: where its tensor lies (or waits)."""

    __slots__ = ("layer", "unit", "file", "tensor", "data", "own_file")

    def __init__(self, layer: str, unit: Unit, data: Optional[torch.Tensor], own_file: Optional[str]):
        self.layer, self.unit, self.data, self.own_file = layer, unit, data, own_file
        self.file: Optional[str] = own_file
        self.tensor: Optional[str] = "attention" if own_file else None


def index_of(listed: Dict[str, List[Written]], *, state: str, whole: int, failed: List[dict], layer_order: List[str],
             logging: bool, writer: str, tokens, dtypes, metadata: dict, kinds: Optional[dict] = None) -> dict:
    """``capture.json`` of a capture whose units written whole list ``listed`` (per layer, in
    model order, each call's file and tensor, and the forward it came from); ``kinds``:
    ``{layer: MapKind}`` of the layers whose calls are another kind of map than probabilities
    over tokens (saved as ``"kinds"``, one description per layer, for the listed layers)."""
    from .. import __version__

    layers = list(listed)
    return {"format": STREAM_FORMAT, "state": state, "complete": state == "complete", "layers": layers,
            "calls": [len(listed[n]) for n in layers],
            "files": [[[c.file, c.tensor] for c in listed[n]] for n in layers],
            "forwards": [[c.unit.number for c in listed[n]] for n in layers],
            "whole_units": whole, "failed_units": len(failed), "failures": failed[:FAILURES_LISTED],
            "layer_order": layer_order, "log": LOG_NAME if logging else None, "writer": writer, "tokens": tokens,
            "dtype": sorted(dtypes), "library_version": __version__, **metadata,
            **({"kinds": {n: describe_kind(k) for n, k in kinds.items() if n in listed}} if kinds else {})}
