"""Which request each row and key of a continuous-batching forward belongs to.

A serving engine (transformers' continuous batching: ``model.generate_batch``, the
``ContinuousBatchingManager`` behind ``transformers serve``) runs the prompts and decode
steps of many requests as one packed row: ``(1, heads, queries of every request, keys of
every request)``, with a block-diagonal mask. Stored as it is, axis 0 is not a request and
the rows and keys of different requests are mixed. The engine hands each attention layer
what it needs to unpack it, and this module reads exactly that, never the shapes:

- ``cu_seq_lens_q``: the cumulative query lengths, one segment of rows per request;
- ``cu_seq_lens_k``: the cumulative key lengths (per layer type: full or sliding), one
  segment of keys per request, in position order, ending at the request's last query;
- ``position_ids``: each query's position in its request (the keys before it are its past);
- ``write_index`` and the paged cache's block tables: the cache block each request writes
  its new keys into, which names the request (a block being written belongs to one request).

Where one of them is missing or they disagree, the layer's call is refused with the reason.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch

__all__ = ["RequestSegment", "PackedRequests", "packed_requests", "is_paged_cache", "request_keys", "at_positions"]


class RequestSegment(NamedTuple):
    """One request's part of a packed attention call.

    Attributes:
        request_id: the engine's id of the request (``"req_0"``...).
        queries: ``(start, stop)`` of its query rows in the packed call.
        keys: ``(start, stop)`` of its keys in the packed call.
        first_key: the position in the request of its first key here (0 unless a sliding
            window dropped older ones).
        positions: the request's positions so far, up to its last query here: its map
            is stored ``(1, heads, queries, positions)``.
    """

    request_id: str
    queries: Tuple[int, int]
    keys: Tuple[int, int]
    first_key: int
    positions: int

    @property
    def first_query(self) -> int:
        """The position in the request of its first query here."""
        return self.positions - (self.queries[1] - self.queries[0])


class PackedRequests(NamedTuple):
    """The requests of one packed forward, in their order in the batch, and the engine's
    paged cache they were served from (a new cache: a new run of the engine)."""

    segments: Tuple[RequestSegment, ...]
    cache: object = None

    def check_call(self, shape: Tuple[int, ...]) -> Optional[str]:
        """Why a packed call of ``shape`` ``(1, heads, query, key)`` does not fit these
        segments, or ``None``."""
        last = self.segments[-1] if self.segments else None
        if len(shape) != 4 or shape[0] != 1 or last is None:
            return (f"a continuous-batching attention call of shape {tuple(shape)}: the engine packs every "
                    "request into one row (1, heads, query, key), so it cannot be unpacked per request")
        rows = max(s.queries[1] for s in self.segments)
        keys = max(s.keys[1] for s in self.segments)
        if shape[2] < rows or shape[3] < keys:
            return (f"the continuous-batching call is {tuple(shape)} while the engine's cu_seq_lens say its "
                    f"requests take {rows} query rows and {keys} keys: it cannot be unpacked per request")
        return None


def request_keys(tensor: torch.Tensor, segment: RequestSegment, dim: int = -1) -> torch.Tensor:
    """``segment``'s keys of a packed ``tensor`` (along ``dim``: -1 for weights ``(1, heads,
    rows, keys)``, -2 for values ``(1, kv_heads, keys, head_dim)``), placed at the request's
    positions ``0 .. positions - 1``: keys a sliding window dropped are exact zeros."""
    return at_positions(tensor.narrow(dim, segment.keys[0], segment.keys[1] - segment.keys[0]), segment, dim)


def at_positions(part: torch.Tensor, segment: RequestSegment, dim: int = -1) -> torch.Tensor:
    """``segment``'s own keys (along ``dim``) placed at the request's positions: the keys a
    sliding window dropped, before ``first_key``, are exact zeros in front."""
    if not segment.first_key:
        return part
    shape = list(part.shape)
    shape[dim] = segment.first_key
    return torch.cat([part.new_zeros(shape), part], dim=dim)


def is_paged_cache(cache) -> bool:
    """Whether ``cache`` is transformers' paged cache of continuous batching (read by name:
    transformers need not be installed)."""
    cls = type(cache)
    return cls.__name__ == "PagedAttentionCache" and cls.__module__.startswith("transformers.")


def packed_requests(module, kwargs: dict) -> Union[None, PackedRequests, str]:
    """The requests of a continuous-batching forward of attention ``module``, read from the
    keyword arguments the engine passed it; ``None`` when this is not such a forward; a
    reason (``str``) when it is but the requests cannot be told apart.

    Args:
        module: the attention module (its ``layer_idx`` names its cache group).
        kwargs: the keyword arguments of its call.
    """
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    if cache is None or not is_paged_cache(cache):
        return None
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return ("the serving engine is recording a CUDA graph: its replays run no Python, so no call of it can be "
                "captured; serve with ContinuousBatchingConfig(use_cuda_graph=False) to capture")
    try:
        return _read(module, kwargs, cache)
    except _Unreadable as why:
        return (f"a continuous-batching forward whose requests cannot be told apart ({why}): stored packed, its "
                "rows and keys would mix requests, so it is not stored")


class _Unreadable(Exception):
    """What the engine's metadata lacks, or where it contradicts itself."""


