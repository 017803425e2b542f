"""Nystromformer's landmark attention, assembled into the map that multiplies the values (a
:mod:`.pieces` family).

``NystromformerSelfAttention`` never forms a ``(tokens, tokens)`` softmax when it has fewer
landmarks ``m`` than its ``segment_means_seq_len``. One call of it over ``(batch, L, width)``
makes three softmaxes, in order:

* ``kernel_1 = softmax(q k̃ᵀ)`` ``(batch, heads, L, m)``: tokens over landmark keys;
* ``kernel_2 = softmax(q̃ k̃ᵀ)`` ``(batch, heads, m, m)``: landmarks over landmarks;
* ``kernel_3 = softmax(q̃ kᵀ + mask)`` ``(batch, heads, m, L)``: landmarks over the keys,

and multiplies the values by ``kernel_1 @ Z @ kernel_3`` where ``Z = module.iterative_inv(kernel_2)``
(six fixed iterations towards a pseudo-inverse, not ``torch.linalg.pinv``). ``Z`` is a pure
function of ``kernel_2`` *of the whole batch* (its starting scale is a maximum over every batch
row and head), so the map of one sample depends on the others it was batched with, exactly as
the model's output does. The module's own ``iterative_inv`` is called on the ``kernel_2`` the call
computed (under ``no_grad``, seen by no capture), which gives ``kernel_1 @ Z`` bit for bit as the
model had it (transformers' ``attentions``).

The layer also adds a depthwise convolution of the values over the token axis
(``conv_kernel_size`` taps, always set in transformers 5), which is a fixed banded matrix
``C[h, i, j] = conv.weight[h, 0, j - i + k // 2, 0]`` for ``|j - i| <= k // 2``: its output is
``(kernel_1 @ Z @ kernel_3 + C) @ V``. Stored, per layer call: that whole map ``(batch, heads, L,
L)``, the one whose product with the values is the layer's context (before ``permute`` and the
output dense). When the layer has as many landmarks as ``segment_means_seq_len`` it computes a
plain masked softmax ``P`` instead of the three kernels; the stored map is then ``P + C``, by the
same rule. The conv term does not look at the mask: padded keys get the conv's weight in the rows
near them, as in the model.

**Not probabilities.** ``Z`` has negative entries and ``C`` is a learned convolution: entries may be
negative and rows do not sum to 1 (like CaiT's talking heads, the map that reaches the values is
what is stored; the analyses that need probabilities check and refuse it).

Stored in the dtype the values are multiplied in (:func:`multiply_dtype`): the model's, or autocast's
(``torch.autocast(bfloat16)`` over float32 weights: bfloat16, the dtype of its context).

Selections: a row costs ``O(m · keys)`` (``kernel_1[rows] @ (Z @ kernel_3)``). ``keep_values`` keeps
``value(x)``, ``(batch, heads, L, head_dim)``: what the layer's ``value`` returned to it in the call
(:mod:`.value_tap`), never made again.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .._map_kinds import not_probabilities
from .._torch_private import no_function_modes
from ..keep.protocol import CallSources
from .value_tap import SeenValues, seen_outputs
from .pieces import FAMILIES, Assembly, PieceCall, PiecedLayer

__all__ = ["LandmarkLayer", "landmark_layer", "conv_band", "LANDMARK_KIND"]

# What a stored map is (marked on it: the analyses that need probabilities refuse it, naming this).
LANDMARK_KIND = not_probabilities("Nystromformer's landmark map kernel_1 @ pinv(kernel_2) @ kernel_3 + conv band",
                                  "the iterative pseudo-inverse and the learned convolution give negative entries "
                                  "and rows that do not sum to 1")


def conv_band(weight: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The depthwise value convolution as a matrix: ``(heads, len(rows), len(keys))``, entry
    ``[h, r, c]`` the weight tap ``keys[c] - rows[r] + k // 2`` of head ``h`` where that is a tap,
    exact 0 elsewhere (the convolution's zero padding).

    Args:
        weight: the ``nn.Conv2d(heads, heads, (k, 1), groups=heads)`` weight ``(heads, 1, k, 1)``.
        rows, keys: absolute token positions (long tensors).

    Example:
        >>> w = torch.arange(1.0, 4.0).view(1, 1, 3, 1)  # one head, taps 1, 2, 3
        >>> conv_band(w, torch.arange(3), torch.arange(3))[0]
        tensor([[2., 3., 0.],
                [1., 2., 3.],
                [0., 1., 2.]])
    """
    taps = weight.shape[2]
    offset = keys.to(weight.device)[None, :] - rows.to(weight.device)[:, None] + taps // 2  # (R, K)
    inside = (offset >= 0) & (offset < taps)
    band = weight[:, 0, :, 0][:, offset.clamp(0, taps - 1)]  # (H, R, K)
    return band * inside


