"""BigBird's block-sparse attention, assembled (a :mod:`.pieces` family).

``BigBirdBlockSparseAttention`` and BigBird-Pegasus's copy of it (``attention_type="block_sparse"``)
split a sequence of ``L`` tokens (the model pads it to a multiple of ``bs = block_size``) into
``nb = L / bs`` blocks and compute one layer call's attention in five softmaxes, in this order:

1. query block 0 over every key: ``(batch, heads, bs, L)``;
2. query block 1: ``(batch, heads, bs, (4 + r) bs)``, key blocks ``0, 1, 2, nb-1`` then its
   ``r = num_random_blocks`` random blocks;
3. query blocks ``2 .. nb-3``: ``(batch, heads, nb-4, bs, (5 + r) bs)``, for query block ``q`` the
   key blocks ``0, q-1, q, q+1``, its random blocks, then ``nb-1``;
4. query block ``nb-2``: ``(batch, heads, bs, (4 + r) bs)``, key blocks ``0, nb-3, nb-2, nb-1``, random;
5. query block ``nb-1`` over every key: ``(batch, heads, bs, L)``.

The random blocks of query block ``q`` are row ``q - 1`` of the ``rand_attn`` ``(batch, heads,
nb-2, r)`` the call drew; it is read from the running call (a local of the module's
``bigbird_block_sparse_attention``), never drawn again: in eval transformers leaves every id 0
(key block 0, which is also a global block), in training it draws them under the layer's seed.

Stored, per layer call: ``(batch, heads, T, T)`` where ``dense[b, h, i, j]`` is the weight query
``i`` multiplied key ``j``'s value by. A key block a query attended twice (a random block that is
also a window or global block: every random block in eval) multiplies the same values twice, so its
weights are **added**: each row of a real query sums to 1 and ``dense @ value(x)`` is the layer's
output before its output projection. (transformers' own ``attentions`` overwrites such blocks
instead, so its rows sum to less than 1 in eval.) Keys never attended are exact zeros; rows of
padded queries are zeros (the model multiplies their output by 0). ``T`` is the caller's tokens:
the padding the model added to reach a multiple of ``block_size`` is cropped when the running model
or encoder ``forward`` that added it can be read (its ``padding_len``) and those positions are masked
in every row; otherwise ``T = L`` and the model's padding stays as zero rows and columns. The
weights are the softmax outputs (block-sparse attention has no dropout), in the softmaxes' own dtype.
Under ``torch.autocast`` the product with the values would run in autocast's dtype, and the stored map
would not be rounded to it; but transformers 5's block-sparse layer does not run under CPU bfloat16
autocast at all (its own reassembly of ``attention_probs`` scatters its softmaxes into a tensor of
another dtype and raises, with or without a capture: tests/test_bigbird.py), so no forward under it
returns. (The layer call that raised still has its pieces assembled and kept in memory, as any call
the post-hook sees.)

Short inputs: at ``<= (5 + 2 r) x block_size`` tokens (or with a cache) transformers replaces every
``BigBirdAttention.self`` by a new full-attention module, for good, so the hooked block-sparse module
never runs again. The rule watches the parent's calls (:meth:`BlockSparseLayer.slot`): from the first
call that holds another module, the layer is warned of once and counted as run and refused with the
reason (hook the model again after the switch, or give longer inputs), never "did not run".
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .._torch_private import caller_frame, frame_local
from ..keep.protocol import CallSources
from .pieces import FAMILIES, Assembly, PieceCall, PiecedLayer

__all__ = ["BlockSparseLayer", "block_sparse_layer", "place_block_sparse_rows", "piece_key_blocks"]

# Frames walked up from a softmax to the layer's bigbird_block_sparse_attention (its rand_attn),
# and from the layer's call to the model's or encoder's forward (padding_len).
_FRAMES_TO_METHOD = 20
_FRAMES_TO_MODEL = 40
_METHOD = "bigbird_block_sparse_attention"


def piece_key_blocks(query_blocks: torch.Tensor, blocks: int, rand: torch.Tensor) -> torch.Tensor:
    """The key block of each ``bs``-wide column group of the piece a query block's rows are in.

    Args:
        query_blocks: ``(R,)`` long, each in ``1 .. blocks-2`` (the rows of pieces 2, 3, 4).
        blocks: ``nb``.
        rand: the call's random block ids ``(batch, heads, nb-2, r)``.

    Returns:
        ``(batch, heads, R, 5 + r)`` long: key block ids in the order of the piece's columns. Pieces 2
        and 4 have ``4 + r`` groups; their last is ``nb``, a block past the sequence (dropped).

    Example:
        >>> rand = torch.tensor([[[[5], [6], [1], [2], [3], [4]]]])  # (1, 1, nb-2 = 6, r = 1)
        >>> piece_key_blocks(torch.tensor([1, 3, 6]), 8, rand)[0, 0].tolist()
        [[0, 1, 2, 7, 5, 8], [0, 2, 3, 4, 1, 7], [0, 5, 6, 7, 4, 8]]
    """
    q = query_blocks
    nb = blocks
    window = torch.stack([torch.zeros_like(q), q - 1, q, q + 1], -1)  # the middle pieces' order
    window = torch.where((q == 1)[:, None], torch.tensor([0, 1, 2, nb - 1], device=q.device), window)
    window = torch.where((q == nb - 2)[:, None], torch.tensor([0, nb - 3, nb - 2, nb - 1], device=q.device), window)
    last = torch.where((q == 1) | (q == nb - 2), nb, nb - 1)  # pieces 2 and 4: none (dropped)
    batch, heads = rand.shape[:2]
    shape = (batch, heads, q.shape[0])
    random = rand.index_select(2, q - 1)  # (B, H, R, r)
    return torch.cat([window.expand(*shape, 4), random, last[:, None].expand(*shape, 1)], -1)


def place_block_sparse_rows(pieces: Sequence[torch.Tensor], rand: torch.Tensor, query_masked: torch.Tensor,
                            rows: torch.Tensor, tokens: int, heads: Optional[Sequence[int]] = None,
                            keys: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Places BigBird's five block-sparse softmaxes at their true positions, for the given query rows only.

    Args:
        pieces: the five softmaxes of one call, in order (see the module docstring).
        rand: the random key block ids the call used, ``(batch, heads, nb-2, r)``.
        query_masked: ``(batch, L)`` booleans: query rows whose output the model zeroes (padding).
        rows: absolute query positions ``(R,)`` (long), each ``< tokens``.
        tokens: ``T <= L``, the keys kept (the first ``T`` positions).
        heads, keys: only these heads / key positions (``None``: all).

    Returns:
        ``(batch, heads, R, T)`` (or the selected heads and keys), in the pieces' dtype; duplicated key
        blocks added.

    Example:
        >>> B, H, bs, nb, r = 1, 1, 1, 8, 1
        >>> soft = lambda *s: torch.softmax(torch.randn(*s), -1)
        >>> pieces = [soft(B, H, bs, 8), soft(B, H, bs, 5), soft(B, H, 4, bs, 6), soft(B, H, bs, 5), soft(B, H, bs, 8)]
        >>> rand = torch.zeros(B, H, nb - 2, r, dtype=torch.long)  # eval: every random block is block 0
        >>> row = place_block_sparse_rows(pieces, rand, torch.zeros(1, 8, dtype=torch.bool), torch.tensor([3]), 8)
        >>> w = pieces[2][0, 0, 1, 0]  # query block 3: keys 0, 2, 3, 4, random (0), 7
        >>> zero = 0 * w[0]
        >>> torch.allclose(row[0, 0, 0], torch.stack([w[0] + w[4], zero, w[1], w[2], w[3], zero, zero, w[5]]))
        True
    """
    first, second, middle, second_last, last = pieces
    if heads is not None:
        index = torch.as_tensor(list(heads), device=first.device)
        first, second, middle, second_last, last = (p.index_select(1, index) for p in pieces)
        rand = rand.index_select(1, index.to(rand.device))
    batch, n_heads, bs, length = first.shape
    nb = length // bs
    device = first.device
    rows = rows.to(device)
    rand = rand.to(device)
    out = first.new_zeros(batch, n_heads, rows.shape[0], length + bs)  # the last block catches what is dropped
    query_block, within = rows // bs, rows % bs
    for block, piece in ((0, first), (nb - 1, last)):  # global query blocks: every key, in order
        at = (query_block == block).nonzero(as_tuple=True)[0]
        if at.numel():
            out[:, :, at, :length] = piece.index_select(2, within[at])
    at = ((query_block > 0) & (query_block < nb - 1)).nonzero(as_tuple=True)[0]
    if at.numel():
        q, i = query_block[at], within[at]
        groups = middle.shape[-1] // bs  # 5 + r
        weights = first.new_zeros(batch, n_heads, at.shape[0], groups * bs)
        for chosen, piece, blocks in ((q == 1, second, None), (q == nb - 2, second_last, None),
                                      ((q > 1) & (q < nb - 2), middle, q - 2)):
            part = chosen.nonzero(as_tuple=True)[0]
            if not part.numel():
                continue
            if blocks is None:  # (B, H, bs, (4 + r) bs): its last group stays 0
                taken = piece.index_select(2, i[part])
            else:  # (B, H, nb-4, bs, (5 + r) bs)
                taken = piece[:, :, blocks[part], i[part]]
            weights[:, :, part, :taken.shape[-1]] = taken
        key_blocks = piece_key_blocks(q, nb, rand)  # (B, H, R', 5 + r)
        columns = (key_blocks[..., None] * bs + torch.arange(bs, device=device)).flatten(-2)  # (B, H, R', (5+r) bs)
        flat = columns + (at * (length + bs))[:, None]  # into the rows of out, flattened: no second (R', L) map
        out.view(batch, n_heads, -1).scatter_add_(-1, flat.flatten(2), weights.flatten(2))  # twice attended: added
    out.masked_fill_(query_masked.to(device).index_select(1, rows)[:, None, :, None], 0.0)
    out = out[..., :tokens]
    if keys is not None:
        out = out.index_select(-1, torch.as_tensor(list(keys), device=device))
    return out


