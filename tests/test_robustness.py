"""A hooker touches nothing outside its own forward: other threads, other models, the
user's data; nested hookers, interrupts, compile, export and jit each have a clear outcome."""

from __future__ import annotations

import copy
import threading
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from attention_hooker import AttentionCaptureWarning, TransformerAttentionHooker
from tiny_models import ExpOverSumAttention, Stack, encoder


ROUTES = {
    "sdpa": lambda: Stack().eval(),
    "softmax": lambda: Stack(use_softmax=True).eval(),
    "mha": lambda: encoder(),
}


def _capture(model, x, **options):
    with torch.no_grad(), TransformerAttentionHooker(model, **options) as hooker:
        model(x)
    return hooker.values


def _no_trace_left(model):
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a hook was left on the model"
    assert torch._C._len_torch_function_stack() == 0, "a function mode was left on"


# ----------------------------------------------------------- 1. other threads, other models
def test_an_unhooked_encoder_in_another_thread_keeps_its_fast_path_while_a_hooker_is_busy(monkeypatch):
    """Finding 1: the fast-path switch was process-wide; now the hooker's thread alone is affected."""
    busy_model = Stack().eval()
    busy_model.blocks[0].pause = threading.Event()
    other = encoder()
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        expected = other(x, src_key_padding_mask=pad)  # the fast path: nested tensors, zeros at padding
    fused_threads = []
    real_kernel = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(
        torch, "_transformer_encoder_layer_fwd",
        lambda *a, **k: fused_threads.append(threading.get_ident()) or real_kernel(*a, **k),
    )
    results = {}

    def capture():
        with torch.no_grad(), TransformerAttentionHooker(busy_model) as hooker:
            busy_model(torch.randn(1, 5, 16))
        results["values"] = hooker.values

    worker = threading.Thread(target=capture)
    worker.start()
    assert busy_model.blocks[0].entered.wait(10), "the hooked forward did not start"
    try:
        assert torch.backends.mha.get_fastpath_enabled(), "the process-wide fast-path flag was switched off"
        with torch.no_grad():
            for _ in range(3):
                out = other(x, src_key_padding_mask=pad)
                torch.testing.assert_close(out, expected, rtol=0, atol=0)
    finally:
        busy_model.blocks[0].pause.set()
        worker.join(10)
    assert fused_threads and set(fused_threads) == {threading.get_ident()}
    assert len(fused_threads) == 3 * 2, "the unhooked encoder (2 layers, 3 forwards) left its fast path"
    assert [len(c) for c in results["values"].values()] == [1, 1]


def test_the_hooked_model_itself_still_skips_the_fast_path_and_the_flag_is_never_set(monkeypatch):
    set_calls = []
    monkeypatch.setattr(torch.backends.mha, "set_fastpath_enabled", lambda value: set_calls.append(value))
    model = encoder()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = model(x)
        values = _capture(model, x)
    assert set_calls == []
    assert [c[0].shape for c in values.values()] == [(2, 4, 5, 5)] * 2
    torch.testing.assert_close(model(x), expected)


# ------------------------------------------------------------------ 2. the user's data
def _kept_by(way, values):
    layer = "blocks.0"
    if way == "dict":
        return dict(values)
    if way == "call_list":
        return values[layer]
    if way == "tensor":
        return values[layer][0]
    if way == "view":
        return values[layer][0][0, 1:]
    if way == "numpy":
        return values[layer][0].numpy()
    if way == "all_call_lists":
        return list(values.values())
    if way == "shallow_copy":
        return copy.copy(values)
    if way == "storage":  # with where the call lies in it (small calls share a chunk of memory)
        return values[layer][0].untyped_storage(), values[layer][0].storage_offset()
    if way == "dlpack":
        return torch.utils.dlpack.to_dlpack(values[layer][0])
    if way == "weakref":
        return weakref.ref(values[layer][0])
    if way == "autograd":  # only the graph holds it: backward needs it unchanged
        weight = torch.ones((), requires_grad=True)
        with torch.enable_grad():
            return (values[layer][0] * weight).sum()
    raise AssertionError(way)


