"""The storage policy: every capture option, checked, and every rule about options that do
not go together, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .._checks import check_device, check_flag, one_of, positive_int
from ..errors import AttentionHookerError
from ..selection import Selection
from .device_budget import AUTO

__all__ = ["StoragePolicy"]

_KEEP_CHOICES = ("first", "last")
_WINDOWS_CHOICES = ("dense", "keep")
_OUTPUT_FROM_CHOICES = ("kernel", "weights")


@dataclass(frozen=True)
class StoragePolicy:
    """How captured weights are stored.

    Attributes:
        device: where stored tensors go: ``"auto"`` (the default) keeps them on the device
            they were computed on while they fit a share of its memory, else on the CPU
            (:mod:`.device_budget`; the CPU on a machine without an accelerator); a device
            keeps them there; ``None`` keeps them on the device they were computed on.
        dtype: stored floating dtype (``torch.float16`` halves memory); ``None``
            keeps the dtype the weights were computed in.
        max_calls: how many calls to keep per layer; ``None`` keeps all.
        keep: with ``max_calls``, ``"first"`` keeps the first calls (later ones are
            not computed at all) and ``"last"`` keeps the most recent ones.
        keep_grad: also keep the gradient of the loss with respect to each stored
            call's weights, filled in by ``backward()``.
        selection: the heads, query rows and keys kept of each call
            (:class:`~attention_hooker.selection.Selection`); each row is still
            normalised over all of its keys.
        keep_values: also keep each call's value vectors ``(batch, kv_heads, key,
            head_dim)``, where the route sees them (sdpa, ``nn.MultiheadAttention``, the
            product of eager code).
        windows: how a windowed layer's call (Swin, MaxViT, Twins) is stored: ``"dense"``
            placed at the image's tokens ``(batch, heads, tokens, tokens)``; ``"keep"`` as the
            model computed it, ``(batch * windows, heads, N, N)``, with its
            :class:`~attention_hooker.window_index.WindowIndex` beside it.
        output_from: what gives the model an sdpa call's output: ``"kernel"`` (the call's own
            kernel, bitwise what it returns without capture) or ``"weights"`` (the captured
            weights times the values, as eager attention computes it: the weights are
            computed once instead of twice; equal to the kernel's output within float
            tolerance, not bitwise). See the hooker's ``output_from``.
    """

    device: Union[torch.device, str, None] = AUTO
    dtype: Optional[torch.dtype] = None
    max_calls: Optional[int] = None
    keep: str = "first"
    keep_grad: bool = False
    keep_values: bool = False
    selection: Selection = Selection()
    windows: str = "dense"
    output_from: str = "kernel"

    @classmethod
    def build(
        cls,
        *,
        device,
        dtype,
        heads: Optional[Sequence[int]],
        max_calls: Optional[int],
        keep: str,
        keep_grad: bool,
        rows=None,
        keys=None,
        keep_values: bool = False,
        windows: str = "dense",
        output_from: str = "kernel",
    ) -> "StoragePolicy":
        """Validates user options and returns a policy.

        Raises:
            AttentionHookerError: when an option has the wrong type or value.
        """
        device = check_device(device, auto=True)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise AttentionHookerError(
                f"dtype={dtype!r} is not a floating torch dtype; expected e.g. torch.float16, torch.float32 or None"
            )
        selection = Selection.parse(heads=heads, rows=rows, keys=keys)
        max_calls = positive_int(max_calls, "max_calls", allow_none=True)
        keep = one_of(keep, "keep", _KEEP_CHOICES)
        keep_grad = check_flag(keep_grad, "keep_grad")
        keep_values = check_flag(keep_values, "keep_values")
        if not isinstance(windows, str) or windows not in _WINDOWS_CHOICES:
            raise AttentionHookerError(
                f"windows={windows!r} must be one of {_WINDOWS_CHOICES}: \"dense\" stores a windowed layer's call placed "
                "at the image's tokens, \"keep\" as the model computed it, per window, with its window index")
        if not isinstance(output_from, str) or output_from not in _OUTPUT_FROM_CHOICES:
            raise AttentionHookerError(
                f"output_from={output_from!r} must be one of {_OUTPUT_FROM_CHOICES}: \"kernel\" lets each sdpa call's "
                "kernel compute the model's output (bitwise unchanged), \"weights\" computes it from the captured "
                "weights (weights @ value: faster where the kernel is no faster than eager attention, equal within "
                "float tolerance)")
        policy = cls(device, dtype, max_calls, keep, keep_grad, keep_values, selection, windows, output_from)
        policy._check_combination()
        return policy

    # Every rule about options that do not go together lives below, in one place.
    def _check_combination(self) -> None:
        selects = self.selection.heads is not None or self.selection.rows is not None or self.selection.keys is not None
        if self.keep_values and selects:
            raise AttentionHookerError("keep_values=True cannot be combined with heads=, rows= or keys=: the value "
                                       "vectors serve every head, query and key")
        if self.windows == "keep" and (self.selection.rows is not None or self.selection.keys is not None):
            raise AttentionHookerError('windows="keep" cannot be combined with rows= or keys=: a per-window call\'s '
                                       "rows and keys are slots of its windows, not tokens; select tokens of the "
                                       "dense map (the default, windows=\"dense\") or after WindowIndex.dense()")
        for option, chosen, what in (("heads=", self.selection.heads, "head"), ("rows=", self.selection.rows, "query row"),
                                     ("keys=", self.selection.keys, "key")):
            if self.keep_grad and chosen is not None:
                raise AttentionHookerError(f"{option} and keep_grad=True cannot be combined: gradients need every {what}")

    def check_reductions(self) -> None:
        """Raises when calls cannot go to a reduction (``hooker.reduce_into``)."""
        if self.windows == "keep":
            raise AttentionHookerError('reduce_into() cannot be combined with windows="keep": a reduction takes '
                                       "(batch, heads, query, key) maps over tokens, and a per-window call's axis 0 "
                                       'counts windows and its slots include padding; use the default windows="dense"')
        if self.keep_grad or self.selection.rows is not None or self.selection.keys is not None or self.keep_values:
            raise AttentionHookerError("reduce_into() cannot be combined with keep_grad=True, keep_values=True, rows= "
                                       "or keys=: statistics are taken over every query row and key, and keep nothing "
                                       "else")

    def check_stream(self) -> None:
        """Raises when calls cannot be streamed to disk (``hooker.stream_to``)."""
        if self.keep_grad:
            raise AttentionHookerError("stream_to() cannot be combined with keep_grad=True: gradients arrive "
                                       "after the calls are written")
        if self.keep_values:
            raise AttentionHookerError("stream_to() cannot be combined with keep_values=True: streamed captures "
                                       "hold the weights only")
        if self.windows == "keep":
            raise AttentionHookerError('stream_to() cannot be combined with windows="keep": streamed captures hold '
                                       "the weights only, and a per-window call without its window index cannot be "
                                       'placed at image positions; stream the default windows="dense", or keep the '
                                       "calls in memory and hooker.save() them (the index is saved)")
        if self.max_calls is not None and self.keep == "last":
            raise AttentionHookerError('stream_to() cannot keep the last calls (keep="last"): written calls stay '
                                       'written; use keep="first" with max_calls=')

    def check_tensor_parallel(self, sharded: bool) -> None:
        """Raises when heads are chosen on a model whose ranks each compute a block of them."""
        if sharded and self.selection.heads is not None:
            raise AttentionHookerError(
                "heads= cannot be combined with tensor-parallel heads: each rank computes only its own block of "
                "heads; capture them all and pick heads after attention_hooker.distributed.assemble_heads()")
