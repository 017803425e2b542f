"""What a head does, as a score per head: previous-token, duplicate-token, induction, sink and
retrieval heads, and how confident a head is. Pure functions of captured weights (and the
input's token ids).

Each returns ``(batch, heads)``: the mean, over the query rows where the role can show, of
the attention the role predicts. Read them as evidence of a pattern, not as an explanation
of the model ("attention is not explanation"): a head can score high and matter little.
"""

from __future__ import annotations

from typing import Optional

import torch

from .core import check_attention, mean_over_queries, query_mask_of
from .stats import sink_share
from ..errors import AttentionHookerError

__all__ = ["previous_token_score", "duplicate_token_score", "induction_score", "head_confidence", "sink_heads",
           "retrieval_score"]


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
    mask = query_mask_of(a, padding_mask)
    return mean_over_queries(per_query, None if mask is None else mask[:, 1:])


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
    a = check_attention(attn, "head_confidence")
    return mean_over_queries(a.amax(dim=-1), query_mask_of(a, padding_mask))


def sink_heads(attn, *, threshold: float = 0.3, position: int = 0, padding_mask=None) -> torch.Tensor:
    """Attention-sink heads (Gu et al. 2024, "When attention sink emerges in language models"):
    a head whose attention on the first token (``position``), averaged over the queries, is
    above ``threshold`` (their epsilon, 0.3).

    Returns:
        ``(batch, heads)`` bool. The share itself is :func:`attention_hooker.sink_share`.

    Example:
        >>> a = torch.tensor([[[[1.0, 0.0], [0.9, 0.1]], [[1.0, 0.0], [0.0, 1.0]]]])  # shares 0.95, 0.5
        >>> sink_heads(a, threshold=0.6)
        tensor([[ True, False]])
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise AttentionHookerError(f"threshold={threshold!r} must be a number in [0, 1)")
    return sink_share(attn, positions=[position], padding_mask=padding_mask) > threshold


def retrieval_score(attn, input_ids, *, needle, generated_from: int) -> torch.Tensor:
    """Retrieval heads (Wu et al. 2024, "Retrieval head mechanistically explains long-context
    factuality"): how much of a needle each head copies while the model generates.

    At each generated token ``t`` (from ``generated_from`` on), the query that produced it sits at
    ``t - 1``. A head copies the needle's position ``j`` when its most attended key for that query is
    ``j``, inside ``needle``, and the token there is the token generated. The score is the share
    of the needle's positions copied at least once.

    Args:
        attn: causal self-attention ``(batch, heads, tokens, tokens)`` over the prompt and the
            generated tokens (:func:`attention_hooker.stitch_steps` of a layer's generation calls,
            or one forward over the whole sequence).
        input_ids: ``(batch, tokens)``: the prompt's ids, then the generated ones; or
            ``(batch, tokens + 1)`` with the last generated token too (whose own query a
            generation loop never runs).
        needle: ``(start, stop)``: the needle's positions in the prompt (``stop`` excluded).
        generated_from: the position of the first generated token.

    Returns:
        ``(batch, heads)`` float64 in ``[0, 1]``.

    Example:
        >>> ids = torch.tensor([[7, 8, 9, 7, 8, 9]])  # needle 7 8 9, then the model wrote 8 9
        >>> a = torch.zeros(1, 1, 6, 6); a[0, 0, :, 0] = 1; a[0, 0, 3, 1] = 1; a[0, 0, 3, 0] = 0
        >>> retrieval_score(a, ids, needle=(0, 3), generated_from=4)  # copied position 1 of 3
        tensor([[0.3333]], dtype=torch.float64)
    """
    a = _self_attention(attn, "retrieval_score")
    tokens = a.shape[-1]
    ids = torch.as_tensor(input_ids).to(a.device)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.shape not in ((a.shape[0], tokens), (a.shape[0], tokens + 1)):
        raise AttentionHookerError(f"input_ids is {tuple(ids.shape)}, expected (batch, tokens) = {(a.shape[0], tokens)} "
                                   "or (batch, tokens + 1) with the last generated token")
    if (not isinstance(needle, (tuple, list)) or len(needle) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in needle)
            or not 0 <= needle[0] < needle[1] <= tokens):
        raise AttentionHookerError(f"needle={needle!r} must be (start, stop) positions with 0 <= start < stop <= {tokens}")
    n_ids = ids.shape[-1]
    if isinstance(generated_from, bool) or not isinstance(generated_from, int) or not 1 <= generated_from <= n_ids:
        raise AttentionHookerError(f"generated_from={generated_from!r} must be a position in 1..{n_ids}")
    start, stop = needle
    looked_at = a[:, :, generated_from - 1: n_ids - 1].argmax(dim=-1)  # (B, H, steps): each step's top key
    written = ids[:, generated_from:]  # (B, steps): the token each step generated
    copied_token = torch.gather(ids[:, None, :tokens].expand(-1, a.shape[1], -1), 2, looked_at) == written[:, None]
    in_needle = (looked_at >= start) & (looked_at < stop)
    hits = copied_token & in_needle  # (B, H, steps)
    positions = torch.zeros(a.shape[0], a.shape[1], tokens, dtype=torch.float64, device=a.device)
    positions.scatter_add_(2, looked_at, hits.to(torch.float64))  # times each position was copied
    return (positions[:, :, start:stop] > 0).sum(-1).to(torch.float64) / (stop - start)


def _self_attention(attn, where: str) -> torch.Tensor:
    a = check_attention(attn, where)
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
    mask = query_mask_of(a, padding_mask)
    if mask is not None:
        has = has & mask
    counts = has.sum(-1).clamp(min=1)[:, None].to(a.dtype)  # (B, 1)
    return (on_targets * has[:, None].to(a.dtype)).sum(-1) / counts
