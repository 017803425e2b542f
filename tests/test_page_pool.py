"""Stored weights lie on pages the capture keeps, and take them again once the user drops them.

Finding (issue 22): a user who reads a forward's weights and drops them paid for fresh pages at the
next forward: glibc gives freed memory back to the system, so every stored map was faulted in again
(GPT-2 small at (1, 512): 151 MB, about 37,000 faults per forward, 5-9% of it on the CPU machine).
"""

from __future__ import annotations

import gc
import resource

import numpy as np
import pytest
import torch

from attention_hooker import TransformerAttentionHooker
from attention_hooker.keep import allocator
from attention_hooker.keep.allocator import POOLED_MIN, PagePool
from tiny_models import Stack


@pytest.fixture(autouse=True)
def _nothing_handed_on():
    """Each test's pools start without the pages of pools that earlier tests released."""
    allocator._HANDED_ON.let_go()
    yield
    allocator._HANDED_ON.let_go()

TOKENS = 300  # (2, 4, 300, 300) float32 maps: 2.9 MB each, above POOLED_MIN


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _maps(hooker):
    return [calls[0] for calls in hooker.values.values()]


def test_weights_the_user_dropped_give_their_pages_to_the_next_forward():
    model = Stack(layers=4).eval()
    x = torch.randn(2, TOKENS, 16)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(x)
        first = _maps(hooker)  # the user reads them, and clears (so they are no spares)
        assert all(t.nbytes >= POOLED_MIN for t in first)
        hooker.clear()
        del first
        gc.collect()
        model(x)
        kept = _maps(hooker)
        hooker.clear()
        del kept
        pages = 4 * (2 * 4 * TOKENS * TOKENS * 4) // 4096  # 4 layers of (2, 4, 300, 300) float32
        before = _minor_faults()
        model(x)
        faults = _minor_faults() - before
        # the maps alone would fault in `pages` pages; the model's own few tensors are small
        assert faults < pages // 4, f"{faults} faults for {pages} pages of stored maps"
        torch.testing.assert_close(_maps(hooker)[0], _reference(model, x), rtol=1e-6, atol=1e-7)


def _reference(model, x):
    """The first block's weights by hand, from its own projection."""
    block = model.blocks[0]
    b, t, d = x.shape
    q, k, _ = block.qkv(x).view(b, t, 3, block.num_heads, d // block.num_heads).permute(2, 0, 3, 1, 4)
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)


@pytest.mark.parametrize("way", ["tensor", "view", "numpy", "storage", "list"])
def test_pages_a_user_still_reaches_are_never_taken(way):
    """While any way to the pages lives (the tensor, a view, a numpy array, the storage), a
    later forward's weights go elsewhere, and what the user holds keeps its values."""
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(torch.randn(2, TOKENS, 16))
        tensor = hooker.values["blocks.0"][0]
        original = tensor.clone()
        held = {"tensor": tensor, "view": tensor[1, 2:], "numpy": tensor.numpy(), "storage": tensor.untyped_storage(),
                "list": list(hooker.values.values())}[way]
        del tensor
        for _ in range(3):
            hooker.clear()
            model(torch.randn(2, TOKENS, 16) * 3)
        assert not torch.equal(hooker.values["blocks.0"][0], original)
    if way == "numpy":
        np.testing.assert_array_equal(held, original.numpy())
    elif way == "storage":
        torch.testing.assert_close(torch.tensor([]).set_(held, 0, original.shape), original, rtol=0, atol=0)
    elif way == "list":
        torch.testing.assert_close(held[0][0], original, rtol=0, atol=0)
    else:
        torch.testing.assert_close(held, original if way == "tensor" else original[1, 2:], rtol=0, atol=0)


def test_pool_takes_free_pages_only_and_says_when_they_are_fresh():
    pool = PagePool()
    a, fresh = pool.take((256, 256), torch.float32)
    assert fresh and bool((a == 0).all()), "fresh pages read as zeros"
    assert a.untyped_storage().nbytes() == a.nbytes, "the storage is the tensor's bytes (torch.save writes those)"
    a.fill_(1.0)
    view = a[3:]
    pointer = a.data_ptr()
    del a
    b, fresh = pool.take((256, 256), torch.float32)
    assert b.data_ptr() != pointer and fresh, "a view still reaches the first pages"
    del view
    c, fresh = pool.take((128, 512), torch.float32)  # same bytes, another shape
    assert c.data_ptr() == pointer and not fresh, "taken again, written before (not zeros)"
    assert pool.nbytes == 2 * 256 * 256 * 4


