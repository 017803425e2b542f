"""Transformer Attention Hooker: capture per-head attention from any PyTorch transformer, and show it."""

import importlib

from . import moved_modules  # noqa: F401 - old module paths, for one release
from importlib.metadata import PackageNotFoundError, version

# Names are imported when first used (PEP 562), so that `attention-hooker --help` and
# `import attention_hooker` do not pay for importing torch until something needs it.
_EXPORTS = {
    "HeadStatsAccumulator": "analysis.stats", "attention_rollout": "analysis.rollout", "gradient_weighted_rollout": "analysis.rollout",
    "stage_rollout": "analysis.stage_rollout",
    "head_entropy": "analysis.stats", "mean_attention_distance": "analysis.stats", "sink_share": "analysis.stats",
    "stitch_steps": "analysis.core", "sdpa_attention_weights": "capture.routes.sdpa", "find_attention_modules": "capture.discovery",
    "AttentionCaptureWarning": "errors", "AttentionHookerError": "errors", "AttentionHookerTypeError": "errors",
    "TransformerAttentionHooker": "hooker", "SavedAttention": "io.saved", "load": "io.saved", "to_bertviz": "io.saved",
    "to_numpy": "io.saved", "AttentionPage": "views.page", "render_html": "page_scores", "KeyReductions": "keep.pooling",
    "PooledAttention": "keep.pooling", "plot_attention_grid": "views.plot", "plot_attention_overview": "views.plot",
    "plot_vit_attention": "views.vit", "vit_attention_map": "views.vit",
    "plot_swin_attention": "views.vit", "swin_attention_map": "views.vit", "AttentionValues": "values",
    "previous_token_score": "analysis.roles", "duplicate_token_score": "analysis.roles", "induction_score": "analysis.roles",
    "head_confidence": "analysis.roles", "head_importance": "analysis.attribution", "value_weighted_norms": "analysis.attribution",
    "attention_flow": "analysis.flow", "sink_heads": "analysis.roles", "retrieval_score": "analysis.roles",
    "find_output_projection": "analysis.attribution", "remove_hooks": "capture.live",
    "compare": "analysis.compare", "AttentionComparison": "analysis.compare",
    "plot_head_comparison": "views.compare", "plot_distance_grid": "views.compare",
    "to_words": "analysis.words", "WordValues": "analysis.words", "WordAttention": "analysis.words",
    "HeadIntervention": "intervene.intervention", "HeadRecording": "intervene.recording",
    "record_heads": "intervene.recording", "top_k_keys": "intervene.acts", "block_keys": "intervene.acts",
    "uniform_weights": "intervene.acts", "InterventionError": "errors",
    "knockout_effects": "intervene.effects", "HeadEffects": "intervene.effects",
    "language_model_loss": "intervene.effects", "mean_pooled_output": "intervene.effects",
    "align_tokens": "analysis.speech_alignment", "TokenAlignment": "analysis.speech_alignment",
    "audio_frames": "media.audio_frames", "AudioFrames": "media.audio_frames",
    "plot_token_alignment": "views.speech",
    "image_token_map": "media.image_tokens", "ImageTokens": "media.image_tokens", "ImageView": "media.image_tokens",
    "image_token_families": "media.image_tokens", "image_attention": "analysis.image_attention",
    "ImageAttention": "analysis.image_attention", "image_attention_through_queries": "analysis.query_image_attention",
    "QueryChainAttention": "analysis.query_image_attention", "plot_image_attention": "views.image_overlay",
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
    "image_token_map",
    "ImageTokens",
    "ImageView",
    "image_token_families",
    "image_attention",
    "ImageAttention",
    "image_attention_through_queries",
    "QueryChainAttention",
    "plot_image_attention",
    "remove_hooks",
    "AttentionValues",
    "AttentionHookerError",
    "AttentionHookerTypeError",
    "AttentionCaptureWarning",
    "find_attention_modules",
    "plot_attention_grid",
    "plot_attention_overview",
    "plot_vit_attention",
    "vit_attention_map",
    "plot_swin_attention",
    "swin_attention_map",
    "render_html",
    "AttentionPage",
    "sdpa_attention_weights",
    "attention_rollout",
    "gradient_weighted_rollout",
    "stage_rollout",
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
    "compare",
    "AttentionComparison",
    "plot_head_comparison",
    "plot_distance_grid",
    "to_words",
    "WordValues",
    "WordAttention",
    "HeadIntervention",
    "HeadRecording",
    "record_heads",
    "top_k_keys",
    "block_keys",
    "uniform_weights",
    "knockout_effects",
    "HeadEffects",
    "language_model_loss",
    "mean_pooled_output",
    "InterventionError",
    "load",
    "SavedAttention",
    "to_bertviz",
    "to_numpy",
    "align_tokens",
    "TokenAlignment",
    "audio_frames",
    "AudioFrames",
    "plot_token_alignment",
    "__version__",
]
