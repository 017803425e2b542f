"""Handwritten (nanoGPT-style) attention: captured from its softmax, checked against its own."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attention_hooker import TransformerAttentionHooker


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention, with the fused branch switchable; keeps its own probabilities."""

    def __init__(self, dim=32, heads=4, block=16, flash=False):
        super().__init__()
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.heads, self.flash = heads, flash
        self.attn_dropout = nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # (B, H, T, hs)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            # The oracle, written without a softmax call: one forward of an attention layer that
            # makes two attention calls is refused as attention computed in pieces.
            s = (q @ k.transpose(-2, -1) * (1.0 / math.sqrt(k.size(-1)))).masked_fill(
                self.bias[:, :, :t, :t] == 0, float("-inf")).detach()
            self.own = torch.exp(s - s.logsumexp(-1, keepdim=True))
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            self.own = att.detach()
            att = self.attn_dropout(att)
            y = att @ v  # (B, H, T, hs)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, flash):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.attn = CausalSelfAttention(flash=flash)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x):
        x = x + self.attn(self.ln(x))
        return x + self.mlp(x)


class TinyGPT(nn.Module):
    def __init__(self, flash=False):
        super().__init__()
        self.h = nn.ModuleList([Block(flash), Block(flash)])

    def forward(self, x):
        for block in self.h:
            x = block(x)
        return x


def test_nanogpt_softmax_capture_equals_its_own_softmax():
    model = TinyGPT(flash=False).eval()
    x = torch.randn(2, 9, 32)
    expected = model(x)
    with TransformerAttentionHooker(model) as hooker:
        out = model(x)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert hooker.hooked_layers == ["h.0.attn", "h.1.attn"]
    for i, block in enumerate(model.h):
        torch.testing.assert_close(hooker.values[f"h.{i}.attn"][0], block.attn.own, atol=0, rtol=0)
        assert (hooker.values[f"h.{i}.attn"][0].triu(1) == 0).all()


def test_nanogpt_flash_branch_is_captured_through_sdpa():
    model = TinyGPT(flash=True).eval()
    x = torch.randn(2, 9, 32)
    with TransformerAttentionHooker(model) as hooker:
        model(x)
    for i, block in enumerate(model.h):
        torch.testing.assert_close(hooker.values[f"h.{i}.attn"][0], block.attn.own, atol=1e-6, rtol=1e-5)


def test_training_softmax_capture_is_before_dropout():
    model = TinyGPT(flash=False).train()
    with TransformerAttentionHooker(model) as hooker:
        model(torch.randn(1, 9, 32))
    w = hooker.values["h.0.attn"][0]
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 9))
