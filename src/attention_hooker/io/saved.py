"""Saving, loading and exporting captures.

A capture is saved as one safetensors file: tensor ``"<layer index>.<call index>"``
per call, and JSON metadata (layer order, calls per layer, tokens, model class,
dtype, library version) under the key ``"attention_hooker"``. A call stored as another kind
of map than probabilities over tokens (:mod:`attention_hooker._map_kinds`) has its kind saved
beside it (``"kinds"``), and is marked again when it is loaded, so that the analyses refuse it.
"""

from __future__ import annotations

import json
import os
import re
import stat
from types import SimpleNamespace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .._axis_labels import AxisLabels
from .._checks import prepare_output_path
from ..selection import selected_rows
from .._tensor import as_batched, values_of
from ..errors import AttentionHookerError
from ..values import AttentionValues, natural_order
from .._map_kinds import describe_kind, kind_from_description, kind_of, mark_kind
from .._per_window import mark_per_window, refuse_per_window
from ..window_index import WindowIndex, checked_window_map
from .format import INDEX_NAME, CheckedCalls, checked_file, checked_path, parse_json, read_index

__all__ = ["SavedAttention", "save_values", "load", "to_bertviz", "to_numpy"]

_FORMAT = "attention-hooker/1"
_META_KEY = "attention_hooker"


def _safetensors():
    try:
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open
    except ImportError:
        raise ImportError(
            "saving captures needs safetensors: pip install 'transformer-attention-hooker[io]' (or pip install safetensors)"
        ) from None
    return save_file, load_file, safe_open


def _version() -> str:
    from .. import __version__

    return __version__


class SavedAttention:
    """A loaded capture: ``values`` like a hooker's, plus what was saved with it.

    Attributes:
        values: ``{layer_name: [tensor per call]}``, each ``(batch, heads, query, key)``.
        tokens: the token labels saved with it, or ``None``.
        metadata: the rest (model class, dtype, library version, ...).
        window_index: ``{layer_name: [WindowIndex or None per call]}`` of the windowed layers
            captured with ``windows="keep"`` (their calls are ``(batch * windows, heads, N, N)``;
            ``index.dense(call)`` places one at its tokens); empty for other captures.
    """

    def __init__(self, values: AttentionValues, tokens: Optional[list], metadata: dict,
                 window_index: Optional[Dict[str, list]] = None):
        self.values = values
        self.tokens = tokens
        self.metadata = metadata
        self.window_index = window_index or {}

    @property
    def requests(self) -> Dict[str, "SavedAttention"]:
        """A capture streamed under continuous batching: ``{request id: its own capture}``, each
        read from the folder this capture's index names for it (``requests/<id>``, checked to be
        a real folder inside this one); ``{}`` for any other capture.

        Raises:
            AttentionHookerError: when the index names a request folder that is not such a folder.
        """
        listed = self.metadata.get("requests")
        folder = self.metadata.get("streamed")
        if not listed or not isinstance(folder, str):
            return {}
        if not isinstance(listed, dict):
            raise AttentionHookerError(f"{folder} is damaged: its index's requests {listed!r} are not a mapping")
        lazy, partial = getattr(self, "_load_options", (True, False))
        found = {}
        for request, relative in sorted(listed.items(), key=lambda item: natural_order(str(item[0]))):
            if not (isinstance(request, str) and isinstance(relative, str)
                    and re.fullmatch(r"requests/[A-Za-z0-9_][A-Za-z0-9_.-]*", relative)):
                raise AttentionHookerError(f"{folder} is damaged: request {request!r} is listed at {relative!r}, not a "
                                           "folder requests/<name> inside the capture")
            path = os.path.join(folder, *relative.split("/"))
            if not all(os.path.lexists(p) and stat.S_ISDIR(os.lstat(p).st_mode)
                       for p in (os.path.join(folder, "requests"), path)):
                raise AttentionHookerError(f"{folder} is damaged: the folder {relative!r} of request {request!r} is "
                                           "missing (or not a real folder)")
            found[request] = load(path, lazy=lazy, partial=partial)
        return found

    def save(self, path, *, tokens: Optional[Sequence[str]] = None) -> None:
        """Writes this capture again (see :func:`save_values`)."""
        save_values(self.values, path, tokens=tokens if tokens is not None else self.tokens,
                    model_class=self.metadata.get("model_class"), selection=self.metadata.get("selection"),
                    windows=self.window_index)

    def __repr__(self) -> str:
        return f"SavedAttention({self.metadata.get('model_class') or 'model'}, {self.values!r})"


