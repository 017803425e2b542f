"""Issue 28: captures on disk you can trust. Faults are made real where a test can make
them (a small tmpfs, mounted as root as CI runs; a second process) and injected at the
write call otherwise; every finding of the issue has a test here that failed before."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import torch
from torch import nn

from attention_hooker import AttentionHookerError, TransformerAttentionHooker, load
from attention_hooker.keep import stream_call
from attention_hooker.errors import AttentionCaptureWarning
from tiny_models import Stack

pytest.importorskip("safetensors")


@pytest.fixture
def small_disk(tmp_path):
    """A real small filesystem: ``make(size, inodes)`` mounts a tmpfs and returns its folder."""
    mounted = []

    def make(size: str = "8m", inodes: int = 64):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes}", "tmpfs", str(where)],
                              capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (CI runs as root and can): {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _inputs(n: int, tokens: int = 6):
    torch.manual_seed(1)
    return [torch.randn(1, tokens, 16) for _ in range(n)]


def _in_memory(model, inputs):
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        for x in inputs:
            model(x)
    return hooker.values


def _assert_forwards(loaded, memory, forwards):
    """Call k of every layer is forward ``forwards[k]`` of the in-memory capture, exactly."""
    assert list(loaded.values) == list(memory)
    for name, calls in memory.items():
        got = loaded.values[name]
        assert len(got) == len(forwards), (name, len(got), forwards)
        for call, forward in zip(got, forwards):
            assert torch.equal(call, calls[forward]), (name, forward)


# ------------------------------------------------------------ 1. atomic, honest streaming
def test_inodes_running_out_rolls_the_forward_back_and_the_capture_closes_partial(small_disk):
    """Bytes free but no inode left: the shard of forward 2 cannot be made. The forward raises
    one library error chained to ENOSPC, is rolled back whole, the loop goes on, and the
    capture is 'partial' (before: 'complete', the error a bare message without its cause)."""
    disk = small_disk("8m", inodes=24)
    model, inputs = Stack().eval(), _inputs(5)
    memory = _in_memory(model, inputs)
    hooker = TransformerAttentionHooker(model).setup()
    stream = hooker.stream_to(disk / "c")
    fillers = []
    with torch.no_grad():
        for i, x in enumerate(inputs):
            if i == 2:
                while True:  # take every inode left
                    try:
                        fillers.append(open(disk / f"filler{len(fillers)}", "w"))
                    except OSError as err:
                        assert err.errno == errno.ENOSPC
                        break
                with pytest.raises(AttentionHookerError, match=r"cannot write the capture streamed to .*: "
                                                               r"(writing capture.json|the shard calls-.*) failed: No space left on device \(errno 28\)") as info:
                    model(x)
                assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
                for i_f, handle in enumerate(fillers):
                    handle.close()
                    os.remove(disk / f"filler{i_f}")
                continue
            model(x)
    hooker.remove_hooks()
    assert stream.state == "partial"
    assert not [n for n in os.listdir(disk / "c") if n.endswith(".partial")], "no temporary file is left"
    index = json.loads((disk / "c" / "capture.json").read_text())
    assert index["complete"] is False and index["state"] == "partial"
    assert [f["forward"] for f in index["failures"]] == [2] and "No space left" in index["failures"][0]["reason"]
    with pytest.raises(AttentionHookerError, match=r"is partial: a write failed .*lists 4 forward\(s\) written whole; "
                                                   r"load\(path, partial=True\)"):
        load(disk / "c")
    _assert_forwards(load(disk / "c", partial=True), memory, [0, 1, 3, 4])


def test_a_disk_full_between_two_layers_keeps_the_layers_in_step(small_disk):
    """Large calls (a file each): the disk fills after layer 0 of forward 1 wrote its call,
    and is freed after. Before: layer 0 kept [6] calls and layer 1 [5], call k of layer 1
    coming from forward k+1, and the capture said complete."""
    disk = small_disk("40m", inodes=1000)
    model, inputs = Stack().eval(), _inputs(4, tokens=300)  # (1, 4, 300, 300) float32: 1.4 MB a call
    memory = _in_memory(model, inputs)
    filler = disk / "filler"
    state = {"forward": 0}

    def fill(module, args):
        if state["forward"] == 1:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            with open(filler, "wb") as handle:
                handle.write(b"\0" * (free - 2**19))

    handle = model.blocks[1].register_forward_pre_hook(fill)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.stream_to(disk / "c", shard_bytes=1)
        for i, x in enumerate(inputs):
            state["forward"] = i
            if i == 1:
                with pytest.raises(AttentionHookerError, match="blocks.1|free on"):
                    model(x)
                os.remove(filler)
                continue
            model(x)
    handle.remove()
    loaded = load(disk / "c", partial=True)
    assert [len(c) for c in loaded.values.values()] == [3, 3]
    _assert_forwards(loaded, memory, [0, 2, 3])
    files = [n for n in os.listdir(disk / "c") if n.endswith(".safetensors")]
    assert len(files) == 6, "the call layer 0 wrote for the forward that failed was removed"


def test_a_forward_that_returned_is_on_disk_when_it_returns(tmp_path):
    """Before, small calls waited for a shard shared with later forwards, so a flush failing
    later lost a forward that had returned normally."""
    model, inputs = Stack().eval(), _inputs(3)
    memory = _in_memory(model, inputs)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.stream_to(tmp_path / "c")
        model(inputs[0])
        model(inputs[1])
        _assert_forwards(load(tmp_path / "c", partial=True), memory, [0, 1])
        index = json.loads((tmp_path / "c" / "capture.json").read_text())
        assert index["state"] == "writing" and index["complete"] is False
        with pytest.raises(AttentionHookerError, match="is being written"):
            load(tmp_path / "c")


def test_a_write_error_names_the_folder_the_call_and_the_cause(tmp_path, monkeypatch):
    """EIO while a large call's rows are written (injected at the write call): one library
    error naming the folder, the layer and the rows, chained to the OS error; hooks and the
    function mode are off afterwards, and the capture is partial."""
    model, inputs = Stack().eval(), _inputs(2, tokens=40)
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data, offset)

    monkeypatch.setattr(stream_call.os, "pwrite", failing)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.stream_to(tmp_path / "c", shard_bytes=1)
        with pytest.raises(AttentionHookerError, match=r"streamed to .*/c: writing rows 0-39 of a call of layer "
                                                       r"'blocks.\d' into call-\d+\.safetensors failed: Input/output "
                                                       r"error \(errno 5\)") as info:
            model(inputs[0])
        assert isinstance(info.value.__cause__, OSError)
        assert not torch.overrides._get_current_function_mode_stack(), "the mode is off on this thread"
        model(inputs[1])
    assert load(tmp_path / "c", partial=True).metadata["state"] == "partial"


def test_a_folder_removed_while_streaming_is_a_library_error_at_the_forward_and_at_close(tmp_path):
    import shutil

    model, inputs = Stack().eval(), _inputs(2)
    hooker = TransformerAttentionHooker(model).setup()
    stream = hooker.stream_to(tmp_path / "c")
    with torch.no_grad():
        model(inputs[0])
        shutil.rmtree(tmp_path / "c")
        with pytest.raises(AttentionHookerError, match=r"streamed to .*/c: .* failed: No such file or directory") as info:
            model(inputs[1])
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert not torch.overrides._get_current_function_mode_stack()
    with pytest.raises(AttentionHookerError, match=r"streamed to .*/c: writing capture.json failed"):
        hooker.remove_hooks()
    assert stream.closed and not hooker.is_setup


def test_a_failed_write_with_a_hooker_kept_on_leaves_no_mode_behind(tmp_path, monkeypatch):
    """Before: the function mode stayed on the thread, and an unhooked TransformerEncoderLayer
    then raised AttributeError: 'NoneType' object has no attribute 'layer'."""
    model = Stack().eval()
    hooker = TransformerAttentionHooker(model).setup()
    hooker.stream_to(tmp_path / "c", shard_bytes=1)
    monkeypatch.setattr(stream_call.os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))
    with pytest.raises(AttentionHookerError, match="Read-only"), torch.no_grad():
        model(torch.randn(1, 5, 16))
    assert not torch.overrides._get_current_function_mode_stack()
    other = nn.TransformerEncoderLayer(16, 2, dropout=0.5, batch_first=True).train()
    other(torch.randn(1, 5, 16))  # raised AttributeError before
    hooker.remove_hooks()


def test_an_interrupt_left_mode_does_not_break_an_unrelated_multihead_attention():
    """Issue 21's bug (also reached through issue 28's failed write): after a KeyboardInterrupt
    inside a hooked forward (no ``with``), an unrelated nn.MultiheadAttention with dropout in
    training on that thread raised AttributeError from on_mha_forward."""
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), num_layers=1)
    hooker = TransformerAttentionHooker(model).setup()

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    handle = model.layers[0].register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(1, 4, 16))
    handle.remove()
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True).train()
    x = torch.randn(1, 4, 16)
    out, weights = mha(x, x, x)
    assert out.shape == (1, 4, 16) and weights.shape == (1, 4, 4)
    hooker.remove_hooks()


def test_the_plan_states_its_margin_and_fits_a_small_disk(small_disk):
    """A 4 MiB capture on a 40 MiB disk was refused by a 64 MiB margin the message did not name."""
    disk = small_disk("40m", inodes=100)
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.stream_to(disk / "c", expected_bytes=4 * 2**20)
        model(torch.randn(1, 6, 16))
    assert load(disk / "c").metadata["state"] == "complete"
    with pytest.raises(AttentionHookerError, match=r"writes about 39\.0 MiB, and 4\.0 MiB are kept free for everything "
                                                   r"else; 40\.0 MiB free"):
        TransformerAttentionHooker(model).stream_to(disk / "d", expected_bytes=39 * 2**20)
    assert not os.path.exists(disk / "d" / "capture.json") and not os.path.exists(disk / "d" / "capture.lock")


_KILLED = textwrap.dedent("""
    import sys, torch
    from attention_hooker import TransformerAttentionHooker
    sys.path.insert(0, sys.argv[2])
    from tiny_models import Stack
    torch.manual_seed(0)
    model = Stack().eval()
    torch.manual_seed(1)
    inputs = [torch.randn(1, 6, 16) for _ in range(50)]
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(sys.argv[1]):
        for i, x in enumerate(inputs):
            model(x)
            print(i, flush=True)
            if i == 2:
                sys.stdin.readline()  # killed here
