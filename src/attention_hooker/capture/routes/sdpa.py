"""Route 2: weights behind ``torch.nn.functional.scaled_dot_product_attention``.

The fused kernel never materialises the attention matrix, so the weights are
recomputed from the call's own ``query``, ``key``, ``attn_mask``, ``is_causal``,
``scale`` and ``enable_gqa`` with the reference formula that PyTorch documents
for the function. The real kernel still produces the model's output.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Tuple

import torch

from ..heads import declared_heads
from ...selection import Selection
from ..._torch_private import log_softmax_last_dim_into, softmax_last_dim_into
from ...keep.allocator import zero_pages
from ...keep.host_copy import DIRECT_BYTES, HostCopies
from ...errors import AttentionHookerError

__all__ = ["SDPA_FUNCTIONS", "sdpa_attention_weights", "parse_sdpa_call", "as_4d", "packed_query_groups",
           "unpack_query_groups", "TileNeeds"]

SDPA_FUNCTIONS = frozenset({torch.nn.functional.scaled_dot_product_attention})

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def parse_sdpa_call(args: tuple, kwargs: dict) -> dict:
    """Names the arguments of one ``scaled_dot_product_attention`` call."""
    call = dict(_SDPA_DEFAULTS)
    call.update(zip(_SDPA_PARAMS, args))
    call.update(kwargs)
    return call


def packed_query_groups(modules: Callable[[], Iterable], query: torch.Tensor, key: torch.Tensor) -> int:
    """How many query heads each query row of this call stands for (1: none packed).

    Hugging Face's sdpa path packs the single decode query of grouped-query
    attention as ``(batch, kv_heads, groups, dim)``, so that the kernel runs on the
    key/value heads without repeating them: the rows of one kv head are its
    ``groups`` query heads, at one position. Shapes alone cannot tell this from
    ``groups`` query positions, so it is decided from what the attention module
    declares: ``num_key_value_groups`` > 1 and a head count that equals
    ``kv_heads * groups``, while the call's query has as many heads as its key.

    Args:
        modules: gives the attention modules that may declare the grouping (the
            hooked module, or the one whose code calls the kernel); called only when
            the shapes allow packing.
        query: the call's ``(batch, heads, query, dim)``.
        key: the call's ``(batch, kv_heads, key, dim)``.
    """
    if query.dim() < 3 or key.dim() < 3:
        return 1
    heads, rows = query.shape[-3], query.shape[-2]
    if heads != key.shape[-3] or rows < 2:
        return 1
    for module in modules():
        groups = getattr(module, "num_key_value_groups", None)
        if isinstance(groups, int) and groups > 1:
            return groups if rows == groups and declared_heads(module) == heads * groups else 1
    return 1


def unpack_query_groups(weights: torch.Tensor, groups: int) -> torch.Tensor:
    """``(batch, kv_heads, groups, key)`` of a packed call -> ``(batch, kv_heads * groups, 1, key)``:
    query head ``h * groups + r`` is row ``r`` of kv head ``h`` (the order ``repeat_kv`` uses)."""
    batch, kv_heads, _, keys = weights.shape
    return weights.reshape(batch, kv_heads * groups, 1, keys)  # (B, H, 1, S)


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """``(..., heads, rows, cols)`` -> ``(batch, heads, rows, cols)``; missing dims become 1."""
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    if t.dim() > 4:
        return t.reshape((-1,) + tuple(t.shape[-3:]))
    return t


def sdpa_attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    heads: Optional[Sequence[int]] = None,
    rows=None,
    keys=None,
    buffer: Optional[Callable[..., torch.Tensor]] = None,
    where: str = "the attention",
    store_as: Optional[Tuple[torch.dtype, torch.device]] = None,
    tile_bytes: Optional[int] = None,
    tile_sink: Optional[Callable[..., None]] = None,
    selection: Optional[Selection] = None,
) -> Optional[torch.Tensor]:
    """Attention probabilities of one ``scaled_dot_product_attention`` call.

    Follows the reference implementation in PyTorch's documentation of
    ``F.scaled_dot_product_attention``: ``softmax(q k^T * scale + bias)``, where the
    bias holds ``-inf`` above the diagonal for ``is_causal`` (top-left aligned) and
    where a boolean mask is ``False``, or the float mask itself. Key/value heads
    fewer than query heads (grouped-query attention) are shared by consecutive
    query heads, as ``enable_gqa`` does; weights are reported per query head.
    Dropout is not applied: these are the probabilities before dropout. A query
    row whose keys are all masked gets zeros instead of NaN.

    Args:
        query: ``(batch, heads, query, dim)``; fewer leading dims are treated as 1,
            more are flattened into batch.
        key: ``(batch, kv_heads, key, dim)``.
        attn_mask: bool or float, broadcastable to ``(batch, heads, query, key)``.
        is_causal: apply a top-left causal mask.
        scale: softmax scale; ``None`` means ``1 / sqrt(dim)``.
        enable_gqa: accepted for symmetry with the kernel; fewer kv heads that
            divide the query heads are always shared this way.
        heads: query-head indices to compute; ``None`` computes all.
        rows: query rows to compute (indices, negative from the end, or a slice;
            see :func:`~attention_hooker.selection.row_selection`); ``None`` computes
            all. Only those rows of ``q`` enter the product with the keys, so the
            cost follows the selection; a causal mask still hides keys after each
            row's own position.
        keys: keys to keep of each row (the same forms); ``None`` keeps all. Each
            row is normalised over all its keys, then only these are kept, a tile
            of rows at a time: no ``(rows, all keys)`` tensor of the call is held.
        buffer: ``buffer(shape, dtype, device)`` gives the tensor the weights are
            written into (float32/float64 queries; any query where they are computed in
            tiles: ``store_as``, a large map, or a causal one of many rows); ``None``
            allocates one.
        where: names the call in error messages (e.g. ``"layer 'h.0.attn'"``).
        store_as: ``(dtype, device)`` of the tensor to return. The weights are then
            computed in tiles of query rows, each at most about ``tile_bytes`` of
            working scores, and written into it tile by tile: no whole ``(batch,
            heads, query, key)`` tensor exists in the working dtype or on the working
            device (float16 storage of a float32 or half model, CPU storage of a GPU
            model). ``buffer``, when given, then gives the tensor returned.
        tile_bytes: the working memory of one tile, with ``store_as``
            (``None``: :data:`TILE_BYTES` on the CPU, 64 times that on an accelerator).
        tile_sink: instead of returning the weights, hand each tile to
            ``tile_sink(tile, rows, shape)`` (``(batch, heads, r, key)`` in the working
            dtype, valid during the call only; its absolute query rows ``(r,)``; and the
            whole call's ``(batch, heads, rows, key)``) and return ``None``: nothing
            larger than a tile is ever held. A sink with a ``begin(shape)`` method is
            told the call's shape first and answers with :class:`TileNeeds` whether it
            takes narrow causal tiles and each tile's log (then passed as a 4th argument).
        selection: ``heads``, ``rows`` and ``keys`` as one
            :class:`~attention_hooker.selection.Selection` (a capture's), instead of them.

    Returns:
        ``(batch, heads, query, key)`` probabilities, in the query's dtype
        (computed in float32 when the query is half precision).

    Raises:
        AttentionHookerError: when ``heads`` names a head the query lacks.

    Example:
        >>> q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8)
        >>> w = sdpa_attention_weights(q, k)
        >>> w.shape, bool(torch.allclose(w.sum(-1), torch.ones(2, 4, 5)))
        (torch.Size([2, 4, 5, 7]), True)
    """
    del enable_gqa  # fewer kv heads are handled from the shapes alone
    _check_inputs(query, key, attn_mask)
    q = as_4d(query)  # (B, Hq, L, E)
    k = as_4d(key)  # (B, Hk, S, E)
    length, source = q.shape[2], k.shape[2]
    mask = _checked_mask(attn_mask, q, k)  # (B|1, Hq|1, L|1, S) or None
    if selection is None:  # every head, row and key unless asked (the usual call: nothing to parse)
        selection = _EVERYTHING if heads is None and rows is None and keys is None else Selection.parse(
            heads=heads, rows=rows, keys=keys)
    kept = selection.resolve(q.shape[1], length, source, where)
    q, k, mask = _keep_heads(q, k, mask, kept.heads)
    row_index = torch.arange(length, device=q.device) if kept.rows is None else torch.tensor(kept.rows, device=q.device)
    if kept.rows is not None:  # (L,): the absolute query rows computed
        q = q.index_select(2, row_index)  # (B, H, rows, E)
        if mask is not None and mask.shape[2] > 1:
            mask = mask.index_select(2, row_index)
    scale_factor = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    key_index = None if kept.keys is None else torch.tensor(kept.keys, device=q.device)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        weights = _differentiable_weights(q, k, mask, is_causal, scale_factor, row_index).to(query.dtype)
        return weights if key_index is None else weights.index_select(3, key_index)
    if key_index is not None and store_as is None and tile_sink is None:
        store_as = (query.dtype, q.device)  # the kept keys of each tile, written as they come
    if store_as is None and tile_sink is None and _whole_bytes(q, k, mask) > (
            WHOLE_BYTES if q.device.type == "cpu" else _tile_bytes(q.device)):
        # A large map: computed in tiles (cache-sized on the CPU), written once in place: the working
        # memory is one tile, not the scores and the softmax of the whole map beside it.
        store_as = (query.dtype, q.device)
    elif store_as is None and tile_sink is None and _in_causal_blocks(q, is_causal, key_index):
        # Whole, every row would be multiplied with every key, and a causal mask hides nearly half of
        # them: in blocks of rows, each stops at its last row's key; the same numbers, bitwise.
        store_as = (query.dtype, q.device)
        tile_bytes = _causal_block_rows(q.shape[2]) * (_whole_bytes(q, k, mask) // q.shape[2])
    if store_as is not None or tile_sink is not None:
        return _weights_in_tiles(q, k, mask, is_causal, scale_factor, store_as, tile_bytes or _tile_bytes(q.device),
                                 row_index, tile_sink, buffer, key_index, kept.rows)
    return _weights(q, k, mask, is_causal, scale_factor, buffer, query.dtype, row_index,
                    first_row=0 if kept.rows is None else None)


class TileNeeds(NamedTuple):
    """What a ``tile_sink`` takes, told by its ``begin(shape)`` before the first tile (a sink
    without ``begin`` takes neither).

    Attributes:
        narrow: a tile may stop at the last key a causal mask leaves to its rows: ``(batch,
            heads, r, width)`` with ``width`` <= the call's keys, every key after it zero. Keys
            that every row of a tile masks are then never computed.
        bands: (with ``narrow``) a tile may hold only the keys ``lo .. lo + width - 1`` that a mask
            leaves to its rows (a sliding window's): the sink is then called with ``first_key=lo``
            (when ``lo`` > 0), every other key of those rows zero.
        log_probabilities: the sink is called as ``tile_sink(tile, rows, shape, log_tile)``
            with ``log_tile`` = ``log(tile)`` (the log-softmax the tile was computed from),
            ``0`` wherever ``tile`` is ``0``: statistics such as the entropy then cost a
            product instead of a logarithm per weight.
    """

    narrow: bool = False
    log_probabilities: bool = False
    bands: bool = False


def _whole_bytes(q, k, mask) -> int:
    """Bytes of the call's whole ``(batch, heads, query, key)`` map in float32."""
    batch = max(q.shape[0], k.shape[0], 1 if mask is None else mask.shape[0])
    return batch * q.shape[1] * q.shape[2] * k.shape[2] * 4


def _in_causal_blocks(q: torch.Tensor, is_causal: bool, key_index) -> bool:
    """Whether a causal CPU map kept whole is computed in blocks of about :data:`CAUSAL_BLOCK_ROWS`
    query rows instead (from :data:`CAUSAL_BLOCKS_FROM` rows on, where skipping the hidden keys
    pays for the blocks: 16-30% less time at 384-512 rows, none at 256; measured on the CPU only).
    Not for float64 scores, whose narrow products differ from the whole one in the last bit."""
    return (is_causal and key_index is None and q.device.type == "cpu" and q.dtype != torch.float64
            and q.shape[2] >= CAUSAL_BLOCKS_FROM)


def _causal_block_rows(length: int) -> int:
    """Rows per block for :func:`_in_causal_blocks`: at most :data:`CAUSAL_BLOCK_ROWS`, the blocks
    as even as can be. A product of one to three rows takes another BLAS kernel, whose numbers
    differ in the last bit: a short last block would differ from the whole map."""
    blocks = -(-length // CAUSAL_BLOCK_ROWS)
    return -(-length // blocks)


def _tile_bytes(device: torch.device) -> int:
    """Working scores of one tile: :data:`TILE_BYTES` on the CPU (a few tiles fit its caches), 64
    times that on an accelerator (fewer, larger launches)."""
    return TILE_BYTES if device.type == "cpu" else TILE_BYTES * 64


def _checked_mask(attn_mask, q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask as ``(B|1, Hq|1, L|1, S)``, checked to broadcast to ``(batch, heads, query, key)``."""
    if attn_mask is None:
        return None
    mask = as_4d(attn_mask)
    full = (max(q.shape[0], k.shape[0]), q.shape[1], q.shape[2], k.shape[2])
    try:
        _broadcast(tuple(mask.shape), full)
    except ValueError:
        raise AttentionHookerError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads, query, key) = {full}"
        ) from None
    return mask


def _keep_heads(q, k, mask, heads: Optional[Tuple[int, ...]]):
    """``q``, ``k`` and ``mask`` holding only the query heads ``heads`` (all when ``None``)."""
    if heads is None:
        # Fewer kv heads stay as they are: each serves its group of query heads in the
        # product itself (_scaled_scores), without a repeated copy of the keys.
        return q, k, mask
    n_q_heads, n_k_heads = q.shape[1], k.shape[1]
    index = torch.as_tensor(heads, device=q.device)
    q = q.index_select(1, index)
    if n_k_heads == n_q_heads:
        k = k.index_select(1, index)
    elif n_k_heads > 1:
        k = k.index_select(1, torch.div(index, n_q_heads // n_k_heads, rounding_mode="floor"))
    if mask is not None and mask.shape[1] == n_q_heads and n_q_heads > 1:
        mask = mask.index_select(1, index)
    return q, k, mask


def _weights(q, k, mask, is_causal: bool, scale_factor: float, buffer, dtype, row_index, low: int = 0,
             first_row: Optional[int] = None) -> torch.Tensor:
    """``softmax(q k^T * scale + bias)`` for the query rows ``row_index`` (absolute, one
    per row of ``q``) of the call: ``(B, H, rows, S)`` in ``dtype``; ``mask`` already
    holds only these rows. ``low``: no row of ``row_index`` is before it (with ``is_causal``,
    keys up to ``low`` are seen by every row; only those from ``low + 1`` on are compared).
    ``first_row``: where the rows are known on the host to be consecutive, ``row_index[0]``."""
    scores, mask, empty_rows = _masked_scores(q, k, mask, is_causal, scale_factor, buffer, row_index, low, first_row)
    weights = _softmax_last_dim(scores)  # (B, H, L, S)
    if empty_rows is not None:
        weights = weights.masked_fill_(empty_rows, 0.0)
    return weights.to(dtype) if weights.dtype != dtype else weights


def _log_weights(q, k, mask, is_causal: bool, scale_factor: float, buffer, log_buffer, row_index, low: int = 0,
                 first_row: Optional[int] = None, finite_scores: bool = True):
    """``(weights, log_weights)`` of :func:`_weights` (float32 or float64, ``(B, H, rows, S)``),
    with ``log_weights`` 0 wherever the weight is 0 (a masked key, a row with every key
    masked, and, where ``finite_scores`` is false, a key whose score is ``-inf``), so that
    ``weights * log_weights`` is finite wherever the weights are.

    Both come from the scores by the library's own kernels (log-softmax, then softmax in place):
    the exponential of very negative log-weights gives subnormal floats, which ``torch.exp``
    computes ten times slower than the softmax kernel does (seen at 32k keys)."""
    scores, mask, empty_rows = _masked_scores(q, k, mask, is_causal, scale_factor, buffer, row_index, low, first_row)
    log_weights = log_buffer(tuple(scores.shape), scores.dtype, scores.device)
    if scores.device.type == "cpu" and scores.is_contiguous():
        log_softmax_last_dim_into(scores, log_weights)
    else:
        log_weights.copy_(torch.log_softmax(scores, dim=-1))
    weights = _softmax_last_dim(scores)
    if empty_rows is not None:
        weights.masked_fill_(empty_rows, 0.0)
        log_weights.masked_fill_(empty_rows, 0.0)
    if is_causal and low + 1 < k.shape[2]:
        if first_row is not None:
            start = _hidden_from(low + 1)
            log_weights[..., start:].tril_(first_row - start)  # 0 after each row's own position
        else:
            log_weights[..., low + 1:].masked_fill_(_above_diagonal(row_index, low + 1, k.shape[2]), 0.0)
    if mask is not None and mask.dtype == torch.bool:
        _in_place_if_fits(log_weights, mask, lambda s, m: s.masked_fill_(~m, 0.0), lambda s, m: s.masked_fill(~m, 0.0))
    # -inf where a float mask held -inf (or very negative where it held finfo.min), and where a score was -inf
    # (a -inf in a key), wherever it lies
    if not finite_scores or (mask is not None and mask.dtype != torch.bool):
        log_weights.masked_fill_(weights == 0, 0.0)
    return weights, log_weights


def _hide_after_diagonal(scores: torch.Tensor, first_row: int, first_hidden: int) -> None:
    """``-inf`` in ``scores`` ``(..., rows, S)`` at every key after its row's position, row ``i``
    being at ``first_row + i`` (a top-left causal mask), whatever the score held there (NaN or
    infinite included), as ``masked_fill_`` sets it; the rest unchanged. No key before
    ``first_hidden`` is hidden from any row (``first_row + 1``, or less).

    Done as ``tril_`` (zeros after each row's position, a copy of the rest) and the addition of
    a bias of ``-inf`` there and ``0`` elsewhere (``x + 0`` is ``x``; ``-0.0`` becomes ``0.0``,
    the same weight): on the CPU two simple passes cost a tenth to a fifth of ``masked_fill_``
    with a broadcast boolean mask (0.6 ms against 0.07 ms for 8 x 12 heads of 128 x 128 scores).
    Only the keys from ``first_hidden`` on are touched (a narrow tile's last few), unless that
    is nearly all of them: a slice is slower than the whole at that size."""
    start = _hidden_from(first_hidden)
    part = scores[..., start:] if start else scores
    rows, keys = part.shape[-2], part.shape[-1]
    bias = torch.full((rows, keys), float("-inf"), dtype=scores.dtype, device=scores.device).triu_(first_row + 1 - start)
    part.tril_(first_row - start).add_(bias)


def _hidden_from(first_hidden: int) -> int:
    """Where to start hiding keys: ``first_hidden``, or 0 where it is 0 or 1 (the whole tensor)."""
    return first_hidden if first_hidden > 1 else 0


def _above_diagonal(row_index, first: int, source: int) -> torch.Tensor:
    """``(rows, source - first)``: keys ``first ..`` a top-left causal mask hides from each row."""
    return torch.arange(first, source, device=row_index.device)[None, :] > row_index[:, None]


def _masked_scores(q, k, mask, is_causal: bool, scale_factor: float, buffer, row_index, low: int,
                   first_row: Optional[int] = None):
    """``(scores, mask, empty_rows)``: ``scale * q k^T`` with the causal mask (from key ``low + 1``
    on) and ``mask`` applied, the mask as applied, and the rows with every key masked whose scores
    are all ``-inf`` (:func:`_empty_rows`; a NaN score leaves its row NaN, as in the kernel):
    ``(B|1, H|1, L|1, 1)`` booleans, or ``None``.
    ``first_row``: ``row_index[0]`` where the rows are known to be consecutive (a faster causal mask).

    A bool mask is applied as the kernels apply it, as ``-inf`` added to the hidden scores: an
    infinite or NaN score there gives NaN, and its row is NaN, as in the kernel's output (and on
    the CPU the addition of a ``(B|1, H|1, L|1, S)`` float bias costs a third to a seventh of
    ``masked_fill_`` with the bool mask). ``is_causal`` hides keys as the flash kernels do: they
    never read them."""
    source = k.shape[2]
    scores = _scaled_scores(q, k, scale_factor, buffer)  # (B, H, rows, S), float32 for half inputs
    if is_causal and low + 1 < source:
        if first_row is not None:
            _hide_after_diagonal(scores, first_row, low + 1)
        else:
            scores[..., low + 1:].masked_fill_(_above_diagonal(row_index, low + 1, source), float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = _in_place_if_fits(scores, _additive(mask, scores.dtype), torch.Tensor.add_, torch.add)
        else:
            mask = mask.to(scores.dtype)
            scores = _in_place_if_fits(scores, mask, torch.Tensor.add_, torch.add)
    empty_rows = None if mask is None else _empty_rows(mask, _above_diagonal(row_index, 0, source) if is_causal else None)
    if empty_rows is not None:  # a NaN among a hidden row's scores makes it NaN in the kernel too
        empty_rows = empty_rows & torch.isneginf(scores).all(-1, keepdim=True)
    return scores, mask, empty_rows


def _weights_in_tiles(q, k, mask, is_causal: bool, scale_factor: float, store_as, tile_bytes: int,
                      row_index, tile_sink=None, buffer=None, key_index=None,
                      host_rows=None) -> Optional[torch.Tensor]:
    """The weights ``(B, H, L, S)`` in ``store_as = (dtype, device)``, computed a block of
    query rows at a time: each row's softmax only needs its own scores, so a tile of
    rows is exact on its own. Working memory: one tile of float32 (or float64) scores,
    sized to stay in the caches, copied once into its place (converted on the way).

    Under a causal mask, a tile's keys after its last row are zeros: they are never
    computed, and never written where the stored tensor is known to be zeros already
    (fresh pages: ``buffer.zeroed``, or the tensor made here), nor handed to a sink
    whose ``begin`` says it takes narrow tiles (:class:`TileNeeds`)."""
    batch = max(q.shape[0], k.shape[0], 1 if mask is None else mask.shape[0])
    length, source = q.shape[2], k.shape[2]
    kept = source if key_index is None else len(key_index)
    shape = (batch, q.shape[1], length, kept)  # (B, H, L, S or the kept keys)
    out, zeroed, needs = None, False, TileNeeds()
    if tile_sink is None:
        dtype, device = store_as
        if buffer is not None:
            out = buffer(shape, dtype, device)
            zeroed = bool(getattr(buffer, "zeroed", False))
        elif torch.device(device).type == "cpu":
            out, zeroed = zero_pages(shape, dtype), True
        else:
            out = torch.empty(shape, dtype=dtype, device=device)
    elif length and hasattr(tile_sink, "begin"):
        needs = tile_sink.begin(shape)
    narrow = is_causal and key_index is None and (tile_sink is None or needs.narrow)
    if q.dtype in _HALF:  # scores and softmax in float32, as the kernels compute them
        q, k = q.float(), k.float()
    # Laid out (batch, heads, positions, dim) once: a tile's product would otherwise copy the keys
    # of a transposed projection (or of grouped heads) again for every tile.
    q, k = q.contiguous(), k.contiguous()
    work = q.dtype
    row_bytes = max(1, batch * q.shape[1] * source * torch.finfo(work).bits // 8)
    # From an accelerator into the CPU: through pinned buffers, in pieces, while the device goes on
    # (the tiles keep their size: a map kept on the CPU is computed in the same tiles as one
    # streamed or reduced, so that they are equal bitwise).
    copies = (HostCopies(q.device) if out is not None and out.device.type == "cpu" and q.device.type == "cuda"
              and out.numel() * out.element_size() >= DIRECT_BYTES else None)
    rows = max(1, min(length, tile_bytes // row_bytes))
    # One working tensor for every tile (fresh memory per tile costs page faults on each).
    scratch = torch.empty(batch * q.shape[1] * rows * source, dtype=work, device=q.device)
    log_scratch = (torch.empty(scratch.shape, dtype=work, device=q.device) if needs.log_probabilities else None)

    def tile_buffer(shape, tile_dtype, tile_device):
        return scratch[: math.prod(shape)].view(shape)

    def log_tile_buffer(shape, tile_dtype, tile_device):
        return log_scratch[: math.prod(shape)].view(shape)

    row_list = list(range(length)) if host_rows is None else list(host_rows)  # no device sync per tile
    whole_mask = mask is not None and mask.shape[3] == source and mask.shape[3] > 1
    starts = list(range(0, length, rows))
    # Keys a mask hides from every row of a tile (a sliding window's, a chunk's, padding's): never computed.
    banded = whole_mask and key_index is None and length
    # Where a score may not be finite, a key the mask hides may still make its row NaN (no bands), and
    # a -inf score has log -inf beside its weight 0 (set to 0, where the log is handed on).
    finite = _scores_surely_finite(q, k, scale_factor) if banded or needs.log_probabilities or narrow else True
    # A NaN or infinite score makes its row NaN at every key, as in the whole map: tiles then keep every key.
    narrow = narrow and finite
    bands = (_key_bands(mask, starts, rows, length, very_negative=not is_causal and work != torch.float64)
             if banded and finite else None)
    assembled = (_Assembly(scratch, log_scratch) if bands is not None and tile_sink is not None
                 and not (needs.narrow and needs.bands) else None)
    for index, first in enumerate(starts):
        last = min(length, first + rows)
        tile_rows = row_list[first:last]
        width = min(source, max(tile_rows) + 1) if narrow else source  # keys after width: masked for every row
        lo, hi = (0, width) if bands is None else (bands[index][0], min(width, bands[index][1]))
        lo = min(lo, hi)  # lo == hi: every key of every row masked (zeros)
        tile_mask = mask if mask is None or mask.shape[2] == 1 else mask[:, :, first:last]
        if whole_mask and (lo > 0 or hi < source):
            tile_mask = tile_mask[..., lo:hi]
        # Key positions from lo on: a causal mask compares each row with the keys' positions in the band.
        tile_index = row_index[first:last] if lo == 0 else row_index[first:last] - lo
        low = max(min(tile_rows) - lo, -1) if is_causal else 0
        first_row = first - lo if host_rows is None else None  # the tile's rows are first .. last - 1
        part = k if lo == 0 and hi == source else k[:, :, lo:hi]
        log_tile = None
        if hi == lo:
            tile = scratch[:0].view(batch, q.shape[1], last - first, 0)  # every key of every row masked
            log_tile = tile if needs.log_probabilities else None
        elif needs.log_probabilities:
            tile, log_tile = _log_weights(q[:, :, first:last], part, tile_mask, is_causal, scale_factor, tile_buffer,
                                          log_tile_buffer, tile_index, low, first_row, finite)
        else:
            tile = _weights(q[:, :, first:last], part, tile_mask, is_causal, scale_factor, tile_buffer, work,
                            tile_index, low, first_row)
        if key_index is not None:
            tile = tile.index_select(3, key_index)  # (B, H, rows, kept keys)
            log_tile = None if log_tile is None else log_tile.index_select(3, key_index)
        if tile_sink is not None:
            if assembled is not None:  # the band with its zeros, from key 0 (to its last key, when narrow)
                full = max(hi, 1) if needs.narrow else source
                if lo > 0 or hi < full:
                    tile, log_tile = assembled(tile, log_tile, lo, full)
            band = {"first_key": lo} if lo and assembled is None else {}  # a sink that takes bands
            if log_tile is not None:
                tile_sink(tile, row_index[first:last], shape, log_tile, **band)
            else:
                tile_sink(tile, row_index[first:last], shape, **band)
            continue
        if copies is None:  # (B, H, rows, hi - lo), converted to the stored dtype on the way
            out[:, :, first:last, lo:hi].copy_(tile)
        else:  # from an accelerator: through pinned buffers, while the next tile is computed
            copies.copy(out[:, :, first:last, lo:hi], tile)
        if not zeroed:
            if lo > 0:
                out[:, :, first:last, :lo].zero_()
            if hi < kept:
                out[:, :, first:last, hi:].zero_()
    if copies is not None:
        copies.finish()
    return out


class _Assembly:
    """A tile of keys ``lo .. lo + n`` (a band a mask leaves to a tile's rows) laid out from key 0 in
    buffers of their own, zeros around it, for sinks that take tiles from the first key on."""

    def __init__(self, scratch: torch.Tensor, log_scratch: Optional[torch.Tensor]):
        self._like = scratch
        self._tile: Optional[torch.Tensor] = None  # made at the first band (the size of scratch)
        self._log: Optional[torch.Tensor] = None
        self._with_log = log_scratch is not None

    def __call__(self, tile: torch.Tensor, log_tile: Optional[torch.Tensor], lo: int, width: int):
        """``(tile, log_tile)`` as ``(B, H, rows, width)``: the band at keys ``lo ..``, zeros elsewhere."""
        if self._tile is None:
            self._tile = torch.empty_like(self._like)
            self._log = torch.empty_like(self._like) if self._with_log else None
        shape = tuple(tile.shape[:3]) + (width,)
        placed = self._place(self._tile, shape, tile, lo)
        return placed, (None if log_tile is None else self._place(self._log, shape, log_tile, lo))

    @staticmethod
    def _place(buffer: torch.Tensor, shape, band: torch.Tensor, lo: int) -> torch.Tensor:
        whole = buffer[: math.prod(shape)].view(shape).zero_()
        whole[..., lo:lo + band.shape[3]].copy_(band)
        return whole


def _key_bands(mask: torch.Tensor, starts: Sequence[int], rows: int, length: int,
               very_negative: bool = True) -> Optional[list]:
    """``[(lo, hi)]`` per tile of query rows (tile ``i``: rows ``starts[i] ..`` up to ``rows`` of them):
    the keys before ``lo`` and from ``hi`` on are masked for every row of the tile in every batch item
    and head. ``None`` when no tile loses a key. Read from the mask a tile at a time (no ``(L, S)``
    copy of it), with one transfer to the host for the whole call.

    Masked: ``False`` in a bool mask, ``-inf`` in a float one, and float values at most
    :data:`_VERY_NEGATIVE` (float32's and bfloat16's ``finfo.min``, as legacy masks hold) in a tile
    whose every row has a key at least :data:`_CLEARLY_ABOVE`: their weight underflows to exactly 0
    beside that key (their difference is over 9e37). Otherwise (a row left only very negative keys is
    uniform over them, not masked) only ``-inf`` keys are skipped. A tile whose mask holds a NaN is
    computed whole, so that its row is NaN throughout, as the formula has it.

    Args:
        mask: ``(B|1, H|1, L|1, S)``, its rows those of the tiles.
        very_negative: whether very negative values may count as masked (``False`` beside
            ``is_causal``, which may leave a row only such keys where the mask alone does not, and
            for float64 scores, whose range reaches past the bounds).
    """
    source = mask.shape[3]
    per_row = mask.shape[2] > 1
    seen = []
    for first in starts if per_row else starts[:1]:
        part = mask[:, :, first:min(length, first + rows)] if per_row else mask
        if part.dtype == torch.bool:
            seen.append(part.any(dim=(0, 1, 2)))  # (S,): a key some row of the tile may see
            continue
        # Two reads of the mask: each key's highest value over the tile's rows, each row's highest.
        column_max, row_max = part.amax(dim=(0, 1, 2)), part.amax(-1)  # (S,), (B|1, H|1, r)
        skip_very = (row_max >= _CLEARLY_ABOVE).all() & very_negative  # every row keeps a key far above
        bound = torch.where(skip_very, _VERY_NEGATIVE, -math.inf)  # keys at most this weigh 0 everywhere
        kept = ~(column_max <= bound)  # (a NaN column is kept)
        # A NaN in the mask makes its row NaN: such a tile is computed whole, as the formula has it.
        seen.append(kept | torch.isnan(row_max).any())
    seen = torch.stack(seen)  # (tiles, S)
    keys = torch.arange(source, device=mask.device)
    lo = torch.where(seen, keys, source).amin(1)  # first key seen (S when none)
    hi = torch.where(seen, keys + 1, 0).amax(1)  # after the last key seen (0 when none)
    bounds = torch.stack([lo, hi], 1).tolist()
    if not per_row:
        bounds = bounds * len(starts)
    if all(lo == 0 and hi == source for lo, hi in bounds):
        return None
    return [(lo, hi) if lo < hi else (0, 0) for lo, hi in bounds]


def _check_inputs(query, key, attn_mask) -> None:
    """Shapes and dtypes the reference formula needs, checked before any work."""
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = type(t).__name__ if not isinstance(t, torch.Tensor) else str(t.dtype)
            raise AttentionHookerError(f"{name} must be a floating tensor, got {got}; expected (..., heads, positions, dim)")
        if t.dim() < 2:
            raise AttentionHookerError(f"{name} must have at least 2 dims (positions, dim), got shape {tuple(t.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise AttentionHookerError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} must share the last dim (the head dim)"
        )
    n_q = query.shape[-3] if query.dim() >= 3 else 1
    n_k = key.shape[-3] if key.dim() >= 3 else 1
    if n_q % n_k:
        raise AttentionHookerError(
            f"{n_q} query heads cannot share {n_k} key heads: grouped-query attention needs a divisor"
        )
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise AttentionHookerError(f"attn_mask must be a bool or float tensor or None, got {type(attn_mask).__name__}")


def _broadcast(a: tuple, b: tuple) -> tuple:
    """Broadcasts two shapes (as ``torch.broadcast_shapes``, which costs ~30 us a call
    through its Python reference implementation: this runs on every captured call).

    Raises:
        ValueError: when they do not broadcast.
    """
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            raise ValueError(f"shapes {a} and {b} do not broadcast")
        out.append(y if x == 1 else x)
    return tuple(out)


def _scores_surely_finite(q: torch.Tensor, k: torch.Tensor, scale: float) -> bool:
    """Whether every score ``scale * q_i . k_j`` (and every partial sum of it) is surely finite:
    by Cauchy-Schwarz each is at most ``sqrt(sum(q^2) * sum(k^2)) * max(1, |scale|)``, read with
    two dot products (a NaN or an infinity makes the bound NaN or infinite; a bound too large
    only says "not sure"). ``q`` and ``k`` are float32 or float64, contiguous."""
    q, k = q.reshape(-1), k.reshape(-1)
    bound = torch.sqrt(torch.dot(q, q) * torch.dot(k, k)) * max(1.0, abs(scale))
    return bool(bound < torch.finfo(q.dtype).max)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as the kernels add it to the scores: a bool mask as ``0`` where ``True`` and ``-inf``
    where ``False``; a float mask in ``dtype``."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _empty_rows(mask, above_diagonal) -> Optional[torch.Tensor]:
    """``(B|1, H|1, L|1, 1)`` booleans: the query rows whose every key is masked (their softmax is
    NaN; the kernels give them zeros), or ``None`` when no row is.

    Decided on the mask, which is at most ``(B, H, L, S)`` booleans and usually
    far smaller than the weights, so that the common case skips a pass over them.
    ``above_diagonal`` is the causal mask's hidden ``(L, S)`` part, or ``None``.
    Only these rows are set to zero: a NaN anywhere else (a NaN query or key the model
    produced) stays NaN, as it is in the kernel's output.
    """
    if mask is None:
        return None  # a top-left causal mask leaves key 0 to every query
    blocked = ~mask if mask.dtype == torch.bool else torch.isneginf(mask)  # (B|1, H|1, L|1, S)
    if above_diagonal is not None:
        blocked = blocked | above_diagonal
    empty = blocked.all(-1, keepdim=True)
    return empty if bool(empty.any()) else None


def _differentiable_weights(q, k, mask, is_causal: bool, scale: float, row_index) -> torch.Tensor:
    """The same formula with out-of-place operations only, so autograd can follow it."""
    if q.dtype in _HALF:  # float32 scores and softmax, as the kernels compute them
        q, k = q.float(), k.float()
    if 1 < k.shape[1] < q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, Hq, S, E)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, L, S)
    above_diagonal = None
    if is_causal:
        above_diagonal = torch.arange(k.shape[2], device=q.device)[None, :] > row_index[:, None]  # (rows, S)
        scores = scores.masked_fill(above_diagonal, float("-inf"))
    if mask is not None:
        scores = scores + _additive(mask, scores.dtype)
    empty = _empty_rows(mask, above_diagonal)
    if empty is None:
        return torch.softmax(scores, dim=-1)
    empty = empty & torch.isneginf(scores.detach()).all(-1, keepdim=True)  # a NaN score: NaN, as in the kernel
    # Rows that see no key: zeros, and no gradient through them (the softmax of a row of -inf is NaN,
    # and its backward would spread NaN to every key); filled before the softmax, then after it.
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def _scaled_scores(q: torch.Tensor, k: torch.Tensor, scale: float, buffer) -> torch.Tensor:
    """``scale * q @ k^T`` written into one tensor ``(B, H, L, S)``: the only large allocation.

    The scale is applied by the matrix product itself (``baddbmm``'s ``alpha``),
    so no scaled copy of ``q`` is made. Where ``(batch, heads)`` of ``q`` or ``k``
    cannot be flattened without a copy (Hugging Face's ``(B, L, H, E)`` projections
    seen through a transpose, with batch > 1), the product is taken one batch
    item at a time instead: copying them would cost fresh memory larger than ``q``.
    """
    if q.dtype in _HALF:  # as the kernels do: scores and softmax in float32, not rounded to half first
        q, k = q.float(), k.float()
        buffer = None
    if 1 < k.shape[1] < q.shape[1]:
        return _grouped_scores(q, k, scale, buffer)
    shape = _broadcast(tuple(q.shape[:2]), tuple(k.shape[:2])) + (q.shape[2], k.shape[2])
    scores = buffer(shape, q.dtype, q.device) if buffer is not None else torch.empty(shape, dtype=q.dtype, device=q.device)
    if scores.numel() == 0 or q.shape[:2] != shape[:2] or k.shape[:2] != shape[:2]:  # empty, or broadcast
        return torch.matmul(q * scale, k.transpose(-2, -1), out=scores)
    q3, k3 = _flat_view(q), _flat_view(k)  # (B*H, L, E), (B*H, S, E) or None
    if (q3 is not None and k3 is not None) or shape[0] > _MAX_BATCH_LOOP:
        flat = scores.view(-1, shape[2], shape[3])  # (B*H, L, S)
        q3 = q3 if q3 is not None else q.reshape(flat.shape[0], shape[2], -1)
        k3 = k3 if k3 is not None else k.reshape(flat.shape[0], shape[3], -1)
        torch.baddbmm(flat, q3, k3.transpose(1, 2), beta=0, alpha=scale, out=flat)  # beta=0 ignores flat's contents
        return scores
    for item in range(shape[0]):  # (H, L, E) @ (H, E, S) -> (H, L, S)
        torch.baddbmm(scores[item], q[item], k[item].transpose(1, 2), beta=0, alpha=scale, out=scores[item])
    return scores


def _grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float, buffer) -> torch.Tensor:
    """``scale * q @ k^T`` ``(B, Hq, L, S)`` for grouped-query attention: kv head ``h``
    serves query heads ``h*g .. h*g+g-1`` (``g = Hq / Hk``, as ``enable_gqa`` and
    ``repeat_interleave`` pair them). The ``g`` query heads of a group are stacked as
    ``g*L`` rows of one product with their kv head's keys, so the keys are never
    copied ``g`` times (at long context that copy is the largest tensor of the call)."""
    batch = max(q.shape[0], k.shape[0])
    groups, n_k_heads = q.shape[1] // k.shape[1], k.shape[1]
    length, source, width = q.shape[2], k.shape[2], q.shape[3]
    if q.shape[0] != k.shape[0]:  # broadcast batch: rare; pair the heads by a copy
        return _scaled_scores(q, k.repeat_interleave(groups, dim=1), scale, buffer)
    shape = (batch, q.shape[1], length, source)
    scores = buffer(shape, q.dtype, q.device) if buffer is not None else torch.empty(shape, dtype=q.dtype, device=q.device)
    if scores.numel() == 0:
        return scores
    flat = scores.view(batch * n_k_heads, groups * length, source)  # (B*Hk, g*L, S) = (B, Hq, L, S)
    q3 = q.reshape(batch * n_k_heads, groups * length, width)  # a copy only where q is not laid out so
    k3 = k.reshape(batch * n_k_heads, source, width)
    torch.baddbmm(flat, q3, k3.transpose(1, 2), beta=0, alpha=scale, out=flat)
    return scores


_HALF = (torch.float16, torch.bfloat16)
_EVERYTHING = Selection()
TILE_BYTES = 4 * 2**20  # working scores of one tile of query rows on the CPU (store_as, tile_sink, large maps)
WHOLE_BYTES = 16 * 2**20  # a CPU map larger than this (in float32) is computed in tiles, straight into its place
# (on an accelerator: a map larger than one tile, _tile_bytes)
CAUSAL_BLOCK_ROWS, CAUSAL_BLOCKS_FROM = 64, 384  # a causal CPU map of 384 rows or more: in blocks of <= 64 rows
# A float mask's value at most _VERY_NEGATIVE, beside a key of its row at least _CLEARLY_ABOVE, weighs
# exactly 0 in float32 scores (exp of less than -9e37): such keys are skipped like -inf ones (_key_bands).
_VERY_NEGATIVE, _CLEARLY_ABOVE = -1e38, -1e30
_MAX_BATCH_LOOP = 64  # beyond this many items, one copy costs less than the per-item calls


def _flat_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``(B, H, N, E)`` as a ``(B*H, N, E)`` view, or ``None`` where that needs a copy."""
    try:
        return t.view(-1, t.shape[2], t.shape[3])
    except RuntimeError:
        return None


def _in_place_if_fits(scores, mask, in_place, out_of_place):
    if _broadcast(tuple(scores.shape), tuple(mask.shape)) == tuple(scores.shape):
        in_place(scores, mask)
        return scores
    return out_of_place(scores, mask)


def _softmax_last_dim(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; on the CPU written over ``scores`` (no second L x L buffer).

    The CPU kernel reads each element of a row before writing the same element,
    so the in-place form gives the same numbers as ``torch.softmax``.
    """
    if scores.device.type == "cpu" and scores.is_contiguous():
        return softmax_last_dim_into(scores)
    return torch.softmax(scores, dim=-1)
