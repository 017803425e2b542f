"""The library's exception and warning types."""

__all__ = ["AttentionHookerError", "AttentionCaptureWarning"]


class AttentionHookerError(ValueError):
    """Raised when an input to the library is wrong.

    The message says what was expected, what came, and where.
    """


class AttentionCaptureWarning(UserWarning):
    """Warned when hooked modules ran but no attention weights could be captured."""
