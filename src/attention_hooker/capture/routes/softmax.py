"""Route 3: eager / handwritten attention.

Inside a hooked attention module, the result of a softmax over the last
dimension of a 4-D tensor is taken as the attention probabilities
``(batch, heads, query, key)`` (Hugging Face ``eager``, nanoGPT-style code,
timm without fused attention), and a 3-D ``(batch * heads, query, key)`` one
(``bmm``-style code: XGLM, FSMT, SAM) where the module declares its head count.
What the module declares also refuses layouts that are not these: a 4-D
softmax whose second dim is not the declared head count (Longformer's
``(batch, seq, heads, window)``) is refused with that reason, never stored.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..inputs import channel_attention_refusal, folded_batch_refusal
from ..._map_kinds import not_probabilities
from ...keep.protocol import CallSources
from ..heads import declared_heads

__all__ = ["SOFTMAX_FUNCTIONS", "is_attention_softmax", "label_softmax", "sampled_attention_refusal",
           "Pending", "handle_softmax", "handle_use", "commit_pending"]

# What a head-mixed map is (marked on it: the analyses that need probabilities refuse it, naming this).
MIXED_KIND = not_probabilities("a talking-heads map mixed across heads by a linear layer after the softmax (CaiT)",
                               "each head's map is a learned combination of every head's probabilities, "
                               "with entries that may be negative and rows that need not sum to 1")

SOFTMAX_FUNCTIONS = frozenset(
    {
        torch.nn.functional.softmax,
        torch.softmax,
        torch.Tensor.softmax,
        torch.special.softmax,
    }
)


def is_attention_softmax(result, args: tuple, kwargs: dict) -> bool:
    """Whether one softmax call may have computed attention probabilities.

    True when ``result`` is a floating tensor of 3 or more dims and the softmax ran
    over its last dimension (``dim=-1`` or the last index), given by position or
    keyword. (5-D and more are blocked or windowed layouts, refused by :func:`label_softmax`.)
    """
    if not isinstance(result, torch.Tensor) or result.dim() < 3 or not result.is_floating_point():
        return False
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return dim in (-1, result.dim() - 1)


def label_softmax(result: torch.Tensor, heads: Optional[int], blocked: bool = False):
    """``(weights, reason)``: the softmax as ``(batch, heads, query, key)``, or ``None`` and why not.

    Args:
        result: a softmax over the last dim, 3-D or more.
        heads: the head count the attention module declares, or ``None``.
        blocked: the module is a recognised windowed one whose 5-D softmax is
            ``(batch, windows, heads, N, N)`` (:mod:`..windows`): taken as the batch-major
            ``(batch * windows, heads, N, N)`` its windows are placed from.

    Returns:
        ``(weights, None)`` for a labelled call; ``(None, reason)`` for one that
        contradicts the declared heads; ``(None, None)`` for a 3-D softmax of a
        module that declares no heads (not attention as far as can be told).
    """
    if result.dim() == 5 and blocked:
        result = result.flatten(0, 1)  # (B * G, h, N, N), batch-major
    if result.dim() > 4:
        return None, (
            f"a softmax over a {result.dim()}-D tensor {tuple(result.shape)}: blocked or windowed attention "
            "(batch, blocks, heads, query, key) is not (batch, heads, query, key), so it is not stored"
        )
    if result.dim() == 4:
        if heads is not None and result.shape[1] != heads:
            return None, (
                f"a softmax over a {tuple(result.shape)} tensor whose 2nd dim is not the layer's {heads} heads: "
                "its axes are not (batch, heads, query, key) (a windowed or blocked layout), so it is not stored"
            )
        return result, None
    if heads is None:
        return None, None
    if result.shape[0] % heads:
        return None, (
            f"a softmax over a {tuple(result.shape)} tensor whose 1st dim is not a multiple of the layer's "
            f"{heads} heads: it cannot be read as (batch * heads, query, key), so it is not stored"
        )
    return result.view(result.shape[0] // heads, heads, result.shape[1], result.shape[2]), None  # (B, H, Q, K)


def sampled_attention_refusal(module) -> Optional[str]:
    """Why the softmaxes of ``module`` are not a ``(batch, heads, query, key)`` map over keys, or ``None``.

    Multi-scale deformable attention (Deformable DETR, Mask2Former's pixel decoder,
    RT-DETR, Grounding DINO) predicts, per query and head, sampling offsets and a
    softmax over the sampled points, ``(batch, query, heads, levels * points)``:
    weights over bilinearly sampled locations, not over the keys, and with the query
    axis where the heads would be.
    """
    if isinstance(getattr(module, "sampling_offsets", None), torch.nn.Module):
        return (
            "multi-scale deformable attention: its softmax weighs sampled points, (batch, query, heads, "
            "levels x points), not keys, so there is no (batch, heads, query, key) map to store"
        )
    if isinstance(getattr(module, "one_sided_attn_window_size", None), int):
        # A Longformer-like module the pieced family (capture/bands.py) did not take: told by what
        # it declares, not by shapes, which the band (batch, tokens, heads, window) can match when
        # the tokens happen to equal the heads.
        return (
            "sliding-window (banded) attention with global tokens (Longformer, LED): its softmax is the band "
            "(batch, tokens, heads, 2 x window + 1 + globals) and the global rows are another softmax, neither "
            "of which is the (batch, heads, query, key) map, so they are not stored"
        )
    return None


class Pending(NamedTuple):
    """A softmax waiting for its first use (see :func:`handle_use`)."""

    layer: str
    tracked: torch.Tensor  # the softmax result, or what layout operations made of it
    weights: torch.Tensor  # its (B, H, Q, K) labelling
    mixed: bool  # a linear over it mixed the heads


# Operations that move a softmax's numbers around without changing them.
_LAYOUT_FUNCTIONS = frozenset({
    torch.Tensor.permute, torch.Tensor.transpose, torch.transpose, torch.permute, torch.Tensor.view,
    torch.Tensor.reshape, torch.reshape, torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float,
    torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type_as, torch.Tensor.unsqueeze, torch.Tensor.squeeze,
})


# _NO_COMPILE: the session's handlers run as plain Python, never as frames torch.compile traces.
# Traced, dynamo guarded on the n-th key of the weak caches they read (``_DECLARED_HEADS``), and a
# key collected meanwhile failed the guard's creation ("list index out of range") inside the
# user's compiled model.
_PRODUCT_FUNCTIONS = frozenset({torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.bmm,
                                torch.Tensor.bmm})


def _value_operand(value, weights_shape) -> Optional[torch.Tensor]:
    """The value vectors ``(batch, heads, key, head_dim)`` a softmax's weights ``(B, H, Q, K)``
    multiply, from the product's other operand: ``(B, H, K, Dh)`` as it is, or ``(B * H, K,
    Dh)`` (``bmm``-style code) unfolded; ``None`` for any other layout."""
    if not isinstance(value, torch.Tensor):
        return None
    batch, heads, _, keys = weights_shape
    if value.dim() == 4 and value.shape[0] == batch and value.shape[2] == keys and value.shape[1] in (heads, 1):
        return value
    if value.dim() == 5 and value.shape[0] * value.shape[1] == batch and value.shape[3] == keys:
        return value.flatten(0, 1)  # a blocked layout's (B, G, h, N, d), as its weights were taken
    if value.dim() == 3 and value.shape[0] == batch * heads and value.shape[1] == keys:
        return value.reshape(batch, heads, keys, value.shape[2])
    return None


def handle_softmax(session, result, args: tuple, kwargs: dict) -> None:
    if not is_attention_softmax(result, args, kwargs):
        return
    scope = session.current_scope()
    if scope is None or scope.layer is None or isinstance(scope.module, torch.nn.MultiheadAttention):
        return  # nn.MultiheadAttention hands its weights back itself (route 1)
    if scope.pieces is not None:  # a pieced layer (capture/pieces.py): one of its pieces, placed at its return
        session.offer_piece(scope, scope.pieces.take_softmax(result))
        return
    layer = scope.layer
    heads = declared_heads(scope.module)
    weights, reason = label_softmax(result, heads, scope.windows is not None and scope.windows.blocked)
    sampled = sampled_attention_refusal(scope.module)
    if sampled is not None:
        weights, reason = None, sampled
    elif weights is not None and result.dim() == 3:
        reason = folded_batch_refusal(scope.input_shape, heads, result.shape[0])
    elif weights is not None:
        reason = channel_attention_refusal(scope.input_shape, weights.shape[1], weights.shape[2], weights.shape[3],
                                          scope.module)
    if reason is not None:
        weights = None
    if weights is None:
        if reason is not None:
            session.refuse(scope, reason)
        return
    if not session.router.wants(layer):
        session.skip(layer)
        return
    state = session.thread_state()
    if state.pending is not None:
        commit_pending(session, state)
    state.pending = Pending(layer, result, weights, False)


def handle_use(session, func, args: tuple, out) -> None:
    """A use of a pending softmax result (or of what it became).

    Following it to the product with the values: layout operations (views,
    permutes, dtype casts) are followed; a slice that keeps ``(batch, heads,
    query)`` and drops key columns (``probs[..., :-1]``: a learned attention sink)
    becomes the weights; a ``linear`` over it mixes the heads (CaiT's talking
    heads), and then the tensor that reaches the product with the values, back in
    the softmax's ``(batch, heads, query, key)`` shape, is what is recorded. A call
    that hands the tensor itself back (dropout in eval) is followed too. Any other use
    (the product itself, dropout in training, a mask) records what was followed; the
    product (``matmul``, ``@``, ``bmm``) also gives the value vectors, for
    ``keep_values``.
    """
    state = session.thread_state()
    pending = state.pending
    tracked = pending.tracked
    if not any(a is tracked or (isinstance(a, (list, tuple)) and any(b is tracked for b in a)) for a in args):
        return
    if isinstance(out, torch.Tensor) and args[0] is tracked:
        if func in _LAYOUT_FUNCTIONS or out is tracked:  # out is tracked: an identity (dropout in eval)
            state.pending = pending._replace(tracked=out)
            return
        if func is torch.nn.functional.linear:
            state.pending = pending._replace(tracked=out, mixed=True)
            return
        weights = pending.weights
        if (
            func is torch.Tensor.__getitem__
            and not pending.mixed
            and tracked is weights
            and out.dim() == 4
            and out.shape[:3] == weights.shape[:3]
            and out.shape[3] < weights.shape[3]
        ):
            state.pending = pending._replace(tracked=out, weights=out)  # (B, H, Q, K) without the sinks
            return
    value = None
    if func in _PRODUCT_FUNCTIONS and len(args) > 1 and args[0] is tracked and session.router.policy.keep_values:
        value = _value_operand(args[1], pending.weights.shape)
    commit_pending(session, state, value)


def commit_pending(session, state, value: Optional[torch.Tensor] = None) -> None:
    layer, tracked, weights, mixed = state.pending
    state.pending = None
    if session.closed:  # remove_hooks() came from another thread meanwhile: record nothing more
        return
    if mixed:
        if tracked.shape != weights.shape:
            session.refuse_layer(layer, (
                f"the softmax output is mixed across heads (a linear layer) and what reaches the values has "
                f"shape {tuple(tracked.shape)}, not (batch, heads, query, key) {tuple(weights.shape)}"))
            return
        weights = tracked  # (B, H, Q, K): the mixed map that multiplies the values
    session.record(layer, weights, CallSources(value=value, kind=MIXED_KIND if mixed else None))