def _read_back(kept, way, like):
    """What the user can read through ``kept`` (``like``: the tensor it was taken from)."""
    if way == "storage":
        storage, offset = kept
        return torch.tensor([], dtype=like.dtype).set_(storage, offset, like.shape)
    if way == "dlpack":
        return torch.utils.dlpack.from_dlpack(kept)
    if way == "weakref":
        return kept  # dereferenced after the first clear(): None if the tensor was gone
    if way == "autograd":
        kept.backward()  # autograd's version check raises if the saved tensor was written
        return None
    return kept


def _snapshot(kept):
    if isinstance(kept, dict):
        return {k: _snapshot(v) for k, v in kept.items()}
    if isinstance(kept, list):
        return [_snapshot(v) for v in kept]
    if isinstance(kept, np.ndarray):
        return kept.copy()
    return kept.clone()


def _assert_same(kept, snapshot):
    if isinstance(kept, dict):
        assert kept.keys() == snapshot.keys()
        for k in kept:
            _assert_same(kept[k], snapshot[k])
    elif isinstance(kept, list):
        assert len(kept) == len(snapshot)
        for a, b in zip(kept, snapshot):
            _assert_same(a, b)
    elif isinstance(kept, np.ndarray):
        np.testing.assert_array_equal(kept, snapshot)
    else:
        torch.testing.assert_close(kept, snapshot, rtol=0, atol=0)


WAYS_TO_KEEP = ["dict", "call_list", "all_call_lists", "shallow_copy", "tensor", "view", "numpy", "storage",
                "dlpack", "weakref", "autograd"]


@pytest.mark.parametrize("way", WAYS_TO_KEEP)
@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["as_computed", "float16"])
@pytest.mark.parametrize("tokens", [5, 300], ids=["small", "pooled_pages"])  # 300: maps on the page pool's pages
def test_clear_never_writes_into_values_the_user_kept(way, dtype, tokens):
    """Finding 2: `kept = dict(h.values); h.clear(); model(x)` overwrote kept."""
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model, dtype=dtype) as hooker:
        model(torch.randn(2, tokens, 16))
        original = hooker.values["blocks.0"][0].clone()
        kept = _kept_by(way, hooker.values)
        snapshot = None if way in ("storage", "dlpack", "weakref", "autograd") else _snapshot(kept)
        for _ in range(3):
            hooker.clear()
            if way == "weakref" and isinstance(kept, weakref.ref):
                kept = kept()  # the user dereferences it after clear(): a strong reference, or None
            model(torch.randn(2, tokens, 16) * 3)
        assert not torch.equal(hooker.values["blocks.0"][0], original)
    if snapshot is not None:
        _assert_same(kept, snapshot)
        return
    got = _read_back(kept, way, original)
    if got is not None:
        torch.testing.assert_close(got, original, rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [5, 300], ids=["small_calls_in_a_chunk", "large_calls_as_spares"])
def test_memory_nobody_can_reach_is_reused_after_clear(tokens):
    """What makes clear() worth calling in a loop: cleared weights nobody holds take the
    next call's weights instead of fresh memory (on the route that writes them itself):
    first calls and large calls as spare buffers, small repeated calls from their chunk
    filled again."""
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(torch.randn(2, tokens, 16))
        model(torch.randn(2, tokens, 16))
        before = {t.data_ptr() for calls in hooker.values.values() for t in calls}
        in_chunks = sum(t.untyped_storage().nbytes() > t.nbytes for calls in hooker.values.values() for t in calls)
        assert in_chunks == (2 if tokens == 5 else 0), "the second calls of small layers lie in a chunk"
        hooker.clear()
        model(torch.randn(2, tokens, 16))
        model(torch.randn(2, tokens, 16))
        after = {t.data_ptr() for calls in hooker.values.values() for t in calls}
        assert after == before
        hooker.clear()
        assert hooker._router.memory.allocation.spares.nbytes > 0
    assert hooker._router.memory.allocation.spares.nbytes == 0, "remove_hooks() frees the spares"
    assert not hooker._router.memory.allocation.arena._chunks, "and the chunks being filled"