def save_values(
    values: Mapping[str, Sequence[torch.Tensor]],
    path: Union[str, os.PathLike],
    *,
    tokens: Optional[Sequence[str]] = None,
    model_class: Optional[str] = None,
    selection: Optional[Mapping] = None,
    windows: Optional[Mapping[str, Sequence[Optional[WindowIndex]]]] = None,
) -> None:
    """Writes ``{layer_name: [tensor per call]}`` to one safetensors file.

    Args:
        values: ``hooker.values``.
        path: the file; missing folders are created.
        tokens: token labels to keep with it.
        model_class: the model's class name, kept as metadata.
        selection: which heads and query rows the capture kept
            (``hooker.selection``), kept as metadata so that views label the axes.
        windows: ``{layer_name: [WindowIndex or None per call]}`` of calls kept per window
            (``hooker.window_index``), each checked against its call and saved beside it.

    Raises:
        AttentionHookerError: when there is nothing to save, a call is not
            ``(batch, heads, query, key)``, the tokens fit no axis of any call, or
            the path cannot be written.
    """
    save_file, _, _ = _safetensors()
    if not isinstance(values, Mapping):
        raise AttentionHookerError(f"expected {{layer_name: [tensor per call]}} to save, got {type(values).__name__}")
    if not values or not any(len(calls) for calls in values.values()):
        raise AttentionHookerError("nothing to save: the capture holds no attention (run the model with hooks on first)")
    indexed = checked_window_map(windows or {}, "windows=")
    kinds = _described_kinds(values)  # read before any call is made batched (a new tensor has no mark)
    values = {
        name: [tensor if _indexed(indexed, name, call) else as_batched(tensor, f"layer {name!r} call {call}")
               for call, tensor in enumerate(calls)]
        for name, calls in values.items()
    }  # each (batch, heads, query, key), or (batch * windows, heads, N, N) beside its window index
    windows = _described_windows(indexed, values)
    tokens = _checked_tokens(tokens, values, selection)
    path = prepare_output_path(path, what="capture")
    tensors: Dict[str, torch.Tensor] = {}
    layers: List[str] = []
    calls_per_layer: List[int] = []
    dtypes = set()
    for index, (name, calls) in enumerate(values.items()):
        layers.append(name)
        calls_per_layer.append(len(calls))
        for call, tensor in enumerate(calls):
            tensors[f"{index}.{call}"] = _own_memory(tensor.detach().to("cpu").contiguous())
            dtypes.add(str(tensor.dtype).replace("torch.", ""))
    meta = {
        "format": _FORMAT,
        "layers": layers,
        "calls": calls_per_layer,
        "tokens": tokens,
        "model_class": model_class,
        "selection": dict(selection) if selection else None,
        "dtype": sorted(dtypes),
        "library_version": _version(),
    }
    if windows:
        meta["windows"] = windows
    if kinds:
        meta["kinds"] = kinds
    save_file(tensors, path, metadata={_META_KEY: json.dumps(meta)})


def _described_kinds(values: Mapping) -> Optional[Dict[str, list]]:
    """``{layer: [kind description or None per call]}`` of the layers with a call marked as another
    kind of map than probabilities over tokens (a call kept per window is described by its window
    index instead)."""
    described = {}
    for name, calls in values.items():
        if isinstance(calls, torch.Tensor):
            calls = [calls]
        found = [kind_of(list.__getitem__(calls, call)) if isinstance(calls, list) else kind_of(calls[call])
                 for call in range(len(calls))]
        found = [None if kind is None or kind.name == "per-window" else describe_kind(kind) for kind in found]
        if any(kind is not None for kind in found):
            described[name] = found
    return described or None


def _read_kinds(meta: dict, values: Mapping, where: str) -> None:
    """Marks each loaded call its saved kind names (checked against the calls it is saved beside)."""
    saved = meta.get("kinds")
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise AttentionHookerError(f"{where} is damaged: its kinds of map are not a mapping of layers")
    for name, kinds in saved.items():
        calls = values.get(name)
        if calls is None or not isinstance(kinds, list) or len(kinds) != len(calls):
            raise AttentionHookerError(f"{where} is damaged: the kinds of map of layer {name!r} do not list one "
                                       "entry per call of the layer")
        for call, data in enumerate(kinds):
            if data is not None:
                kind = kind_from_description(data, f"{where}: the kind of layer {name!r} call {call}")
                mark_kind(list.__getitem__(calls, call), kind)  # the analyses that need probabilities refuse it


