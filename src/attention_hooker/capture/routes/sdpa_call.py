"""Route 2, the call: an ``F.scaled_dot_product_attention`` inside a hooked module. The real
kernel computes the output; the weights it used are recomputed from its own inputs
(:func:`.sdpa.sdpa_attention_weights`) and handed to the session, or the call is refused with
its reason (a layout that is not ``(batch, heads, query, key)``, channel attention)."""

from __future__ import annotations

import weakref
from typing import Any, List, Optional, Tuple

import torch

from ..._torch_private import caller_frame, frame_local
from ...keep.device_budget import AUTO
from ...keep.host_copy import copy_to_host
from ...keep.protocol import CallSources, GradientSource
from ..inputs import channel_attention_refusal, folded_batch_refusal
from ..batching import at_positions
from ..heads import declared_heads
from .sdpa import TileNeeds, as_4d, packed_query_groups, parse_sdpa_call, sdpa_attention_weights, unpack_query_groups

__all__ = ["handle_sdpa"]



def handle_sdpa(session, func, args: tuple, kwargs: dict) -> Any:
    """Runs the real kernel and records the weights it used, labelled ``(batch, heads, query, key)``."""
    scope = session.current_scope()
    layer = None if scope is None else scope.layer
    if layer is None:
        return func(*args, **kwargs)
    if scope.pieces is not None:  # a pieced layer (capture/pieces.py): one of its pieces, placed at its return
        output = func(*args, **kwargs)
        session.offer_piece(scope, scope.pieces.take_sdpa(parse_sdpa_call(args, kwargs)))
        return output
    router = session.router
    if not router.wants(layer):
        session.skip(layer)
        return func(*args, **kwargs)
    call, refusal = _unfolded(scope, parse_sdpa_call(args, kwargs))
    if not (router.policy.keep_grad and torch.is_grad_enabled()):  # keep_grad computes the output from call
        call = _unblocked(scope, call)
    groups = packed_query_groups(lambda: _calling_modules(scope), call["query"], call["key"])
    refusal = refusal or _refusal(scope, call, groups)
    if refusal is not None:
        session.refuse(scope, refusal)
        return func(*args, **kwargs)
    if scope.packing is not None:  # continuous batching: each request's part on its own
        output = func(*args, **kwargs)
        _keep_requests(session, scope, call, layer, groups)
        return output
    if router.policy.keep_grad and torch.is_grad_enabled():
        return _with_grad(session, func, args, kwargs, call, layer, groups)
    if router.policy.output_from == "weights" and _output_from_weights_applies(scope, router, call, groups):
        return _output_from_weights(session, call, layer, args, kwargs)
    output = func(*args, **kwargs)
    if scope.windows is not None:  # windowed (Swin): the whole per-window map, placed at the image's tokens
        with torch.no_grad():  # by the session, then selected by the router (rows are tokens, not window slots)
            weights = _weights(call, layer)  # (B * nW, H, N, N)
        session.record(layer, weights, CallSources(value=call["value"]))
    elif groups > 1:  # packed decode queries: the whole map, unpacked, then selected by the router
        with torch.no_grad():
            weights = _weights(call, layer, buffer=_spare_buffer(router, layer),
                               store_as=_stored_as(router, call))  # (B, Hk, groups, S)
        session.record(layer, unpack_query_groups(weights, groups), CallSources(value=call["value"]))  # (B, H, 1, S)
    elif router.takes_tiles:  # kept tile by tile: no layer is ever held
        _keep_in_tiles(session, call, layer)
    else:
        _keep_whole(session, call, layer)
    return output


