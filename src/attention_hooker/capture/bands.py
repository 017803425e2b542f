"""Longformer's sliding-window attention with global tokens, assembled (a :mod:`.pieces` family).

``LongformerSelfAttention`` and LED's ``LEDEncoderSelfAttention`` (the same code) compute one
layer call's attention in two softmaxes over a sequence the model padded to ``L`` tokens, a
multiple of ``attention_window``:

* the **local** softmax ``(batch, L, heads, G + 2w + 1)`` (``w = one_sided_attn_window_size``,
  ``G`` the most global tokens of any batch row): columns ``0..G-1`` are the ``k``-th global
  token of the row (in position order; columns past the row's own count are filler at
  ``finfo.min``, exactly 0), columns ``G + c`` the key ``i - w + c`` (``-inf`` off the
  sequence; global and padding keys get ``finfo.min``, so a global key is counted once, in
  its global column). Rows of padding and of global queries are not used by the model;
* the **global** softmax ``(batch * heads, G, L)``, only when some token is global: the
  global rows, from the separate ``query_global``/``key_global`` projections over every key
  (padding at ``finfo.min``); rows past a batch row's own count are filler (uniform), never placed.

Stored, per layer call: ``(batch, heads, T, T)`` where ``dense[b, h, i, j]`` is what query ``i``
put on key ``j``: the band and global columns for local rows, the global softmax for global
rows, exact zeros for keys never attended and for padded query rows. ``T`` is the caller's
tokens: the model's own padding to a multiple of ``attention_window`` is cropped when the
encoder's ``padding_len`` can be read (from the running ``forward`` of the encoder, where both
Longformer and LED keep it) and those positions are all masked; otherwise ``T = L`` and the
model's padding stays as zero rows and columns. The weights are the softmax outputs (before
dropout), in the dtype the model multiplies them in.

Values: local rows multiply ``value(x)``, global rows ``value_global(x)``. With ``keep_values``,
a call without global tokens keeps ``value(x)`` ``(batch, heads, T, head_dim)``, what the layer's
``value`` returned to it in the call (:mod:`.value_tap`: the model calls it on ``x`` transposed,
``(L, batch, width)``); a call with global tokens is refused (two value sets where a capture keeps one).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .._torch_private import caller_frame, frame_local, no_function_modes
from ..keep.protocol import CallSources
from .pieces import FAMILIES, Assembly, PieceCall, PiecedLayer
from .value_tap import SeenValues, seen_outputs

__all__ = ["LongformerLayer", "longformer_layer", "place_band_rows"]

# Frames walked up from a layer's call looking for its encoder's forward (padding_len).
_FRAMES_TO_ENCODER = 40


def place_band_rows(local: torch.Tensor, glob: Optional[torch.Tensor], is_global: torch.Tensor,
                    is_masked: torch.Tensor, window: int, rows: torch.Tensor, tokens: int,
                    heads: Optional[Sequence[int]] = None, keys: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Places Longformer's pieces at their true positions, for the given query rows only.

    Args:
        local: the local softmax ``(batch, L, heads, G + 2 * window + 1)``.
        glob: the global softmax as ``(batch, heads, G, L)``, or ``None`` (no global token).
        is_global, is_masked: ``(batch, L)`` booleans: global tokens, padding.
        window: ``w``, the one-sided window.
        rows: absolute query positions ``(R,)`` (long), each ``< tokens``.
        tokens: ``T <= L``, the keys kept (the first ``T`` positions).
        heads, keys: only these heads / key positions (``None``: all).

    Returns:
        ``(batch, heads, R, T)`` (or the selected heads and keys), in ``local``'s dtype.

    Example:
        >>> local = torch.softmax(torch.randn(1, 4, 1, 3), -1)  # w = 1, no global token
        >>> none = torch.zeros(1, 4, dtype=torch.bool)
        >>> a = place_band_rows(local, None, none, none, 1, torch.arange(4), 4)
        >>> bool((a[0, 0, 1, :3] == local[0, 1, 0]).all()), a[0, 0, 0, 0].item() == local[0, 0, 0, 1].item()
        (True, True)
    """
    batch, _, all_heads, columns = local.shape
    g = columns - (2 * window + 1)
    device = rows.device
    if heads is not None:
        index = torch.as_tensor(list(heads), device=local.device)
        local = local.index_select(2, index)
        glob = None if glob is None else glob.index_select(1, index)
    n_heads = local.shape[2]
    picked = local.index_select(1, rows)  # (B, R, h, G + 2w + 1)
    out = local.new_zeros(batch, n_heads, rows.shape[0], tokens + 1)  # the last column catches what is dropped
    band = picked[..., g:].permute(0, 2, 1, 3)  # (B, h, R, 2w + 1)
    key = rows[:, None] + torch.arange(-window, window + 1, device=device)[None, :]  # (R, 2w + 1)
    key = torch.where((key >= 0) & (key < tokens), key, torch.full_like(key, tokens))
    out.scatter_(-1, key[None, None].expand_as(band), band)  # off-sequence cells are exact 0 (-inf)
    if g > 0:
        count = is_global.sum(1)  # (B,)
        rank = torch.arange(g, device=device)[None, :]
        # where the k-th global column of each batch row goes: its k-th global token (filler -> dropped)
        position = torch.full((batch, g), tokens, dtype=torch.long, device=device)
        found = is_global.nonzero(as_tuple=False)  # (n, 2), row-major: per batch row in position order
        order = torch.cumsum(is_global.long(), 1) - 1  # (B, L): a global token's rank in its row
        position[found[:, 0], order[found[:, 0], found[:, 1]]] = found[:, 1]
        position = torch.where((rank < count[:, None]) & (position < tokens), position, torch.full_like(position, tokens))
        columns_g = picked[..., :g].permute(0, 2, 1, 3)  # (B, h, R, G)
        out.scatter_add_(-1, position[:, None, None, :].expand_as(columns_g), columns_g)  # the band is 0 there
        if glob is not None:
            which = is_global.index_select(1, rows)  # (B, R): global query rows
            b, r = which.nonzero(as_tuple=True)
            k = order[b, rows[r]]
            out[b, :, r, :tokens] = glob[b, :, k, :tokens].to(out.dtype)  # (n, h, T): the second softmax
            out[b, :, r, tokens] = 0
    out.masked_fill_(is_masked.index_select(1, rows)[:, None, :, None], 0.0)  # padded queries
    out = out[..., :tokens]
    if keys is not None:
        out = out.index_select(-1, torch.as_tensor(list(keys), device=out.device))
    return out


