"""Hiera's mask-unit attention (transformers and timm), assembled (a :mod:`.pieces` family).

Hiera unrolls its tokens before the first block (transformers' ``unroll``, timm's ``Unroll``),
so that every layer is given its ``L`` tokens in *unrolled order*, in which mask unit ``w`` of
the ``U`` units holds the tokens ``i * U + w`` (``i < T = L / U``: a strided set, not a run).
One attention call (``HieraMaskUnitAttention``, timm ``MaskUnitAttention``) computes a softmax
``(batch, heads, U, Tq, T)``: query slot ``j`` of unit ``w`` over the unit's ``T`` keys. A
layer with query pooling (``query_stride`` / ``q_stride`` ``s > 1``: the first layer of a
pooled stage) max-pools its queries, ``Tq = T / s``: pooled query ``j`` of unit ``w`` is
output token ``o = j * U + w`` of the ``L / s`` the layer returns (the maximum over input
tokens ``o + r * L / s``). Global layers are the same with ``U = 1`` (transformers keeps the
unit axis; timm drops it and computes ``(batch, heads, Tq, L)``).

Stored, per layer call: ``(batch, heads, L / s, L)``, in the **layer's own token order** (the
order of the hidden states it is given for keys, of the tokens it returns for queries):
``dense[b, h, j * U + w, i * U + w] = P[b, h, w, j, i]``, exact zeros on every key outside the
query's unit. That order, not the image's raster order, because it is the one every other
tensor of the layer speaks (its input, its output, its values: ``dense @ v`` is the layer's
output before its projection, token for token), and because in MAE mode (masked units dropped)
the layer's tokens are not a whole image. :func:`hiera_token_positions` gives the raster
position of each token of a layer's order (as Qwen2.5-VL's ``qwen25_vision_positions`` does),
to read a map on the image grid: ``a[..., :, keys_pos.argsort()]`` and likewise for queries.

Values (``keep_values``): ``v`` of the layer's ``qkv`` projection ``(batch, heads, L, d)``, in the
same order. The weights are the softmax's output in the layer's input dtype; the fused (sdpa)
path of timm is recomputed from its own query and key by PyTorch's reference formula.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._torch_private import no_function_modes
from ..keep.protocol import CallSources
from .pieces import FAMILIES, Assembly, PieceCall, PiecedLayer
from .value_tap import SeenValues, seen_outputs
from .routes.sdpa import sdpa_attention_weights

__all__ = ["MaskUnitLayer", "mask_unit_layer", "place_unit_rows", "hiera_token_positions"]

# The mask-unit attention classes read: (module, class name) -> (family, heads attribute, stride attribute).
_KNOWN = {
    ("transformers.models.hiera.modeling_hiera", "HieraMaskUnitAttention"):
        ("transformers Hiera", "num_heads", "query_stride"),
    ("timm.models.hiera", "MaskUnitAttention"): ("timm Hiera", "heads", "q_stride"),
}


def place_unit_rows(weights: torch.Tensor, tokens: int, rows: torch.Tensor,
                    heads: Optional[Sequence[int]] = None, keys: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Places a mask-unit softmax at the layer's token positions, for the given query rows only.

    Args:
        weights: ``(batch, heads, U, Tq, T)``; key slot ``i`` of unit ``w`` is token ``i * U + w``
            of the ``L = U * T`` keys, query slot ``j`` of unit ``w`` is query ``j * U + w``.
        tokens: ``L``.
        rows: absolute query positions ``(R,)`` (long), each ``< U * Tq``.
        heads, keys: only these heads / keys (``None``: all).

    Returns:
        ``(batch, heads, R, L)`` (or the selected heads and keys), in ``weights``' dtype, exact
        zeros on the keys of other units.

    Example:
        >>> w = torch.softmax(torch.randn(1, 1, 2, 1, 2), -1)  # L = 4 in 2 units; queries pooled to 1 a unit
        >>> a = place_unit_rows(w, 4, torch.arange(2))
        >>> bool((a[0, 0, 1, 1::2] == w[0, 0, 1, 0]).all()), a[0, 0, 1, 0::2].tolist()
        (True, [0.0, 0.0])
    """
    batch, _, units, _, per_unit = weights.shape
    if heads is not None:
        weights = weights.index_select(1, torch.as_tensor(list(heads), device=weights.device))
    rows = rows.to(weights.device)
    unit, slot = rows % units, rows // units
    picked = weights[:, :, unit, slot]  # (B, h, R, T)
    out = weights.new_zeros(batch, picked.shape[1], rows.shape[0], tokens)
    key = torch.arange(per_unit, device=rows.device)[None, :] * units + unit[:, None]  # (R, T)
    out.scatter_(-1, key[None, None].expand_as(picked), picked)
    if keys is not None:
        out = out.index_select(-1, torch.as_tensor(list(keys), device=out.device))
    return out  # (B, h, R, L)


