"""The live part of a capture: which hooked module is running, on which thread, and the function mode.

While at least one hooked module (or a fast-path guard) is running on a thread, a
``TorchFunctionMode`` is on *that thread's* function-mode stack; it sees every
``scaled_dot_product_attention`` and softmax call however it was imported, and
gives each to the innermost hooked module running on that thread. The same mode
keeps every ``nn.MultiheadAttention`` / ``nn.TransformerEncoder(Layer)`` fast
path off on that thread (they check ``torch.overrides.has_torch_function``, which
is true while a mode is on), so no process-wide switch is touched: other threads
and other models run exactly as before.

Everything here is per thread: the scope stack, the mode, the pending softmax.
A scope remembers the Python frame of the module call that opened it, so scopes
that an interrupted forward (``KeyboardInterrupt``) left open are recognised as
stale at the next attention event and never receive another model's attention.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any, Callable, List, NamedTuple, Optional

import torch
from torch.overrides import TorchFunctionMode

from .._torch_private import caller_frame, function_mode_stack, take_mode_out
from ..errors import AttentionCaptureWarning
from ..keep.protocol import NO_SOURCES, CallSources
from ..values import format_size
from .batching import PackedRequests, request_keys
from .windows import assemble_window_values, assemble_windows, layout_refusal, window_index
from .pieces import ROWS_PER_TILE, UNKEPT_CALL, Assembly, PieceCall, named_entry, selected_sizes
from .coverage import Coverage
from .routes.sdpa import (SDPA_FUNCTIONS, as_4d)
from .routes.mha import handle_mha_forward
from .routes.sdpa_call import handle_sdpa
from .routes.softmax import SOFTMAX_FUNCTIONS, Pending, commit_pending, handle_softmax, handle_use

__all__ = ["CaptureSession", "module_call_frame", "frame_is_live", "DENSE_WINDOWS_BYTES"]

# The largest dense map a windowed (Swin) call is placed into: Swin-T's first stage at 224 x 224
# is 118 MB per image and layer in float32, so about 17 images per forward.
DENSE_WINDOWS_BYTES = 2 * 2**30


def module_call_frame():
    """The frame of the ``nn.Module`` call that is running the hook calling this.

    Called from a forward pre-hook: frame 0 is this function, 1 the hook, 2 the
    module's ``_call_impl``, which lives exactly as long as that module call.
    """
    return caller_frame(2)


def frame_is_live(frame) -> bool:
    """Whether ``frame`` is on this thread's call stack right now."""
    current = caller_frame(1)
    while current is not None:
        if current is frame:
            return True
        current = current.f_back
    return False


class WholeMap(NamedTuple):
    """A call's whole map ``(batch, heads, query, key)`` waiting for its layer call to return
    (then handed to the router, which applies the selection, unless ``selected``: made with it
    already), and what memory keeps beside it."""

    weights: torch.Tensor
    sources: CallSources
    selected: bool = False

    def discard(self) -> None:
        """Nothing was begun in any keeper: nothing to drop."""


def _discard(calls) -> None:
    """Discards each call; one that fails to does not keep the others from it."""
    for call in calls:
        try:
            call.discard()
        except Exception:  # noqa: BLE001 - a keeper's own error; the rest must still go
            pass


