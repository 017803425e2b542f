"""Route 1: ``nn.MultiheadAttention``.

A forward pre-hook binds the call to the module's signature (so a positional
``need_weights`` is seen too) and forces ``need_weights=True,
average_attn_weights=False``; the forward hook records the per-head weights and
hands the caller back exactly what it asked for.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["MultiheadAttentionRoute"]


@dataclass
class _Request:
    need_weights: bool
    average_attn_weights: bool


class MultiheadAttentionRoute:
    """Rewrites the arguments of one ``nn.MultiheadAttention`` and restores its output.

    Args:
        module: the attention module; its ``forward`` signature is read once.
    """

    def __init__(self, module: nn.Module):
        self._signature = inspect.signature(module.forward)
        params = self._signature.parameters
        self._can_force = "need_weights" in params and "average_attn_weights" in params
        self._requests: List[_Request] = []

    def before(self, args: tuple, kwargs: dict) -> Optional[Tuple[tuple, dict]]:
        """Forces per-head weights; returns the new ``(args, kwargs)`` or ``None``."""
        if not self._can_force:
            return None
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError:
            return None  # let the module itself report the bad call
        given = bound.arguments
        self._requests.append(
            _Request(
                need_weights=bool(given.get("need_weights", self._default("need_weights"))),
                average_attn_weights=bool(given.get("average_attn_weights", self._default("average_attn_weights"))),
            )
        )
        given["need_weights"] = True
        given["average_attn_weights"] = False
        return bound.args, bound.kwargs

    def after(self, output: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Any]:
        """Splits the module's output into the weights to record and the caller's output.

        Returns:
            ``(weights, graph_tensor, output)``: ``weights`` is
            ``(batch, heads, query, key)`` as the module returns them (in training
            with dropout: after dropout, the weights it multiplied the values
            by), or ``None``; ``graph_tensor`` the tensor of the autograd graph
            they are a view of (gradients reach it, not the view); ``output``
            what the caller asked for (weights ``None`` where it asked
            ``need_weights=False``, averaged over heads where it asked
            ``average_attn_weights=True``).
        """
        if not self._requests:
            return None, None, output
        request = self._requests.pop()
        if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], torch.Tensor)):
            return None, None, output
        attn_output, weights = output  # weights (B, H, L, S) or unbatched (H, L, S)
        if not request.need_weights:
            returned = None
        elif request.average_attn_weights:
            returned = weights.mean(dim=-3)  # what the module computes when asked to average
        else:
            returned = weights
        batched = weights if weights.dim() == 4 else weights.unsqueeze(0)  # (B, H, L, S)
        graph_tensor = weights._base if weights._base is not None else weights  # (B * H, L, S) used by bmm
        return batched, graph_tensor, (attn_output, returned)

    def abandon(self) -> None:
        """Drops the pending request of a call that raised."""
        if self._requests:
            self._requests.pop()

    def _default(self, name: str) -> Any:
        return self._signature.parameters[name].default
