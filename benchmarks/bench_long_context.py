"""Capture at long context on a tiny LLaMA (rope, grouped-query attention), each mode in its own process.

Run by hand (not part of the test suite):

    python benchmarks/bench_long_context.py [--lengths 4096 8192] [--modes plain full_fp32 ...] [--rounds 3]
                                            [--device cuda --dtype bfloat16] [--window 1024]

Modes, for one forward of batch 1 on the sdpa model (2 layers, 4 query heads, 2 kv heads; with ``--window N``
a Mistral of the same sizes whose layers see a causal sliding window of N keys, given to sdpa as a mask):

- plain:       the model alone (the reference)
- hf_eager:    the peer: the eager model with output_attentions=True
- full_fp32:   our capture of every layer and head, stored as computed (float32)
- full_fp16:   the same, stored as float16
- full_on_device: the full capture kept where it is computed (``device=None``: on the GPU with ``--device cuda``)
- full_auto:   the full capture with the hooker's default ``device="auto"`` (on the GPU while it fits half of
               its free memory, beyond it on the CPU; the CPU without ``--device cuda``)
- head0:       our capture of head 0 only
- last_row:    our capture of the last query row only (``rows="last"``)
- stats:       per-head statistics reduced tile by tile (``hooker.reduce_into``), no matrix kept
- pooled:      each map pooled to 512 x 512 blocks tile by tile (``PooledAttention``)
- stream:      the full capture written to disk as it is computed (``hooker.stream_to``), float32,
               timed until every byte is on the disk (``os.sync()``); the folder (``--stream-dir``,
               default a temporary one) is removed after each round, outside the timing

Each (mode, length) runs in a fresh process, so that its peak resident memory
(``ru_maxrss``) is its own: shown as the peak over the plain forward's peak, next
to the bytes the capture keeps. Time is the median of ``--rounds`` forwards after
one warm-up, shown as a ratio to plain.

With ``--device cuda`` the model and its input live on the GPU (in ``--dtype``, float32 by
default; eager is the peer there too) and captures are kept on the CPU (``device="cpu"``, through
pinned, double-buffered copies) except in full_on_device and full_auto;
the table adds the GPU's peak allocated memory over the plain forward's
(``torch.cuda.max_memory_allocated``), and times wait for the GPU (``synchronize``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

MODES = ("plain", "hf_eager", "full_fp32", "full_fp16", "full_on_device", "full_auto", "head0", "last_row", "stats",
         "pooled", "stream")


def _model(implementation: str, device: str = "cpu", dtype: str = "float32", window: int = 0):
    import torch
    import transformers

    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536)
    # --window: the same sizes as a Mistral whose layers see a sliding window of keys (an explicit mask)
    config = transformers.MistralConfig(**sizes, sliding_window=window) if window else transformers.LlamaConfig(**sizes)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
    return model.to(device, getattr(torch, dtype))


def child(mode: str, length: int, rounds: int, stream_dir=None, device: str = "cpu", dtype: str = "float32",
          window: int = 0) -> dict:
    """One mode at one length, in this process: seconds per forward, peak RSS (and the GPU's peak), bytes kept."""
    import torch

    from attention_hooker import AttentionCaptureWarning, TransformerAttentionHooker

    warnings.simplefilter("ignore", AttentionCaptureWarning)
    torch.set_grad_enabled(False)
    model = _model("eager" if mode == "hf_eager" else "sdpa", device, dtype, window)
    ids = torch.randint(3, 250, (1, length), device=device)
    cuda = torch.device(device).type == "cuda"
    options = {"full_fp32": {"device": "cpu"}, "full_fp16": {"dtype": torch.float16, "device": "cpu"},
               "full_on_device": {"device": None}, "full_auto": {}, "head0": {"heads": [0], "device": "cpu"},
               "last_row": {"rows": "last", "device": "cpu"}}.get(mode)
    kept = 0

    def forward():
        nonlocal kept
        if mode == "hf_eager":
            out = model(ids, output_attentions=True)
            kept = sum(a.numel() * a.element_size() for a in out.attentions)
            return out
        if mode in ("stats", "pooled"):
            from attention_hooker import HeadStatsAccumulator, PooledAttention

            reducer = HeadStatsAccumulator() if mode == "stats" else PooledAttention(size=512)
            with TransformerAttentionHooker(model) as hooker:
                hooker.reduce_into(reducer)
                out = model(ids)
            if mode == "pooled":
                kept = reducer.values.nbytes
            return out
        if mode == "stream":
            import shutil
            import tempfile

            folder = tempfile.mkdtemp(dir=stream_dir)
            cleanup.append(lambda: shutil.rmtree(folder))  # after the clock stops: removing is not capturing
            with TransformerAttentionHooker(model) as hooker, hooker.stream_to(folder, overwrite=True) as stream:
                out = model(ids)
            os.sync()  # the clock includes the disk: every byte written is on it
            kept = stream.written
            return out
        if options is None:
            return model(ids)
        with TransformerAttentionHooker(model, **options) as hooker:
            out = model(ids)
        kept = hooker.values.nbytes
        return out

    seconds, cleanup = [], []
    for i in range(rounds + 1):
        start = time.perf_counter()
        out = forward()
        if cuda:
            torch.cuda.synchronize()
        if i:
            seconds.append(time.perf_counter() - start)
        del out
        while cleanup:
            cleanup.pop()()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    return {"mode": mode, "length": length, "seconds": statistics.median(seconds), "peak_mb": peak_kb / 1024,
            "gpu_peak_mb": gpu_mb, "kept_mb": kept / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--modes", nargs="+", default=[m for m in MODES if m != "full_auto"], choices=MODES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-dir", default=None, help="where the stream mode writes (default: a temporary folder)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="the model's dtype (default float32)")
    parser.add_argument("--window", type=int, default=0,
                        help="a Mistral of the same sizes whose layers see this many keys (a sliding window)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.rounds, args.stream_dir, args.device,
                               args.dtype, args.window)))
        return
    modes = ["plain"] + [m for m in args.modes if m != "plain"]
    gpu = args.device != "cpu"
    print(f"device {args.device}, model dtype {args.dtype}, {args.rounds} rounds (medians)"
          + (f", sliding window of {args.window} keys" if args.window else ""))
    print("| tokens | mode | time / plain | peak RSS over plain |" + (" GPU peak over plain |" if gpu else "")
          + " kept (stream: written) |")
    print("|---|---|---|---|---|" + ("---|" if gpu else ""))
    for length in args.lengths:
        plain = None
        for mode in modes:
            command = [sys.executable, __file__, "--child", mode, str(length), "--rounds", str(args.rounds),
                       "--device", args.device, "--dtype", args.dtype, "--window", str(args.window)]
            if args.stream_dir:
                command += ["--stream-dir", args.stream_dir]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"| {length} | {mode} | failed: {run.stderr.strip().splitlines()[-1][:80]} | | |" + (" |" if gpu else ""))
                continue
            result = json.loads(run.stdout.strip().splitlines()[-1])
            plain = plain or result
            print(f"| {length} | {mode} | {result['seconds'] / plain['seconds']:.2f}x ({result['seconds']:.2f} s) | "
                  f"+{result['peak_mb'] - plain['peak_mb']:.0f} MB | "
                  + (f"+{result['gpu_peak_mb'] - plain['gpu_peak_mb']:.0f} MB | " if gpu else "")
                  + f"{result['kept_mb']:.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
