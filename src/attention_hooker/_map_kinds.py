"""Which kind of map a stored tensor is, when it is not plain attention probabilities over tokens.

Every stored call is 4-D, but not every one is ``(batch, heads, query, key)`` softmax
probabilities over tokens. The library marks the tensors it stores that are another kind,
and the readers that need probabilities over tokens (the analyses, through
:func:`~attention_hooker._checks.check_probabilities`) refuse them, naming the kind and why:

* ``"per-window"`` (:data:`PER_WINDOW`): a call kept per window (``windows="keep"``),
  ``(batch * windows, heads, N, N)``: its axis 0 counts windows and its slots include
  padding. Every reader of maps refuses it (see :mod:`._per_window`).
* ``"not probabilities"`` (:func:`not_probabilities`): the map that multiplies the values,
  which is not a softmax: CaiT's talking-heads mixed map, DiffLlama's differential map
  (rows sum to ``1 - λ``, entries may be negative), Nystromformer's landmark product. It
  is a real map (views draw it, saves keep it), but no probability reading of it holds.
* ``"channels"`` (:func:`channels`): a softmax over channels, not tokens (XCiT's
  cross-covariance attention): ``(batch, heads, channels, channels)``.

The capture says what a call is (``CallSources.kind``); the in-memory keeper and ``load()``
mark each stored tensor here (weakly: a mark goes with its tensor); saved and streamed
captures carry the kinds in their metadata. A view of a marked tensor (a slice) has its kind
(:func:`kind_of` follows the view's ``_base``); a copy (``.clone()``, ``.to()``, another dtype)
is not marked. The analyses that build one map from marked ones (``stitch_steps``,
``to_words``) mark their result with the kind of their inputs.

This module is at the bottom of the package (every reader of maps asks it).
"""

from __future__ import annotations

import threading
import weakref
from typing import Dict, Optional, Tuple

from .errors import AttentionHookerError

__all__ = ["MapKind", "PER_WINDOW", "KINDS", "not_probabilities", "channels", "mark_kind", "kind_of",
           "carried_kind", "refuse_kind", "per_window_refusal", "describe_kind", "kind_from_description"]

KINDS = ("per-window", "not probabilities", "channels")


class MapKind:
    """A kind of stored map that is not plain probabilities over tokens.

    Attributes:
        name: one of :data:`KINDS`.
        what: what the map is, for messages (``"DiffLlama's differential map"``).
        why: why it is not probabilities over tokens (``"rows sum to 1 - λ and entries may be negative"``).

    Example:
        >>> k = not_probabilities("DiffLlama's differential map", "rows sum to 1 - λ")
        >>> k.name, str(k)
        ('not probabilities', "DiffLlama's differential map (not probabilities: rows sum to 1 - λ)")
        >>> kind_from_description(describe_kind(k), "here") == k
        True
    """

    __slots__ = ("name", "what", "why")

    def __init__(self, name: str, what: str, why: str):
        if name not in KINDS or not isinstance(what, str) or not isinstance(why, str):
            raise AttentionHookerError(f"a map kind is one of {KINDS} with a what and a why (strings); got "
                                       f"{name!r}, {what!r}, {why!r}")
        self.name, self.what, self.why = name, what, why

    def __eq__(self, other) -> bool:
        return isinstance(other, MapKind) and (self.name, self.what, self.why) == (other.name, other.what, other.why)

    def __hash__(self) -> int:
        return hash((self.name, self.what, self.why))

    def __repr__(self) -> str:
        return f"MapKind({self.name!r}, {self.what!r})"

    def __str__(self) -> str:
        return f"{self.what} ({self.name}: {self.why})"


PER_WINDOW = MapKind("per-window", "a call kept per window (windows=\"keep\")",
                     "(batch * windows, heads, N, N): its axis 0 counts windows and its slots include padding")


def not_probabilities(what: str, why: str) -> MapKind:
    """The kind of a map that multiplies the values but is not softmax probabilities."""
    return MapKind("not probabilities", what, why)


def channels(what: str, why: str) -> MapKind:
    """The kind of a map over channels, ``(batch, heads, channels, channels)``, not tokens."""
    return MapKind("channels", what, why)


def describe_kind(kind: MapKind) -> dict:
    """A JSON-ready description of ``kind`` (saved beside a call)."""
    return {"name": kind.name, "what": kind.what, "why": kind.why}


def kind_from_description(data, where: str) -> MapKind:
    """The kind :func:`describe_kind` described, checked.

    Raises:
        AttentionHookerError: naming ``where`` when ``data`` is not such a description.
    """
    if (not isinstance(data, dict) or set(data) != {"name", "what", "why"} or data["name"] not in KINDS
            or not all(isinstance(data[k], str) for k in ("what", "why"))):
        raise AttentionHookerError(f"{where} is damaged: {data!r} is not the description of a kind of map "
                                   f"(name one of {KINDS}, what, why)")
    return MapKind(data["name"], data["what"], data["why"])


