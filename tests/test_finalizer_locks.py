"""A hooker that nobody can reach, in a reference cycle with its hooks on, is finalized by the
garbage collector wherever a collection starts: also inside code of ours that holds a lock its
take-off needs. Each case forces the collection there (as an allocation under the lock would) and
must finish; inline, the take-off waited for its own thread forever. Each runs in a process of
its own, so that a hang fails by a timeout and leaves no lock held in this one."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from attention_hooker import TransformerAttentionHooker
from attention_hooker.capture import finalizer

_HARNESS = '''
import gc, sys, tempfile, weakref, torch
from torch import nn
from attention_hooker import TransformerAttentionHooker

class CollectInside:
    """A lock that runs one collection while it is held (the first time ``when()`` is true)."""
    def __init__(self, real, when=lambda: True):
        self._real, self._when, self.fired = real, when, False
    def acquire(self, *args, **kwargs):
        return self._real.acquire(*args, **kwargs)
    def release(self):
        self._real.release()
    def __enter__(self):
        self._real.acquire()
        if not self.fired and self._when():
            self.fired = True
            gc.collect()
        return self
    def __exit__(self, *exc):
        self._real.release()

def garbage_hooker(model, **options):
    """A set-up hooker that nobody can reach but a cycle of its own."""
    hooker = TransformerAttentionHooker(model, **options).setup()
    hooker.me = hooker
    return hooker, weakref.ref(hooker)

gc.disable()  # only the forced collection runs
torch.manual_seed(0)
model = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=16, nhead=4, batch_first=True), num_layers=1).eval()
x = torch.randn(1, 5, 16)
'''

_CASES = {
    # a notebook cell run again: the new hooker's setup subscribes to the MHA route under its lock
    "routes_lock": '''
from attention_hooker.capture.routes import mha
old, ref = garbage_hooker(model)
del old
mha._ROUTES_LOCK = CollectInside(mha._ROUTES_LOCK)
new = TransformerAttentionHooker(model).setup()
with torch.no_grad():
    model(x)
assert ref() is None and mha._ROUTES_LOCK.fired
assert [len(calls) for calls in new.values.values()] == [1], "the new hooker lost its route"
''',
    # the hooker's own forward, copying a call (another dtype) into its arena under the arena's lock
    "arena_lock": '''
hooker, ref = garbage_hooker(model, dtype=torch.float16)
with torch.no_grad():
    model(x)
arena = hooker._router.memory.allocation.arena
del hooker
arena._lock = CollectInside(arena._lock)
with torch.no_grad():
    model(x)
assert ref() is None and arena._lock.fired
''',
    # the sdpa route's buffer takes a spare under the spares' lock
    "spares_lock": '''
hooker, ref = garbage_hooker(model)
memory = hooker._router.memory
spares = memory.allocation.spares
buffer = memory.buffer(hooker.hooked_layers[0])
del hooker
spares._lock = CollectInside(spares._lock)
buffer((1, 4, 5, 5), torch.float32, torch.device("cpu"))
assert ref() is None and spares._lock.fired
''',
    # the user closes a stream: its router detaches it under the requests' lock
    "requests_lock": '''
hooker, ref = garbage_hooker(model)
stream = hooker.stream_to(tempfile.mkdtemp())
requests = hooker._router._requests
del hooker
requests._lock = CollectInside(requests._lock)
stream.close()
assert ref() is None and requests._lock.fired
''',
    # another thread is inside a forward of the hooker while this one switches the capture off
    "session_lock": '''
hooker, ref = garbage_hooker(model)
session = hooker._session
del hooker
session._busy.add(-1)  # another thread inside a hooked forward meanwhile
session._lock = CollectInside(session._lock, when=lambda: sys._getframe(2).f_code.co_name == "_switch_off")
with torch.no_grad():
    model(x)
assert ref() is None and session._lock.fired
''',
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_a_hooker_collected_under_one_of_our_locks_is_taken_off_without_waiting_for_itself(case):
    script = _HARNESS + textwrap.dedent(_CASES[case]) + "\nprint('finished')\n"
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case}: the finalizer's take-off waited for a lock its own thread held (deadlock)")
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-3000:]


def _hooked_model():
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=16, nhead=4, batch_first=True), num_layers=1)


def _hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_an_unreachable_hooker_is_taken_off_before_its_finalizer_returns():
    model = _hooked_model()
    before = _hooks_on(model)
    hooker = TransformerAttentionHooker(model).setup()
    hooker.me = hooker  # a cycle: only the collector finds it
    assert _hooks_on(model) > before
    del hooker
    import gc

    gc.collect()
    assert _hooks_on(model) == before, "the hooks were still on when the collection returned"


def _collecting_here(monkeypatch) -> None:
    """From now on, finalizers believe a garbage collection runs on this thread."""
    monkeypatch.setattr(finalizer, "_collecting_here", lambda: True)
    monkeypatch.setattr(finalizer, "_HELD_UP", [])  # not this test process's exit


def test_without_a_thread_to_be_had_the_take_off_runs_inline(monkeypatch):
    model = _hooked_model()
    before = _hooks_on(model)
    hooker = TransformerAttentionHooker(model).setup()

    def no_thread(*args):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(finalizer, "_start_thread", no_thread)
    _collecting_here(monkeypatch)
    del hooker
    assert _hooks_on(model) == before


def test_a_take_off_held_up_by_a_lock_lets_the_collection_go_on_after_the_wait_and_ends_later(monkeypatch):
    import threading

    monkeypatch.setattr(finalizer, "TAKE_OFF_WAIT", 0.2)
    _collecting_here(monkeypatch)
    held, ended, threads = threading.Lock(), threading.Event(), []

    class Hooks:
        def remove(self, close):
            threads.append(threading.get_ident())
            with held:
                close()

    class Session:
        def close(self):
            pass

    class Router:
        def close(self):
            ended.set()

    with held:  # what the collected hooker's take-off needs, held by the thread that collects it
        finalizer.finalize_take_off(Hooks(), Session(), Router())  # returns after the wait instead of never
        assert not ended.is_set()
    assert ended.wait(5), "the take-off did not finish once the lock was let go"
    assert threads != [threading.get_ident()]


def test_a_hooker_dropped_by_its_last_reference_is_taken_off_on_its_own_thread_after_an_interrupted_forward():
    """The notebook case: a forward stopped by Ctrl-C (its closing hooks never ran) leaves its scope and
    the capture's function mode on this thread; rebinding the name must take both off, here and now."""
    from tiny_models import Stack

    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(1, 4, 16)
    modes = torch._C._len_torch_function_stack()
    before = _hooks_on(model)
    hooker = TransformerAttentionHooker(model).setup()
    session = hooker._session
    fire = [True]

    def interrupt(module, args):
        if fire[0]:
            fire[0] = False
            raise KeyboardInterrupt

    handle = model.blocks[0].out.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(x)
    handle.remove()
    assert torch._C._len_torch_function_stack() == modes + 1 and session._busy
    hooker = None  # noqa: F841 - the name rebound: the last reference goes
    assert _hooks_on(model) == before, "hooks left on the model"
    assert torch._C._len_torch_function_stack() == modes, "the capture's function mode left on this thread"
    assert not session._busy and session.closed


