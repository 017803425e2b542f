"""Analyses of captured attention: pure tensor functions (rollout, statistics, roles, attribution, flow)."""

from .attribution import find_output_projection, head_importance, value_weighted_norms
from .stats import HeadStatsAccumulator, head_entropy, mean_attention_distance, sink_share
from .rollout import attention_rollout, gradient_weighted_rollout
from .core import layer_sequence, stitch_steps
from .flow import attention_flow
from .speech_alignment import TokenAlignment, align_tokens
from .words import WordAttention, WordValues, to_words
from .roles import (duplicate_token_score, head_confidence, induction_score, previous_token_score, retrieval_score,
                    sink_heads)

__all__ = ["attention_rollout", "gradient_weighted_rollout", "head_entropy", "mean_attention_distance", "sink_share",
           "HeadStatsAccumulator", "stitch_steps", "layer_sequence", "previous_token_score", "duplicate_token_score",
           "induction_score", "head_confidence", "sink_heads", "retrieval_score", "head_importance",
           "value_weighted_norms", "find_output_projection", "attention_flow", "to_words",
           "WordValues", "WordAttention", "align_tokens", "TokenAlignment"]