_marked: Dict[int, Tuple["weakref.ref", MapKind]] = {}  # id(tensor) -> (a weak reference to it, its kind)
# Reentrant: a weak reference's callback (``forget``) takes it, and a garbage collection run while it
# is held (creating the weak reference in mark_kind allocates) may call a callback in this same thread.
_lock = threading.RLock()


def mark_kind(tensor, kind: Optional[MapKind]) -> None:
    """Records that ``tensor`` is a map of ``kind`` (until the tensor is freed), or, with ``None``,
    that it is plain attention (a stored tensor the keeper reuses as a buffer loses its mark)."""
    key = id(tensor)
    if kind is None:
        if key not in _marked:  # the usual case, every call of most captures: no lock taken
            return
        with _lock:
            entry = _marked.get(key)
            if entry is not None and entry[0]() is tensor:
                del _marked[key]
        return
    if not isinstance(kind, MapKind):
        raise AttentionHookerError(f"kind must be a MapKind or None, got {type(kind).__name__}")

    def forget(ref, key=key) -> None:
        with _lock:
            entry = _marked.get(key)
            if entry is not None and entry[0] is ref:
                del _marked[key]

    with _lock:
        _marked[key] = (weakref.ref(tensor, forget), kind)


def kind_of(tensor) -> Optional[MapKind]:
    """The kind the library stored ``tensor`` as, or ``None`` for plain attention probabilities over tokens.

    A view of a marked tensor (a slice, ``unsqueeze``, ``view``) has its kind: a view's ``_base``
    is the tensor it views (the root, for a view of a view), which is looked up when the view
    itself is not marked. A copy (``.clone()``, ``.to()``, ``.float()`` of another dtype,
    ``deepcopy``) has no ``_base`` and is not marked.

    Example:
        >>> import torch
        >>> t = torch.zeros(2, 1, 3, 3)
        >>> mark_kind(t, channels("XCiT's channel map", "over channels"))
        >>> kind_of(t[0:1]).name, kind_of(t[:, :, :2]).name, kind_of(t.clone())
        ('channels', 'channels', None)
    """
    for candidate in (tensor, getattr(tensor, "_base", None)):
        if candidate is None:
            break
        entry = _marked.get(id(candidate))
        if entry is not None and entry[0]() is candidate:
            return entry[1]
    return None


def carried_kind(tensors, where: str) -> Optional[MapKind]:
    """The one kind that a map computed from ``tensors`` (all of one kind, or plain) inherits, or ``None``.

    Raises:
        AttentionHookerError: naming ``where`` when the tensors are of different kinds (a plain map
            among marked ones included): what would be made of them has no one meaning.
    """
    kinds = [kind_of(t) for t in tensors]
    if not kinds or all(k is None for k in kinds):
        return None
    if any(k != kinds[0] for k in kinds):
        named = sorted({str(k) if k else "plain attention probabilities" for k in kinds})
        raise AttentionHookerError(f"{where} mix maps of different kinds ({', '.join(named)}): what is made of "
                                   "them would have no one meaning")
    return kinds[0]


def per_window_refusal(tensor, where: str) -> str:
    """Why ``tensor``, a call kept per window, is not read as ``(batch, heads, query, key)``, and how to read it."""
    return (f"{where} is a call kept per window (windows=\"keep\"), {tuple(tensor.shape)} = (batch * windows, heads, "
            "N, N): its axis 0 counts windows and its slots include padding, not (batch, heads, query, key); pass "
            "window_index=hooker.window_index (the analyses that take it), the hooker or loaded capture itself, "
            "or place the calls at their tokens first with attention_hooker.window_index.dense_values(values, "
            "window_index) (WindowIndex.dense(call) for one call)")


def refuse_kind(tensor, where: str, *, need: str = "attention probabilities over tokens") -> None:
    """Raises when ``tensor`` is a marked map (any kind): what is read of it needs ``need``.

    Raises:
        AttentionHookerError: naming ``where``, the kind and why.

    Example:
        >>> import torch
        >>> t = torch.zeros(1, 1, 2, 2)
        >>> mark_kind(t, not_probabilities("DiffLlama's differential map", "rows sum to 1 - λ"))
        >>> refuse_kind(t, "attn")
        Traceback (most recent call last):
        ...
        attention_hooker.errors.AttentionHookerError: attn is DiffLlama's differential map (not probabilities: rows sum to 1 - λ), not attention probabilities over tokens: ...
    """
    kind = kind_of(tensor)
    if kind is None:
        return
    if kind.name == "per-window":
        raise AttentionHookerError(per_window_refusal(tensor, where))
    advice = {"not probabilities": "it is what multiplies the values and may be drawn (views) and saved, but no "
                                   "probability reading of it (rollout, entropy, flow, statistics, comparisons) "
                                   "holds",
              "channels": "its query and key axes are channels of each head, not tokens, so no analysis over "
                          "tokens applies"}[kind.name]
    raise AttentionHookerError(f"{where} is {kind}, not {need}: {advice}")
