"""DiffLlama's differential attention: the map that multiplies the values, assembled (a :mod:`.pieces` family).

``DiffLlamaAttention`` (transformers) makes two attention calls per layer call with the same
query, key, mask and scale, and two halves of the values: a softmax ``P (batch, heads, query,
key)`` twice (eager), or two ``F.scaled_dot_product_attention`` calls (sdpa). The two outputs
are concatenated on the channels, split on the heads, and combined as ``o[:, :H/2] - λ o[:,
H/2:]`` before a per-row RMS norm, so the map that mixes the values is, per differential head
``j < H/2`` (query heads ``j`` and ``j + H/2``):

``D[:, j] = P[:, j] - λ P[:, j + H/2]``, over the value ``[V_a | V_b]`` (``2 * head_dim`` wide)

with ``λ = exp(Σ λ_q1 λ_k1) - exp(Σ λ_q2 λ_k2) + λ_init``, one learned scalar per layer, read
from the module's parameters at the call and computed as the model does (float32 sums, cast
to the query's dtype).

Stored, per layer call: ``D (batch, heads / 2, query, key)``, in the query's dtype after the rotary
embedding (:func:`query_dtype`), the dtype the model casts its softmax to and computes λ in: with
float32 weights under ``torch.autocast(bfloat16)`` that is float32 (the bfloat16 projection times the
float32 ``cos``/``sin``), and λ is not rounded to bfloat16. The matmul with the values then runs in
autocast's dtype, which rounds each ``P`` to it; the stored ``D`` is not rounded so. **It is not
probabilities**: its rows sum to ``1 - λ`` and its entries may be negative (like CaiT's
talking-heads map, it is what multiplies the values). Analyses that need probabilities refuse
it. The call is refused when the two computations are not the same map (they always are in
transformers' code: the rule checks, it does not assume), or when a third one is made.

Values (``keep_values``, sdpa only): ``[V_a | V_b]`` of each differential head, ``(batch,
heads / 2, key, 2 * head_dim)``, from the two calls' own value arguments; with eager attention
the values never reach a call the capture sees, and ``keep_values`` refuses the layer. A
continuous-batching forward (requests packed into one call) is refused: its requests are not
split apart for this family yet.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .._map_kinds import not_probabilities
from .._torch_private import no_function_modes
from ..keep.protocol import CallSources
from .batching import is_paged_cache
from .pieces import FAMILIES, Assembly, PieceCall, PiecedLayer
from .routes.sdpa import as_4d, packed_query_groups, sdpa_attention_weights, unpack_query_groups

__all__ = ["DifferentialLayer", "differential_layer", "differential_lambda", "differential_map", "DIFFERENTIAL_KIND",
           "query_dtype"]

# What a stored D is (marked on it: the analyses that need probabilities refuse it, naming this).
DIFFERENTIAL_KIND = not_probabilities("DiffLlama's differential map P[:, j] - λ P[:, j + heads/2]",
                                      "rows sum to 1 - λ and entries may be negative")

_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def differential_lambda(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``λ`` of a DiffLlama attention module as its forward computes it, a 0-d tensor in ``dtype``
    (the query's): each exponential summed in float32 and cast to ``dtype``, then ``λ_init`` added."""
    with torch.no_grad(), no_function_modes():
        first = torch.exp(torch.sum(module.lambda_q1 * module.lambda_k1, dim=-1, dtype=torch.float32)).to(dtype)
        second = torch.exp(torch.sum(module.lambda_q2 * module.lambda_k2, dim=-1, dtype=torch.float32)).to(dtype)
        return first - second + module.lambda_init


