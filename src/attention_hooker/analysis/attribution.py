"""How much each head matters, beyond its raw weights: head importance from gradients
(Michel et al. 2019) and value-weighted attention norms (Kobayashi et al. 2020).

Pure functions of captured tensors; shapes are ``(batch, heads, query, key)`` for weights and
their gradients. Read them as measurements with known limits, not as explanations: importance is
a first-order (Taylor) estimate of what masking a head would change, and a norm says how large a
key's contribution is, not whether the model relies on it.
"""

from __future__ import annotations

import torch

from .._tensor import as_batched
from .core import to_tensor, check_attention
from ..errors import AttentionHookerError

__all__ = ["head_importance", "value_weighted_norms", "find_output_projection"]


def head_importance(attn, grad) -> torch.Tensor:
    """Michel et al. (2019)'s head importance of one input: ``|d loss / d xi_h|`` for a gate
    ``xi_h`` (equal to 1) that multiplies head ``h``'s output.

    Head ``h``'s output is ``xi_h * A_h V_h``, so ``d loss / d xi_h = sum_ij A_h[i, j] *
    (d loss / d A_h)[i, j]``: the weights and their gradients (``keep_grad=True``) give it, with
    the model's own kernel, and without a gate in the model. Michel et al. average it over a
    dataset (``.mean(0)`` of stacked inputs) and may normalise each layer's heads by their
    L2 norm.

    Args:
        attn: ``(batch, heads, query, key)`` weights of one call.
        grad: ``(batch, heads, query, key)``, d(loss)/d(weights) of the same call
            (``hooker.gradients``).

    Returns:
        ``(batch, heads)`` float64, one importance per input and head.

    Raises:
        AttentionHookerError: when the shapes differ or the weights are not probabilities.

    Example:
        >>> a = torch.tensor([[[[0.5, 0.5]], [[1.0, 0.0]]]])  # (1, 2, 1, 2)
        >>> head_importance(a, torch.tensor([[[[2.0, -4.0]], [[3.0, 7.0]]]]))
        tensor([[1., 3.]], dtype=torch.float64)
    """
    a = check_attention(attn, "head_importance")
    g = as_batched(to_tensor(grad, "grad"), "grad").to(device=a.device, dtype=torch.float64)
    if g.shape != a.shape:
        raise AttentionHookerError(f"grad is {tuple(g.shape)}, expected the weights' shape {tuple(a.shape)}")
    return (a * g).sum(dim=(-2, -1)).abs()