def _read_layer_kinds(meta: dict, values: Mapping, where: str) -> None:
    """Marks every call of each layer a streamed capture's index names a kind of map for
    (``{layer: kind description}``: one kind per layer, see ``keep/stream.py``)."""
    saved = meta.get("kinds")
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise AttentionHookerError(f"{where} is damaged: its kinds of map are not a mapping of layers")
    for name, data in saved.items():
        calls = values.get(name)
        if calls is None:
            raise AttentionHookerError(f"{where} is damaged: its index names a kind of map for layer {name!r}, "
                                       "which it does not list")
        kind = kind_from_description(data, f"{where}: the kind of layer {name!r}")
        for call in range(len(calls)):
            mark_kind(list.__getitem__(calls, call), kind)  # the analyses that need probabilities refuse it


def _indexed(windows: Mapping, name: str, call: int) -> bool:
    """Whether call ``call`` of layer ``name`` has a window index (is kept per window)."""
    indices = windows.get(name)
    return indices is not None and call < len(indices) and indices[call] is not None


def _described_windows(windows, values: Mapping) -> Optional[Dict[str, list]]:
    """``{layer: [index description or None per call]}`` for saving, each index checked against its call."""
    if not windows:
        return None
    described = {}
    for name, indices in windows.items():
        calls = values.get(name)
        if calls is None or len(indices) != len(calls):
            raise AttentionHookerError(f"the window index of layer {name!r} lists {len(indices)} calls, while the "
                                       f"capture holds {0 if calls is None else len(calls)} of it")
        for call, (tensor, index) in enumerate(zip(calls, indices)):
            if index is not None:
                index.check(tensor, f"layer {name!r} call {call}")
        described[name] = [None if index is None else index.describe() for index in indices]
    return described


def _read_windows(meta: dict, values: Mapping, where: str) -> Dict[str, list]:
    """The saved window index, checked against the calls it is saved beside."""
    saved = meta.get("windows")
    if saved is None:
        return {}
    if not isinstance(saved, dict):
        raise AttentionHookerError(f"{where} is damaged: its window index is not a mapping of layers")
    found = {}
    for name, indices in saved.items():
        calls = values.get(name)
        if calls is None or not isinstance(indices, list) or len(indices) != len(calls):
            raise AttentionHookerError(f"{where} is damaged: the window index of layer {name!r} does not list one "
                                       "entry per call of the layer")
        found[name] = []
        for call, data in enumerate(indices):
            index = None if data is None else WindowIndex.from_description(
                data, f"{where}: the window index of layer {name!r} call {call}")
            if index is not None:
                index.check(calls[call], f"{where}: layer {name!r} call {call}")
                mark_per_window(list.__getitem__(calls, call))  # (batch * windows, heads, N, N): readers refuse it
            found[name].append(index)
    return found


