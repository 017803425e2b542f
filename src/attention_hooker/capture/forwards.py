"""The model's own hooks: where each forward of the whole model begins and ends.

A forward's beginning clears what an interrupted one left (scopes a ``KeyboardInterrupt``
left open) and tells the keepers a forward begins; its end tells them whether it returned
(a stream keeps a forward whole or not at all) and judges it: a forward in which hooked
modules ran and nothing was captured, or some layers gave nothing, is warned about once.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Optional

from ..errors import AttentionCaptureWarning
from .diagnostics import being_traced, is_compiled, missing_layers_message, nothing_captured_message
from .hooks import HookHandles
from .session import frame_is_live, module_call_frame

__all__ = ["ForwardWatch"]


class ForwardWatch:
    """Watches the root forwards of ``model`` for one capture.

    Args:
        model: the hooked model.
        keepers: told ``begin_forward()`` and ``end_forward(returned=, reason=)`` (the router).
        coverage: the capture's :class:`~.coverage.Coverage` (its report goes into the warnings).
        hooked_layers: the names of the hooked layers (for the warnings).
    """

    def __init__(self, model, keepers, coverage, hooked_layers):
        # No reference to the hooker (a cycle would keep its captures alive until the garbage collector runs).
        self.model, self.keepers, self.coverage = model, keepers, coverage
        self.hooked_layers = hooked_layers
        self.session = None  # the capture's session while the hooks are on
        self._local = threading.local()  # each thread's open root forwards
        self.warned: set = set()  # what was warned about, once per capture
        self.on_first_forward: Optional[Callable[[], None]] = None  # run at the first root forward

    def running(self) -> bool:
        """Whether a root forward is open on this thread."""
        return bool(self._stack())

    def install(self, session, handles: HookHandles) -> None:
        """The root's pre-hook runs before every other hook of ours (it clears what an
        interrupted forward left before a scope opens), its post-hook after all of them (it
        judges the forward). A plain forward hook, run only when the forward returned, marks
        that it did (its output may be None)."""
        self.session = session
        handles.add_pair(self.model, self._pre_hook, self._post_hook, prepend_pre=True)
        handles.add_entry(self.model.register_forward_hook(self._returned_hook, prepend=True))

    def _stack(self) -> list:
        """This thread's open root forwards: ``[frame, events, scopes, generation, returned]`` each."""
        stack = getattr(self._local, "root", None)
        if stack is None:
            stack = self._local.root = []
        return stack

    def _pre_hook(self, module, args):
        if being_traced():
            self.warn_once(
                3, "traced",
                f"{type(self.model).__name__} is being traced (torch.export / torch.jit.trace) with hooks on: "
                "nothing is captured while tracing, and the traced program is the model's own; capture by "
                "running the model itself",
            )
            return
        session = self.session
        session.drop_stale_scopes()  # scopes a KeyboardInterrupt left open are closed here
        stack = self._stack()
        while stack and not frame_is_live(stack[-1][0]):
            stack.pop()  # a root forward that was interrupted
            if not stack:
                self.keepers.end_forward(returned=False,
                                         reason="interrupted (KeyboardInterrupt or another BaseException)")
        if not stack:
            self.keepers.begin_forward()  # a stream keeps what this forward writes whole or not at all
            first, self.on_first_forward = self.on_first_forward, None
            if first is not None:
                first()
        stack.append([module_call_frame(), *session.counters(), self.coverage.generation, False])

    def _returned_hook(self, module, args, output):
        stack = self._stack()
        if stack:
            stack[-1][-1] = True  # this root call returned (hooks of nested root calls popped theirs)
        return None

    def _post_hook(self, module, args, output):
        stack = self._stack()
        if not stack:
            return None  # traced, or entered before the hooks were put on
        _, events_before, scopes_before, generation, returned = stack.pop()
        if stack:
            return None  # the root called itself: the outer call judges
        self.keepers.end_forward(returned=returned)  # a stream raises when it could not write the forward whole
        if output is None:  # the forward raised: its error says more than a warning would
            return None
        self._judge(events_before, scopes_before, generation)
        return None

    def _judge(self, events_before: int, scopes_before: int, generation: int) -> None:
        events, scopes = self.session.counters()
        if scopes > scopes_before and events == events_before:
            self.warn_once(4, "empty", nothing_captured_message(self.model, self.hooked_layers, self.coverage.report()))
        elif (scopes > scopes_before and "missing" not in self.warned and generation == self.coverage.generation
              and self.coverage.report().missing):  # a clear() on another thread meanwhile leaves nothing to judge by
            self.warn_once(4, "missing", missing_layers_message(self.model, self.coverage.report()))
        elif scopes == scopes_before and is_compiled(self.model):
            self.warn_once(
                4, "compiled",
                f"{type(self.model).__name__} ran code that torch.compile built before the hooks were put on, "
                "and compiled code does not run them: nothing was captured. Capture on the uncompiled module "
                "(TransformerAttentionHooker(model._orig_mod) and call model._orig_mod(...)), or hook the "
                "model before its first compiled call",
            )

    def warn_once(self, stacklevel: int, key: str, message: str) -> None:
        """Warns once per capture and ``key``, pointing at the module call that ran the hook."""
        if key in self.warned:
            return
        self.warned.add(key)
        warnings.warn(message, AttentionCaptureWarning, stacklevel=stacklevel)
