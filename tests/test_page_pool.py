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
from attention_hooker.keep.allocator import POOLED_MIN, PagePool
from tiny_models import Stack

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


def test_remove_hooks_lets_the_pages_go():
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(torch.randn(2, TOKENS, 16))
        pool = hooker._router.memory.allocation.pages
        assert pool.nbytes >= 2 * 2 * 4 * TOKENS * TOKENS * 4
    assert pool.nbytes == 0
