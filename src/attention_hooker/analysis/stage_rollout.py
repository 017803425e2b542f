"""Attention rollout across the stages of a hierarchical vision transformer (Swin): ``(batch, tokens, tokens)``.

Swin's stages attend over a token grid that patch merging halves between stages: merged
token ``(i, j)`` of the next grid is a linear map of the concatenated features of its
parents ``(2i + a, 2j + b)``, ``a, b in {0, 1}`` (a parent past the edge of an odd grid is
the zero padding the merge adds). Plain rollout needs one square shape; here the rollout is
carried through each merge by a matrix, so that it runs over every layer of the model.
"""

from __future__ import annotations

import math
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

from .._checks import check_flag, check_probabilities, one_of
from ..errors import AttentionHookerError
from .core import FUSIONS, layer_sequence
from .rollout import layer_graphs, placed_first_calls

__all__ = ["stage_rollout", "merge_matrix", "merged_grid"]


def merged_grid(grid: Tuple[int, int]) -> Tuple[int, int]:
    """The ``(height, width)`` a 2 x 2 patch merging makes of ``grid`` (an odd side is padded first).

    Example:
        >>> merged_grid((7, 10))
        (4, 5)
    """
    return math.ceil(grid[0] / 2), math.ceil(grid[1] / 2)


