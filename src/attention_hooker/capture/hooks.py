"""The hooks a capture puts on a model's modules, and the one handle that takes them all off.

Each hooked module gets a forward pre-hook that opens its scope in the session and a
forward hook (``always_call``: it runs when the forward raises too) that closes it; an
``nn.MultiheadAttention`` is also subscribed to its route (it must be asked for per-head
weights); an encoder (layer) holding a hooked module gets a scope that keeps its fused
fast path off. :class:`HookHandles` holds all of it, like one
``torch.utils.hooks.RemovableHandle`` for everything the capture put on.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

from torch import nn

from .diagnostics import being_traced, in_backward_pass
from .batching import packed_requests
from .inputs import input_shape
from .routes.mha import MultiheadAttentionRoute, fastpath_containers, mha_post_hook
from .session import module_call_frame
from .pieces import UNKEPT_CALL, pieced_layer
from .windows import windowed_layer

__all__ = ["HookHandles", "install_layer_hooks"]


class HookHandles:
    """Everything one capture put on a model, taken off by one :meth:`remove`.

    The pre-hooks (which open scopes) go at once; the hooks that close scopes and the
    route subscriptions (which hand an ``nn.MultiheadAttention``'s caller back what it
    asked for) go once no thread is inside a hooked forward any more.
    """

    def __init__(self):
        self._entry: List = []  # removable handles, removed at once
        self._exit: List[Callable[[], None]] = []  # releases, run when no forward is inside

    def __bool__(self) -> bool:
        """Whether any hook is on."""
        return bool(self._entry)

    def add_pair(self, module: nn.Module, pre, post, *, with_kwargs: bool = False, prepend_pre: bool = False,
                 prepend_post: bool = False) -> None:
        """A pre-hook that opens, and a forward hook (run even when the forward raises) that closes."""
        self._entry.append(module.register_forward_pre_hook(pre, with_kwargs=with_kwargs, prepend=prepend_pre))
        handle = module.register_forward_hook(post, with_kwargs=with_kwargs, always_call=True, prepend=prepend_post)
        self._exit.append(handle.remove)

    def add_entry(self, handle) -> None:
        """A hook removed at once (a removable handle)."""
        self._entry.append(handle)

    def add_exit(self, release: Callable[[], None]) -> None:
        """Something undone once no thread is inside a hooked forward."""
        self._exit.append(release)

    def remove(self, close_session: Callable[[Callable[[], None]], object]) -> None:
        """Takes the pre-hooks off now, and hands ``close_session`` the function that takes
        the rest off (the session runs it when the last forward inside leaves). Safe twice."""
        entry, self._entry = self._entry, []
        for handle in entry:
            handle.remove()
        exits, self._exit = self._exit, []

        def remove_exit_hooks() -> None:
            for release in exits:
                release()

        close_session(remove_exit_hooks)


def install_layer_hooks(model: nn.Module, targets: Sequence[Tuple[nn.Module, str]], session,
                        handles: HookHandles) -> None:
    """Hooks each ``(module, layer name)`` of ``targets`` into ``session``, and keeps the fast
    path of every encoder (layer) around them off. A windowed (Swin) layer also gets a pre-hook
    on its block, where its window layout is read (:mod:`.windows`); a layer that computes its
    map in pieces (Longformer) starts a :class:`~.pieces.PieceCall` at each call (:mod:`.pieces`)."""
    parents = _ParentsOf(model)  # walked only when a windowed family's rule asks
    for module, name in targets:
        if isinstance(module, nn.MultiheadAttention):
            route = MultiheadAttentionRoute.subscribe(module)
            handles.add_exit(route.unsubscribe)
            # prepend: this capture's recording runs before the shared route hands the
            # caller back what it asked for (which may hide the weights).
            handles.add_pair(module, _pre_hook(session, name), mha_post_hook(session, name), with_kwargs=True,
                             prepend_post=True)
        else:
            windows = windowed_layer(module, parents)
            if windows is not None:
                windows.install(handles.add_entry)
            pieces = pieced_layer(module, parents) if windows is None else None
            if pieces is not None:
                pieces.install(handles.add_entry, module, session.router.policy.keep_values)
                slot = pieces.slot()
                if slot is not None:
                    handles.add_entry(slot[0].register_forward_pre_hook(_swap_watch(session, name, module, pieces)))
            handles.add_pair(module, _pre_hook(session, name, windows, pieces), _post_hook(session),
                             with_kwargs=True)
    for module in fastpath_containers(model, [m for m, _ in targets]):
        handles.add_pair(
            module,
            lambda m, args: None if being_traced() else session.enter(m, None, module_call_frame()),
            lambda m, args, out: session.exit(m),
        )


class _ParentsOf:
    """``{id(child): parent}`` over ``model``'s modules, made at its first lookup: a capture
    whose layers no windowed family could be (most) never walks the model for it."""

    def __init__(self, model: nn.Module):
        self._model, self._map = model, None

    def get(self, key, default=None):
        if self._map is None:
            self._map = {id(child): parent for parent in self._model.modules() for child in parent.children()}
        return self._map.get(key, default)


def _pre_hook(session, name: str, windows=None, pieces=None):
    def pre_hook(module, args, kwargs):
        if being_traced():
            return None
        # Inside backward, a forward is activation checkpointing recomputing one that was
        # captured already: it runs exactly as before (MHA still asked for weights, so the
        # recomputed graph matches) but records nothing.
        layer = None if in_backward_pass() else name
        call = None
        if pieces is not None and layer is not None:  # a call the capture will not keep starts nothing
            call = pieces.start(module, args, kwargs) if session.router.wants(layer) else UNKEPT_CALL
        session.enter(module, layer, module_call_frame(), input_shape(args, kwargs),
                      packed_requests(module, kwargs) if kwargs else None, windows, call)
        return None

    return pre_hook


def _swap_watch(session, name: str, module: nn.Module, pieces):
    """A pre-hook on the parent of a pieced layer (:meth:`~.pieces.PiecedLayer.slot`): when the parent runs
    holding another module where the hooked one was, the layer ran unseen; the session says so (a
    warning, and the layer's coverage refused with the family's reason), never "did not run"."""
    parent, attribute = pieces.slot()

    def pre_hook(_parent, args):
        if being_traced() or in_backward_pass():
            return None
        held = getattr(parent, attribute, None)
        if held is not module:
            session.layer_swapped(name, pieces.swapped(name, held))
        return None

    return pre_hook


def _post_hook(session):
    def post_hook(module, args, kwargs, output):
        session.exit(module)
        return None

    return post_hook
