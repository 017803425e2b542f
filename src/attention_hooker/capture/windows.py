"""Windowed attention (Swin) assembled into the layer's ``(batch, heads, tokens, tokens)`` map.

A Swin block attends inside windows of a cyclically shifted, padded grid: its
attention call computes ``(batch * windows, heads, N, N)``, one map per window, in
which axis 0 counts windows, slots are not image positions (the grid was rolled),
and some slots are padding. This module owns the placement of such per-window maps
at their true token positions; each family only says how its layer lays the windows
out (:class:`WindowLayout`), read at the attention call from what the module and its
parent block declare (:func:`windowed_layer`).

What is stored, per layer call: ``dense[b, h, t_q, t_k]`` for real tokens ``t = y * W + x``
of the layer's ``H x W`` input, with:

* the weight the model computed where ``t_q`` and ``t_k`` are in the same window,
  exactly as computed (Swin's shift mask is ``-100``, not ``-inf``: masked in-window
  keys keep ~1e-44 in float32);
* exact zeros where ``t_k`` is in another window (never attended);
* nothing for padding: the padded tokens the layer added for windowing are neither
  queries nor keys of the stored map. No Swin masks them, so real queries do put
  weight on them (their key is the projection of a zero token). That weight is
  **not** renormalised away: a stored row sums to ``1 - (its weight on padding)``,
  so ``1 - dense.sum(-1)`` is, per row, exactly the weight that went to padding
  (0 in layers without padding, such as Swin-T at 224 x 224).

Families (the shift/pad order is each one's own, and reproduced, not "fixed"):

* Hugging Face Swin, Swinv2, Donut-Swin and their copies (``*Layer`` blocks with
  ``window_size``, ``shift_size`` and ``get_attn_mask``): pad, then roll; window and
  shift read from the block at the attention call (``set_shift_and_window_size``
  changes them inside the block's forward), ``input_dimensions`` from the block's call.
* timm ``SwinTransformerBlock``, ``SwinTransformerV2Block`` and ``SwinTransformerV2CrBlock``:
  roll over the real ``H x W``, then pad.
* torchvision ``ShiftedWindowAttention(V2)``: pad, then roll; the shift of an axis whose
  window covers the whole padded axis is 0 (the function's own rule).
* SAM / ViTDet windowed blocks (transformers ``SamVisionLayer``, ``SamHQVisionLayer``,
  ``VitDetLayer``; timm ``VisionTransformerSAM``'s ``Block``): pad right and bottom to whole
  ``window_size`` windows, no shift, no mask (padding is attended, as in Swin). Their
  global blocks (``window_size == 0``) attend over the whole grid and stay plain maps.

A layer whose layout cannot be read unambiguously (its block was not seen calling it,
shapes that do not agree) is refused with the reason, never placed by a guess.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union, Sequence

import torch
from torch import nn

from .._torch_private import caller_frame
from ..window_index import WindowIndex, place_windows

__all__ = ["WindowLayout", "window_positions", "assemble_windows", "window_index", "assemble_window_values", "layout_refusal",
           "WindowedLayer", "windowed_layer"]

PAD_THEN_ROLL = "pad_then_roll"
ROLL_THEN_PAD = "roll_then_pad"


class WindowLayout(NamedTuple):
    """How one windowed attention call laid its ``(batch * windows, heads, N, N)`` out.

    Attributes:
        batch: images in the call.
        height, width: the layer's real token grid (token ``t = y * width + x``).
        window: ``(wh, ww)``; ``N = wh * ww``, slot ``n = iy * ww + ix`` inside a window.
        shift: ``(sh, sw)`` of the cyclic shift ``torch.roll(-shift)`` actually applied.
        order: ``"pad_then_roll"`` (pad the grid to window multiples, then roll the padded
            grid) or ``"roll_then_pad"`` (roll the real grid, then pad).
        table: when given, ``(windows, N)``: the token of each slot of each window, ``-1`` for
            padding, used as it is instead of the window/shift/order rule (a layout that is not
            square windows of a rolled grid: MaxViT's grid partition, whose groups are strided).
    """

    batch: int
    height: int
    width: int
    window: Tuple[int, int]
    shift: Tuple[int, int]
    order: str
    table: Optional[torch.Tensor] = None

    @property
    def slots(self) -> int:
        """``N``: tokens per window."""
        return self.table.shape[1] if self.table is not None else self.window[0] * self.window[1]

    @property
    def padded(self) -> Tuple[int, int]:
        """``(Hp, Wp)``: the grid rounded up to whole windows."""
        (wh, ww) = self.window
        return math.ceil(self.height / wh) * wh, math.ceil(self.width / ww) * ww

    @property
    def windows(self) -> int:
        """Windows per image; rows of the per-window map are batch-major: ``b * windows + w``."""
        if self.table is not None:
            return self.table.shape[0]
        hp, wp = self.padded
        return (hp // self.window[0]) * (wp // self.window[1])

    @property
    def tokens(self) -> int:
        return self.height * self.width


def window_positions(layout: WindowLayout, device=None) -> torch.Tensor:
    """``(windows, N)``: the token ``y * W + x`` in slot ``n`` of window ``w``, ``-1`` for padding.

    Window ``w = wy * (Wp / ww) + wx`` covers rows ``wy * wh ...`` of the shifted (padded)
    grid; undoing ``torch.roll(-s)`` sends shifted coordinate ``y'`` back to ``(y' + s) mod``
    the rolled extent (the padded grid for pad-then-roll, the real one for roll-then-pad).

    Example:
        >>> window_positions(WindowLayout(1, 3, 3, (2, 2), (0, 0), "pad_then_roll")).tolist()
        [[0, 1, 3, 4], [2, -1, 5, -1], [6, 7, -1, -1], [8, -1, -1, -1]]
    """
    if layout.table is not None:
        return layout.table.to(device)
    (wh, ww), (sh, sw) = layout.window, layout.shift
    hp, wp = layout.padded
    across = wp // ww
    win = torch.arange(layout.windows, device=device)[:, None]
    slot = torch.arange(wh * ww, device=device)[None, :]
    ys = (win // across) * wh + slot // ww  # coordinates in the shifted grid
    xs = (win % across) * ww + slot % ww
    h, w = layout.height, layout.width
    if layout.order == PAD_THEN_ROLL:
        y, x = (ys + sh) % hp, (xs + sw) % wp
        real = (y < h) & (x < w)
    elif layout.order == ROLL_THEN_PAD:
        real = (ys < h) & (xs < w)
        y, x = (ys + sh) % h, (xs + sw) % w
    else:
        raise ValueError(f"window order {layout.order!r}: expected {PAD_THEN_ROLL!r} or {ROLL_THEN_PAD!r}")
    return torch.where(real, y * w + x, torch.full_like(y, -1))  # (nW, N)


def layout_refusal(layout: WindowLayout, shape: Tuple[int, ...]) -> Optional[str]:
    """Why a per-window map of ``shape`` was not computed with ``layout``, or ``None``."""
    n = layout.slots
    expected = (layout.batch * layout.windows, n, n)
    if len(shape) != 4 or (shape[0], shape[2], shape[3]) != expected:
        return (
            f"a windowed attention call of shape {tuple(shape)}, while the layer's layout ({layout.batch} images of "
            f"{layout.height}x{layout.width} tokens: {layout.windows} windows of {n} tokens) "
            f"gives ({expected[0]}, heads, {n}, {n}): its windows cannot be placed at image positions, so it is not stored"
        )
    return None


def assemble_windows(per_window: torch.Tensor, layout: WindowLayout, heads: Optional[Sequence[int]] = None,
                     rows: Optional[Sequence[int]] = None, keys: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Places a windowed call's maps at their tokens.

    Args:
        per_window: ``(batch * windows, heads, N, N)``, batch-major.
        layout: how the call laid its windows out (checked with :func:`layout_refusal` first).
        heads, rows, keys: only these heads, query tokens and key tokens (distinct absolute
            indices: a selection resolved against the layer's tokens), placed straight into a map
            of that size: a row of a large image costs a row, not the whole map first.

    Returns:
        ``(batch, heads, H * W, H * W)`` (or the selected heads, rows and keys): each window's
        weights at its tokens' positions, exact zeros between tokens of different windows,
        padded slots left out (their weight is missing from the rows: see the module's
        docstring). Differentiable with respect to ``per_window``.

    Example:
        >>> layout = WindowLayout(1, 2, 2, (2, 2), (1, 1), "pad_then_roll")
        >>> p = torch.softmax(torch.randn(1, 3, 4, 4), -1)
        >>> assemble_windows(p, layout).shape, assemble_windows(p, layout, heads=[2], rows=[3]).shape
        (torch.Size([1, 3, 4, 4]), torch.Size([1, 1, 1, 4]))
    """
    return place_windows(per_window, window_positions(layout, per_window.device), layout.batch, layout.tokens,
                         heads, rows, keys)  # (B, h, rows, keys)


