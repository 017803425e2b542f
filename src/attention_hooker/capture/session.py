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

import functools
import inspect
import threading
import weakref
from typing import Any, Callable, List, NamedTuple, Optional

import torch
from torch.overrides import TorchFunctionMode

from .._torch_private import caller_frame, frame_local, function_mode_stack, take_mode_out
from ..keep.memory import AttentionStore, GradientSource, begin_partial, empty
from ..keep.allocator import Arena, SpareBuffers
from .coverage import Coverage
from .inputs import channel_attention_refusal, folded_batch_refusal
from .routes.mha import drops_weights, mha_weights
from .routes.sdpa import (SDPA_FUNCTIONS, as_4d, declared_heads, packed_query_groups, parse_sdpa_call,
                   sdpa_attention_weights, unpack_query_groups)
from .routes.softmax import SOFTMAX_FUNCTIONS, is_attention_softmax, label_softmax, sampled_attention_refusal

__all__ = ["CaptureSession", "module_call_frame", "frame_is_live"]


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


class _Scope:
    __slots__ = ("module", "layer", "frame", "input_shape", "calls", "refusal")

    def __init__(self, module, layer: Optional[str], frame, input_shape=None):
        self.module = module
        self.layer = layer  # None for a fast-path guard, which captures nothing
        self.frame = frame  # the module call's frame: the scope is stale once it is gone
        self.input_shape = input_shape  # of the call's hidden states (capture.inputs), or None
        # What this call of the layer computed, kept until it returns: (weights, selected,
        # graph_tensor) per attention call, and why a call was refused. One forward of an
        # attention layer stores one map, or nothing (see CaptureSession._flush).
        self.calls: list = []
        self.refusal: Optional[str] = None


class _Pending(NamedTuple):
    """A softmax waiting for its first use (see :meth:`CaptureSession.on_use`)."""

    layer: str
    tracked: torch.Tensor  # the softmax result, or what layout operations made of it
    weights: torch.Tensor  # its (B, H, Q, K) labelling
    mixed: bool  # a linear over it mixed the heads


class _ThreadState:
    """What one thread's forwards of one hooker hold."""

    def __init__(self, session: "CaptureSession"):
        self.scopes: List[_Scope] = []
        self.mode = _CaptureMode(session, self)
        self.mode_on = False
        # A softmax's weights wait for their first use: if that use drops columns (a learned
        # sink, probs[..., :-1]), what is kept is what multiplies the values.
        self.pending: Optional[_Pending] = None
        self.events = 0  # attention calls seen (kept or skipped), for the "nothing captured" check
        self.capture_scopes_entered = 0


_MHA_FORWARD_SIGNATURE = inspect.signature(torch.nn.functional.multi_head_attention_forward)


