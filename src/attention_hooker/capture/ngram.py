"""ProphetNet's n-gram self-attention: the main stream as the layer's map, each predict stream
as an entry of its own kind (a :mod:`.pieces` family).

``ProphetNetNgramSelfAttention`` (the decoder's self-attention) is called on ``(batch, (1 + n) *
T, width)``: the main stream's ``T`` positions, then ``n`` predict streams of ``T`` positions
each (``n = module.ngram``). One call makes two softmaxes:

* the **main** softmax ``(batch, heads, T, K)``: main queries over the main keys (``K = T``, or
  the cached keys plus ``T`` when generating), relative position bias and causal mask added.
  This is ordinary causal self-attention over the decoder's tokens, and it is stored as the
  layer's ``(batch, heads, query, key)`` map, as for any decoder layer;
* the **predict** softmax ``(batch, n, heads, T, K + T)``: stream ``s``'s query ``t`` (which
  predicts the token ``s`` places further ahead than the main stream's query ``t`` does) over
  ``[the main keys (K); stream s's own T positions]``. Streams never see each other's keys. Its queries are not the decoder's tokens,
  and half its keys are not either, so it is never stored as token attention: stream ``s``
  (from 1) is kept as its own entry ``"<layer>:ngram<s>"`` (:func:`~.pieces.named_entry`),
  ``(batch, heads, T, K + T)``, key axis = the ``K`` main keys, then the stream's ``T`` own
  positions (a key ``K + t`` is stream position ``t``).

Both are the softmax outputs (before dropout), in the dtype the model multiplies them in (it
computes them in float32 and casts them to its own dtype). Each entry's product with its
values is the module's input to ``out_proj`` for that stream: main ``map @ V_main``, stream
``s`` ``map @ [V_main; V_s]``. transformers returns the same two tensors as
``decoder_attentions`` and ``decoder_ngram_attentions``.

Selections apply to each entry on its own axes (``rows=`` picks positions ``t``, ``keys=``
indexes the entry's key axis). ``keep_values`` keeps what ``value_proj`` returned to the layer
in the call (:mod:`.value_tap`; never made again), ``(batch, heads, K, head_dim)`` for the main
map and ``[V_main; V_s]`` for stream ``s``; while
generating with a cache the past values live in the model's cache and are not read, so such a
call is refused under ``keep_values``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..keep.protocol import CallSources
from .value_tap import SeenValues, seen_outputs
from .pieces import FAMILIES, Assembly, PieceCall, PiecedLayer, select_block

__all__ = ["NgramLayer", "ngram_layer", "STREAM_KIND"]

STREAM_KIND = "ngram{}"  # the kind of stream s's entry (from 1): "<layer>:ngram1", ...



class _NgramCall(PieceCall):
    """One call of an n-gram self-attention layer: references to its main and predict softmaxes."""

    def __init__(self, module: nn.Module, hidden: torch.Tensor, ngram: int, heads: int, family: str,
                 seen: Optional[SeenValues] = None):
        self.module, self.hidden = module, hidden  # (B, (1 + n) T, C); its dtype is the maps'
        self.family, self.seen = family, seen
        self.ngram, self.heads = ngram, heads
        self.batch = hidden.shape[0]
        self.length = hidden.shape[1] // (1 + ngram)  # T
        self.main: Optional[torch.Tensor] = None  # (B, H, T, K)
        self.predict: Optional[torch.Tensor] = None  # (B, n, H, T, K + T)

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        b, n, h, t = self.batch, self.ngram, self.heads, self.length
        if self.main is None and result.dim() == 4 and tuple(result.shape[:3]) == (b, h, t):
            self.main = result
            return None
        if self.main is not None and self.predict is None and \
                tuple(result.shape) == (b, n, h, t, self.main.shape[-1] + t):
            self.predict = result
            return None
        return (f"a softmax of shape {tuple(result.shape)} inside a ProphetNet n-gram self-attention layer, whose "
                f"pieces are the main stream ({b}, {h}, {t}, keys) and then the {n} predict streams ({b}, {n}, {h}, "
                f"{t}, keys + {t}): an unknown piece, so the call is not assembled")

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        if self.main is None or self.predict is None:
            missing = "main-stream" if self.main is None else "predict-stream"
            return (f"the n-gram self-attention layer's {missing} softmax was not seen in its call, so neither "
                    "its main map nor its stream maps are stored")
        b, n, h, t = self.batch, self.ngram, self.heads, self.length
        past = self.main.shape[-1]  # K: the cached keys plus this call's T
        main_values, stream_values = None, [None] * n
        if keep_values:
            if past != t:
                return (f"keep_values on a ProphetNet n-gram self-attention call with {past - t} cached positions "
                        "(generating): the past values live in the model's cache, which is not read, so the call "
                        "is not stored (capture it without keep_values)")
            outputs = seen_outputs(self.seen, "value_proj", 1, self.family)
            if isinstance(outputs, str):
                return outputs
            value = outputs[0]  # what the layer computed: (B, (1 + n) T, C)
            if value.dim() != 3 or tuple(value.shape[:2]) != (b, (1 + n) * t) or value.shape[2] % h:
                return (f"keep_values on a {self.family} layer whose value_proj returned {tuple(value.shape)}, not "
                        f"({b}, {(1 + n) * t}, heads x head_dim), so its values cannot be read and the call is not "
                        "stored (capture it without keep_values)")
            value = value.view(b, (1 + n) * t, h, -1).transpose(1, 2)  # (B, H, (1 + n) T, d)
            main_values = value[:, :, :t]
            stream_values = [torch.cat([main_values, value[:, :, s * t:(s + 1) * t]], 2) for s in range(1, n + 1)]
        dtype = self.hidden.dtype if self.hidden.is_floating_point() else self.main.dtype
        main, predict = self.main, self.predict

        def stream(s: int) -> Assembly:
            weights = predict[:, s]  # (B, H, T, K + T)
            return Assembly(b, h, t, past + t, dtype,
                            lambda heads, rows, keys: select_block(weights, heads, rows, keys, dtype),
                            CallSources(value=stream_values[s]))

        return Assembly(b, h, t, past, dtype, lambda heads, rows, keys: select_block(main, heads, rows, keys, dtype),
                        CallSources(value=main_values),
                        named={STREAM_KIND.format(s + 1): stream(s) for s in range(n)})


class NgramLayer(PiecedLayer):
    """The rule of a ProphetNet n-gram self-attention module: the stream count and heads from the
    module, the main stream's length from each call's input."""

    value_modules = ("value_proj",)

    def __init__(self, family: str, ngram: int, heads: int):
        self.family, self.ngram, self.heads = family, ngram, heads

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] % (1 + self.ngram):
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None
            return (f"a {self.family} layer called with hidden states {shape}, not (batch, (1 + {self.ngram}) x "
                    "positions, width): its main and predict streams cannot be told apart, so nothing is stored")
        return _NgramCall(module, hidden, self.ngram, self.heads, self.family, self.seen_values())


def ngram_layer(module: nn.Module, parents=None) -> Optional[NgramLayer]:
    """The rule of a transformers n-gram self-attention module (ProphetNet's decoder: an ``ngram``
    stream count, ``num_attn_heads``, the ``query_proj``/``key_proj``/``value_proj`` projections and
    ``relative_pos_embeddings``), or ``None``."""
    kind = type(module)
    ngram, heads = getattr(module, "ngram", None), getattr(module, "num_attn_heads", None)
    if not kind.__module__.startswith("transformers.") or not isinstance(ngram, int) or ngram < 1 \
            or not isinstance(heads, int):
        return None
    if not all(isinstance(getattr(module, name, None), nn.Module)
               for name in ("query_proj", "key_proj", "value_proj", "relative_pos_embeddings")):
        return None
    return NgramLayer(f"transformers {kind.__name__}", ngram, heads)


FAMILIES.append(ngram_layer)
