"""Each route's attention call, acted on: where the heads' outputs ``(batch, heads, query,
head_dim)`` are, and how a head's weights and values are read, on each way attention is computed.

- ``F.scaled_dot_product_attention`` (Hugging Face ``sdpa``, timm's fused attention, custom code):
  the real kernel computes every head; the acts change its output per head (a replaced map
  computes only its own heads, as its weights times their values).
- Eager attention (a softmax over ``(batch, heads, query, key)`` or ``(batch * heads, query,
  key)``): the softmax is followed through layout operations and dropout to its product with
  the values (``matmul``, ``@``, ``bmm``); the acts change that product's output per head.
- ``nn.MultiheadAttention``: its heads are computed inside one function no hook can enter, so
  the call is computed by that function's own per-head path (``need_weights=True,
  average_attn_weights=False``: its weights, times its values recomputed as it computes them,
  through its output projection), with the acts on the heads between; in training with
  dropout it is refused (the dropout mask is out of reach).

The acts' own arithmetic runs where no function mode sees it (a hooker's capture never takes
it for the model's attention); the kernel call itself is seen by a hooker as before.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from .._torch_private import no_function_modes
from ..capture.heads import declared_heads
from ..capture.routes.sdpa import parse_sdpa_call, sdpa_attention_weights
from ..capture.routes.softmax import SOFTMAX_FUNCTIONS, is_attention_softmax, label_softmax
from ..errors import InterventionError
from .acts import Call

__all__ = ["on_sdpa", "on_softmax", "on_use", "on_mha_forward", "Pending"]


# ---------------------------------------------------------------------------- sdpa
def on_sdpa(scope, func, args: tuple, kwargs: dict):
    """The kernel's output ``(batch, heads, query, head_dim)`` with the plan's acts on its heads."""
    plan = scope.plan
    output = func(*args, **kwargs)
    call = parse_sdpa_call(args, kwargs)
    query, key, value = call["query"], call["key"], call["value"]
    with no_function_modes():
        if query.dim() != 4 or output.dim() != 4 or value.dim() != 4:
            raise InterventionError(
                f"layer {plan.name!r}: a scaled_dot_product_attention call on a {query.dim()}-D query "
                f"{tuple(query.shape)}: only (batch, heads, query, head_dim) calls are acted on")
        heads = query.shape[1]
        declared = declared_heads(scope.module)
        if declared is not None and heads != declared:
            raise InterventionError(
                f"layer {plan.name!r}: a scaled_dot_product_attention call with {heads} query heads, while the layer "
                f"declares {declared} (packed grouped-query decoding, or another layout): its heads cannot be told apart")
        groups = max(1, heads // value.shape[1])

        def weights(selected) -> torch.Tensor:
            return sdpa_attention_weights(query, key, call["attn_mask"], bool(call["is_causal"]), call["scale"],
                                          heads=list(selected), where=f"layer {plan.name!r}")  # (B, h, Q, K)

        def head_value(head: int) -> torch.Tensor:
            return value[:, head // groups].expand(output.shape[0], -1, -1)  # (B, K, Dv)

        result = plan.apply(Call(plan.name, plan.calls, output, weights, head_value))
    scope.acted += 1
    return result


# --------------------------------------------------------------------------- eager
class Pending:
    """An eager softmax on its way to the values: ``weights`` its ``(batch, heads, query, key)``
    labelling, ``aliases`` what layout operations made of it."""

    __slots__ = ("scope", "weights", "aliases")

    def __init__(self, scope, weights: torch.Tensor, result: torch.Tensor):
        self.scope, self.weights, self.aliases = scope, weights, [result]

    def holds(self, tensor) -> bool:
        return any(tensor is alias for alias in self.aliases)


_FOLLOWED = frozenset({
    torch.Tensor.permute, torch.Tensor.transpose, torch.transpose, torch.permute, torch.Tensor.view,
    torch.Tensor.reshape, torch.reshape, torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float,
    torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type_as, F.dropout, torch.dropout,
})
_PRODUCTS = frozenset({torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.bmm, torch.Tensor.bmm})


def on_softmax(state, scope, func, args: tuple, kwargs: dict, result) -> None:
    """A softmax in a planned layer: eager attention's weights, to be followed to the values."""
    if func not in SOFTMAX_FUNCTIONS or not is_attention_softmax(result, args, kwargs):
        return
    weights, reason = label_softmax(result, declared_heads(scope.module))
    if weights is None:
        if reason is not None:
            raise InterventionError(f"layer {scope.plan.name!r}: {_acted_reason(reason)}")
        return
    state.pending = Pending(scope, weights, result)


def _acted_reason(reason: str) -> str:
    """The capture's reason for not storing a softmax, said of acting on its heads.

    Example:
        >>> _acted_reason("a softmax over a 5-D tensor: not (batch, heads, query, key), so it is not stored")
        'a softmax over a 5-D tensor: not (batch, heads, query, key), so its heads cannot be acted on'
    """
    for stored in (", so it is not stored", ", so they are not stored"):
        if reason.endswith(stored):
            return reason[:-len(stored)] + ", so its heads cannot be acted on"
    return f"{reason}; its heads cannot be acted on"


def on_use(state, scope, func, args: tuple, kwargs: dict) -> Optional[tuple]:
    """``(result,)`` of a call that uses the pending softmax: followed, or its product with the
    values acted on; ``None`` for a call that does not use it."""
    pending = state.pending
    if pending.scope is not scope or not args or not pending.holds(args[0]):
        return None
    result = func(*args, **kwargs)
    if func in _PRODUCTS and len(args) > 1:
        state.pending = None
        return (_act_on_product(scope, pending.weights, args[1], result),)
    if isinstance(result, torch.Tensor) and (func in _FOLLOWED or result is args[0]):
        pending.aliases.append(result)
    return (result,)