class _LongformerCall(PieceCall):
    """One call of a Longformer self-attention layer: its masks, and references to its two softmaxes."""

    def __init__(self, module: nn.Module, hidden: torch.Tensor, is_masked: torch.Tensor, is_global: torch.Tensor,
                 has_global: bool, tokens: int, family: str, seen: Optional[SeenValues] = None):
        self.module, self.family, self.seen = module, family, seen
        self.hidden = hidden  # (B, L, C): its dtype is the map's
        self.is_masked, self.is_global, self.has_global = is_masked, is_global, has_global
        self.batch, self.length = is_masked.shape
        self.heads = int(module.num_heads)
        self.window = int(module.one_sided_attn_window_size)
        self.globals = int(is_global.sum(1).max()) if has_global else 0
        self.tokens = tokens
        self.local: Optional[torch.Tensor] = None
        self.glob: Optional[torch.Tensor] = None

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        b, l, h, g, w = self.batch, self.length, self.heads, self.globals, self.window
        if self.local is None and tuple(result.shape) == (b, l, h, g + 2 * w + 1):
            self.local = result
            return None
        if self.has_global and self.glob is None and tuple(result.shape) == (b * h, g, l):
            self.glob = result.view(b, h, g, l)
            return None
        return (f"a softmax of shape {tuple(result.shape)} inside a Longformer layer, whose pieces are the band "
                f"({b}, {l}, {h}, {g + 2 * w + 1})" + (f" and the global rows ({b * h}, {g}, {l})" if self.has_global
                                                      else "") + ": an unknown piece, so the call is not assembled")

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        if self.local is None or (self.has_global and self.glob is None):
            missing = "band" if self.local is None else "global-row"
            return (f"the Longformer layer's {missing} softmax was not seen in its call, so its map cannot be "
                    "assembled and it is not stored")
        value = None
        if keep_values:
            if self.has_global:
                return ("keep_values on a Longformer layer called with global tokens: its global rows multiply "
                        "value_global(x) and its other rows value(x), two value sets where a capture keeps one, so "
                        "the call is not stored (capture it without keep_values)")
            outputs = seen_outputs(self.seen, "value", 1, self.family)
            if isinstance(outputs, str):
                return outputs
            projected, (b, l) = outputs[0], (self.batch, self.length)  # the model's value(x.transpose(0, 1))
            if projected.dim() != 3 or tuple(projected.shape[:2]) != (l, b) or projected.shape[2] % self.heads:
                return (f"keep_values on a {self.family} layer whose value projection returned "
                        f"{tuple(projected.shape)}, not ({l}, {b}, heads x head_dim) for its transposed hidden states, "
                        "so its values cannot be read and the call is not stored (capture it without keep_values)")
            value = projected.view(l, b, self.heads, -1).permute(1, 2, 0, 3)[:, :, :self.tokens]  # (B, h, T, d)
        dtype = self.hidden.dtype if self.hidden.is_floating_point() else self.local.dtype
        local, glob = self.local, self.glob

        def rows(heads, chosen: torch.Tensor, keys) -> torch.Tensor:
            with torch.no_grad(), no_function_modes():  # the capture's own arithmetic: no mode sees it
                placed = place_band_rows(local, glob, self.is_global, self.is_masked, self.window,
                                         chosen.to(local.device), self.tokens, heads, keys)
            return placed.to(dtype)

        return Assembly(self.batch, self.heads, self.tokens, self.tokens, dtype, rows, CallSources(value=value))


