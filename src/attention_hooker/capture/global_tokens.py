"""PEGASUS-X's global-local encoder attention, assembled (a :mod:`.pieces` family).

``PegasusXGlobalLocalAttention`` is called with two sequences: ``Lp`` layer tokens (the input's
``L`` tokens, padded by the encoder at the end to a multiple of ``block_size``, and on *staggered*
layers by ``block_size // 2`` more at both ends, all masked at ``finfo.min``) and ``G`` global
tokens (learned embeddings ``embed_global``, carried through the layers with their own residual
stream). One call makes two softmaxes:

1. the global rows ``(batch, heads, G, G + Lp)``: each global token over ``[globals; layer tokens]``;
2. the local rows ``(batch, heads, nb, bs, G + bs)``: each token over ``[globals; its own block]``.

Both multiply the values ``[v(globals); v(layer tokens)]``, so the layer has one square map over
its ``G + Lp`` positions. The global tokens are positions of the layer (each has its hidden state,
query, key and value), not aggregates of tokens, so nothing is refused; they are kept where the
model puts them, first. Stored, per layer call: ``(batch, heads, G + L, G + L)``, position ``g < G``
the ``g``-th global token, position ``G + t`` the input's token ``t`` (the model's padding, stagger
included, cropped: each layer's positions are the same input tokens, so maps of staggered and
other layers line up); exact zeros for keys outside a token's block (and on padding keys).
:func:`pegasus_x_labels` gives the axes their labels. ``rows="last"`` is the last token.

The shift of a staggered layer is read from the encoder layer that calls the module
(``stagger_blocks_this_layer``, ``block_size``), ``L`` from the encoder's running ``forward``
(its ``seq_len``); when ``L`` cannot be read, the block padding at the end is kept (zero rows and
columns past the input). Values (``keep_values``): ``[v(globals); v(tokens)]`` ``(batch, heads,
G + L, d)``, what the layer's ``v_proj`` returned to it in the call (:mod:`.value_tap`: the tokens
first, then the globals), never made again. The weights are the softmaxes' output (before
dropout), in the dtype of the layer's input.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .._torch_private import caller_frame, frame_local, no_function_modes
from ..keep.protocol import CallSources
from .value_tap import SeenValues, seen_outputs
from .pieces import FAMILIES, Assembly, PieceCall, PiecedLayer

__all__ = ["GlobalLocalLayer", "global_local_layer", "place_global_local_rows", "pegasus_x_labels"]

# Frames walked up from a layer's call looking for its encoder's forward (seq_len).
_FRAMES_TO_ENCODER = 40


def place_global_local_rows(glob: torch.Tensor, local: torch.Tensor, shift: int, tokens: int, rows: torch.Tensor,
                            heads: Optional[Sequence[int]] = None,
                            keys: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Places PEGASUS-X's two softmaxes into the map over ``[G globals; tokens]``, for the given rows only.

    Args:
        glob: the global rows ``(batch, heads, G, G + Lp)`` (keys: ``G`` globals, then the ``Lp`` layer tokens).
        local: the local rows ``(batch, heads, nb, bs, G + bs)`` (keys: the globals, then the query's block).
        shift: layer tokens before the input's first token (``block_size // 2`` on a staggered layer, else 0).
        tokens: ``T``, the input tokens kept: layer token ``shift + t`` is stored at ``G + t`` (``shift + T <= Lp``).
        rows: absolute query positions ``(R,)`` (long) of the ``G + T``.
        heads, keys: only these heads / positions (``None``: all).

    Returns:
        ``(batch, heads, R, G + T)`` (or the selected heads and keys), in ``glob``'s dtype.

    Example:
        >>> glob = torch.softmax(torch.randn(1, 1, 1, 5), -1)  # G = 1, Lp = 4
        >>> local = torch.softmax(torch.randn(1, 1, 2, 2, 3), -1)  # blocks of 2
        >>> a = place_global_local_rows(glob, local, 0, 4, torch.arange(5))
        >>> bool((a[0, 0, 0] == glob[0, 0, 0]).all()), bool((a[0, 0, 3, 3:] == local[0, 0, 1, 0, 1:]).all())
        (True, True)
        >>> a[0, 0, 3, 1:3].tolist()  # token 2 does not see the block of tokens 0 and 1
        [0.0, 0.0]
    """
    batch, _, g, positions = glob.shape
    bs = local.shape[3]
    if heads is not None:
        index = torch.as_tensor(list(heads), device=glob.device)
        glob, local = glob.index_select(1, index), local.index_select(1, index)
    rows = rows.to(glob.device)
    out = glob.new_zeros(batch, glob.shape[1], rows.shape[0], positions)  # in the layer's positions
    is_global = rows < g
    if bool(is_global.any()):
        out[:, :, is_global] = glob[:, :, rows[is_global]]
    token = shift + rows[~is_global] - g  # layer token of each token row
    if token.numel():
        which, slot = token // bs, token % bs
        picked = local[:, :, which, slot]  # (B, h, r, G + bs)
        placed = out.new_zeros(batch, out.shape[1], token.shape[0], positions)
        placed[..., :g] = picked[..., :g]
        key = g + which[:, None] * bs + torch.arange(bs, device=rows.device)[None, :]  # (r, bs)
        placed.scatter_(-1, key[None, None].expand(batch, out.shape[1], -1, -1), picked[..., g:])
        out[:, :, ~is_global] = placed
    kept = torch.cat([torch.arange(g, device=rows.device), g + shift + torch.arange(tokens, device=rows.device)])
    if keys is not None:
        kept = kept[torch.as_tensor(list(keys), device=rows.device)]
    return out.index_select(-1, kept)