def _own_memory(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, or a copy where it shares its memory (small calls lie side by side in
    one chunk, see ``keep/allocator.py``; safetensors refuses tensors that share)."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def _checked_tokens(tokens, values: Mapping, selection: Optional[Mapping]) -> Union[None, List[str], List[List[str]]]:
    """The tokens as saved (one list, or a list of lists), each list labelling some axis of some
    call by the views' rule (:class:`~attention_hooker._axis_labels.AxisLabels`), through the
    capture's kept rows and keys where it kept some."""
    if tokens is None:
        return None
    selected = SimpleNamespace(metadata={"selection": dict(selection or {})})
    labels = AxisLabels(tokens, rows=selected_rows(selected), keys=selected_rows(selected, "keys"))
    labels.check([(f"layer {name!r}", tuple(t.shape)) for name, calls in values.items() for t in calls])
    return labels.lists[0] if len(labels.lists) == 1 else labels.lists


def load(path: Union[str, os.PathLike], *, lazy: Optional[bool] = None, partial: bool = False) -> SavedAttention:
    """Reads a capture: a file written by ``hooker.save(path)``, or a folder written by
    ``hooker.stream_to(folder)``.

    Nothing on disk is trusted: a streamed folder's index, file names and every tensor's
    dtype, shape and bytes are checked before a tensor is made (see ``io/format.py``).

    Args:
        path: the ``.safetensors`` file, or the streamed capture's folder (or its
            ``capture.json``).
        lazy: map each call from its file instead of reading it (a tensor whose
            pages are read when touched: one layer or head costs only its bytes; each
            access through ``values`` checks first that the file was not cut or replaced).
            Default: lazy for a streamed folder, read for a file.
        partial: also read a streamed capture that is not complete (a write failed, or
            it is still being written, or its writer stopped): the forwards written
            whole, as ``metadata["state"]`` and ``metadata["failures"]`` say.

    Returns:
        A :class:`SavedAttention` whose ``values`` equal the saved ones exactly.

    Raises:
        FileNotFoundError: when there is no such file or folder.
        AttentionHookerError: when it is not a capture saved by this library, a file is
            missing or damaged, or a streamed capture is partial and ``partial`` is not set.

    Example:
        >>> import tempfile, os
        >>> v = {"layer": [torch.rand(1, 2, 3, 3)]}
        >>> p = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        >>> save_values(v, p, tokens=["a", "b", "c"])
        >>> loaded = load(p)
        >>> bool(torch.equal(loaded.values["layer"][0], v["layer"][0])), loaded.tokens
        (True, ['a', 'b', 'c'])
    """
    _, load_file, safe_open = _safetensors()
    if not isinstance(path, (str, os.PathLike)):
        raise AttentionHookerError(f"the capture path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such capture file: {path}")
    if os.path.isdir(path) or os.path.basename(path) == INDEX_NAME:
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        return _load_streamed(folder, lazy is not False, partial)
    try:
        with safe_open(path, framework="pt") as handle:
            raw_meta = (handle.metadata() or {}).get(_META_KEY)
    except Exception as err:  # safetensors raises its own error types for non-safetensors files
        raise AttentionHookerError(f"{path} is not a safetensors file saved by attention_hooker ({err})") from None
    if raw_meta is None:
        raise AttentionHookerError(
            f"{path} is a safetensors file but not an attention_hooker capture: its metadata has no {_META_KEY!r} entry"
        )
    meta = parse_json(raw_meta, f"{path}: unreadable attention_hooker metadata", _FORMAT, ("layers", "calls"))
    layers, calls = meta["layers"], meta["calls"]
    if (not isinstance(layers, list) or not isinstance(calls, list) or len(layers) != len(calls)
            or not all(isinstance(n, str) for n in layers)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in calls)):
        raise AttentionHookerError(f"{path} is damaged: its metadata's layers {layers!r} and calls {calls!r} are not "
                                   "a list of names and a list of call counts of one length")
    checked = checked_path(path) if lazy else None
    tensors = checked.tensors(lazy=True) if lazy else load_file(path)
    values = AttentionValues()
    for index, (name, n_calls) in enumerate(zip(layers, calls)):
        try:
            layer_calls = [_attention(tensors[f"{index}.{call}"], path, name) for call in range(n_calls)]
        except KeyError as missing:
            raise AttentionHookerError(f"{path} is damaged: tensor {missing} of layer {name!r} is missing") from None
        values[name] = CheckedCalls(layer_calls, [checked] * n_calls) if lazy else layer_calls
    tokens = meta.get("tokens")
    extra = {k: v for k, v in meta.items() if k not in ("layers", "calls", "tokens", "windows", "kinds")}
    _read_kinds(meta, values, path)
    return SavedAttention(values, tokens, extra, _read_windows(meta, values, path))


def _attention(tensor: torch.Tensor, where: str, layer: str) -> torch.Tensor:
    """``tensor``, checked to be one call's ``(batch, heads, query, key)``."""
    if tensor.dim() != 4:
        raise AttentionHookerError(f"{where} is damaged: a call of layer {layer!r} has shape {tuple(tensor.shape)}; "
                                   "expected (batch, heads, query, key)")
    return tensor


def _load_streamed(folder: str, lazy: bool, partial: bool) -> SavedAttention:
    """A capture written by ``hooker.stream_to(folder)`` (see ``keep/stream.py`` and ``io/format.py``)."""
    index_path = os.path.join(folder, INDEX_NAME)
    ranks = sorted(name for name in os.listdir(folder)  # real folders only: a link could lead anywhere
                   if re.fullmatch(r"rank-[0-9]{5,}", name) and stat.S_ISDIR(os.lstat(os.path.join(folder, name)).st_mode)
                   and os.path.lexists(os.path.join(folder, name, INDEX_NAME)))
    if not os.path.lexists(index_path) and ranks:
        return _merge_ranks(folder, [_load_streamed(os.path.join(folder, name), lazy, partial) for name in ranks],
                            ranks)
    if not os.path.lexists(index_path):
        raise AttentionHookerError(
            f"the capture path {folder!r} is a folder without {INDEX_NAME}; expected a .safetensors file "
            "or a folder written by hooker.stream_to()")
    meta = read_index(folder)
    if meta["state"] != "complete" and not partial:
        raise AttentionHookerError(_partial_message(folder, meta))
    opened: Dict[str, tuple] = {}
    values = AttentionValues()
    for name, calls in zip(meta["layers"], meta["files"]):
        tensors, files = [], []
        for file_name, tensor_name in calls:
            if file_name not in opened:
                checked = checked_file(folder, file_name, index_path)
                opened[file_name] = (checked, checked.tensors(lazy=lazy))
            checked, in_file = opened[file_name]
            tensor = in_file.get(tensor_name)
            if tensor is None:
                raise AttentionHookerError(f"{folder} is damaged: {file_name} lacks tensor {tensor_name!r} of {name!r}")
            tensors.append(_attention(tensor, os.path.join(folder, file_name), name))
            files.append(checked)
        values[name] = CheckedCalls(tensors, files) if lazy else tensors
    _read_layer_kinds(meta, values, folder)
    extra = {k: v for k, v in meta.items() if k not in ("layers", "calls", "files", "tokens", "kinds")}
    extra["streamed"] = folder
    saved = SavedAttention(values, meta.get("tokens"), extra)
    saved._load_options = (lazy, partial)  # its requests' captures (continuous batching) are read alike
    return saved


