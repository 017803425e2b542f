"""Capturing each request of transformers' continuous batching, against the plain engine.

Run by hand (not part of the test suite):

    python benchmarks/bench_serving.py [--requests 32] [--new 64] [--rounds 3]

A LLaMA-shaped model with random weights (grouped-query attention: 8 layers, 8 query heads,
2 kv heads, width 256) serves ``--requests`` prompts of 16 to 140 tokens, ``--new`` greedy
new tokens each, by ``model.generate_batch`` on sdpa (a paged cache sized for the job, on the
CPU). Each mode runs in its own process, ``--rounds`` times (medians of the time; the peak
resident memory ``ru_maxrss`` of each process):

- plain: the engine alone (in every mode the library's code is loaded first, by a capture of
  one short forward: a one-off cost, not a capture's);
- last: ``TransformerAttentionHooker(model, rows="last")``: each request's last query row of
  every call (its prompt's last token, then every decode step), stored per request;
- whole: every row of every request (prompt maps and every step), stored per request.

Printed: time, peak memory, its difference over the plain process's peak (processes differ by
tens of MB), its difference over the same process's own plain run of the engine just before
(``serve()`` without capture: the precise figure), the bytes stored, and the ratio of the last
two (what capturing costs in memory over what it keeps).
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


def child(mode: str, requests: int, new: int) -> dict:
    import logging

    import torch
    import transformers

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (16 + (i * 37) % 125,), generator=generator).tolist() for i in range(requests)]
    generation = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    pages = sum((len(p) + new) // 16 + 2 for p in prompts)
    cache = transformers.ContinuousBatchingConfig(page_size=16, num_blocks=pages)

    def serve():
        return model.generate_batch(prompts, generation_config=generation, continuous_batching_config=cache,
                                    progress_bar=False)

    from attention_hooker import TransformerAttentionHooker

    with torch.no_grad():
        with TransformerAttentionHooker(model):  # every mode: the library's code loaded (a one-off ~20 MB)
            model(torch.tensor([prompts[0][:4]]))
        serve()  # the engine's first run (its allocations, torch's kernels) is not what is compared
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        stored = 0
        start = time.perf_counter()
        if mode == "plain":
            outputs = serve()
        else:
            with TransformerAttentionHooker(model, rows="last" if mode == "last" else None) as hooker:
                outputs = serve()
            stored = sum(call.nbytes for values in hooker.requests.values() for calls in values.values()
                         for call in calls)
            assert len(hooker.requests) == requests
        seconds = time.perf_counter() - start
    assert all(len(o.generated_tokens) == new for o in outputs.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak": peak, "before": before, "stored": stored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trim", action="store_true",
                        help="run each process with MALLOC_TRIM_THRESHOLD_=0: glibc gives freed heap memory back, so "
                             "the peak is what was live, not what the allocator kept after frees")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.requests, args.new)))
        return
    results = {mode: [] for mode in ("plain", "last", "whole")}
    for _ in range(args.rounds):
        for mode in results:  # interleaved: the machine's drift falls on every mode alike
            env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="0") if args.trim else None
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--requests", str(args.requests),
                                  "--new", str(args.new)], capture_output=True, text=True, check=True, env=env)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = 1024 * 1024

    def median(mode, key):
        return statistics.median(r[key] for r in results[mode])

    plain_time, plain_peak = median("plain", "seconds"), median("plain", "peak")
    print(f"{args.requests} requests x {args.new} new tokens, {args.rounds} rounds, medians"
          + (", MALLOC_TRIM_THRESHOLD_=0" if args.trim else ""))
    print("| mode | time | x plain | peak RSS | over plain's peak | over its own plain run | stored | "
          "over its own plain run / stored |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in results:
        seconds, peak, stored = median(mode, "seconds"), median(mode, "peak"), median(mode, "stored")
        own = statistics.median(r["peak"] - r["before"] for r in results[mode])
        ratio = f"{own / stored:.2f}" if stored else "-"
        print(f"| {mode} | {seconds:.2f} s | {seconds / plain_time:.2f}x | {peak / mib:.0f} MiB | "
              f"{(peak - plain_peak) / mib:+.1f} MiB | {own / mib:+.1f} MiB | {stored / mib:.1f} MiB | {ratio} |")


if __name__ == "__main__":
    main()
