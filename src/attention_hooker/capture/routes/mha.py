"""Route 1: ``nn.MultiheadAttention``.

A forward pre-hook binds the call to the module's signature (so a positional
``need_weights`` is seen too) and forces ``need_weights=True,
average_attn_weights=False``; every hooker's own forward hook records the
per-head weights; one last hook hands the caller back exactly what it asked for.

The forcing and the restoring are done once per module, however many hookers
capture it (nested or overlapping hookers): the module's route is shared and
counts its subscribers, and its hooks leave with the last one. Were each hooker
to force and restore on its own, the first to restore would hide the weights
from the others, and the second to force would take the first one's forcing for
the caller's request.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["MultiheadAttentionRoute", "mha_weights", "mha_value_vectors", "handle_mha_forward", "inner_mha_targets",
           "fastpath_containers", "mha_post_hook"]

_ROUTES: "weakref.WeakKeyDictionary[nn.Module, MultiheadAttentionRoute]" = weakref.WeakKeyDictionary()
_ROUTES_LOCK = threading.Lock()


@dataclass
class _Request:
    need_weights: bool
    average_attn_weights: bool


def mha_weights(output: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The per-head weights in an ``nn.MultiheadAttention`` output forced to return them.

    Returns:
        ``(weights, graph_tensor)``: ``weights`` ``(batch, heads, query, key)`` (in
        training with dropout: after dropout; see :func:`drops_weights`), or
        ``None`` when the output holds none; ``graph_tensor``
        the tensor of the autograd graph they are a view of (gradients reach it).
    """
    if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], torch.Tensor)):
        return None, None
    weights = output[1]  # (B, H, L, S), or unbatched (H, L, S)
    if weights.dim() not in (3, 4):
        return None, None  # averaged over heads: the forcing did not reach this call
    batched = weights if weights.dim() == 4 else weights.unsqueeze(0)  # (B, H, L, S)
    graph_tensor = weights._base if weights._base is not None else weights  # (B * H, L, S) used by bmm
    return batched, graph_tensor