""")


def test_a_writer_killed_leaves_every_forward_that_returned_readable(tmp_path):
    """SIGKILL after forward 2 returned: no close() ran. The capture reads 'writing'; with
    partial=True it gives forwards 0-2 exactly (from capture.log), and the next writer takes
    the dead one's lock over with a warning."""
    torch.manual_seed(0)
    model = Stack().eval()
    memory = _in_memory(model, _inputs(50)[:3])  # the same weights and inputs as the writer's
    writer = subprocess.Popen([sys.executable, "-c", _KILLED, str(tmp_path / "c"), os.path.dirname(__file__)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert [writer.stdout.readline().strip() for _ in range(3)] == ["0", "1", "2"]
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    finally:
        writer.kill()
    with open(tmp_path / "c" / "capture.log", "ab") as log:
        log.write(b'{"unit": 3, "calls": [["blocks.0", "calls-0')  # a line being written when it died
    with pytest.raises(AttentionHookerError, match="is being written, or its writer stopped before closing it"):
        load(tmp_path / "c")
    _assert_forwards(load(tmp_path / "c", partial=True), memory, [0, 1, 2])
    with pytest.warns(AttentionCaptureWarning, match=f"left by pid {writer.pid}"):
        TransformerAttentionHooker(model).stream_to(tmp_path / "c", overwrite=True).close()
    assert load(tmp_path / "c").values == {} and "capture.log" not in os.listdir(tmp_path / "c")


def test_a_damaged_line_in_the_middle_of_the_log_is_refused(tmp_path):
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "c"):
        model(torch.randn(1, 4, 16))
        model(torch.randn(1, 4, 16))
        log = (tmp_path / "c" / "capture.log").read_bytes().split(b"\n")
        (tmp_path / "c" / "capture.log").write_bytes(b"\n".join([log[0][:-5]] + log[1:]))
        with pytest.raises(AttentionHookerError, match=r"capture.json is damaged: line 1 of capture.log is unreadable"):
            load(tmp_path / "c", partial=True)
        (tmp_path / "c" / "capture.log").write_bytes(b"\n".join(log))
        assert [len(c) for c in load(tmp_path / "c", partial=True).values.values()] == [2, 2]


def test_closing_from_another_thread_never_writes_through_a_descriptor_reused_meanwhile(tmp_path, monkeypatch):
    """Review finding: close() closed the descriptor a forward on another thread was about to
    write rows into; the next file the program opened got that number, and the rows."""
    model = Stack().eval()
    hooker = TransformerAttentionHooker(model).setup()
    hooker.stream_to(tmp_path / "c", shard_bytes=1)
    real, inside, go, seen = os.pwrite, threading.Event(), threading.Event(), {}

    def slow(fd, data, offset):
        if threading.current_thread().name == "forward" and not seen:
            seen["fd"] = fd
            inside.set()
            go.wait(10)
        return real(fd, data, offset)

    monkeypatch.setattr(stream_call.os, "pwrite", slow)
    errors = []

    def forward():
        try:
            with torch.no_grad():
                model(torch.randn(1, 64, 16))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=forward, name="forward")
    thread.start()
    assert inside.wait(10)
    hooker.remove_hooks()
    mine = [os.open(tmp_path / f"mine{i}", os.O_RDWR | os.O_CREAT) for i in range(8)]
    go.set()
    thread.join(30)
    try:
        assert not errors, errors
        assert all(os.fstat(fd).st_size == 0 for fd in mine), "rows went into a file of the program's own"
    finally:
        for fd in mine:
            os.close(fd)
    assert not [n for n in os.listdir(tmp_path / "c") if n.endswith(".partial")], "the straggler removed its file"
    assert load(tmp_path / "c").values == {}, "the forward closed under was not listed"


