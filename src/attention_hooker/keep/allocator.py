"""Spare buffers and pooled pages: the memory of weights that nobody can reach any more, reused.

Fresh memory for large attention matrices costs page faults on every call; the
weights of a call that was cleared, and that nothing outside the store can
reach, can take the next call's weights instead. This must never write into a
tensor a user still holds, so a tensor is reused only when every way to its
memory is held by the store alone:

- its Python object: referenced by the store's call list only (``sys.getrefcount``),
  and no weak reference to it;
- that call list: referenced by the store's dict only (a user's ``dict(values)``,
  ``values[name]`` or ``list(values.values())`` holds the list, not the tensor);
- its ``TensorImpl``: held by that Python object only (``Tensor._use_count``; a
  DLPack capsule or an autograd graph holds it from C++);
- its storage: held by that ``TensorImpl`` only (``torch._C._storage_Use_Count``; a
  view or a numpy array hold it), and its Python object by nobody (a user's
  ``untyped_storage()``).

Weights the user reads and drops only later (after the ``clear()`` that would have made
them spares) go back to the :class:`PagePool` instead: each stored tensor of 256 KiB to
32 MiB lies on pages of its own that the pool keeps, and the pages are taken again once no
storage is left on them (the mapping's own reference count, which every storage on it
raises, is back to the pool's alone).

The reference counts are compared with a baseline measured the same way on a
tensor nobody else holds, so the rule does not depend on how an interpreter
version counts temporary references. Where torch lacks either counter, nothing
is reused. (The counters are private APIs, each behind one function of
``_torch_private.py``.)
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .._torch_private import REFCOUNTS_SUPPORTED, refcount, storage_use_count, tensor_use_count

__all__ = ["SpareBuffers", "unreachable_tensors", "Arena", "Allocation", "empty", "zero_pages", "ComputedBuffer",
           "PAGED_BYTES", "PagePool"]



def _counts(values: Mapping) -> List[Tuple[int, int, torch.Tensor]]:
    """``(call list refs, tensor refs, tensor)`` of every stored tensor, counted alike each time."""
    counted = []
    for calls in dict.values(values):  # the dict's own lists, not a snapshot's (AttentionValues)
        list_refs = refcount(calls)
        for tensor in calls:
            counted.append((list_refs, refcount(tensor), tensor))
    return counted


def _storage_refs(tensor: torch.Tensor) -> Tuple[int, int]:
    """``(StorageImpl use count, Python refs to its storage object)``: the storage's Python
    object is kept with the storage, so a user holding ``untyped_storage()`` shows in
    its Python count, not in the use count."""
    storage = tensor.untyped_storage()
    return storage_use_count(storage), refcount(storage)


def _storage_refs_of(storage) -> Tuple[int, int]:
    """:func:`_storage_refs` of a storage object at hand (counted alike: one local name)."""
    return storage_use_count(storage), refcount(storage) - 1


def _baseline() -> Tuple[int, int, Tuple[int, int]]:
    alone = {"layer": [torch.empty(1)]}
    list_refs, tensor_refs, tensor = _counts(alone)[0]
    return list_refs, tensor_refs, _storage_refs(tensor)


_BASELINE = _baseline() if REFCOUNTS_SUPPORTED else None


def unreachable_tensors(values: Mapping) -> List[torch.Tensor]:
    """The tensors of ``values`` (``{name: [tensor per call]}``, held by its owner alone)
    that nothing else can reach: their memory may be written again once ``values``
    drops them. See the module docstring for the rule."""
    if _BASELINE is None:
        return []
    list_base, tensor_base, storage_base = _BASELINE
    found = []
    for list_refs, tensor_refs, tensor in _counts(values):
        if (
            list_refs == list_base
            and tensor_refs == tensor_base
            and not weakref.getweakrefcount(tensor)
            and tensor_use_count(tensor) == 1
            and _storage_refs(tensor) == storage_base
            and tensor._base is None
            and not tensor.requires_grad
            and not tensor.is_shared()
            and tensor.is_contiguous()
        ):
            found.append(tensor)
    return found


class SpareBuffers:
    """A pool of unreachable tensors by ``(shape, dtype, device)``, taken by the next calls.

    Each :meth:`offer` replaces the pool, so spares never hold more than one
    clear's worth of memory.
    """

    def offer(self, tensors: List[torch.Tensor]) -> None:
        spare: Dict[tuple, List[torch.Tensor]] = {}
        for tensor in tensors:
            spare.setdefault(_key(tensor.shape, tensor.dtype, tensor.device), []).append(tensor)
        with self._lock:
            self._spare = spare

    def __init__(self):
        self._spare: Dict[tuple, List[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape, dtype: torch.dtype, device: torch.device, fresh=None) -> torch.Tensor:
        """An uninitialised tensor: a spare one when there is one, else from ``fresh``
        (``fresh(shape, dtype, device)``, ``torch.empty`` by default)."""
        with self._lock:
            spares = self._spare.get(_key(shape, dtype, device))
            if spares:
                return spares.pop()
        return (fresh or empty)(shape, dtype, device)

    def release(self) -> None:
        with self._lock:
            self._spare = {}

    @property
    def nbytes(self) -> int:
        """Bytes held as spares."""
        with self._lock:
            return sum(t.numel() * t.element_size() for ts in self._spare.values() for t in ts)


def _key(shape, dtype: torch.dtype, device) -> tuple:
    return tuple(shape), dtype, torch.device(device)


class Arena:
    """Stored tensors of small repeated calls, laid side by side in large chunks of CPU memory.

    Generating keeps one small ``(batch, heads, 1, key)`` tensor per layer and step,
    one column longer each time, while the capture's transient tensors (keys repeated
    for grouped heads, float32 scores for float16 storage) come and go between them.
    Allocated one by one, the kept tensors pin the C heap around the holes the
    transients leave, and the process holds 2-4x what is stored. Carved from chunks,
    they lie densely: memory held stays close to the bytes stored. The capture takes
    from the arena only for a layer's second call onward: the calls of one forward each
    own their memory (``torch.save`` of one of them writes its bytes, not a chunk).

    A chunk is a tensor of its own: it is freed when the last tensor cut from it is.
    A chunk holds about 64 tensors of the size asked for (256 KiB to 4 MiB), so its
    unused tail stays small next to what is stored, and a capture that keeps only the
    newest calls (``keep="last"``) pins at most a chunk or two. Tensors larger than a
    quarter of the largest chunk, and tensors on other devices, are allocated as usual.
    """

    MIN_CHUNK = 256 * 2**10
    MAX_CHUNK = 4 * 2**20
    TENSORS_PER_CHUNK = 64

    def __init__(self):
        self._chunks: Dict[torch.dtype, Tuple[torch.Tensor, int]] = {}  # dtype -> (chunk, bytes used)
        self._lock = threading.Lock()

    def empty(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised contiguous tensor; from a chunk when it is small and on the CPU."""
        device = torch.device(device)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = itemsize
        for n in shape:
            nbytes *= int(n)
        if device.type != "cpu" or nbytes == 0 or nbytes > self.MAX_CHUNK // 4:
            return torch.empty(shape, dtype=dtype, device=device)
        step = -nbytes % 64 + nbytes  # each tensor starts 64-byte aligned, as the allocator's would
        with self._lock:
            chunk, used = self._chunks.get(dtype, (None, 0))
            if chunk is None or used + step > chunk.numel():
                chunk_bytes = min(self.MAX_CHUNK, max(self.MIN_CHUNK, step * self.TENSORS_PER_CHUNK))
                chunk, used = _mapped_chunk(chunk_bytes), 0
            self._chunks[dtype] = (chunk, used + step)
            # A tensor on the chunk's storage, not a view of the chunk: no view bookkeeping
            # (a third of the bytes per tensor), and no ``_base`` to keep the chunk's object.
            # Made under the lock, so that rewind() sees it hold the chunk.
            return torch.empty(0, dtype=dtype).set_(chunk.untyped_storage(), used // itemsize, tuple(shape))

    def rewind(self) -> None:
        """After a ``clear()``: a chunk being filled that nothing but the arena reaches any
        more (every tensor cut from it is gone, and nobody holds its storage) is filled
        again from its start, as spare buffers are reused (same rule, see the module)."""
        if _BASELINE is None:
            return
        with self._lock:
            for dtype, (chunk, used) in list(self._chunks.items()):
                storage = chunk.untyped_storage()
                if (tensor_use_count(chunk) == 1 and _storage_refs_of(storage) == _BASELINE[2]
                        and not weakref.getweakrefcount(chunk)):
                    self._chunks[dtype] = (chunk, 0)
                del storage

    def release(self) -> None:
        """Forgets the chunks being filled (each is freed with the last tensor cut from it)."""
        with self._lock:
            self._chunks.clear()


def _private_pages(nbytes: int) -> mmap.mmap:
    """``nbytes`` of fresh private anonymous memory (zeros until written). Private: shared anonymous
    memory (mmap's default) is backed by shmem, faulted 4 KiB at a time."""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _on_pages(pages: mmap.mmap, shape, dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    """A tensor of ``shape`` (``nbytes``) on the start of ``pages``, its storage exactly its bytes
    (``torch.save`` writes those only); while the storage lives, it holds a reference to ``pages``.
    A tensor on the storage, not a view of a byte tensor: no ``_base`` (stored tensors with one are
    never reused as spare buffers), as the arena's tensors are made."""
    storage = torch.frombuffer(pages, dtype=torch.uint8, count=nbytes).untyped_storage()
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def _mapped_chunk(nbytes: int) -> torch.Tensor:
    """``nbytes`` of fresh anonymous pages as a uint8 tensor: outside the C heap, so a
    chunk neither pins the heap nor is pinned by it, and its pages go back to the
    system as soon as the last tensor cut from it is freed."""
    return torch.frombuffer(_private_pages(nbytes), dtype=torch.uint8)


PAGED_BYTES = 32 * 2**20
"""CPU tensors of this many bytes or more are mapped pages of their own (:func:`zero_pages`). Below it
glibc may hand back memory it already has (its mmap threshold grows up to 32 MiB), which is faster
still than fresh huge pages; above it every ``torch.empty`` is fresh 4 KiB pages."""


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` in the ``allocate(shape, dtype, device)`` form the in-memory keeper takes;
    a large CPU tensor is mapped pages of its own (:func:`zero_pages`: faulted in 2 MiB pages)."""
    if torch.device(device).type == "cpu" and _nbytes(shape, dtype) >= PAGED_BYTES:
        return zero_pages(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def zero_pages(shape, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor on fresh anonymous pages: every element is zero (the kernel maps zero pages)
    and nothing is written until it is used, so that what is never written costs nothing.

    The pages are private and advised as transparent huge pages where the system offers them:
    filling them then takes one fault per 2 MiB instead of one per 4 KiB (on this project's CPU
    machine 256 MiB fill at 6-12 GB/s instead of 3-3.6 GB/s for ``torch.empty``'s). The memory goes back to
    the system when the last tensor on it is freed (a ``torch.frombuffer`` of the mapping).
    Its storage cannot grow (``resize_`` to more elements raises); nothing else differs from
    ``torch.empty``'s."""
    nbytes = _nbytes(shape, dtype)
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = _private_pages(nbytes)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            pages.madvise(advice)
        except (OSError, ValueError):  # no transparent huge pages here: 4 KiB pages it is
            pass
    return _on_pages(pages, shape, dtype, nbytes)


def _nbytes(shape, dtype: torch.dtype) -> int:
    nbytes = torch.empty((), dtype=dtype).element_size()
    for n in shape:
        nbytes *= int(n)
    return nbytes


def _listed_refs(pages) -> int:
    """References to ``pages`` seen from a loop over a list that holds them (compared with
    :func:`_unlisted_refs`, taken the same way at the same moment)."""
    return refcount(pages)


def _free_in(mappings) -> Optional[mmap.mmap]:
    """The first of ``mappings`` (a pool's list) that only the list holds, or ``None``."""
    unused = _unlisted_refs()
    for pages in mappings:  # a plain loop: counted as the baseline is
        if _listed_refs(pages) == unused:
            return pages
    return None


def _unlisted_refs() -> int:
    """What :func:`_listed_refs` gives for an object that only its list holds. Taken at each use
    (a few microseconds), not once at import: a tracer or debugger that holds frames' locals
    while the baseline is taken would otherwise make pages in use look free."""
    for alone in [object()]:
        return _listed_refs(alone)


class PagePool:
    """Pages of stored calls that go back into service once nothing holds them any more.

    A capture that keeps the weights of every call needs the same memory again at each
    forward. Taken from the C heap, it costs a page fault per 4 KiB each time: glibc gives
    freed memory back to the system (and maps larger blocks on their own), so a user who
    reads the weights and drops them pays for fresh pages at the next forward (GPT-2 small,
    (1, 512): 151 MB of weights per forward, about 37,000 faults, 5-9% of the forward on
    this project's CPU machine). Here each stored tensor of :data:`POOLED_MIN` bytes or more
    lies on pages of its own that the pool keeps: once the last tensor or view on them is
    gone (every storage on the mapping holds a reference to it: its reference count is back to
    what the pool's list alone gives), the next call of that size takes them, already faulted in.

    The pool keeps at most :attr:`max_bytes` of pages. When a new size does not fit, free
    mappings of other sizes are let go first (sizes that stop coming, as prompts change length,
    do not hold the pool); beyond that a tensor comes from the heap as before. Pages kept stay
    resident while the hooks are on, even when no weights are stored. :meth:`release` (hooks
    off) hands them on for :data:`HANDED_ON_SECONDS`: a pool that lacks free pages of a size
    takes a handed-on mapping of that size once nothing holds it (a hooker made per forward,
    ``with TransformerAttentionHooker(model) as h: model(x)`` in a loop, or the same hooker
    set up again, takes the pages the weights before left); after that they go with the last
    tensor on them.
    """

    max_bytes = 256 * 2**20

    def __init__(self):
        self._pages: Dict[int, List[mmap.mmap]] = {}  # size in bytes -> mappings of that size
        self._held = 0
        # Re-entrant: the garbage collector, run by an allocation below, may finalize this pool's own
        # hooker (unreachable in a cycle while its hooks are on), whose release() takes the lock again.
        self._lock = threading.RLock()

    def take(self, shape, dtype: torch.dtype) -> Tuple[Optional[torch.Tensor], bool]:
        """``(tensor, zeroed)``: a CPU tensor on pages nothing else uses (``zeroed``: fresh, all
        zeros), or ``(None, False)`` when the pool is full."""
        nbytes = _nbytes(shape, dtype)
        size = -nbytes % mmap.PAGESIZE + nbytes
        with self._lock:
            pages = _free_in(self._pages.get(size, ()))
            if pages is not None:
                return _on_pages(pages, shape, dtype, nbytes), False
            if self._held + size > self.max_bytes:
                self._let_go_of_free_pages(_unlisted_refs(), size)
            if self._held + size > self.max_bytes:
                return None, False
            pages = _HANDED_ON.take_free(size)  # a released pool's free pages of this size
            fresh = pages is None
            if fresh:
                pages = _private_pages(size)
            self._pages.setdefault(size, []).append(pages)
            self._held += size
            return _on_pages(pages, shape, dtype, nbytes), fresh

    def _let_go_of_free_pages(self, unused: int, needed: int) -> None:
        """Forgets free mappings (``unused``: their count when only the pool holds them), the
        largest first, until ``needed`` more bytes fit (each is unmapped as it is dropped)."""
        for size in sorted(self._pages, reverse=True):
            kept = []
            for pages in self._pages[size]:  # a plain loop: enumerate's reused tuple would add a reference
                if self._held + needed > self.max_bytes and _listed_refs(pages) == unused:
                    self._held -= size
                else:
                    kept.append(pages)
            if kept:
                self._pages[size] = kept
            else:
                del self._pages[size]

    @property
    def nbytes(self) -> int:
        """Bytes of pages the pool keeps (in use or not)."""
        return self._held

    def release(self) -> None:
        """Hands every mapping on to the next pool made within :data:`HANDED_ON_SECONDS`, then
        forgets them (each is unmapped with the last tensor on it)."""
        with self._lock:
            pages, self._pages, self._held = self._pages, {}, 0
        _HANDED_ON.give(pages, self.max_bytes)


HANDED_ON_SECONDS = 2.0
"""How long the pages of released :class:`PagePool` s wait for the next pools (then they go)."""


class _HandedOn:
    """The pages of released pools, free or still held by the user's weights, for the pools that
    come within :data:`HANDED_ON_SECONDS`: a pool takes a mapping of the size it lacks once
    nothing else holds it. A timer (a daemon thread named ``attention-hooker-pages``, one at a
    time, started when pages arrive and none is waiting, never put off) lets every mapping go
    after that, so a process that stops capturing keeps none resident; a forked child starts
    with none. Nobody waits for its lock but the timer: a release or a take that finds it busy
    does without (the pages go, or the pool makes new ones), so no lock is ever waited for while
    another is held."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._pages: Dict[int, List[mmap.mmap]] = {}
        self._held = 0
        self._generation = 0  # the timer that lets the present pages go (an older one does nothing)
        self._waiting = False
        self._lock = threading.Lock()
        self.timer: Optional[threading.Timer] = None

    def give(self, pages: Dict[int, List[mmap.mmap]], most: int) -> None:
        """Keeps ``pages`` (with those given before, up to ``most`` bytes) until the timer goes.
        Never waits: a release re-entered from a finalizer (the garbage collector running while
        the lock is held), or racing with another, lets its pages go instead."""
        if not pages or not self._lock.acquire(blocking=False):
            return
        try:
            for size, mappings in pages.items():
                for one in mappings:
                    if self._held + size <= most:
                        self._pages.setdefault(size, []).append(one)
                        self._held += size
            start = bool(self._pages) and not self._waiting
            if start:
                self._waiting = True
                self._generation += 1
            generation = self._generation
        finally:
            self._lock.release()
        if start:
            self._start_timer(generation)

    def take_free(self, size: int) -> Optional[mmap.mmap]:
        """A handed-on mapping of ``size`` bytes that nothing holds any more (the caller's now), or
        ``None``."""
        if not self._lock.acquire(blocking=False):  # the caller holds its pool's lock: never wait
            return None
        try:
            mappings = self._pages.get(size, [])
            pages = _free_in(mappings)
            if pages is not None:
                mappings.remove(pages)
                self._held -= size
            return pages
        finally:
            self._lock.release()

    def let_go(self, generation: Optional[int] = None) -> None:
        """Forgets every mapping (each is unmapped with the last tensor on it); with
        ``generation``, only if no newer timer took over."""
        with self._lock:
            if generation is not None and generation != self._generation:
                return
            old, self._pages, self._held, self._waiting = self._pages, {}, 0, False
        del old  # unmapped outside the lock

    def _start_timer(self, generation: int) -> None:
        timer = threading.Timer(HANDED_ON_SECONDS, self.let_go, args=(generation,))
        timer.daemon = True
        timer.name = "attention-hooker-pages"
        try:
            timer.start()
        except Exception:  # no new thread (at interpreter shutdown): the pages go now
            self.let_go(generation)
            return
        self.timer = timer


_HANDED_ON = _HandedOn()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HANDED_ON._reset)


POOLED_MIN = 256 * 2**10
"""Stored CPU tensors from this many bytes up to :data:`PAGED_BYTES` lie on pages of the :class:`PagePool`
(glibc serves smaller ones from its heap without mapping them)."""


class ComputedBuffer:
    """``buffer(shape, dtype, device)`` for one call computed straight into what is stored: a
    spare tensor of that shape when there is one, else a fresh one (``fresh``; a large CPU one
    on :func:`zero_pages`, a middling one from the :class:`PagePool`). After each call,
    :attr:`zeroed` says whether the tensor it gave is known to hold zeros only (fresh pages),
    so that a causal map's upper triangle need not be written. One per call of a layer: the
    answer is about the tensor this object just gave."""

    def __init__(self, spares: "SpareBuffers", fresh, pages: Optional["PagePool"] = None):
        self._spares, self._fresh, self._pages = spares, fresh, pages
        self.zeroed = False

    def __call__(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        self.zeroed = False
        return self._spares.take(shape, dtype, device, fresh=self._fresh_tensor)

    def _fresh_tensor(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        if self._fresh is empty and torch.device(device).type == "cpu":
            nbytes = _nbytes(shape, dtype)
            if nbytes >= PAGED_BYTES:
                self.zeroed = True
                return zero_pages(shape, dtype)
            if self._pages is not None and nbytes >= POOLED_MIN:
                tensor, self.zeroed = self._pages.take(shape, dtype)
                if tensor is not None:
                    return tensor
        return self._fresh(shape, dtype, device)


class Allocation:
    """Where the in-memory keeper's stored calls come from: the spare buffers (cleared weights
    nobody can reach any more) for any call, and the arena for a layer's repeated calls."""

    def __init__(self):
        self.spares = SpareBuffers()
        self.arena = Arena()
        self.pages = PagePool()

    def for_call(self, repeated: bool):
        """``allocate(shape, dtype, device)`` for a call: from the arena when it repeats a
        layer's earlier call (generation steps lie side by side), else :func:`empty`."""
        return self.arena.empty if repeated else empty

    def buffer(self, repeated: bool) -> ComputedBuffer:
        """``buffer(shape, dtype, device)`` for a call computed straight into what is stored:
        a spare tensor of that shape when there is one, else :meth:`for_call`'s."""
        return ComputedBuffer(self.spares, self.for_call(repeated), self.pages)

    def recycle(self, tensors: List[torch.Tensor]) -> None:
        """After a ``clear()`` while the hooks are on: the tensors nobody reaches become the
        spares, and the arena's chunk being filled starts again when nothing reaches it."""
        self.spares.offer(tensors)
        self.arena.rewind()

    def release(self) -> None:
        """The hooks are off: spares and chunks being filled are let go, pooled pages handed on
        (:class:`PagePool`)."""
        self.spares.release()
        self.arena.release()
        self.pages.release()