def pegasus_x_labels(tokens: Sequence[str], num_global_tokens: int) -> List[str]:
    """Labels of both axes of a PEGASUS-X encoder layer's map ``(batch, heads, G + L, G + L)``: the ``G``
    global tokens, then the input's tokens (pass as ``tokens=`` to the views).

    Example:
        >>> pegasus_x_labels(["a", "b"], 2)
        ['[global 0]', '[global 1]', 'a', 'b']
    """
    return [f"[global {g}]" for g in range(num_global_tokens)] + list(tokens)


class _GlobalLocalCall(PieceCall):
    """One call of a PEGASUS-X global-local layer: its inputs, the crop, and references to its two softmaxes."""

    def __init__(self, module: nn.Module, hidden: torch.Tensor, globals_: torch.Tensor, shift: int, tokens: int,
                 family: str, seen: Optional[SeenValues] = None):
        self.module, self.hidden, self.globals_, self.family, self.seen = module, hidden, globals_, family, seen
        self.batch, self.length = hidden.shape[:2]
        self.g = globals_.shape[1]
        self.heads, self.bs = int(module.num_heads), int(module.block_size)
        self.shift, self.tokens = shift, tokens
        self.glob: Optional[torch.Tensor] = None
        self.local: Optional[torch.Tensor] = None

    def _shapes(self):
        b, h, g, lp, bs = self.batch, self.heads, self.g, self.length, self.bs
        return (b, h, g, g + lp), (b, h, lp // bs, bs, g + bs)

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        glob_shape, local_shape = self._shapes()
        if self.glob is None and tuple(result.shape) == glob_shape:
            self.glob = result
            return None
        if self.glob is not None and self.local is None and tuple(result.shape) == local_shape:
            self.local = result
            return None
        return (f"a softmax of shape {tuple(result.shape)} inside a PEGASUS-X global-local layer, whose pieces are "
                f"the global rows {glob_shape} then the local rows {local_shape}: an unknown piece, so the call "
                "is not assembled")

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        if self.glob is None or self.local is None:
            missing = "global-row" if self.glob is None else "local-row"
            return (f"the PEGASUS-X layer's {missing} softmax was not seen in its call, so its map cannot be "
                    "assembled and it is not stored")
        g, shift, tokens = self.g, self.shift, self.tokens
        value = None
        if keep_values:
            b, h = self.batch, self.heads
            outputs = seen_outputs(self.seen, "v_proj", 2, self.family)  # the model's: tokens, then globals
            if isinstance(outputs, str):
                return outputs
            expected = [(b, self.length), (b, g)]
            if any(o.dim() != 3 or tuple(o.shape[:2]) != e or o.shape[2] % h for o, e in zip(outputs, expected)):
                return (f"keep_values on a {self.family} layer whose v_proj returned "
                        f"{[tuple(o.shape) for o in outputs]}, not {[e + ('heads x d',) for e in expected]} for its "
                        "tokens then its globals, so its values cannot be read and the call is not stored (capture "
                        "it without keep_values)")
            vt = outputs[0].view(b, self.length, h, -1).transpose(1, 2)
            vg = outputs[1].view(b, g, h, -1).transpose(1, 2)
            value = torch.cat([vg, vt[:, :, shift:shift + tokens]], 2)  # (B, H, G + T, d)
        dtype = self.hidden.dtype if self.hidden.is_floating_point() else self.glob.dtype
        glob, local = self.glob, self.local

        def rows(heads, chosen: torch.Tensor, keys) -> torch.Tensor:
            with torch.no_grad(), no_function_modes():  # the capture's own arithmetic: no mode sees it
                return place_global_local_rows(glob, local, shift, tokens, chosen, heads, keys).to(dtype)

        return Assembly(self.batch, self.heads, g + tokens, g + tokens, dtype, rows, CallSources(value=value))


class GlobalLocalLayer(PiecedLayer):
    """The rule of a PEGASUS-X global-local attention module: reads each call's token and global hidden
    states and additive mask, the stagger from the encoder layer ``parent`` that calls it, and the input's
    length from its encoder's running ``forward``."""

    value_modules = ("v_proj",)

    def __init__(self, family: str, parent: nn.Module):
        self.family, self.parent = family, parent

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        hidden = args[0] if args else kwargs.get("token_hidden_states")
        globals_ = args[1] if len(args) > 1 else kwargs.get("global_hidden_states")
        mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
        if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (hidden, globals_)) \
                or not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(hidden.shape[:2]):
            return (f"a {self.family} layer called without token_hidden_states, global_hidden_states (batch, n, "
                    "width) and an attention_mask (batch, tokens): its positions cannot be read, so its pieces "
                    "are not assembled")
        length, bs = hidden.shape[1], int(module.block_size)
        stagger = bool(getattr(self.parent, "stagger_blocks_this_layer", False))
        shift = int(getattr(self.parent, "block_size", bs)) // 2 if stagger else 0
        tokens = _input_length(length, bs, shift)
        masked = mask <= torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask == 0
        if length % bs or not bool(masked[:, :shift].all()) or not bool(masked[:, shift + tokens:].all()):
            return (f"a {self.family} layer called with {length} tokens, blocks of {bs} and a stagger of {shift}, "
                    "whose padding is not masked where the encoder pads: the input's tokens cannot be told from "
                    "the layer's, so its pieces are not assembled")
        return _GlobalLocalCall(module, hidden, globals_, shift, tokens, self.family, self.seen_values())