def mha_value_vectors(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The value vectors an ``nn.MultiheadAttention`` call multiplied its weights with,
    ``(batch, heads, key, head_dim)``: its ``value`` input through the value part of its input
    projection (bias included), then ``bias_v`` and the zero key where the module adds them
    (as ``F.multi_head_attention_forward`` appends them after the keys); ``None`` when the call
    cannot be read."""
    signature = inspect.signature(type(module).forward)
    try:
        bound = signature.bind(module, *args, **kwargs)
    except TypeError:
        return None
    value = bound.arguments.get("value")
    if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3):
        return None
    width, heads = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        weight = module.in_proj_weight[2 * width:]
    else:
        weight = module.v_proj_weight
    bias = None if module.in_proj_bias is None else module.in_proj_bias[2 * width:]
    with torch.no_grad():
        v = torch.nn.functional.linear(value, weight, bias)  # (S, B, E), (B, S, E) or unbatched (S, E)
        if v.dim() == 2:
            v = v.unsqueeze(0)  # (1, S, E)
        elif not module.batch_first:
            v = v.transpose(0, 1)  # (B, S, E)
        if module.bias_v is not None:
            v = torch.cat([v, module.bias_v.reshape(1, 1, width).expand(v.shape[0], 1, width)], dim=1)
        if module.add_zero_attn:
            v = torch.cat([v, v.new_zeros(v.shape[0], 1, width)], dim=1)
        return v.reshape(v.shape[0], v.shape[1], heads, width // heads).transpose(1, 2)  # (B, H, S, Dh)


def drops_weights(module: nn.Module) -> bool:
    """Whether this ``nn.MultiheadAttention`` call applies dropout to its weights (training
    with ``dropout > 0``): the weights it returns are then after dropout, so the weights
    are taken from the softmax it computes instead, before dropout, as on every route."""
    return module.training and module.dropout > 0.0


class MultiheadAttentionRoute:
    """Forces per-head weights on one ``nn.MultiheadAttention`` and restores the caller's output.

    Get one with :meth:`subscribe`; every subscriber calls :meth:`unsubscribe` once.

    Args:
        module: the attention module; its ``forward`` signature is read once.
    """

    def __init__(self, module: nn.Module):
        self._signature = inspect.signature(module.forward)
        params = self._signature.parameters
        self._can_force = "need_weights" in params and "average_attn_weights" in params
        self._local = threading.local()  # each thread's pending requests
        self._module = weakref.ref(module)
        self._subscribers = 0
        self._handles: List = []

    @classmethod
    def subscribe(cls, module: nn.Module) -> "MultiheadAttentionRoute":
        """The module's shared route, its hooks put on by the first subscriber.

        Its restoring hook is put first among the module's forward hooks; a
        subscriber's own recording hook goes in front of it (``prepend=True``),
        so that every recorder sees the weights and the user's own hooks see
        what the caller asked for.
        """
        with _ROUTES_LOCK:
            route = _ROUTES.get(module)
            if route is None:
                route = _ROUTES[module] = cls(module)
                route._handles = [
                    module.register_forward_pre_hook(route._before, with_kwargs=True),
                    module.register_forward_hook(route._after, prepend=True, with_kwargs=True, always_call=True),
                ]
            route._subscribers += 1
            return route

    def unsubscribe(self) -> None:
        """Leaves the route; the last subscriber takes its hooks off."""
        with _ROUTES_LOCK:
            self._subscribers -= 1
            if self._subscribers > 0:
                return
            handles, self._handles = self._handles, []
            module = self._module()
            if module is not None and _ROUTES.get(module) is self:
                del _ROUTES[module]
        for handle in handles:
            handle.remove()

    def _requests(self) -> List[_Request]:
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = []
        return requests

    def _before(self, module, args: tuple, kwargs: dict) -> Optional[Tuple[tuple, dict]]:
        """Forces per-head weights; returns the new ``(args, kwargs)`` or ``None``."""
        if not self._can_force:
            return None
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError:
            return None  # let the module itself report the bad call
        given = bound.arguments
        self._requests().append(
            _Request(
                need_weights=bool(given.get("need_weights", self._default("need_weights"))),
                average_attn_weights=bool(given.get("average_attn_weights", self._default("average_attn_weights"))),
            )
        )
        given["need_weights"] = True
        given["average_attn_weights"] = False
        return bound.args, bound.kwargs

    def _after(self, module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Hands the caller what it asked for: weights ``None`` where it asked
        ``need_weights=False``, averaged over heads where it asked
        ``average_attn_weights=True``. On a forward that raised (``output`` is
        ``None``) the pending request is dropped."""
        requests = self._requests()
        if not requests:
            return None
        request = requests.pop()
        if output is None or not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], torch.Tensor)):
            return None
        attn_output, weights = output  # weights (B, H, L, S) or unbatched (H, L, S)
        if not request.need_weights:
            returned = None
        elif request.average_attn_weights:
            returned = weights.mean(dim=-3)  # what the module computes when asked to average
        else:
            returned = weights
        return attn_output, returned

    def _default(self, name: str) -> Any:
        return self._signature.parameters[name].default


_MHA_FORWARD_SIGNATURE = inspect.signature(torch.nn.functional.multi_head_attention_forward)