def _unfolded(scope, call: dict) -> Tuple[dict, Optional[str]]:
    """``(call, reason)``: a 3-D call ``(batch * heads, query, dim)`` (timm's VisionTransformerSAM
    folds the heads into the batch) of a module that declares its heads, as ``(batch, heads, query,
    dim)``, once its first dim is checked to be the layer's batch times those heads (as for a 3-D
    softmax, :func:`~..inputs.folded_batch_refusal`), or the reason it is not that layout; any other
    call as it is. A first dim equal to the heads is one item, read as before: ``(1, heads, ...)``.

    Only the weights are computed from the unfolded tensors: the kernel runs on the call as given."""
    query, key, value, mask = (call[name] for name in ("query", "key", "value", "attn_mask"))
    heads = declared_heads(scope.module)
    if heads is None or not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (query, key, value)):
        return call, None
    folded = query.shape[0]
    what = f"a scaled_dot_product_attention call on a 3-D query {tuple(query.shape)}"
    if folded % heads:
        return call, (f"{what} whose 1st dim is not a multiple of the layer's {heads} heads: it cannot be read as "
                      "(batch * heads, query, dim), so it is not stored")
    refusal = None if folded == heads else folded_batch_refusal(scope.input_shape, heads, folded, what)
    batch = folded // heads
    if refusal is None and batch > 1 and heads > 1 and not _folds_batch_major(scope.module):
        # (batch * heads) and (heads * batch) have the same shape: only code read to fold batch-major is unfolded.
        refusal = (f"{what} folds {batch} inputs and {heads} heads into its 1st dim, and from shapes alone "
                   f"batch-major (batch * heads) cannot be told from head-major (heads * batch) folding; "
                   f"{type(scope.module).__name__} is not a module known to fold batch-major, so it is not stored "
                   "(call the layer with one input at a time, or keep (batch, heads, query, dim) 4-D)")
    if refusal is None and (key.shape[0] % batch or value.shape[0] != key.shape[0]):
        refusal = (f"{what} whose key {tuple(key.shape)} and value {tuple(value.shape)} are not (batch * kv heads, "
                   f"key, dim) for its batch of {batch}, so it is not stored")
    if refusal is None and isinstance(mask, torch.Tensor) and mask.dim() == 3:
        if mask.shape[0] == folded:
            mask = mask.reshape(batch, heads, mask.shape[1], mask.shape[2])
        elif mask.shape[0] == 1:
            mask = mask.unsqueeze(0)
        else:
            refusal = f"{what} whose attn_mask {tuple(mask.shape)} is not per (batch * heads) nor shared, so it is not stored"
    elif refusal is None and isinstance(mask, torch.Tensor) and mask.dim() > 3:
        refusal = f"{what} whose attn_mask {tuple(mask.shape)} has more dims than it, so it is not stored"
    if refusal is not None:
        return call, refusal
    unfold = lambda t: t.reshape(batch, t.shape[0] // batch, t.shape[1], t.shape[2])  # noqa: E731
    return dict(call, query=unfold(query), key=unfold(key), value=unfold(value), attn_mask=mask), None


# Modules read to fold the heads into the batch batch-major, (batch * heads, tokens, dim), before
# F.scaled_dot_product_attention: timm's VisionTransformerSAM attention (q.reshape(3, B * num_heads, N, -1)).
_BATCH_MAJOR_FOLDERS = ("timm.models.vision_transformer_sam",)


def _folds_batch_major(module) -> bool:
    return type(module).__module__.startswith(_BATCH_MAJOR_FOLDERS)


def _unblocked(scope, call: dict) -> dict:
    """A recognised blocked windowed module's 5-D call ``(batch, windows, heads, N, dim)`` (Twins) as the
    batch-major ``(batch * windows, heads, N, dim)`` its windows are placed from; any other call as it is
    (a 5-D one is refused by :func:`_layout_refusal`)."""
    tensors = [call[name] for name in ("query", "key", "value")]
    mask = call["attn_mask"]
    if scope.windows is None or not scope.windows.blocked or any(
            not isinstance(t, torch.Tensor) or t.dim() != 5 for t in tensors) or mask is not None:
        return call
    return dict(call, query=tensors[0].flatten(0, 1), key=tensors[1].flatten(0, 1), value=tensors[2].flatten(0, 1))


def _refusal(scope, call: dict, groups: int) -> Optional[str]:
    """Why the call's weights cannot be stored as ``(batch, heads, query, key)``, or ``None``."""
    query = call["query"]
    refusal = _layout_refusal(query, groups, declared_heads(scope.module))
    if refusal is None and groups == 1 and query.dim() == 4:
        refusal = channel_attention_refusal(scope.input_shape, query.shape[1], query.shape[-2], call["key"].shape[-2],
                                            scope.module)
    return refusal


def _weights(call: dict, layer: str, **options) -> Optional[torch.Tensor]:
    """:func:`.sdpa.sdpa_attention_weights` of the call's own inputs."""
    return sdpa_attention_weights(call["query"], call["key"], call["attn_mask"], bool(call["is_causal"]), call["scale"],
                                  bool(call["enable_gqa"]), where=f"layer {layer!r}", **options)


def _spare_buffer(router, layer: str):
    return router.memory.buffer(layer)


def _stored_as(router, call: dict, selection=None, layer: str = ""):
    """``(dtype, device)`` memory stores weights computed from ``query`` in, when that is not
    how they are computed (they are then computed in tiles straight into it: rounded once,
    no whole map in the working dtype or device); else ``None``. ``selection``: what is kept of
    the call (by default its whole map), which ``device="auto"`` weighs against its budget."""
    query = call["query"]
    memory = router.memory
    shape = _weighed_shape(router, call, selection, layer)
    if memory.stores_as_computed(query.dtype, query.device, shape):
        return None
    return router.policy.dtype or query.dtype, memory.target_device(query.device, memory.stored_bytes(shape, query.dtype))


def _weighed_shape(router, call: dict, selection=None, layer: str = "") -> tuple:
    """The call's ``(batch, heads, query, key)``, whole or as ``selection`` keeps it, where
    ``device="auto"`` weighs it against its budget; ``()`` for every other device, and for a call
    computed on the CPU, which stays there whatever its size (unused)."""
    if router.policy.device != AUTO or call["query"].device.type == "cpu":
        return ()
    query, key, mask = call["query"], call["key"], call["attn_mask"]
    batch = max(query.shape[0] if query.dim() > 3 else 1, key.shape[0] if key.dim() > 3 else 1,
                mask.shape[0] if isinstance(mask, torch.Tensor) and mask.dim() > 3 else 1)
    shape = (query.shape[-3] if query.dim() > 2 else 1, query.shape[-2], key.shape[-2])
    if selection is not None and not selection.keeps_everything:
        kept = selection.resolve(*shape, f"layer {layer!r}")
        shape = tuple(n if chosen is None else len(chosen) for n, chosen in zip(shape, (kept.heads, kept.rows,
                                                                                        kept.keys)))
    return (batch,) + shape


def _output_from_weights_applies(scope, router, call: dict, groups: int) -> bool:
    """Whether the call's output may come from its weights (``output_from="weights"``): its whole
    map is computed at once and kept as computed (every head, row and key, in the query's dtype
    and on its device), without dropout, outside autograd."""
    query, selection = call["query"], router.policy.selection
    return (not call["dropout_p"] and groups == 1 and scope.windows is None and not router.takes_tiles
            and selection.heads is None and selection.rows is None and selection.keys is None
            and not torch.is_grad_enabled() and query.dim() == 4 and call["value"].dim() == 4
            and router.memory.stores_as_computed(query.dtype, query.device, _weighed_shape(router, call)))


def _output_from_weights(session, call: dict, layer: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """Keeps the call's weights (as :func:`_keep_whole`) and gives the model ``weights @ value``
    ``(batch, heads, query, value dim)`` in the kernel's dtype: kv heads serve their group of
    query heads without a repeated copy of the values."""
    weights = _keep_whole(session, call, layer)  # (B, H, L, S), in the query's dtype
    value = as_4d(call["value"])  # (B, Hk, S, Ev)
    if weights.device != value.device:  # device="auto" sent the call away after all (another thread's calls)
        weights = weights.to(value.device)
    batch, heads, length, source = weights.shape
    kv_heads = value.shape[1]
    grouped = weights.reshape(batch, kv_heads, (heads // kv_heads) * length, source)  # heads h*g..h*g+g-1 of kv head h
    output = torch.matmul(grouped, value.to(weights.dtype) if value.dtype != weights.dtype else value)
    output = output.reshape(batch, heads, length, value.shape[-1]).to(call["query"].dtype)
    given = parse_sdpa_call(args, kwargs)["query"]
    return output.reshape(tuple(given.shape[:-1]) + (value.shape[-1],))


def _keep_whole(session, call: dict, layer: str, router=None) -> torch.Tensor:
    """Only the selected heads, rows and keys are computed, straight into the tensor that is
    stored (a spare one when there is one). Stored in another dtype or device, they are
    computed in tiles of query rows written into it: no whole layer in the working dtype
    or device. ``router``: a request's (continuous batching), else the capture's."""
    router = router or session.router
    policy = router.policy
    with torch.no_grad():
        weights = _weights(call, layer, selection=policy.selection, buffer=_spare_buffer(router, layer),
                           store_as=_stored_as(router, call, policy.selection, layer))  # (B, h, rows, keys)
    value = as_4d(call["value"]) if policy.keep_values else None
    writer = router.begin_call(layer, weights.shape, weights.dtype, CallSources(value=value))
    writer.write(torch.arange(weights.shape[2]), weights)
    session.keep(layer, writer, tuple(weights.shape), router if router is not session.router else None)
    return weights


def _keep_requests(session, scope, call: dict, layer: str, groups: int) -> None:
    """A continuous-batching call: each request's queries over its own keys (the engine's
    metadata, :mod:`..batching`), computed and kept as a call of the request's own
    ``(1, heads, its queries, its positions)``; the rows and keys of other requests are
    never computed. ``groups`` > 1: one decode query packed as ``(1, kv_heads, groups,
    dim)`` (:func:`.sdpa.packed_query_groups`), unpacked to ``(1, heads, 1, dim)`` first."""
    query, key, value, mask = call["query"], call["key"], call["value"], call["attn_mask"]
    if groups > 1:
        query = query.flatten(1, 2).unsqueeze(2)  # (1, kv_heads * groups, 1, dim): head kv * groups + g
        call = dict(call, enable_gqa=True)
    refusal = None
    if query.dim() != 4 or key.dim() != 4:
        refusal = f"a continuous-batching sdpa call on a {query.dim()}-D query: not (1, heads, query, dim)"
    elif mask is None:
        refusal = ("a continuous-batching sdpa call without a mask: the engine's packed causal attention cannot be "
                   "read per request without it")
    else:
        refusal = scope.packing.check_call((query.shape[0], query.shape[1], query.shape[2], key.shape[2]))
    if refusal is not None:
        session.refuse(scope, refusal)
        return
    steps = None
    if all(s.queries[1] - s.queries[0] == 1 for s in scope.packing.segments):  # decode: one product for all
        with torch.no_grad():
            steps = _decode_steps(call, query, key, mask, scope.packing.segments, layer)  # (requests, H, 1, keys)
    for number, segment in enumerate(scope.packing.segments):
        router = session.request_router(scope, segment)
        if not router.wants(layer):
            session.skip(layer, router)
            continue
        (q0, q1), (k0, k1) = segment.queries, segment.keys
        if steps is not None:  # the request's row, over its own keys only
            value_part = as_4d(value)[:, :, k0:k1] if router.policy.keep_values else None
            _keep_part(session, router, layer, at_positions(steps[number:number + 1, :, :, :k1 - k0], segment),
                       CallSources(value=None if value_part is None else at_positions(value_part, segment, -2)))
            continue
        part = dict(call, query=query[:, :, q0:q1], key=key[:, :, k0:k1], value=value[:, :, k0:k1],
                    attn_mask=mask[..., q0:q1, k0:k1] if mask.shape[-2] > 1 else mask[..., k0:k1], is_causal=False)
        if segment.first_key == 0 and not router.takes_tiles:
            _keep_whole(session, part, layer, router)
            continue
        with torch.no_grad():  # keys a sliding window dropped are placed as zeros, then the selection
            weights = at_positions(_weights(part, layer), segment)  # (1, H, q, positions)
        sources = CallSources(value=at_positions(as_4d(part["value"]), segment, dim=-2)
                              if router.policy.keep_values else None)
        session.keep_map(layer, weights, sources, router)


def _keep_part(session, router, layer: str, part: torch.Tensor, sources: CallSources) -> None:
    """One request's part of a batch's weights ``(1, heads, rows, keys)``: the selection
    applied, then copied once into what is stored (the spare buffers, or the arena where its
    layer's small step calls lie side by side: thousands of small tensors, each on its own,
    would scatter the heap)."""
    kept = router.policy.selection.apply(part, f"layer {layer!r}")
    if not router.takes_tiles:
        memory = router.memory
        placed = _spare_buffer(router, layer)(tuple(kept.shape), router.policy.dtype or kept.dtype,
                                              memory.target_device(kept.device, memory.stored_bytes(kept.shape, kept.dtype)))
        kept = copy_to_host(placed, kept)
    writer = router.begin_call(layer, kept.shape, kept.dtype, sources)
    writer.write(torch.arange(kept.shape[2]), kept)
    session.keep(layer, writer, tuple(kept.shape), router)


def _decode_steps(call: dict, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, segments,
                  layer: str) -> torch.Tensor:
    """The decode steps of a packed continuous-batching call, one query per request, as one
    batch: each request's query ``(1, heads, 1, dim)`` over its own keys, gathered and padded
    to the longest (the padding masked out). Returns ``(requests, heads, 1, longest)``; request
    ``i``'s weights are ``[i, :, :, :its keys]``; ``None`` for a mask that is not one plane
    (per batch item or head), computed request by request instead. Costs the requests' keys,
    not the packed ``requests x every key`` product."""
    lengths = [s.keys[1] - s.keys[0] for s in segments]
    longest = max(lengths)
    offsets = torch.arange(longest, device=key.device)
    starts = torch.tensor([s.keys[0] for s in segments], device=key.device)
    lengths_t = torch.tensor(lengths, device=key.device)
    valid = offsets[None, :] < lengths_t[:, None]  # (requests, longest)
    index = torch.where(valid, starts[:, None] + offsets[None, :], torch.zeros_like(offsets)[None, :])
    rows = torch.tensor([s.queries[0] for s in segments], device=query.device)
    queries = query[0].index_select(1, rows).transpose(0, 1).unsqueeze(2)  # (requests, H, 1, dim)
    keys = key[0][:, index].transpose(0, 1)  # (requests, Hk, longest, dim)
    if mask.dim() < 2 or any(n != 1 for n in mask.shape[:-2]):  # a mask per batch item or head: request by request
        return None
    plane = mask.reshape(mask.shape[-2:]).expand(query.shape[2], key.shape[2])  # (packed queries, packed keys)
    own = torch.gather(plane[rows.to(mask.device)], 1, index.to(mask.device))  # (requests, longest)
    if own.dtype == torch.bool:
        own = own & valid
    else:
        own = own.masked_fill(~valid, float("-inf"))
    return _weights(dict(call, query=queries, key=keys, attn_mask=own[:, None, None, :], is_causal=False), layer)


def _keep_in_tiles(session, call: dict, layer: str) -> None:
    """The keepers take the selected weights a tile of query rows at a time, as computed."""
    router = session.router
    sink = _TileSink(router, layer, router.policy.dtype or call["query"].dtype)
    try:
        with torch.no_grad():
            _weights(call, layer, selection=router.policy.selection, tile_sink=sink)
    except BaseException:
        if sink.writer is not None:
            sink.writer.discard()  # a keeper's file of the call goes too
        raise
    if sink.writer is None:  # a call without query rows: nothing to write, but a call of the layer all the same
        session.keep(layer, _NO_ROWS, ())
        return
    session.keep(layer, sink.writer, sink.shape)


class _TileSink:
    """Hands each tile of a call to the keepers' writer, begun before the first tile (a keeper
    that writes the call needs its whole shape first), and says what the writer takes: narrow
    tiles (a causal tile's keys after its last row left out: they are zeros), key bands (a sliding
    window's keys alone) and the log of each tile (``takes_narrow_blocks``, ``takes_key_bands``,
    ``wants_log_probabilities``; see :class:`.sdpa.TileNeeds`)."""

    def __init__(self, router, layer: str, dtype: torch.dtype):
        self._router, self._layer, self._dtype = router, layer, dtype
        self.writer, self.shape = None, ()

    def begin(self, shape) -> TileNeeds:
        self.writer, self.shape = self._router.begin_call(self._layer, tuple(shape), self._dtype), tuple(shape)
        narrow = bool(getattr(self.writer, "takes_narrow_blocks", False))
        return TileNeeds(narrow=narrow,
                         log_probabilities=bool(getattr(self.writer, "wants_log_probabilities", False)),
                         bands=narrow and bool(getattr(self.writer, "takes_key_bands", False)))

    def __call__(self, tile: torch.Tensor, rows: torch.Tensor, shape, log_tile: Optional[torch.Tensor] = None,
                 first_key: int = 0) -> None:
        band = {"first_key": first_key} if first_key else {}  # tile: keys first_key .. of the rows, others 0
        if log_tile is None:
            self.writer.write(rows, tile, **band)  # tile (B, h, r, keys) of the call's (B, h, rows, keys)
        else:
            self.writer.write(rows, tile, log_block=log_tile, **band)


class _NoRows:
    """The writer of a call that had no query row: nothing to write, commit or drop."""

    def write(self, rows: torch.Tensor, block: torch.Tensor) -> None:
        raise AssertionError("a call without rows has no block")  # pragma: no cover - never called

    def commit(self) -> None:
        """Nothing to keep."""

    def discard(self) -> None:
        """Nothing to drop."""


_NO_ROWS = _NoRows()


def _with_grad(session, func, args: tuple, kwargs: dict, call: dict, layer: str, groups: int) -> torch.Tensor:
    """With ``keep_grad``: the real kernel computes the output, unchanged (and a call it
    rejects fails as it would); the gradient with respect to the weights comes from the
    output's, ``dL/dP = dL/dO @ V^T`` (since ``O = P V``), with V as the call gave it.

    With dropout in the call (training), the kernel's dropout mask is out of reach: the
    output is then computed as ``dropout(weights) @ value`` so that gradients reach the
    weights (equal to the kernel's within float tolerance). Packed decode queries too.
    """
    if not call["dropout_p"] and groups == 1:
        output = func(*args, **kwargs)
        with torch.no_grad():
            weights = sdpa_attention_weights(
                call["query"], call["key"], call["attn_mask"], bool(call["is_causal"]), call["scale"],
                bool(call["enable_gqa"]))  # (B, H, L, S)
        value = as_4d(call["value"]).detach()  # (B, Hk, S, Ev)

        def to_weights(d_output: torch.Tensor) -> torch.Tensor:
            d = d_output.reshape(weights.shape[:-1] + d_output.shape[-1:]).float()  # (B, H, L, Ev), unfolded too
            v = value.float()
            if 1 < v.shape[1] < d.shape[1]:
                v = v.repeat_interleave(d.shape[1] // v.shape[1], dim=1)  # (B, H, S, Ev)
            return torch.matmul(d, v.transpose(-2, -1))  # (B, H, L, S)

        session.record(layer, weights, CallSources(GradientSource(output, to_weights), value=call["value"]))
        return output
    query, value = call["query"], call["value"]
    weights = sdpa_attention_weights(
        query, call["key"], call["attn_mask"], bool(call["is_causal"]), call["scale"], bool(call["enable_gqa"])
    )  # (B, H, L, S)
    v = as_4d(value)  # (B, Hk, S, Ev)
    if 1 < v.shape[1] < weights.shape[1]:
        v = v.repeat_interleave(weights.shape[1] // v.shape[1], dim=1)
    used = weights
    if call["dropout_p"]:
        used = torch.nn.functional.dropout(weights, p=float(call["dropout_p"]))
    output = torch.matmul(used, v)  # (B, H, L, Ev)
    # Gradients reach the packed tensor the output was computed from; stored unpacked (the same order).
    session.record(layer, unpack_query_groups(weights, groups) if groups > 1 else weights,
                   CallSources(weights, value=call["value"]))
    given = parse_sdpa_call(args, kwargs)["query"]  # the kernel's layout (a folded 3-D query stays 3-D)
    return output.reshape(tuple(given.shape[:-1]) + (value.shape[-1],))


def _layout_refusal(query: torch.Tensor, groups: int, expected_heads: Optional[int]) -> Optional[str]:
    """Why an sdpa call's weights cannot be labelled ``(batch, heads, query, key)``, or ``None``."""
    if query.dim() > 4:
        return (
            f"a scaled_dot_product_attention call on a {query.dim()}-D query {tuple(query.shape)}: blocked or "
            "windowed attention (batch, blocks, heads, query, dim) is not (batch, heads, query, key), so it is "
            "not stored"
        )
    heads = (query.shape[-3] if query.dim() >= 3 else 1) * groups
    if expected_heads is not None and heads != expected_heads:
        return (
            f"a scaled_dot_product_attention call with {heads} query heads, while the layer declares "
            f"{expected_heads}: its axes are not (batch, heads, query, key), so it is not stored"
        )
    return None


_GROUPING_MODULES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _calling_modules(scope) -> List[torch.nn.Module]:
    """The module that declares grouped-query heads (``num_key_value_groups``), as a
    list of one, or ``[]``: the hooked module itself, or else the first among those
    whose code is calling the kernel (``self`` or ``module`` of the frames between the
    call and the hooked module's: Hugging Face passes the attention module to
    ``sdpa_attention_forward`` as ``module``). Found once per hooked module (reading
    frames' locals costs ~15 us), then remembered."""
    try:
        found = _GROUPING_MODULES[scope.module]
    except KeyError:
        found = scope.module if getattr(scope.module, "num_key_value_groups", None) is not None else None
        if found is None:
            frame = caller_frame(3)
            while found is None and frame is not None and frame is not scope.frame:
                for name in ("module", "self"):
                    candidate = frame_local(frame, name)
                    if isinstance(candidate, torch.nn.Module) and getattr(candidate, "num_key_value_groups", None):
                        found = candidate
                        break
                frame = frame.f_back
        _GROUPING_MODULES[scope.module] = found
    return [] if found is None else [found]