def _input_length(length: int, block: int, shift: int) -> int:
    """The input's tokens of a layer call of ``length`` tokens: the ``seq_len`` of the nearest running
    encoder ``forward`` that has one and fits (``length - 2 * shift`` is it rounded up to ``block``);
    else ``length - 2 * shift`` (the padding to a multiple of ``block`` kept)."""
    padded = length - 2 * shift
    frame = caller_frame(2)
    for _ in range(_FRAMES_TO_ENCODER):
        if frame is None:
            break
        if frame.f_code.co_name == "forward" and "seq_len" in frame.f_code.co_varnames \
                and hasattr(frame_local(frame, "self"), "embed_global"):
            seq_len = frame_local(frame, "seq_len")
            if isinstance(seq_len, int) and 0 < seq_len <= padded and -(-seq_len // block) * block == padded:
                return seq_len
            break
        frame = frame.f_back
    return padded


def global_local_layer(module: nn.Module, parents) -> Optional[GlobalLocalLayer]:
    """The rule of a transformers PEGASUS-X global-local attention module (``block_size``, ``num_heads``,
    ``v_proj``), called by an encoder layer that says whether it staggers its blocks, or ``None``."""
    kind = type(module)
    if not kind.__module__.startswith("transformers.") or kind.__name__ != "PegasusXGlobalLocalAttention":
        return None
    if not isinstance(getattr(module, "block_size", None), int) or not isinstance(
            getattr(module, "num_heads", None), int) or not isinstance(getattr(module, "v_proj", None), nn.Module):
        return None
    parent = parents.get(id(module)) if parents is not None else None
    if parent is None or not isinstance(getattr(parent, "stagger_blocks_this_layer", None), bool):
        return None
    return GlobalLocalLayer(f"transformers {kind.__name__}", parent)


FAMILIES.append(global_local_layer)
