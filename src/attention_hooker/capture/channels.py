"""timm XCiT's cross-covariance attention: its map over channels, stored as its own kind of entry (a
:mod:`.pieces` family).

``XCA`` (``timm.models.xcit``) makes ``q, k, v`` of shape ``(batch, heads, C', N)`` (``C'`` channels per
head, ``N`` tokens), L2-normalises ``q`` and ``k`` over the tokens and computes

``W = softmax(normalize(q) @ normalize(k)ᵀ * temperature)``  ``(batch, heads, C', C')``

(a softmax, or one ``F.scaled_dot_product_attention(q * temperature, k, v, scale=1.0)`` when timm's
fused attention is on), then ``W @ v`` ``(batch, heads, C', N)``, which after ``permute`` and
``reshape`` is the input of ``proj``. ``W`` mixes the channels of each token: token ``n``'s output
reads only token ``n``'s values, so no ``(query token, key token)`` map multiplies the values, and
``W`` is never stored in the layer's token slot (by shape alone, ``C'`` may equal the batch or the
token count, so the module's class decides, not the shapes).

Stored, per layer call: ``W`` as the entry ``"<layer>:channels"`` (:func:`~.pieces.named_entry`),
``(batch, heads, channels, channels)``, marked ``"channels"`` (:mod:`attention_hooker._map_kinds`):
the analyses over tokens refuse it. The layer itself stores nothing; its coverage says why and where
the channel map is. Selections apply on the entry's own axes (``rows=``: channels as queries, ``keys=``:
channels as keys). ``keep_values`` keeps ``v`` ``(batch, heads, C', N)``: ``W @ v`` is ``proj``'s input.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .._map_kinds import channels
from .._torch_private import no_function_modes
from ..keep.protocol import CallSources
from .inputs import declares_channel_attention
from .pieces import FAMILIES, Assembly, PieceCall, PiecedLayer, select_block
from .routes.sdpa import sdpa_attention_weights

__all__ = ["ChannelLayer", "channel_layer", "CHANNEL_KIND", "CHANNELS_ENTRY"]

CHANNELS_ENTRY = "channels"  # the entry "<layer>:channels"

CHANNEL_KIND = channels("XCiT's cross-covariance map over the channels of each head",
                        "(batch, heads, channels, channels): each token's output mixes only its own values' "
                        "channels")



class _ChannelCall(PieceCall):
    """One call of an XCA layer: its softmax (or sdpa call) over channels, by reference."""

    def __init__(self, module_name: str, batch: int, heads: int, per_head: int):
        self.module_name, self.batch, self.heads, self.per_head = module_name, batch, heads, per_head
        self.weights: Optional[torch.Tensor] = None  # (B, H, C', C')
        self.call: Optional[dict] = None

    def _expected(self) -> tuple:
        return (self.batch, self.heads, self.per_head, self.per_head)

    def _refusal(self, what: str) -> str:
        return (f"{what} inside an XCiT cross-covariance attention layer, whose one attention computation is a "
                f"softmax over channels {self._expected()}: the channel map cannot be read, so nothing is stored")

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        if self.weights is not None or self.call is not None or tuple(result.shape) != self._expected():
            return self._refusal(f"a softmax of shape {tuple(result.shape)}")
        self.weights = result
        return None

    def take_sdpa(self, call: dict) -> Optional[str]:
        query, key = call.get("query"), call.get("key")
        if self.weights is not None or self.call is not None or not isinstance(query, torch.Tensor) \
                or not isinstance(key, torch.Tensor) or tuple(query.shape[:3]) != self._expected()[:3] \
                or tuple(key.shape[:3]) != self._expected()[:3]:
            return self._refusal(f"a scaled_dot_product_attention call (query {tuple(getattr(query, 'shape', ()))})")
        self.call = call
        return None

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        if self.weights is None and self.call is None:
            return self._refusal("no attention computation")
        value = None
        if self.call is not None:
            call = self.call
            dtype = call["query"].dtype
            if keep_values:
                value = call["value"].detach()
            with torch.no_grad(), no_function_modes():
                weights = sdpa_attention_weights(call["query"], call["key"], call.get("attn_mask"),
                                                 bool(call.get("is_causal")), call.get("scale"),
                                                 where=f"the {self.module_name} call").to(dtype)
        else:
            if keep_values:
                return ("keep_values on an XCiT layer with eager attention: its values reach no call the capture "
                        "sees (attn @ v is a plain product), so they cannot be kept (turn timm's fused attention on)")
            weights, dtype = self.weights, self.weights.dtype

        def rows(heads, index, keys):
            return select_block(weights, heads, index, keys, dtype)

        entry = Assembly(self.batch, self.heads, self.per_head, self.per_head, dtype, rows,
                         CallSources(value=value, kind=CHANNEL_KIND))
        return Assembly(self.batch, self.heads, 0, 0, dtype, rows, named={CHANNELS_ENTRY: entry},
                        no_token_map=(f"XCiT's cross-covariance attention is a softmax over the {self.per_head} "
                                      "channels of each head, not over tokens: no (query, key) map over tokens "
                                      "multiplies the values, so the layer stores none"))


class ChannelLayer(PiecedLayer):
    """The rule of a timm ``XCA`` module."""

    family = "timm XCiT cross-covariance attention"

    def __init__(self, heads: int):
        self.heads = heads

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] % self.heads:
            return ("an XCiT cross-covariance attention layer called without an input (batch, tokens, width) whose "
                    f"width divides into its {self.heads} heads: its channel map cannot be read")
        return _ChannelCall(type(module).__name__, x.shape[0], self.heads, x.shape[-1] // self.heads)


def channel_layer(module: nn.Module, parents=None) -> Optional[ChannelLayer]:
    """The rule of timm's ``XCA`` (or a subclass) with an int ``num_heads``, or ``None``."""
    heads = getattr(module, "num_heads", None)
    if not declares_channel_attention(module) or not isinstance(heads, int) or heads <= 0:
        return None
    return ChannelLayer(heads)


FAMILIES.append(channel_layer)