def value_weighted_norms(attn, value, out_weight, *, summed: bool = False) -> torch.Tensor:
    """Kobayashi et al. (2020)'s norms: how large each key's contribution to each query is.

    Head ``h`` adds ``alpha_ij f_h(x_j)`` to query ``i``'s output, with ``f_h(x_j) = v_j^h
    W_O^h``: key ``j``'s value vector (bias included) through head ``h``'s slice of the output
    projection. A large weight on a key whose transformed vector is small contributes little.

    Args:
        attn: ``(batch, heads, query, key)`` weights.
        value: ``(batch, kv_heads, key, head_dim)``, the value vectors as the attention kernel
            takes them (``kv_heads`` divides ``heads``: grouped-query attention gives each kv
            head to ``heads / kv_heads`` consecutive query heads).
        out_weight: ``(model_dim, heads * head_dim)``, the output projection's weight as
            ``nn.Linear`` stores it; head ``h`` reads input features ``h * head_dim`` to
            ``(h + 1) * head_dim`` (heads concatenated in order, as Hugging Face, timm and
            ``nn.MultiheadAttention`` lay them out). GPT-2's ``Conv1D`` stores the transpose:
            pass ``c_proj.weight.T``. The output bias is left out: it is added once, to every
            query, and belongs to no key.
        summed: ``False``: each head's ``||alpha_ij f_h(x_j)||``, ``(batch, heads, query, key)``.
            ``True``: the layer's ``||sum_h alpha_ij^h f_h(x_j)||``, ``(batch, query, key)``,
            the norm the paper reports per layer.

    Returns:
        float64 norms, on ``attn``'s device.

    Raises:
        AttentionHookerError: on shapes that do not fit together.

    Example:
        >>> a = torch.tensor([[[[0.25, 0.75]]]])  # (1, 1, 1, 2)
        >>> v = torch.tensor([[[[3.0, 4.0], [0.0, 1.0]]]])  # (1, 1, 2, 2): norms 5 and 1
        >>> value_weighted_norms(a, v, torch.eye(2))
        tensor([[[[1.2500, 0.7500]]]], dtype=torch.float64)
    """
    a = check_attention(attn, "value_weighted_norms")
    v = as_batched(to_tensor(value, "value"), "value").to(device=a.device, dtype=torch.float64)
    w = to_tensor(out_weight, "out_weight").detach().to(device=a.device, dtype=torch.float64)
    batch, heads, _, keys = a.shape
    if v.shape[0] != batch or v.shape[2] != keys or heads % max(v.shape[1], 1):
        raise AttentionHookerError(
            f"value is {tuple(v.shape)}, expected (batch, kv_heads, key, head_dim) with batch {batch}, "
            f"key {keys} and kv_heads dividing the {heads} heads"
        )
    head_dim = v.shape[-1]
    if w.dim() != 2 or w.shape[1] != heads * head_dim:
        raise AttentionHookerError(
            f"out_weight is {tuple(w.shape)}, expected (model_dim, heads * head_dim) = (model_dim, {heads * head_dim}) "
            "as nn.Linear stores it (GPT-2's Conv1D: pass its weight transposed)"
        )
    v = v.repeat_interleave(heads // v.shape[1], dim=1)  # (B, H, K, Dh)
    w_heads = w.view(w.shape[0], heads, head_dim).permute(1, 2, 0)  # (H, Dh, D): W_O^h
    transformed = torch.einsum("bhkd,hde->bhke", v, w_heads)  # (B, H, K, D): f_h(x_k)
    if not summed:
        return a * transformed.norm(dim=-1)[:, :, None, :]  # alpha >= 0: ||alpha f|| = alpha ||f||
    # ||sum_h a_h f_h||^2 = sum_{h,g} a_h a_g <f_h, f_g>, with the Gram matrix of each key's vectors.
    gram = torch.einsum("bhke,bgke->bkhg", transformed, transformed)  # (B, K, H, H)
    mixed = torch.einsum("bgqk,bkhg->bhqk", a, gram)  # sum_g a_g <f_h, f_g>, (B, H, Q, K)
    squared = (a * mixed).sum(dim=1)  # (B, Q, K)
    return squared.clamp(min=0).sqrt()


_OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "proj", "out_lin", "o", "wo", "out")


def find_output_projection(model: torch.nn.Module, layer: str, width: int) -> torch.Tensor:
    """The output projection weight ``(model_dim, width)`` of an attention layer, as
    :func:`value_weighted_norms` takes it: the layer's own (``o_proj``, ``out_proj``, ``c_proj``,
    ``proj``...) or, where the model keeps it beside the layer (BERT and ViT: ``attention.output.dense``
    next to ``attention.self``), the one next to it.

    Args:
        model: the model.
        layer: the attention module's name in ``model.named_modules()``.
        width: ``heads * head_dim``, the projection's input features.

    Raises:
        AttentionHookerError: when no such projection, or more than one, is found; pass the
            weight to :func:`value_weighted_norms` yourself then.
    """
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise AttentionHookerError(f"{type(model).__name__} has no module {layer!r}") from None
    found = _projections(module, width, skip=None)
    parent_name = layer.rpartition(".")[0]
    if not found and parent_name:
        found = _projections(model.get_submodule(parent_name), width, skip=module)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(n for n, _ in found)})"
        raise AttentionHookerError(
            f"found {what} output projection taking {width} features in or beside {layer!r}; pass its weight "
            "(model_dim, heads * head_dim) to value_weighted_norms yourself")
    return found[0][1]


def _projections(root: torch.nn.Module, width: int, skip) -> list:
    """``[(name, weight (out, width))]``: linear maps named like an output projection under ``root``
    (not inside ``skip``) that take ``width`` features."""
    inside = set() if skip is None else {id(m) for m in skip.modules()}
    found = []
    for name, child in root.named_modules():
        if id(child) in inside or name.rpartition(".")[2] not in _OUTPUT_NAMES:
            continue
        weight = getattr(child, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if isinstance(child, torch.nn.Linear) and weight.shape[1] == width:
            found.append((name, weight))
        elif type(child).__name__ == "Conv1D" and weight.shape[0] == width:  # GPT-2's: (in, out)
            found.append((name, weight.T))
    return found
