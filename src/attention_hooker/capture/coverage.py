"""Which hooked layers ran, which captured, and which were refused and why.

A layer that ran without any route seeing its attention (a ``bmm`` over
``(batch * heads, query, key)``, blocked 5-D attention, a hand-written
``exp / sum``) must not pass unnoticed because other layers of the same model
did capture; and a call whose axes cannot be labelled ``(batch, heads, query,
key)`` is refused, not stored with another meaning. Both are kept here, per
layer, for :meth:`TransformerAttentionHooker.report` and its one warning.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["Coverage", "LayerCoverage", "CoverageReport"]


@dataclass(frozen=True)
class LayerCoverage:
    """One hooked layer's account.

    Attributes:
        runs: forwards of the layer (its hooked module) while the hooks were on.
        captured: attention calls seen in it (kept, or skipped by ``max_calls``).
        refused: calls seen but refused because their layout could not be labelled.
        reason: why the first refused call was refused, or ``None``.
        kind: what the layer's stored calls are when they are not attention probabilities
            over tokens (``"DiffLlama's differential map ... (not probabilities: rows sum to 1 -
            λ ...)"``, see :mod:`attention_hooker._map_kinds`), or ``None``: the analyses that
            need probabilities refuse such calls.
        inside: the hooked layers that ran inside this one's calls and captured (a wrapper hooked
            beside the attention module it calls: LED's ``self_attn`` and its ``longformer_self_attn``,
            BERT's ``attention`` and its ``attention.self``); each attention call goes to the innermost
            hooked layer running, so the wrapper's map is kept under those names.
        runs_inside: runs of this layer during which a hooked layer inside it captured. The layer is
            "captured inside" only when every run is such a run; a run in which nothing inside it
            captured (and it captured nothing itself) leaves it "nothing captured". Attention the
            wrapper computes itself beside an inner layer that captured in the same run (a block
            hooked beside its ``self_attn`` that also runs a hand-written ``exp / sum``) cannot be
            told from the inner layer's, and is not detected.
    """

    runs: int
    captured: int
    refused: int
    reason: Optional[str]
    kind: Optional[str] = None
    inside: Tuple[str, ...] = ()
    runs_inside: int = 0

    @property
    def status(self) -> str:
        """``"captured"``, ``"refused"``, ``"captured inside"`` (nothing of its own, its map kept under the
        hooked layers :attr:`inside` it), ``"nothing captured"`` or ``"did not run"``."""
        if self.captured:
            return "captured"
        if self.refused:
            return "refused"
        if self.runs and self.inside and self.runs_inside >= self.runs:
            return "captured inside"
        return "nothing captured" if self.runs else "did not run"


class CoverageReport(dict):
    """``{layer_name: LayerCoverage}`` in model order, with the layers that need a look."""

    @property
    def missing(self) -> List[str]:
        """Layers that ran and gave nothing: refused, or unseen by every route."""
        return [name for name, c in self.items() if c.status in ("refused", "nothing captured")]

    def __repr__(self) -> str:
        counts: Dict[str, int] = {}
        for c in self.values():
            counts[c.status] = counts.get(c.status, 0) + 1
        parts = ", ".join(f"{n} {status}" for status, n in counts.items())
        return f"CoverageReport({len(self)} layers: {parts or 'none'})"


class Coverage:
    """Counts per layer, shared by the threads of one hooker."""

    def __init__(self, layers: Sequence[str]):
        self._layers = list(layers)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            # Counts a forward that is running on another thread meanwhile cannot judge by:
            # its "layers that gave nothing" check is skipped when this changed under it.
            self.generation = getattr(self, "generation", 0) + 1
            self._runs: Dict[str, int] = {}
            self._captured: Dict[str, int] = {}
            self._refused: Dict[str, int] = {}
            self._reasons: Dict[str, str] = {}
            self._kinds: Dict[str, str] = {}
            self._inside: Dict[str, Dict[str, None]] = {}  # layer -> hooked layers that ran inside it, in order
            self._runs_inside: Dict[str, int] = {}  # layer -> its runs during which a layer inside it captured

    def ran(self, layer: str) -> None:
        with self._lock:
            self._runs[layer] = self._runs.get(layer, 0) + 1

    def ran_inside(self, outer: str, layer: str) -> None:
        """``layer`` ran inside a call of the hooked layer ``outer`` (on the same thread)."""
        with self._lock:
            self._inside.setdefault(outer, {})[layer] = None

    def captured_during(self, layer: str) -> None:
        """A hooked layer inside this run of ``layer`` captured (on the same thread, during the run)."""
        with self._lock:
            self._runs_inside[layer] = self._runs_inside.get(layer, 0) + 1

    def captured(self, layer: str) -> None:
        with self._lock:
            self._captured[layer] = self._captured.get(layer, 0) + 1

    def stores(self, layer: str, kind) -> None:
        """The calls of ``layer`` are ``kind`` (a :class:`~attention_hooker._map_kinds.MapKind`), not
        attention probabilities over tokens (``None``: nothing to note)."""
        if kind is not None:
            with self._lock:
                self._kinds.setdefault(layer, str(kind))

    def refused(self, layer: str, reason: str) -> None:
        with self._lock:
            self._refused[layer] = self._refused.get(layer, 0) + 1
            self._reasons.setdefault(layer, reason)

    def report(self) -> CoverageReport:
        with self._lock:
            names = self._layers + [n for n in self._runs if n not in self._layers]
            return CoverageReport(
                (name, LayerCoverage(self._runs.get(name, 0), self._captured.get(name, 0),
                                     self._refused.get(name, 0), self._reasons.get(name), self._kinds.get(name),
                                     tuple(inner for inner in self._inside.get(name, ())
                                           if self._captured.get(inner, 0)),
                                     self._runs_inside.get(name, 0)))
                for name in names
            )
