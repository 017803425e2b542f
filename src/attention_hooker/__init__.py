"""Transformer Attention Hooker: capture per-head attention from any PyTorch transformer, and show it."""

from importlib.metadata import PackageNotFoundError, version

from .analysis import (
    HeadStatsAccumulator,
    attention_rollout,
    gradient_weighted_rollout,
    head_entropy,
    mean_attention_distance,
    sink_share,
    stitch_steps,
)
from .capture.sdpa import sdpa_attention_weights
from .discovery import find_attention_modules
from .errors import AttentionCaptureWarning, AttentionHookerError, AttentionHookerTypeError
from .hooker import TransformerAttentionHooker
from .io import SavedAttention, load, to_bertviz, to_numpy
from .html import AttentionPage, render_html
from .pooling import KeyReductions, PooledAttention
from .plot import plot_attention_grid, plot_attention_overview, plot_vit_attention, vit_attention_map
from .store import AttentionValues

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
    "load",
    "SavedAttention",
    "to_bertviz",
    "to_numpy",
    "__version__",
]
