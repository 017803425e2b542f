"""Knock-out effects: how far a metric moves when each head is knocked out, measured, not estimated.

Knock-outs are batched: the input is repeated ``per_forward`` times along the batch, and each copy
knocks out its own head through per-item gates (``HeadIntervention.scale`` with ``(batch, heads)``
gates: 1 leaves a head bitwise as it was, 0 zeroes its output). ``L`` layers of ``H`` heads cost
``1 + ceil(L * H / per_forward)`` forwards of ``per_forward`` copies; :func:`knockout_plan` says so
before any work.
"""

from __future__ import annotations

import math
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import InterventionError
from .intervention import HeadIntervention
from .recording import record_heads

__all__ = ["knockout_effects", "knockout_plan", "HeadEffects", "language_model_loss", "mean_pooled_output"]

Metric = Callable[[object, object], torch.Tensor]


class HeadEffects(dict):
    """``{layer: (heads,) float64}``: each head's effect, the metric with the head knocked out
    minus the metric of the plain run (vector metrics: ``1 - cosine`` to the plain run's), the mean
    over the batch items.

    Attributes:
        base: the plain run's metric per item, ``(batch,)`` (or ``(batch, D)`` for a vector metric).
        forwards: the forwards it took (the plain one included).
    """

    def __init__(self, effects: Mapping[str, torch.Tensor], base: torch.Tensor, forwards: int):
        super().__init__(effects)
        self.base, self.forwards = base, forwards

    def ranked(self, top: Optional[int] = None) -> List[Tuple[str, int, float]]:
        """``[(layer, head, effect)]``, the largest effect first."""
        rows = [(layer, h, float(v)) for layer, values in self.items() for h, v in enumerate(values.tolist())]
        rows.sort(key=lambda row: -row[2])
        return rows if top is None else rows[:top]

    def __repr__(self) -> str:
        heads = sum(v.numel() for v in self.values())
        return f"HeadEffects({len(self)} layers, {heads} heads, {self.forwards} forwards)"


class KnockoutPlan(NamedTuple):
    """What :func:`knockout_effects` will run: ``heads`` knock-outs in ``forwards`` forwards (the
    plain one included), each of ``copies`` copies of the input at most."""

    heads: int
    forwards: int
    copies: int

    def __str__(self) -> str:
        return (f"{self.heads} knock-outs, {self.copies} per forward: {self.forwards} forwards of up to "
                f"{self.copies} copies of the input (the plain run included)")


def knockout_plan(heads_per_layer: Mapping[str, int], per_forward: int = 16) -> KnockoutPlan:
    """The cost of knocking out every head of ``heads_per_layer`` ``{layer: heads}``, said before any work.

    Example:
        >>> str(knockout_plan({"a": 12, "b": 12}, per_forward=16))
        '24 knock-outs, 16 per forward: 3 forwards of up to 16 copies of the input (the plain run included)'
    """
    heads = sum(heads_per_layer.values())
    return KnockoutPlan(heads, 1 + math.ceil(heads / per_forward), min(per_forward, max(heads, 1)))


def knockout_effects(model: nn.Module, inputs, metric: Metric, *, layers: Optional[Sequence[str]] = None,
                     per_forward: int = 16, forward: Optional[Callable[[nn.Module, object], object]] = None,
                     on_plan: Optional[Callable[[KnockoutPlan], None]] = None) -> HeadEffects:
    """Each head's measured effect on ``metric`` when it is knocked out (its output zeroed).

    Args:
        model: the model, in ``eval()`` (effects of a model with dropout on are noise).
        inputs: what ``forward`` takes: a tensor ``(batch, ...)`` or a mapping of such tensors
            (``tokenizer(...)``'s output); each is repeated along its first axis.
        metric: ``metric(output, inputs) -> (batch,)`` (one number per item: a loss, a logit) or
            ``(batch, D)`` (a vector per item: an embedding); :func:`language_model_loss` and
            :func:`mean_pooled_output` are two.
        layers: the attention layers whose heads are knocked out (names as
            :func:`~attention_hooker.find_attention_modules` gives them); default: every one.
        per_forward: knock-outs run side by side in one forward (the batch grows that many times).
        forward: ``forward(model, inputs) -> output``; default ``model(**inputs)`` for a mapping,
            ``model(inputs)`` for a tensor.
        on_plan: called with the :class:`KnockoutPlan` before the knock-outs run (to print the cost).

    Returns:
        :class:`HeadEffects`: ``{layer: (heads,)}`` of metric(knocked out) - metric(plain), or for
        a vector metric ``1 - cosine`` between the two; averaged over the batch items.

    Raises:
        InterventionError: when the metric does not give one value (or vector) per batch item,
            ``per_forward`` is not a positive int, or no attention layer runs.

    Example:
        >>> attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(1, 5, 8)
        >>> effects = knockout_effects(attention, x, lambda out, _: out[0].pow(2).mean((1, 2)),
        ...                            forward=lambda m, x: m(x, x, x))
        >>> list(effects), effects[""].shape, effects.forwards
        ([''], torch.Size([2]), 2)
    """
    if not isinstance(per_forward, int) or isinstance(per_forward, bool) or per_forward < 1:
        raise InterventionError(f"per_forward must be a positive int (knock-outs per forward), got {per_forward!r}")
    forward = forward or _default_forward
    batch = _batch_of(inputs)  # checked before any work
    with torch.no_grad():
        with record_heads(model, layers) as recording:
            base = _per_item(metric(forward(model, inputs), inputs), batch, "the plain run")
    heads = {layer: calls[0].shape[1] for layer, calls in recording.outputs.items() if calls}
    if not heads:
        raise InterventionError("no attention layer ran: nothing to knock out (is `layers` right? a model compiled "
                                "with torch.compile before this runs compiled code without hooks: pass the "
                                "uncompiled one)")
    plan = knockout_plan(heads, per_forward)
    if on_plan is not None:
        on_plan(plan)
    targets = [(layer, head) for layer, count in heads.items() for head in range(count)]
    effects = {layer: torch.zeros(count, dtype=torch.float64) for layer, count in heads.items()}
    forwards = 1
    for start in range(0, len(targets), per_forward):
        chunk = targets[start:start + per_forward]
        knocked = _knocked_run(model, inputs, metric, forward, chunk, heads, batch)  # (copies, batch[, D])
        forwards += 1
        for (layer, head), values in zip(chunk, knocked):
            effects[layer][head] = float(_moved(values, base).mean())
    return HeadEffects(effects, base, forwards)


