"""Oracles for windowed (Swin) attention, written apart from the library's placement.

* :func:`dense_by_hand`: a Swin layer's attention over its whole token grid from the
  module's own weights, in the image's own coordinates: logits between every pair of
  grid points (padding included), the relative position bias of their offset inside
  the shifted window, -100 between different regions of the shifted grid, -inf
  outside the same shifted window, softmax, then the real rows and columns. It never
  builds windows, so it shares nothing with a placement of windows.
* :func:`place_by_index_grid`: per-window maps placed by running the model's own layout
  operations (pad, ``torch.roll``, window partition) on a grid of token indices.
"""

import math

import torch

PAD_THEN_ROLL, ROLL_THEN_PAD = "pad_then_roll", "roll_then_pad"


def dense_by_hand(xn, q_of, k_of, table, window, shift, order, mask_value=-100.0):
    """``(attention (B, heads, H*W, H*W), weight on padding keys (B, heads, H*W))``.

    Args:
        xn: ``(B, H, W, C)``, the attention's input before padding and shift.
        q_of, k_of: ``(B, L, C) -> (B, heads, L, d)``, the query already scaled.
        table: the relative position bias table ``((2wh-1)(2ww-1), heads)``.
        window, shift: ``(wh, ww)``, ``(sh, sw)`` as the layer applied them.
        order: ``"pad_then_roll"`` (HF, torchvision) or ``"roll_then_pad"`` (timm).
    """
    b, h, w, c = xn.shape
    (wh, ww), (sh, sw) = window, shift
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    x = torch.nn.functional.pad(xn, (0, 0, 0, wp - w, 0, hp - h)).reshape(b, hp * wp, c)
    yy = torch.arange(hp).repeat_interleave(wp)
    xx = torch.arange(wp).repeat(hp)  # each grid point's own coordinates
    if order == PAD_THEN_ROLL:  # where torch.roll(-s) sends each point
        ys, xs = (yy - sh) % hp, (xx - sw) % wp
    else:
        ys = torch.where(yy < h, (yy - sh) % h, yy)
        xs = torch.where(xx < w, (xx - sw) % w, xx)
    same = ((ys[:, None] // wh) == (ys[None] // wh)) & ((xs[:, None] // ww) == (xs[None] // ww))
    ry = (ys >= hp - wh).long() + ((ys >= hp - sh).long() if sh else 0)
    rx = (xs >= wp - ww).long() + ((xs >= wp - sw).long() if sw else 0)
    region = ry * 3 + rx
    dy = (ys[:, None] % wh) - (ys[None] % wh)
    dx = (xs[:, None] % ww) - (xs[None] % ww)
    bias = table[(dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)].permute(2, 0, 1)  # (heads, P, P)
    logits = q_of(x) @ k_of(x).transpose(-1, -2) + bias
    if sh or sw:
        logits = logits + (region[:, None] != region[None]).float() * mask_value
    a = logits.masked_fill(~same, float("-inf")).softmax(-1)
    real = ((yy < h) & (xx < w)).nonzero().squeeze(1)  # in h*W + w order
    pad = (~((yy < h) & (xx < w))).nonzero().squeeze(1)
    return a[:, :, real][:, :, :, real], a[:, :, real][:, :, :, pad].sum(-1)


def index_grid_windows(h, w, window, shift, order):
    """``(windows, N)`` token index of each window slot, -1 for padding: the model's own
    pad / roll / partition applied to ``arange(h * w)``."""
    (wh, ww), (sh, sw) = window, shift
    grid = torch.arange(h * w, dtype=torch.float64).view(1, h, w, 1)
    pad = lambda g: torch.nn.functional.pad(g, (0, 0, 0, (-w) % ww, 0, (-h) % wh), value=-1.0)  # noqa: E731
    roll = lambda g: torch.roll(g, shifts=(-sh, -sw), dims=(1, 2)) if (sh or sw) else g  # noqa: E731
    g = roll(pad(grid)) if order == PAD_THEN_ROLL else pad(roll(grid))
    _, hp, wp, _ = g.shape
    g = g.view(1, hp // wh, wh, wp // ww, ww, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww)
    return g.long()


def place_by_index_grid(per_window, batch, h, w, window, shift, order):
    """``(B*nW, heads, N, N)`` -> ``(B, heads, h*w, h*w)``, slot by slot."""
    idx = index_grid_windows(h, w, window, shift, order)
    nw, n = idx.shape
    heads = per_window.shape[1]
    out = torch.zeros(batch, heads, h * w, h * w, dtype=per_window.dtype)
    p = per_window.reshape(batch, nw, heads, n, n)
    for win in range(nw):
        real = idx[win] >= 0
        pos = idx[win][real]
        out[:, :, pos[:, None], pos[None, :]] = p[:, win][:, :, real][:, :, :, real]
    return out


def dense_decomposed_by_hand(xn, qkv, heads, scale, rel_pos_h, rel_pos_w, window):
    """SAM / ViTDet attention over the whole padded grid, from the module's own weights:
    ``(attention (B, heads, H*W, H*W), weight on padding keys (B, heads, H*W))``.

    Logits ``(q * scale) . k`` plus the decomposed relative position terms ``q . Rh[dy + wh - 1]
    + q . Rw[dx + ww - 1]`` (``q`` unscaled, ``dy``/``dx`` the offsets inside the window) between
    every pair of points of the grid padded right and bottom (padding is a zero token), ``-inf``
    outside the same window, softmax, then the real rows and columns. No windows are built. A
    global layer is one window of the whole grid (``window = (H, W)``).

    Args:
        xn: ``(B, H, W, C)``, the attention's input before padding.
        qkv: ``(B, L, C) -> (B, L, 3 * C)``, the module's projection.
        rel_pos_h, rel_pos_w: ``(2 * wh - 1, d)``, ``(2 * ww - 1, d)``, or ``None`` (no relative positions).
    """
    b, h, w, c = xn.shape
    wh, ww = window
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    x = torch.nn.functional.pad(xn, (0, 0, 0, wp - w, 0, hp - h)).reshape(b, hp * wp, c)
    q, k, _ = qkv(x).view(b, hp * wp, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # (B, heads, P, d) each
    yy = torch.arange(hp).repeat_interleave(wp)
    xx = torch.arange(wp).repeat(hp)
    logits = (q * scale) @ k.transpose(-1, -2)
    if rel_pos_h is not None:
        dy = (yy[:, None] % wh) - (yy[None] % wh) + wh - 1  # (P, P)
        dx = (xx[:, None] % ww) - (xx[None] % ww) + ww - 1
        along_h = q @ rel_pos_h.T  # (B, heads, P, 2wh-1): q . Rh[r] for every offset r
        along_w = q @ rel_pos_w.T
        logits = logits + along_h.gather(-1, dy.expand(b, heads, -1, -1)) + along_w.gather(-1, dx.expand(b, heads, -1, -1))
    same = ((yy[:, None] // wh) == (yy[None] // wh)) & ((xx[:, None] // ww) == (xx[None] // ww))
    a = logits.masked_fill(~same, float("-inf")).softmax(-1)
    real = ((yy < h) & (xx < w)).nonzero().squeeze(1)
    pad = (~((yy < h) & (xx < w))).nonzero().squeeze(1)
    return a[:, :, real][:, :, :, real], a[:, :, real][:, :, :, pad].sum(-1)
