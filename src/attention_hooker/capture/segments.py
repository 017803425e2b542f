"""Qwen2-VL and Qwen2.5-VL vision attention: one call per image, frame or window, assembled (a :mod:`.pieces` family).

The towers written the same way (Qwen3-VL, Qwen3.5, GLM-4V, GLM-OCR, LLaVA-OneVision-1.5, ...; listed in
``_KNOWN``) are read by the same rule.

The vision tower packs every image of a forward into one unbatched sequence ``hidden_states
(S, C)``; its attention module (``VisionAttention``, ``Qwen2_5_VLVisionAttention``) cuts the
sequence at ``cu_seqlens`` (a keyword argument of each call: the running sum of the segment
lengths) and makes **one attention call per segment**, in order, with no mask: a softmax of
``(1, heads, L_i, L_i)`` (eager) or an ``F.scaled_dot_product_attention`` of ``(1, heads, L_i,
head_dim)`` (sdpa). A segment is one frame of an image or video (``t`` frames of ``h * w``
patches each give ``t`` segments) or, in Qwen2.5-VL's windowed blocks, one window of the merged
grid. No segment sees another.

Stored, per layer call: ``(1, heads, S, S)``, block-diagonal: segment ``i`` starting at
``o_i = L_0 + ... + L_{i-1}`` is placed at ``[o_i : o_i + L_i, o_i : o_i + L_i]``, exact zeros
everywhere else (keys of other segments were never attended). The call is refused when its
pieces are not exactly one square, unmasked call per segment of ``cu_seqlens`` adding up to
``S``. A query row lives in one segment, so ``rows=`` costs those rows of their segment only.

Positions are the layer's: the order of ``hidden_states``, which is what every block's hidden
states use. For Qwen2-VL that is the processor's patch order (grouped by merge cells, not row
major). Qwen2.5-VL's tower runs every block in *window order* (its merge groups permuted by the
``window_index`` it computes from ``grid_thw``, undone only after the merger):
:func:`qwen25_vision_positions` gives the input patch each layer position holds.

The weights are those of the softmax (eager) or those PyTorch's documented reference formula
gives for the sdpa call's own query and key, in the dtype of the layer's hidden states.
Values (``keep_values``): ``v`` of what the module's ``qkv`` projection returned to it in the call
(:mod:`.value_tap`), ``(1, heads, S, head_dim)``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .._torch_private import no_function_modes
from ..keep.protocol import CallSources
from .value_tap import SeenValues, seen_outputs
from .pieces import FAMILIES, Assembly, PieceCall, PiecedLayer
from .routes.sdpa import sdpa_attention_weights

__all__ = ["SegmentedVisionLayer", "segmented_vision_layer", "place_segment_rows", "qwen25_vision_positions"]

# The attention modules of these vision towers (module, class name), whose calls are one per segment.
_KNOWN = {
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention"): "transformers Qwen2-VL vision attention",
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention"):
        "transformers Qwen2.5-VL vision attention",
    # Towers written the same way (fused qkv of 3 x heads, one unmasked call per cu_seqlens segment).
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention"):
        "transformers Qwen3-VL vision attention",
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionAttention"):
        "transformers Qwen3-VL-MoE vision attention",
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5VisionAttention"): "transformers Qwen3.5 vision attention",
    ("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeVisionAttention"):
        "transformers Qwen3.5-MoE vision attention",
    ("transformers.models.qwen4_exp.modeling_qwen4_exp", "Qwen4ExpVisionAttention"):
        "transformers Qwen4-Exp vision attention",
    ("transformers.models.glm4v.modeling_glm4v", "Glm4vVisionAttention"): "transformers GLM-4V vision attention",
    ("transformers.models.glm4v_moe.modeling_glm4v_moe", "Glm4vMoeVisionAttention"):
        "transformers GLM-4V-MoE vision attention",
    ("transformers.models.glm_ocr.modeling_glm_ocr", "GlmOcrVisionAttention"): "transformers GLM-OCR vision attention",
    ("transformers.models.glm_image.modeling_glm_image", "GlmImageVisionAttention"):
        "transformers GLM-Image vision attention",
    ("transformers.models.glm5_next.modeling_glm5_next", "Glm5NextVisionAttention"):
        "transformers GLM-5-Next vision attention",
    ("transformers.models.llava_onevision1_5.modeling_llava_onevision1_5", "LlavaOnevision15VisionAttention"):
        "transformers LLaVA-OneVision-1.5 vision attention",
    ("transformers.models.cohere_compass.modeling_cohere_compass", "CohereCompassVisionAttention"):
        "transformers Cohere Compass vision attention",
}


def place_segment_rows(segments: Sequence, lengths: Sequence[int], rows: torch.Tensor,
                       heads: Optional[Sequence[int]] = None, keys: Optional[Sequence[int]] = None,
                       dtype: Optional[torch.dtype] = None, all_heads: Optional[int] = None) -> torch.Tensor:
    """Places per-segment maps block-diagonally, for the given query rows only.

    Only the segments the rows live in are visited (a tile of 256 rows of a tower of many
    images touches one or two of them), with one look at where the rows are.

    Args:
        segments: one per segment, in order: a ``(1, heads, L_i, L_i)`` map, or a function
            ``(heads, local_rows) -> (1, len(heads) or all, len(local_rows), L_i)`` making only those rows.
        lengths: ``L_i`` of each segment; the sequence has ``S = sum(lengths)`` positions.
        rows: absolute query positions ``(R,)`` (long), each ``< S``.
        heads, keys: only these heads / key positions (``None``: all).
        dtype: of the result (``None``: the first map's).
        all_heads: the layer's head count, for the empty result when no row is asked and every
            segment is a function (``None``: read from the first map).

    Returns:
        ``(1, heads, R, S)`` (or the selected heads and keys): row ``r`` holds its segment's row at
        that segment's key positions, exact zeros elsewhere.

    Example:
        >>> a, b = torch.full((1, 1, 2, 2), 0.5), torch.ones(1, 1, 1, 1)
        >>> place_segment_rows([a, b], [2, 1], torch.arange(3))[0, 0]
        tensor([[0.5000, 0.5000, 0.0000],
                [0.5000, 0.5000, 0.0000],
                [0.0000, 0.0000, 1.0000]])
    """
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + int(length))
    total = starts[-1]
    device = rows.device
    out = None
    index = None if heads is None else list(heads)
    bounds = torch.tensor(starts[1:], device=device)
    owner = torch.bucketize(rows, bounds, right=True)  # (R,): the segment each row lives in
    for i in torch.unique(owner).tolist():  # the segments holding a row, never all of them per tile
        piece = segments[i]
        picked = (owner == i).nonzero(as_tuple=True)[0]
        local = rows.index_select(0, picked) - starts[i]
        if callable(piece):
            block = piece(index, local)
        else:
            block = piece if index is None else piece.index_select(1, torch.as_tensor(index, device=piece.device))
            block = block.index_select(2, local.to(block.device))
        if out is None:
            out = block.new_zeros(1, block.shape[1], rows.shape[0], total, dtype=dtype or block.dtype)
        out[:, :, picked.to(out.device), starts[i]:starts[i + 1]] = block.to(out.dtype)
    if out is None:  # no row asked
        first = segments[0]
        n_heads = len(index) if index is not None else all_heads if all_heads is not None else \
            first.shape[1] if not callable(first) else None
        if n_heads is None:
            raise ValueError("place_segment_rows: no row asked of segments that are all functions, and neither "
                             "heads nor all_heads says how many heads the empty result has")
        out = torch.zeros(1, n_heads, 0, total, dtype=dtype or torch.float32)
    if keys is not None:
        out = out.index_select(-1, torch.as_tensor(list(keys), device=out.device))
    return out


class _SegmentsCall(PieceCall):
    """One call of a vision attention layer: its segments' softmaxes or sdpa calls, by reference."""

    def __init__(self, family: str, module: nn.Module, hidden: torch.Tensor, lengths: List[int],
                 seen: Optional[SeenValues] = None):
        self.family, self.module, self.hidden, self.seen = family, module, hidden, seen
        self.lengths = lengths  # from cu_seqlens
        self.heads = int(module.num_heads)
        self.pieces: list = []  # (1, H, L, L) softmax results, or parsed sdpa calls

    def _next_length(self) -> Optional[int]:
        return self.lengths[len(self.pieces)] if len(self.pieces) < len(self.lengths) else None

    def _unexpected(self, what: str) -> str:
        expected = self._next_length()
        wanted = ("no more attention call" if expected is None else
                  f"segment {len(self.pieces)} of cu_seqlens as (1, {self.heads}, {expected}, {expected}) "
                  "with no mask")
        return (f"{what} inside a {self.family} layer, where {wanted} was expected (one unmasked call per segment "
                f"of its cu_seqlens {self.lengths}): the call is not assembled")

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        length = self._next_length()
        if length is None or tuple(result.shape) != (1, self.heads, length, length):
            return self._unexpected(f"a softmax of shape {tuple(result.shape)}")
        self.pieces.append(result)
        return None

    def take_sdpa(self, call: dict) -> Optional[str]:
        length = self._next_length()
        query, key = call.get("query"), call.get("key")
        shapes = tuple(getattr(query, "shape", ())), tuple(getattr(key, "shape", ()))
        what = f"a scaled_dot_product_attention call (query {shapes[0]}, key {shapes[1]})"
        if length is None or not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) \
                or query.dim() != 4 or key.dim() != 4 or shapes[0][:3] != (1, self.heads, length) \
                or shapes[1][:3] != (1, self.heads, length):
            return self._unexpected(what)
        if call.get("attn_mask") is not None or call.get("is_causal"):
            return self._unexpected(what + " with a mask")
        self.pieces.append(call)
        return None

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        if len(self.pieces) != len(self.lengths):
            return (f"a {self.family} layer made {len(self.pieces)} attention calls for the {len(self.lengths)} "
                    f"segments of its cu_seqlens {self.lengths}: a segment's map is missing, so the call is not "
                    "assembled")
        total = self.hidden.shape[0]
        value = None
        if keep_values:
            outputs = seen_outputs(self.seen, "qkv", 1, self.family)
            if isinstance(outputs, str):
                return outputs
            qkv = outputs[0]  # what the layer computed: (S, 3 * C) -> v (1, H, S, d)
            if qkv.dim() != 2 or qkv.shape[0] != total or qkv.shape[1] % (3 * self.heads):
                return (f"keep_values on a {self.family} layer whose qkv projection returned {tuple(qkv.shape)}, not "
                        f"({total}, 3 x heads x head_dim), so its values cannot be read and the call is not stored "
                        "(capture it without keep_values)")
            value = qkv.reshape(total, 3, self.heads, -1)[:, 2].transpose(0, 1)[None]
        dtype = self.hidden.dtype
        segments = [piece if isinstance(piece, torch.Tensor) else _sdpa_rows(piece) for piece in self.pieces]
        lengths = list(self.lengths)

        def rows(heads, chosen: torch.Tensor, keys) -> torch.Tensor:
            with torch.no_grad(), no_function_modes():
                return place_segment_rows(segments, lengths, chosen, heads, keys, dtype, all_heads=self.heads)

        return Assembly(1, self.heads, total, total, dtype, rows, CallSources(value=value))


