"""Route 3: eager / handwritten attention.

Inside a hooked attention module, the result of a softmax over the last
dimension of a 4-D tensor is taken as the attention probabilities
``(batch, heads, query, key)`` (Hugging Face ``eager``, nanoGPT-style code,
timm without fused attention).
"""

from __future__ import annotations

import torch

__all__ = ["SOFTMAX_FUNCTIONS", "is_attention_softmax"]

SOFTMAX_FUNCTIONS = frozenset(
    {
        torch.nn.functional.softmax,
        torch.softmax,
        torch.Tensor.softmax,
        torch.special.softmax,
    }
)


def is_attention_softmax(result, args: tuple, kwargs: dict) -> bool:
    """Whether one softmax call computed attention probabilities.

    True when ``result`` is a 4-D floating tensor and the softmax ran over its
    last dimension (``dim=-1`` or ``dim=3``), given by position or keyword.
    """
    if not isinstance(result, torch.Tensor) or result.dim() != 4 or not result.is_floating_point():
        return False
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return dim in (-1, 3)