class _LandmarkCall(PieceCall):
    """One call of a Nystromformer self-attention layer: references to its softmaxes."""

    def __init__(self, module: nn.Module, hidden: torch.Tensor, heads: int, landmarks: Optional[int], family: str,
                 dtype: torch.dtype, seen: Optional[SeenValues] = None):
        self.module, self.hidden = module, hidden  # (B, L, C)
        self.family, self.seen = family, seen
        self.dtype = dtype  # what the values are multiplied in (multiply_dtype)
        self.batch, self.length = hidden.shape[:2]
        self.heads = heads
        self.landmarks = landmarks  # m, or None: the plain softmax path
        self.kernels: list = []

    def _expected(self) -> list:
        b, h, n, m = self.batch, self.heads, self.length, self.landmarks
        if m is None:
            return [(b, h, n, n)]
        return [(b, h, n, m), (b, h, m, m), (b, h, m, n)]

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        expected = self._expected()
        if len(self.kernels) < len(expected) and tuple(result.shape) == expected[len(self.kernels)]:
            self.kernels.append(result)
            return None
        return (f"a softmax of shape {tuple(result.shape)} inside a Nystromformer layer, whose pieces are "
                + ", ".join(str(s) for s in expected) + " in that order: an unknown piece, so the call is not "
                "assembled")

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        expected = self._expected()
        if len(self.kernels) != len(expected):
            return (f"the Nystromformer layer made {len(self.kernels)} of its {len(expected)} softmaxes "
                    f"({', '.join(str(s) for s in expected)}) in its call, so its map cannot be assembled")
        module = self.module
        conv = getattr(module, "conv", None) if getattr(module, "conv_kernel_size", None) is not None else None
        weight = conv.weight.detach() if isinstance(conv, nn.Conv2d) else None
        with torch.no_grad(), no_function_modes():  # the module's own arithmetic, seen by no capture
            if self.landmarks is None:
                left, right = self.kernels[0], None  # P (B, H, L, L)
            else:
                kernel_1, kernel_2, kernel_3 = self.kernels
                left = kernel_1 @ module.iterative_inv(kernel_2)  # (B, H, L, m): the model's attention_probs
                right = kernel_3  # (B, H, m, L)
        value = None
        if keep_values:
            outputs = seen_outputs(self.seen, "value", 1, self.family)
            if isinstance(outputs, str):
                return outputs
            b, n, projected = self.batch, self.length, outputs[0]  # what the layer computed: (B, L, C)
            if projected.dim() != 3 or tuple(projected.shape[:2]) != (b, n) or projected.shape[2] % self.heads:
                return (f"keep_values on a {self.family} layer whose value projection returned "
                        f"{tuple(projected.shape)}, not ({b}, {n}, heads x head_dim), so its values cannot be read "
                        "and the call is not stored (capture it without keep_values)")
            value = projected.view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, L, d)
        dtype = self.dtype

        def rows(heads: Optional[Sequence[int]], chosen: torch.Tensor, keys: Optional[Sequence[int]]) -> torch.Tensor:
            with torch.no_grad(), no_function_modes():
                head_index = None if heads is None else torch.as_tensor(list(heads), device=left.device)
                key_index = torch.arange(self.length) if keys is None else torch.as_tensor(list(keys))
                key_index = key_index.to(left.device)
                part = left if head_index is None else left.index_select(1, head_index)
                part = part.index_select(2, chosen.to(left.device))
                if right is None:
                    out = part.index_select(3, key_index)  # (B, h, R, K)
                else:
                    keyed = right if head_index is None else right.index_select(1, head_index)
                    out = part @ keyed.index_select(3, key_index)  # (B, h, R, m) @ (B, h, m, K)
                if weight is not None:
                    band = conv_band(weight, chosen, key_index)  # (H, R, K)
                    if head_index is not None:
                        band = band.index_select(0, head_index.to(band.device))
                    out = out + band.to(out.device, out.dtype)
                return out.to(dtype)

        return Assembly(self.batch, self.heads, self.length, self.length, dtype, rows,
                        CallSources(value=value, kind=LANDMARK_KIND))


class LandmarkLayer(PiecedLayer):
    """The rule of a Nystromformer self-attention module: the heads and landmarks from the module."""

    value_modules = ("value",)

    def __init__(self, family: str, heads: int):
        self.family, self.heads = family, heads

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None
            return (f"a {self.family} layer called with hidden states {shape}, not (batch, tokens, width): its "
                    "landmark kernels cannot be placed, so nothing is stored")
        plain = module.num_landmarks == module.seq_len  # the module's own test for its plain softmax path
        return _LandmarkCall(module, hidden, self.heads, None if plain else int(module.num_landmarks), self.family,
                             multiply_dtype(module, hidden), self.seen_values())


def multiply_dtype(module: nn.Module, hidden: torch.Tensor) -> torch.dtype:
    """The dtype a Nystromformer call multiplies its values in, read when the call begins: autocast's
    (every product of the layer, the values' too, is a matmul) when autocast is on for ``hidden``'s
    device and would cast it (not float64), else the value projection's weight dtype (its output's)."""
    device = hidden.device.type
    weight = getattr(getattr(module, "value", None), "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else hidden.dtype
    if torch.is_autocast_enabled(device) and dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return dtype


def landmark_layer(module: nn.Module, parents=None) -> Optional[LandmarkLayer]:
    """The rule of a transformers Nystromformer self-attention module (``iterative_inv``,
    ``num_landmarks``, ``seq_len``, ``num_attention_heads`` and the ``query``/``key``/``value``
    projections), or ``None``."""
    kind = type(module)
    if not kind.__module__.startswith("transformers.") or not callable(getattr(module, "iterative_inv", None)):
        return None
    if not all(isinstance(getattr(module, name, None), int) for name in ("num_landmarks", "seq_len",
                                                                          "num_attention_heads")):
        return None
    if not all(isinstance(getattr(module, name, None), nn.Module) for name in ("query", "key", "value")):
        return None
    return LandmarkLayer(f"transformers {kind.__name__}", module.num_attention_heads)


FAMILIES.append(landmark_layer)