class _Scope:
    __slots__ = ("module", "layer", "frame", "input_shape", "calls", "refusal", "packing", "windows", "pieces",
                 "events_at_enter")

    def __init__(self, module, layer: Optional[str], frame, input_shape=None, packing=None, windows=None,
                 pieces=None):
        self.module = module
        self.layer = layer  # None for a fast-path guard, which captures nothing
        self.frame = frame  # the module call's frame: the scope is stale once it is gone
        # The thread's count of kept calls when this call began: more when it ends means a hooked
        # layer inside this call captured during it (its own calls are kept after it ends).
        self.events_at_enter = 0
        self.input_shape = input_shape  # of the call's hidden states (capture.inputs), or None
        # What this call of the layer computed, kept until it returns: (shape, WholeMap or
        # writer, router or None) per attention call (keep/protocol.py), and why a call was refused.
        # One forward of an attention layer stores one map per request, or nothing (see CaptureSession._flush).
        self.calls: list = []
        # Under continuous batching, the requests packed into this call (capture/batching.py): each
        # request's part goes to the request's own router; a reason when they cannot be told apart.
        self.packing: Optional[PackedRequests] = packing if isinstance(packing, PackedRequests) else None
        self.refusal: Optional[str] = packing if isinstance(packing, str) else None
        # A windowed (Swin) layer's family rule (capture/windows.py): its per-window map is
        # placed at the image's tokens before anything keeps it.
        self.windows = windows
        # A pieced layer's call (capture/pieces.py): every attention computation inside the call is
        # offered to it, and its one map is assembled when the call returns; a str: why it cannot be.
        self.pieces: Optional[PieceCall] = pieces if isinstance(pieces, PieceCall) else None
        if isinstance(pieces, str):  # its pieces are taken and dropped, never labelled one by one
            self.pieces = _IGNORED_PIECES
            self.refusal = self.refusal or pieces


class _ThreadState:
    """What one thread's forwards of one hooker hold."""

    def __init__(self, session: "CaptureSession"):
        self.scopes: List[_Scope] = []
        self.mode = _CaptureMode(session, self)
        self.mode_on = False
        # A softmax's weights wait for their first use: if that use drops columns (a learned
        # sink, probs[..., :-1]), what is kept is what multiplies the values.
        self.pending: Optional[Pending] = None
        self.events = 0  # attention calls seen (kept or skipped), for the "nothing captured" check
        self.capture_scopes_entered = 0


class _CaptureMode(TorchFunctionMode):
    """Routes attention calls to the session; every other call passes straight through."""

    def __init__(self, session: "CaptureSession", state: _ThreadState):
        super().__init__()
        # Weak: the thread state holds this mode, and the session holds the state. Strong
        # references would make a cycle that keeps the session, its store and every captured
        # tensor alive after the hooker is dropped, until the garbage collector runs.
        self._session = weakref.ref(session)
        self.thread_state = weakref.ref(state)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        session, state = self._session(), self.thread_state()
        if session is None or state is None:  # the hooker is gone: nothing to record
            return func(*args, **kwargs)
        if func in SDPA_FUNCTIONS:
            return session.on_sdpa(func, args, kwargs)
        if func is torch.nn.functional.multi_head_attention_forward:
            return session.on_mha_forward(func, args, kwargs)
        result = func(*args, **kwargs)
        if state.pending is not None:
            session.on_use(func, args, result)
        if func in SOFTMAX_FUNCTIONS:
            session.on_softmax(result, args, kwargs)
        return result


