"""Which modules of a model hold attention, and which ones a regex selects."""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..errors import AttentionHookerError, AttentionHookerTypeError
from .heads import head_count

__all__ = ["find_attention_modules", "select_modules", "check_module"]


def check_module(model) -> None:
    """Raises :class:`AttentionHookerTypeError` unless ``model`` is an ``nn.Module`` instance."""
    if not isinstance(model, nn.Module):
        raise AttentionHookerTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise AttentionHookerError(
            f"model is a TorchScript module ({type(model).__name__}): its compiled code runs no Python hooks, so "
            "no attention can be captured from it; capture on the nn.Module it was scripted from"
        )

_ATTENTION_CLASS = re.compile(r"att(n|ention)", re.IGNORECASE)
_NOT_ATTENTION_CLASS = re.compile(r"(Output|Dropout|Norm|Embeddings?|Linear)$")


# What an attention module declares and holds, whatever its class is called (timm's XCA, GPSA):
# a head count, a projection that makes queries or keys, and an output projection. (A module
# holding only the q/k/v projections is a part of one; `in_proj` alone is also a Mamba mixer's.)
# Multi-head latent attention (LongCat-Flash's `...MLA`) makes its queries by a low-rank pair,
# `q_a_proj` then `q_b_proj`.
_QUERY_KEY_PROJECTIONS = frozenset({
    "qkv", "qk", "q", "k", "query", "key", "q_proj", "k_proj", "query_key_value", "to_qkv", "to_q", "to_k",
    "c_attn", "Wqkv", "wqkv", "wq", "wk", "q_a_proj", "q_b_proj",
})
_OUTPUT_PROJECTIONS = frozenset({"proj", "o_proj", "out_proj", "o", "c_proj", "dense", "wo", "to_out", "out"})


def _declares_attention(module: nn.Module) -> bool:
    """A head count (a positive int attribute), a child that projects queries or keys,
    and one that projects the output."""
    if head_count(module, own_only=True) is None:
        return False
    children = module._modules
    return any(n in _QUERY_KEY_PROJECTIONS for n in children) and any(n in _OUTPUT_PROJECTIONS for n in children)


def _named_attention(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    name = type(module).__name__
    return bool(_ATTENTION_CLASS.search(name)) and not _NOT_ATTENTION_CLASS.search(name)


def _leaves(candidates: List[Tuple[str, nn.Module]]) -> List[Tuple[str, nn.Module]]:
    """The candidates that hold no other candidate."""
    ids = {id(m) for _, m in candidates}
    return [(name, m) for name, m in candidates if not any(id(sub) in ids for sub in m.modules() if sub is not m)]


def find_attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The modules in which attention happens, in model order.

    Every ``nn.MultiheadAttention``; every module whose class name says
    attention (``...Attention``, ``...Attn``), or that declares a head count
    (``num_heads``, ``num_attention_heads``, ``n_head``, ``n_heads``) and holds a
    query or key projection (``qkv``, ``q_proj``, ``query``, ``c_attn``, ...)
    and an output projection (``proj``, ``o_proj``, ``out_proj``, ...), whatever
    its class is called (timm's ``XCA``, ``GPSA``), where no module around or
    inside it has an attention class name; of these, those that hold no other one: ``BertSelfAttention`` rather than ``BertAttention``, ``T5Attention``
    rather than ``T5LayerSelfAttention``, ``nn.MultiheadAttention`` rather than
    a wrapper class around it.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``[(name, module), ...]`` with names from ``model.named_modules()``.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2)
        >>> [name for name, _ in find_attention_modules(layer)]
        ['self_attn']
    """
    check_module(model)
    modules = list(model.named_modules())
    named = _leaves([(name, m) for name, m in modules if _named_attention(m)])
    # A module found by what it declares counts where no class says attention around or inside it.
    inside_named = {id(sub) for _, m in named for sub in m.modules()}
    around_named = {id(m) for name, m in modules if any(id(sub) in inside_named for sub in m.modules())}
    declared = _leaves([(name, m) for name, m in modules
                        if id(m) not in inside_named and id(m) not in around_named and _declares_attention(m)])
    chosen = {id(m) for _, m in named + declared}
    return [(name, m) for name, m in modules if id(m) in chosen]


def select_modules(model: nn.Module, layer_regex: Optional[str]) -> List[Tuple[str, nn.Module]]:
    """The modules to hook: those whose name ``layer_regex`` finds (``re.search``),
    or every attention module when it is ``None``.

    Raises:
        AttentionHookerError: when the regex is invalid, or finds no module, or
            the model has no attention module to hook.
    """
    if layer_regex is None:
        found = find_attention_modules(model)
        if not found:
            raise AttentionHookerError(
                f"found no attention module in {type(model).__name__}: no nn.MultiheadAttention, no "
                "module whose class name contains 'Attention' or 'Attn', and none that declares a head count "
                "and holds a query/key projection; pass layer_regex= naming the "
                "modules whose forward computes attention"
            )
        return found
    if not isinstance(layer_regex, str):
        raise AttentionHookerError(
            f"layer_regex must be a str (a regular expression) or None, got {type(layer_regex).__name__}"
        )
    try:
        pattern = re.compile(layer_regex)
    except re.error as err:
        raise AttentionHookerError(f"layer_regex {layer_regex!r} is not a valid regular expression: {err}") from None
    chosen = [(name, m) for name, m in model.named_modules() if pattern.search(name)]
    if not chosen:
        known = [name for name, _ in find_attention_modules(model)]
        hint = (
            f"modules that hold attention: {', '.join(known[:6])}{', ...' if len(known) > 6 else ''} ({len(known)} in all)"
            if known
            else "no module of it looks like attention by its class"
        )
        n_modules = sum(1 for _ in model.named_modules())
        raise AttentionHookerError(
            f"layer_regex {layer_regex!r} matched none of the {n_modules} module names of "
            f"{type(model).__name__}; {hint}"
        )
    return chosen


# Children that wrappers put between a model and its own modules: FSDP (1), activation
# checkpointing, torch.compile. DDP and DataParallel put ``module`` at the root.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def display_names(names: List[str], model: nn.Module, *, keep_wrappers: bool = False) -> dict:
    """``{module name: the name to report}``: the names a model has unwrapped.

    ``DistributedDataParallel`` / ``DataParallel`` add ``module.`` in front of every
    name, FSDP adds ``_fsdp_wrapped_module.`` to each wrapped unit, activation
    checkpointing ``_checkpoint_wrapped_module.``: a layer is reported under the name
    it has in the model the user wrote, the same on every rank and with or without the
    wrapper. Names that would then coincide keep their full form.

    Example:
        >>> display_names(["_fsdp_wrapped_module.layers.0._fsdp_wrapped_module.attn"], nn.Module())
        {'_fsdp_wrapped_module.layers.0._fsdp_wrapped_module.attn': 'layers.0.attn'}
    """
    if keep_wrappers:
        return {name: name for name in names}
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    root_wrapper = isinstance(model, (DataParallel, DistributedDataParallel))
    shown = {}
    for name in names:
        parts = name.split(".") if name else []
        if root_wrapper and parts[:1] == ["module"]:
            parts = parts[1:]
        shown[name] = ".".join(p for p in parts if p not in _WRAPPER_PARTS)
    counts: dict = {}
    for short in shown.values():
        counts[short] = counts.get(short, 0) + 1
    return {name: short if counts[short] == 1 else name for name, short in shown.items()}