def test_pool_stays_within_its_bytes_and_lets_go_on_release():
    pool = PagePool()
    pool.max_bytes = 3 * 2**20
    held = [pool.take((2**18,), torch.float32)[0] for _ in range(3)]  # 1 MiB each
    assert all(t is not None for t in held)
    assert pool.take((2**18,), torch.float32) == (None, False), "full: the caller allocates as before"
    pool.release()
    assert pool.nbytes == 0
    assert held[0].sum().item() == 0.0, "released pages stay valid for the tensors on them"


def test_sizes_that_stop_coming_do_not_hold_the_pool():
    """Review: a full pool of sizes that no longer come (prompts of other lengths) served no new
    size, while keeping its pages resident. Free mappings are let go for the new size; mappings
    in use never are."""
    pool = PagePool()
    pool.max_bytes = 4 * 2**20
    in_use = pool.take((2**18,), torch.float32)[0]  # 1 MiB, held by the user
    pointer = in_use.data_ptr()
    for _ in range(3):
        pool.take((2**18 + 1024,), torch.float32)  # 3 more mappings of another size, dropped at once
    for length in (2**18 + 2048, 2**18 + 4096, 2**18 + 8192):  # new sizes, each dropped before the next
        tensor, fresh = pool.take((length,), torch.float32)
        assert tensor is not None and fresh, "a new size is served once free mappings are let go"
        del tensor
    assert pool.nbytes <= pool.max_bytes
    in_use.fill_(5.0)
    assert in_use.data_ptr() == pointer and bool((in_use == 5.0).all())
    assert all(pool.take((2**18,), torch.float32)[0].data_ptr() != pointer for _ in range(2)), "still in use"


def test_remove_hooks_hands_the_pages_on_and_the_timer_lets_them_go(monkeypatch):
    started = []

    class Timer:  # stands in for threading.Timer: fired by hand below
        def __init__(self, seconds, function, args=()):
            self.seconds, self.function, self.args, self.daemon, self.name = seconds, function, args, False, None

        def start(self):
            started.append(self)

    monkeypatch.setattr(allocator.threading, "Timer", Timer)
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(torch.randn(2, TOKENS, 16))
        pool = hooker._router.memory.allocation.pages
        assert pool.nbytes >= 2 * 2 * 4 * TOKENS * TOKENS * 4
    assert pool.nbytes == 0 and allocator._HANDED_ON._held >= 2 * 2 * 4 * TOKENS * TOKENS * 4
    assert len(started) == 1 and started[0].daemon and started[0].name == "attention-hooker-pages"
    assert started[0].seconds == allocator.HANDED_ON_SECONDS == 2.0
    with torch.no_grad(), TransformerAttentionHooker(Stack().eval()):
        pass  # released with no pages: nothing handed on
    later = PagePool()
    later.take((2**18,), torch.float32)
    later.release()  # pages handed on while the timer waits: no second timer, the first not put off
    assert len(started) == 1
    started[0].function(*started[0].args)
    assert allocator._HANDED_ON._pages == {} and allocator._HANDED_ON._held == 0


def test_a_timer_that_fires_late_does_not_take_pages_handed_on_after_it(monkeypatch):
    started = []

    class Timer:
        def __init__(self, seconds, function, args=()):
            self.function, self.args = function, args

        def start(self):
            started.append(self)

    monkeypatch.setattr(allocator.threading, "Timer", Timer)
    handed = allocator._HANDED_ON
    pool = PagePool()
    pool.take((2**18,), torch.float32)
    pool.release()
    handed.let_go()  # a clear by hand: the first timer is stale now
    pool.take((2**18,), torch.float32)
    pool.release()
    assert len(started) == 2
    started[0].function(*started[0].args)  # the stale one fires
    assert handed._held == 2**20, "pages handed on after it stay for their own timer"
    started[1].function(*started[1].args)
    assert handed._held == 0


def test_nobody_waits_for_the_reservoirs_lock_but_its_timer():
    """Review: a hooker's finalizer (run by the garbage collector while the reservoir's lock is
    held on this thread) releases its pool; waiting for the lock there would hang forever, and a
    take that waited for it while holding its pool's lock could deadlock with another thread."""
    handed = allocator._HANDED_ON
    pool = PagePool()
    pool.take((2**18,), torch.float32)
    pool.release()
    assert handed._held == 2**20
    other = PagePool()
    assert handed._lock.acquire()
    try:
        other.release()  # returns at once
        tensor, fresh = other.take((2**18,), torch.float32)  # does without the handed-on pages
        assert fresh and handed._held == 2**20
    finally:
        handed._lock.release()
    del tensor
    assert other.take((2**18,), torch.float32)[1] is False  # its own, freed


def test_a_pools_lock_is_reentrant_for_a_finalizer_that_releases_it_during_a_take():
    pool = PagePool()
    with pool._lock:  # as a take holds it when the garbage collector finalizes the pool's hooker
        pool.release()
    assert pool.nbytes == 0


