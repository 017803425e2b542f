"""Many processes: torchrun's environment, shares of the work, and keepers merged across ranks.

The engine is PyTorch's own distributed runtime: ``torchrun`` starts the processes and
sets their environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); ``torch.distributed`` connects them (gloo on CPUs, NCCL on GPUs).
Nothing here schedules work of its own.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch

from .errors import AttentionHookerError

__all__ = ["Launch", "launch_from_environment", "process_group", "share", "merge_statistics", "gather_objects",
           "assemble_heads"]

_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a job started by ``torchrun``."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the outputs and prints."""
        return self.rank == 0


def launch_from_environment(environ=None) -> Optional[Launch]:
    """This process's place in a ``torchrun`` job, or ``None`` when it runs alone.

    Raises:
        AttentionHookerError: when the job is half configured (some of torchrun's
            variables set, others missing or not numbers), naming what is wrong.

    Example:
        >>> launch_from_environment({}) is None
        True
        >>> launch_from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
        ...                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
        Launch(rank=1, world_size=2, local_rank=1)
    """
    environ = os.environ if environ is None else environ
    present = [name for name in _LAUNCH_VARIABLES if environ.get(name)]
    if not present:
        return None
    if environ.get("WORLD_SIZE") == "1" and environ.get("RANK", "0") == "0":
        return None  # torchrun --nproc-per-node 1: a job of one is a single process
    missing = [name for name in _LAUNCH_VARIABLES if not environ.get(name)]
    if missing:
        raise AttentionHookerError(
            f"launched half configured: {', '.join(f'{n}={environ[n]}' for n in present)} set but "
            f"{', '.join(missing)} not; start every process with torchrun --nproc-per-node N -m attention_hooker ... "
            "(or set all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    try:
        rank, world, local = (int(environ[n]) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise AttentionHookerError(
            f"RANK={environ['RANK']!r}, WORLD_SIZE={environ['WORLD_SIZE']!r}, LOCAL_RANK={environ['LOCAL_RANK']!r} "
            "must be whole numbers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise AttentionHookerError(f"RANK={rank} is not one of the WORLD_SIZE={world} ranks (0..{world - 1})")
    return Launch(rank, world, local)


@contextlib.contextmanager
def process_group(launch: Optional[Launch], *, backend: Optional[str] = None,
                  timeout_s: float = 1800) -> Iterator[Optional[str]]:
    """Joins the job's process group for the block (gloo on CPUs, NCCL when this rank
    has a GPU), and leaves it after; nothing when ``launch`` is ``None`` or a group is
    already up (then it is the caller's, and stays).

    Yields:
        The backend in use, or ``None`` when running alone.
    """
    import torch.distributed as dist

    if launch is None:
        yield None
        return
    if dist.is_initialized():
        yield dist.get_backend()
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > launch.local_rank else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield backend
        # Every rank leaves together: a rank that tore gloo down while rank 0 was still writing its
        # outputs sometimes aborted at exit ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def share(items: Sequence, rank: int, world_size: int) -> list:
    """Rank ``rank``'s contiguous share of ``items`` (the first ranks take one more when
    they do not divide evenly; a rank may get none).

    Example:
        >>> [share(list(range(5)), r, 2) for r in range(2)]
        [[0, 1, 2], [3, 4]]
    """
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return list(items[start: start + base + (1 if rank < extra else 0)])


def merge_statistics(accumulator, group=None):
    """Every rank's :class:`~attention_hooker.analysis.stats.HeadStatsAccumulator`, merged exactly
    (the sums and counts of all ranks added, not averages of averages), on every rank.

    Args:
        accumulator: this rank's statistics (it may hold none: a rank with no input).
        group: the process group (default: the whole job).

    Returns:
        A new accumulator holding the whole job's statistics; ``accumulator`` itself
        when no process group is running (one process is the whole job).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return accumulator
    merged = type(accumulator)(sink_positions=accumulator.sink_positions)
    for state in gather_objects(accumulator.state(), group):  # in rank order: the same sums on every rank
        merged.merge_state(state)
    return merged


def gather_objects(value, group=None) -> List:
    """``value`` of every rank, in rank order, on every rank (small objects: counts, timings)."""
    import torch.distributed as dist

    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def assemble_heads(hooker, group=None):
    """The full ``(batch, heads, query, key)`` of a tensor-parallel capture, on every rank.

    Each rank of the tensor-parallel group stored its own block of heads
    (``hooker.head_indices``); their calls are gathered and put side by side in the
    order of their global head indices.

    Args:
        hooker: this rank's hooker (every rank calls this, with the same layers and calls).
        group: the tensor-parallel process group (default: the whole job).

    Returns:
        ``{layer_name: [tensor per call]}``, each ``(batch, all heads, query, key)`` on
        the CPU.

    Raises:
        AttentionHookerError: when the ranks hold different layers or calls.
    """
    import torch.distributed as dist

    from .values import AttentionValues

    indices = hooker.head_indices
    layout = {name: [tuple(t.shape) for t in calls] for name, calls in hooker.values.items()}
    everyone = gather_objects((indices, layout), group)
    if any(other[1] != layout for other in everyone):
        raise AttentionHookerError("the ranks hold different layers or calls; every rank must run the same "
                                   "forwards before assemble_heads()")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    assembled = AttentionValues()
    for name, calls in hooker.values.items():
        order = sorted(range(len(everyone)), key=lambda r: everyone[r][0][name][0])
        assembled[name] = []
        for tensor in calls:
            local = tensor.contiguous().to(device)
            parts = [torch.empty_like(local) for _ in everyone]
            dist.all_gather(parts, local, group=group)
            assembled[name].append(torch.cat([parts[r] for r in order], dim=1).cpu())
    return assembled
