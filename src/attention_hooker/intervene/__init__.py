"""Interventions on heads: knock out, scale, replace or patch a head's attention, on every route.

Unlike a capture, an intervention changes what the model computes (the named heads, and only
them); the hooker's promise that the model runs unchanged holds outside an intervention only.
"""

from .acts import block_keys, top_k_keys, uniform_weights
from .effects import HeadEffects, knockout_effects, language_model_loss, mean_pooled_output
from .intervention import HeadIntervention
from .recording import HeadRecording, record_heads

__all__ = ["HeadIntervention", "HeadRecording", "record_heads", "top_k_keys", "block_keys", "uniform_weights",
           "knockout_effects", "HeadEffects", "language_model_loss", "mean_pooled_output"]
