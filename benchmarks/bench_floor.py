"""The floor of a bitwise capture: what it must add to the plain forward, timed alone.

Run by hand (not part of the test suite):

    python benchmarks/bench_floor.py [--rounds 9] [--threads N]

A capture that leaves the model's output bitwise as it was must let the fused kernel run, and
the kernel does not hand out its weights: they are computed beside it from the call's query and
keys. This script times that extra work on its own (random query, keys and values of each
layer's shapes, nothing stored, no page faults), as a share of the plain sdpa forward of the
model, so that a target for the default capture can be checked against what any bitwise
capture must pay on this machine:

- kernel:      ``F.scaled_dot_product_attention`` on each layer's shapes (what the forward already pays)
- q.k:         the product of the queries and keys alone
- softmax:     q.k, the causal mask where the model has one, and the softmax: the floor of
               today's default path
- lse:         q.k, then ``exp(s - lse)`` with the log-sum-exp that the CPU flash kernel returns
               (``_scaled_dot_product_flash_attention_for_cpu``; taking it costs nothing more
               in a capture, so it is not timed here): #22's item 1 on the kernel this machine has
- causal rows: (causal models) the softmax floor with each block of 128 query rows multiplied
               only with the keys its rows can see: the most that skipping masked keys can save
- ours:        what the capture's sdpa route computes for each layer (``sdpa_attention_weights``,
               into one reused buffer, as the capture's page pool gives it): its distance to the floor

Models (as ``bench_peers.py`` runs them): GPT-2 small's ``GPT2LMHeadModel`` (random weights) at (1, 128), (8, 128), (1, 512); timm's ViT-S/16 at batch 8.
Every figure is the median over interleaved rounds (each variant once per round).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from attention_hooker.capture.routes.sdpa import sdpa_attention_weights

ROW_BLOCK = 128  # query rows per block in the "causal rows" variant


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _extra_work(batch: int, heads: int, length: int, dim: int, layers: int, causal: bool) -> dict:
    """The variants' functions on one model's attention shapes: ``(batch, heads, length, dim)``
    per layer, ``layers`` times."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=generator) for _ in range(3))
    scale = dim ** -0.5
    hidden = torch.ones(length, length, dtype=torch.bool).triu_(1) if causal else None
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)  # (B, H, L)
    lse = lse.unsqueeze(-1)  # (B, H, L, 1)

    def scores() -> torch.Tensor:
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # (B, H, L, L)
        return s.masked_fill_(hidden, float("-inf")) if causal else s

    def kernel():
        for _ in range(layers):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def product():
        for _ in range(layers):
            torch.matmul(q, k.transpose(-1, -2))

    def softmax():
        for _ in range(layers):
            torch.softmax(scores(), -1)

    def from_lse():
        for _ in range(layers):
            scores().sub_(lse).exp_()

    def causal_rows():
        for _ in range(layers):
            for first in range(0, length, ROW_BLOCK):
                last = min(length, first + ROW_BLOCK)  # rows first..last-1 see keys 0..last-1
                s = torch.matmul(q[:, :, first:last], k[:, :, :last].transpose(-1, -2)).mul_(scale)
                s.masked_fill_(hidden[first:last, :last], float("-inf"))
                torch.softmax(s, -1)

    into = torch.empty(batch, heads, length, length)

    def buffer(shape, dtype, device):
        return into.view(-1)[: math.prod(shape)].view(shape)

    def ours():
        for _ in range(layers):
            sdpa_attention_weights(q, k, is_causal=causal, buffer=buffer)

    variants = {"kernel": kernel, "q.k": product, "softmax": softmax, "lse": from_lse, "ours": ours}
    if causal:
        variants["causal rows"] = causal_rows
    return variants


def _cases():
    """``(name, plain forward, variants)`` for each model and input size."""
    import timm
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa")).eval()  # as bench_peers.py runs it
    config = gpt.config
    for batch, length in ((1, 128), (8, 128), (1, 512)):
        ids = torch.randint(0, config.vocab_size, (batch, length))
        yield (f"GPT-2 ({batch}, {length})", lambda ids=ids: gpt(ids),
               _extra_work(batch, config.n_head, length, config.n_embd // config.n_head, config.n_layer, True))
    vit = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    images = torch.randn(8, 3, 224, 224)
    tokens = 1 + (224 // 16) ** 2
    yield "ViT-S/16 (8, 224)", lambda: vit(images), _extra_work(8, 6, tokens, 64, len(vit.blocks), False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ("kernel", "q.k", "softmax", "lse", "causal rows", "ours")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds (medians); "
          "each variant as ms and as a share of the plain forward")
    print("| work | plain ms | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    with torch.inference_mode():
        for name, plain, variants in _cases():
            timed = {"plain": plain, **variants}
            for fn in timed.values():  # warm up
                fn()
            samples = {key: [] for key in timed}
            for _ in range(args.rounds):
                for key, fn in timed.items():
                    samples[key].append(_seconds(fn))
            ms = {key: statistics.median(values) * 1e3 for key, values in samples.items()}
            cells = [f"{ms[key]:.1f} ({ms[key] / ms['plain']:.1%})" if key in ms else "-" for key in names]
            print(f"| {name} | {ms['plain']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
