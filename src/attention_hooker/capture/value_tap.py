"""The value vectors a pieced layer's call multiplied, as its own value projection returned them.

A pieced family (:mod:`.pieces`) keeps its value vectors with ``keep_values``. Making them again
after the call (calling the projection a second time) would not give what the model multiplied:
a projection that is not deterministic (a dropout inside it in train mode, LoRA's
``lora_dropout``) returns other values, its extra draw changes the model's later randomness and so
its outputs, and a user's forward hook on it fires twice. So the family names the submodules whose
outputs are its values (:attr:`~.pieces.PiecedLayer.value_modules`), and while the capture keeps
values a :class:`ValueTap` watches them:

* a pre-hook on the layer opens a :class:`SeenValues` for the call (per thread: a call on another
  thread, or a call of the projection outside the layer's call, is not seen), the forward hook
  closes it (``always_call``: also when the call raises);
* a forward hook on each named submodule keeps a reference to what it returned to the model
  (detached: no graph is held), in call order;
* the family's :meth:`~.pieces.PiecedLayer.start` hands the open record to its call, which builds
  its value vectors from those outputs when it assembles (:func:`seen_outputs`), or refuses when
  they are not the ones it expects (never made again).

The hooks are handed to the capture's ``add_handle`` and removed with its other hooks; nothing is
installed when the capture does not keep values.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .diagnostics import being_traced

__all__ = ["SeenValues", "ValueTap", "seen_outputs"]


class SeenValues:
    """What the watched value submodules of one layer call returned, in call order.

    Attributes:
        outputs: ``{submodule name: [output per call of it]}`` (tensors detached; anything else as returned).
    """

    def __init__(self):
        self.outputs: Dict[str, List[object]] = {}

    def add(self, name: str, output) -> None:
        """Keeps one output of submodule ``name``."""
        self.outputs.setdefault(name, []).append(output.detach() if isinstance(output, torch.Tensor) else output)


class ValueTap:
    """Watches a layer's value submodules during each of its calls, on each thread on its own.

    Args:
        layer: the hooked attention module.
        names: the attribute names of its value submodules (``"value"``, ``"qkv"``, ``"v_proj"``).

    Example:
        >>> layer = nn.Module(); layer.v = nn.Linear(2, 2)
        >>> layer.forward = lambda x: layer.v(x) * 2
        >>> tap, handles = ValueTap(layer, ["v"]), []
        >>> tap.install(handles.append)
        >>> seen = []
        >>> opened = layer.register_forward_pre_hook(lambda m, a: seen.append(tap.current()))
        >>> out = layer(torch.ones(1, 2))
        >>> torch.equal(seen[0].outputs["v"][0] * 2, out), tap.current() is None
        (True, True)
        >>> layer.v(torch.ones(1, 2)).shape, len(seen[0].outputs["v"])  # outside the layer's call: not seen
        (torch.Size([1, 2]), 1)
    """

    def __init__(self, layer: nn.Module, names: Sequence[str]):
        self.layer = layer
        # a name the layer has no submodule under is not watched: its calls then refuse keep_values
        # (seen_outputs counts none), rather than the capture failing to install
        self.modules: Dict[str, nn.Module] = {name: getattr(layer, name) for name in names
                                              if isinstance(getattr(layer, name, None), nn.Module)}
        self._local = threading.local()

    def install(self, add_handle: Callable) -> None:
        """Puts the hooks on (each handle handed to ``add_handle``). The layer's pre-hook goes first,
        so the record is open when the capture's own pre-hook starts the call."""
        add_handle(self.layer.register_forward_pre_hook(self._open, prepend=True))
        add_handle(self.layer.register_forward_hook(self._close, always_call=True))
        for name, module in self.modules.items():
            add_handle(module.register_forward_hook(functools.partial(self._seen, name)))

    def current(self) -> Optional[SeenValues]:
        """The record of the layer call running on this thread (the innermost), or ``None`` outside one."""
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else None

    def _open(self, module, args) -> None:
        if being_traced():
            return
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(SeenValues())

    def _close(self, module, args, output) -> None:
        if being_traced():
            return
        stack = getattr(self._local, "stack", None)
        if stack:
            stack.pop()

    def _seen(self, name: str, module, args, output) -> None:
        if being_traced():
            return
        record = self.current()
        if record is not None:
            record.add(name, output)


def seen_outputs(seen: Optional[SeenValues], name: str, count: int, family: str) -> Union[List[torch.Tensor], str]:
    """The ``count`` tensors submodule ``name`` returned in one layer call, or why they cannot be
    the values the call multiplied (the call is then refused; they are never made again).

    Example:
        >>> seen = SeenValues(); seen.add("v", torch.ones(2))
        >>> len(seen_outputs(seen, "v", 1, "LongT5"))
        1
        >>> print(seen_outputs(seen, "v", 2, "LongT5").split(" in the call")[0])
        keep_values on a LongT5 layer: its value projection v returned 1 tensors
    """
    if seen is None:
        return (f"keep_values on a {family} layer whose value projection {name} was not watched during the call "
                "(called outside the capture's hooks), so the values it multiplied are not known and the call is "
                "not stored (capture it without keep_values)")
    outputs = seen.outputs.get(name, [])
    if len(outputs) != count or not all(isinstance(o, torch.Tensor) for o in outputs):
        return (f"keep_values on a {family} layer: its value projection {name} returned {len(outputs)} "
                f"{'tensors' if all(isinstance(o, torch.Tensor) for o in outputs) else 'outputs, not all tensors,'} "
                f"in the call where the layer's code calls it {count} time{'s' if count != 1 else ''}, so which "
                "values its map multiplied cannot be told and the call is not stored (capture it without keep_values)")
    return list(outputs)
