"""What an intervention may do on a layer of a windowed or pieced family, said before any run.

The capture assembles the maps of layers whose calls do not see the input's tokens as one
``(batch, heads, query, key)`` map (:mod:`~attention_hooker.capture.windows`,
:mod:`~attention_hooker.capture.pieces`); an intervention acts on each attention call as the
call sees it. Where the two differ, an act could run and be silently wrong, so each act is
checked against the layer's family (the capture's own family rules) when it is given:

- windowed layers (Swin, SAM/ViTDet) and Qwen2-VL's per-image segments: the outputs of a
  call's heads are the image's tokens window by window (segment by segment), so a zero
  knock-out, per-head gates and patched outputs act exactly; an act on the weights (a given map,
  ``top_k_keys``, ``block_keys``, ``uniform_weights``, patched weights) would see
  window-local positions (and not a shifted window's mask), and a gate per batch item would
  meet ``batch x windows`` rows: both are refused. A mean knock-out is refused on windowed
  layers: their calls' slots include the padding that fills the grid out to whole windows
  (a 5 x 5 grid in windows of 4 runs as 8 x 8), which the reference's mean would count, and
  the recording does not say which slots are padding.
- Nystromformer: the call acted on is the landmarks' ``kernel_3 @ values``; the head's
  output is linear in it, so a zero knock-out and gates act exactly, but only without the
  convolution of the values the layer adds (``conv_kernel_size``); its means, patched outputs
  and weights are the landmarks', not the head's: refused.
- DiffLlama, Longformer/LED, BigBird block-sparse, ProphetNet n-gram, LongT5, PEGASUS-X,
  Hiera mask units, timm XCiT, Twins and MaxViT: their calls are not the heads the capture
  stores (pairs of softmax heads, bands and global rows, blocks, channels, 5-D windows):
  every act is refused.

Example:
    >>> from torch import nn
    >>> act_refusal(nn.Linear(2, 2), {}, "knock_out", "output") is None  # not a family layer
    True
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..capture.pieces import pieced_layer
from ..capture.windows import windowed_layer

__all__ = ["act_refusal"]

# Pieced families whose calls the intervention routes see window by window (segment by segment).
_PER_SEGMENT = ("SegmentedVisionLayer",)
_LANDMARKS = ("LandmarkLayer",)
_WHY_NOT = {
    "DifferentialLayer": "its differential heads are pairs of softmax heads (the kernel's heads j and j + H/2 "
                         "make differential head j), which the acts would number and act on one half at a time",
    "LongformerLayer": "its calls compute a band of keys per query and the global rows in separate pieces, so no "
                       "call holds a head's whole output",
    "BlockSparseLayer": "its calls compute the map in blocks (5-D bands, random and global blocks), so no call "
                        "holds a head's whole output",
    "NgramLayer": "its calls compute the main and n-gram streams in one 5-D softmax",
    "LongT5LocalLayer": "its calls compute the map in local blocks (a 5-D softmax)",
    "GlobalLocalLayer": "its calls compute the map in local blocks beside the global tokens",
    "MaskUnitLayer": "its calls compute the map per mask unit (a 5-D softmax)",
    "ChannelLayer": "its calls compute a map over channels, not tokens",
}


def act_refusal(module: nn.Module, parents, act: str, kind: str, *, per_item: bool = False,
                averaged: bool = False) -> Optional[str]:
    """Why ``act`` cannot be done exactly on ``module``, or ``None`` when it can (or the module is no
    family's layer).

    Args:
        module: the planned attention module.
        parents: ``{id(child): parent}`` over the model's modules (a mapping with ``get``).
        act: the act's name for the message (``"block_keys"``, ``"scale"``).
        kind: ``"output"`` (an act on the heads' outputs) or ``"weights"`` (on their maps).
        per_item: a gate per batch item (``(batch, heads)`` gates, :func:`knockout_effects`).
        averaged: the act puts a mean over a reference's rows and positions in the heads' outputs
            (``knock_out(mode='mean')``).
    """
    windows = windowed_layer(module, parents)
    if windows is not None:
        if windows.blocked:
            return (f"{act} on a windowed layer ({windows.family}): its calls compute the windows as 5-D "
                    "(batch, windows, heads, N, N) attention, whose heads' outputs the acts cannot reach: "
                    "interventions are not supported on it")
        if averaged:
            return (f"{act} on a windowed layer ({windows.family}): its calls' outputs are (batch x windows, heads, "
                    "window tokens, head_dim) over the grid padded out to whole windows, so the reference's mean "
                    "would count the padding slots as tokens, and a recording does not say which slots they are; "
                    "use knock_out(mode='zero') or scale, or patch(what='output') from a run on an input of the "
                    "same size")
        return _local_refusal(act, kind, per_item, f"a windowed layer ({windows.family})", "window",
                              "a shifted window's mask")
    pieces = pieced_layer(module, parents)
    if pieces is None:
        return None
    name = type(pieces).__name__
    if name in _PER_SEGMENT:
        return _local_refusal(act, kind, per_item, f"a segmented layer ({pieces.family})", "segment",
                              "the other images' tokens")
    if name in _LANDMARKS:
        if kind == "weights" or act not in ("knock_out", "scale"):
            return (f"{act} on a landmark layer ({pieces.family}): its calls multiply the values by the landmarks' "
                    "map (batch, heads, landmarks, key), not the head's (query, key) map, and their outputs are the "
                    "landmarks' (batch, heads, landmarks, head_dim): only knock_out(mode='zero') and scale act "
                    "exactly on it")
        if getattr(module, "conv_kernel_size", None) is not None:
            return (f"{act} on a landmark layer ({pieces.family}) with conv_kernel_size="
                    f"{module.conv_kernel_size}: its output adds a convolution of the values that no act on the "
                    "heads reaches; only a layer without it (conv_kernel_size=None) is acted on")
        return None
    why = _WHY_NOT.get(name, "its calls compute the map in pieces, not as the heads the capture stores")
    return f"{act} on a {pieces.family} layer: {why}: interventions are not supported on it yet"


def _local_refusal(act: str, kind: str, per_item: bool, what: str, unit: str, hidden: str) -> Optional[str]:
    if kind == "weights":
        return (f"{act} on {what}: its calls see {unit}-local positions ((batch x {unit}s, heads, {unit} tokens, "
                f"{unit} tokens) maps, not the input's tokens, and not {hidden}), so a map given or made for them "
                "would act on other positions than meant; acts on the heads' outputs (knock_out, scale, "
                "patch(what='output')) act exactly")
    if per_item:
        return (f"{act} with a gate per batch item on {what}: its calls run batch x {unit}s rows (each {unit} a "
                f"row of its own, in the order the layer makes them), so a gate per batch item has no row of its "
                "own; give (heads,) gates, one per head for every item")
    return None
