"""LongT5's local and transient-global encoder attention, assembled (a :mod:`.pieces` family).

``LongT5LocalAttention`` and ``LongT5TransientGlobalAttention`` compute one layer call's
attention in **one** softmax over blocks: the ``L`` tokens the layer is given are cut into
``nb = ceil(L / bl)`` blocks of ``bl = block_len = local_radius + 1`` (the last zero-padded),
and each block's queries attend to the keys of blocks ``i - 1, i, i + 1`` (zero blocks beyond
both ends): a softmax ``(batch, nb, heads, bl, 3 * bl)`` whose slot ``kk`` of block ``i`` is
the key ``(i - 1) * bl + kk``. Its mask (``-1e10``) keeps ``|query - key| < bl``, the user's
padding and every slot off the sequence out, so a real query's weight there is exactly 0.

Stored, per layer call, for the local layer: ``(batch, heads, L, L)``, ``dense[b, h, q, k]`` what
query ``q`` put on key ``k``, exact zeros off the band. A slot off the sequence holds a key and a
value of zeros (the model's own padding to a multiple of ``bl``, or beyond either end): the
weight on it multiplies a zero value and is on no token, so it is dropped. It is 0 except in a
row the model masks whole (a padded query: all its slots at ``-1e10``, the softmax is uniform
over ``3 * bl``), whose stored row then sums to less than 1: what the model multiplied.

Transient-global: each row also attends ``G = L // global_block_size`` *global aggregates* (side
keys, the last ``G`` slots of the softmax: ``(batch, nb, heads, bl, 3 * bl + G)``). An aggregate
is not a token: its value is ``v(RMSNorm(sum of the hidden states of the tokens of block g)))``,
which the norm's scale and weight keep from being any mixture of the tokens' values, so its
weight cannot be given to tokens. The map that multiplies the values is therefore over
``[tokens; aggregates]``, and that is what is stored: ``(batch, heads, L, L + G)``, key ``L + g``
the aggregate of global block ``g`` (tokens ``g * global_block_size`` on; the tokens left over
at the end are in the last full block, per row: a padded row's blocks are its own,
:func:`longt5_global_blocks`; :func:`longt5_key_labels` names these keys for the views). Not
refused: issue 24's rule keeps a refusal only where no map multiplies the values at all.

Values (``keep_values``): ``v(x)`` ``(batch, heads, L, d)``; transient-global: ``v`` of the tokens
then of the aggregates, ``(batch, heads, L + G, d)``, as the stored key axis has them: what the
layer's ``v`` returned to it in the call (:mod:`.value_tap`), never made again.
The weights are the softmax's output (before dropout), in the dtype of the layer's input.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .._torch_private import no_function_modes
from ..keep.protocol import CallSources
from .value_tap import SeenValues, seen_outputs
from .pieces import FAMILIES, Assembly, PieceCall, PiecedLayer

__all__ = ["LongT5LocalLayer", "longt5_local_layer", "place_block_rows", "longt5_key_labels", "longt5_global_blocks"]


def place_block_rows(weights: torch.Tensor, tokens: int, block: int, rows: torch.Tensor,
                     heads: Optional[Sequence[int]] = None, keys: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Places LongT5's blocked softmax at token positions, for the given query rows only.

    Args:
        weights: ``(batch, nb, heads, bl, 3 * bl + G)``; slot ``kk < 3 * bl`` of block ``i`` is key
            ``(i - 1) * bl + kk``, slot ``3 * bl + g`` the ``g``-th extra key (``G = 0``: none).
        tokens: ``L``, the layer's tokens (``nb * bl >= L``).
        block: ``bl``.
        rows: absolute query positions ``(R,)`` (long), each ``< L``.
        heads, keys: only these heads / keys of the ``L + G`` (``None``: all).

    Returns:
        ``(batch, heads, R, L + G)`` (or the selected heads and keys), in ``weights``' dtype; keys
        ``L..L+G-1`` are the extra ones, every token key outside a row's three blocks exactly 0.

    Example:
        >>> w = torch.softmax(torch.randn(1, 2, 1, 2, 6), -1)  # L = 4, bl = 2, no extra key
        >>> a = place_block_rows(w, 4, 2, torch.arange(4))
        >>> # block 1's slots are keys 0..5 (4 and 5 off the sequence), block 0's keys -2..3
        >>> bool((a[0, 0, 2] == w[0, 1, 0, 0, :4]).all()), bool((a[0, 0, 0] == w[0, 0, 0, 0, 2:]).all())
        (True, True)
    """
    batch, _, all_heads, bl, slots = weights.shape
    extra = slots - 3 * bl
    if heads is not None:
        weights = weights.index_select(2, torch.as_tensor(list(heads), device=weights.device))
    rows = rows.to(weights.device)
    which, slot = rows // bl, rows % bl
    picked = weights.permute(0, 2, 1, 3, 4)[:, :, which, slot]  # (B, h, R, 3bl + G)
    out = weights.new_zeros(batch, picked.shape[1], rows.shape[0], tokens + extra + 1)  # last: slots on no token
    key = (which[:, None] - 1) * bl + torch.arange(3 * bl, device=rows.device)[None, :]  # (R, 3bl)
    key = torch.where((key >= 0) & (key < tokens), key, torch.full_like(key, tokens + extra))
    local = picked[..., :3 * bl]
    out.scatter_(-1, key[None, None].expand_as(local), local)  # one slot per (query, key): no sums
    if extra:
        out[..., tokens:tokens + extra] = picked[..., 3 * bl:]
    out = out[..., :tokens + extra]
    if keys is not None:
        out = out.index_select(-1, torch.as_tensor(list(keys), device=out.device))
    return out