def differential_map(probs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, query, key)`` probabilities -> ``(batch, heads / 2, query, key)``:
    ``probs[:, :h] - lam * probs[:, h:]`` with ``h = heads / 2``, computed in float32 at least.

    Example:
        >>> p = torch.tensor([0.25, 0.75, 1.0, 0.0]).view(1, 2, 1, 2)  # 2 heads -> 1 differential head
        >>> differential_map(p, torch.tensor(0.5)).tolist()  # a row summing to 1 - 0.5, one weight negative
        [[[[-0.25, 0.75]]]]
    """
    half = probs.shape[1] // 2
    work = torch.promote_types(probs.dtype, torch.float32)
    return probs[:, :half].to(work) - lam.to(work) * probs[:, half:].to(work)


class _DifferentialCall(PieceCall):
    """One call of a DiffLlama attention layer: its two attention computations, by reference."""

    def __init__(self, module: nn.Module, heads: int, eager_dtype: torch.dtype):
        self.module, self.heads = module, heads
        self.eager_dtype = eager_dtype  # the query's dtype when no sdpa call says it
        self.softmaxes: list = []
        self.calls: list = []
        self.groups = 1  # > 1: sdpa calls of one decode query packed as (batch, kv_heads, groups, dim)

    def _refusal(self, what: str) -> str:
        return (f"{what} inside a DiffLlama attention layer, whose attention is two computations of one map "
                f"(batch, {self.heads}, query, key) with the same query and key: the differential map cannot be "
                "assembled, so the call is not stored")

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        if self.calls or len(self.softmaxes) == 2 or result.dim() != 4 or result.shape[1] != self.heads:
            return self._refusal(f"a softmax of shape {tuple(result.shape)}")
        if self.softmaxes and not torch.equal(self.softmaxes[0], result):
            return self._refusal("a second softmax that differs from the first")
        self.softmaxes.append(result)
        return None

    def take_sdpa(self, call: dict) -> Optional[str]:
        query, key = call.get("query"), call.get("key")
        shape = tuple(getattr(query, "shape", ()))
        if self.softmaxes or len(self.calls) == 2 or not isinstance(query, torch.Tensor) \
                or not isinstance(key, torch.Tensor) or query.dim() != 4:
            return self._refusal(f"a scaled_dot_product_attention call (query {shape})")
        groups = packed_query_groups(lambda: [self.module], query, key)
        if query.shape[1] * groups != self.heads or (self.calls and groups != self.groups):
            return self._refusal(f"a scaled_dot_product_attention call (query {shape})")
        self.groups = groups
        if self.calls and not _same_map(self.calls[0], call):
            return self._refusal("a second scaled_dot_product_attention call whose query, key, mask or scale "
                                 "differ from the first's")
        self.calls.append(call)
        return None

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        if len(self.softmaxes) != 2 and len(self.calls) != 2:
            return self._refusal(f"{len(self.softmaxes) + len(self.calls)} attention computation(s), not two,")
        value = None
        if self.calls:
            first = self.calls[0]
            query, key = first["query"], first["key"]
            dtype = query.dtype
            batch, queries, keys = max(query.shape[0], key.shape[0]), query.shape[2], key.shape[2]
            if self.groups > 1:
                queries = 1  # one decode query, its heads packed on the rows
            if keep_values:
                value = _differential_values(self.calls[0]["value"], self.calls[1]["value"], self.heads)
        else:
            if keep_values:
                return ("keep_values on a DiffLlama layer with eager attention: its values [V_a | V_b] are multiplied "
                        "after two softmaxes the capture sees, never in a call it sees, so they cannot be kept (use "
                        "the sdpa attention, whose calls hand over their values)")
            probs = self.softmaxes[0]
            dtype = self.eager_dtype
            batch, _, queries, keys = probs.shape
        lam = differential_lambda(self.module, dtype)
        half = self.heads // 2

        def rows(heads, chosen: torch.Tensor, picked_keys) -> torch.Tensor:
            pairs = list(range(half)) if heads is None else [int(h) for h in heads]
            both = pairs + [h + half for h in pairs]
            with torch.no_grad(), no_function_modes():
                if self.calls and self.groups > 1:  # (B, kv_heads, groups, K) -> (B, H, 1, K), then selected
                    call = self.calls[0]
                    probs = unpack_query_groups(as_4d(sdpa_attention_weights(
                        call["query"], call["key"], call.get("attn_mask"), bool(call.get("is_causal")),
                        call.get("scale"), keys=picked_keys)), self.groups)
                    probs = probs.index_select(1, torch.tensor(both, device=probs.device))
                    probs = probs.index_select(2, chosen.to(probs.device))
                elif self.calls:
                    call = self.calls[0]
                    probs = sdpa_attention_weights(call["query"], call["key"], call.get("attn_mask"),
                                                   bool(call.get("is_causal")), call.get("scale"), heads=both,
                                                   rows=chosen.tolist(), keys=picked_keys)
                else:
                    probs = self.softmaxes[0].index_select(1, torch.tensor(both, device=self.softmaxes[0].device))
                    probs = probs.index_select(2, chosen.to(probs.device))
                    if picked_keys is not None:
                        probs = probs.index_select(3, torch.as_tensor(list(picked_keys), device=probs.device))
                    probs = probs.to(dtype)  # what the model multiplied its values by
                return differential_map(probs, lam).to(dtype)

        return Assembly(batch, half, queries, keys, dtype, rows, CallSources(value=value, kind=DIFFERENTIAL_KIND))


def _same_map(first: dict, second: dict) -> bool:
    """Whether two parsed sdpa calls compute the same weights (query, key, mask, causality, scale)."""
    def same(a, b) -> bool:
        if a is b:
            return True
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return a == b

    return all(same(first.get(name), second.get(name)) for name in ("query", "key", "attn_mask", "is_causal", "scale"))


def _differential_values(first: torch.Tensor, second: torch.Tensor, heads: int) -> torch.Tensor:
    """``[V_a | V_b]`` per differential head ``(batch, heads / 2, key, 2 * head_dim)`` from the two calls'
    values ``(batch, value heads, key, head_dim)``: query head ``j`` reads value head ``j // (heads / value heads)``."""
    first, second = as_4d(first), as_4d(second)
    group = heads // first.shape[1]
    index = torch.arange(heads // 2, device=first.device) // group
    return torch.cat([first.index_select(1, index), second.index_select(1, index)], dim=-1).detach()


class DifferentialLayer(PiecedLayer):
    """The rule of a DiffLlama attention module."""

    family = "transformers DiffLlama attention"

    def __init__(self, heads: int):
        self.heads = heads

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            return ("a DiffLlama attention layer called without floating hidden_states: the dtype its λ is cast "
                    "to cannot be read, so its differential map is not assembled")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if is_paged_cache(cache):
            return ("a DiffLlama attention layer in a continuous-batching forward: the requests packed into its "
                    "call are not split apart for a differential map yet, and stored packed its rows and keys would "
                    "mix requests, so it is not stored")
        return _DifferentialCall(module, self.heads, query_dtype(module, hidden, args, kwargs))


def query_dtype(module: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.dtype:
    """The dtype of a DiffLlama call's query after its rotary embedding, read before the call runs.

    The query is the ``q_proj`` output (autocast's dtype under autocast, else the projection's
    weight dtype) times the rotary ``cos``/``sin`` (``position_embeddings``), so it is promoted to
    theirs: fp32 weights under ``torch.autocast(bfloat16)`` give a bfloat16 projection and a
    **float32** query, the dtype λ is cast to and the softmax is returned in."""
    device = hidden.device.type
    weight = getattr(getattr(module, "q_proj", None), "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else hidden.dtype
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    rotary = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    if isinstance(rotary, (tuple, list)) and rotary and isinstance(rotary[0], torch.Tensor) \
            and rotary[0].is_floating_point():
        dtype = torch.promote_types(dtype, rotary[0].dtype)
    return dtype


def differential_layer(module: nn.Module, parents=None) -> Optional[DifferentialLayer]:
    """The rule of a transformers differential attention module (the four ``lambda_*`` parameters,
    ``lambda_init`` and a ``groupnorm``, an even head count), or ``None``."""
    kind = type(module)
    if not kind.__module__.startswith("transformers.") or not all(
            isinstance(getattr(module, name, None), nn.Parameter) for name in _LAMBDAS):
        return None
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(getattr(module, "lambda_init", None), (int, float)) or not isinstance(heads, int) \
            or heads % 2 or not isinstance(getattr(module, "groupnorm", None), nn.Module):
        return None
    return DifferentialLayer(heads)


FAMILIES.append(differential_layer)
