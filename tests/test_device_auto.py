"""``device="auto"`` (the default) and the pinned, double-buffered copies to the CPU (issue 22, part 5).

On this CPU machine ``"auto"`` must be ``"cpu"`` exactly. The budget that decides where an
accelerator's call goes is checked with a free-memory figure of the test's own (a
``torch.device("cuda")`` is only a name here), and :class:`HostCopies` runs its pieces and
two slots through ordinary buffers. The CUDA side (streams, pinned memory, a budget read
from the driver) is checked in ``test_fast_kernels.py`` on a GPU.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_hooker import TransformerAttentionHooker
from attention_hooker.errors import AttentionHookerError
from attention_hooker.keep.device_budget import AUTO, AUTO_DEVICE_SHARE, DeviceBudget
from attention_hooker.keep.host_copy import HostCopies, _pieces, copy_to_host
from attention_hooker.keep.memory import MemoryKeeper
from attention_hooker.keep.policy import StoragePolicy
from attention_hooker.keep.protocol import NO_SOURCES

from tiny_models import SdpaAttention, Stack

GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")


# The default.
def test_the_hookers_default_is_auto_and_it_keeps_on_the_cpu_here_exactly_as_device_cpu():
    torch.manual_seed(0)
    model = Stack(layers=2).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad(), TransformerAttentionHooker(model) as auto:
        out_auto = model(x)
    with torch.no_grad(), TransformerAttentionHooker(model, device="cpu") as cpu:
        out_cpu = model(x)
    assert auto._router.policy.device == AUTO
    assert list(auto.values) == list(cpu.values) and len(auto.values) == 2
    for name in cpu.values:
        for a, c in zip(auto.values[name], cpu.values[name]):
            assert a.device == CPU and a.dtype == c.dtype and torch.equal(a, c)
    assert torch.equal(out_auto, out_cpu)


def test_auto_with_a_stored_dtype_and_rows_stays_on_the_cpu_and_equals_device_cpu():
    torch.manual_seed(1)
    model = Stack(layers=1).eval()
    x = torch.randn(1, 9, 16)
    kept = {}
    for device in ("auto", "cpu"):
        with torch.no_grad(), TransformerAttentionHooker(model, device=device, dtype=torch.float16, rows=[0, -1]) as h:
            model(x)
        kept[device] = h.values
    for name in kept["cpu"]:
        assert torch.equal(kept["auto"][name][0], kept["cpu"][name][0])
        assert kept["auto"][name][0].dtype == torch.float16 and kept["auto"][name][0].device == CPU


@pytest.mark.parametrize("device", ["gpu", "cuda:x", 3.5, "automatic"])
def test_a_device_that_is_not_one_names_auto_among_the_choices(device):
    with pytest.raises(AttentionHookerError, match="'auto'") as err:
        TransformerAttentionHooker(Stack(layers=1), device=device)
    assert "device=" in str(err.value)


# The budget, with a free-memory figure of the test's own.
class FreeMemory:
    def __init__(self, free):
        self.free, self.reads = free, 0

    def __call__(self, device):
        self.reads += 1
        return self.free


def test_a_call_stays_on_the_device_while_what_is_held_there_fits_the_share_of_free_memory():
    free = FreeMemory(1_000)
    budget = DeviceBudget(share=0.5, free_memory=free)
    assert budget.target(GPU, 500) == GPU
    assert DeviceBudget(share=0.5, free_memory=free).target(GPU, 501) == CPU
    budget.kept(GPU, 300)
    assert budget.target(GPU, 200) == GPU
    budget.kept(GPU, 200)
    assert budget.target(GPU, 1) == CPU  # the budget is spent for this forward
    assert free.reads == 2  # one per budget: read once per forward, a call's decision does not move


def test_the_budget_is_read_again_at_each_forward_and_counts_what_the_keeper_holds_as_its_own():
    free = FreeMemory(1_000)
    budget = DeviceBudget(share=0.5, free_memory=free)
    assert budget.target(GPU, 400) == GPU
    budget.kept(GPU, 400)
    free.free = 600  # the driver counts our 400 bytes as taken
    budget.begin_forward()
    # 0.5 * (600 free + 400 ours) = 500: 100 more fit
    assert budget.target(GPU, 100) == GPU
    assert free.reads == 2


def test_once_a_call_is_sent_to_the_cpu_every_later_one_is_until_what_is_held_is_let_go():
    free = FreeMemory(700)  # the driver counts our 300 bytes as taken
    budget = DeviceBudget(share=0.5, free_memory=free)
    budget.kept(GPU, 300)
    assert budget.target(GPU, 300) == CPU  # 600 > 0.5 * (700 + 300)
    assert budget.target(GPU, 10) == CPU  # would fit, but a layer's calls never go back and forth
    budget.begin_forward()
    assert budget.target(GPU, 10) == CPU  # a new forward, still held: still the CPU
    budget.released({GPU: 300})  # the keeper cleared its calls
    budget.begin_forward()
    assert budget.target(GPU, 10) == GPU
    alone = DeviceBudget(share=0.5, free_memory=FreeMemory(100))
    assert alone.target(GPU, 60) == CPU and alone.target(GPU, 1) == CPU  # a call too large on its own
    alone.released({})  # nothing was held: a clear lets calls stay on the device again
    assert alone.target(GPU, 1) == GPU
    budget.kept(GPU, 300)
    assert budget.target(GPU, 300) == CPU
    budget.kept(GPU, -300)  # keep="last" pushed the calls out: held falls to 0, but the capture goes on
    assert budget.target(GPU, 1) == CPU  # still the CPU: only clear() (released) lets calls stay again
    budget.kept(GPU, -10**9)  # never below zero
    assert budget._held[GPU] == 0


def test_the_default_share_is_half_and_a_device_whose_memory_cannot_be_read_sends_everything_to_the_cpu():
    assert AUTO_DEVICE_SHARE == 0.5
    assert DeviceBudget(free_memory=lambda device: 2_000).target(GPU, 1_000) == GPU
    unknown = DeviceBudget(free_memory=lambda device: None)
    assert unknown.target(GPU, 1) == CPU and unknown.target(torch.device("mps"), 0) == CPU


def test_calls_computed_on_the_cpu_stay_there_and_are_not_counted():
    free = FreeMemory(0)
    budget = DeviceBudget(free_memory=free)
    budget.kept(CPU, 10**12)
    assert budget.target(CPU, 10**12) == CPU and free.reads == 0 and CPU not in budget._held
    assert budget.target(GPU, 0) == GPU  # nothing held on the GPU: 0 bytes fit 0


def test_devices_have_budgets_of_their_own():
    budget = DeviceBudget(share=0.5, free_memory=lambda device: 1_000 if device.index == 0 else 100)
    other = torch.device("cuda", 1)
    budget.kept(GPU, 450)
    assert budget.target(GPU, 50) == GPU and budget.target(other, 50) == other and budget.target(other, 51) == CPU


class RecordingBudget(DeviceBudget):
    """Writes down what the keeper tells it."""

    def __init__(self):
        super().__init__(free_memory=lambda device: 0)
        self.told = []

    def kept(self, device, nbytes):
        self.told.append(("kept", device.type, nbytes))

    def released(self, counted):
        self.told.append(("released", {d.type: n for d, n in counted.items()}))

    def begin_forward(self):
        self.told.append(("forward",))


def _policy(**options):
    base = dict(device="auto", dtype=None, heads=None, max_calls=None, keep="first", keep_grad=False)
    base.update(options)
    return StoragePolicy.build(**base)


def _keep(memory, layer, tensor, value=None):
    writer = memory.begin_call(layer, tuple(tensor.shape), tensor.dtype, NO_SOURCES._replace(value=value))
    writer.write(torch.arange(tensor.shape[2]), tensor)
    writer.commit()


def test_the_memory_keeper_tells_the_budget_what_it_keeps_lets_go_of_and_clears():
    """On "meta" tensors, which the budget sees as an accelerator's here (it counts no CPU bytes).
    The value vectors (given on the CPU) go where their call went and, copies of ours, count."""
    memory = MemoryKeeper(_policy(max_calls=2, keep="last", keep_values=True), ["a"], threading.RLock())
    memory.budget = recorder = RecordingBudget()
    for _ in range(3):
        _keep(memory, "a", torch.empty(1, 2, 3, 4, device="meta"), torch.zeros(1, 2, 4, 5))
    assert [v.device.type for v in memory.value_vectors["a"]] == ["meta", "meta"]
    assert recorder.told == [("kept", "meta", 96), ("kept", "meta", 160)] * 3 + [
        ("kept", "meta", -96), ("kept", "meta", -160)]  # the third call pushed the first out, with its values
    memory.clear()
    assert recorder.told[-1] == ("released", {"meta": 2 * 96 + 2 * 160})
    _keep(memory, "a", torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4, 5))  # CPU bytes are not counted
    assert recorder.told[-1][0] == "released"


def test_a_value_the_models_cache_holds_is_not_counted_and_a_gradient_is_counted_with_its_call():
    memory = MemoryKeeper(_policy(keep_values=True), ["a"], threading.RLock())
    memory.budget = recorder = RecordingBudget()
    cache = torch.empty(1, 2, 64, 5, device="meta")  # a static cache: the same storage at every step
    _keep(memory, "a", torch.empty(1, 2, 1, 64, device="meta"), cache)
    assert memory.value_vectors["a"][0].shape == cache.shape
    assert recorder.told == [("kept", "meta", 512)]  # the call's 512 bytes; not the cache's 640
    graded = MemoryKeeper(_policy(keep_grad=True), ["a"], threading.RLock())
    graded.budget = recorder = RecordingBudget()
    _keep(graded, "a", torch.empty(1, 2, 3, 4, device="meta"))
    assert recorder.told == [("kept", "meta", 2 * 96)]  # its gradient, of the same size, comes in backward
    assert graded.stored_bytes((1, 2, 3, 4), torch.float32) == 2 * 96  # and a call is weighed with it


def test_spares_left_by_clear_are_the_cpus_only():
    memory = MemoryKeeper(_policy(), ["a"], threading.RLock())
    on_cpu, elsewhere = torch.zeros(1, 2, 3, 4), torch.empty(1, 2, 3, 4, device="meta")
    memory.clear(salvage=lambda old: [on_cpu, elsewhere])
    spare = [t for tensors in memory.allocation.spares._spare.values() for t in tensors]
    assert len(spare) == 1 and spare[0] is on_cpu


def test_each_forward_tells_the_memory_keepers_budget_so_that_it_reads_the_free_memory_again():
    model = Stack(layers=2).eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker._router.memory.budget = recorder = RecordingBudget()
        model(torch.randn(1, 5, 16))
        model(torch.randn(1, 5, 16))
    assert recorder.told.count(("forward",)) == 2


def test_a_calls_gradient_and_values_go_where_the_call_went():
    memory = MemoryKeeper(_policy(keep_values=True), ["a"], threading.RLock())
    placed = memory.place(torch.zeros(1, 2, 4, 5), beside=torch.empty(1, 2, 3, 4, device="meta"))
    assert placed.device.type == "meta"  # not where the budget would send a call of its own
    here = torch.zeros(1, 2, 4, 5)
    assert memory.place(here, beside=torch.zeros(1)) is here


def test_the_requests_of_a_serving_engine_share_the_captures_budget_which_only_the_capture_reads_again():
    from attention_hooker.keep.router import Router

    router = Router(_policy(), ["a"])
    request = router._requests._make()  # a request's router, made as the engine's first call makes it
    assert request.memory.budget is router.memory.budget
    router.memory.budget._limit[GPU] = 5
    request.memory.begin_forward()  # a request's first call in a forward: the forward's figure stays
    assert router.memory.budget._limit == {GPU: 5}
    router.begin_forward()
    assert router.memory.budget._limit == {}


class _Elsewhere:
    """A tensor on another device, as far as on_one_device can tell (this machine has one device)."""

    def __init__(self, value):
        self.device, self._value, self._base = torch.device("cuda", 0), value, None

    def cpu(self):
        return self._value.clone()


def test_layers_on_two_devices_meet_on_the_cpu_with_their_marks():
    from attention_hooker._map_kinds import kind_of, mark_kind, not_probabilities
    from attention_hooker._tensor import on_one_device

    kind = not_probabilities("a test map", "it is not softmax")
    here, there = torch.rand(1, 2, 3, 3), _Elsewhere(torch.rand(1, 2, 3, 3))
    mark_kind(there, kind)
    met = on_one_device([here, None, there])
    assert met[0] is here and met[1] is None and torch.equal(met[2], there._value)
    assert kind_of(met[2]) == kind
    alike = [torch.rand(2), torch.rand(2)]
    assert all(a is b for a, b in zip(on_one_device(alike), alike))


def test_the_memory_keeper_asks_where_a_call_goes_with_its_bytes_as_stored():
    memory = MemoryKeeper(_policy(dtype=torch.float16), ["a"], threading.RLock())
    asked = []
    memory.budget.target = lambda device, nbytes: asked.append((device, nbytes)) or CPU
    assert not memory.stores_as_computed(torch.float16, GPU, (2, 3, 5, 5))  # the budget said: the CPU
    assert asked == [(GPU, 2 * 3 * 5 * 5 * 2)]
    assert memory.target_device(GPU, 7) == CPU and asked[-1] == (GPU, 7)
    assert memory.stored_bytes((2, 3, 5, 5), torch.float32) == 300  # float16 as stored
    assert MemoryKeeper(_policy(device=None), ["a"], threading.RLock()).target_device(GPU, 10**15) == GPU
    assert MemoryKeeper(_policy(device="cpu"), ["a"], threading.RLock()).target_device(GPU, 1) == CPU


# The copies, through ordinary buffers (the same pieces and slots as on a GPU).
@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), most=st.integers(1, 50))
def test_the_pieces_cover_every_element_once_and_none_is_larger_than_asked(shape, most):
    source = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
    target = torch.zeros(shape, dtype=torch.float64)
    seen = torch.zeros(shape, dtype=torch.int64)
    counts = seen.view(-1)
    for target_piece, source_piece in _pieces(target, source, most):
        assert source_piece.numel() <= max(most, 1) and target_piece.shape == source_piece.shape
        target_piece.copy_(source_piece)
        counts.index_add_(0, source_piece.reshape(-1).long(), torch.ones(source_piece.numel(), dtype=torch.int64))
    assert bool((seen == 1).all()) and torch.equal(target, source)


def test_copies_land_in_strided_targets_converted_with_two_pieces_in_flight():
    torch.manual_seed(2)
    whole = torch.zeros(3, 4, 40, 50, dtype=torch.float16)
    copies = HostCopies(CPU, staging_bytes=256)  # 128 float16 per piece: hundreds of pieces, two in flight
    sources = []
    for first in range(0, 40, 7):  # tiles of rows, each into a non-contiguous part of the target
        tile = torch.rand(3, 4, min(7, 40 - first), 30)
        sources.append((first, tile.clone()))
        copies.copy(whole[:, :, first:first + tile.shape[2], 10:40], tile)
        tile.fill_(-1)  # the next tile overwrites the working tile, as the tiles' scratch does
    copies.finish()
    expected = torch.zeros_like(whole)
    for first, tile in sources:
        expected[:, :, first:first + tile.shape[2], 10:40] = tile.half()
    assert torch.equal(whole, expected)


def test_a_copy_is_complete_only_after_finish_and_shapes_must_agree():
    copies = HostCopies(CPU, staging_bytes=64)
    target = torch.zeros(4, 8)
    copies.copy(target, torch.ones(4, 8))  # 16 floats per piece: the last pieces wait in their slots
    assert not bool((target == 1).all())
    copies.finish()
    assert bool((target == 1).all())
    with pytest.raises(ValueError, match="shapes differ"):
        copies.copy(torch.zeros(2, 3), torch.zeros(3, 2))


def test_copy_to_host_from_the_cpu_is_a_plain_copy():
    source, target = torch.rand(5, 6), torch.zeros(5, 6, dtype=torch.float64)
    assert copy_to_host(target, source) is target and torch.equal(target, source.double())


def test_the_streamed_branch_waits_for_each_piece_before_placing_it(monkeypatch):
    """The CUDA branch of :class:`HostCopies`, run here with stand-ins for streams, events and
    pinned memory (the copies themselves happen at once): every piece's event is recorded before it
    is waited for, each piece is waited for exactly once before the copies are done, the staging
    buffers are marked as used by the side stream, and every element lands in its place."""
    import contextlib

    events = []

    class Event:
        def __init__(self):
            self.recorded = self.waited = False
            events.append(self)

        def record(self, stream=None):
            self.recorded = True

        def synchronize(self):
            assert self.recorded and not self.waited
            self.waited = True

    class Stream:
        def wait_event(self, event):
            assert event.recorded

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    real_empty = torch.empty
    pinned = []

    def empty(*shape, pin_memory=False, device=None, **options):
        pinned.append(pin_memory)
        return real_empty(*shape, **options)

    monkeypatch.setattr(torch, "empty", empty)
    marked = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: marked.append(stream))
    copies = HostCopies(torch.device("cuda", 0), staging_bytes=4 * 40)  # 40 float32 a piece
    whole = torch.zeros(3, 50, 10)
    sources = [torch.rand(3, 10, 8) for _ in range(5)]
    for i, source in enumerate(sources):  # 5 tiles of 240 floats: 6 pieces of 40 each
        copies.copy(whole[:, 10 * i:10 * i + 10, 1:9], source)
    assert len([e for e in events if e.waited]) == 28  # the last two pieces still in flight
    copies.finish()
    pieces = [e for e in events if e.waited]
    assert len(pieces) == 30 and all(e.recorded for e in events)  # 30 pieces, 30 copy events waited for
    assert pinned.count(True) == 2 and len(marked) == 2  # two pinned buffers; two staging buffers marked
    expected = torch.zeros_like(whole)
    for i, source in enumerate(sources):
        expected[:, 10 * i:10 * i + 10, 1:9] = source
    assert torch.equal(whole, expected)


def test_the_calls_of_one_layer_are_weighed_with_those_written_before_them_not_only_committed_ones():
    """The calls of one layer are committed together when it returns (serving requests, pieced
    layers): each is counted as soon as it is written, so the next one's place is judged with it,
    and a call discarded, or let go of by a clear() before its commit, is taken back once."""
    memory = MemoryKeeper(_policy(), ["a"], threading.RLock())
    memory.budget = DeviceBudget(free_memory=lambda device: 1000)  # a share of 500 bytes
    gpu = torch.device("meta")
    counted = []
    memory.budget.kept = lambda device, nbytes: counted.append(nbytes)
    memory.budget.target = lambda device, nbytes: device  # where the calls were computed
    writers = []
    for _ in range(3):  # three requests of one layer, written one after the other, none committed yet
        writer = memory.begin_call("a", (1, 2, 3, 4), torch.float32)
        writer.write(torch.arange(3), torch.empty(1, 2, 3, 4, device=gpu))
        writers.append(writer)
    assert counted == [96, 96, 96], "a written call was not counted before its commit"
    writers[0].commit()
    writers[1].discard()
    assert counted == [96, 96, 96, -96], "a commit counted its call twice, or a discard kept it"
    memory.clear()
    writers[2].commit()  # written before the clear, which let its bytes go: counted again
    assert counted[-1] == 96 and memory._counted == {gpu: 96}



def test_value_vectors_copied_for_a_call_count_when_it_is_written_and_go_back_with_a_discard():
    """With keep_values, a call's copied value vectors (larger than a decode step's weights) are
    weighed with the next calls of the layer as soon as the call is written, not at its commit."""
    memory = MemoryKeeper(_policy(keep_values=True), ["a"], threading.RLock())
    counted = []
    memory.budget.kept = lambda device, nbytes: counted.append(nbytes)
    memory.budget.target = lambda device, nbytes: device
    writer = memory.begin_call("a", (1, 2, 1, 4), torch.float32,
                               NO_SOURCES._replace(value=torch.zeros(1, 2, 4, 16)))  # a CPU value: copied
    writer.write(torch.arange(1), torch.empty(1, 2, 1, 4, device="meta"))
    assert counted == [32, 512], "the value vectors waited for the commit"
    writer.discard()
    assert counted == [32, 512, -32, -512] and memory._counted == {torch.device("meta"): 0}
    assert writer._value == (None, None), "a discarded call still holds its value vectors"
    again = memory.begin_call("a", (1, 2, 1, 4), torch.float32, NO_SOURCES._replace(value=torch.zeros(1, 2, 4, 16)))
    again.write(torch.arange(1), torch.empty(1, 2, 1, 4, device="meta"))
    again.commit()
    assert counted[-2:] == [32, 512] and len(counted) == 6, "a commit counted them twice"
    assert memory.value_vectors["a"][0].device.type == "meta"


def test_calls_held_by_a_layer_when_its_capture_is_closed_are_discarded_not_left_counted():
    """remove_hooks() from inside a running layer closes its scope: the call it held (written, so
    counted) is discarded, not left in the budget until a clear()."""
    import sys

    from attention_hooker.capture.coverage import Coverage
    from attention_hooker.capture.session import CaptureSession
    from attention_hooker.keep.router import Router

    router = Router(_policy(), ["a"])
    router.memory.budget.target = lambda device, nbytes: device
    session = CaptureSession(router, Coverage(["a"]))

    def running_layer():  # a live frame: the layer's call is running
        session.enter(object(), "a", sys._getframe())
        writer = router.begin_call("a", (1, 2, 4, 4), torch.float32)
        writer.write(torch.arange(4), torch.empty(1, 2, 4, 4, device="meta"))
        session.keep("a", writer, (1, 2, 4, 4))
        assert router.memory._counted == {torch.device("meta"): 128}
        session.close(lambda: None)

    running_layer()
    assert dict(router.memory.values) == {} and router.memory._counted == {torch.device("meta"): 0}


def test_calls_after_one_whose_commit_failed_are_discarded(monkeypatch):
    """A layer's calls for three requests (a router each): the first one's keeper fails at its commit;
    the two after it are never committed, and are discarded, not left counted."""
    import sys

    from attention_hooker.capture.coverage import Coverage
    from attention_hooker.capture.session import CaptureSession
    from attention_hooker.keep.router import Router

    routers = [Router(_policy(), ["a"]) for _ in range(3)]
    for router in routers:
        router.memory.budget.target = lambda device, nbytes: device
    session = CaptureSession(routers[0], Coverage(["a"]))
    module, commits = object(), []

    def commit(layer, call, router=None):
        commits.append(call)
        raise RuntimeError("the first call's keeper failed")

    monkeypatch.setattr(session, "_commit", commit)

    def running_layer():
        session.enter(module, "a", sys._getframe())
        for router in routers:
            writer = router.begin_call("a", (1, 2, 4, 4), torch.float32)
            writer.write(torch.arange(4), torch.empty(1, 2, 4, 4, device="meta"))
            session.keep("a", writer, (1, 2, 4, 4), router)
        session.exit(module)

    with pytest.raises(RuntimeError, match="first call"):
        running_layer()
    assert len(commits) == 1
    assert [router.memory._counted for router in routers[1:]] == [{torch.device("meta"): 0}] * 2