class _BlockSparseCall(PieceCall):
    """One call of a block-sparse layer: its masks, references to its five softmaxes, the random
    blocks and values it used (read from the running call at its first softmax)."""

    def __init__(self, family: str, module: nn.Module, hidden: torch.Tensor, query_masked: torch.Tensor,
                 tokens: int):
        self.family, self.module = family, module
        self.batch, self.length = hidden.shape[:2]
        self.dtype = hidden.dtype
        self.heads = int(module.num_attention_heads)
        self.bs = int(module.block_size)
        self.r = int(module.num_random_blocks)
        self.blocks = self.length // self.bs
        self.query_masked, self.tokens = query_masked, tokens
        self.pieces: List[torch.Tensor] = []
        self.rand: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None

    def _shapes(self) -> List[tuple]:
        b, h, bs, nb, r, length = self.batch, self.heads, self.bs, self.blocks, self.r, self.length
        side = (b, h, bs, (4 + r) * bs)
        return [(b, h, bs, length), side, (b, h, nb - 4, bs, (5 + r) * bs), side, (b, h, bs, length)]

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        shapes = self._shapes()
        n = len(self.pieces)
        if n < len(shapes) and tuple(result.shape) == shapes[n]:
            if n == 0:
                refusal = self._read_call()
                if refusal is not None:
                    return refusal
            self.pieces.append(result)
            return None
        expected = f"piece {n + 1} of 5, {shapes[n]}" if n < len(shapes) else "no sixth piece"
        return (f"a softmax of shape {tuple(result.shape)} inside a {self.family} layer whose block-sparse pieces are "
                f"{', '.join(str(s) for s in shapes)} in that order ({expected} was next): an unknown piece, so the "
                "call is not assembled")

    def _read_call(self) -> Optional[str]:
        """Reads the random key blocks (``rand_attn``) and the values (``value_layer``) the running call
        uses, from its ``bigbird_block_sparse_attention`` frame; or says why they cannot be read."""
        frame = caller_frame(1)
        for _ in range(_FRAMES_TO_METHOD):
            if frame is None:
                break
            if frame.f_code.co_name == _METHOD and frame_local(frame, "self") is self.module:
                rand, value = frame_local(frame, "rand_attn"), frame_local(frame, "value_layer")
                b, h, nb, r = self.batch, self.heads, self.blocks, self.r
                if not isinstance(rand, torch.Tensor) or rand.dtype != torch.long \
                        or tuple(rand.shape) != (b, h, nb - 2, r) or bool((rand < 0).any() or (rand >= nb).any()):
                    shape = tuple(rand.shape) if isinstance(rand, torch.Tensor) else type(rand).__name__
                    return (f"the random key blocks of a {self.family} call (rand_attn, {shape}) are not the "
                            f"(batch, heads, blocks - 2, random blocks) = {(b, h, nb - 2, r)} block ids the pieces "
                            "were computed with, so its random pieces cannot be placed and the call is not stored")
                self.rand = rand
                if isinstance(value, torch.Tensor) and value.dim() == 4 \
                        and tuple(value.shape[:3]) == (b, h, self.length):
                    self.value = value
                return None
            frame = frame.f_back
        return (f"the random key blocks a {self.family} call used (rand_attn, a local of its {_METHOD}) could not be "
                "read when its first softmax ran, so its random pieces cannot be placed and the call is not stored")

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        if len(self.pieces) != 5 or self.rand is None:
            return (f"only {len(self.pieces)} of the 5 block-sparse softmaxes of a {self.family} call were seen, so "
                    "its map cannot be assembled and it is not stored")
        value = None
        if keep_values:
            if self.value is None:
                return (f"keep_values on a {self.family} layer whose value vectors (value_layer, (batch, heads, "
                        "tokens, head_dim)) could not be read from its call: the call is not stored")
            value = self.value[:, :, :self.tokens]
        pieces, rand, masked = self.pieces, self.rand, self.query_masked

        def rows(heads, chosen: torch.Tensor, keys) -> torch.Tensor:
            with torch.no_grad():
                return place_block_sparse_rows(pieces, rand, masked, chosen, self.tokens, heads, keys)

        return Assembly(self.batch, self.heads, self.tokens, self.tokens, pieces[0].dtype, rows,
                        CallSources(value=value))


