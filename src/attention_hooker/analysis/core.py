"""What the analyses share: checking attention, masks of real rows, stacks of layers, steps stitched.

Shapes: attention is ``(batch, heads, query, key)``; a rollout is
``(batch, tokens, tokens)``; head statistics are ``(batch, heads)``.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

import torch

from .._checks import check_probabilities
from .._map_kinds import carried_kind, mark_kind
from .._tensor import as_batched, on_one_device, require_4d
from ..errors import AttentionHookerError

__all__ = ["stitch_steps", "layer_sequence"]

FUSIONS = ("mean", "max", "min")


def layer_sequence(
    attentions, *, call: int = 0, where: str = "attentions", allow_missing: bool = False
) -> List[Optional[torch.Tensor]]:
    """Per-layer tensors in model order from a list, a ``values`` mapping, or a hooker.

    Args:
        attentions: a sequence of ``(batch, heads, query, key)`` tensors, a mapping
            ``{layer_name: [tensor per call]}`` (``hooker.values``), or an object with
            a ``values`` attribute holding one.
        call: which call of each layer to take from a mapping.
        allow_missing: keep ``None`` entries (gradients backward has not reached).

    Raises:
        AttentionHookerError: when empty, not 4-D, or a layer lacks that call.
    """
    if hasattr(attentions, "values") and isinstance(getattr(attentions, "values"), Mapping):
        attentions = attentions.values
    if isinstance(attentions, Mapping):
        layers = []
        for name, calls in attentions.items():
            if isinstance(calls, torch.Tensor):
                layers.append(calls)
                continue
            if not -len(calls) <= call < len(calls):
                raise AttentionHookerError(f"layer {name!r} has {len(calls)} calls; call={call} is out of range")
            layers.append(calls[call])
        attentions = layers
    attentions = [None if a is None and allow_missing else to_tensor(a, f"{where}[{i}]") for i, a in enumerate(attentions)]
    if not attentions:
        raise AttentionHookerError(f"{where} is empty: expected at least one (batch, heads, query, key) tensor")
    for i, a in enumerate(attentions):
        if a is not None:
            require_4d(a, f"{where}[{i}]")
    return on_one_device(attentions)  # layers that combine meet on one device


def to_tensor(a, where: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    try:
        return torch.as_tensor(a)
    except (TypeError, ValueError, RuntimeError):
        raise AttentionHookerError(
            f"{where} is a {type(a).__name__}; expected a (batch, heads, query, key) tensor or array of numbers"
        ) from None


def fuse_heads(a: torch.Tensor, how: str) -> torch.Tensor:
    """``(B, H, T, T)`` -> ``(B, T, T)``."""
    if how == "mean":
        return a.mean(dim=1)
    if how == "max":
        return a.amax(dim=1)
    return a.amin(dim=1)  # "min": callers check head_fusion against FUSIONS first


def _entry_names(attentions) -> Optional[List[str]]:
    """The layer names of a ``values`` mapping (or a hooker), in order; ``None`` for a plain sequence."""
    if hasattr(attentions, "values") and isinstance(getattr(attentions, "values"), Mapping):
        attentions = attentions.values
    return [str(name) for name in attentions] if isinstance(attentions, Mapping) else None


def not_square_reason(shape: tuple, name: Optional[str]) -> str:
    """Why a map whose key axis is not its query axis cannot be composed by rollout: what its keys
    are, when the entry's name (``None``: unknown) or its shape tells.

    Example:
        >>> "ProphetNet's n-gram stream 1" in not_square_reason((1, 2, 3, 5), "decoder.layers.0.self_attn:ngram1")
        True
    """
    if name is not None and ":ngram" in name:
        return (f"entry {name!r} is ProphetNet's n-gram stream {name.rsplit(':ngram', 1)[1]}, kept beside its layer: "
                "its queries are the stream's positions (not the decoder's tokens) and its keys its layer's (of the "
                "n-gram self-attention: the main keys then the stream's own positions; of the decoder's attention "
                "over the encoder: the encoder's tokens), so it composes with no token map; leave the ':ngram' "
                "entries out (the self-attention's own entry, the main stream, is square)")
    if name is not None and "TransientGlobal" in name:
        return (f"layer {name!r} is LongT5 transient-global self-attention: its keys are the {shape[-2]} tokens, "
                f"then {shape[-1] - shape[-2]} global aggregates (keys {shape[-2]} on), which are not tokens and "
                "whose weight cannot be given to tokens, so no token-to-token map exists to compose; leave its "
                "layers out (a LongT5 local-attention model's maps are square)")
    if shape[-1] > shape[-2]:
        return ("its keys outnumber its queries: a cross-attention layer, or a self-attention map whose extra keys "
                "are not tokens (LongT5 transient-global's global aggregates, keys after the tokens; ProphetNet's "
                "n-gram stream entries ':ngram<s>'), which compose with no token map; leave such layers out")
    return "its queries and keys differ: a cross-attention layer; leave cross-attention layers out"


def square_stack(attentions, where: str) -> List[torch.Tensor]:
    layers = layer_sequence(attentions, where=where)
    names = _entry_names(attentions)
    shape = layers[0].shape
    for i, a in enumerate(layers):
        if a.shape[-1] != a.shape[-2]:
            raise AttentionHookerError(
                f"{where}[{i}] is {tuple(a.shape)}: rollout needs square self-attention (query == key) over the "
                f"same tokens; {not_square_reason(tuple(a.shape), names[i] if names else None)}"
            )
        if a.shape[0] != shape[0] or a.shape[-1] != shape[-1]:
            raise AttentionHookerError(
                f"{where}[{i}] is {tuple(a.shape)} but {where}[0] is {tuple(shape)}: every layer must share "
                "batch and token count (a model whose stages merge tokens, such as Swin: stage_rollout; a capture "
                'with windows="keep": pass window_index=hooker.window_index, or the hooker itself)'
            )
    for i, a in enumerate(layers):
        check_probabilities(a, f"{where}[{i}]")
    return layers


def query_mask_of(attn: torch.Tensor, padding_mask) -> Optional[torch.Tensor]:
    """``(B, Q)`` bool of real query positions, from an HF-style ``(B, T)`` mask (1 = real)."""
    if padding_mask is None:
        return None
    raw = to_tensor(padding_mask, "padding_mask").to(attn.device)
    if raw.dtype != torch.bool and not ((raw == 0) | (raw == 1)).all():
        raise AttentionHookerError("padding_mask must hold 0/1 or True/False (1 for real tokens, 0 for padding)")
    mask = raw.bool()
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != (attn.shape[0], attn.shape[2]):
        raise AttentionHookerError(
            f"padding_mask is {tuple(mask.shape)}, expected (batch, query) = {(attn.shape[0], attn.shape[2])}"
        )
    return mask


def mean_over_queries(per_query: torch.Tensor, query_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, H, Q)`` -> ``(B, H)``, over real queries only."""
    if query_mask is None:
        return per_query.mean(dim=-1)
    m = query_mask[:, None, :].to(per_query.dtype)  # (B, 1, Q)
    return (per_query * m).sum(-1) / m.sum(-1).clamp(min=1)


