"""Bandwidth of copies from a CUDA device into CPU memory: a plain ``copy_`` (pageable) against
:func:`attention_hooker.keep.host_copy.copy_to_host` (pinned, double-buffered, on a side stream).

Run by hand on a machine with a CUDA GPU (``benchmarks/gpu_checks.sh`` does):

    python benchmarks/bench_host_copy.py [--sizes-mib 64 512 2048] [--rounds 5]

For each size and dtype conversion, each way copies a device tensor into a CPU tensor that is
new each time (fresh pages, as a first capture has) and into one reused (as a loop that clears
has); shown: GB/s of the bytes that land on the CPU, median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attention_hooker.keep.host_copy import copy_to_host


def _rate(fn, nbytes: int, rounds: int) -> float:
    times = []
    for _ in range(rounds + 1):  # the first is a warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_host_copy.py needs a CUDA device")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.rounds} rounds, medians, GB/s landed")
    header = f"{'MiB':>6} | {'dtype':>13} | {'pageable new':>12} | {'pinned new':>10} | {'pageable reused':>15} | " \
             f"{'pinned reused':>13}"
    print(header)
    print("-" * len(header))
    for mib in args.sizes_mib:
        for source_dtype, target_dtype in ((torch.float32, torch.float32), (torch.float32, torch.float16)):
            source = torch.rand(mib * 2**20 // 4, device="cuda").view(-1, 4096)
            nbytes = source.numel() * target_dtype.itemsize
            reused = torch.empty(source.shape, dtype=target_dtype)
            rates = [
                _rate(lambda: torch.empty(source.shape, dtype=target_dtype).copy_(source), nbytes, args.rounds),
                _rate(lambda: copy_to_host(torch.empty(source.shape, dtype=target_dtype), source), nbytes, args.rounds),
                _rate(lambda: reused.copy_(source), nbytes, args.rounds),
                _rate(lambda: copy_to_host(reused, source), nbytes, args.rounds),
            ]
            check = torch.empty(source.shape, dtype=target_dtype)
            assert torch.equal(copy_to_host(check, source), source.to("cpu", target_dtype))
            conversion = "fp32" if target_dtype == source_dtype else "fp32 -> fp16"
            print(f"{mib:6d} | {conversion:>13} | {rates[0]:12.2f} | {rates[1]:10.2f} | {rates[2]:15.2f} | "
                  f"{rates[3]:13.2f}")
            del source, reused, check


if __name__ == "__main__":
    main()
