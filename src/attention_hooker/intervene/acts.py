"""What an intervention does to one head of one attention call: each act, and the ready-made
functions of a head's own map (keep the top keys, block keys, uniform over the allowed keys).

An act either gives a head's weights ``(batch, query, key)`` (its output then being those
weights times the head's values), or gives the head's output ``(batch, query, head_dim)``
from the one it had."""

from __future__ import annotations

import numbers
from typing import Callable, NamedTuple, Sequence, Union

import torch

from ..errors import InterventionError

__all__ = ["Call", "Zero", "Mean", "Gate", "PatchOutput", "GivenMap", "MapOfOwn", "PatchWeights",
           "top_k_keys", "block_keys", "uniform_weights"]


class Call(NamedTuple):
    """One attention call, as a route hands it to the acts.

    ``output``: the heads' outputs ``(batch, heads, query, head_dim)`` as the kernel computed
    them; ``weights(heads)``: the model's own weights of those heads ``(batch, len(heads),
    query, key)``; ``value(head)``: that head's values ``(batch, key, head_dim)``; ``index``: the
    call's number among the layer's calls since the intervention began."""

    layer: str
    index: int
    output: torch.Tensor
    weights: Callable[[Sequence[int]], torch.Tensor]
    value: Callable[[int], torch.Tensor]