def test_clear_leaves_the_values_object_the_user_holds_with_its_calls():
    """Issue 28: ``d = hooker.values; hooker.clear()`` used to empty ``d`` (the live object),
    while the README says a dict of the values you kept still holds its numbers."""
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(torch.randn(1, 4, 16))
        values = hooker.values
        first = values["blocks.1"][0]
        snapshot = first.clone()
        hooker.clear()
        assert list(values) == ["blocks.0", "blocks.1"] and values["blocks.1"] == [first], "the kept dict keeps its calls"
        assert hooker.values == {} and values is not hooker.values
        model(torch.randn(1, 4, 16))
        assert [len(c) for c in values.values()] == [1, 1], "the next calls go to the new dict"
    torch.testing.assert_close(first, snapshot, rtol=0, atol=0)
    assert hooker.values["blocks.1"][0].data_ptr() != first.data_ptr()


# ------------------------------------------------------------------ 3. nested hookers
@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("inner_first", [False, True], ids=["outer_first", "inner_first"])
def test_nested_hookers_each_receive_what_they_receive_alone(route, inner_first):
    """Finding 3: an inner hooker on one MHA layer got nothing (and a misleading warning)."""
    torch.manual_seed(0)
    model = ROUTES[route]()
    x = torch.randn(2, 5, 16)
    inner_module = model.layers[0] if route == "mha" else model.blocks[0]
    alone_outer = _capture(model, x)
    alone_inner = _capture(inner_module, x)
    with torch.no_grad():
        expected = model(x)
    outer, inner = TransformerAttentionHooker(model), TransformerAttentionHooker(inner_module)
    first, second = (inner, outer) if inner_first else (outer, inner)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttentionCaptureWarning)
        with torch.no_grad(), first, second:
            out = model(x)
    exact = route != "mha"  # hooked, nn.TransformerEncoder leaves its fused fast path (ulp differences)
    torch.testing.assert_close(out, expected, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)
    for got, alone in ((outer.values, alone_outer), (inner.values, alone_inner)):
        assert list(got) == list(alone)
        for name in alone:
            assert len(got[name]) == len(alone[name]) == 1
            torch.testing.assert_close(got[name][0], alone[name][0], rtol=0, atol=0)
    _no_trace_left(model)


def test_overlapping_mha_hookers_hand_the_caller_back_what_it_asked_for():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    q = torch.randn(1, 3, 8)
    a, b = TransformerAttentionHooker(mha), TransformerAttentionHooker(mha, heads=[1])
    with torch.no_grad(), a, b:
        _, none = mha(q, q, q, need_weights=False)
        _, averaged = mha(q, q, q)
        b.remove_hooks()  # the other hooker keeps forcing and restoring alone
        _, still_none = mha(q, q, q, need_weights=False)
    assert none is None and still_none is None and averaged.shape == (1, 3, 3)
    assert [w.shape for w in a.values[""]] == [(1, 2, 3, 3)] * 3
    assert [w.shape for w in b.values[""]] == [(1, 1, 3, 3)] * 2
    torch.testing.assert_close(b.values[""][1], a.values[""][1][:, 1:])
    _no_trace_left(mha)


# -------------------------------------------------------------------- 4. interrupts
class _InterruptOnce:
    def __init__(self):
        self.armed = True

    def __call__(self, module, args, output):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt


def test_keyboard_interrupt_on_an_encoder_root_is_undone_by_the_next_forward_and_records_no_other_model():
    """Finding 4: on an nn.TransformerEncoder root, mode and flag stayed after further
    forwards, and an unrelated model's attention was recorded in the meantime."""
    model = encoder()
    interrupt = model.layers[1].linear1.register_forward_hook(_InterruptOnce())
    hooker = TransformerAttentionHooker(model).setup()
    x = torch.randn(1, 4, 16)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    assert [len(c) for c in hooker.values.values()] == [1, 1]
    unrelated = Stack().eval()
    unrelated(torch.randn(1, 4, 16))  # not hooked: must not land in this hooker
    assert [len(c) for c in hooker.values.values()] == [1, 1]
    model(x)
    assert torch._C._len_torch_function_stack() == 0, "the next forward must undo the interrupted state"
    assert [len(c) for c in hooker.values.values()] == [2, 2]
    unrelated(torch.randn(1, 4, 16))
    assert [len(c) for c in hooker.values.values()] == [2, 2]
    hooker.remove_hooks()
    interrupt.remove()
    _no_trace_left(model)