class BlockSparseLayer(PiecedLayer):
    """The rule of a BigBird (or BigBird-Pegasus) block-sparse self-attention module: reads each call's
    query mask from the ``from_mask`` its model passes, the model's padding from the running
    ``forward`` that added it, and the random blocks from the call itself."""

    def __init__(self, family: str, parent: Optional[nn.Module] = None, attribute: Optional[str] = None):
        self.family = family
        self.parent, self.attribute = parent, attribute  # the BigBirdAttention holding it as .self

    def slot(self):
        return (self.parent, self.attribute) if self.parent is not None else None

    def swapped(self, layer: str, replacement: object) -> str:
        config = getattr(self.parent, "config", None)
        size, rand = getattr(config, "block_size", None), getattr(config, "num_random_blocks", None)
        limit = (f"(5 + 2 x {rand}) x {size} = {(5 + 2 * rand) * size}" if isinstance(size, int)
                 and isinstance(rand, int) else "(5 + 2 r) x block_size")
        return (f"layer {layer!r} ({self.family}) was swapped out: its model replaced {type(self.parent).__name__}."
                f"{self.attribute} by a new {type(replacement).__name__} (transformers does so, for good, when an "
                f"input has at most {limit} tokens, or a cache is passed), so the hooked module no longer runs and "
                "nothing of this layer is captured, on this call or any later one, long inputs too. Hook the model "
                "again after the switch (a new TransformerAttentionHooker captures the full attention it now runs), "
                f"or give inputs longer than {limit} tokens (set model.set_attention_type('block_sparse') back "
                "first)")

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        names = ("hidden_states", "band_mask", "from_mask", "to_mask")
        given = dict(zip(names, args))
        given.update({k: kwargs[k] for k in names if k in kwargs})
        hidden, from_mask, to_mask = given.get("hidden_states"), given.get("from_mask"), given.get("to_mask")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return (f"a {self.family} layer called without hidden_states (batch, tokens, width): its block-sparse "
                    "pieces cannot be laid out, so its map is not assembled")
        batch, length = hidden.shape[:2]
        bs = int(module.block_size)
        if length % bs or length // bs < 5:
            return (f"a {self.family} layer called with {length} tokens, not a multiple of block_size {bs} of at "
                    "least 5 blocks: not the block-sparse layout, so its map is not assembled")
        if not isinstance(from_mask, torch.Tensor) or from_mask.numel() != batch * length \
                or not isinstance(to_mask, torch.Tensor) or to_mask.numel() != batch * length:
            return (f"a {self.family} layer called without the from_mask and to_mask ({batch}, {length}) its model "
                    "passes: which tokens are padding cannot be read, so its map is not assembled")
        query_masked = from_mask.reshape(batch, length) == 0
        key_masked = to_mask.reshape(batch, length) == 0
        return _BlockSparseCall(self.family, module, hidden, query_masked,
                                length - _model_padding(key_masked, length))