class _CaptureMode(TorchFunctionMode):
    """Routes attention calls to the session; every other call passes straight through."""

    def __init__(self, session: "CaptureSession", state: _ThreadState):
        super().__init__()
        # Weak: the thread state holds this mode, and the session holds the state. Strong
        # references would make a cycle that keeps the session, its store and every captured
        # tensor alive after the hooker is dropped, until the garbage collector runs.
        self._session = weakref.ref(session)
        self._state = weakref.ref(state)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        session, state = self._session(), self._state()
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
    """Per-thread scope stacks, function modes and spare tensors for one hooker.

    Args:
        store: where captured weights go.
        coverage: where each layer's runs, captures and refusals are counted.
    """

    def __init__(self, store: AttentionStore, coverage: Coverage):
        self.store = store
        self.coverage = coverage
        self._local = threading.local()
        self._lock = threading.Lock()
        self._busy: set = set()  # idents of threads with open scopes
        self._on_idle: List[Callable[[], None]] = []
        self.closed = False
        self.arena = Arena()  # small stored tensors of repeated calls side by side (generation steps)
        self.spares = SpareBuffers()  # cleared weights nobody can reach, for the next calls
        session = weakref.ref(self)  # the store must not keep its session (and itself) alive
        store.allocator = lambda layer: empty if session() is None else session().allocator(layer)

    def _state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadState(self)
        return state

    # ----------------------------------------------------------------- scopes
    def enter(self, module, layer: Optional[str], frame, input_shape=None) -> None:
        """Opens a scope on this thread: ``layer`` names a hooked module, ``None`` a
        fast-path guard; ``frame`` is the module call's (:func:`module_call_frame`);
        ``input_shape`` its hidden states' (:func:`~.inputs.input_shape`)."""
        if self.closed:
            return
        state = self._state()
        if not state.scopes:
            self._switch_on(state)
        state.scopes.append(_Scope(module, layer, frame, input_shape))
        if layer is not None:
            state.capture_scopes_entered += 1
            self.coverage.ran(layer)

    def exit(self, module) -> None:
        """Closes this thread's innermost scope if it is ``module``'s (a scope never opened is ignored)."""
        state = self._state()
        if state.scopes and state.scopes[-1].module is module:
            try:
                if state.pending is not None:
                    self._commit_pending(state)
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
        state = self._state()
        while state.scopes and not frame_is_live(state.scopes[-1].frame):
            self._finish(state.scopes.pop())  # what the interrupted call computed before it stopped
        if not state.scopes and switch_off:
            self._switch_off(state)

    def reset(self) -> None:
        """Closes every scope of this thread and undoes its mode."""
        state = self._state()
        state.scopes.clear()
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
        self.spares.release()
        self.arena.release()
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
        state = self._state()
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
        state = self._state()
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

    def allocator(self, layer: str) -> Callable:
        """Where a stored call of ``layer`` comes from: the arena for a layer's repeated
        calls (generation steps), ``torch.empty`` for its first."""
        return self.arena.empty if self.store.calls_seen.get(layer, 0) else empty

    # ------------------------------------------------------------------ events
    @torch.compiler.disable  # bookkeeping: never compiled (see _NO_COMPILE below)
    def on_sdpa(self, func, args: tuple, kwargs: dict) -> Any:
        """Runs the real kernel and records the weights it used, labelled ``(batch, heads, query, key)``."""
        scope = self.current_scope()
        layer = None if scope is None else scope.layer
        if layer is None:
            return func(*args, **kwargs)
        store = self.store
        if not store.wants(layer):
            self._skip(layer)
            return func(*args, **kwargs)
        call = parse_sdpa_call(args, kwargs)
        query = call["query"]
        groups = packed_query_groups(lambda: _calling_modules(scope), query, call["key"])
        refusal = _layout_refusal(query, groups, declared_heads(scope.module))
        if refusal is None and groups == 1 and query.dim() == 4:
            refusal = channel_attention_refusal(scope.input_shape, query.shape[1], query.shape[-2],
                                                call["key"].shape[-2])
        if refusal is not None:
            self._refuse(scope, refusal)
            return func(*args, **kwargs)
        if store.policy.keep_grad and torch.is_grad_enabled():
            return self._sdpa_with_grad(func, args, kwargs, call, layer, groups)
        output = func(*args, **kwargs)
        # Stored as computed: written straight into the tensor that is stored (a spare one when
        # there is one). Otherwise computed in tiles of query rows, each written into a tensor of
        # the policy's dtype/device: no whole layer in the working dtype or device.
        policy = store.policy
        if store.keeps_elsewhere and groups == 1:  # kept tile by tile: no layer is ever held
            partial = store.partial(layer)
            n_query = as_4d(query).shape[2]
            stored_dtype = policy.dtype or query.dtype

            started = False

            def tile_sink(tile, rows, shape):
                nonlocal started
                if not started:  # a keeper that writes the call may need its whole shape first
                    started = True
                    begin_partial(partial, shape, stored_dtype)
                partial.add(tile, rows, n_query)

            try:
                with torch.no_grad():
                    sdpa_attention_weights(
                        call["query"], call["key"], call["attn_mask"], bool(call["is_causal"]), call["scale"],
                        bool(call["enable_gqa"]), heads=policy.heads, rows=policy.rows, keys=policy.keys,
                        where=f"layer {layer!r}",
                        tile_sink=tile_sink,
                    )
            except BaseException:
                getattr(partial, "discard", lambda: None)()  # a keeper's file of the call goes too
                raise
            self._record(layer, partial, selected=True)
            return output
        as_computed = store.stores_as_computed(query.dtype, query.device)
        store_as = None if as_computed else (policy.dtype or query.dtype, policy.device or query.device)
        with torch.no_grad():
            weights = sdpa_attention_weights(
                call["query"],
                call["key"],
                call["attn_mask"],
                bool(call["is_causal"]),
                call["scale"],
                bool(call["enable_gqa"]),
                heads=store.policy.heads if groups == 1 else None,
                rows=store.policy.rows if groups == 1 else None,
                keys=store.policy.keys if groups == 1 else None,
                buffer=functools.partial(self.spares.take, fresh=self.allocator(layer)),
                where=f"layer {layer!r}",
                store_as=store_as,
            )  # (B, H, L, S); packed: (B, Hk, groups, S)
        if groups > 1:
            weights = unpack_query_groups(weights, groups)  # (B, H, 1, S)
        self._record(layer, weights, selected=groups == 1, value=call["value"])
        return output

    def _sdpa_with_grad(self, func, args: tuple, kwargs: dict, call: dict, layer: str, groups: int) -> torch.Tensor:
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
                d = as_4d(d_output).float()  # (B, H, L, Ev)
                v = value.float()
                if 1 < v.shape[1] < d.shape[1]:
                    v = v.repeat_interleave(d.shape[1] // v.shape[1], dim=1)  # (B, H, S, Ev)
                return torch.matmul(d, v.transpose(-2, -1))  # (B, H, L, S)

            self._record(layer, weights, selected=False, graph_tensor=GradientSource(output, to_weights),
                         value=call["value"])
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
        self._record(layer, unpack_query_groups(weights, groups) if groups > 1 else weights, selected=False,
                     graph_tensor=weights, value=call["value"])
        return output.reshape(tuple(query.shape[:-1]) + (value.shape[-1],))

    @torch.compiler.disable  # bookkeeping: never compiled (see _NO_COMPILE below)
    def on_softmax(self, result, args: tuple, kwargs: dict) -> None:
        if not is_attention_softmax(result, args, kwargs):
            return
        scope = self.current_scope()
        if scope is None or scope.layer is None or isinstance(scope.module, torch.nn.MultiheadAttention):
            return  # nn.MultiheadAttention hands its weights back itself (route 1)
        layer = scope.layer
        heads = declared_heads(scope.module)
        weights, reason = label_softmax(result, heads)
        sampled = sampled_attention_refusal(scope.module)
        if sampled is not None:
            weights, reason = None, sampled
        elif weights is not None and result.dim() == 3:
            reason = folded_batch_refusal(scope.input_shape, heads, result.shape[0])
        elif weights is not None:
            reason = channel_attention_refusal(scope.input_shape, weights.shape[1], weights.shape[2], weights.shape[3])
        if reason is not None:
            weights = None
        if weights is None:
            if reason is not None:
                self._refuse(scope, reason)
            return
        if not self.store.wants(layer):
            self._skip(layer)
            return
        state = self._state()
        if state.pending is not None:
            self._commit_pending(state)
        state.pending = _Pending(layer, result, weights, False)

    @torch.compiler.disable  # bookkeeping: never compiled (see _NO_COMPILE below)
    def on_use(self, func, args: tuple, out) -> None:
        """A use of a pending softmax result (or of what it became).

        Following it to the product with the values: layout operations (views,
        permutes, dtype casts) are followed; a slice that keeps ``(batch, heads,
        query)`` and drops key columns (``probs[..., :-1]``: a learned attention sink)
        becomes the weights; a ``linear`` over it mixes the heads (CaiT's talking
        heads), and then the tensor that reaches the product with the values, back in
        the softmax's ``(batch, heads, query, key)`` shape, is what is recorded. A call
        that hands the tensor itself back (dropout in eval) is followed too. Any other use
        (the product itself, dropout in training, a mask) records what was followed; the
        product (``matmul``, ``@``, ``bmm``) also gives the value vectors, for
        ``keep_values``.
        """
        state = self._state()
        pending = state.pending
        tracked = pending.tracked
        if not any(a is tracked or (isinstance(a, (list, tuple)) and any(b is tracked for b in a)) for a in args):
            return
        if isinstance(out, torch.Tensor) and args[0] is tracked:
            if func in _LAYOUT_FUNCTIONS or out is tracked:  # out is tracked: an identity (dropout in eval)
                state.pending = pending._replace(tracked=out)
                return
            if func is torch.nn.functional.linear:
                state.pending = pending._replace(tracked=out, mixed=True)
                return
            weights = pending.weights
            if (
                func is torch.Tensor.__getitem__
                and not pending.mixed
                and tracked is weights
                and out.dim() == 4
                and out.shape[:3] == weights.shape[:3]
                and out.shape[3] < weights.shape[3]
            ):
                state.pending = pending._replace(tracked=out, weights=out)  # (B, H, Q, K) without the sinks
                return
        value = None
        if func in _PRODUCT_FUNCTIONS and len(args) > 1 and args[0] is tracked and self.store.policy.keep_values:
            value = _value_operand(args[1], pending.weights.shape)
        self._commit_pending(state, value)

    def _commit_pending(self, state: _ThreadState, value: Optional[torch.Tensor] = None) -> None:
        layer, tracked, weights, mixed = state.pending
        state.pending = None
        if self.closed:  # remove_hooks() came from another thread meanwhile: record nothing more
            return
        if mixed:
            if tracked.shape != weights.shape:
                self._refuse_layer(layer, (
                    f"the softmax output is mixed across heads (a linear layer) and what reaches the values has "
                    f"shape {tuple(tracked.shape)}, not (batch, heads, query, key) {tuple(weights.shape)}"))
                return
            weights = tracked  # (B, H, Q, K): the mixed map that multiplies the values
        self._record(layer, weights, selected=False, value=value)

    @torch.compiler.disable  # bookkeeping: never compiled (see _NO_COMPILE below)
    def on_mha_forward(self, func, args: tuple, kwargs: dict):
        """``F.multi_head_attention_forward`` of a hooked ``nn.MultiheadAttention`` that
        applies dropout to its weights (training): the weights it returns are after
        dropout, and the softmax before it runs where no function mode sees it. The
        call runs as it is (the same output, the same random numbers drawn); its
        weights before dropout, as every other route records them, come from the same
        call again without dropout, which draws no random numbers.

        With ``keep_grad``, the gradient kept is the one with respect to these weights
        before dropout: the gradient reaching the module's dropped-out weights times
        ``mask / (1 - p)`` (= dropped-out / before).
        """
        output = func(*args, **kwargs)
        scope = self.current_scope()
        module = None if scope is None else scope.module
        if (self.closed or scope is None or scope.layer is None or not isinstance(module, torch.nn.MultiheadAttention)
                or not drops_weights(module)):
            return output
        dropped = mha_weights(output)[1]  # (B * H, L, S) that multiplied the values, or None
        if dropped is None:
            return output
        bound = _MHA_FORWARD_SIGNATURE.bind(*args, **kwargs)
        bound.arguments.update(dropout_p=0.0, training=False, need_weights=True, average_attn_weights=False)
        with torch.no_grad():
            _, weights = func(*bound.args, **bound.kwargs)  # (B, H, L, S), or unbatched (H, L, S)
        if weights.dim() == 3:
            weights = weights.unsqueeze(0)
        scale = None
        if self.store.policy.keep_grad and dropped.requires_grad:
            before = weights.reshape(dropped.shape)
            scale = torch.where(before > 0, dropped.detach() / before, torch.zeros_like(before))
        self.record_module_output(scope.layer, weights, dropped, gradient_scale=scale)
        return output

    def record_module_output(self, layer: str, weights: torch.Tensor, graph_tensor=None, gradient_scale=None,
                             value=None) -> None:
        """Records weights a module returned itself (the MHA route); ``value``: a function giving
        its value vectors, called only when they are kept."""
        if self.closed:
            return
        if not self.store.wants(layer):
            self._skip(layer)
            return
        value = value() if value is not None and self.store.policy.keep_values else None
        self._store(layer, weights, False, graph_tensor, gradient_scale, value)  # one map per MHA call

    def _skip(self, layer: str) -> None:
        self._state().events += 1
        self.coverage.captured(layer)
        self.store.skip(layer)

    def _record(self, layer: str, weights: torch.Tensor, *, selected: bool, graph_tensor=None, value=None) -> None:
        """Keeps one attention call's weights (and its value vectors ``(batch, kv_heads, key, head_dim)``
        where the route sees them) with the running call of ``layer``; they are stored when it
        returns (:meth:`_flush`)."""
        if value is not None:
            value = as_4d(value) if self.store.policy.keep_values else None
        scope = self._scope_of(layer)
        if scope is None:  # its call is over (closed meanwhile): store at once
            self._store(layer, weights, selected, graph_tensor, value=value)
            return
        scope.calls.append((weights, selected, graph_tensor, value))

    def _refuse(self, scope: _Scope, reason: str) -> None:
        if scope.refusal is None:
            scope.refusal = reason

    def _refuse_layer(self, layer: str, reason: str) -> None:
        scope = self._scope_of(layer)
        if scope is None:
            self.coverage.refused(layer, reason)
        else:
            self._refuse(scope, reason)

    def _finish(self, scope: _Scope) -> None:
        if scope.layer is not None and (scope.calls or scope.refusal is not None):
            self._flush(scope)

    @torch.compiler.disable  # storing is bookkeeping: a model compiled after hooking runs it as it is
    def _flush(self, scope: _Scope) -> None:
        """Stores what one call of an attention layer computed: its one attention map, or nothing.

        A layer call that made several attention calls computed its attention in
        pieces (block-sparse, global + local, landmark or differential attention, a
        loop over heads or chunks), and none of the pieces is the ``(batch, heads,
        query, key)`` map that multiplied the values; one of them refused makes the
        others a partial picture. Both are refused for the whole call, with the reason.
        """
        layer, calls, refusal = scope.layer, scope.calls, scope.refusal
        scope.calls = []
        if self.closed:
            return
        if refusal is None and len(calls) > 1:
            shapes = ", ".join(str(tuple(getattr(c[0], "shape", ()))) for c in calls[:4]) + (
                ", ..." if len(calls) > 4 else "")
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
            for weights, *_ in calls:
                getattr(weights, "discard", lambda: None)()  # a streamed call's file goes too
            self.coverage.refused(layer, refusal)
            return
        weights, selected, graph_tensor, value = calls[0]
        self._store(layer, weights, selected, graph_tensor, value=value)

    def _store(self, layer: str, weights: torch.Tensor, selected: bool, graph_tensor,
               gradient_scale=None, value=None) -> None:
        self._state().events += 1
        self.coverage.captured(layer)
        if not isinstance(weights, torch.Tensor):  # a call kept tile by tile (store.partial)
            self.store.commit_partial(layer, weights)
            return
        self.store.record(layer, weights, selected=selected, graph_tensor=graph_tensor,
                          gradient_scale=gradient_scale, value=value)

    def _scope_of(self, layer: str) -> Optional[_Scope]:
        """The innermost open scope of ``layer`` on this thread."""
        for scope in reversed(self._state().scopes):
            if scope.layer == layer:
                return scope
        return None


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

# Operations that move a softmax's numbers around without changing them.
_LAYOUT_FUNCTIONS = frozenset({
    torch.Tensor.permute, torch.Tensor.transpose, torch.transpose, torch.permute, torch.Tensor.view,
    torch.Tensor.reshape, torch.reshape, torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float,
    torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type_as, torch.Tensor.unsqueeze, torch.Tensor.squeeze,
})


# _NO_COMPILE: the session's handlers run as plain Python, never as frames torch.compile traces.
# Traced, dynamo guarded on the n-th key of the weak caches they read (``_DECLARED_HEADS``), and a
# key collected meanwhile failed the guard's creation ("list index out of range") inside the
# user's compiled model.
_PRODUCT_FUNCTIONS = frozenset({torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.bmm,
                                torch.Tensor.bmm})


def _value_operand(value, weights_shape) -> Optional[torch.Tensor]:
    """The value vectors ``(batch, heads, key, head_dim)`` a softmax's weights ``(B, H, Q, K)``
    multiply, from the product's other operand: ``(B, H, K, Dh)`` as it is, or ``(B * H, K,
    Dh)`` (``bmm``-style code) unfolded; ``None`` for any other layout."""
    if not isinstance(value, torch.Tensor):
        return None
    batch, heads, _, keys = weights_shape
    if value.dim() == 4 and value.shape[0] == batch and value.shape[2] == keys and value.shape[1] in (heads, 1):
        return value
    if value.dim() == 3 and value.shape[0] == batch * heads and value.shape[1] == keys:
        return value.reshape(batch, heads, keys, value.shape[2])
    return None


def _calling_modules(scope: _Scope) -> List[torch.nn.Module]:
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
