"""Attention rollout (Abnar & Zuidema 2020) and its gradient-weighted form: ``(batch, tokens, tokens)``."""

from __future__ import annotations

from typing import List, Mapping, Optional

import torch

from .._checks import check_flag, one_of
from .._tensor import on_one_device, values_of
from ..errors import AttentionHookerError
from ..window_index import dense_values
from .core import FUSIONS, fuse_heads, layer_sequence, square_stack

__all__ = ["attention_rollout", "gradient_weighted_rollout", "layer_graphs", "placed_first_calls"]


def attention_rollout(attentions, *, add_residual: bool = True, head_fusion: str = "mean",
                      window_index=None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each token draws on each input token.

    Per layer ``A~ = rownorm(fuse_heads(A) + I)`` (without ``+ I`` when
    ``add_residual=False``), then ``R = A~_L @ ... @ A~_1``.

    Args:
        attentions: per-layer ``(batch, heads, tokens, tokens)`` in model order, or
            ``hooker.values`` (first call of each layer).
        add_residual: add the identity for the residual connection.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        window_index: ``hooker.window_index`` of a capture with ``windows="keep"``,
            ``{layer_name: [WindowIndex or None per call]}``: the first call of each layer, when
            kept per window, is placed at its tokens first (that call only). Taken from
            ``attentions`` when it is a hooker or a loaded capture that holds one. A model whose
            stages merge tokens, such as Swin over several stages:
            :func:`~attention_hooker.analysis.stage_rollout.stage_rollout`.

    Returns:
        ``(batch, tokens, tokens)``; row ``i`` sums to 1.

    Raises:
        AttentionHookerError: on layers that are not square attention
            probabilities of one shape, or, with ``add_residual=False``, a query
            row with no weight (all its keys masked): it cannot be renormalised.

    Example:
        >>> a = torch.softmax(torch.randn(2, 1, 4, 3, 3), -1).unbind(0)
        >>> r = attention_rollout(a)
        >>> r.shape, bool(torch.allclose(r.sum(-1), torch.ones(1, 3)))
        (torch.Size([1, 3, 3]), True)
    """
    one_of(head_fusion, "head_fusion", FUSIONS)
    add_residual = check_flag(add_residual, "add_residual")
    attentions, _ = placed_first_calls(attentions, window_index)
    layers = square_stack(attentions, "attentions")
    rollout = None
    for fused in layer_graphs(layers, add_residual, head_fusion):
        rollout = fused if rollout is None else fused @ rollout
    return rollout.to(layers[0].dtype)


def placed_first_calls(attentions, window_index=None, *, where: str = "window_index="):
    """``(attentions, index)``: with a window index (given, or ``attentions.window_index`` of a
    hooker or loaded capture), ``{layer: [first call]}`` with that call placed at its tokens
    (:func:`~attention_hooker.window_index.dense_values` ``call=0``: no other call is made),
    and the checked index; else ``attentions`` as given and ``None``."""
    if window_index is None and not isinstance(attentions, Mapping):
        held = getattr(attentions, "window_index", None)
        window_index = held if isinstance(held, Mapping) and held else None
    if window_index is None:
        return attentions, None
    return dense_values(values_of(attentions), window_index, call=0, where=where), window_index


def layer_graphs(layers: List[torch.Tensor], add_residual: bool, head_fusion: str) -> List[torch.Tensor]:
    """Each layer"s ``rownorm(fuse_heads(A) + I)`` ``(B, T, T)`` float64: the edges of rollout"s and
    flow's layered graph (Abnar & Zuidema 2020), token ``i`` of a layer drawing on token ``j`` below."""
    graphs = []
    for i, a in enumerate(layers):
        fused = fuse_heads(a.double(), head_fusion)  # (B, T, T)
        if add_residual:
            fused = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        else:
            empty = (fused.sum(dim=-1) <= 0).nonzero()
            if len(empty):
                batch, row = (int(v) for v in empty[0])
                raise AttentionHookerError(
                    f"row {row} of attentions[{i}] (batch item {batch}) sums to 0 over every head: a query whose keys "
                    "are all masked cannot be renormalised with add_residual=False; keep add_residual=True, or "
                    "leave such queries out"
                )
        graphs.append(fused / fused.sum(dim=-1, keepdim=True))
    return graphs


def gradient_weighted_rollout(attentions, gradients, *, window_index=None) -> torch.Tensor:
    """Gradient-weighted relevance (Chefer, Gur & Wolf 2021, "Generic attention-model explainability").

    ``R = I``; for each layer in model order ``R <- R + mean_heads(relu(grad(A) * A)) @ R``.

    Args:
        attentions: per-layer ``(batch, heads, tokens, tokens)``, or ``hooker.values``.
        gradients: d(score)/d(A) of the same shapes, or ``hooker.gradients`` from a
            hooker made with ``keep_grad=True`` after ``score.backward()``.
        window_index: ``hooker.window_index`` of a capture with ``windows="keep"``: the first
            call of each layer and its gradient, when kept per window, are placed at their
            tokens first (a weight off its window is an exact zero of the dense map, so its
            ``grad * A`` is 0 whatever its gradient). Taken from ``attentions`` when it is a
            hooker that holds one.

    Returns:
        ``(batch, tokens, tokens)`` relevance; row ``i`` says which tokens made token ``i``'s output.

    Example:
        >>> a = [torch.softmax(torch.randn(1, 2, 3, 3), -1)]
        >>> gradient_weighted_rollout(a, [torch.ones(1, 2, 3, 3)]).shape
        torch.Size([1, 3, 3])
    """
    attentions, window_index = placed_first_calls(attentions, window_index)
    if window_index is not None:
        gradients = dense_values(values_of(gradients), window_index, call=0)
    layers = square_stack(attentions, "attentions")
    grads = layer_sequence(gradients, where="gradients", allow_missing=True)
    if len(grads) != len(layers):
        raise AttentionHookerError(f"{len(layers)} attention layers but {len(grads)} gradient layers")
    both = on_one_device(list(layers) + list(grads))  # each layer meets its gradient
    layers, grads = both[:len(layers)], both[len(layers):]
    relevance = None
    for i, (a, g) in enumerate(zip(layers, grads)):
        if g is None or g.shape != a.shape:
            raise AttentionHookerError(
                f"gradients[{i}] is {None if g is None else tuple(g.shape)}, expected {tuple(a.shape)}: "
                "capture with keep_grad=True and call backward() on the score first"
            )
        cam = (g.double() * a.double()).clamp(min=0).mean(dim=1)  # (B, T, T)
        if relevance is None:
            relevance = torch.eye(cam.shape[-1], dtype=cam.dtype, device=cam.device).expand_as(cam).clone()
        relevance = relevance + cam @ relevance
    return relevance.to(layers[0].dtype)