def test_a_full_pool_does_not_drain_what_was_handed_on():
    handed = allocator._HANDED_ON
    full = PagePool()
    full.max_bytes = 2**20
    held = full.take((2**18,), torch.float32)[0]  # its cap, in use
    giver = PagePool()
    giver.take((2**18,), torch.float32)
    giver.release()
    assert handed._held == 2**20
    assert full.take((2**18,), torch.float32) == (None, False)
    assert handed._held == 2**20, "the handed-on mapping stays for a pool that has room"
    del held


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork is POSIX")
def test_a_forked_child_starts_with_nothing_handed_on():
    import os

    pool = PagePool()
    pool.take((2**18,), torch.float32)
    pool.release()
    assert allocator._HANDED_ON._held == 2**20
    child = os.fork()
    if child == 0:  # the child: its reservoir and lock are new, and no timer is owed
        code = 1
        try:
            handed = allocator._HANDED_ON
            code = 0 if handed._held == 0 and not handed._lock.locked() and handed.timer is None else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _one_shot(model, x, keep=False):
    """A new hooker per forward, as a notebook cell or a loop makes them; the user reads the maps."""
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(x)
    maps = _maps(hooker)
    return maps if keep else [m.sum().item() for m in maps]


def test_a_hooker_made_per_forward_takes_the_pages_its_predecessor_left(monkeypatch):
    """Finding (issue 22, the one-shot pattern): each new hooker started with an empty pool, so its
    weights were faulted in again at every forward, however many forwards came before."""
    monkeypatch.setattr(allocator, "HANDED_ON_SECONDS", 60)  # a slow machine's forwards stay well within it
    model = Stack(layers=4).eval()
    x = torch.randn(2, TOKENS, 16)
    _one_shot(model, x)
    _one_shot(model, x)
    pages = 4 * (2 * 4 * TOKENS * TOKENS * 4) // 4096
    before = _minor_faults()
    maps = _one_shot(model, x, keep=True)
    faults = _minor_faults() - before
    assert faults < pages // 4, f"{faults} faults for {pages} pages of stored maps"
    torch.testing.assert_close(maps[0], _reference(model, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("way", ["tensor", "view", "numpy", "storage"])
def test_weights_a_user_keeps_from_one_hooker_are_not_written_by_the_next(way, monkeypatch):
    monkeypatch.setattr(allocator, "HANDED_ON_SECONDS", 60)
    model = Stack(layers=2).eval()
    kept = _one_shot(model, torch.randn(2, TOKENS, 16), keep=True)
    copies = [m.clone() for m in kept]
    held = [{"tensor": m, "view": m[1, 2:], "numpy": m.numpy(), "storage": m.untyped_storage()}[way] for m in kept]
    del kept
    assert allocator._HANDED_ON._held >= 2 * 2 * 4 * TOKENS * TOKENS * 4  # handed on, still in use
    for _ in range(3):
        _one_shot(model, torch.randn(2, TOKENS, 16) * 3)
    for copy, one in zip(copies, held):
        if way == "storage":
            one = torch.tensor([], dtype=torch.float32).set_(one).view(copy.shape)
        elif way == "view":
            copy = copy[1, 2:]
        torch.testing.assert_close(torch.as_tensor(one), copy, rtol=0, atol=0)


def test_a_hooker_set_up_again_takes_its_own_pages_back(monkeypatch):
    """Review: a hooker entered again (``with h:`` per forward) found its pool empty and faulted
    every map in again."""
    monkeypatch.setattr(allocator, "HANDED_ON_SECONDS", 60)
    model = Stack(layers=4).eval()
    x = torch.randn(2, TOKENS, 16)
    hooker = TransformerAttentionHooker(model)
    pages = 4 * (2 * 4 * TOKENS * TOKENS * 4) // 4096
    for round_ in range(3):
        before = _minor_faults()
        with torch.no_grad(), hooker:
            model(x)
        faults = _minor_faults() - before
        hooker.clear()
    assert faults < pages // 4, f"{faults} faults for {pages} pages of stored maps"


def test_pages_handed_on_go_when_no_hooker_comes(monkeypatch):
    monkeypatch.setattr(allocator, "HANDED_ON_SECONDS", 0.5)
    model = Stack(layers=2).eval()
    _one_shot(model, torch.randn(2, TOKENS, 16))
    timer = allocator._HANDED_ON.timer
    assert allocator._HANDED_ON._held > 0 and timer.interval == 0.5, "this test's pages, this test's timer"
    assert timer.daemon and timer.name == "attention-hooker-pages"
    timer.join(10)
    assert not timer.is_alive() and allocator._HANDED_ON._pages == {} and allocator._HANDED_ON._held == 0