def handle_mha_forward(session, func, args: tuple, kwargs: dict):
    """``F.multi_head_attention_forward`` of a hooked ``nn.MultiheadAttention`` that
    applies dropout to its weights (training): the weights it returns are after
    dropout, and the softmax before it runs where no function mode sees it. The
    call runs as it is (the same output, the same random numbers drawn); its
    weights before dropout, as every other route records them, come from the same
    call again without dropout, which draws no random numbers.

    With ``keep_grad``, the gradient kept is the one with respect to these weights
    before dropout: the gradient reaching the module's dropped-out weights times
    ``mask / (1 - p)`` (= dropped-out / before).
    """
    scope = session.current_scope()
    module = None if scope is None else scope.module
    if not session.closed and scope is not None and scope.layer is not None and not isinstance(module, nn.MultiheadAttention):
        return _functional_call(session, scope.layer, func, args, kwargs)
    output = func(*args, **kwargs)
    if (session.closed or scope is None or scope.layer is None or not isinstance(module, torch.nn.MultiheadAttention)
            or not drops_weights(module)):
        return output
    dropped = mha_weights(output)[1]  # (B * H, L, S) that multiplied the values, or None
    if dropped is None:
        return output
    bound = _MHA_FORWARD_SIGNATURE.bind(*args, **kwargs)
    bound.arguments.update(dropout_p=0.0, training=False, need_weights=True, average_attn_weights=False)
    with torch.no_grad():
        _, weights = func(*bound.args, **bound.kwargs)  # (B, H, L, S), or unbatched (H, L, S)
    if weights.dim() == 3:
        weights = weights.unsqueeze(0)
    scale = None
    if session.router.policy.keep_grad and dropped.requires_grad:
        before = weights.reshape(dropped.shape)
        scale = torch.where(before > 0, dropped.detach() / before, torch.zeros_like(before))
    session.record_module_output(scope.layer, weights, dropped, gradient_scale=scale)
    return output


def _functional_call(session, layer: str, func, args: tuple, kwargs: dict):
    """``F.multi_head_attention_forward`` called by a hooked module that is not an ``nn.MultiheadAttention``
    (WavLM's attention calls it itself, asking for weights averaged over heads): no module hook can force
    per-head weights there, so the call is forced here. Where the caller asked for weights and no dropout
    applies, the call runs asking for them per head (the same path computes the output) and the caller gets
    them averaged as asked (the mean torch itself takes); otherwise the call runs exactly as asked, and its
    per-head weights come from the same call again without dropout and without weights' grad.

    Records ``(batch, heads, query, key)`` under ``layer``; returns what the caller asked for.
    """
    try:
        bound = _MHA_FORWARD_SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return func(*args, **kwargs)  # let torch report the bad call
    given = bound.arguments
    default = lambda name: _MHA_FORWARD_SIGNATURE.parameters[name].default  # noqa: E731
    asked_weights = bool(given.get("need_weights", default("need_weights")))
    asked_average = bool(given.get("average_attn_weights", default("average_attn_weights")))
    dropout = bool(given.get("training", default("training"))) and given["dropout_p"] > 0.0
    causal = bool(given.get("is_causal", default("is_causal")))
    values = lambda: _functional_value_vectors(given)  # noqa: E731
    if asked_weights and not dropout:
        given.update(need_weights=True, average_attn_weights=False)
        attn_output, weights = func(*bound.args, **bound.kwargs)  # weights (B, H, L, S), or unbatched (H, L, S)
        # the graph tensor is the per-head weights torch multiplied the values with (a view's base, where the
        # unbatched call returned a view of it), so that keep_grad reaches them
        session.record_module_output(layer, weights if weights.dim() == 4 else weights.unsqueeze(0),
                                     weights._base if weights._base is not None else weights, value=values)
        return attn_output, weights.mean(dim=-3) if asked_average else weights
    if causal and not asked_weights:
        session.refuse_layer(layer, "F.multi_head_attention_forward was called with is_causal=True and "
                                    "need_weights=False: torch then attends causally whatever attn_mask says, "
                                    "and no call with weights computes that map, so it is not stored")
        return func(*args, **kwargs)
    if session.router.policy.keep_grad:
        session.refuse_layer(layer, "keep_grad on a module calling F.multi_head_attention_forward without "
                                    "asking for weights (or with dropout): its weights come from a second call "
                                    "without dropout, which the output does not depend on, so no gradient "
                                    "reaches them; capture it without keep_grad, or in eval")
        return func(*args, **kwargs)
    output = func(*args, **kwargs)
    given.update(dropout_p=0.0, training=False, need_weights=True, average_attn_weights=False)
    with torch.no_grad():
        _, weights = func(*bound.args, **bound.kwargs)  # (B, H, L, S), or unbatched (H, L, S)
    session.record_module_output(layer, weights if weights.dim() == 4 else weights.unsqueeze(0), value=values)
    return output


