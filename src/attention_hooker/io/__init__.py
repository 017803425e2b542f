"""Captures on disk: saving and loading (saved), the files' format read without trusting it (format), exports."""

from .saved import SavedAttention, load, save_values, to_bertviz, to_numpy

__all__ = ["SavedAttention", "save_values", "load", "to_bertviz", "to_numpy"]
