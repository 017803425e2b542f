"""Cost of capturing a Longformer at 4,096 tokens with global tokens (issue 24), as ratios to the plain forward.

Run by hand (not part of the test suite):

    python benchmarks/bench_longformer.py [--rounds 7] [--tokens 4096] [--threads N]

A random-weight Longformer of a small but real shape (hidden 256, 4 heads, 2 layers,
attention_window 512, so the band is 513 keys wide), one sequence of ``--tokens`` tokens with
4 global tokens, on the CPU. Configurations, timed in interleaved rounds (every configuration
once per round, in a shuffled order, one untimed warm-up call each first); each ratio is taken
within a round and the median over rounds is shown:

- plain:      the model, never hooked (the reference, 1.00x)
- rows_last:  capture with ``rows="last"``: stores (1, heads, 1, tokens) per layer
- statistics: capture with ``reduce_into(HeadStatsAccumulator())``: stores nothing but the
              per-head sums (entropy, distance, first-token share); the assembled map is made a
              tile of 256 query rows at a time, never whole

Targets (issue 24): rows_last <= 1.2x, statistics <= 4x. What each stores is printed beside it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch
import transformers

from attention_hooker import TransformerAttentionHooker
from attention_hooker.analysis.stats import HeadStatsAccumulator


def _model(tokens: int):
    torch.manual_seed(0)
    config = transformers.LongformerConfig(
        vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
        attention_window=512, max_position_embeddings=tokens + 8, pad_token_id=1)
    return transformers.LongformerModel(config, add_pooling_layer=False).eval()


def _inputs(tokens: int) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (1, tokens))
    glob = torch.zeros(1, tokens, dtype=torch.long)
    glob[0, [0, 1, tokens // 2, tokens - 2]] = 1
    return dict(input_ids=ids, attention_mask=torch.ones(1, tokens, dtype=torch.long), global_attention_mask=glob)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model, inputs = _model(args.tokens), _inputs(args.tokens)
    stored = {}

    def plain() -> float:
        start = time.perf_counter()
        model(**inputs)
        return time.perf_counter() - start

    def rows_last() -> float:
        with TransformerAttentionHooker(model, rows="last") as hooker:
            start = time.perf_counter()
            model(**inputs)
            seconds = time.perf_counter() - start
        stored["rows_last"] = sum(t.numel() * t.element_size() for calls in hooker.values.values() for t in calls)
        return seconds

    def stats() -> float:
        accumulator = HeadStatsAccumulator()
        with TransformerAttentionHooker(model) as hooker:
            hooker.reduce_into(accumulator)
            start = time.perf_counter()
            model(**inputs)
            seconds = time.perf_counter() - start
        assert hooker.values == {} and len(accumulator.layers) == 2
        stored["statistics"] = sum(v.nbytes for v in accumulator.result().values())  # (layers, heads) arrays
        return seconds

    configurations = {"plain": plain, "rows_last": rows_last, "statistics": stats}
    with torch.no_grad():
        for run in configurations.values():  # warm-up: allocator, first-call caches
            run()
        times = {name: [] for name in configurations}
        for _ in range(args.rounds):
            order = list(configurations)
            random.shuffle(order)
            for name in order:
                times[name].append(configurations[name]())
    print(f"Longformer hidden 256, 4 heads, 2 layers, attention_window 512, 1 x {args.tokens} tokens, 4 global; "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds (median)")
    print("| configuration | seconds | ratio to plain (median of per-round ratios) | stored |")
    print("|---|---|---|---|")
    for name, seconds in times.items():
        ratio = statistics.median(s / p for s, p in zip(seconds, times["plain"]))
        print(f"| {name} | {statistics.median(seconds):.3f} | {ratio:.2f}x | {stored.get(name, 0):,} B |")


if __name__ == "__main__":
    main()
