"""Issue 21: every private torch or CPython API the library uses lives in _torch_private.py,
and each is pinned here: these fail when a release moves or changes one."""

from __future__ import annotations

import ast
import pathlib
import sys
import weakref

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from attention_hooker import _torch_private as private

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "attention_hooker"


def test_tracing_state_is_seen_only_while_jit_traces():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(private.tracing_state_active())
            return x * 2

    assert not private.tracing_state_active()
    torch.jit.trace(Probe(), torch.ones(2), check_trace=False)
    assert seen == [True] and not private.tracing_state_active()


def test_in_backward_is_true_only_inside_a_backward_pass():
    seen = []
    x = torch.ones(2, requires_grad=True)
    y = (x * 3).sum()
    x.register_hook(lambda grad: seen.append(private.in_backward()))
    assert not private.in_backward()
    y.backward()
    assert seen == [True]


def test_the_in_place_softmax_equals_torch_softmax_and_writes_over_its_input():
    scores = torch.randn(2, 3, 5, 7)
    expected = torch.softmax(scores, -1)
    result = private.softmax_last_dim_into(scores)
    assert result.data_ptr() == scores.data_ptr()
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-7)


def test_a_mode_is_taken_out_from_under_another_and_the_other_stays():
    mode, other = TorchFunctionMode(), TorchFunctionMode()
    mode.__enter__()
    other.__enter__()
    assert private.function_mode_stack()[-2:] == [mode, other]
    private.take_mode_out(mode)
    assert private.function_mode_stack()[-1:] == [other] and mode not in private.function_mode_stack()
    other.__exit__(None, None, None)
    assert private.function_mode_stack() == []


def test_reference_and_use_counts_see_every_holder():
    assert private.REFCOUNTS_SUPPORTED, "memory reuse after clear() needs the counters"
    tensor = torch.empty(4)
    alone = private.refcount(tensor)
    holder = [tensor]
    assert private.refcount(tensor) == alone + 1
    del holder
    assert private.tensor_use_count(tensor) == 1
    capsule = torch.utils.dlpack.to_dlpack(tensor)  # a holder from C++
    assert private.tensor_use_count(tensor) > 1
    del capsule
    storage = tensor.untyped_storage()
    before = private.storage_use_count(storage)
    view = tensor[1:]
    assert private.storage_use_count(storage) == before + 1
    del view
    assert private.storage_use_count(storage) == before and not weakref.getweakrefcount(tensor)


def test_caller_frames_and_their_locals():
    def inner():
        return private.caller_frame(0), private.caller_frame(1)

    def outer():
        marker = "here"  # noqa: F841 - read through the frame
        return inner()

    mine, above = outer()
    assert mine.f_code.co_name == "inner" and above.f_code.co_name == "outer"
    assert private.frame_local(above, "marker") == "here" and private.frame_local(above, "nothing") is None
    assert sys.implementation.name == "cpython", "frames and reference counts are CPython's"


_PRIVATE = ("_C", "_getframe", "getrefcount", "f_locals", "_use_count", "_cdata", "_get_current_function_mode_stack")


def test_nothing_else_in_the_package_touches_a_private_api():
    """The one place rule: a private torch or CPython name appears only in _torch_private.py."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_torch_private.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in _PRIVATE:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "aten":
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} aten.{node.attr}")
    assert not found, found


def test_no_function_modes_hides_calls_from_every_mode_and_ends_with_its_block():
    seen = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 3)
    with Watch():
        with private.no_function_modes():
            torch.softmax(x, -1)
        assert seen == []
        torch.softmax(x, -1)
    assert torch.softmax in seen