def test_keyboard_interrupt_state_is_undone_by_remove_hooks_alone():
    model = Stack().eval()
    interrupt = model.blocks[0].out.register_forward_hook(_InterruptOnce())
    hooker = TransformerAttentionHooker(model).setup()
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(1, 4, 16))
    assert torch._C._len_torch_function_stack() == 1  # the stale mode: ours, waiting
    Stack().eval()(torch.randn(1, 4, 16))
    assert [len(c) for c in hooker.values.values()] == [1]
    hooker.remove_hooks()
    interrupt.remove()
    _no_trace_left(model)


# ------------------------------------------------------------- 5. torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_model_compiled_and_warmed_up_before_hooking_warns_with_the_fix(fresh_dynamo):
    """Finding 5: it gave {} with no warning."""
    model = Stack().eval()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(1, 5, 16)
    compiled(x)
    with pytest.warns(AttentionCaptureWarning, match=r"torch\.compile.*_orig_mod"):
        with TransformerAttentionHooker(compiled) as hooker:
            compiled(x)
    assert dict(hooker.values) == {}
    _no_trace_left(compiled)
    # The fix the warning names works:
    with TransformerAttentionHooker(compiled._orig_mod) as direct:
        compiled._orig_mod(x)
    assert [len(c) for c in direct.values.values()] == [1, 1]


def test_a_model_compiled_after_hooking_gives_correct_values(fresh_dynamo):
    model = Stack().eval()
    x = torch.randn(1, 5, 16)
    expected = _capture(model, x)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), TransformerAttentionHooker(compiled) as hooker:
        compiled(x)
        compiled(x)
    assert list(hooker.values) == list(expected), "named as in the model, without the compiled wrapper's _orig_mod."
    for name, calls in expected.items():
        got = hooker.values[name]
        assert len(got) == 2 and not any(type(t).__name__ == "FakeTensor" for t in got)
        for t in got:
            torch.testing.assert_close(t, calls[0])
    _no_trace_left(compiled)