class LongformerLayer(PiecedLayer):
    """The rule of a Longformer (or LED encoder) self-attention module: reads each call's masks
    from the keyword arguments its encoder passes (``is_index_masked``, ``is_index_global_attn``,
    ``is_global_attn``) and the model's padding from the encoder's running ``forward``."""

    value_modules = ("value",)  # value_global only multiplies global rows, whose calls keep no values

    def __init__(self, family: str):
        self.family = family

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        hidden = args[0] if args else kwargs.get("hidden_states")
        is_masked, is_global = kwargs.get("is_index_masked"), kwargs.get("is_index_global_attn")
        has_global = kwargs.get("is_global_attn")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not isinstance(is_masked, torch.Tensor) \
                or not isinstance(is_global, torch.Tensor) or has_global is None:
            return (f"a {self.family} layer called without hidden_states (batch, tokens, width) and the keyword "
                    "arguments is_index_masked, is_index_global_attn, is_global_attn its encoder passes: which "
                    "tokens are padding or global cannot be read, so its band is not assembled")
        if tuple(is_masked.shape) != tuple(hidden.shape[:2]) or tuple(is_global.shape) != tuple(hidden.shape[:2]):
            return (f"a {self.family} layer called with masks {tuple(is_masked.shape)} / {tuple(is_global.shape)} "
                    f"for hidden states {tuple(hidden.shape)}: they do not say which of its tokens are padding or "
                    "global, so its band is not assembled")
        length = hidden.shape[1]
        return _LongformerCall(module, hidden, is_masked.bool(), is_global.bool(), bool(has_global),
                               length - _model_padding(is_masked, length), self.family, self.seen_values())


def _model_padding(is_masked: torch.Tensor, length: int) -> int:
    """The tokens the model added to reach a multiple of ``attention_window``: the ``padding_len`` of the
    nearest running ``forward`` that has one (Longformer's and LED's encoders do), when those last
    positions are masked in every batch row; 0 when it cannot be read (the padding is then kept)."""
    frame = caller_frame(1)
    for _ in range(_FRAMES_TO_ENCODER):
        if frame is None:
            return 0
        code = frame.f_code  # a local a closure reads is a cell variable, not in co_varnames (LED's encoder)
        if code.co_name == "forward" and ("padding_len" in code.co_varnames or "padding_len" in code.co_cellvars):
            padding = frame_local(frame, "padding_len")
            if isinstance(padding, int) and 0 < padding < length and bool(is_masked[:, length - padding:].all()):
                return padding
            return 0
        frame = frame.f_back
    return 0


def longformer_layer(module: nn.Module, parents=None) -> Optional[LongformerLayer]:
    """The rule of a transformers Longformer-style self-attention module (``one_sided_attn_window_size``
    and the ``query_global``/``key_global``/``value_global`` projections), or ``None``."""
    kind = type(module)
    if not kind.__module__.startswith("transformers.") or not isinstance(
            getattr(module, "one_sided_attn_window_size", None), int):
        return None
    if not all(isinstance(getattr(module, name, None), nn.Module)
               for name in ("query", "key", "value", "query_global", "key_global", "value_global")):
        return None
    if not isinstance(getattr(module, "num_heads", None), int):
        return None
    return LongformerLayer(f"transformers {kind.__name__}")


FAMILIES.append(longformer_layer)
