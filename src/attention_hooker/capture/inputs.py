"""What a hooked module's input says about the axes of the attention it computes.

A module discovered by what it declares (a head count and a query projection)
may compute a softmax whose axes are not tokens: timm's ``XCA`` (XCiT's
cross-covariance attention) softmaxes a ``(batch, heads, channels, channels)``
matrix; a lambda layer softmaxes its keys ``(batch, key_dim, positions)``. Both
would read as ``(batch, heads, query, key)`` by shape alone; the module's input
(``(batch, tokens, width)``, ``(tokens, batch, width)`` or ``(batch, channels,
height, width)``) tells them apart, so that they are refused with the reason.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["input_shape", "channel_attention_refusal", "declares_channel_attention", "folded_batch_refusal"]

_HIDDEN_STATE_KEYWORDS = ("hidden_states", "x", "query", "input", "inputs")


def input_shape(args: tuple, kwargs: dict) -> Optional[Tuple[int, ...]]:
    """The shape of a module call's hidden states: its first positional tensor, or a
    ``hidden_states``/``x``/``query`` keyword; ``None`` when there is none."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
    for name in _HIDDEN_STATE_KEYWORDS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
    return None


def channel_attention_refusal(shape: Optional[Tuple[int, ...]], heads: int, query: int, key: int,
                              module=None) -> Optional[str]:
    """Why a ``(batch, heads, query, key)`` map over ``query`` x ``key`` is attention
    between channels rather than tokens, or ``None``.

    It is when ``module`` declares cross-covariance attention (timm's ``XCA``, or a
    subclass), whatever the shapes; otherwise when the map is square, its side is the
    layer's width per head (the input's last dim / ``heads``), and that is neither of
    the input's leading dims (its tokens, batch-first or sequence-first). By shape
    alone a channel map whose side equals the batch or the token count (XCiT-nano's 32
    channels per head at batch 32) cannot be told from token attention: only the
    module's declaration can.
    """
    if module is not None and declares_channel_attention(module):
        return (
            f"{type(module).__name__} computes cross-covariance attention (XCiT): its softmax over a ({query} x "
            f"{key}) map per head is between the {query} channels of each head, not between tokens, so it is "
            "not stored as (batch, heads, query, key)"
        )
    if shape is None or len(shape) != 3 or heads <= 0 or query != key:
        return None
    width = shape[-1]
    if width % heads or query != width // heads or query in shape[:2]:
        return None
    return (
        f"the softmax is over a ({query} x {key}) map per head while the layer's input {shape} has {shape[1]} "
        f"tokens of {width} channels: its query and key axes are the {query} channels of each head "
        "(cross-covariance attention, as in XCiT), not tokens, so it is not stored as (batch, heads, query, key)"
    )


def declares_channel_attention(module) -> bool:
    """Whether ``module`` is timm's ``XCA`` (``timm.models.xcit``) or a subclass of it."""
    return any(kind.__name__ == "XCA" and kind.__module__.startswith("timm.models.xcit")
               for kind in type(module).__mro__)


def folded_batch_refusal(shape: Optional[Tuple[int, ...]], heads: int, folded: int,
                         what: str = "a softmax over a 3-D tensor") -> Optional[str]:
    """Why a 3-D softmax (or ``scaled_dot_product_attention`` query, named by ``what``) with
    first dim ``folded`` is not ``(batch * heads, query, key)`` for this layer's input, or
    ``None``: its batch (the input's first dim, or second for sequence-first ``(tokens, batch,
    width)``) times the heads must give ``folded``."""
    if shape is None or len(shape) < 2:
        return None
    batches = {shape[0], shape[1]} if len(shape) == 3 else {shape[0]}
    if any(b * heads == folded for b in batches):
        return None
    return (
        f"{what} whose 1st dim ({folded}) is not the layer's batch times its {heads} heads "
        f"(input {shape}): it is not (batch * heads, query, key) attention (a lambda layer's softmax over its "
        "keys, or another axis), so it is not stored"
    )