def _functional_value_vectors(given: dict) -> Optional[torch.Tensor]:
    """``(batch, heads, key, head_dim)``: the value vectors of an ``F.multi_head_attention_forward`` call
    from its bound arguments (``value`` (S, B, E) or unbatched (S, E) through the value part of the input
    projection, then ``bias_v`` and the zero key where given); ``None`` when they cannot be read."""
    value, heads = given.get("value"), int(given["num_heads"])
    if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3):
        return None
    width = value.shape[-1]
    if given.get("use_separate_proj_weight"):
        weight = given.get("v_proj_weight")
    else:
        weight = given["in_proj_weight"][2 * width:]
    bias = given.get("in_proj_bias")
    bias = None if bias is None else bias[2 * width:]
    bias_v = given.get("bias_v")
    with torch.no_grad():
        v = torch.nn.functional.linear(value, weight, bias)  # (S, B, E) or (S, E)
        v = v.unsqueeze(0) if v.dim() == 2 else v.transpose(0, 1)  # (B, S, E)
        if bias_v is not None:
            v = torch.cat([v, bias_v.reshape(1, 1, width).expand(v.shape[0], 1, width)], dim=1)
        if given.get("add_zero_attn"):
            v = torch.cat([v, v.new_zeros(v.shape[0], 1, width)], dim=1)
        return v.reshape(v.shape[0], v.shape[1], heads, width // heads).transpose(1, 2)  # (B, H, S, Dh)


# Modules whose forward may take torch's fused fast path and skip the hooked MHA inside.
FASTPATH_CONTAINERS = (nn.TransformerEncoder, nn.TransformerEncoderLayer)


def inner_mha_targets(model: nn.Module, selected: List[Tuple[str, nn.Module]]) -> List[Tuple[nn.Module, str]]:
    """``(module, name of its owner)`` for every ``nn.MultiheadAttention`` inside a selected module
    that is not selected itself: recorded under its innermost selected ancestor's name (its weights
    are out of reach of the function mode: MHA must be asked)."""
    selected_ids = {id(m) for _, m in selected}
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention) or id(module) in selected_ids:
            continue
        owners = [sel for sel, _ in selected if sel == "" or name.startswith(sel + ".")]
        if owners:
            found.append((module, max(owners, key=len)))
    return found


def fastpath_containers(model: nn.Module, hooked: List[nn.Module]) -> List[nn.Module]:
    """Encoder (layer) modules that hold or are a hooked module: their fast path must stay off."""
    hooked_ids = {id(m) for m in hooked}
    return [m for _, m in model.named_modules()
            if isinstance(m, FASTPATH_CONTAINERS) and id(m) not in hooked_ids and any(id(s) in hooked_ids for s in m.modules())]


def mha_post_hook(session, name: str):
    """The forward hook of a hooked ``nn.MultiheadAttention``: records the per-head weights it was
    asked for (before the shared route hands the caller back what it asked for), then closes the scope."""

    def post_hook(module, args, kwargs, output):
        try:
            if output is not None and session.current_layer() is not None and not drops_weights(module):
                weights, graph_tensor = mha_weights(output)
                if weights is not None:
                    session.record_module_output(name, weights, graph_tensor,
                                                 value=lambda: mha_value_vectors(module, args, kwargs))
        finally:
            session.exit(module)
        return None

    return post_hook