def _model_padding(key_masked: torch.Tensor, length: int) -> int:
    """The tokens the model added to reach a multiple of ``block_size``: the ``padding_len`` of the nearest
    running ``forward`` that has one (BigBird's model and BigBird-Pegasus's encoder), when those last
    positions are masked keys in every batch row; 0 when it cannot be read (the padding is then kept)."""
    frame = caller_frame(1)
    for _ in range(_FRAMES_TO_MODEL):
        if frame is None:
            return 0
        code = frame.f_code
        if code.co_name == "forward" and "padding_len" in code.co_varnames:
            padding = frame_local(frame, "padding_len")
            if isinstance(padding, int) and 0 < padding < length and bool(key_masked[:, length - padding:].all()):
                return padding
            return 0
        frame = frame.f_back
    return 0


def block_sparse_layer(module: nn.Module, parents=None) -> Optional[BlockSparseLayer]:
    """The rule of a transformers BigBird-style block-sparse attention module (a
    ``bigbird_block_sparse_attention`` method, ``block_size``, ``num_random_blocks``, ``num_attention_heads``),
    or ``None``."""
    kind = type(module)
    if not kind.__module__.startswith("transformers.") or not callable(getattr(module, _METHOD, None)):
        return None
    if not all(isinstance(getattr(module, name, None), int)
               for name in ("block_size", "num_random_blocks", "num_attention_heads")):
        return None
    parent = parents.get(id(module)) if parents is not None else None
    attribute = next((name for name, child in parent.named_children() if child is module), None) \
        if parent is not None else None
    return BlockSparseLayer(f"transformers {kind.__name__}", parent if attribute else None, attribute)


FAMILIES.append(block_sparse_layer)