_SLOW_EXIT = """
import gc, json, sys, time, torch
sys.path.insert(0, {tests!r})
from tiny_models import Stack
from attention_hooker import TransformerAttentionHooker
from attention_hooker.capture import finalizer
from attention_hooker.keep import stream

finalizer.TAKE_OFF_WAIT = 0.2
flush = stream.StreamedCapture._flush_pending
def slow(self):  # a slow disk: the last shard takes longer than the collection waits
    time.sleep(1.5)
    return flush(self)
stream.StreamedCapture._flush_pending = slow
gc.disable()
model = Stack().eval()
hooker = TransformerAttentionHooker(model).setup()
hooker.me = hooker  # only the collector finds it
hooker.stream_to({folder!r}, overwrite=True)
with torch.no_grad():
    model(torch.randn(1, 4, 16))
del hooker
start = time.perf_counter()
gc.collect()
print("waited", round(time.perf_counter() - start, 2))
"""


def test_a_take_off_still_held_up_at_exit_finishes_its_stream_before_the_process_ends(tmp_path):
    import json
    from pathlib import Path

    folder = tmp_path / "capture"
    script = _SLOW_EXIT.format(tests=str(Path(__file__).parent), folder=str(folder))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) < 1.2, "the collection waited for the whole take-off"
    manifest = json.loads((folder / "capture.json").read_text())
    assert manifest["complete"] is True and not (folder / "capture.lock").exists()


