"""The library's exception and warning types."""

__all__ = ["AttentionHookerError", "AttentionHookerTypeError", "AttentionCaptureWarning", "CommandError"]


class AttentionHookerError(ValueError):
    """Raised when an input to the library is wrong.

    The message says what was expected, what came, and where.
    """


class AttentionHookerTypeError(AttentionHookerError, TypeError):
    """An input of the wrong type (a model that is not an ``nn.Module``): the library's
    error, and a ``TypeError`` too, as Python code expects for a wrong type."""


class AttentionCaptureWarning(UserWarning):
    """Warned when hooked modules ran but no attention weights could be captured."""


class CommandError(Exception):
    """A mistake a person made on the command line, that they can fix; the message says what and how."""