def row_mask(padding_mask) -> Optional[torch.Tensor]:
    """An HF-style padding mask as ``(batch, tokens)`` bool (True for real tokens), or ``None``."""
    if padding_mask is None:
        return None
    mask = to_tensor(padding_mask, "padding_mask").bool()
    return mask.unsqueeze(0) if mask.dim() == 1 else mask


def real_rows(mask: Optional[torch.Tensor], rows: torch.Tensor, n_query: int, batch: int, device) -> torch.Tensor:
    """``(batch, r)`` float64, 1 for the real ones among query rows ``rows`` of a call with
    ``n_query`` rows: ``mask`` applies where it has one entry per query row, else all count."""
    if mask is None or mask.shape[-1] != n_query:
        return torch.ones(batch, len(rows), dtype=torch.float64, device=device)
    return mask.to(device)[:, rows.to(device)].double()


def check_attention(attn, where: str) -> torch.Tensor:
    """``(batch, heads, query, key)`` probabilities as float64, or the library's error."""
    a = as_batched(to_tensor(attn, where), where)
    check_probabilities(a, where)
    return a.double()


def stitch_steps(calls: Sequence[torch.Tensor]) -> torch.Tensor:
    """One causal matrix from the per-step captures of a KV-cache generation loop.

    Call ``i`` is ``(batch, heads, q_i, k_i)``: the first is the prompt
    (``q_0 == k_0``), each later one adds ``q_i`` new queries over a context
    grown by ``q_i`` (``k_i == k_{i-1} + q_i``; ``q_i = 1`` for one token a step).

    Args:
        calls: one layer's calls in order (``hooker.values[layer]``).

    Returns:
        ``(batch, heads, T, T)`` with ``T = k_last``: the prompt block, then one
        row per generated position; zeros above the diagonal. Calls of a marked kind
        (``"not probabilities"``: DiffLlama's differential map; ``"channels"``) give a
        result marked the same, which the analyses refuse as they refuse the calls.

    Raises:
        AttentionHookerError: when the calls are not such a sequence, or mix kinds of map.

    Example:
        >>> steps = [torch.ones(1, 1, 2, 2) / 2, torch.ones(1, 1, 1, 3) / 3]
        >>> stitch_steps(steps).shape
        torch.Size([1, 1, 3, 3])
    """
    calls = layer_sequence(list(calls), where="calls")
    kind = carried_kind(calls, "the calls")
    first = calls[0]
    batch, heads, q0, k0 = first.shape
    if q0 != k0:
        raise AttentionHookerError(
            f"calls[0] is {tuple(first.shape)}: a generation sequence starts with the prompt, square (query == key)"
            + (f"; its first {k0 - q0} positions were computed elsewhere (under continuous batching: read from "
               "the prefix cache another request filled, which ContinuousBatchingConfig(allow_block_sharing=False) "
               "turns off, or by the parent of a forked sequence)" if q0 < k0 else "")
        )
    total = k0
    for i, c in enumerate(calls[1:], start=1):
        b, h, q, k = c.shape
        if (b, h) != (batch, heads):
            raise AttentionHookerError(f"calls[{i}] is {tuple(c.shape)}, but calls[0] has batch {batch} and {heads} heads")
        if k != total + q:
            raise AttentionHookerError(
                f"calls[{i}] is {tuple(c.shape)}: after {total} positions a step of {q} new queries must see "
                f"{total + q} keys, not {k}; these calls are not consecutive KV-cache generation steps"
            )
        total = k
    out = first.new_zeros(batch, heads, total, total)  # (B, H, T, T)
    out[..., :q0, :k0] = first
    for c in calls[1:]:
        q, k = c.shape[-2:]
        out[..., k - q : k, :k] = c
    mark_kind(out, kind)
    return out