def _sdpa_rows(call: dict):
    """``(heads, local rows) -> (1, heads, rows, L)``: the sdpa call's weights at those rows only."""

    def make(heads, local: torch.Tensor) -> torch.Tensor:
        return sdpa_attention_weights(call["query"], call["key"], None, False, call.get("scale"),
                                      heads=heads, rows=local.tolist())

    return make


class SegmentedVisionLayer(PiecedLayer):
    """The rule of a Qwen2-VL / Qwen2.5-VL (or same-kind) vision attention module: reads each call's packed
    ``hidden_states (S, C)`` and the ``cu_seqlens`` its block passes."""

    value_modules = ("qkv",)

    def __init__(self, family: str):
        self.family = family

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        hidden = args[0] if args else kwargs.get("hidden_states")
        cu_seqlens = args[1] if len(args) > 1 else kwargs.get("cu_seqlens")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not isinstance(cu_seqlens, torch.Tensor) \
                or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            return (f"a {self.family} layer called without packed hidden_states (tokens, width) and cu_seqlens: "
                    "where each image or window starts cannot be read, so its map is not assembled")
        bounds = [int(b) for b in cu_seqlens.tolist()]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != hidden.shape[0] or any(n <= 0 for n in lengths):
            return (f"a {self.family} layer called with cu_seqlens {bounds} for {hidden.shape[0]} tokens: its "
                    "segments do not add up to the sequence, so its map is not assembled")
        return _SegmentsCall(self.family, module, hidden, lengths, self.seen_values())