def merge_matrix(grid: Tuple[int, int], *, dtype=torch.float64, device=None) -> torch.Tensor:
    """``(merged tokens, tokens)``: row ``c`` is ``1 / p`` on each of the ``p`` real parents of merged token ``c``.

    Why this matrix: rollout's rows are distributions over the input tokens, and a merged
    token's features are a function (a norm, then one linear layer) of its parents' features
    and nothing else, so it can draw only on what its parents drew on. How much of each parent
    reaches it depends on learned weights and on the input; rollout looks at neither anywhere
    (each layer is its head-fused map plus the residual identity), so the merge is taken alike:
    every real parent weighs the same, and the merged token's row is the mean of its parents'
    rows. The rows of ``M`` sum to 1, so rolled-out rows stay distributions. A parent past the
    edge of an odd grid is the zero padding the merge adds: no token, left out of the mean.

    Args:
        grid: ``(height, width)`` of the tokens before the merge (token ``y * width + x``).

    Example:
        >>> merge_matrix((2, 3)).tolist()
        [[0.25, 0.25, 0.0, 0.25, 0.25, 0.0], [0.0, 0.0, 0.5, 0.0, 0.0, 0.5]]
    """
    height, width = grid
    merged_h, merged_w = merged_grid(grid)
    y, x = torch.arange(height, device=device).repeat_interleave(width), torch.arange(width, device=device).repeat(height)
    child = (y // 2) * merged_w + x // 2  # (tokens,): the merged token each token goes into
    matrix = torch.zeros(merged_h * merged_w, height * width, dtype=dtype, device=device)
    matrix[child, torch.arange(height * width, device=device)] = 1.0
    return matrix / matrix.sum(dim=1, keepdim=True)  # (merged, tokens): the mean of the real parents


def stage_rollout(attentions, *, grid: Optional[Sequence[int]] = None, window_index: Optional[Mapping] = None,
                  add_residual: bool = True, head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) over every layer of a model whose stages merge tokens 2 x 2.

    Within a stage it is :func:`~attention_hooker.analysis.rollout.attention_rollout`:
    ``R <- rownorm(fuse_heads(A) + I) @ R`` (without ``+ I`` when ``add_residual=False``).
    Where a layer's token grid is the 2 x 2 merge of the layer before it, the rollout is carried
    through the merge first, ``R <- M @ R``, with ``M`` = :func:`merge_matrix` (a merged
    token's row is the mean of its real parents' rows), mapping the ``(tokens_s, tokens_0)``
    rollout to ``(tokens_{s+1}, tokens_0)``. A windowed layer's dense map (``windows="dense"``,
    the default) is over the whole grid, so the rollout crosses windows and undoes shifts; its
    rows may miss the weight put on padding, which ``rownorm`` spreads over the real keys.

    Args:
        attentions: per-layer maps in model order: ``hooker.values`` (first call of each layer),
            a loaded capture, or a list of ``(batch, heads, tokens, tokens)``; with
            ``window_index``, calls kept per window (``windows="keep"``) are placed first.
        grid: ``(height, width)`` of the first layer's tokens; by default read from
            ``window_index``, or a square grid. Later layers keep the grid while their token
            count stays, and take the 2 x 2 merged grid when it changes.
        window_index: ``hooker.window_index`` (or a loaded capture's), ``{layer_name:
            [WindowIndex or None per call]}``, for calls kept per window (only the first call of
            each layer is placed); each windowed layer's grid is read from it. Taken from
            ``attentions`` when it is a hooker or a loaded capture that holds one.
        add_residual: add the identity for the residual connection.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.

    Returns:
        ``(batch, last tokens, first tokens)`` in the first layer's dtype: row ``c`` (a token of
        the last layer's grid, ``y * width + x``) over the first layer's tokens; rows sum to 1.

    Raises:
        AttentionHookerError: on maps that are not square probabilities of one batch, a grid
            that does not hold a layer's tokens, or a change of token count that is not a
            2 x 2 merge of the grid before it.

    Example:
        >>> first = torch.softmax(torch.randn(1, 2, 16, 16), -1)   # a 4 x 4 grid
        >>> second = torch.softmax(torch.randn(1, 2, 4, 4), -1)    # merged: 2 x 2
        >>> r = stage_rollout([first, second])
        >>> r.shape, bool(torch.allclose(r.sum(-1), torch.ones(1, 4)))
        (torch.Size([1, 4, 16]), True)
    """
    one_of(head_fusion, "head_fusion", FUSIONS)
    add_residual = check_flag(add_residual, "add_residual")
    known: List[Optional[Tuple[int, int]]] = []
    attentions, window_index = placed_first_calls(attentions, window_index)
    if window_index is not None:
        known = [None if not window_index.get(name) or window_index[name][0] is None
                 else (window_index[name][0].height, window_index[name][0].width) for name in attentions]
    layers = layer_sequence(attentions, where="attentions")
    for i, a in enumerate(layers):
        if a.shape[-1] != a.shape[-2] or a.shape[0] != layers[0].shape[0]:
            raise AttentionHookerError(
                f"attentions[{i}] is {tuple(a.shape)}: rollout needs square self-attention maps (batch, heads, tokens, "
                f"tokens) of one batch ({layers[0].shape[0]}, as attentions[0])")
        check_probabilities(a, f"attentions[{i}]")
    grids = _layer_grids([a.shape[-1] for a in layers], grid, known + [None] * (len(layers) - len(known)))
    graphs = layer_graphs(layers, add_residual, head_fusion)  # (B, T_i, T_i) float64
    # The product A~_L M ... A~_1 is taken from the top: each step is (T_last, T_i) @ (T_i, T_i), so the
    # first stage's large grid costs T_last * T_0^2, not T_0^3 (Swin-T at 224: 49 rows, not 3136).
    rollout = graphs[-1]  # (B, T_L, T_L)
    for i in range(len(graphs) - 2, -1, -1):
        if grids[i + 1] != grids[i]:
            rollout = rollout @ merge_matrix(grids[i], device=rollout.device)  # (B, T_L, T_i)
        rollout = rollout @ graphs[i]
    return rollout.to(layers[0].dtype)  # (B, T_L, T_0)


def _layer_grids(tokens: List[int], first: Optional[Sequence[int]],
                 known: List[Optional[Tuple[int, int]]]) -> List[Tuple[int, int]]:
    """Each layer's ``(height, width)``: the first from ``first``, the index or a square; then
    the same grid, or its 2 x 2 merge, as the token count says (checked against the index)."""
    grids: List[Tuple[int, int]] = []
    for i, (count, seen) in enumerate(zip(tokens, known)):
        if i == 0:
            if first is not None:
                first = (int(first[0]), int(first[1]))
                if seen is not None and seen != first:
                    raise AttentionHookerError(f"grid={first} but the window index of the first layer says {seen}")
            grid = first or seen
            if grid is None:
                root = math.isqrt(count)
                if root * root != count:
                    raise AttentionHookerError(f"the first layer's {count} tokens are not a square grid; pass "
                                               "grid=(height, width)")
                grid = (root, root)
        else:
            before = grids[-1]
            grid = seen or (before if count == before[0] * before[1] else merged_grid(before))
            if grid != before and grid != merged_grid(before):
                raise AttentionHookerError(
                    f"attentions[{i}] is on a {grid[0]}x{grid[1]} grid after a {before[0]}x{before[1]} one: not the "
                    f"same grid nor its 2 x 2 merge ({merged_grid(before)[0]}x{merged_grid(before)[1]})")
        if grid[0] * grid[1] != count:
            raise AttentionHookerError(
                f"attentions[{i}] has {count} tokens, which a {grid[0]}x{grid[1]} grid does not hold"
                + ("" if i == 0 else ": a change of token count that is not a 2 x 2 merge of the grid before it"))
        grids.append(grid)
    return grids
