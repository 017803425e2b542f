"""What a head does, as a score per head: previous-token, duplicate-token and induction heads,
and how confident a head is. Pure functions of captured weights (and the input's token ids).

Each returns ``(batch, heads)``: the mean, over the query rows where the role can show, of
the attention the role predicts. Read them as evidence of a pattern, not as an explanation
of the model ("attention is not explanation"): a head can score high and matter little.
"""

from __future__ import annotations

from typing import Optional

import torch

from .analysis import _check_attention, _mean_over_queries, _query_mask
from .errors import AttentionHookerError

__all__ = ["previous_token_score", "duplicate_token_score", "induction_score", "head_confidence"]


def previous_token_score(attn, *, padding_mask=None) -> torch.Tensor:
    """Attention from each token to the one just before it (previous-token heads).

    Args:
        attn: self-attention ``(batch, heads, tokens, tokens)``.
        padding_mask: ``(batch, tokens)``, 1 for real tokens; padded queries are left out.

    Returns:
        ``(batch, heads)``: mean of ``attn[..., i, i - 1]`` over real queries ``i >= 1``.

    Example:
        >>> previous_token_score(torch.tensor([[[[1., 0, 0], [1, 0, 0], [0, 1, 0]]]]))
        tensor([[1.]], dtype=torch.float64)
    """
    a = _self_attention(attn, "previous_token_score")
    per_query = a.diagonal(offset=-1, dim1=-2, dim2=-1)  # (B, H, T-1): query i+1 -> key i
    mask = _query_mask(a, padding_mask)
    return _mean_over_queries(per_query, None if mask is None else mask[:, 1:])


def duplicate_token_score(attn, input_ids, *, padding_mask=None) -> torch.Tensor:
    """Attention from each token to earlier copies of itself (duplicate-token heads).

    Returns:
        ``(batch, heads)``: over the queries that have an earlier copy, the mean of the
        attention they give to all their earlier copies; 0 where no query has one.
    """
    a = _self_attention(attn, "duplicate_token_score")
    ids = _ids(input_ids, a)
    same = ids[:, :, None] == ids[:, None, :]  # (B, T, T): key j holds the query i's token
    earlier = torch.ones_like(same[0]).tril(-1)  # j < i
    return _role(a, same & earlier, padding_mask)


def induction_score(attn, input_ids, *, padding_mask=None) -> torch.Tensor:
    """Attention from each token to the token that followed an earlier copy of it (induction
    heads, Olsson et al. 2022: on ``[A B ... A]`` the last ``A`` attends to ``B``).

    Measured best on a repeated random sequence (``torch.cat([x, x], -1)``), where every
    token of the second half has exactly one such target.

    Returns:
        ``(batch, heads)``: over the queries that have such a target, the mean of the
        attention they give to all their targets; 0 where no query has one.
    """
    a = _self_attention(attn, "induction_score")
    ids = _ids(input_ids, a)
    follows_copy = torch.zeros_like(ids[:, :, None] == ids[:, None, :])  # (B, T, T)
    follows_copy[:, :, 1:] = ids[:, :, None] == ids[:, None, :-1]  # key j's previous token is query i's token
    earlier = torch.ones_like(follows_copy[0]).tril(-1)  # j < i: the copy and its follower came before
    return _role(a, follows_copy & earlier, padding_mask)


def head_confidence(attn, *, padding_mask=None) -> torch.Tensor:
    """How confident each head is: the largest weight of each row, averaged over real
    queries (Voita et al. 2019). 1 for a head that always looks at one token; ``1/keys``
    for a uniform one.

    Example:
        >>> head_confidence(torch.full((1, 2, 3, 4), 0.25))
        tensor([[0.2500, 0.2500]], dtype=torch.float64)
    """
    a = _check_attention(attn, "head_confidence")
    return _mean_over_queries(a.amax(dim=-1), _query_mask(a, padding_mask))


def _self_attention(attn, where: str) -> torch.Tensor:
    a = _check_attention(attn, where)
    if a.shape[-1] != a.shape[-2]:
        raise AttentionHookerError(f"{where} needs self-attention (query == key), got {tuple(a.shape)}")
    return a


def _ids(input_ids, a: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(input_ids).to(a.device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape != (a.shape[0], a.shape[-1]):
        raise AttentionHookerError(f"input_ids is {tuple(ids.shape)}, expected (batch, tokens) = "
                                   f"{(a.shape[0], a.shape[-1])}")
    return ids


def _role(a: torch.Tensor, targets: torch.Tensor, padding_mask: Optional[object]) -> torch.Tensor:
    """Mean over the queries with at least one target of the attention on their targets."""
    on_targets = (a * targets[:, None].to(a.dtype)).sum(-1)  # (B, H, Q)
    has = targets.any(-1)  # (B, Q)
    mask = _query_mask(a, padding_mask)
    if mask is not None:
        has = has & mask
    counts = has.sum(-1).clamp(min=1)[:, None].to(a.dtype)  # (B, 1)
    return (on_targets * has[:, None].to(a.dtype)).sum(-1) / counts