def _act_on_product(scope, weights: torch.Tensor, value, output: torch.Tensor) -> torch.Tensor:
    plan = scope.plan
    batch, heads, queries, keys = weights.shape
    with no_function_modes():
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2] == keys \
                and value.shape[1] in (heads, 1) and output.dim() == 4:
            values, outputs = value, output  # (B, H, K, Dv), (B, H, Q, Dv)
        elif isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[0] == batch * heads \
                and value.shape[1] == keys and output.dim() == 3:
            values = value.reshape(batch, heads, keys, value.shape[2])  # (B, H, K, Dv)
            outputs = output.reshape(batch, heads, queries, output.shape[2])  # (B, H, Q, Dv)
        else:
            raise InterventionError(
                f"layer {plan.name!r}: its attention weights {tuple(weights.shape)} multiply a tensor of shape "
                f"{tuple(getattr(value, 'shape', ()))}, not its values (batch, heads, key, head_dim): the heads' "
                "outputs cannot be told apart")

        def head_value(head: int) -> torch.Tensor:
            return values[:, head if values.shape[1] > 1 else 0].expand(outputs.shape[0], -1, -1)  # (B, K, Dv)

        def own(selected) -> torch.Tensor:
            return weights[:, list(selected)]  # (B, h, Q, K)

        result = plan.apply(Call(plan.name, plan.calls, outputs, own, head_value))
        if result is not outputs:
            result = result.reshape(output.shape)
    scope.acted += 1
    return output if result is outputs else result


# ---------------------------------------------------------------------------- MHA
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def on_mha_forward(scope, func, args: tuple, kwargs: dict):
    """``F.multi_head_attention_forward`` of a planned layer, computed by its per-head path with the acts."""
    plan = scope.plan
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    given = dict(bound.arguments)
    if given["training"] and given["dropout_p"] > 0:
        raise InterventionError(
            f"layer {plan.name!r}: nn.MultiheadAttention in training with dropout {given['dropout_p']}: the dropout "
            "mask its heads used is out of reach, so they cannot be acted on exactly; call model.eval()")
    forced = dict(given, need_weights=True, average_attn_weights=False)
    plain = None
    if not plan.acts:  # only recording: the model computes exactly what it computes without us
        plain = func(*args, **kwargs)
    output, weights = func(**forced)  # (L, B, E) or (L, E); (B, H, L, S) or (H, L, S)
    with no_function_modes():
        batched = given["query"].dim() == 3
        weights4 = weights if batched else weights.unsqueeze(0)  # (B, H, L, S)
        batch, heads, length, source = weights4.shape
        values = _mha_values(given, batch, heads, batched)  # (B*H, S, Dh)
        merged = torch.bmm(weights4.reshape(batch * heads, length, source), values)  # (B*H, L, Dh), as the function does
        outputs = merged.view(batch, heads, length, values.shape[-1])  # (B, H, L, Dh)

        def head_value(head: int) -> torch.Tensor:
            return values.view(batch, heads, source, -1)[:, head]  # (B, S, Dh)

        result = plan.apply(Call(plan.name, plan.calls, outputs, lambda selected: weights4[:, list(selected)],
                                 head_value))
        scope.acted += 1
        if plain is not None:
            return plain
        embed = given["out_proj_weight"].shape[0]
        new = result.reshape(batch * heads, length, -1).transpose(0, 1).reshape(length * batch, embed)
        new = F.linear(new, given["out_proj_weight"], given["out_proj_bias"]).view(length, batch, embed)
        if not batched:
            new = new.squeeze(1)
    if not given["need_weights"]:
        return new, None
    if given["average_attn_weights"]:
        return new, weights.mean(dim=-3)
    return new, weights


def _mha_values(given: dict, batch: int, heads: int, batched: bool) -> torch.Tensor:
    """The values ``(batch * heads, key, head_dim)`` ``F.multi_head_attention_forward`` multiplies
    its weights with, computed by the same operations (so the same numbers)."""
    query, key, value = given["query"], given["key"], given["value"]
    if not batched:  # the function unsqueezes each: three new tensors, no longer one
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    embed = query.shape[-1]
    bias = given["in_proj_bias"]
    if given["static_v"] is not None:
        values = given["static_v"]
    else:
        if not given["use_separate_proj_weight"]:
            weight = given["in_proj_weight"]
            if key is value and query is key:  # self-attention: one projection, then split
                proj = F.linear(query, weight, bias)
                values = proj.unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()[2]
            elif key is value:
                _, w_kv = weight.split([embed, embed * 2])
                b_kv = None if bias is None else bias.split([embed, embed * 2])[1]
                proj = F.linear(key, w_kv, b_kv)
                values = proj.unflatten(-1, (2, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()[1]
            else:
                values = F.linear(value, weight.chunk(3)[2], None if bias is None else bias.chunk(3)[2])
        else:
            values = F.linear(value, given["v_proj_weight"], None if bias is None else bias.chunk(3)[2])
        if given["bias_v"] is not None:
            values = torch.cat([values, given["bias_v"].repeat(1, batch, 1)])
        values = values.view(values.shape[0], batch * heads, embed // heads).transpose(0, 1)  # (B*H, S, Dh)
    if given["add_zero_attn"]:
        values = torch.cat([values, values.new_zeros(batch * heads, 1, values.shape[-1])], dim=1)
    return values
