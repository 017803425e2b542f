"""The model: token and learned position embeddings, attention-only layers on a residual stream
(no MLP), an optional final layer norm, an unembedding."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ...errors import AttentionHookerError

__all__ = ["InductionConfig", "CausalSelfAttention", "AttentionOnlyTransformer"]


@dataclass(frozen=True)
class InductionConfig:
    """The model's shape and its task's.

    Attributes:
        vocab: token ids are ``0 .. vocab - 1``.
        half: the length of the random half; a sequence is that half twice (``2 * half`` tokens).
        d_model: the residual stream's width.
        heads: heads per layer (``d_model`` must divide by it).
        layers: attention layers.
        final_norm: a LayerNorm before the unembedding.
    """

    vocab: int = 64
    half: int = 24
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    final_norm: bool = True

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise AttentionHookerError(f"InductionConfig.{f.name}={value!r} must be a positive int")
        if self.d_model % self.heads:
            raise AttentionHookerError(f"InductionConfig: d_model={self.d_model} must be a multiple of heads={self.heads}")

    @property
    def tokens(self) -> int:
        """The sequence length, ``2 * half`` (the position embedding's size)."""
        return 2 * self.half

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention`` on per-head
    tensors ``(batch, heads, query, head_dim)``; one output projection for the layer.

    Head ``h`` reads and writes the ``h``-th block of ``head_dim`` features: its queries are
    ``q_proj(x)[..., h * head_dim:(h + 1) * head_dim]`` and its output enters ``out_proj``
    through the same columns (zeroing them knocks the head out).
    """

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, d_model // heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens, d_model)`` -> ``(batch, heads, tokens, head_dim)``."""
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens, d_model)`` -> ``(batch, tokens, d_model)``, what the layer adds to the stream."""
        b, t, d = x.shape
        q, k, v = (self.split_heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, E)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, E)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))  # heads side by side: (B, T, H * E)


class AttentionOnlyTransformer(nn.Module):
    """``input_ids (batch, tokens)`` -> ``logits (batch, tokens, vocab)``: the next token's scores
    at each position. Attention layers are ``layers.<i>`` (a ``CausalSelfAttention`` each)."""

    def __init__(self, config: InductionConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.d_model)
        self.pos_embed = nn.Embedding(config.tokens, config.d_model)
        self.layers = nn.ModuleList(CausalSelfAttention(config.d_model, config.heads) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.d_model) if config.final_norm else nn.Identity()
        self.unembed = nn.Linear(config.d_model, config.vocab, bias=False)

    def residual(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The stream's start: token plus position embeddings, ``(batch, tokens, d_model)``."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise AttentionHookerError(f"input_ids must be (batch, tokens) integer ids, got {tuple(ids.shape)} {ids.dtype}")
        if not 1 <= ids.shape[1] <= self.config.tokens:
            raise AttentionHookerError(f"input_ids has {ids.shape[1]} tokens; the model has positions for 1 to "
                                       f"{self.config.tokens}")
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.config.vocab):
            raise AttentionHookerError(f"input_ids hold ids {int(ids.min())}..{int(ids.max())}; the vocabulary is "
                                       f"0..{self.config.vocab - 1}")
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.embed(ids) + self.pos_embed(positions)  # (B, T, D)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.residual(input_ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.unembed(self.final_norm(x))  # (B, T, V)
