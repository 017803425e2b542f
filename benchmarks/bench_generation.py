"""Memory held while capturing every step of ``generate()``, against what the capture stores.

Run by hand (not part of the test suite):

    python benchmarks/bench_generation.py [--new-tokens 1000] [--modes plain full_fp32 full_fp16 last_call]

A tiny LLaMA (``--layers`` 2, ``--heads`` 4 query heads, half as many kv heads) generates ``--new-tokens`` tokens greedily
after a 16-token prompt, batch 1, each mode in its own process:

- plain:      no capture (the reference)
- full_fp32:  every step of every layer kept, float32
- full_fp16:  the same, stored as float16
- last_call:  ``max_calls=1, keep="last"``: only the newest step of each layer is kept

"held" is the resident memory (``/proc/self/statm``) after the generation minus plain's,
next to the bytes the capture stores (``hooker.values.nbytes``); the ratio is what the
capture costs per byte it keeps. The peak (``ru_maxrss``) over plain's is shown too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

MODES = ("plain", "full_fp32", "full_fp16", "last_call")


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, new_tokens: int, layers: int, heads: int) -> dict:
    import torch
    import transformers

    from attention_hooker import TransformerAttentionHooker

    torch.set_grad_enabled(False)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=16 * heads, intermediate_size=32 * heads,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=heads // 2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 250, (1, 16))
    options = {"full_fp32": {}, "full_fp16": {"dtype": torch.float16},
               "last_call": {"max_calls": 1, "keep": "last"}}.get(mode)
    generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    stored = 0
    if options is None:
        out = model.generate(ids, **generate)
    else:
        with TransformerAttentionHooker(model, **options) as hooker:
            out = model.generate(ids, **generate)
        stored = hooker.values.nbytes
    seconds = time.perf_counter() - start
    del out
    gc.collect()
    return {"mode": mode, "seconds": seconds, "rss_mb": _rss_mb(), "stored_mb": stored / 2**20,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=1000)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4, help="query heads (half as many kv heads)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.new_tokens, args.layers, args.heads)))
        return
    print(f"{args.layers} layers, {args.heads} query heads, {args.heads // 2} kv heads")
    print(f"| {args.new_tokens} new tokens | time / plain | stored | held over plain | held / stored | peak over plain |")
    print("|---|---|---|---|---|---|")
    plain = None
    for mode in ["plain"] + [m for m in args.modes if m != "plain"]:
        run = subprocess.run([sys.executable, __file__, "--child", mode, "--new-tokens", str(args.new_tokens),
                              "--layers", str(args.layers), "--heads", str(args.heads)], capture_output=True, text=True)
        if run.returncode:
            print(f"| {mode} | failed: {run.stderr.strip().splitlines()[-1][:80]} | | | | |")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        plain = plain or r
        held = r["rss_mb"] - plain["rss_mb"]
        ratio = f"{held / r['stored_mb']:.2f}" if r["stored_mb"] else "-"
        print(f"| {mode} | {r['seconds'] / plain['seconds']:.2f}x ({r['seconds']:.1f} s) | {r['stored_mb']:.1f} MB | "
              f"{held:+.1f} MB | {ratio} | {r['peak_mb'] - plain['peak_mb']:+.1f} MB |", flush=True)


if __name__ == "__main__":
    main()
