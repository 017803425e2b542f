"""Transformer Attention Hooker: capture per-head attention from any PyTorch transformer, and show it."""

import importlib
from importlib.metadata import PackageNotFoundError, version

# Names are imported when first used (PEP 562), so that `attention-hooker --help` and
# `import attention_hooker` do not pay for importing torch until something needs it.
_EXPORTS = {
    "HeadStatsAccumulator": "analysis", "attention_rollout": "analysis", "gradient_weighted_rollout": "analysis",
    "head_entropy": "analysis", "mean_attention_distance": "analysis", "sink_share": "analysis",
    "stitch_steps": "analysis", "sdpa_attention_weights": "capture.sdpa", "find_attention_modules": "discovery",
    "AttentionCaptureWarning": "errors", "AttentionHookerError": "errors", "AttentionHookerTypeError": "errors",
    "TransformerAttentionHooker": "hooker", "SavedAttention": "io", "load": "io", "to_bertviz": "io",
    "to_numpy": "io", "AttentionPage": "html", "render_html": "html", "KeyReductions": "pooling",
    "PooledAttention": "pooling", "plot_attention_grid": "plot", "plot_attention_overview": "plot",
    "plot_vit_attention": "plot", "vit_attention_map": "plot", "AttentionValues": "store",
    "previous_token_score": "roles", "duplicate_token_score": "roles", "induction_score": "roles",
    "head_confidence": "roles", "head_importance": "attribution", "value_weighted_norms": "attribution",
    "attention_flow": "flow", "sink_heads": "roles", "retrieval_score": "roles",
    "find_output_projection": "attribution",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attention_hooker' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


try:
    __version__ = version("transformer-attention-hooker")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "TransformerAttentionHooker",
    "AttentionValues",
    "AttentionHookerError",
    "AttentionHookerTypeError",
    "AttentionCaptureWarning",
    "find_attention_modules",
    "plot_attention_grid",
    "plot_attention_overview",
    "plot_vit_attention",
    "vit_attention_map",
    "render_html",
    "AttentionPage",
    "sdpa_attention_weights",
    "attention_rollout",
    "gradient_weighted_rollout",
    "head_entropy",
    "mean_attention_distance",
    "sink_share",
    "HeadStatsAccumulator",
    "PooledAttention",
    "KeyReductions",
    "stitch_steps",
    "previous_token_score",
    "duplicate_token_score",
    "induction_score",
    "head_confidence",
    "head_importance",
    "value_weighted_norms",
    "attention_flow",
    "sink_heads",
    "retrieval_score",
    "find_output_projection",
    "load",
    "SavedAttention",
    "to_bertviz",
    "to_numpy",
    "__version__",
]