def test_a_closed_writer_never_removes_the_next_writers_file(tmp_path, monkeypatch):
    """Review finding: a straggler call of writer A, committed after A closed and B took the
    folder, removed B's call-00002.safetensors by its final name."""
    model = Stack().eval()
    hooker = TransformerAttentionHooker(model).setup()
    hooker.stream_to(tmp_path / "c", shard_bytes=1)
    real, inside, go = stream_call.StreamedCall._commit, threading.Event(), threading.Event()

    def slow_commit(self):
        if threading.current_thread().name == "a":
            inside.set()
            go.wait(10)
        return real(self)

    monkeypatch.setattr(stream_call.StreamedCall, "_commit", slow_commit)
    thread = threading.Thread(target=lambda: model(torch.randn(1, 8, 16)), name="a")
    with torch.no_grad():
        thread.start()
        assert inside.wait(10)
        hooker.remove_hooks()  # A closes while its call waits to be committed
        with TransformerAttentionHooker(model) as other, other.stream_to(tmp_path / "c", overwrite=True,
                                                                           shard_bytes=1):
            model(torch.randn(1, 8, 16))
        go.set()
        thread.join(30)
    assert [len(c) for c in load(tmp_path / "c").values.values()] == [1, 1], "B's capture is whole"


def test_a_forward_that_began_before_stream_to_is_not_half_listed(tmp_path):
    """Review finding: stream_to() called while another thread was inside a forward listed that
    forward's later calls as lone calls: layers out of step, and 'complete'."""
    model = Stack().eval()
    started, go = threading.Event(), threading.Event()

    def pause(module, args):
        if threading.current_thread().name == "early":
            started.set()
            go.wait(10)

    handle = model.blocks[1].register_forward_pre_hook(pause)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        thread = threading.Thread(target=lambda: model(torch.randn(1, 5, 16)), name="early")
        thread.start()
        assert started.wait(10)
        with hooker.stream_to(tmp_path / "c"):
            go.set()
            thread.join(30)
            model(torch.randn(1, 5, 16))
    handle.remove()
    loaded = load(tmp_path / "c")
    assert [len(c) for c in loaded.values.values()] == [1, 1]
    assert loaded.metadata["forwards"] == [[0], [0]]