def test_the_collection_watch_comes_first_and_reads_a_skipped_stop_as_over():
    """CPython skips the gc callback after one that removes itself during a collection: ours is first,
    and a "stop" that never reached it still reads as over (the count of collections moved on)."""
    import gc

    def another_librarys(phase, info):
        pass

    gc.callbacks.insert(0, another_librarys)  # put first after ours was (hypothesis does)
    try:
        TransformerAttentionHooker(_hooked_model()).setup().remove_hooks()
        assert gc.callbacks[0] is finalizer._on_collection and gc.callbacks.count(finalizer._on_collection) == 1
    finally:
        gc.callbacks.remove(another_librarys)
    seen = []

    def one_shot(phase, info):
        seen.append(phase)
        if phase == "stop":
            gc.callbacks.remove(one_shot)

    watch = gc.callbacks.pop(0)
    gc.callbacks[:0] = [one_shot, watch]  # another library's one-shot callback before ours
    try:
        gc.collect()  # our "stop" is skipped: the one-shot removed itself just before it
        assert seen == ["start", "stop"] and finalizer._COLLECTING[0] is not None
        assert not finalizer._collecting_here()
    finally:
        if one_shot in gc.callbacks:
            gc.callbacks.remove(one_shot)
        finalizer._COLLECTING[0] = None


def test_a_ctrl_c_during_the_collections_wait_reaches_the_main_thread_and_the_exit_still_waits(monkeypatch):
    import _thread
    import threading

    _collecting_here(monkeypatch)
    passed_on, release = [], threading.Event()
    monkeypatch.setattr(finalizer, "_interrupt_main", lambda: passed_on.append(True))

    class Hooks:
        def remove(self, close):
            _thread.interrupt_main()  # Ctrl-C while the collection waits for this take-off
            release.wait(5)

    class Nothing:
        def close(self):
            pass

    assert threading.current_thread() is threading.main_thread()
    finalizer.finalize_take_off(Hooks(), Nothing(), Nothing())
    assert passed_on == [True], "the interrupt was swallowed by the finalizer"
    assert len(finalizer._HELD_UP) == 1, "the exit will not wait for the take-off"
    release.set()


def test_the_exit_waits_for_every_held_up_take_off_within_one_deadline(monkeypatch):
    import _thread
    import time

    held = []
    for _ in range(3):
        lock = _thread.allocate_lock()
        lock.acquire()
        held.append(lock)
    monkeypatch.setattr(finalizer, "_HELD_UP", list(held))
    monkeypatch.setattr(finalizer, "_AT_EXIT_WAIT", 0.3)
    start = time.monotonic()
    finalizer._wait_at_exit()
    assert time.monotonic() - start < 0.6 and not finalizer._HELD_UP


def test_a_forked_child_waits_for_no_take_off_of_its_parent():
    import _thread
    import os

    lock = _thread.allocate_lock()  # a take-off held up in the parent: its thread is not in the child
    lock.acquire()
    finalizer._HELD_UP.append(lock)
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if not finalizer._HELD_UP else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        finalizer._HELD_UP.remove(lock)
