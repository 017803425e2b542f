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

from typing import Optional

import torch

__all__ = ["SOFTMAX_FUNCTIONS", "is_attention_softmax", "label_softmax", "sampled_attention_refusal"]

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


def label_softmax(result: torch.Tensor, heads: Optional[int]):
    """``(weights, reason)``: the softmax as ``(batch, heads, query, key)``, or ``None`` and why not.

    Args:
        result: a softmax over the last dim, 3-D or more.
        heads: the head count the attention module declares, or ``None``.

    Returns:
        ``(weights, None)`` for a labelled call; ``(None, reason)`` for one that
        contradicts the declared heads; ``(None, None)`` for a 3-D softmax of a
        module that declares no heads (not attention as far as can be told).
    """
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
    """Why the softmaxes of ``module`` are not attention over keys, or ``None``.

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
    return None