def test_a_rolled_back_forward_gives_its_place_of_max_calls_back(tmp_path):
    """Review finding: with max_calls=1, a forward that raised after layer 0 used up layer 0's
    place, and the next forward, which returned, was listed without layer 0."""
    model, inputs = Stack().eval(), _inputs(2)
    memory = _in_memory(model, inputs[1:])
    fail = {"on": True}

    def maybe_fail(module, args):
        if fail["on"]:
            raise RuntimeError("the model failed")

    handle = model.blocks[1].register_forward_pre_hook(maybe_fail)
    with torch.no_grad(), TransformerAttentionHooker(model, max_calls=1) as hooker, hooker.stream_to(tmp_path / "c"):
        with pytest.raises(RuntimeError, match="the model failed"):
            model(inputs[0])
        fail["on"] = False
        model(inputs[1])
    handle.remove()
    _assert_forwards(load(tmp_path / "c"), memory, [0])


def test_a_model_returning_none_has_its_forwards_written(tmp_path):
    """Review finding: a forward that returned None was taken for one that raised, and every
    forward was rolled back from a capture that said 'complete'."""

    class Sink(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.out = Stack(), []

        def forward(self, x):
            self.out.append(self.inner(x))

    model, inputs = Sink().eval(), _inputs(2)
    memory = _in_memory(model, inputs)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "c"):
        for x in inputs:
            model(x)
    _assert_forwards(load(tmp_path / "c"), memory, [0, 1])


