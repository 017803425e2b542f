"""Tiny models the tests share: handwritten attention on each route, and one no route sees."""

from __future__ import annotations

import threading

import torch
from torch import nn


class SdpaAttention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention (or, with
    ``use_softmax``, an explicit softmax); declares ``num_heads`` as HF modules do.

    ``pause``: set to a ``threading.Event`` to make the forward wait on it (after
    setting ``entered``), for tests of other threads; ``pause_after_weights``: wait
    between computing the weights and using them (with ``use_softmax``).
    """

    def __init__(self, dim: int = 16, heads: int = 4, *, use_softmax: bool = False):
        super().__init__()
        self.num_heads, self.use_softmax = heads, use_softmax
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.pause = None
        self.pause_after_weights = False
        self.entered = threading.Event()

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, E)
        if self.pause is not None and not self.pause_after_weights:
            self._wait()
        if self.use_softmax:
            weights = torch.softmax(q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5), dim=-1)  # (B, H, T, T)
            if self.pause is not None and self.pause_after_weights:
                self._wait()
            y = weights @ v
        else:
            y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))

    def _wait(self):
        self.entered.set()
        self.pause.wait(10)


class Stack(nn.Module):
    """``layers`` residual SdpaAttention blocks, named ``blocks.<i>``."""

    def __init__(self, layers: int = 2, **kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(SdpaAttention(**kwargs) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


class ExpOverSumAttention(nn.Module):
    """Attention whose probabilities come from exp / sum: no route can see them."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.qk = nn.Linear(dim, 2 * dim)

    def forward(self, x):
        q, k = self.qk(x).chunk(2, -1)
        scores = (q @ k.transpose(-2, -1)).exp()
        return (scores / scores.sum(-1, keepdim=True)) @ x


class TwoCallsAttention(nn.Module):
    """Attention computed in two pieces (two sdpa calls over halves of the tokens): a layer
    call that is refused as a whole, since neither piece is the layer's map."""

    num_heads = 2

    def forward(self, x):
        q = x.view(1, -1, 2, 8).transpose(1, 2)
        half = q.shape[2] // 2
        a = nn.functional.scaled_dot_product_attention(q[:, :, :half], q[:, :, :half], q[:, :, :half])
        b = nn.functional.scaled_dot_product_attention(q[:, :, half:], q[:, :, half:], q[:, :, half:])
        return torch.cat([a, b], 2).transpose(1, 2).reshape(x.shape)


def encoder(layers: int = 2, d_model: int = 16, nhead: int = 4) -> nn.TransformerEncoder:
    """An eval ``nn.TransformerEncoder`` (MHA route; its fast path is on when unhooked)."""
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).eval()
