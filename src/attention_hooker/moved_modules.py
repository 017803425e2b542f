"""Old module paths of the package, for one release: ``attention_hooker.store`` is
``attention_hooker.keep.memory`` and so on (the same module object, so that what is set on
one is seen through the other). A meta path finder, installed when the package is imported."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["MOVED"]

MOVED = {
    "attention_hooker.capture.hooker": "attention_hooker.hooker",
    "attention_hooker.discovery": "attention_hooker.capture.discovery",
    "attention_hooker.capture.sdpa": "attention_hooker.capture.routes.sdpa",
    "attention_hooker.capture.softmax": "attention_hooker.capture.routes.softmax",
    "attention_hooker.capture.mha": "attention_hooker.capture.routes.mha",
    "attention_hooker.capture.buffers": "attention_hooker.keep.allocator",
    "attention_hooker.store": "attention_hooker.keep.memory",
    "attention_hooker.streaming": "attention_hooker.keep.stream",
    "attention_hooker.stream_call": "attention_hooker.keep.stream_call",
    "attention_hooker.stream_folder": "attention_hooker.keep.stream_folder",
    "attention_hooker.folder_lock": "attention_hooker.keep.folder_lock",
    "attention_hooker.pooling": "attention_hooker.keep.pooling",
    "attention_hooker.roles": "attention_hooker.analysis.roles",
    "attention_hooker.attribution": "attention_hooker.analysis.attribution",
    "attention_hooker.flow": "attention_hooker.analysis.flow",
    "attention_hooker.disk_format": "attention_hooker.io.format",
    "attention_hooker.naming": "attention_hooker.views.labels",
    "attention_hooker.plot": "attention_hooker.views.plot",
    "attention_hooker.html": "attention_hooker.views.page",
    "attention_hooker.html.long_calls": "attention_hooker.views.page.long_calls",
    "attention_hooker.workflows": "attention_hooker.cli.workflows",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=any(k.startswith(name + ".") for k in MOVED))

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])  # the module itself, under its old name too
        _REAL_SPECS[module.__name__] = module.__spec__
        return module

    def exec_module(self, module):
        # Already run under its new name. The import system has just set the alias's spec on
        # it: its own goes back (importlib.resources reads the package's files through it).
        module.__spec__ = _REAL_SPECS[module.__name__]


_REAL_SPECS: dict = {}


if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Alias())  # first: an old name inside a moved package is this alias, never a second copy
