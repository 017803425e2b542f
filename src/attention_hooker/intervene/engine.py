"""The live part of an intervention: which planned layer is running on this thread, and the
function mode that hands its attention calls to the routes (``routes.py``).

Like a capture's session (``capture/session.py``), a ``TorchFunctionMode`` is on a thread's
mode stack only while a planned layer (or an encoder around a planned
``nn.MultiheadAttention``, whose fused fast path it keeps off) runs on that thread; the hooks
that scope the layers are the capture's :class:`~attention_hooker.capture.hooks.HookHandles`.
Everything is taken off by :meth:`Engine.remove`, on success and on exception.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._torch_private import function_mode_stack, take_mode_out
from ..capture.hooks import HookHandles
from ..capture.routes.mha import fastpath_containers
from ..capture.routes.sdpa import SDPA_FUNCTIONS
from ..errors import AttentionCaptureWarning, InterventionError
from .plans import LayerPlan
from .routes import on_mha_forward, on_sdpa, on_softmax, on_use

__all__ = ["Engine", "take_off"]


class Scope:
    """One running call of a planned layer (``plan``), or of an encoder kept off its fast path (``None``)."""

    __slots__ = ("module", "plan", "acted")

    def __init__(self, module: nn.Module, plan: Optional[LayerPlan]):
        self.module, self.plan, self.acted = module, plan, 0


class _ThreadState:
    def __init__(self, engine: "Engine"):
        self.scopes: List[Scope] = []
        self.mode = _InterventionMode(engine)
        self.mode_on = False
        self.pending = None  # an eager softmax followed to its product with the values (routes.Pending)


class _InterventionMode(TorchFunctionMode):
    """Hands the attention calls of a planned layer to its routes; everything else passes through."""

    def __init__(self, engine: "Engine"):
        super().__init__()
        self._engine = weakref.ref(engine)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        engine = self._engine()
        scope = None if engine is None else engine.current_scope()
        if scope is None or scope.plan is None:
            return func(*args, **kwargs)
        if func in SDPA_FUNCTIONS:
            return on_sdpa(scope, func, args, kwargs)
        if func is torch.nn.functional.multi_head_attention_forward:
            return on_mha_forward(scope, func, args, kwargs)
        state = engine.thread_state()
        if state.pending is not None:
            used = on_use(state, scope, func, args, kwargs)
            if used is not None:
                return used[0]
        result = func(*args, **kwargs)
        on_softmax(state, scope, func, args, kwargs, result)
        return result


class Engine:
    """Puts an intervention's plans on a model's modules, and takes them off.

    Args:
        model: the model.
        plans: ``{layer name: LayerPlan}``.
    """

    def __init__(self, model: nn.Module, plans: Dict[str, LayerPlan]):
        self.model, self.plans = model, plans
        self._local = threading.local()
        self._handles = HookHandles()

    def thread_state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadState(self)
        return state

    def current_scope(self) -> Optional[Scope]:
        scopes = self.thread_state().scopes
        return scopes[-1] if scopes else None

    def install(self) -> None:
        """Hooks each planned module (and the encoders around a planned ``nn.MultiheadAttention``)."""
        try:
            for plan in self.plans.values():
                self._handles.add_pair(plan.module, self._pre_hook(plan), self._post_hook(), with_kwargs=True)
            planned = [plan.module for plan in self.plans.values()]
            for module in fastpath_containers(self.model, planned):
                self._handles.add_pair(module, self._pre_hook(None), self._post_hook(), with_kwargs=True)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Takes every hook off, and this thread's mode (a forward interrupted by a
        ``KeyboardInterrupt`` ran no closing hook)."""
        self._handles.remove(lambda release: release())
        state = self.thread_state()
        state.scopes.clear()
        state.pending = None
        self._switch_off(state)

    # ------------------------------------------------------------------ scopes
    def _pre_hook(self, plan: Optional[LayerPlan]):
        def pre_hook(module, args, kwargs):
            state = self.thread_state()
            if not state.scopes:
                self._switch_on(state)
            state.scopes.append(Scope(module, plan))
            return None

        return pre_hook

    def _post_hook(self):
        def post_hook(module, args, kwargs, output):
            state = self.thread_state()
            if not state.scopes or state.scopes[-1].module is not module:
                return None
            scope = state.scopes.pop()
            if state.pending is not None and state.pending.scope is scope:
                state.pending = None
            if not state.scopes:
                self._switch_off(state)
            if scope.plan is not None and scope.acted == 0 and output is not None:  # None: the forward raised
                raise InterventionError(
                    f"layer {scope.plan.name!r} ran, but no attention call inside it could be acted on: no "
                    "scaled_dot_product_attention, nn.MultiheadAttention call, or softmax over (batch, heads, query, key) "
                    "followed by its product with the values; the intervention did not happen")
            return None

        return post_hook

    @staticmethod
    def _switch_on(state: _ThreadState) -> None:
        if not state.mode_on:
            state.mode.__enter__()
            state.mode_on = True

    @staticmethod
    def _switch_off(state: _ThreadState) -> None:
        if not state.mode_on:
            return
        state.mode_on = False
        stack = function_mode_stack()
        if not any(m is state.mode for m in stack):
            return
        if stack[-1] is state.mode:
            state.mode.__exit__(None, None, None)
        else:  # a mode entered above ours (a hooker's, entered later) stays, in order
            take_mode_out(state.mode)


def take_off(engine: Optional["Engine"], *, ran: bool, nothing_ran: str) -> None:
    """Takes ``engine`` off its model (``None``: already off); warns with ``nothing_ran`` when none of
    its layers ran inside the block, which compiled code built before it would explain."""
    if engine is not None:
        engine.remove()
    if not ran:
        warnings.warn(f"{nothing_ran}. Was the model called? Code torch.compile built before it does not run its "
                      "hooks: call the uncompiled model", AttentionCaptureWarning, stacklevel=3)
