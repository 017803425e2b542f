"""What the hooker checks about the model and the run, and what it tells the user: the Hugging
Face attention implementation, tracing and compiling, the job's rank, and why nothing (or
not every layer) was captured."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .._torch_private import in_backward, tracing_state_active
from ..errors import AttentionHookerError
from .coverage import CoverageReport

__all__ = ["being_traced", "is_compiled", "in_backward_pass", "hf_implementations", "job_rank", "check_hf_implementation",
           "missing_layers_message", "nothing_captured_message"]

# "paged|eager" is eager attention reading a paged cache (continuous batching): its softmax is the route.
CAPTURABLE_HF_IMPLEMENTATIONS = ("eager", "sdpa", "paged|eager", None)


def being_traced() -> bool:
    """Whether the running forward is being traced rather than run: ``torch.export``
    (strict or not) or ``torch.jit.trace``. Tracing sees fake or symbolic tensors,
    and what the hooks would compute would land in the traced program.

    ``torch.compiler.is_exporting`` is public (torch >= 2.5); ``torch._C._get_tracing_state``
    is private (checked on torch 2.1-2.14, pinned by a test).
    """
    exporting = getattr(torch.compiler, "is_exporting", None)
    return (exporting is not None and exporting()) or tracing_state_active()


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (whose ``_orig_mod`` is the model)."""
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"


def in_backward_pass() -> bool:
    """Whether autograd is running a backward pass on this thread right now."""
    return in_backward()


def hf_implementations(model: nn.Module) -> Dict[str, str]:
    """``{config class: _attn_implementation}`` of a Hugging Face model and its sub-configs."""
    found = {}
    config = getattr(model, "config", None)
    stack = [config] if config is not None else []
    seen = set()
    while stack:
        cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        impl = getattr(cfg, "_attn_implementation", None)
        if isinstance(impl, str):
            found[type(cfg).__name__] = impl
        for value in getattr(cfg, "__dict__", {}).values():
            if type(value).__name__.endswith("Config") and hasattr(value, "_attn_implementation"):
                stack.append(value)
    return found


def job_rank() -> Optional[int]:
    """This process's rank in a running ``torch.distributed`` job of several ranks, else ``None``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return None


def check_hf_implementation(model: nn.Module) -> None:
    for config_name, impl in hf_implementations(model).items():
        if impl not in CAPTURABLE_HF_IMPLEMENTATIONS:
            raise AttentionHookerError(
                f"{type(model).__name__} ({config_name}) uses attn_implementation={impl!r}, whose kernel "
                "never exposes the attention weights; switch before capturing with "
                "model.set_attn_implementation('sdpa') (or 'eager'), or load it with attn_implementation='sdpa'"
            )


def missing_layers_message(model: nn.Module, report: CoverageReport) -> str:
    missing = report.missing
    shown = "; ".join(
        f"{name} ({report[name].reason})" if report[name].reason else name for name in missing[:4]
    ) + ("; ..." if len(missing) > 4 else "")
    ran = sum(1 for c in report.values() if c.runs)
    return (
        f"{len(missing)} of the {ran} hooked layers of {type(model).__name__} that ran gave no attention: {shown}. "
        "Their values are missing, not zero: the rest computes attention in a way no route sees (a bmm over "
        "(batch * heads, query, key) in a module that declares no head count, blocked or windowed attention, "
        "a hand-written exp / sum). hooker.report() lists every layer"
    )


def nothing_captured_message(model: nn.Module, layers: List[str], report: CoverageReport) -> str:
    reasons = {c.reason for c in report.values() if c.reason}
    if reasons:
        return (
            f"the hooked modules of {type(model).__name__} ran but every attention call was refused: "
            f"{sorted(reasons)[0]}; hooker.report() lists every layer"
        )
    shown = ", ".join(layers[:3]) + (", ..." if len(layers) > 3 else "")
    impls = hf_implementations(model)
    used = sorted(set(impls.values()))
    hint = (
        f" (attn_implementation: {', '.join(used)}; try model.set_attn_implementation('eager'))"
        if used and used != ["eager"]
        else " (attn_implementation: eager already: the architecture may compute no weights at all, as linear "
        "or hashed attention does)" if used else ""
    )
    return (
        f"the hooked modules of {type(model).__name__} ran ({shown}) but no attention weights were captured: "
        "their attention is computed neither by nn.MultiheadAttention, nor F.scaled_dot_product_attention, "
        f"nor a softmax over the last dim of a 4-D tensor inside them{hint}; choose the modules that compute "
        "attention with layer_regex="
    )
