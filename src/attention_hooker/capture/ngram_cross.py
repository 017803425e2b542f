"""ProphetNet's decoder cross-attention: the main stream's rows as the layer's map, each predict
stream's rows as an entry of its own kind (a :mod:`.pieces` family).

A ProphetNet decoder layer calls its ``cross_attn`` (a ``ProphetNetAttention``, the class its
encoder's self-attention also is) on the output of its n-gram self-attention, ``(batch, (1 + n)
* T, width)``: the main stream's ``T`` positions, then ``n`` predict streams of ``T`` positions
each (``n`` = the sibling ``self_attn.ngram``), over the encoder's ``S`` tokens. It makes one
softmax ``(batch, heads, (1 + n) T, S)``; transformers returns its masked scores in that layout as
``cross_attentions``. Only the first ``T`` rows are queries of the decoder's tokens:

* rows ``0 .. T - 1`` (the main stream) are stored as the layer's ``(batch, heads, T, S)`` map,
  ordinary cross-attention of the decoder's tokens over the encoder's;
* rows ``s T .. (s + 1) T - 1`` (predict stream ``s``, from 1) are kept as the entry
  ``"<layer>:ngram<s>"`` (:func:`~.pieces.named_entry`, the kind the n-gram self-attention's
  streams have, :data:`.ngram.STREAM_KIND`), ``(batch, heads, T, S)``: query ``t`` is stream
  ``s``'s position ``t``, never a token of the decoder, so never token attention.

When generating with a cache ``T`` is 1 (one row per stream per step). The maps are the softmax
output (before dropout) in the dtype the model multiplies it in. Every entry multiplies the same
values, ``value_proj`` of the encoder's states ``(batch, heads, S, head_dim)``: each entry's
product with them is the module's input to ``out_proj`` at that stream's rows. ``keep_values``
keeps what ``value_proj`` returned to the layer in the call (:mod:`.value_tap`); a call that
reuses the encoder's keys and values from the model's cache (every step of ``generate`` after
the first) does not call it, the cache is not read, so such a call is refused under
``keep_values``, as the n-gram self-attention's cached calls are. Selections apply to each
entry on its own axes (``rows=`` picks positions ``t``, ``keys=`` the encoder's tokens).

The layer is told from the encoder's self-attention by its place: the ``cross_attn`` child of a
module whose ``self_attn`` has an integer ``ngram`` (``ProphetNetDecoderLayer``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..keep.protocol import CallSources
from .ngram import STREAM_KIND
from .pieces import FAMILIES, Assembly, PieceCall, PiecedLayer, select_block
from .value_tap import SeenValues, seen_outputs

__all__ = ["NgramCrossLayer", "ngram_cross_layer"]


def _stream_rows(weights: torch.Tensor, first: int, heads: Optional[Sequence[int]], rows: torch.Tensor,
                 keys: Optional[Sequence[int]], dtype: torch.dtype) -> torch.Tensor:
    """One stream's rows of the call's softmax ``weights`` ``(batch, heads, (1 + n) T, S)``: its row ``r``
    is ``first + r``; at these heads, ``rows`` and keys (``None``: all), as a new ``(batch, heads, rows,
    keys)`` tensor in ``dtype``."""
    return select_block(weights, heads, rows, keys, dtype, first_row=first)


class _NgramCrossCall(PieceCall):
    """One call of a ProphetNet decoder cross-attention: a reference to its one softmax."""

    def __init__(self, hidden: torch.Tensor, ngram: int, heads: int, family: str,
                 seen: Optional[SeenValues] = None):
        self.hidden, self.family, self.seen = hidden, family, seen  # hidden: (B, (1 + n) T, C)
        self.ngram, self.heads = ngram, heads
        self.batch = hidden.shape[0]
        self.length = hidden.shape[1] // (1 + ngram)  # T
        self.weights: Optional[torch.Tensor] = None  # (B, H, (1 + n) T, S)

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        b, h, rows = self.batch, self.heads, (1 + self.ngram) * self.length
        if self.weights is None and result.dim() == 4 and tuple(result.shape[:3]) == (b, h, rows):
            self.weights = result
            return None
        return (f"a softmax of shape {tuple(result.shape)} inside a ProphetNet decoder cross-attention layer, "
                f"whose one piece is ({b}, {h}, (1 + {self.ngram}) x {self.length}, source): an unknown piece, "
                "so the call is not assembled")

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        if self.weights is None:
            return ("the ProphetNet decoder cross-attention's softmax was not seen in its call, so neither its main "
                    "map nor its stream maps are stored")
        b, n, h, t = self.batch, self.ngram, self.heads, self.length
        weights = self.weights
        source = weights.shape[-1]  # S
        values = None
        if keep_values:
            outputs = (self.seen.outputs.get("value_proj", []) if self.seen is not None else None)
            if outputs == []:
                return (f"keep_values on a {self.family} decoder cross-attention call that reused the encoder's "
                        "keys and values from the model's cache (generating): the values live in the cache, which "
                        "is not read, so the call is not stored (capture it without keep_values)")
            outputs = seen_outputs(self.seen, "value_proj", 1, self.family)
            if isinstance(outputs, str):
                return outputs
            value = outputs[0]  # what the layer computed from the encoder's states: (B, S, C)
            if value.dim() != 3 or tuple(value.shape[:2]) != (b, source) or value.shape[2] % h:
                return (f"keep_values on a {self.family} layer whose value_proj returned {tuple(value.shape)}, not "
                        f"({b}, {source}, heads x head_dim), so its values cannot be read and the call is not "
                        "stored (capture it without keep_values)")
            values = value.view(b, source, h, -1).transpose(1, 2)  # (B, H, S, d): every stream's too
        dtype = self.hidden.dtype if self.hidden.is_floating_point() else weights.dtype

        def rows_of(first: int):
            # the stream's rows of the one softmax: absolute row r of the entry is row first + r
            return lambda heads, rows, keys: _stream_rows(weights, first, heads, rows, keys, dtype)

        return Assembly(b, h, t, source, dtype, rows_of(0), CallSources(value=values),
                        named={STREAM_KIND.format(s): Assembly(b, h, t, source, dtype, rows_of(s * t),
                                                               CallSources(value=values))
                               for s in range(1, n + 1)})


class NgramCrossLayer(PiecedLayer):
    """The rule of a ProphetNet decoder cross-attention module: the stream count from its decoder
    layer's n-gram self-attention, the heads from the module, the main stream's length from each call."""

    value_modules = ("value_proj",)

    def __init__(self, family: str, ngram: int, heads: int):
        self.family, self.ngram, self.heads = family, ngram, heads

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] % (1 + self.ngram):
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None
            return (f"a {self.family} decoder cross-attention layer called with hidden states {shape}, not (batch, "
                    f"(1 + {self.ngram}) x positions, width): its main and predict streams cannot be told apart, so "
                    "nothing is stored")
        return _NgramCrossCall(hidden, self.ngram, self.heads, self.family, self.seen_values())


def ngram_cross_layer(module: nn.Module, parents=None) -> Optional[NgramCrossLayer]:
    """The rule of a transformers ProphetNet decoder cross-attention (the ``cross_attn`` child, with
    ``num_attn_heads`` and a ``value_proj``, of a layer whose ``self_attn`` has an integer ``ngram``
    stream count), or ``None`` (the encoder's self-attention, of the same class, among others)."""
    kind = type(module)
    heads = getattr(module, "num_attn_heads", None)
    if not kind.__module__.startswith("transformers.") or not isinstance(heads, int) \
            or not isinstance(getattr(module, "value_proj", None), nn.Module):
        return None
    parent = parents.get(id(module)) if parents is not None else None
    if parent is None or getattr(parent, "cross_attn", None) is not module:
        return None
    ngram = getattr(getattr(parent, "self_attn", None), "ngram", None)
    if not isinstance(ngram, int) or isinstance(ngram, bool) or ngram < 1:
        return None
    return NgramCrossLayer(f"transformers {kind.__name__}", ngram, heads)


FAMILIES.append(ngram_cross_layer)