# ------------------------------------------------------------------ output acts
class Zero:
    """Knock-out: the head's output is 0."""

    def output(self, call: Call, head: int, current: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(current)

    def __repr__(self) -> str:
        return "knocked out"


class Mean:
    """Mean knock-out: the head's output is its mean over a reference run, ``means`` ``(heads, head_dim)``."""

    def __init__(self, means: torch.Tensor):
        self.means = means

    def output(self, call: Call, head: int, current: torch.Tensor) -> torch.Tensor:
        mean = self.means[head]  # (Dv,)
        if mean.shape[-1] != current.shape[-1]:
            raise InterventionError(
                f"layer {call.layer!r} head {head}: the reference's mean output has {mean.shape[-1]} values per "
                f"head, this call's heads have {current.shape[-1]}: the reference is from another model")
        return mean.to(current.dtype).to(current.device).expand_as(current)

    def __repr__(self) -> str:
        return "mean"


class Gate:
    """Scaling: the head's output times ``gates[..., position]`` (a tensor: gradients reach it);
    gates ``(heads,)`` gate every batch item alike, ``(batch, heads)`` each item its own way."""

    def __init__(self, gates: torch.Tensor, position: int):
        self.gates, self.position = gates, position

    def output(self, call: Call, head: int, current: torch.Tensor) -> torch.Tensor:
        gate = self.gates[..., self.position].to(current.dtype).to(current.device)  # () or (batch,)
        if gate.dim() == 1:
            if gate.shape[0] != current.shape[0]:
                raise InterventionError(
                    f"layer {call.layer!r}: gates for {gate.shape[0]} batch items, but the call has "
                    f"{current.shape[0]}; give (batch, heads) gates of the batch the model runs")
            gate = gate.view(-1, *([1] * (current.dim() - 1)))  # (batch, 1, 1)
        return current * gate

    def __repr__(self) -> str:
        return "scaled"


class PatchOutput:
    """Patching: the head's output is the one a recorded run gave in the same call."""

    def __init__(self, recording, layer: str):
        self.recording, self.layer = recording, layer

    def output(self, call: Call, head: int, current: torch.Tensor) -> torch.Tensor:
        recorded = _recorded(self.recording.outputs, self.layer, call, "output")
        _same_shape(recorded, call.output, call, "head outputs (batch, heads, query, head_dim)")
        return recorded[:, head].to(current.dtype).to(current.device)

    def __repr__(self) -> str:
        return "patched output"


# ------------------------------------------------------------------ weight acts
class GivenMap:
    """A replacement map, ``(batch, query, key)`` or ``(query, key)`` (the same for every item)."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def weights_of(self, call: Call, head: int) -> torch.Tensor:
        return self.weights

    def __repr__(self) -> str:
        return "replaced map"


class MapOfOwn:
    """A replacement map computed from the head's own: ``function((batch, query, key)) -> (batch, query, key)``."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]):
        self.function = function

    def weights_of(self, call: Call, head: int) -> torch.Tensor:
        return self.function(call.weights([head])[:, 0])  # (B, Q, K)

    def __repr__(self) -> str:
        return f"map from its own ({getattr(self.function, '__name__', 'a function')})"


class PatchWeights:
    """Patching the pattern: the head's weights are the ones a recorded run had in the same call."""

    def __init__(self, recording, layer: str):
        self.recording, self.layer = recording, layer

    def weights_of(self, call: Call, head: int) -> torch.Tensor:
        recorded = _recorded(self.recording.weights, self.layer, call, "weights")
        own = call.weights([head])  # (B, 1, Q, K)
        expected = (own.shape[0], call.output.shape[1]) + tuple(own.shape[2:])
        if tuple(recorded.shape) != expected:
            raise InterventionError(
                f"layer {call.layer!r} call {call.index}: the recorded weights have shape {tuple(recorded.shape)}, "
                f"this call's are {expected} (batch, heads, query, key): a patch must come from a run of the same "
                "batch and length")
        return recorded[:, head]

    def __repr__(self) -> str:
        return "patched weights"


def _recorded(store: dict, layer: str, call: Call, what: str) -> torch.Tensor:
    calls = store.get(layer, [])
    if call.index >= len(calls):
        raise InterventionError(
            f"layer {call.layer!r}: this is its call {call.index + 1} in the intervention, but the recording holds "
            f"{len(calls)} call(s) of {layer!r} ({what}); record the same run (the same number of calls) to patch from")
    return calls[call.index]


def _same_shape(recorded: torch.Tensor, current: torch.Tensor, call: Call, axes: str) -> None:
    if recorded.shape != current.shape:
        raise InterventionError(
            f"layer {call.layer!r} call {call.index}: the recorded {axes} have shape {tuple(recorded.shape)}, this "
            f"call's are {tuple(current.shape)}: a patch must come from a run of the same batch and length")


# ------------------------------------------------------------ functions of a map
Keys = Union[int, Sequence[int], torch.Tensor]


def _renormalised(weights: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum; a row with nothing left stays 0."""
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / torch.where(total > 0, total, torch.ones_like(total)), weights)


def top_k_keys(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A map function for :meth:`HeadIntervention.replace_weights`: each query row keeps its
    ``k`` largest weights, renormalised to sum to 1; the other keys get 0.

    Args:
        k: how many keys each row keeps (all of them where a row has fewer).

    Returns:
        ``function(weights (batch, query, key)) -> (batch, query, key)``.

    Example:
        >>> top_k_keys(1)(torch.tensor([[[0.2, 0.5, 0.3]]]))
        tensor([[[0., 1., 0.]]])
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InterventionError(f"top_k_keys needs k, a positive int; got {k!r}")

    def top_k(weights: torch.Tensor) -> torch.Tensor:
        kept = torch.topk(weights, min(k, weights.shape[-1]), dim=-1)
        return _renormalised(torch.zeros_like(weights).scatter(-1, kept.indices, kept.values))

    top_k.__name__ = f"top_{k}_keys"
    return top_k


def block_keys(keys: Keys) -> Callable[[torch.Tensor], torch.Tensor]:
    """A map function for :meth:`HeadIntervention.replace_weights`: the given key positions get
    0 in every row, and each row is renormalised over the keys it has left (a row left with
    none stays 0).

    Args:
        keys: a key position, a list of them, or a bool tensor ``(key,)`` of blocked keys.

    Returns:
        ``function(weights (batch, query, key)) -> (batch, query, key)``.

    Example:
        >>> block_keys([0])(torch.tensor([[[0.5, 0.25, 0.25]]]))
        tensor([[[0.0000, 0.5000, 0.5000]]])
    """
    listed = [keys] if isinstance(keys, numbers.Integral) else keys
    if not (isinstance(keys, torch.Tensor) and keys.dtype == torch.bool) and (
            isinstance(listed, (str, bytes)) or not isinstance(listed, (Sequence, torch.Tensor))
            or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) for k in
                   (listed.reshape(-1).tolist() if isinstance(listed, torch.Tensor) else listed))):
        raise InterventionError(f"block_keys takes key positions (ints) or a bool mask (key,), got {keys!r}")

    def blocked(weights: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(weights.shape[-1], dtype=torch.bool, device=weights.device)
        if isinstance(keys, torch.Tensor) and keys.dtype == torch.bool:
            if keys.shape != mask.shape:
                raise InterventionError(f"block_keys: a mask of shape {tuple(keys.shape)} for {mask.shape[0]} keys")
            mask = keys.to(weights.device)
        else:
            index = torch.as_tensor([keys] if isinstance(keys, int) else keys, dtype=torch.long).reshape(-1)
            if index.numel() and not (-mask.shape[0] <= int(index.min()) and int(index.max()) < mask.shape[0]):
                raise InterventionError(f"block_keys: key positions {index.tolist()} for a map of {mask.shape[0]} keys")
            mask[index.to(weights.device)] = True
        return _renormalised(weights.masked_fill(mask, 0.0))

    blocked.__name__ = "block_keys"
    return blocked


def uniform_weights() -> Callable[[torch.Tensor], torch.Tensor]:
    """A map function for :meth:`HeadIntervention.replace_weights`: each query row spreads its
    weight evenly over the keys its own map allowed (those with a weight above 0: a causal or
    padding mask stays as it was).

    Returns:
        ``function(weights (batch, query, key)) -> (batch, query, key)``.

    Example:
        >>> uniform_weights()(torch.tensor([[[0.7, 0.3, 0.0]]]))
        tensor([[[0.5000, 0.5000, 0.0000]]])
    """
    def uniform(weights: torch.Tensor) -> torch.Tensor:
        return _renormalised((weights > 0).to(weights.dtype))

    return uniform