def test_forwards_that_raise_mid_call_leave_no_descriptor_nor_reserved_file(tmp_path, monkeypatch):
    """Review finding: each forward raising inside a large call (an OOM-retry loop) kept a
    descriptor and a file of the call's size until close()."""
    from attention_hooker.capture.routes import sdpa

    monkeypatch.setattr(sdpa, "TILE_BYTES", 1)
    model = Stack().eval()
    calls = {"n": 0}
    real = stream_call.StreamedCall.write

    def failing_write(self, rows, block):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise MemoryError("out of memory")
        return real(self, rows, block)

    monkeypatch.setattr(stream_call.StreamedCall, "write", failing_write)
    before = len(os.listdir("/proc/self/fd"))
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "c",
                                                                                      shard_bytes=1):
        for _ in range(10):
            with pytest.raises(MemoryError):
                model(torch.randn(1, 16, 16))
        assert len(os.listdir("/proc/self/fd")) == before + 2, "only the lock and capture.log stay open"
        assert not [n for n in os.listdir(tmp_path / "c") if n.endswith(".partial")]


def test_several_threads_stream_into_one_capture_each_forward_whole(tmp_path):
    model = Stack().eval()
    torch.manual_seed(3)
    inputs = {n: torch.randn(1, n, 16) for n in range(3, 27)}  # each forward its own length: its calls tell it apart
    memory = {n: _in_memory(model, [x]) for n, x in inputs.items()}

    def run(lengths):
        with torch.no_grad():
            for n in lengths:
                model(inputs[n])

    with TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "c"):
        threads = [threading.Thread(target=run, args=(list(inputs)[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    loaded = load(tmp_path / "c")
    assert [len(c) for c in loaded.values.values()] == [24, 24]
    for k in range(24):
        n = loaded.values["blocks.0"][k].shape[-1]
        for name in ("blocks.0", "blocks.1"):
            assert torch.equal(loaded.values[name][k], memory[n][name][0]), (name, k)


# ------------------------------------------------------------------ 2. one writer per folder
_HOLDER = textwrap.dedent("""
    import sys, time, torch
    from attention_hooker import TransformerAttentionHooker
    sys.path.insert(0, sys.argv[2])
    from tiny_models import Stack
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(sys.argv[1]) as stream:
        model(torch.randn(1, 4, 16))
        print("holding", flush=True)
        sys.stdin.readline()
""")


def test_a_second_writer_is_refused_with_who_holds_the_folder(tmp_path):
    """Before: two processes streaming into one folder (overwrite=True, or at the same instant)
    ended with one 'complete' capture mixing both."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "c"), os.path.dirname(__file__)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = sorted(os.listdir(tmp_path / "c"))
        for overwrite in (False, True):
            with pytest.raises(AttentionHookerError, match=rf"is being written by pid {holder.pid} on host .* \(started "
                                                           r".*\): one writer per folder"):
                TransformerAttentionHooker(Stack()).stream_to(tmp_path / "c", overwrite=overwrite)
        assert sorted(os.listdir(tmp_path / "c")) == before, "overwrite=True touched nothing the live writer holds"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
    assert load(tmp_path / "c").metadata["state"] == "complete"
    assert "capture.lock" not in os.listdir(tmp_path / "c"), "the lock goes with its writer"


def test_two_writers_in_one_process_and_a_relabel_after_close(tmp_path):
    model = Stack().eval()
    with TransformerAttentionHooker(model) as hooker:
        stream = hooker.stream_to(tmp_path / "c")
        with pytest.raises(AttentionHookerError, match=f"being written by pid {os.getpid()}"):
            TransformerAttentionHooker(model).stream_to(tmp_path / "c", overwrite=True)
        with torch.no_grad():
            model(torch.randn(1, 4, 16))
    stream.close(tokens=list("abcd"))  # written again under the lock, as the command line does
    assert load(tmp_path / "c").tokens == list("abcd")


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (folder / "capture.lock").write_text(json.dumps({"pid": pid, "host": "h", "started": "2026-01-01T00:00:00"}))
    (folder / f"calls-00001.safetensors.{pid}-abcd0123.partial").write_bytes(b"half")
    model = Stack().eval()
    with pytest.warns(AttentionCaptureWarning, match=rf"took over the lock of .* left by pid {pid} on host h"):
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(folder, overwrite=True):
            model(torch.randn(1, 4, 16))
    assert sorted(os.listdir(folder)) == ["calls-00001.safetensors", "capture.json"]


# ------------------------------------------------------------------ 3. a loader that verifies
def _streamed(tmp_path, *, shard_bytes=1, forwards=1):
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "c",
                                                                                      shard_bytes=shard_bytes):
        for x in _inputs(forwards):
            model(x)
    return tmp_path / "c"


def _edit_index(folder, change):
    index = json.loads((folder / "capture.json").read_text())
    change(index)
    (folder / "capture.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name", ["../other/call-00001.safetensors", "/etc/passwd", "sub/call-00001.safetensors",
                                  "..", "capture.json"])
def test_the_index_names_only_files_inside_the_folder(tmp_path, name):
    folder = _streamed(tmp_path)
    _edit_index(folder, lambda index: index["files"][0][0].__setitem__(0, name))
    with pytest.raises(AttentionHookerError, match=r"capture.json is damaged: it names the file .*expected a shard name"):
        load(folder)


def test_a_link_to_a_file_outside_is_refused(tmp_path):
    folder = _streamed(tmp_path)
    victim = json.loads((folder / "capture.json").read_text())["files"][0][0][0]
    outside = tmp_path / "outside.safetensors"
    os.replace(folder / victim, outside)
    os.symlink(outside, folder / victim)
    with pytest.raises(AttentionHookerError, match=f"{victim} cannot be opened as a plain file"):
        load(folder)


def test_a_fifo_as_a_shard_is_refused_at_once(tmp_path):
    folder = _streamed(tmp_path)
    victim = json.loads((folder / "capture.json").read_text())["files"][0][0][0]
    os.remove(folder / victim)
    os.mkfifo(folder / victim)
    previous = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("load() hung on a FIFO"))
    signal.alarm(10)
    try:
        with pytest.raises(AttentionHookerError, match=f"{victim} is not a regular file"):
            load(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _rewrite_header(path, change):
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (length - len(encoded)) if len(encoded) <= length else b""
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + length:])


@pytest.mark.parametrize("change, message", [
    (lambda t: t.__setitem__("shape", [1, 4, 600, 6]), r"of shape \[1, 4, 600, 6\] and dtype F32 needs 57600 bytes; its offsets give 576"),
    (lambda t: t.__setitem__("data_offsets", [-16, 560]), r"has offsets \[-16, 560\]"),
    (lambda t: t.__setitem__("data_offsets", [0, 10**12]), r"has offsets \[0, 1000000000000\]"),
    (lambda t: t.__setitem__("dtype", "I64"), r"has dtype 'I64'"),
    (lambda t: t.__setitem__("shape", "1,4,6,6"), r"has shape '1,4,6,6'"),
    (lambda t: t.__setitem__("shape", [2**70, 1, 1, 1]), r"has shape \[1180591620717411303424, 1, 1, 1\]; expected"),
], ids=["shape_larger_than_data", "negative_offset", "offset_past_the_end", "dtype", "shape_type", "overflow"])
def test_a_shard_header_that_disagrees_with_its_data_is_refused(tmp_path, change, message):
    """Before: a shape larger than the data, or a negative offset, loaded a tensor made of the
    neighbouring bytes (the header read as floats)."""
    folder = _streamed(tmp_path)
    victim = json.loads((folder / "capture.json").read_text())["files"][0][0][0]
    _rewrite_header(folder / victim, lambda header: change(header["attention"]))
    with pytest.raises(AttentionHookerError, match=rf"{victim} is damaged: tensor 'attention' {message}"):
        load(folder)


def test_a_huge_header_length_is_refused_before_anything_is_allocated(tmp_path):
    folder = _streamed(tmp_path)
    victim = json.loads((folder / "capture.json").read_text())["files"][0][0][0]
    raw = (folder / victim).read_bytes()
    (folder / victim).write_bytes((6 * 2**30).to_bytes(8, "little") + raw[8:])
    with pytest.raises(AttentionHookerError, match=r"its header claims 6442450944 bytes; the file has"):
        load(folder)


@pytest.mark.parametrize("change, message", [
    (lambda i: i.__setitem__("layers", "blocks.0"), r"'layers' is not a list of distinct layer names"),
    (lambda i: i.__setitem__("calls", [5, 1]), r"'calls' says \[5, 1\] but 'files' lists \[1, 1\]"),
    (lambda i: i.__setitem__("layers", ["blocks.0"]), r"'files' has 2 entries for 1 layers"),
    (lambda i: i["files"].__setitem__(0, "x"), r"the calls of layer 'blocks.0' are not \[file, tensor\] pairs"),
    (lambda i: i.__setitem__("state", "done"), r"'state' is 'done'"),
    (lambda i: i.__setitem__("tokens", {"a": 1}), r"'tokens' is not a list of token labels"),
], ids=["layers_string", "counts", "layers_files", "pairs", "state", "tokens"])
def test_an_index_whose_fields_disagree_is_refused(tmp_path, change, message):
    """Before: layers given as a string, or counts that disagree with the files, were accepted
    and layers silently dropped."""
    folder = _streamed(tmp_path)
    _edit_index(folder, change)
    with pytest.raises(AttentionHookerError, match=rf"capture.json is damaged: {message}"):
        load(folder)


@pytest.mark.parametrize("raw", [b"[" * 100000 + b"]" * 100000, b"\xff\xfe"], ids=["deep", "not_utf8"])
def test_an_unreadable_index_is_a_library_error_naming_it(tmp_path, raw):
    """Before: RecursionError / UnicodeDecodeError / OverflowError without the file's name."""
    folder = _streamed(tmp_path)
    (folder / "capture.json").write_bytes(raw)
    with pytest.raises(AttentionHookerError, match=r"capture.json: unreadable capture index"):
        load(folder)


_TRUNCATE = textwrap.dedent("""
    import json, os, sys
    from attention_hooker import load, AttentionHookerError
    folder = sys.argv[1]
    loaded = load(folder)
    name = next(iter(loaded.values))
    victim = json.load(open(os.path.join(folder, "capture.json")))["files"][0][0][0]
    os.truncate(os.path.join(folder, victim), 8)
    try:
        print(float(loaded.values[name][0].sum()))
    except AttentionHookerError as err:
        print("library error:", err)
""")


def test_a_file_cut_under_a_lazy_capture_raises_instead_of_sigbus(tmp_path):
    """Before: touching the call killed the interpreter with SIGBUS."""
    folder = _streamed(tmp_path, shard_bytes=1)
    done = subprocess.run([sys.executable, "-c", _TRUNCATE, str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "library error:" in done.stdout and "changed on disk after the capture was loaded" in done.stdout


def test_a_saved_file_with_wrong_metadata_types_is_a_library_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"0.0": torch.rand(1, 1, 2, 2)}, tmp_path / "a.safetensors",
              metadata={"attention_hooker": json.dumps({"format": "attention-hooker/1", "layers": "x", "calls": 1})})
    with pytest.raises(AttentionHookerError, match="a.safetensors is damaged: its metadata's layers 'x'"):
        load(tmp_path / "a.safetensors")


# ------------------------------------------------------------------ 5. kept values stay kept
def test_reading_values_while_other_threads_record_and_clear_never_raises_nor_warns():
    """Before: 'dictionary changed size during iteration' (129 times in 2 s here), and clear()
    racing a forward on another thread made it warn that a layer 'gave no attention'."""
    model = Stack(layers=6).eval()
    errors, stop = [], threading.Event()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), \
            TransformerAttentionHooker(model) as hooker:
        warnings.simplefilter("always")

        def record():
            while not stop.is_set():
                hooker.clear()
                model(torch.randn(1, 3, 16))

        threads = [threading.Thread(target=record) for _ in range(3)]
        for thread in threads:
            thread.start()
        read, end = 0, time.monotonic() + 2
        try:
            while time.monotonic() < end:
                try:
                    for name in hooker.values:
                        time.sleep(0)  # lets the recording threads run mid-iteration
                        read += hooker.values.get(name) is not None
                    for calls in hooker.values.values():
                        time.sleep(0)
                except RuntimeError as err:
                    errors.append(err)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert read > 0 and not errors, errors[:1]
    assert not [w for w in caught if issubclass(w.category, AttentionCaptureWarning)], caught[:1]


def test_the_calls_of_a_lazy_capture_stay_a_list_and_stay_checked(tmp_path):
    """Review finding: after ``calls.append(t)`` indexing and iterating raised IndexError, and after
    ``insert`` the checks followed the wrong files."""
    folder = _streamed(tmp_path, shard_bytes=1, forwards=2)
    calls = load(folder).values["blocks.0"]
    mine = torch.zeros(1, 4, 6, 6)
    calls.insert(0, mine)
    calls.append(mine)
    calls[1:2] = iter([calls[1]])
    assert len(calls) == 4 and calls[0] is mine and calls[3] is mine and len(list(calls)) == 4
    victim = json.loads((folder / "capture.json").read_text())["files"][0][1][0]  # the second call's file
    os.truncate(folder / victim, 8)
    assert calls[0] is mine and calls[1].shape == mine.shape, "calls put in by hand have no file to check"
    with pytest.raises(AttentionHookerError, match=f"{victim} changed on disk after the capture was loaded"):
        calls[2]


def test_a_lazy_capture_keeps_no_descriptor_per_call(tmp_path):
    """Review finding: each lazily mapped call held a descriptor (10^5 calls ran out of them)."""
    folder = _streamed(tmp_path, shard_bytes=1, forwards=30)  # 60 files, a call each
    before = len(os.listdir("/proc/self/fd"))
    loaded = load(folder)
    assert sum(len(c) for c in loaded.values.values()) == 60
    assert float(loaded.values["blocks.1"][29].sum()) > 0
    assert len(os.listdir("/proc/self/fd")) == before


def test_rank_folders_must_be_real_folders_and_the_worst_state_wins(tmp_path):
    """Review finding: a rank-* link to another capture was merged in (a read outside the folder),
    and a partial rank 1 was reported as complete."""
    job = tmp_path / "job"
    for rank in ("rank-00000", "rank-00001"):
        _streamed(tmp_path / rank)
        (job).mkdir(exist_ok=True)
        os.replace(tmp_path / rank / "c", job / rank)
    _streamed(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere" / "c", job / "rank-00002")
    assert sorted(load(job).metadata["ranks"]) == ["rank-00000", "rank-00001"], "the link was not followed"
    _edit_index(job / "rank-00001", lambda index: index.update(state="partial", complete=False))
    with pytest.raises(AttentionHookerError, match="rank-00001 is partial"):
        load(job)
    assert load(job, partial=True).metadata["state"] == "partial"


def test_attention_values_made_without_their_init_still_read(tmp_path):
    """Review finding: AttentionValues unpickled from the previous release (no _guard attribute) raised
    AttributeError on list(v), v[name] and repr."""
    from attention_hooker import AttentionValues

    values = AttentionValues.__new__(AttentionValues)  # what unpickling an old one gives
    dict.update(values, {"a": [torch.ones(1, 1, 2, 2)]})
    assert list(values) == ["a"] and values["a"][0].shape == (1, 1, 2, 2) and "1 layers" in repr(values)
