"""The library's exception and warning types."""

__all__ = ["AttentionHookerError", "AttentionHookerTypeError", "InterventionError", "AttentionCaptureWarning", "CommandError"]


class AttentionHookerError(ValueError):
    """Raised when an input to the library is wrong.

    The message says what was expected, what came, and where.
    """


class AttentionHookerTypeError(AttentionHookerError, TypeError):
    """An input of the wrong type (a model that is not an ``nn.Module``): the library's
    error, and a ``TypeError`` too, as Python code expects for a wrong type."""


class InterventionError(AttentionHookerError):
    """An intervention on heads that cannot be done as asked: a head the layer lacks, a map of
    the wrong shape, a patch from a run of another shape, a layer the model does not have, or
    an attention call the intervention cannot act on exactly. Raised rather than letting the
    model run unchanged, so that a measured effect is never an intervention that did not happen."""


class AttentionCaptureWarning(UserWarning):
    """Warned when hooked modules ran but no attention weights could be captured."""


class CommandError(Exception):
    """A mistake a person made on the command line, that they can fix; the message says what and how."""