def _partial_message(folder: str, meta: dict) -> str:
    """Why a streamed capture is not complete, and how to read what of it is whole."""
    whole = len({k for forwards in meta["forwards"] for k in forwards})
    failures = meta.get("failures") if isinstance(meta.get("failures"), list) else []
    why = next((f.get("reason") for f in failures if isinstance(f, dict) and f.get("write_error")), None)
    state = {"writing": "is being written, or its writer stopped before closing it",
             "partial": "is partial: a write failed"}[meta["state"]]
    return (f"the capture in {folder} {state}{f' ({why})' if why else ''}; it lists {whole} forward(s) written "
            "whole; load(path, partial=True) reads those")


def _merge_ranks(folder: str, parts: List[SavedAttention], ranks: List[str]) -> SavedAttention:
    """The captures the ranks of one job streamed, as one: each layer's calls of rank 0,
    then of rank 1, ...; ``metadata["ranks"]`` says how many calls each rank gave."""
    values = AttentionValues()
    for part in parts:
        for name, calls in part.values.items():
            values[name] = CheckedCalls.joined(values.get(name), calls)
    order = {name: i for part in reversed(parts) for i, name in enumerate(part.values)}
    values = AttentionValues(sorted(values.items(), key=lambda kv: order[kv[0]]))
    metadata = dict(parts[0].metadata)
    states = [part.metadata.get("state", "complete") for part in parts]
    metadata["state"] = next((state for state in ("partial", "writing") if state in states), "complete")  # the worst
    metadata["failures"] = {rank: part.metadata.get("failures", []) for rank, part in zip(ranks, parts)}
    metadata["streamed"] = folder
    metadata["ranks"] = {rank: {name: len(calls) for name, calls in part.values.items()}
                         for rank, part in zip(ranks, parts)}
    tokens = [part.tokens for part in parts]
    return SavedAttention(values, tokens if any(t is not None for t in tokens) else None, metadata)


def to_bertviz(source, *, call: int = 0, layers: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, ...]:
    """BertViz's input: a tuple of per-layer ``(batch, heads, tokens, tokens)`` tensors in model order.

    Args:
        source: a hooker, a loaded capture, or ``{layer_name: [tensor per call]}``.
        call: which call of each layer.
        layers: the layer names to include (default: all, in their order).

    Example:
        >>> to_bertviz({"a": [torch.ones(1, 2, 3, 3)], "b": [torch.ones(1, 2, 3, 3)]})[1].shape
        torch.Size([1, 2, 3, 3])
    """
    from ..analysis.core import layer_sequence

    tensors = layer_sequence(values_of(source, layers=layers), call=call)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise AttentionHookerError(
            f"BertViz needs every layer to have one shape, got {sorted(shapes)}; pick layers of one kind with layers="
        )
    return tuple(t.detach().cpu().float() for t in tensors)


def to_numpy(source) -> Dict[str, list]:
    """``{layer_name: [numpy array per call]}``, each ``(batch, heads, query, key)`` (float32 for halves).

    Example:
        >>> to_numpy({"a": [torch.ones(1, 1, 2, 2)]})["a"][0].shape
        (1, 1, 2, 2)
    """
    values = values_of(source, require=False)
    for name, calls in values.items():
        for call, t in enumerate(calls):
            refuse_per_window(t, f"layer {name!r} call {call}")
    return {
        name: [t.detach().cpu().float().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.detach().cpu().numpy()
               for t in calls]
        for name, calls in values.items()
    }
