"""Streaming many small forwards to disk: what writing each forward whole costs.

A generation-like loop: ``--forwards`` forwards of a small LLaMA (``--layers`` layers, 4
query and 2 kv heads, ``--tokens`` tokens each), timed as the plain forward, the capture
kept in memory, and ``hooker.stream_to`` (one shard and one index write per forward, so
that a forward that returned is on disk). Medians of ``--rounds`` rounds, in one process;
ratios against the plain loop. Run it against another checkout with
``PYTHONPATH=<checkout>/src`` to compare versions.

    python benchmarks/bench_stream_forwards.py --forwards 200 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def _model(layers: int):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def _loop(model, inputs, mode: str, folder: str) -> float:
    from attention_hooker import TransformerAttentionHooker

    start = time.perf_counter()
    with torch.no_grad():
        if mode == "plain":
            for ids in inputs:
                model(ids)
        elif mode == "memory":
            with TransformerAttentionHooker(model):
                for ids in inputs:
                    model(ids)
        else:
            with TransformerAttentionHooker(model) as hooker, hooker.stream_to(folder, overwrite=True):
                for ids in inputs:
                    model(ids)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=200)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = _model(args.layers)
    inputs = [torch.randint(3, 120, (1, args.tokens)) for _ in range(args.forwards)]
    times = {mode: [] for mode in ("plain", "memory", "stream")}
    with tempfile.TemporaryDirectory() as root:
        _loop(model, inputs[:5], "stream", os.path.join(root, "warm"))
        for _ in range(args.rounds):  # interleaved, so that drift hits every mode alike
            for mode in times:
                times[mode].append(_loop(model, inputs, mode, os.path.join(root, "c")))
        files = len(os.listdir(os.path.join(root, "c")))
    plain = statistics.median(times["plain"])
    print(f"{args.forwards} forwards x {args.layers} layers, {args.tokens} tokens, medians of {args.rounds} rounds")
    print("| mode | per forward | / plain |")
    print("|---|---|---|")
    for mode, measured in times.items():
        median = statistics.median(measured)
        print(f"| {mode} | {median / args.forwards * 1e3:.2f} ms | {median / plain:.2f}x |")
    print(f"files in the streamed folder: {files}")


if __name__ == "__main__":
    main()