def segmented_vision_layer(module: nn.Module, parents=None) -> Optional[SegmentedVisionLayer]:
    """The rule of a Qwen2-VL / Qwen2.5-VL (or same-kind, ``_KNOWN``) vision attention module, or ``None``."""
    kind = type(module)
    family = _KNOWN.get((kind.__module__, kind.__name__))
    if family is None or not isinstance(getattr(module, "num_heads", None), int) \
            or not isinstance(getattr(module, "qkv", None), nn.Module):  # a wrapped projection (LoRA) too
        return None
    return SegmentedVisionLayer(family)


def qwen25_vision_positions(tower: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """The input patch each position of a Qwen2.5-VL vision block holds: ``(S,)`` long.

    Qwen2.5-VL's tower permutes its merge groups of ``spatial_merge_size ** 2`` patches into
    window order before its first block and undoes it only after the merger, so every block's
    map (and ``last_hidden_state``) is over positions in that order. Position ``p`` of a stored
    map ``(1, heads, S, S)`` holds input patch ``positions[p]`` (the order the processor's
    ``pixel_values`` rows come in): ``a_in[..., positions[:, None], positions[None, :]] = a``
    reads the map in input order.

    Args:
        tower: the vision tower (``Qwen2_5_VisionTransformerPretrainedModel``, ``model.visual``).
        grid_thw: ``(images, 3)``: frames, height and width in patches, as given to the tower.
    """
    from transformers.vision_utils import get_vision_window_index

    merge = int(tower.spatial_merge_size)
    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=merge, window_size=int(tower.window_size),
                                              patch_size=int(tower.patch_size))
    unit = merge ** 2
    return (window_index.long()[:, None] * unit + torch.arange(unit, device=window_index.device)).reshape(-1)


FAMILIES.append(segmented_vision_layer)
