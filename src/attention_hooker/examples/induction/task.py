"""The task: random tokens repeated twice, and the loss on each half."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.nn import functional as F

from ...errors import AttentionHookerError
from .model import InductionConfig

__all__ = ["repeated_random_tokens", "training_tokens", "half_losses", "HalfLosses"]


def repeated_random_tokens(batch: int, config: InductionConfig, *,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``batch`` sequences of ``config.half`` uniform random ids, each followed by itself.

    Returns:
        ``(batch, 2 * half)`` int64: ``ids[:, half:] == ids[:, :half]``.

    Example:
        >>> ids = repeated_random_tokens(2, InductionConfig(vocab=10, half=3), generator=torch.Generator().manual_seed(0))
        >>> ids.shape, bool((ids[:, 3:] == ids[:, :3]).all())
        (torch.Size([2, 6]), True)
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise AttentionHookerError(f"batch={batch!r} must be a positive int")
    first = torch.randint(config.vocab, (batch, config.half), generator=generator)  # (B, L)
    return torch.cat([first, first], dim=1)  # (B, 2L)


def training_tokens(batch: int, config: InductionConfig, *, shortest: int = 4,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """What the model was trained on: ``2 * half`` uniform random ids in which a segment of a random
    length (``shortest .. half``) is repeated at once, from a random place.

    Random tokens repeated twice always at the same places (:func:`repeated_random_tokens`) can be
    copied by position alone: query ``i`` attends to key ``i - half + 1``, one layer, no induction.
    Moving the repeat makes the copy depend on the tokens: a previous-token head then an induction head.

    Returns:
        ``(batch, 2 * half)`` int64.

    Example:
        >>> ids = training_tokens(3, InductionConfig(vocab=10, half=4), shortest=2,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> ids.shape
        torch.Size([3, 8])
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise AttentionHookerError(f"batch={batch!r} must be a positive int")
    if isinstance(shortest, bool) or not isinstance(shortest, int) or not 1 <= shortest <= config.half:
        raise AttentionHookerError(f"shortest={shortest!r} must be an int in 1..{config.half} (the half's length)")
    ids = torch.randint(config.vocab, (batch, config.tokens), generator=generator)  # (B, T)
    lengths = torch.randint(shortest, config.half + 1, (batch,), generator=generator)  # (B,)
    starts = (torch.rand(batch, generator=generator) * (config.tokens - 2 * lengths + 1)).long()  # 0 .. T - 2s
    for row, (s, p) in enumerate(zip(lengths.tolist(), starts.tolist())):
        ids[row, p + s: p + 2 * s] = ids[row, p: p + s]
    return ids


class HalfLosses(NamedTuple):
    """Mean next-token cross-entropy (nats) on each half's predictions.

    ``first``: the predictions of tokens ``1 .. half - 1`` (random: ``ln(vocab)`` is the best a model
    can do). ``repeated``: of tokens ``half + 1 .. 2 * half - 1``, each of which followed an earlier
    copy of its predecessor (an induction head can copy it). Token ``half`` (the first of the repeat,
    predicted from the last of the first half) is in neither.
    """

    first: float
    repeated: float


def half_losses(logits: torch.Tensor, input_ids: torch.Tensor, half: int) -> HalfLosses:
    """The loss on the first half and on the repeated half (see :class:`HalfLosses`).

    Args:
        logits: ``(batch, 2 * half, vocab)``: the model's scores for the next token at each position.
        input_ids: ``(batch, 2 * half)``.
        half: the first half's length.
    """
    ids = torch.as_tensor(input_ids)
    if logits.dim() != 3 or ids.shape != logits.shape[:2] or ids.shape[1] != 2 * half:
        raise AttentionHookerError(f"logits {tuple(logits.shape)} and input_ids {tuple(ids.shape)} must be "
                                   f"(batch, {2 * half}, vocab) and (batch, {2 * half})")
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")  # (B, T-1)
    # per_token[:, i] is the loss of predicting token i + 1
    first = per_token[:, : half - 1]  # tokens 1 .. half-1
    repeated = per_token[:, half:]  # tokens half+1 .. 2*half-1
    return HalfLosses(float(first.mean()), float(repeated.mean()))
