"""One layer call, its attention computed in pieces, assembled into one ``(batch, heads, query, key)`` map.

Some attention layers never compute their map in one piece: Longformer computes a band of
keys around each query plus global columns in one softmax and the global rows in another;
block-sparse, per-image or differential layers make several calls too. The generic routes
see each piece as a call of its own, and a layer call that made several is refused
(:meth:`~.session.CaptureSession._flush`). A *pieced family* says where its pieces go;
this module owns the rest:

1. At hooking, :func:`pieced_layer` asks each family rule (:data:`FAMILIES`) whether the
   hooked module is one of its layers; the rule found is carried on the layer's scope.
2. At each call of the layer, :meth:`PiecedLayer.start` reads what the call was given
   (its keyword arguments, masks) and returns a :class:`PieceCall` for that call only. A call
   the capture will not keep (``max_calls`` reached) is not started: :data:`UNKEPT_CALL` takes
   its pieces and drops them at once, so a long ``generate`` holds and compares nothing.
3. Every raw attention computation inside the call (a softmax over the last dim, an
   ``F.scaled_dot_product_attention`` call) is offered to the :class:`PieceCall`
   *before* the generic labelling: :meth:`PieceCall.take_softmax` /
   :meth:`PieceCall.take_sdpa` keep a reference to it (nothing is copied) or say why it
   is not one of the family's pieces (the whole call is then refused).
4. When the layer call returns, :meth:`PieceCall.assemble` is asked for the selected
   heads, query rows and key columns only (``heads=``, ``rows=``, ``keys=``), so a row of a
   long input costs a row; :func:`keep_pieced_call` hands the result to the keepers whole
   (memory) or a tile of rows at a time (streaming, reductions), exactly like the windowed
   layers (:mod:`.windows`) do.

A family adds a :class:`PiecedLayer` subclass and a rule ``(module, parents) -> PiecedLayer or
None`` appended to :data:`FAMILIES` (imported by :func:`pieced_layer`); the routes and the session
are not touched. A piece taken from an sdpa call has no weights yet: the family computes them from
the call's own inputs (:func:`.routes.sdpa.sdpa_attention_weights`) when it assembles. Pieces are
held by reference until the call returns (a softmax result the model itself would have dropped
earlier lives that long). With ``keep_values``, the value vectors are what the family's value
submodules returned to the model in the call (:attr:`PiecedLayer.value_modules`, watched by
:mod:`.value_tap`), never a second call of them. Families:

* :mod:`.bands`: Longformer, LED's encoder.
* :mod:`.segments`: Qwen2-VL / Qwen2.5-VL vision towers.
* :mod:`.differential`: DiffLlama.
* :mod:`.block_sparse`: BigBird and BigBird-Pegasus block-sparse attention.
* :mod:`.ngram`: ProphetNet's n-gram self-attention.
* :mod:`.ngram_cross`: ProphetNet's decoder cross-attention (its rows are the main and predict streams).
* :mod:`.landmarks`: Nystromformer.
* :mod:`.local_blocks`: LongT5 local and transient-global.
* :mod:`.global_tokens`: PEGASUS-X.
* :mod:`.mask_units`: Hiera's mask-unit attention (transformers, timm).
* :mod:`.channels`: timm XCiT (a map over channels only, kept as the entry ``"<layer>:channels"``).

A call may also make maps of another kind beside its token map (ProphetNet's n-gram streams,
whose queries are not the layer's tokens): :attr:`Assembly.named` holds them, and each is kept
as an entry of its own, ``"<layer>:<kind>"`` (:func:`named_entry`), with the same selection,
memory guard, tiles and ``max_calls`` as the layer's map, never in the layer's token slot.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._torch_private import no_function_modes
from ..keep.protocol import NO_SOURCES, CallSources
from .value_tap import SeenValues, ValueTap

__all__ = ["select_block", "PieceCall", "PiecedLayer", "Assembly", "FAMILIES", "pieced_layer", "named_entry", "ROWS_PER_TILE",
           "UNKEPT_CALL"]

# Rows of a pieced map assembled at once when the keepers take tiles (streaming, reductions):
# a Longformer layer at 4,096 tokens and 12 heads is then 12 x 256 x 4,096 floats (50 MB) at a time.
ROWS_PER_TILE = 256


class Assembly:
    """What a finished pieced call can make: its sizes, and its map a block of rows at a time.

    Attributes:
        batch, heads, queries, keys: the sizes of the whole ``(batch, heads, query, key)`` map.
        dtype: the dtype the map is stored in (the one its pieces multiplied the values in).
        sources: what memory keeps beside the map (value vectors ``(batch, heads, key, dim)``).
        named: ``{kind: Assembly}``, maps of another kind the same call made beside its token
            map, each kept as the entry :func:`named_entry` names (empty for most families).
        no_token_map: why the call has no map over tokens at all (XCiT's channel map), or
            ``None``: with a reason, only the ``named`` entries are kept, and the layer's call
            is counted refused with this reason (naming the entries kept instead).
    """

    def __init__(self, batch: int, heads: int, queries: int, keys: int, dtype: torch.dtype,
                 rows: Callable[[Optional[Sequence[int]], torch.Tensor, Optional[Sequence[int]]], torch.Tensor],
                 sources: CallSources = NO_SOURCES, named: Optional[Dict[str, "Assembly"]] = None,
                 no_token_map: Optional[str] = None):
        self.batch, self.heads, self.queries, self.keys = batch, heads, queries, keys
        self.dtype = dtype
        self._rows = rows
        self.sources = sources
        self.named: Dict[str, Assembly] = dict(named or {})
        self.no_token_map = no_token_map

    def rows(self, heads: Optional[Sequence[int]], rows: torch.Tensor, keys: Optional[Sequence[int]]) -> torch.Tensor:
        """``(batch, len(heads) or all, len(rows), len(keys) or all)``: the map at these absolute query
        ``rows`` (a long tensor), only these heads and keys (``None``: all), exact zeros where no key
        was attended."""
        return self._rows(heads, rows, keys)


class PieceCall:
    """The pieces of one call of a pieced layer, kept by reference until the call returns.

    Subclasses implement the three methods; each returns a reason (a sentence naming what
    and why) instead of a result when the call cannot be assembled exactly.
    """

    def take_softmax(self, result: torch.Tensor) -> Optional[str]:
        """Keeps a softmax over the last dim computed inside the call, or says why it is not a piece."""
        return (f"a softmax of shape {tuple(result.shape)} inside a layer whose attention is assembled from "
                "known pieces, none of which it is")

    def take_sdpa(self, call: dict) -> Optional[str]:
        """Keeps an ``F.scaled_dot_product_attention`` call (its parsed arguments: query, key, value,
        attn_mask, is_causal, scale, enable_gqa), or says why it is not a piece."""
        query = call.get("query")
        shape = tuple(query.shape) if isinstance(query, torch.Tensor) else None
        return (f"a scaled_dot_product_attention call (query {shape}) inside a layer whose attention is "
                "assembled from known pieces, none of which it is")

    def assemble(self, keep_values: bool) -> Union[Assembly, str]:
        """The call's :class:`Assembly` once it has returned, or why its map cannot be made
        (a piece missing, or ``keep_values`` asked of a layer whose rows multiply different values)."""
        raise NotImplementedError


class _UnkeptCall(PieceCall):
    """A call the capture will not keep (``max_calls`` reached when it began): every attention computation
    inside it is taken and dropped at once (none is held, compared or labelled), and it assembles nothing."""

    def take_softmax(self, result: torch.Tensor) -> None:
        return None

    def take_sdpa(self, call: dict) -> None:
        return None

    def assemble(self, keep_values: bool) -> str:
        return "a call begun when max_calls was reached: its pieces were dropped as they came"


# Handed to the session in place of a family's call when the router will not keep the call: the family's
# start() is not run, and the session counts the call as skipped (CaptureSession._assemble_pieces).
UNKEPT_CALL = _UnkeptCall()


class PiecedLayer:
    """A family rule: one hooked module whose calls compute their map in pieces.

    Attributes:
        family: a name for messages (``"transformers Longformer"``).
    """

    family = "pieced attention"
    # The attribute names of the layer's submodules whose outputs are the value vectors its calls
    # multiply (``("value",)``): with keep_values, what they returned to the model is kept
    # (:mod:`.value_tap`), never made again. Empty: the family's calls hand their values over themselves.
    value_modules: Tuple[str, ...] = ()
    _tap: Optional[ValueTap] = None

    def install(self, add_handle: Callable, module: Optional[nn.Module] = None, keep_values: bool = False) -> None:
        """Puts any hook the family needs on the model (handed to ``add_handle`` to be removed with
        the capture's): with ``keep_values``, the :class:`~.value_tap.ValueTap` on ``module``'s
        :attr:`value_modules`. What a call is given is in :meth:`start`'s arguments."""
        if keep_values and module is not None and self.value_modules:
            self._tap = ValueTap(module, self.value_modules)
            self._tap.install(add_handle)

    def seen_values(self) -> Optional[SeenValues]:
        """For :meth:`start`: the record of what the value submodules return in the call starting on
        this thread (``None`` when no values are kept)."""
        return None if self._tap is None else self._tap.current()

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> Union[PieceCall, str]:
        """A :class:`PieceCall` for the call of ``module`` with these arguments, or why it cannot be read."""
        raise NotImplementedError

    def slot(self) -> Optional[Tuple[nn.Module, str]]:
        """``(parent, attribute)`` holding the hooked module, for a family whose model may put another
        module in its place while running (BigBird on short inputs): the capture then watches each call
        of ``parent`` and reports the hooked module swapped out (:meth:`swapped`). ``None`` (most): no watch."""
        return None

    def swapped(self, layer: str, replacement: object) -> str:
        """Why ``layer`` captures nothing now that its parent holds ``replacement`` in its place, and what to do."""
        return (f"layer {layer!r} was replaced in the model by a {type(replacement).__name__} while hooked: the "
                "hooked module no longer runs, so nothing of it is captured; hook the model again")


# Each entry: (module, parents) -> PiecedLayer or None; filled by the family modules (see pieced_layer).
FAMILIES: List[Callable[[nn.Module, object], Optional[PiecedLayer]]] = []


def pieced_layer(module: nn.Module, parents) -> Optional[PiecedLayer]:
    """The family rule of a hooked attention module whose calls compute their map in pieces, or ``None``.

    Args:
        module: a hooked attention module.
        parents: ``{id(child): parent}`` over the model's modules (looked up only by a rule that needs it).
    """
    # The families register themselves on their first import; every one is imported here, not only
    # when none is registered yet: a program (or a test) that imported one family module first would
    # otherwise leave the others unregistered, and their layers refused.
    from . import (bands, block_sparse, channels, differential, global_tokens, landmarks,  # noqa: F401
                   local_blocks, mask_units, ngram, ngram_cross, segments)
    for rule in FAMILIES:
        found = rule(module, parents)
        if found is not None:
            return found
    return None


def named_entry(layer: str, kind: str) -> str:
    """The entry a map of another kind made by a call of ``layer`` is kept under (``hooker.values``,
    saved captures): the layer's name, a colon, the kind.

    Example:
        >>> named_entry("decoder.layers.0.self_attn", "ngram1")
        'decoder.layers.0.self_attn:ngram1'
    """
    return f"{layer}:{kind}"


def select_block(weights: torch.Tensor, heads: Optional[Sequence[int]], rows: torch.Tensor,
                 keys: Optional[Sequence[int]], dtype: torch.dtype, first_row: int = 0) -> torch.Tensor:
    """A whole piece ``weights`` ``(batch, heads, query, key)`` at these heads, query ``rows`` (offset by
    ``first_row``: a stream's rows inside a larger softmax) and keys (``None``: all), as a new tensor in
    ``dtype``, for a family whose :class:`Assembly` cuts rows out of one kept map."""
    with torch.no_grad(), no_function_modes():  # the capture's own indexing: no mode sees it
        out = weights
        if heads is not None:
            out = out.index_select(1, torch.as_tensor(list(heads), device=out.device))
        out = out.index_select(2, rows.to(out.device) + first_row)
        if keys is not None:
            out = out.index_select(3, torch.as_tensor(list(keys), device=out.device))
        return out.to(dtype)


def selected_sizes(assembly: Assembly, chosen) -> Tuple[int, int, int]:
    """``(heads, rows, keys)`` a resolved selection (``None`` per axis: all) keeps of ``assembly``."""
    return tuple(len(c) if c is not None else n
                 for c, n in zip(chosen, (assembly.heads, assembly.queries, assembly.keys)))