def test_a_compiled_model_never_compiles_the_captures_own_handlers(fresh_dynamo):
    """CI failure: dynamo compiled ``on_sdpa`` as a frame of the user's compiled model, guarded on the
    n-th key of a weak cache it reads, and failed to build that guard once a key was collected
    ("list index out of range"). The handlers now always run as plain Python."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from attention_hooker.capture.session import CaptureSession

    model = Stack().eval()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), TransformerAttentionHooker(compiled) as hooker:
        compiled(torch.randn(1, 5, 16))
        compiled(torch.randn(1, 5, 16))
    assert sum(len(calls) for calls in hooker.values.values()) == 4
    for name in ("on_sdpa", "on_softmax", "on_use", "on_mha_forward"):
        function = getattr(CaptureSession, name)
        code = getattr(function, "__wrapped__", function).__code__
        assert _debug_get_cache_entry_list(code) == [], f"{name} was compiled by dynamo"


# ------------------------------------------------------------------ 6. export and jit
def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    model.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("which", ["stack", "encoder", "bert"])
def test_torch_export_of_a_hooked_model_traces_the_model_alone_and_leaves_nothing(which, strict):
    """Finding 6: export failed with an uncaught fake-tensor error (or stored FakeTensors)
    and left export's function mode on torch's stack after remove_hooks()."""
    model = {"stack": lambda: Stack().eval(), "encoder": encoder, "bert": _tiny_bert}[which]()
    if which == "bert":
        inputs = (torch.randint(0, 100, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    else:
        inputs = (torch.randn(2, 5, 16),)
    with torch.no_grad():
        expected = model(*inputs)
    hooker = TransformerAttentionHooker(model).setup()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            program = torch.export.export(model, inputs, strict=strict)
    finally:
        hooker.remove_hooks()
    _no_trace_left(model)
    assert dict(hooker.values) == {}, "nothing is captured while tracing (no FakeTensor is stored)"
    if not strict:
        assert any(issubclass(w.category, AttentionCaptureWarning) and "traced" in str(w.message) for w in caught)
    with torch.no_grad():
        got = program.module()(*inputs)
    if which == "bert":
        got, expected = got[0], expected[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), TransformerAttentionHooker(model) as after:  # hooking still works after export
        model(*inputs)
    assert len(after.values) == 2


def test_jit_trace_of_a_hooked_model_traces_the_model_alone():
    model = Stack().eval()
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        expected = model(x)
    with TransformerAttentionHooker(model) as hooker, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x, check_trace=False)
    _no_trace_left(model)
    assert dict(hooker.values) == {}
    assert any(issubclass(w.category, AttentionCaptureWarning) and "traced" in str(w.message) for w in caught)
    graph = str(traced.inlined_graph)
    assert graph.count("softmax") == 0, "our recomputation must not be in the traced program"
    torch.testing.assert_close(traced(x), expected)


# ------------------------------------------------------------- 7. several threads
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_one_hooker_several_threads_records_every_call_exactly_once(route):
    """Finding 7: calls were recorded 1-3x and modes left on worker threads' stacks."""
    torch.manual_seed(0)
    model = ROUTES[route]()
    n_threads, n_calls = 4, 5
    inputs = {(t, i): torch.randn(1, 3 + t, 16) for t in range(n_threads) for i in range(n_calls)}
    expected = {key: _capture(model, x) for key, x in inputs.items()}
    leftovers, errors = [], []
    barrier = threading.Barrier(n_threads)

    def work(t):
        try:
            barrier.wait(10)
            with torch.no_grad():
                for i in range(n_calls):
                    model(inputs[(t, i)])
            leftovers.append(torch._C._len_torch_function_stack())
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    with TransformerAttentionHooker(model) as hooker:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    assert leftovers == [0] * n_threads, "a mode was left on a worker thread's stack"
    for name in hooker.values:
        got = hooker.values[name]
        assert len(got) == n_threads * n_calls
        unmatched = [e[name][0] for e in expected.values()]
        for tensor in got:  # each expected call exactly once
            match = [i for i, e in enumerate(unmatched) if e.shape == tensor.shape and torch.allclose(e, tensor, atol=1e-6)]
            assert match, f"{name}: a recorded call matches no forward"
            unmatched.pop(match[0])
        assert not unmatched
    _no_trace_left(model)


def test_remove_hooks_while_another_thread_is_inside_a_forward_leaves_nothing_on_either_thread():
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    gate, entered = threading.Event(), threading.Event()

    def pause(module, args):
        entered.set()
        gate.wait(10)

    model[0].register_forward_pre_hook(pause)
    seen = {}

    def work():
        x = torch.randn(1, 3, 8)
        with torch.no_grad():
            h = model[0](x)
            seen["out"] = model[1](h, h, h, need_weights=False)
            seen["stack"] = torch._C._len_torch_function_stack()

    hooker = TransformerAttentionHooker(model, r"^1$").setup()
    worker = threading.Thread(target=work)
    worker.start()
    assert entered.wait(10)
    hooker.remove_hooks()
    assert not hooker.is_setup
    gate.set()
    worker.join(10)
    assert seen["stack"] == 0 and seen["out"][1] is None
    assert not model[1]._forward_hooks and not model[1]._forward_pre_hooks


@pytest.mark.parametrize(
    "use_softmax, where",
    [(False, "before_weights"), (True, "before_weights"), (True, "after_weights")],
    ids=["sdpa", "softmax", "softmax_weights_computed_before_removal"],
)
def test_remove_hooks_while_a_thread_is_inside_a_hooked_module_defers_the_exit_hooks(use_softmax, where):
    model = Stack(use_softmax=use_softmax).eval()
    model.blocks[0].pause = threading.Event()
    model.blocks[0].pause_after_weights = where == "after_weights"
    seen = {}

    def work():
        with torch.no_grad():
            model(torch.randn(1, 4, 16))
        seen["stack"] = torch._C._len_torch_function_stack()

    hooker = TransformerAttentionHooker(model).setup()
    worker = threading.Thread(target=work)
    worker.start()
    assert model.blocks[0].entered.wait(10)
    hooker.remove_hooks()
    assert not hooker.is_setup
    assert model.blocks[0]._forward_hooks, "the exit hook must close the worker's scope"
    model.blocks[0].pause.set()
    worker.join(10)
    assert seen["stack"] == 0, "the worker's mode must be gone when its forward ends"
    assert dict(hooker.values) == {}, "nothing is recorded after remove_hooks()"
    _no_trace_left(model)


