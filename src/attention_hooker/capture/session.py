"""The live part of a capture: which hooked module is running, and the function mode.

While at least one hooked module (or a fast-path guard) is running, a
``TorchFunctionMode`` is on torch's mode stack; it sees every
``scaled_dot_product_attention`` and softmax call however it was imported, and
gives each to the innermost hooked module that is running. While scopes are
open the ``nn.MultiheadAttention`` fast path is off, so that
``nn.TransformerEncoderLayer`` cannot skip the hooked module. Both are undone
when the last scope closes, and by :meth:`CaptureSession.reset` after an
interrupted forward.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch.overrides import TorchFunctionMode

from ..store import AttentionStore
from .sdpa import SDPA_FUNCTIONS, as_4d, parse_sdpa_call, sdpa_attention_weights
from .softmax import SOFTMAX_FUNCTIONS, is_attention_softmax

__all__ = ["CaptureSession", "fastpath_flag_available"]


def fastpath_flag_available() -> bool:
    """Whether this torch has ``torch.backends.mha.set_fastpath_enabled`` (2.3 and newer)."""
    mha = getattr(torch.backends, "mha", None)
    return mha is not None and hasattr(mha, "set_fastpath_enabled")


class _FastPathSwitch:
    """Keeps the MHA fast path off while any session needs it, across sessions.

    Sessions of several hookers on one model open and close in interleaved
    order, so each one saving and restoring the flag itself would restore the
    wrong value; the first holder saves it and the last one restores it.
    """

    def __init__(self):
        self._holders = 0
        self._saved: Optional[bool] = None

    def hold(self) -> None:
        if self._holders == 0:
            self._saved = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        self._holders += 1

    def release(self) -> None:
        if self._holders == 0:
            return
        self._holders -= 1
        if self._holders == 0:
            torch.backends.mha.set_fastpath_enabled(self._saved)
            self._saved = None


_FASTPATH = _FastPathSwitch()


class _Scope:
    __slots__ = ("module", "layer")

    def __init__(self, module, layer: Optional[str]):
        self.module = module
        self.layer = layer  # None for a fast-path guard, which captures nothing


class _CaptureMode(TorchFunctionMode):
    """Routes attention calls to the session; every other call passes straight through."""

    def __init__(self, session: "CaptureSession"):
        super().__init__()
        self._session = session

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SDPA_FUNCTIONS:
            return self._session.on_sdpa(func, args, kwargs)
        result = func(*args, **kwargs)
        if func in SOFTMAX_FUNCTIONS:
            self._session.on_softmax(result, args, kwargs)
        return result


class CaptureSession:
    """Scope stack, function mode and fast-path flag for one hooker.

    Args:
        store: where captured weights go.
        use_fastpath_flag: switch the MHA fast path off with torch's flag; where
            torch lacks it, the active function mode alone keeps the fast path off.
    """

    def __init__(self, store: AttentionStore, *, use_fastpath_flag: Optional[bool] = None):
        self.store = store
        self._scopes: List[_Scope] = []
        self._mode = _CaptureMode(self)
        self._mode_on = False
        self._use_flag = fastpath_flag_available() if use_fastpath_flag is None else use_fastpath_flag
        self._holds_flag = False
        self.events = 0  # attention calls seen (kept or skipped), for the "nothing captured" check
        self.capture_scopes_entered = 0

    # ----------------------------------------------------------------- scopes
    def enter(self, module, layer: Optional[str]) -> None:
        """Opens a scope: ``layer`` names a hooked module, ``None`` a fast-path guard."""
        if not self._scopes:
            self._switch_on()
        self._scopes.append(_Scope(module, layer))
        if layer is not None:
            self.capture_scopes_entered += 1

    def exit(self, module) -> None:
        """Closes the innermost scope if it is ``module``'s (a scope never opened is ignored)."""
        if self._scopes and self._scopes[-1].module is module:
            self._scopes.pop()
            if not self._scopes:
                self._switch_off()

    def is_open(self, module) -> bool:
        return any(scope.module is module for scope in self._scopes)

    @property
    def active(self) -> bool:
        return bool(self._scopes)

    def reset(self) -> None:
        """Closes every scope and undoes the mode and the flag (after an interrupt)."""
        self._scopes.clear()
        self._switch_off()

    def current_layer(self) -> Optional[str]:
        return self._scopes[-1].layer if self._scopes else None

    # ------------------------------------------------------------ global state
    def _switch_on(self) -> None:
        if self._use_flag:
            _FASTPATH.hold()
            self._holds_flag = True
        self._mode.__enter__()
        self._mode_on = True

    def _switch_off(self) -> None:
        if self._mode_on:
            self._mode_on = False
            _remove_mode(self._mode)
        if self._holds_flag:
            self._holds_flag = False
            _FASTPATH.release()

    # ------------------------------------------------------------------ events
    def on_sdpa(self, func, args: tuple, kwargs: dict) -> Any:
        """Runs the real kernel and records the weights it used."""
        layer = self.current_layer()
        if layer is None:
            return func(*args, **kwargs)
        store = self.store
        if not store.wants(layer):
            self._skip(layer)
            return func(*args, **kwargs)
        call = parse_sdpa_call(args, kwargs)
        if store.policy.keep_grad and torch.is_grad_enabled():
            return self._sdpa_with_grad(call, layer)
        output = func(*args, **kwargs)
        query = call["query"]
        # Stored as computed: written straight into the stored tensor. Otherwise into a
        # scratch tensor that record() copies to the policy's dtype/device at once.
        buffer = store.buffer if store.stores_as_computed(query.dtype, query.device) else store.scratch
        with torch.no_grad():
            weights = sdpa_attention_weights(
                call["query"],
                call["key"],
                call["attn_mask"],
                bool(call["is_causal"]),
                call["scale"],
                bool(call["enable_gqa"]),
                heads=store.policy.heads,
                buffer=buffer,
            )  # (B, H, L, S)
        self._record(layer, weights, heads_selected=True)
        return output

    def _sdpa_with_grad(self, call: dict, layer: str) -> torch.Tensor:
        """With ``keep_grad``: the output is computed as ``weights @ value`` so that
        gradients reach the recorded weights (equal to the kernel's within float
        tolerance; dropout, when asked for, is applied to a copy of the weights)."""
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
        self._record(layer, weights, heads_selected=False)
        return output.reshape(tuple(query.shape[:-1]) + (value.shape[-1],))

    def on_softmax(self, result, args: tuple, kwargs: dict) -> None:
        layer = self.current_layer()
        if layer is None or not is_attention_softmax(result, args, kwargs):
            return
        if not self.store.wants(layer):
            self._skip(layer)
            return
        self._record(layer, result, heads_selected=False)

    def record_module_output(self, layer: str, weights: torch.Tensor, graph_tensor=None) -> None:
        """Records weights a module returned itself (the MHA route)."""
        if not self.store.wants(layer):
            self._skip(layer)
            return
        self._record(layer, weights, heads_selected=False, graph_tensor=graph_tensor)

    def _skip(self, layer: str) -> None:
        self.events += 1
        self.store.skip(layer)

    def _record(self, layer: str, weights: torch.Tensor, *, heads_selected: bool, graph_tensor=None) -> None:
        self.events += 1
        self.store.record(layer, weights, heads_selected=heads_selected, graph_tensor=graph_tensor)


def _remove_mode(mode: TorchFunctionMode) -> None:
    """Takes ``mode`` off torch's function-mode stack, wherever it stands on it."""
    stack = torch.overrides._get_current_function_mode_stack()
    if not any(m is mode for m in stack):
        return
    if stack[-1] is mode:
        mode.__exit__(None, None, None)
        return
    above = []
    while True:  # pop down to our mode, then put the others back in order
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)