class CaptureSession:
    """Per-thread scope stacks and function modes for one hooker.

    Args:
        router: where captured calls go: a :class:`~attention_hooker.keep.router.Router`
            (handed in by the hooker; the capture knows no particular keeper).
        coverage: where each layer's runs, captures and refusals are counted.
    """

    def __init__(self, router, coverage: Coverage):
        self.router = router
        self.coverage = coverage
        self._local = threading.local()
        self._lock = threading.Lock()
        self._busy: set = set()  # idents of threads with open scopes
        self._on_idle: List[Callable[[], None]] = []
        self._swapped_warned: set = set()  # layers whose hooked module was swapped out, warned of once
        self.closed = False

    def thread_state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadState(self)
        return state

    # ----------------------------------------------------------------- scopes
    def enter(self, module, layer: Optional[str], frame, input_shape=None, packing=None, windows=None,
              pieces=None) -> None:
        """Opens a scope on this thread: ``layer`` names a hooked module, ``None`` a
        fast-path guard; ``frame`` is the module call's (:func:`module_call_frame`);
        ``input_shape`` its hidden states' (:func:`~.inputs.input_shape`); ``packing`` the
        requests of a continuous-batching call (:func:`~.batching.packed_requests`);
        ``windows`` a windowed layer's rule (:class:`~.windows.WindowedLayer`); ``pieces`` a pieced
        layer's call (:class:`~.pieces.PieceCall`), or why it cannot be read."""
        if self.closed:
            return
        state = self.thread_state()
        if not state.scopes:
            self._switch_on(state)
        if layer is not None:  # a hooked layer inside another's call: the outer's map is kept under it
            outer = next((scope.layer for scope in reversed(state.scopes)
                          if scope.layer is not None and frame_is_live(scope.frame)), None)
            if outer is not None:
                self.coverage.ran_inside(outer, layer)
        scope = _Scope(module, layer, frame, input_shape, packing, windows, pieces)
        scope.events_at_enter = state.events
        state.scopes.append(scope)
        if layer is not None:
            state.capture_scopes_entered += 1
            self.coverage.ran(layer)

    def exit(self, module) -> None:
        """Closes this thread's innermost scope if it is ``module``'s (a scope never opened is ignored)."""
        state = self.thread_state()
        if state.scopes and state.scopes[-1].module is module:
            try:
                if state.pending is not None:
                    commit_pending(self, state)
            finally:
                scope = state.scopes.pop()
                try:
                    self._finish(scope)  # may raise (a keeper's write failed): the mode still goes
                finally:
                    if not state.scopes:
                        self._switch_off(state)

    def drop_stale_scopes(self, *, switch_off: bool = True) -> None:
        """Closes the scopes of module calls that are no longer running on this thread
        (left open by an interrupted forward); undoes the mode when none is left.

        ``switch_off=False`` from inside the mode's own handler, where torch has
        taken the mode off the stack for the call and puts it back afterwards: the
        mode then stays until this thread's next scope closes.
        """
        state = self.thread_state()
        while state.scopes and not frame_is_live(state.scopes[-1].frame):
            self._finish(state.scopes.pop())  # what the interrupted call computed before it stopped
        if not state.scopes and switch_off:
            self._switch_off(state)

    def reset(self) -> None:
        """Closes every scope of this thread and undoes its mode; the calls they hold are discarded
        (a keeper counted them when they were written)."""
        state = self.thread_state()
        scopes = list(state.scopes)
        state.scopes.clear()
        for scope in scopes:
            _discard(call for _, call, _ in scope.calls)
        state.pending = None
        self._switch_off(state)

    def close(self, on_idle: Callable[[], None]) -> bool:
        """Stops capturing. This thread's scopes are closed at once; ``on_idle`` runs now
        if no other thread is inside a hooked forward, or else when the last one
        leaves it (so that its scopes, and its mode, are still closed by its hooks).

        Returns:
            Whether ``on_idle`` ran now.
        """
        self.drop_stale_scopes(switch_off=False)  # stores what a call that raised had computed
        self.closed = True
        self.reset()
        with self._lock:
            if self._busy:
                self._on_idle.append(on_idle)
                return False
        on_idle()
        return True

    def current_scope(self) -> Optional[_Scope]:
        """The innermost scope running on this thread, or ``None`` (stale scopes are dropped)."""
        if self.closed:
            return None
        state = self.thread_state()
        if not state.scopes:
            return None
        if not frame_is_live(state.scopes[-1].frame):
            self.drop_stale_scopes(switch_off=False)  # called from inside the mode's handler
            if not state.scopes:
                return None
        return state.scopes[-1]

    def current_layer(self) -> Optional[str]:
        """The innermost hooked layer running on this thread, or ``None``."""
        scope = self.current_scope()
        return None if scope is None else scope.layer

    def counters(self):
        """``(attention events, capture scopes entered)`` on this thread so far."""
        state = self.thread_state()
        return state.events, state.capture_scopes_entered

    # ------------------------------------------------------------ global state
    def _switch_on(self, state: _ThreadState) -> None:
        with self._lock:
            self._busy.add(threading.get_ident())
        if not state.mode_on:
            state.mode.__enter__()
            state.mode_on = True

    def _switch_off(self, state: _ThreadState) -> None:
        if state.mode_on:
            state.mode_on = False
            _remove_mode(state.mode)
        with self._lock:
            self._busy.discard(threading.get_ident())
            callbacks = self._on_idle if not self._busy else []
            if callbacks:
                self._on_idle = []
        for callback in callbacks:
            callback()

    @torch.compiler.disable  # bookkeeping: never compiled (see routes/sdpa_call.py)
    def on_sdpa(self, func, args: tuple, kwargs: dict) -> Any:
        """Runs the real kernel and records the weights it used (:func:`.routes.sdpa_call.handle_sdpa`)."""
        return handle_sdpa(self, func, args, kwargs)

    @torch.compiler.disable
    def on_softmax(self, result, args: tuple, kwargs: dict) -> None:
        """A softmax: eager attention's weights, or not (:func:`.routes.softmax.handle_softmax`)."""
        handle_softmax(self, result, args, kwargs)

    @torch.compiler.disable
    def on_use(self, func, args: tuple, out) -> None:
        """A use of a pending softmax result (:func:`.routes.softmax.handle_use`)."""
        handle_use(self, func, args, out)

    @torch.compiler.disable
    def on_mha_forward(self, func, args: tuple, kwargs: dict):
        """``F.multi_head_attention_forward`` with dropout (:func:`.routes.mha.handle_mha_forward`)."""
        return handle_mha_forward(self, func, args, kwargs)


    def record_module_output(self, layer: str, weights: torch.Tensor, graph_tensor=None, gradient_scale=None,
                             value=None) -> None:
        """Keeps at once the whole map ``(batch, heads, query, key)`` a module returned itself
        (the MHA route, after its call); ``value``: a function giving its value vectors,
        called only when they are kept."""
        if self.closed:
            return
        if not self.router.wants(layer):
            self.skip(layer)
            return
        value = value() if value is not None and self.router.policy.keep_values else None
        self._commit(layer, WholeMap(weights, CallSources(graph_tensor, gradient_scale, value)))

    def layer_swapped(self, layer: str, reason: str) -> None:
        """The hooked module of ``layer`` was swapped out of the model (:func:`.hooks._swap_watch`) and its
        parent ran with another in its place: counted as a run refused with ``reason``, and warned once per layer."""
        if self.closed:
            return
        self.coverage.ran(layer)
        self.coverage.refused(layer, reason)
        with self._lock:
            first = layer not in self._swapped_warned
            self._swapped_warned.add(layer)
        if first:
            warnings.warn(reason, AttentionCaptureWarning, stacklevel=3)

    def skip(self, layer: str, router=None) -> None:
        """Counts a call of ``layer`` that is not computed (``max_calls`` reached) or held no row
        (``router``: a request's, under continuous batching)."""
        self.thread_state().events += 1
        self.coverage.captured(layer)
        (router or self.router).skip(layer)

    def record(self, layer: str, weights: torch.Tensor, sources: CallSources = NO_SOURCES) -> None:
        """Keeps the whole map ``(batch, heads, query, key)`` of one attention call of the running
        call of ``layer``; value vectors, in ``sources``, as ``(batch, kv_heads, key, head_dim)``.
        The map goes to the router (which applies the selection) only when the layer's call
        returns with it as its one attention call: pieces of a refused call are never checked
        against the selection nor begun in a keeper."""
        if sources.value is not None:
            sources = sources._replace(value=as_4d(sources.value) if self.router.policy.keep_values else None)
        self.coverage.stores(layer, sources.kind)  # the report says what kind of map the layer stores
        scope = self._scope_of(layer)
        if scope is not None and scope.windows is not None:  # windowed: placed at the image's tokens, selected
            placed = self._place_windows(scope, weights, sources)
            if placed is not None:
                self.keep(layer, placed, tuple(placed.weights.shape))
            return
        if scope is not None and scope.packing is not None:  # continuous batching: one map per request
            self._record_requests(scope, weights, sources)
            return
        self.keep(layer, WholeMap(weights, sources), tuple(weights.shape))

    def _place_windows(self, scope: _Scope, weights: torch.Tensor, sources: CallSources) -> Optional[WholeMap]:
        """A windowed call's ``(batch * windows, heads, N, N)`` as the layer's ``(batch, heads,
        tokens, tokens)`` (:func:`~.windows.assemble_windows`), only its selected heads, rows and
        keys made; with ``windows="keep"``, as it is, its window index in ``sources.windows`` (the
        router selects its heads); ``None`` when the call is refused (its layout unreadable or not
        the map's, or the dense map over :data:`DENSE_WINDOWS_BYTES`)."""
        layout = scope.windows.layout(scope.input_shape, scope.module)
        refusal = layout if isinstance(layout, str) else layout_refusal(layout, tuple(weights.shape))
        if refusal is None and self.router.policy.windows == "keep":  # as computed, its index beside it
            return WholeMap(weights, sources._replace(windows=window_index(layout)))
        chosen = None
        if refusal is None:
            chosen = self.router.policy.selection.resolve(weights.shape[1], layout.tokens, layout.tokens,
                                                          f"layer {scope.layer!r}")
            size = [len(c) if c is not None else n for c, n in zip(chosen, (weights.shape[1], layout.tokens,
                                                                           layout.tokens))]
            dense = layout.batch * size[0] * size[1] * size[2] * weights.element_size()
            if dense > DENSE_WINDOWS_BYTES:
                refusal = (f"the windows of this call placed at the image's {layout.tokens} tokens would be one "
                           f"(batch, heads, rows, keys) map of {format_size(dense)}, over the "
                           f"{format_size(DENSE_WINDOWS_BYTES)} a windowed call may take: capture fewer images "
                           "per forward, fewer heads=, rows= or keys=, or keep the calls per window with their "
                           'window index (windows="keep")')
        if refusal is None and self.router.policy.keep_grad:
            # The loss reaches the model's per-window weights, never the assembled map: a map stored with
            # keep_grad would get no gradient, silently.
            refusal = ("keep_grad on a windowed (Swin) layer: the gradient of its map placed at the image's tokens "
                       "is not kept (the loss reaches only the per-window weights), so it is not stored; keep the calls "
                       'per window (windows="keep"), whose gradient is kept')
        if refusal is not None:
            self.refuse(scope, refusal)
            return None
        value = sources.value
        if value is not None:
            value = assemble_window_values(value, layout) if value.shape[0] == weights.shape[0] else None
        with torch.no_grad():
            placed = assemble_windows(weights, layout, *chosen)  # (B, heads, rows, keys) as selected
        return WholeMap(placed, sources._replace(value=value), selected=True)

    def _record_requests(self, scope: _Scope, weights: torch.Tensor, sources: CallSources) -> None:
        """Splits a packed continuous-batching map ``(1, heads, queries, keys)`` into each
        request's ``(1, heads, its queries, its positions)``, kept with the request's router."""
        refusal = scope.packing.check_call(tuple(weights.shape))
        if refusal is not None:
            self.refuse(scope, refusal)
            return
        for segment in scope.packing.segments:
            router = self.request_router(scope, segment)
            if not router.wants(scope.layer):
                self.skip(scope.layer, router)
                continue
            value = None if sources.value is None else request_keys(sources.value, segment, dim=-2)
            part = request_keys(weights[:, :, segment.queries[0]:segment.queries[1]], segment)
            self.keep_map(scope.layer, part, CallSources(value=value, kind=sources.kind), router)

    def request_router(self, scope: _Scope, segment):
        """The router a request's part of a packed call goes to (``keep/requests.py``)."""
        return self.router.for_request(segment.request_id, scope.layer, segment.first_query, segment.positions,
                                       scope.packing.cache)

    def keep_map(self, layer: str, weights: torch.Tensor, sources: CallSources, router) -> None:
        """Holds a whole map ``(batch, heads, query, key)`` for ``router`` (a request's), which
        applies the selection when the layer's call returns with it."""
        self.keep(layer, WholeMap(weights, sources), tuple(weights.shape), router)

    def keep(self, layer: str, call, shape: tuple, router=None) -> None:
        """Holds one attention call (a :class:`WholeMap`, or a writer with all its rows written;
        ``shape`` the call's) with the running call of ``layer``: committed when that returns
        (:meth:`_flush`), to ``router`` (a request's) or the capture's."""
        scope = self._scope_of(layer)
        if scope is None:  # its call is over (closed meanwhile): kept at once
            self._commit(layer, call, router)
            return
        scope.calls.append((shape, call, router))

    def refuse(self, scope: _Scope, reason: str) -> None:
        if scope.refusal is None:
            scope.refusal = reason

    def refuse_layer(self, layer: str, reason: str) -> None:
        scope = self._scope_of(layer)
        if scope is None:
            self.coverage.refused(layer, reason)
        else:
            self.refuse(scope, reason)

    def offer_piece(self, scope: _Scope, refusal: Optional[str]) -> None:
        """What a pieced layer's call said of one attention computation offered to it: ``None``
        (kept as a piece) or why it is not one (the whole call is then refused)."""
        if refusal is not None:
            self.refuse(scope, refusal)

    def _assemble_pieces(self, scope: _Scope) -> None:
        """A pieced layer's call, returned: its one ``(batch, heads, query, key)`` map, only the
        selected heads, rows and keys made (:meth:`~.pieces.PieceCall.assemble`), kept whole, or a
        tile of rows at a time when the keepers take tiles (streaming, reductions)."""
        layer, pieces = scope.layer, scope.pieces
        scope.pieces = None  # its references to the pieces go with this call
        router = self.router
        if self.closed:  # remove_hooks() came from another thread meanwhile: record nothing more
            return
        if pieces is UNKEPT_CALL or not router.wants(layer):
            self.skip(layer)
            return
        if router.policy.keep_grad:
            self.refuse(scope, "keep_grad on a layer whose map is assembled from pieces (Longformer): the loss "
                               "reaches the pieces, never the assembled map, so its gradient would be missing")
            return
        assembly = pieces.assemble(router.policy.keep_values)
        if isinstance(assembly, str):
            self.refuse(scope, assembly)
            return
        # The layer's map, then the maps of other kinds the call made (ProphetNet's streams), each an
        # entry of its own: all are sized before any is kept, so a refusal keeps none of them.
        planned = []
        token_map = [] if assembly.no_token_map is not None else [(layer, assembly)]
        for name, part in token_map + [(named_entry(layer, kind), other) for kind, other in assembly.named.items()]:
            chosen = router.policy.selection.resolve(part.heads, part.queries, part.keys, f"layer {name!r}")
            heads, rows, keys = selected_sizes(part, chosen)
            shape = (part.batch, heads, rows, keys)
            size = part.batch * heads * rows * keys * torch.empty((), dtype=part.dtype).element_size()
            if not router.takes_tiles and size > DENSE_WINDOWS_BYTES:
                self.refuse(scope, (
                    f"the assembled map of this call would be one (batch, heads, rows, keys) map {shape} of "
                    f"{format_size(size)}, over the {format_size(DENSE_WINDOWS_BYTES)} a pieced call may hold: "
                    "capture fewer heads=, rows= or keys=, or stream_to()/reduce_into(), which take it in tiles"))
                return
            planned.append((name, part, chosen, shape))
        for name, part, chosen, shape in planned:
            if name != layer and not router.wants(name):
                self.skip(name)
                continue
            self._keep_assembled(name, part, chosen, shape)
        if assembly.no_token_map is not None:  # the layer keeps nothing: its coverage says why, and where
            self.refuse(scope, f"{assembly.no_token_map}; kept instead: "
                               + ", ".join(repr(named_entry(layer, kind)) for kind in assembly.named))

    def _keep_assembled(self, name: str, assembly: Assembly, chosen, shape: tuple) -> None:
        """Makes the selected part ``shape`` of an assembled map and holds it for ``name`` (its
        layer's running call, or kept at once for an entry of another kind): whole, or written a
        tile of rows at a time when the keepers take tiles."""
        router = self.router
        self.coverage.stores(name, assembly.sources.kind)  # the report says what kind of map the layer stores
        row_index = torch.arange(assembly.queries) if chosen[1] is None else torch.tensor(chosen[1])
        if not router.takes_tiles:
            placed = assembly.rows(chosen[0], row_index, chosen[2])
            self.keep(name, WholeMap(placed, assembly.sources, selected=True), shape)
            return
        writer = router.begin_call(name, shape, router.policy.dtype or assembly.dtype, assembly.sources)
        try:
            for first in range(0, shape[2], ROWS_PER_TILE):
                tile = row_index[first:first + ROWS_PER_TILE]
                writer.write(tile, assembly.rows(chosen[0], tile, chosen[2]))
        except BaseException:
            writer.discard()
            raise
        self.keep(name, writer, shape)

    def _finish(self, scope: _Scope) -> None:
        if scope.layer is not None and self.thread_state().events > scope.events_at_enter:
            self.coverage.captured_during(scope.layer)  # this run of it is excused by what ran inside it
        if scope.layer is not None and scope.pieces is not None and scope.refusal is None:
            self._assemble_pieces(scope)
        if scope.layer is not None and (scope.calls or scope.refusal is not None):
            self._flush(scope)

    @torch.compiler.disable  # keeping is bookkeeping: a model compiled after hooking runs it as it is
    def _flush(self, scope: _Scope) -> None:
        """Keeps what one call of an attention layer computed: its one attention map (one per
        request under continuous batching), or nothing.

        A layer call that made several attention calls computed its attention in
        pieces (block-sparse, global + local, landmark or differential attention, a
        loop over heads or chunks), and none of the pieces is the ``(batch, heads,
        query, key)`` map that multiplied the values; one of them refused makes the
        others a partial picture. Both are refused for the whole call, with the reason.
        """
        layer, calls, refusal = scope.layer, scope.calls, scope.refusal
        scope.calls = []
        if self.closed:
            for _, call, _ in calls:
                call.discard()
            return
        per_router = {}  # one attention call per request under continuous batching, else one in all
        for _, _, router in calls:
            per_router[id(router)] = per_router.get(id(router), 0) + 1
        if refusal is None and any(count > 1 for count in per_router.values()):
            shapes = ", ".join(str(shape) for shape, _, _ in calls[:4]) + (", ..." if len(calls) > 4 else "")
            refusal = (
                f"one call of the layer made {len(calls)} attention calls ({shapes}): its attention is computed "
                "in pieces (block-sparse, global + local, landmark or differential attention, or a loop over "
                "heads or chunks), none of which is the (batch, heads, query, key) map that multiplied the "
                "values, so none is stored"
            )
        elif refusal is not None and calls:
            refusal = (f"{refusal}; the layer's other {len(calls)} attention call(s) in the same forward are a "
                       "partial picture without it, and are not stored either")
        if refusal is not None:
            for _, call, _ in calls:
                call.discard()  # a streamed call's file goes too
            self.coverage.refused(layer, refusal)
            return
        for index, (_, call, router) in enumerate(calls):
            try:
                self._commit(layer, call, router)
            except BaseException:
                _discard(rest for _, rest, _ in calls[index + 1:])  # never committed: not held either
                raise

    def _commit(self, layer: str, call, router=None) -> None:
        router = router or self.router
        self.thread_state().events += 1
        self.coverage.captured(layer)
        if isinstance(call, WholeMap) and call.selected:  # the selection was applied as it was made
            writer = router.begin_call(layer, tuple(call.weights.shape), router.policy.dtype or call.weights.dtype,
                                       call.sources)
            writer.write(torch.arange(call.weights.shape[2]), call.weights)
        elif isinstance(call, WholeMap):
            writer = router.whole_call(layer, call.weights, call.sources)
        else:
            writer = call
        router.commit(layer, writer)

    def _scope_of(self, layer: str) -> Optional[_Scope]:
        """The innermost open scope of ``layer`` on this thread."""
        for scope in reversed(self.thread_state().scopes):
            if scope.layer == layer:
                return scope
        return None


class _IgnoredPieces(PieceCall):
    """The pieces of a call whose layout could not be read: taken and dropped (the call is refused)."""

    def take_softmax(self, result) -> None:
        return None

    def take_sdpa(self, call) -> None:
        return None


_IGNORED_PIECES = _IgnoredPieces()


def _remove_mode(mode: TorchFunctionMode) -> None:
    """Takes ``mode`` off this thread's function-mode stack, wherever it stands on it.

    Other modes pushed above ours and still on (a mode a user entered inside a hooked
    module and kept) go back in order (:func:`~attention_hooker._torch_private.take_mode_out`).
    """
    stack = function_mode_stack()
    if not any(m is mode for m in stack):
        return
    if stack[-1] is mode:
        mode.__exit__(None, None, None)
        return
    take_mode_out(mode)