def _read(module, kwargs: dict, cache) -> PackedRequests:
    allocator = _allocator(module, cache)
    cu_q = _ints(kwargs.get("cu_seq_lens_q"), "cu_seq_lens_q")
    cu_k = kwargs.get("cu_seq_lens_k")
    if isinstance(cu_k, dict):
        layer_type = getattr(allocator, "layer_type", None)
        if layer_type not in cu_k:
            raise _Unreadable(f"cu_seq_lens_k has no entry for this layer's type {layer_type!r}")
        cu_k = cu_k[layer_type]
    cu_k = _ints(cu_k, "cu_seq_lens_k")
    positions = kwargs.get("position_ids")
    if not isinstance(positions, torch.Tensor) or positions.numel() < cu_q[-1]:
        raise _Unreadable("no position_ids for every query")
    positions = positions.reshape(-1).tolist()
    write = kwargs.get("write_index")
    index = getattr(allocator, "index", 0)
    if not isinstance(write, (list, tuple)) or len(write) <= index or not isinstance(write[index], torch.Tensor):
        raise _Unreadable("no write_index, which names the request each row writes its key into")
    write = write[index].reshape(-1).tolist()
    if len(cu_q) != len(cu_k) or len(write) < cu_q[-1]:
        raise _Unreadable(f"cu_seq_lens_q has {len(cu_q)} entries, cu_seq_lens_k {len(cu_k)}, write_index "
                          f"{len(write)} for {cu_q[-1]} queries")
    owners = _block_owners(allocator)
    stride = getattr(allocator, "block_physical_stride", None)
    if not isinstance(stride, int) or stride <= 0:
        raise _Unreadable("the cache allocator has no block_physical_stride")
    segments: List[RequestSegment] = []
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if q1 == q0:  # a padding sequence (static shapes for graphs): no request
            continue
        block = write[q1 - 1] // stride
        request = owners.get(block)
        if request is None:
            raise _Unreadable(f"sequence {i} writes into cache block {block}, which no single request owns")
        end = positions[q1 - 1] + 1  # the request's positions so far
        if positions[q0:q1] != list(range(end - (q1 - q0), end)) or k1 - k0 > end or k1 - k0 < q1 - q0:
            raise _Unreadable(f"sequence {i} ({request!r}) has positions {positions[q0:q1][:4]}... and "
                              f"{k1 - k0} keys, which do not follow one another")
        segments.append(RequestSegment(request, (q0, q1), (k0, k1), end - (k1 - k0), end))
    if len({s.request_id for s in segments}) != len(segments):
        raise _Unreadable("two sequences of the batch write into the blocks of the same request")
    return PackedRequests(tuple(segments), cache)


def _allocator(module, cache):
    allocators = getattr(cache, "cache_allocators", None)
    if isinstance(allocators, dict) and len(allocators) == 1:
        return next(iter(allocators.values()))
    layer = getattr(module, "layer_idx", None)
    by_layer = getattr(cache, "layer_to_allocator", None)
    if layer is None or by_layer is None:
        raise _Unreadable("the attention module has no layer_idx to find its cache group by")
    try:
        return by_layer[layer]
    except (KeyError, IndexError, TypeError):
        raise _Unreadable(f"the paged cache has no group for layer {layer}") from None


def _block_owners(allocator) -> Dict[int, str]:
    """``{cache block: the one request whose table holds it}``; shared blocks (prefix
    sharing) are left out: no write goes into a shared block."""
    tables = getattr(allocator, "block_table", None)
    if not isinstance(tables, dict):
        raise _Unreadable("the cache allocator has no block table per request")
    owners: Dict[int, str] = {}
    shared = set()
    for request, blocks in tables.items():
        for block in blocks:
            block = int(block)
            if block in owners and owners[block] != request:
                shared.add(block)
            owners[block] = str(request)
    for block in shared:
        del owners[block]
    return owners


def _ints(value, name: str) -> List[int]:
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() < 2:
        raise _Unreadable(f"no {name}")
    return value.tolist()
