"""Issue 28, item 6: the folder loader fuzzed over its index and shard headers.

Whatever the index and the headers say (types, counts, offsets, shapes, names), ``load``
gives a library error or exactly the data written, never another exception, a hang, a
tensor made of other bytes, or a read outside the folder."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker, load
from tiny_models import Stack

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

pytest.importorskip("safetensors")

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=12), lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_NAMES = st.sampled_from(["../outside.safetensors", "../call-00001.safetensors", "../calls-00002.safetensors", "/etc/passwd", "call-00001.safetensors", "calls-00002.safetensors",
                          "capture.json", "", ".", "sub/x", "call-1.safetensors", "secret.safetensors"]) | st.text(max_size=20)
_INT = st.integers(-2**40, 2**40) | st.sampled_from([0, 1, 4, 6, 96, 576, 2**63])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A real streamed capture (two forwards, small shards and files of their own), its
    calls, and a file outside it that must never be read."""
    root = tmp_path_factory.mktemp("fuzz")
    model = Stack().eval()
    torch.manual_seed(0)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        with hooker.stream_to(root / "c", shard_bytes=400):
            model(torch.randn(1, 6, 16))
            model(torch.randn(1, 12, 16))
    loaded = load(root / "c", lazy=False)
    from safetensors.torch import load_file, save_file

    for name in os.listdir(root / "c"):  # same names and shapes as inside, other bytes: a read outside shows
        if name.endswith(".safetensors"):
            save_file({k: torch.full_like(v, 7.0) for k, v in load_file(root / "c" / name).items()}, root / name)
    (root / "outside.safetensors").write_bytes((root / sorted(os.listdir(root / "c"))[0]).read_bytes())
    return root, {name: [t.clone() for t in calls] for name, calls in loaded.values.items()}


def _fresh(root, case):
    folder = root / f"case{case}"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(root / "c", folder)
    return folder


def _check(folder, written):
    """A library error, or exactly the data written (call k of a layer is one of the calls written)."""
    previous = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("load() hung"))
    signal.alarm(20)
    everything = [t for calls in written.values() for t in calls]
    try:
        for lazy in (False, True):
            try:
                loaded = load(folder, partial=True, lazy=lazy)
            except AttentionHookerError:
                continue
            for calls in loaded.values.values():
                for tensor in calls:
                    assert any(tensor.shape == t.shape and torch.equal(tensor, t) for t in everything), \
                        "a tensor of other bytes"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _edit_header(folder, which: int, change, length=None) -> None:
    """``change(header, tensor)`` on one tensor of one file's header (both picked by ``which``), the
    header written back with its true length, or ``length`` where given."""
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    path = folder / files[which % len(files)]
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    names = sorted(k for k in header if k != "__metadata__")
    change(header, names[which % len(names)])
    encoded = json.dumps(header).encode()
    claimed = len(encoded) if length is None else length % 2**64
    path.write_bytes(claimed.to_bytes(8, "little") + encoded + raw[8 + size:])


_SETTINGS = settings(max_examples=400, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_SETTINGS
@given(field=st.sampled_from(["layers", "files", "calls", "forwards", "state", "tokens", "format", "complete",
                              "layer_order", "log"]),
       value=_JSON, writing=st.booleans())
def test_any_index_field_gives_an_error_or_the_data(pristine, field, value, writing):
    """Also of a capture being written, whose log is replayed onto the index."""
    root, written = pristine
    folder = _fresh(root, "field")
    index = json.loads((folder / "capture.json").read_text())
    if writing:
        index.update(state="writing", log="capture.log")
        (folder / "capture.log").write_text(json.dumps({"unit": 9, "calls": [[index["layers"][0], *index["files"][0][0]]]})
                                            + "\n")
    index[field] = value
    (folder / "capture.json").write_text(json.dumps(index))
    _check(folder, written)


@_SETTINGS
@given(layer=st.integers(0, 1), call=st.integers(0, 1), name=_NAMES, tensor=st.text(max_size=10) | st.just("attention"))
def test_any_file_name_in_the_index_stays_inside_the_folder(pristine, layer, call, name, tensor):
    root, written = pristine
    folder = _fresh(root, "name")
    index = json.loads((folder / "capture.json").read_text())
    index["files"][layer][call] = [name, tensor]
    (folder / "capture.json").write_text(json.dumps(index))
    _check(folder, written)


@_SETTINGS
@given(which=st.integers(0, 10), key=st.sampled_from(["dtype", "shape", "data_offsets", None]),
       value=_JSON | st.lists(_INT, max_size=5), length=st.none() | _INT)
def test_any_shard_header_gives_an_error_or_the_data(pristine, which, key, value, length):
    root, written = pristine
    folder = _fresh(root, "header")
    def change(header, tensor):
        if key is None:
            header[tensor] = value
        else:
            header[tensor][key] = value

    _edit_header(folder, which, change, length)
    _check(folder, written)


@_SETTINGS
@given(lines=st.lists(st.binary(max_size=40) | _JSON.map(lambda v: json.dumps(v).encode())
                      | st.builds(lambda u, c: json.dumps({"unit": u, "calls": c}).encode(), _INT,
                                  st.lists(st.lists(_NAMES, min_size=3, max_size=3), max_size=3)),
                      max_size=4),
       keep=st.integers(0, 4), ending=st.booleans())
def test_any_log_of_a_capture_being_written_gives_an_error_or_the_data(pristine, lines, keep, ending):
    """A capture whose writer stopped: the index lists some calls, ``capture.log`` the rest."""
    root, written = pristine
    folder = _fresh(root, "log")
    index = json.loads((folder / "capture.json").read_text())
    real = [json.dumps({"unit": u, "calls": [[layer, *index["files"][i][u]] for i, layer in enumerate(index["layers"])]})
            .encode() for u in range(2)]
    index.update(state="writing", complete=False, log="capture.log", layers=[], files=[], forwards=[], calls=[])
    (folder / "capture.json").write_text(json.dumps(index))
    body = b"\n".join(real[:keep] + [line.replace(b"\n", b" ") for line in lines])
    (folder / "capture.log").write_bytes(body + (b"\n" if ending else b""))
    _check(folder, written)


@_SETTINGS
@given(which=st.integers(0, 10), shape=st.lists(st.integers(0, 2**66) | st.sampled_from([0, 1, 2**62, 2**64]),
                                                max_size=70),
       code=st.sampled_from(["F32", "F16", "BF16", "F64"]))
def test_a_shape_that_agrees_with_its_offsets_but_not_with_numpy_gives_an_error_or_the_data(pristine, which, shape,
                                                                                             code):
    """Shape and offsets changed together, so that only the shape itself can be wrong."""
    root, written = pristine
    folder = _fresh(root, "shape")
    nbytes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}[code]
    for n in shape:
        nbytes *= n

    def change(header, tensor):
        begin = header[tensor]["data_offsets"][0]
        header[tensor].update(dtype=code, shape=shape, data_offsets=[begin, begin + nbytes])

    _edit_header(folder, which, change)
    _check(folder, written)