def _knocked_run(model, inputs, metric, forward, chunk, heads, batch) -> torch.Tensor:
    """One forward of ``len(chunk)`` copies of the input, copy ``j`` knocking out head ``chunk[j]``;
    the metric per copy and item ``(copies, batch[, D])``."""
    copies = len(chunk)
    intervention = HeadIntervention(model)
    for layer in dict.fromkeys(layer for layer, _ in chunk):
        gates = torch.ones(copies * batch, heads[layer])
        for j, (name, head) in enumerate(chunk):
            if name == layer:
                gates[j * batch:(j + 1) * batch, head] = 0.0
        intervention.scale(layer, gates)
    repeated = _repeat(inputs, copies)
    with torch.no_grad(), intervention:
        values = _per_item(metric(forward(model, repeated), repeated), copies * batch, "a knocked-out run")
    return values.reshape(copies, batch, *values.shape[1:])


def _moved(knocked: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per item: the difference of two numbers, or ``1 - cosine`` of two vectors."""
    if base.dim() == 1:
        return knocked.double() - base.double()
    return 1 - torch.nn.functional.cosine_similarity(knocked.double(), base.double(), dim=-1)


def _per_item(values, batch: int, where: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.dim() not in (1, 2) or values.shape[0] != batch:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise InterventionError(f"the metric gave {shape} on {where}; expected one number per item ({batch},) "
                                f"or one vector per item ({batch}, D)")
    return values.detach().float().cpu()


def _batch_of(inputs) -> int:
    first = inputs if isinstance(inputs, torch.Tensor) else next(
        (v for v in inputs.values() if isinstance(v, torch.Tensor)), None) if isinstance(inputs, Mapping) else None
    if first is None or first.dim() == 0:
        raise InterventionError("inputs must be a tensor (batch, ...) or a mapping of such tensors, "
                                f"got {type(inputs).__name__}")
    return first.shape[0]


def _repeat(inputs, copies: int):
    """``inputs`` with each tensor repeated ``copies`` times along its first axis (copy-major)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.repeat(copies, *([1] * (inputs.dim() - 1)))
    repeated = {key: value.repeat(copies, *([1] * (value.dim() - 1))) if isinstance(value, torch.Tensor) else value
                for key, value in inputs.items()}
    return repeated if type(inputs) is dict else type(inputs)(repeated)  # a BatchEncoding stays one


def _default_forward(model: nn.Module, inputs):
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def language_model_loss(output, inputs) -> torch.Tensor:
    """Per item, the mean next-token cross-entropy of a causal language model on its input
    (``output.logits`` (batch, tokens, vocab) against ``inputs["input_ids"]``; a prediction counts
    where both the token it is made from and the token it predicts are real, ``attention_mask`` 1):
    ``(batch,)``."""
    logits = output.logits if hasattr(output, "logits") else output[0]
    ids = inputs["input_ids"]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    mask = inputs.get("attention_mask")
    # a prediction counts where it is made from a real token of a real token (left padding: not from a pad)
    kept = torch.ones_like(losses) if mask is None else (mask[:, :-1] * mask[:, 1:]).to(losses.dtype)
    return (losses * kept).sum(1) / kept.sum(1).clamp(min=1)


def mean_pooled_output(output, inputs) -> torch.Tensor:
    """Per item, the last hidden state averaged over the real tokens (a sentence embedding, as
    sentence-transformers pools MiniLM): ``(batch, hidden)``."""
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    kept = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device) if mask is None \
        else mask.to(hidden.dtype)
    return (hidden * kept[..., None]).sum(1) / kept.sum(1, keepdim=True).clamp(min=1)
