"""Which modules of a model hold attention, and which ones a regex selects."""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch
from torch import nn

from .errors import AttentionHookerError, AttentionHookerTypeError

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


def _looks_like_attention(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    name = type(module).__name__
    return bool(_ATTENTION_CLASS.search(name)) and not _NOT_ATTENTION_CLASS.search(name)


def find_attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The modules in which attention happens, in model order.

    Every ``nn.MultiheadAttention``, and every module whose class name says
    attention (``...Attention``, ``...Attn``) and that holds no such module
    itself: ``BertSelfAttention`` rather than ``BertAttention``, ``T5Attention``
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
    candidates = [(name, m) for name, m in model.named_modules() if _looks_like_attention(m)]
    ids = {id(m) for _, m in candidates}
    return [
        (name, m)
        for name, m in candidates
        if not any(id(sub) in ids for sub in m.modules() if sub is not m)
    ]


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
                f"found no attention module in {type(model).__name__}: no nn.MultiheadAttention and no "
                "module whose class name contains 'Attention' or 'Attn'; pass layer_regex= naming the "
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