def window_index(layout: WindowLayout) -> WindowIndex:
    """The layout as the index kept beside a per-window call (``windows="keep"``)."""
    return WindowIndex(window_positions(layout), layout.batch, layout.height, layout.width)


def assemble_window_values(value: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """The value vectors of a windowed call ``(batch * windows, heads, N, dim)`` at their
    tokens: ``(batch, heads, H * W, dim)`` (each real token is in exactly one slot; the
    padded slots are left out, as in :func:`assemble_windows`)."""
    b, nw = layout.batch, layout.windows
    heads, n, dim = value.shape[1], value.shape[2], value.shape[3]
    pos = window_positions(layout, value.device).reshape(-1)
    real = (pos >= 0).nonzero().squeeze(1)
    slots = value.reshape(b, nw, heads, n, dim).permute(0, 2, 1, 3, 4).reshape(b, heads, nw * n, dim)
    out = value.new_zeros(b, heads, layout.tokens, dim)
    out[:, :, pos[real]] = slots[:, :, real]
    return out  # (B, H, T, dim)


# ------------------------------------------------------------------ the families: where each reads its layout
class _BlockCalls:
    """The calls of a windowed layer's parent block running on each thread: a stack of
    ``(frame, block, what it was given)``, pushed by its pre-hook and popped by its forward
    hook (run even when the forward raises), so that nothing of a finished call (its frame,
    and with it the block's inputs and outputs) is held after it returns."""

    def __init__(self, read: Callable[[tuple, dict], Optional[tuple]]):
        self._read = read
        self._local = threading.local()

    def _stack(self) -> list:
        stack = getattr(self._local, "calls", None)
        if stack is None:
            stack = self._local.calls = []
        return stack

    def pre_hook(self, block, args, kwargs):
        self._stack().append((caller_frame(1), block, self._read(args, kwargs)))  # frame 1: the block's _call_impl
        return None

    def post_hook(self, block, args, kwargs, output):
        stack = self._stack()
        if stack and stack[-1][1] is block:
            stack.pop()
        return None

    def current(self) -> Optional[tuple]:
        """``(block called, what it was given)`` of the running call of the block, or ``None``
        when the block is not running (calls an interrupted forward left open are dropped)."""
        stack = self._stack()
        while stack:
            frame, block, seen = stack[-1]
            current = caller_frame(1)
            while current is not None:
                if current is frame:
                    return block, seen
                current = current.f_back
            stack.pop()
        return None


class WindowedLayer:
    """One windowed attention module's family rule: :meth:`layout` reads, at its attention
    call, how the call laid its windows out, or says why it cannot.

    Args:
        family: a name for messages (``"transformers Swin"``).
        read: ``(module or block called, input_shape, block's inputs) -> WindowLayout``: the
            layout from the running module's (or block's) attributes, the hooked module's input
            shape and what the block's call was given (when there is a block).
        block: the parent block whose call must be seen (its pre-hook from :meth:`install`), or ``None``.
        blocked: the module computes its windows as ``(batch, windows, heads, N, N)`` (a 5-D softmax
            or sdpa query: MaxViT, Twins), taken as the batch-major ``(batch * windows, heads, N, N)``;
            the 5-D calls of any other module stay refused.
    """

    def __init__(self, family: str, read: Callable, block: Optional[nn.Module] = None,
                 block_call: Optional[Callable[[tuple, dict], Optional[tuple]]] = None, blocked: bool = False):
        self.family = family
        self.blocked = blocked
        self._read = read
        self.block = block
        self._calls = _BlockCalls(block_call) if block is not None else None

    def install(self, add_handle: Callable) -> None:
        """Puts the hooks on the block (handed to ``add_handle`` to be removed with the capture's)."""
        if self.block is not None:
            add_handle(self.block.register_forward_pre_hook(self._calls.pre_hook, with_kwargs=True, prepend=True))
            add_handle(self.block.register_forward_hook(self._calls.post_hook, with_kwargs=True, always_call=True))

    def layout(self, input_shape: Optional[Tuple[int, ...]], module: nn.Module) -> Union[WindowLayout, str]:
        """The running call's :class:`WindowLayout`, or the reason it cannot be read. The window
        and shift are read from the modules that are running (``module``, the hooked one, and the
        block called), not from those seen when hooking: a replica (``nn.DataParallel``) changes its own."""
        seen, block = None, module
        if self._calls is not None:
            called = self._calls.current()
            if called is None:
                return (f"a {self.family} window-attention call outside a call of its block "
                        f"({type(self.block).__name__}): the image size, shift and padding of its windows cannot be "
                        "read, so its windows are not placed and it is not stored")
            block, seen = called
        try:
            return self._read(block, input_shape, seen)
        except (TypeError, ValueError, IndexError) as error:
            return f"the {self.family} window layout cannot be read ({error}), so it is not stored"


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def _first_tensor_shape(args: tuple, kwargs: dict) -> Optional[tuple]:
    """What a timm Swin block, a MaxViT partition layer or a SAM/ViTDet block is given: its input's shape."""
    x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def _batch_and_size(size_name: str) -> Callable[[tuple, dict], Optional[tuple]]:
    """What a transformers Swin block (``input_dimensions``) or a timm Twins module (``size``)
    is given: ``(batch, (height, width))`` from its tensor and its second argument."""
    def read(args: tuple, kwargs: dict) -> Optional[tuple]:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        size = args[1] if len(args) > 1 else kwargs.get(size_name)
        if not isinstance(x, torch.Tensor) or size is None:
            return None
        return x.shape[0], tuple(int(d) for d in size)
    return read


def _hf_layout(block, input_shape, seen) -> WindowLayout:
    if seen is None:
        raise ValueError("the block was called without (hidden_states, input_dimensions)")
    batch, (h, w) = seen
    return WindowLayout(batch, h, w, _pair(block.window_size), _pair(block.shift_size), PAD_THEN_ROLL)


def _timm_layout(block, input_shape, seen) -> WindowLayout:
    if seen is None or len(seen) != 4:
        raise ValueError(f"the block's input is {seen}, not (batch, height, width, channels)")
    b, h, w, _ = seen
    return WindowLayout(b, h, w, _pair(block.window_size), _pair(block.shift_size), ROLL_THEN_PAD)


# timm's Swin blocks, each in its module: all roll the real grid, then pad, with the same region mask.
_TIMM_SWIN_BLOCKS = {
    "timm.models.swin_transformer": "SwinTransformerBlock",
    "timm.models.swin_transformer_v2": "SwinTransformerV2Block",
    "timm.models.swin_transformer_v2_cr": "SwinTransformerV2CrBlock",
}


def _torchvision_layout(module, input_shape, seen) -> WindowLayout:
    if input_shape is None or len(input_shape) != 4:
        raise ValueError(f"the module's input is {input_shape}, not (batch, height, width, channels)")
    b, h, w, _ = input_shape
    window, shift = _pair(module.window_size), list(_pair(module.shift_size))
    padded = (math.ceil(h / window[0]) * window[0], math.ceil(w / window[1]) * window[1])
    for i in range(2):  # torchvision's shifted_window_attention: no shift where one window covers the axis
        if window[i] >= padded[i]:
            shift[i] = 0
    return WindowLayout(b, h, w, window, (shift[0], shift[1]), PAD_THEN_ROLL)


def _maxvit_layout(layer, input_shape, seen) -> WindowLayout:
    if seen is None or len(seen) != 4:
        raise ValueError(f"the partition layer's input is {seen}, not (batch, channels, height, width)")
    b, _, h, w = seen
    p = int(layer.p)  # the side of the p x p blocks torchvision's _partition cuts
    if h % p or w % p:
        raise ValueError(f"{h}x{w} tokens are not whole {p}x{p} partitions")
    blocks = window_positions(WindowLayout(b, h, w, (p, p), (0, 0), PAD_THEN_ROLL))  # (blocks, p * p)
    if layer.partition_type == "window":  # each p x p block is a window
        return WindowLayout(b, h, w, (p, p), (0, 0), PAD_THEN_ROLL, blocks)
    if layer.partition_type == "grid":  # axes swapped: a group is one slot of every block (strided)
        return WindowLayout(b, h, w, (p, p), (0, 0), PAD_THEN_ROLL, blocks.t().contiguous())
    raise ValueError(f"partition_type {layer.partition_type!r} is neither 'window' nor 'grid'")


def _twins_layout(module, input_shape, seen) -> WindowLayout:
    if seen is None:
        raise ValueError("the module was called without (x, size)")
    b, (h, w) = seen
    ws = int(module.ws)  # pads right and bottom to whole ws x ws windows, no shift, padding attended
    return WindowLayout(b, h, w, (ws, ws), (0, 0), PAD_THEN_ROLL)


def _sam_layout(block, input_shape, seen, channels_first: bool = False) -> WindowLayout:
    """SAM / ViTDet: the block's input ``(batch, height, width, channels)`` (ViTDet's
    ``(batch, channels, height, width)``, permuted inside) cut into ``window_size`` squares
    after padding right and bottom; no shift."""
    if seen is None or len(seen) != 4:
        raise ValueError(f"the block's input is {seen}, not a 4-D image of tokens")
    b, h, w = (seen[0], seen[2], seen[3]) if channels_first else seen[:3]
    ws = block.window_size
    if not isinstance(ws, int) or ws <= 0:
        raise ValueError(f"the block's window_size is {ws!r} at its call, not a positive int")
    return WindowLayout(b, h, w, (ws, ws), (0, 0), PAD_THEN_ROLL)


def _vitdet_layout(block, input_shape, seen) -> WindowLayout:
    return _sam_layout(block, input_shape, seen, channels_first=True)


# SAM-style windowed blocks: the attention class's module -> (block class, the block's attention
# attribute, layout reader). Only these: each was read and is checked against a dense hand
# computation (tests/test_windows.py).
_SAM_BLOCKS = {
    "transformers.models.sam.modeling_sam": ("SamVisionLayer", "attn", _sam_layout),
    "transformers.models.sam_hq.modeling_sam_hq": ("SamHQVisionLayer", "attn", _sam_layout),
    "transformers.models.vitdet.modeling_vitdet": ("VitDetLayer", "attention", _vitdet_layout),
    "timm.models.vision_transformer_sam": ("Block", "attn", _sam_layout),
}


def _sam_windowed_layer(module: nn.Module, parent: Optional[nn.Module]) -> Optional[WindowedLayer]:
    """The rule of a SAM/ViTDet attention module whose block is windowed, or ``None`` (a global
    block, ``window_size == 0``, whose map is plain; or a module outside its block)."""
    found = _SAM_BLOCKS.get(type(module).__module__)
    if found is None or parent is None:
        return None
    block_class, attribute, read = found
    if type(parent).__module__ != type(module).__module__ or type(parent).__name__ != block_class \
            or getattr(parent, attribute, None) is not module:
        return None
    ws = getattr(parent, "window_size", None)
    if not isinstance(ws, int) or ws <= 0:
        return None  # a global block: attention over the whole grid, (batch, heads, H*W, H*W) as it is
    family = "timm VisionTransformerSAM" if block_class == "Block" else f"transformers {block_class}"
    return WindowedLayer(family, read, parent, _first_tensor_shape)


@functools.lru_cache(maxsize=None)
def _defines_hf_windowed_blocks(module_name: str) -> bool:
    """Whether a transformers modeling module defines a windowed (Swin-like) block: where an
    attention class whose parent block may be one is found."""
    module = sys.modules.get(module_name)
    return module_name.startswith("transformers.") and module is not None and any(
        isinstance(value, type) and _is_hf_swin_block_class(value) for value in vars(module).values())


def _is_hf_swin_block_class(kind: type) -> bool:
    return (kind.__module__.startswith("transformers.") and issubclass(kind, nn.Module)
            and callable(getattr(kind, "get_attn_mask", None)))


def _is_hf_swin_block(module: nn.Module) -> bool:
    return (type(module).__module__.startswith("transformers.") and hasattr(module, "window_size")
            and hasattr(module, "shift_size") and callable(getattr(module, "get_attn_mask", None)))


def windowed_layer(module: nn.Module, parents: Dict[int, nn.Module]) -> Optional[WindowedLayer]:
    """The family rule of a hooked attention module that computes windowed (Swin, SAM) attention, or ``None``.

    Args:
        module: a hooked attention module.
        parents: ``{id(child): parent}`` over the model's modules.
    """
    kind = type(module)
    if kind.__module__.startswith("torchvision.") and kind.__name__ in ("ShiftedWindowAttention",
                                                                        "ShiftedWindowAttentionV2"):
        return WindowedLayer("torchvision Swin", _torchvision_layout)
    if kind.__module__.startswith("timm.models.twins") and kind.__name__ == "LocallyGroupedAttn":
        return WindowedLayer("timm Twins", _twins_layout, module, _batch_and_size("size"), blocked=True)
    if kind.__module__ in _SAM_BLOCKS:
        return _sam_windowed_layer(module, parents.get(id(module)))
    if not (kind.__module__.startswith(("torchvision.models.maxvit", "timm.models.swin_transformer"))
            or _defines_hf_windowed_blocks(kind.__module__)):
        return None  # no rule below can match: the model's parents are not looked up
    parent = parents.get(id(module))
    grand = parents.get(id(parent)) if parent is not None else None
    if kind.__module__.startswith("torchvision.models.maxvit") and kind.__name__ == "RelativePositionalMultiHeadAttention":
        if grand is not None and type(grand).__name__ == "PartitionAttentionLayer" \
                and getattr(grand, "attn_layer", None) is parent and hasattr(grand, "partition_type"):
            return WindowedLayer(f"torchvision MaxViT {grand.partition_type}", _maxvit_layout, grand,
                                 _first_tensor_shape, blocked=True)
        return None  # outside a partition layer: its layout cannot be read, its 5-D calls stay refused
    if parent is not None and _TIMM_SWIN_BLOCKS.get(type(parent).__module__) == type(parent).__name__ \
            and getattr(parent, "attn", None) is module:
        return WindowedLayer(f"timm {type(parent).__name__}", _timm_layout, parent, _first_tensor_shape)
    for block in (parent, parents.get(id(parent)) if parent is not None else None):  # Swin: attention; v2: attention.self
        if block is not None and _is_hf_swin_block(block):
            return WindowedLayer(f"transformers {type(block).__name__}", _hf_layout, block,
                                 _batch_and_size("input_dimensions"))
    return None
