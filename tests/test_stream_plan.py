"""A stream's plan: the bytes it will write, the folder's free space, the disk's measured speed and
the time that speed needs for them (issue 22, part 4: "the plan says its expected time from the
disk's measured speed")."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from torch import nn

from attention_hooker import TransformerAttentionHooker
from attention_hooker.keep import disk_speed
from attention_hooker.keep.disk_speed import StreamPlan, write_speed


@pytest.fixture(autouse=True)
def _fresh_measures(monkeypatch):
    monkeypatch.setattr(disk_speed, "_measured", {})
    monkeypatch.setattr(disk_speed, "PROBE_BYTES", 8 * 2**20)  # two blocks: quick, still past the caches' answer


def _writes(monkeypatch) -> list:
    """The flags of every file the probe opens from now on (unnamed, or named ``.probe``)."""
    opened, original = [], os.open

    def spy(path, flags, *args):
        if str(path).endswith(".probe") or flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            opened.append(flags)
        return original(path, flags, *args)

    monkeypatch.setattr(disk_speed.os, "open", spy)
    return opened


def test_the_speed_is_measured_once_per_disk_bypassing_the_cache_and_leaves_no_file(tmp_path, monkeypatch):
    opened = _writes(monkeypatch)
    speed = write_speed(tmp_path)
    assert speed is not None and speed > 1e6, "a disk that writes under 1 MB/s, or no figure"
    assert len(opened) == 1 and opened[0] & getattr(os, "O_DIRECT", 0) == getattr(os, "O_DIRECT", 0)
    assert list(tmp_path.iterdir()) == [], "the probe file was left behind"
    (tmp_path / "other").mkdir()
    assert write_speed(tmp_path / "other") == speed and len(opened) == 1, "measured again on the same disk"


def test_a_filesystem_that_refuses_direct_writes_is_measured_through_the_cache(tmp_path, monkeypatch):
    opened = _writes(monkeypatch)
    direct = getattr(os, "O_DIRECT", 0)
    original = disk_speed.os.open

    def no_direct(path, flags, *args):
        if direct and flags & direct:
            opened.append(flags)
            raise OSError(errno.EINVAL, "Invalid argument")  # as tmpfs answers O_DIRECT
        return original(path, flags, *args)

    monkeypatch.setattr(disk_speed.os, "open", no_direct)
    assert write_speed(tmp_path) > 0
    assert list(tmp_path.iterdir()) == []


def test_no_figure_where_it_cannot_be_measured(tmp_path, monkeypatch):
    assert write_speed(tmp_path / "missing") is None
    monkeypatch.setattr(disk_speed.shutil, "disk_usage", lambda path: _Usage(0))
    assert write_speed(tmp_path) is None, "the probe would have taken the space the capture needs"
    assert list(tmp_path.iterdir()) == []


class _Usage:
    def __init__(self, free):
        self.free, self.total, self.used = free, 10 * 2**30, 0


def test_a_plan_says_the_bytes_the_free_space_and_the_time_at_the_measured_speed():
    plan = StreamPlan("/data/cap", 8 * 2**30, 100 * 2**30, 2 * 2**30)
    assert plan.seconds == 4.0
    assert plan.describe() == ("streaming about 8.0 GiB to /data/cap (100.0 GiB free; the disk writes 2.0 GiB/s (measured)):"
                               " at least 4.0 s of writing")
    assert StreamPlan("/d", None, 2**30, 2**30).seconds is None
    assert "unknown size until the first call" in StreamPlan("/d", None, 2**30, 2**30).describe()
    assert "could not be measured" in StreamPlan("/d", 2**30, 2**30, None).describe()
    assert "2.0 min" in StreamPlan("/d", 240 * 2**30, 2**40, 2 * 2**30).describe()


def test_a_streams_plan_takes_its_bytes_from_expected_bytes_or_from_its_first_call(tmp_path):
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=16, nhead=4, batch_first=True), num_layers=2)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        stream = hooker.stream_to(tmp_path / "a", expected_bytes=3 * 2**20)
        plan = stream.plan()
        stream.close()
    assert plan.bytes == 3 * 2**20 and plan.write_speed > 0 and plan.seconds == plan.bytes / plan.write_speed
    assert plan.folder == str(tmp_path / "a") and plan.free_bytes > 0
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        stream = hooker.stream_to(tmp_path / "b")
        assert stream.plan().bytes is None
        model(torch.randn(1, 5, 16))
        planned = stream.plan()
        stream.close()
    assert planned.bytes == 2 * (1 * 4 * 5 * 5 * 4), "the first call's bytes x the hooked layers"


def test_a_probe_interrupted_by_ctrl_c_raises_keyboard_interrupt_and_leaves_nothing(tmp_path, monkeypatch):
    # (the review: the buffer's memoryview outlived the interrupt, and closing the mapping raised
    # BufferError instead, which the command line does not read as "interrupted")
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(disk_speed.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_speed(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_measure_is_not_remembered_for_the_disk(tmp_path, monkeypatch):
    usage = disk_speed.shutil.disk_usage
    monkeypatch.setattr(disk_speed.shutil, "disk_usage", lambda path: _Usage(0))
    assert write_speed(tmp_path) is None
    monkeypatch.setattr(disk_speed.shutil, "disk_usage", usage)  # space came back
    assert write_speed(tmp_path) > 0


def test_no_memory_for_the_probe_gives_no_figure_not_an_error(tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(disk_speed.mmap, "mmap", no_memory)
    assert write_speed(tmp_path) is None


def test_the_probe_is_a_file_without_a_name_where_the_system_makes_them_else_a_named_one_removed(tmp_path,
                                                                                              monkeypatch):
    unnamed = getattr(os, "O_TMPFILE", 0)
    if not unnamed:
        pytest.skip("no O_TMPFILE on this system")  # pragma: no cover - Linux has it
    opened = _writes(monkeypatch)
    assert write_speed(tmp_path) > 0 and opened and opened[0] & unnamed == unnamed
    monkeypatch.setattr(disk_speed, "_measured", {})
    original = disk_speed.os.open

    def refuse_unnamed(path, flags, *args):
        if flags & unnamed == unnamed:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return original(path, flags, *args)

    monkeypatch.setattr(disk_speed.os, "open", refuse_unnamed)
    names = []
    unlink = disk_speed.os.unlink
    monkeypatch.setattr(disk_speed.os, "unlink", lambda path: names.append(path) or unlink(path))
    assert write_speed(tmp_path) > 0
    assert names and names[0].endswith(".probe") and list(tmp_path.iterdir()) == []
