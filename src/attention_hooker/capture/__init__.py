"""Capture routes: one module each (mha, sdpa, softmax) and the live session."""

from .routes.sdpa import sdpa_attention_weights

__all__ = ["sdpa_attention_weights"]