def longt5_global_blocks(attention_mask: torch.Tensor, global_block_size: int):
    """Which global aggregate each token of one row joins, as a LongT5 transient-global layer groups them.

    Per row: a real token at position ``t`` is in block ``t // global_block_size``, except that the
    tokens after the row's last *full* block (its last block end ``t % gbs == gbs - 1`` that is a
    real token) join that block; a padded token is in none. Aggregate ``g`` of the ``G = L // gbs``
    exists in the row (is not masked) when some real token is in a block ``>= g``.

    Args:
        attention_mask: ``(L,)`` of one row, nonzero = real token.
        global_block_size: the layer's ``global_block_size``.

    Returns:
        ``(block_of (L,) long, -1 for padding; exists (G,) bool)``.

    Example:
        >>> block_of, exists = longt5_global_blocks(torch.tensor([1, 1, 1, 1, 1, 1, 0, 0]), 2)
        >>> block_of.tolist(), exists.tolist()  # tokens 4, 5 are block 2; 6, 7 padding: block 3 masked
        ([0, 0, 1, 1, 2, 2, -1, -1], [True, True, True, False])
    """
    real = attention_mask.reshape(-1) != 0
    length = real.shape[0]
    position = torch.arange(length, device=real.device)
    ends = (position % global_block_size == global_block_size - 1) & real
    last_full = int(ends.sum()) - 1  # -1: no full block of real tokens, no aggregate in the row
    block_of = torch.where(real, torch.clamp(position // global_block_size, max=last_full),
                           torch.full_like(position, -1))
    block_of = torch.where(block_of < 0, torch.full_like(position, -1), block_of)
    highest = int(block_of.max()) if length else -1
    exists = torch.arange(length // global_block_size, device=real.device) <= highest
    return block_of, exists


def _runs(positions: List[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs, start = [], None
    for i, p in enumerate(positions):
        if start is None:
            start = p
        if i + 1 == len(positions) or positions[i + 1] != p + 1:
            runs.append(f"{start}-{p}" if p != start else f"{p}")
            start = None
    return ", ".join(runs)


def longt5_key_labels(tokens: Sequence[str], global_block_size: int,
                      attention_mask: Optional[torch.Tensor] = None) -> List[str]:
    """Key labels of one row of a transient-global layer's map ``(batch, heads, L, L + G)``: the ``L`` tokens,
    then one label per global aggregate (``G = L // global_block_size``) naming the tokens it sums, to pass
    as ``key_tokens=`` to the views.

    The tokens an aggregate sums depend on the row's padding (:func:`longt5_global_blocks`): pass that row's
    ``attention_mask`` ``(L,)`` for a padded row. Without it the row is taken to have no padding (the tokens
    left over at the end join the last block), which names the wrong tokens for a padded row. An aggregate
    of no real token of the row (masked there: its weight is 0) is labelled so.

    Example:
        >>> longt5_key_labels(["a", "b", "c", "d", "e"], 2)
        ['a', 'b', 'c', 'd', 'e', '[global block 0: tokens 0-1]', '[global block 1: tokens 2-4]']
        >>> longt5_key_labels(["a", "b", "c", "<pad>", "<pad>"], 2, torch.tensor([1, 1, 1, 0, 0]))[5:]
        ['[global block 0: tokens 0-2]', '[global block 1: masked in this row]']
    """
    tokens = list(tokens)
    mask = torch.ones(len(tokens), dtype=torch.long) if attention_mask is None else attention_mask.reshape(-1)
    if mask.shape[0] != len(tokens):
        raise ValueError(f"longt5_key_labels: attention_mask has {mask.shape[0]} positions for {len(tokens)} tokens "
                         "(give one row's mask)")
    block_of, exists = longt5_global_blocks(mask.cpu(), global_block_size)
    labels = []
    for g in range(exists.shape[0]):
        members = (block_of == g).nonzero(as_tuple=True)[0].tolist()
        if not bool(exists[g]) or not members:
            labels.append(f"[global block {g}: masked in this row]")
        else:
            labels.append(f"[global block {g}: tokens {_runs(members)}]")
    return tokens + labels


class _LongT5Call(PieceCall):
    """One call of a LongT5 local or transient-global layer: its input, and a reference to its softmax."""

    def __init__(self, module: nn.Module, hidden: torch.Tensor, mask, transient: bool,
                 seen: Optional[SeenValues] = None):
        self.module, self.hidden, self.mask, self.transient, self.seen = module, hidden, mask, transient, seen
        self.batch, self.tokens = hidden.shape[:2]
        self.heads, self.block = int(module.n_heads), int(module.block_len)
        self.blocks = -(-self.tokens // self.block)
        self.extra = self.tokens // int(module.global_block_size) if transient else 0
        self.weights: Optional[torch.Tensor] = None

    def _expected(self) -> tuple:
        return (self.batch, self.blocks, self.heads, self.block, 3 * self.block + self.extra)

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        if self.weights is None and tuple(result.shape) == self._expected():
            self.weights = result
            return None
        return (f"a softmax of shape {tuple(result.shape)} inside a LongT5 blocked layer, whose one piece is "
                f"the blocked softmax {self._expected()}: an unknown piece, so the call is not assembled")

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        if self.weights is None:
            return ("the LongT5 layer's blocked softmax was not seen in its call, so its map cannot be assembled "
                    "and it is not stored")
        value = self._values() if keep_values else None
        if isinstance(value, str):
            return value
        dtype = self.hidden.dtype if self.hidden.is_floating_point() else self.weights.dtype
        weights, tokens, block = self.weights, self.tokens, self.block

        def rows(heads, chosen: torch.Tensor, keys) -> torch.Tensor:
            with torch.no_grad(), no_function_modes():  # the capture's own arithmetic: no mode sees it
                return place_block_rows(weights, tokens, block, chosen, heads, keys).to(dtype)

        return Assembly(self.batch, self.heads, tokens, tokens + self.extra, dtype, rows, CallSources(value=value))

    def _values(self) -> Union[torch.Tensor, str]:
        """``(batch, heads, L [+ G], d)``: what the stored map's keys multiply, as the layer's ``v`` returned
        them in the call: once for the tokens, then (transient-global) once for the aggregates."""
        b, family = self.batch, f"LongT5 {'transient-global' if self.transient else 'local'}"
        outputs = seen_outputs(self.seen, "v", 2 if self.transient else 1, family)
        if isinstance(outputs, str):
            return outputs
        expected = [(b, self.tokens)] + ([(b, self.extra)] if self.transient else [])
        if any(o.dim() != 3 or tuple(o.shape[:2]) != e or o.shape[2] % self.heads for o, e in zip(outputs, expected)):
            return (f"keep_values on a {family} layer whose v projection returned "
                    f"{[tuple(o.shape) for o in outputs]}, not {[e + ('heads x d',) for e in expected]}, so its values "
                    "cannot be read and the call is not stored (capture it without keep_values)")
        parts = [o.view(b, o.shape[1], self.heads, -1).transpose(1, 2) for o in outputs]  # (B, H, L | G, d)
        return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


class LongT5LocalLayer(PiecedLayer):
    """The rule of a LongT5 local (or transient-global) encoder self-attention module: reads each call's
    hidden states ``(batch, L, width)`` (and, transient-global, the token mask ``(batch, L)`` its stack passes)."""

    value_modules = ("v",)  # the tokens' values, then (transient-global) the aggregates'

    def __init__(self, family: str, transient: bool):
        self.family, self.transient = family, transient

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return (f"a {self.family} layer called without hidden_states (batch, tokens, width): its tokens cannot "
                    "be counted, so its blocks are not placed")
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        return _LongT5Call(module, hidden, mask, self.transient, self.seen_values())


def longt5_local_layer(module: nn.Module, parents=None) -> Optional[LongT5LocalLayer]:
    """The rule of a transformers LongT5 blocked encoder attention module (``block_len``, ``n_heads``, the
    ``q``/``k``/``v``/``o`` projections; transient-global also ``global_block_size`` and
    ``global_input_layer_norm``), or ``None``."""
    kind = type(module)
    if not kind.__module__.startswith("transformers.") or kind.__name__ not in (
            "LongT5LocalAttention", "LongT5TransientGlobalAttention"):
        return None
    if not isinstance(getattr(module, "block_len", None), int) or not isinstance(getattr(module, "n_heads", None), int):
        return None
    transient = kind.__name__ == "LongT5TransientGlobalAttention"
    if transient and not isinstance(getattr(module, "global_block_size", None), int):
        return None
    return LongT5LocalLayer(f"transformers {kind.__name__}", transient)


FAMILIES.append(longt5_local_layer)