def hiera_token_positions(size: Sequence[int], schedule: Sequence[Sequence[int]]) -> torch.Tensor:
    """The raster position ``y * W + x`` of each token of a Hiera layer's order: ``(H * W,)`` long.

    Hiera's unroll cuts the ``H x W`` token grid by each stride ``(sy, sx)`` of ``schedule`` in turn,
    the offsets inside a stride going first (outermost); a stage with ``k`` poolings done has the
    schedule's first ``k`` entries consumed and a grid ``(H / sy**k, W / sx**k)``. For transformers,
    ``size`` and ``schedule`` of stage ``i`` are ``model.encoder.schedule[i]`` reversed
    (``schedule, size = encoder.schedule[i]``): a layer's keys are in its input's stage order, the
    queries of a pooling layer (the first of stage ``i > 0`` up to ``num_query_pool``) in stage ``i``'s.

    Args:
        size: ``(H, W)`` tokens of the grid (each divisible by the product of the strides applied to it).
        schedule: the strides still to undo, first applied first.

    Returns:
        ``positions[t]``: the raster position of the layer's token ``t``; a stored map reads on the
        grid as ``grid[..., positions[:, None], positions[None, :]] = a`` (square layers).

    Example:
        >>> hiera_token_positions((4, 4), [(2, 2)]).tolist()
        [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]
    """
    height, width = (int(n) for n in size)
    grid = torch.arange(height * width).view(1, height, width)  # (groups, h, w): raster ids
    for sy, sx in schedule:
        groups, h, w = grid.shape
        if h % sy or w % sx:
            raise ValueError(f"a {h}x{w} token grid cannot be cut by a stride of {sy}x{sx}: expected divisible sizes")
        # (groups, h/sy, sy, w/sx, sx) -> (groups, sy, sx, h/sy, w/sx): each stride offset is a group of its own
        grid = grid.view(groups, h // sy, sy, w // sx, sx).permute(0, 2, 4, 1, 3).reshape(groups * sy * sx, h // sy,
                                                                                           w // sx)
    return grid.reshape(-1)


class _MaskUnitCall(PieceCall):
    """One call of a Hiera mask-unit attention layer: its input, and a reference to its one piece."""

    def __init__(self, family: str, module: nn.Module, hidden: torch.Tensor, heads: int, stride: int, units: int,
                 seen: Optional[SeenValues] = None):
        self.family, self.module, self.hidden = family, module, hidden
        self.seen = seen  # what the layer's qkv returned in this call (keep_values), never computed again
        self.batch, self.tokens = hidden.shape[:2]
        self.heads, self.stride, self.units = heads, stride, units
        self.per_unit = self.tokens // units
        self.queries = self.per_unit // stride  # per unit
        self.weights: Optional[torch.Tensor] = None  # (B, H, U, Tq, T)
        self.sdpa: Optional[dict] = None

    def _expected(self) -> Tuple[int, ...]:
        return (self.batch, self.heads, self.units, self.queries, self.per_unit)

    def _unexpected(self, what: str) -> str:
        return (f"{what} inside a {self.family} layer, whose one piece is its mask-unit attention (batch, heads, "
                f"units, query, key) = {self._expected()}: an unknown piece, so the call is not assembled")

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        shape = tuple(result.shape)
        if self.weights is None and self.sdpa is None:
            if shape == self._expected():
                self.weights = result
                return None
            if self.units == 1 and shape == self._expected()[:2] + self._expected()[3:]:  # timm's global path
                self.weights = result.unsqueeze(2)
                return None
        return self._unexpected(f"a softmax of shape {shape}")

    def take_sdpa(self, call: dict) -> Optional[str]:
        query, key = call.get("query"), call.get("key")
        what = (f"a scaled_dot_product_attention call (query {tuple(getattr(query, 'shape', ()))}, key "
                f"{tuple(getattr(key, 'shape', ()))})")
        if self.weights is not None or self.sdpa is not None \
                or not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
            return self._unexpected(what)
        if call.get("attn_mask") is not None or call.get("is_causal"):
            return self._unexpected(what + " with a mask")
        b, h, u, tq, t = self._expected()
        if query.dim() == 4 and u == 1:
            query, key = query.unsqueeze(2), key.unsqueeze(2)
        if query.dim() != 5 or tuple(query.shape[:4]) != (b, h, u, tq) or tuple(key.shape[:4]) != (b, h, u, t):
            return self._unexpected(what)
        self.sdpa = dict(query=query, key=key, scale=call.get("scale"))
        return None

    def _weights(self) -> torch.Tensor:
        """``(B, H, U, Tq, T)``: the softmax seen, or the sdpa call's weights by the reference formula."""
        if self.weights is not None:
            return self.weights
        b, h, u, tq, t = self._expected()
        query, key = self.sdpa["query"], self.sdpa["key"]
        flat = sdpa_attention_weights(query.reshape(b, h * u, tq, -1), key.reshape(b, h * u, t, -1),
                                      None, False, self.sdpa["scale"])  # (B, H*U, Tq, T)
        return flat.view(b, h, u, tq, t)

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        if self.weights is None and self.sdpa is None:
            return (f"the {self.family} layer's mask-unit attention was not seen in its call, so its map cannot be "
                    "assembled and it is not stored")
        dtype = self.hidden.dtype if self.hidden.is_floating_point() else torch.float32
        value = None
        if keep_values:
            value = self._values()
            if isinstance(value, str):
                return value
        with torch.no_grad(), no_function_modes():  # the capture's own arithmetic: no mode sees it
            weights = self._weights()
        tokens = self.tokens

        def rows(heads, chosen: torch.Tensor, keys) -> torch.Tensor:
            with torch.no_grad(), no_function_modes():
                return place_unit_rows(weights, tokens, chosen, heads, keys).to(dtype)

        return Assembly(self.batch, self.heads, self.units * self.queries, tokens, dtype, rows,
                        CallSources(value=value))

    def _values(self) -> Union[torch.Tensor, str]:
        """``(B, H, L, d)``: the layer's value vectors in its token order (the third part of what its
        ``qkv`` projection returned in the call), or why they cannot be read."""
        outputs = seen_outputs(self.seen, "qkv", 1, self.family)
        if isinstance(outputs, str):
            return outputs
        qkv, b, n = outputs[0], self.batch, self.tokens
        if qkv.dim() != 3 or tuple(qkv.shape[:2]) != (b, n) or qkv.shape[2] % (3 * self.heads):
            return (f"keep_values on a {self.family} layer whose qkv projection returned {tuple(qkv.shape)}, not "
                    f"({b}, {n}, 3 x heads x head_dim), so its values cannot be read and the call is not stored "
                    "(capture it without keep_values)")
        return qkv.reshape(b, n, 3, self.heads, -1)[:, :, 2].transpose(1, 2)


class MaskUnitLayer(PiecedLayer):
    """The rule of a Hiera mask-unit attention module: reads each call's hidden states ``(batch, L, width)``
    and the module's ``window_size`` (tokens of a unit after pooling), stride and ``use_mask_unit_attn``."""

    value_modules = ("qkv",)

    def __init__(self, family: str, heads_name: str, stride_name: str):
        self.family, self._heads, self._stride = family, heads_name, stride_name

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return (f"a {self.family} layer called without hidden states (batch, tokens, width): its mask units "
                    "cannot be counted, so its map is not assembled")
        heads, stride = getattr(module, self._heads, None), getattr(module, self._stride, None)
        window, masked = getattr(module, "window_size", None), getattr(module, "use_mask_unit_attn", None)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (heads, stride, window)) \
                or not isinstance(masked, bool) or heads <= 0 or stride <= 0:
            return (f"a {self.family} layer whose {self._heads}, {self._stride}, window_size and use_mask_unit_attn "
                    f"are {heads!r}, {stride!r}, {window!r}, {masked!r} at its call: its mask units cannot be read, "
                    "so its map is not assembled")
        tokens = hidden.shape[1]
        unit = stride * window if masked else tokens
        if unit <= 0 or tokens % unit or unit % stride:
            return (f"a {self.family} layer given {tokens} tokens with mask units of {unit} (query stride {stride}): "
                    "the tokens are not whole units, so its map is not assembled")
        return _MaskUnitCall(self.family, module, hidden, heads, stride, tokens // unit, self.seen_values())


def mask_unit_layer(module: nn.Module, parents=None) -> Optional[MaskUnitLayer]:
    """The rule of a transformers ``HieraMaskUnitAttention`` or timm ``MaskUnitAttention`` module, or ``None``."""
    found = _KNOWN.get((type(module).__module__, type(module).__name__))
    if found is None or not isinstance(getattr(module, "qkv", None), nn.Module):  # a wrapped projection (LoRA) too
        return None
    return MaskUnitLayer(*found)


FAMILIES.append(mask_unit_layer)