def test_after_an_interrupted_forward_the_next_one_still_warns_when_nothing_is_captured():
    model = nn.Sequential(ExpOverSumAttention(16)).eval()
    interrupt = model[0].qk.register_forward_hook(_InterruptOnce())
    hooker = TransformerAttentionHooker(model).setup()
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(1, 4, 16))
    with pytest.warns(AttentionCaptureWarning, match="no attention weights were captured"):
        model(torch.randn(1, 4, 16))
    hooker.remove_hooks()
    interrupt.remove()
    _no_trace_left(model)


def test_after_an_interrupted_forward_the_next_one_records_again():
    model = Stack().eval()
    interrupt = model.blocks[1].register_forward_hook(_InterruptOnce())
    hooker = TransformerAttentionHooker(model, dtype=torch.float16).setup()
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(1, 4, 16))
    model(torch.randn(1, 4, 16))
    assert [len(c) for c in hooker.values.values()] == [2, 2]  # the interrupt came after block 1 had run
    hooker.remove_hooks()
    interrupt.remove()
    _no_trace_left(model)


def test_jit_script_of_a_hooked_model_fails_in_torchscript_and_leaves_nothing_and_script_modules_are_refused():
    from attention_hooker import AttentionHookerError

    model = encoder()
    x = torch.randn(1, 4, 16)
    hooker = TransformerAttentionHooker(model).setup()
    with pytest.raises(RuntimeError):  # TorchScript cannot compile Python hooks
        torch.jit.script(model)
    hooker.remove_hooks()
    _no_trace_left(model)
    scripted = torch.jit.script(model)  # after remove_hooks() it scripts as usual
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
    with pytest.raises(AttentionHookerError, match="TorchScript module .* runs no Python hooks"):
        TransformerAttentionHooker(scripted)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_nested_keep_grad_hookers_each_get_the_weights_and_gradients_they_get_alone(route):
    torch.manual_seed(0)
    model = ROUTES[route]().train()
    inner_module, inner_name, outer_name = (
        (model.layers[0], "self_attn", "layers.0.self_attn") if route == "mha" else (model.blocks[0], "", "blocks.0")
    )
    x = torch.randn(2, 5, 16)

    def run(*hookers):
        model.zero_grad()
        for h in hookers:
            h.setup()
        try:
            model(x).square().sum().backward()
        finally:
            for h in reversed(hookers):
                h.remove_hooks()
        return hookers

    (alone,) = run(TransformerAttentionHooker(model, keep_grad=True))
    outer, inner = run(TransformerAttentionHooker(model, keep_grad=True),
                       TransformerAttentionHooker(inner_module, keep_grad=True))
    for name in alone.values:
        torch.testing.assert_close(outer.values[name][0], alone.values[name][0])
        torch.testing.assert_close(outer.gradients[name][0], alone.gradients[name][0])
    torch.testing.assert_close(inner.values[inner_name][0], alone.values[outer_name][0])
    torch.testing.assert_close(inner.gradients[inner_name][0], alone.gradients[outer_name][0])
    _no_trace_left(model)


@pytest.mark.parametrize("model_kind", ["sdpa", "mha"])
def test_captured_tensors_die_with_the_hooker_without_waiting_for_the_garbage_collector(model_kind):
    """A loop that makes a hooker per input must not hold every capture until gc runs:
    the function mode's references back to its session made a cycle (session -> thread
    state -> mode -> session) that kept the store and its tensors alive (issue 11:
    full capture peaked at 4x what it kept over a few forwards)."""
    import gc

    model = Stack().eval() if model_kind == "sdpa" else nn.TransformerEncoderLayer(16, 2, batch_first=True).eval()
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            model(torch.randn(1, 4, 16))
        refs = [weakref.ref(t) for calls in hooker.values.values() for t in calls]
        assert refs
        del hooker
        assert all(r() is None for r in refs), "captured tensors outlived their hooker"
    finally:
        gc.enable()
