"""One attention layer's plan: which act each of its heads gets, checked when given, and the
one function that applies them to a call's head outputs ``(batch, heads, query, head_dim)``."""

from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..capture.diagnostics import is_compiled
from ..capture.discovery import find_attention_modules
from ..capture.heads import declared_heads
from ..errors import InterventionError
from .acts import Call

__all__ = ["LayerPlan", "resolve_layer", "resolve_layers", "head_list", "refuse_compiled"]


class LayerPlan:
    """The acts on one layer's heads (at most one that gives weights and one that gives the
    output per head), and the recording its calls go to."""

    def __init__(self, name: str, module: nn.Module, recorder=None):
        self.name, self.module, self.recorder = name, module, recorder
        self.heads = declared_heads(module)  # None where the module declares no head count
        self.weight_acts: Dict[int, object] = {}
        self.output_acts: Dict[int, object] = {}
        self.calls = 0  # calls acted on since the intervention began

    def add(self, heads: Sequence[int], act_of, *, kind: str) -> None:
        """Gives each head of ``heads`` the act ``act_of(position in heads)``."""
        acts = self.weight_acts if kind == "weights" else self.output_acts
        for position, head in enumerate(heads):
            if head in acts:
                raise InterventionError(
                    f"layer {self.name!r} head {head} already has an act on its {kind} ({acts[head]!r}): one act on "
                    "the weights and one on the output per head")
            acts[head] = act_of(position)

    def apply(self, call: Call) -> torch.Tensor:
        """The call's head outputs ``(batch, heads, query, head_dim)`` after the acts: the same tensor
        when no act changes a head (an untouched head is bitwise the kernel's)."""
        output = call.output
        count = output.shape[1]
        if self.recorder is not None:
            self.recorder.keep(self.name, output, call.weights(list(range(count))) if self.recorder.keep_weights else None)
        changed = {}
        for head, act in self.weight_acts.items():
            _check_head(self.name, head, count)
            weights = _checked_map(act.weights_of(call, head), call, head)  # (B, Q, K)
            value = call.value(head)  # (B, K, Dv)
            changed[head] = torch.matmul(weights.to(value.dtype).to(value.device), value)  # (B, Q, Dv)
        for head, act in self.output_acts.items():
            _check_head(self.name, head, count)
            changed[head] = act.output(call, head, changed.get(head, output[:, head]))
        self.calls += 1
        if not changed:
            return output
        result = output.clone()
        for head, head_output in changed.items():
            result[:, head] = head_output
        return result

    @property
    def acts(self) -> bool:
        """Whether the plan changes any head (a plan that only records does not)."""
        return bool(self.weight_acts or self.output_acts)


def _check_head(layer: str, head: int, count: int) -> None:
    if not 0 <= head < count:
        raise InterventionError(f"layer {layer!r} has {count} heads (0 to {count - 1}); head {head} is not one of them")


def _checked_map(weights, call: Call, head: int) -> torch.Tensor:
    own_shape = (call.output.shape[0], call.output.shape[2])  # (batch, query)
    keys = call.value(head).shape[-2]
    expected = own_shape + (keys,)
    if not isinstance(weights, torch.Tensor):
        raise InterventionError(
            f"layer {call.layer!r} head {head}: a replacement map must be a tensor (batch, query, key) = {expected}, "
            f"got {type(weights).__name__}")
    if tuple(weights.shape) == expected[1:]:
        return weights.unsqueeze(0).expand(expected)
    if tuple(weights.shape) != expected:
        raise InterventionError(
            f"layer {call.layer!r} head {head}: the replacement map has shape {tuple(weights.shape)}; this call needs "
            f"(batch, query, key) = {expected} or (query, key) = {expected[1:]}")
    return weights


def head_list(plan: LayerPlan, heads) -> List[int]:
    """``heads`` (an int, a sequence of ints, or ``None``: every head) as a checked list."""
    if heads is None:
        if plan.heads is None:
            raise InterventionError(
                f"layer {plan.name!r} declares no head count (num_heads, num_attention_heads, ...): name its heads")
        return list(range(plan.heads))
    given = [heads] if isinstance(heads, numbers.Integral) else heads
    try:
        bad = [h for h in given if isinstance(h, bool) or not isinstance(h, numbers.Integral)]
        listed = [int(h) for h in given]
    except (TypeError, ValueError):
        bad = [heads]
    if bad:
        raise InterventionError(f"heads must be an int or a sequence of ints (head indices), got {heads!r}")
    if not listed:
        raise InterventionError(f"layer {plan.name!r}: no head given")
    if len(set(listed)) != len(listed):
        raise InterventionError(f"layer {plan.name!r}: head indices repeat in {listed}")
    if plan.heads is not None:
        for head in listed:
            _check_head(plan.name, head, plan.heads)
    return listed


def resolve_layer(model: nn.Module, layer: str) -> Tuple[str, nn.Module]:
    """``(name, module)`` of ``layer``, a ``model.named_modules()`` name."""
    if not isinstance(layer, str):
        raise InterventionError(f"a layer is named by its module name (a str), got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer not in modules:
        known = [name for name, _ in find_attention_modules(model)]
        shown = ", ".join(repr(n) for n in known[:6]) + (", ..." if len(known) > 6 else "")
        raise InterventionError(
            f"{type(model).__name__} has no module named {layer!r}; its attention layers are: {shown or 'none found'}")
    inner = [name for name, _ in find_attention_modules(modules[layer]) if name]
    if inner:  # a container: its attention calls could be self- and cross-attention, counted together
        prefix = f"{layer}." if layer else ""
        shown = ", ".join(repr(prefix + n) for n in inner[:4]) + (", ..." if len(inner) > 4 else "")
        raise InterventionError(
            f"{layer!r} holds attention modules ({shown}): name each attention module, not what holds them")
    return layer, modules[layer]


def resolve_layers(model: nn.Module, layers: Optional[Sequence[str]], *, recorder=None) -> Dict[str, LayerPlan]:
    """Plans (recording only) for ``layers``, or every attention module when ``None``."""
    if layers is None:
        found = find_attention_modules(model)
        if not found:
            raise InterventionError(f"found no attention module in {type(model).__name__}: name the layers to record")
    else:
        if isinstance(layers, str):
            layers = [layers]
        found = [resolve_layer(model, layer) for layer in layers]
    return {name: LayerPlan(name, module, recorder) for name, module in found}


def refuse_compiled(model: nn.Module) -> None:
    """Interventions act through hooks, which code ``torch.compile`` built does not run.

    Raises:
        InterventionError: for a ``torch.compile`` wrapper.
    """
    if is_compiled(model):
        raise InterventionError(
            f"{type(model).__name__} is a torch.compile wrapper: its compiled code does not run the hooks an "
            "intervention acts through. Give the uncompiled module (model._orig_mod) and call it")
