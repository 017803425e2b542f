"""The keeper protocol (keep/protocol.py), the router, and the one Selection (issue 21).

Every keeper of the package (memory, a stream to disk, the reductions) takes calls
through the same four steps; a keeper from outside the package does too; the selection
of heads, rows and keys is resolved and applied in one place whichever route saw the call.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from attention_hooker import HeadStatsAccumulator, KeyReductions, PooledAttention, TransformerAttentionHooker
from attention_hooker.errors import AttentionCaptureWarning, AttentionHookerError
from attention_hooker.keep.memory import MemoryKeeper
from attention_hooker.keep.policy import StoragePolicy
from attention_hooker.keep.protocol import CallWriter, Keeper, check_keeper
from attention_hooker.keep.reduction import Reduction
from attention_hooker.keep.router import Router
from attention_hooker.keep.stream import StreamedCapture
from attention_hooker.selection import Selection

from tiny_models import SdpaAttention, Stack


class Recorder:
    """A keeper from outside the package: it writes down every step it is asked for."""

    def __init__(self):
        self.events = []

    def begin_call(self, layer, shape, dtype, sources=None):
        self.events.append(("begin", layer, tuple(shape), dtype))
        recorder = self

        class Writer:
            def write(self, rows, block):
                assert block.shape[2] == len(rows)
                recorder.events.append(("write", layer, rows.tolist(), block.clone()))

            def commit(self):
                recorder.events.append(("commit", layer))

            def discard(self):
                recorder.events.append(("discard", layer))

        return Writer()

    def begin_forward(self):
        self.events.append(("forward",))

    def end_forward(self, *, returned, reason=None):
        self.events.append(("end", returned))

    def close(self):
        self.events.append(("close",))


def _router(**options) -> Router:
    policy = StoragePolicy.build(device="cpu", dtype=None, heads=None, max_calls=None, keep="first",
                                 keep_grad=False, **options)
    return Router(policy, ["a", "b"])


def test_every_keeper_of_the_package_keeps_the_protocol(tmp_path):
    router = _router()
    stream = StreamedCapture(tmp_path / "c", layer_order=["a"], hooked_layers=1)
    keepers = [router.memory, stream, Reduction(HeadStatsAccumulator()), Reduction(PooledAttention(2)),
               Reduction(KeyReductions(1))]
    for keeper in keepers:
        assert isinstance(keeper, Keeper), type(keeper).__name__
        check_keeper(keeper)
        writer = keeper.begin_call("a", (1, 2, 3, 3), torch.float32)
        assert isinstance(writer, CallWriter), type(writer).__name__
        writer.write(torch.arange(3), torch.full((1, 2, 3, 3), 1 / 3))
        writer.commit()
        writer.discard()  # after commit: nothing left to drop, and no error
    stream.close()
    assert len(router.memory.values["a"]) == 1


def test_an_object_that_lacks_a_step_is_not_taken_as_a_keeper():
    class Half:
        def begin_call(self, layer, shape, dtype, sources=None):
            return None

    with pytest.raises(AttentionHookerError, match=r"Half is not a keeper: it lacks begin_forward, end_forward, close"):
        _router().attach(Half())


def test_a_keeper_from_outside_gets_every_call_in_the_four_steps():
    model = Stack().eval()
    hooker = TransformerAttentionHooker(model, heads=[1], rows=[0, -1])
    recorder = Recorder()
    hooker._router.attach(recorder)  # the seam: the capture only knows the protocol
    x = torch.randn(1, 5, 16)
    with hooker, torch.no_grad():
        model(x)
    begins = [e for e in recorder.events if e[0] == "begin"]
    assert [b[1] for b in begins] == ["blocks.0", "blocks.1"]
    assert all(b[2] == (1, 1, 2, 5) for b in begins)  # the selection applied before any keeper sees it
    assert recorder.events[0] == ("forward",) and recorder.events[-2:] == [("end", True), ("close",)]
    assert [e[0] for e in recorder.events if e[0] in ("commit", "discard")] == ["commit", "commit"]
    assert hooker.values == {}, "memory does not take the calls while another keeper does"
    # The same numbers as memory keeps.
    with TransformerAttentionHooker(model, heads=[1], rows=[0, -1]) as plain, torch.no_grad():
        model(x)
    written = [e[3] for e in recorder.events if e[0] == "write"]
    torch.testing.assert_close(written[0], plain.values["blocks.0"][0])


def test_a_refused_layer_call_is_discarded_by_every_keeper_it_began_in():
    class TwoCalls(nn.Module):  # attention in two pieces: refused as a whole
        def __init__(self):
            super().__init__()
            self.num_heads = 2

        def forward(self, q, k, v):
            return (nn.functional.scaled_dot_product_attention(q, k, v)
                    + nn.functional.scaled_dot_product_attention(q, k, v))

    model = TwoCalls()
    hooker = TransformerAttentionHooker(model, layer_regex="^$")
    recorder = Recorder()
    hooker._router.attach(recorder)
    with hooker, pytest.warns(AttentionCaptureWarning, match="every attention call was refused"):
        q = torch.randn(1, 2, 4, 8)
        model(q, q, q)
    steps = [e[0] for e in recorder.events if e[0] in ("begin", "commit", "discard")]
    assert steps == ["begin", "begin", "discard", "discard"]
    assert hooker.report()[""].status == "refused"


def test_a_call_not_wanted_any_more_is_discarded_not_committed():
    router = Router(StoragePolicy.build(device="cpu", dtype=None, heads=None, max_calls=1, keep="first",
                                        keep_grad=False), ["a"])
    first = router.whole_call("a", torch.full((1, 1, 2, 2), 0.5))
    second = router.whole_call("a", torch.full((1, 1, 2, 2), 0.5))  # both began before either was counted
    router.commit("a", first)
    router.commit("a", second)
    assert len(router.memory.values["a"]) == 1 and router.calls_seen["a"] == 2


def test_memory_takes_a_call_in_blocks_of_rows_as_well_as_whole():
    memory = MemoryKeeper(StoragePolicy(), ["a"], threading.RLock())
    weights = torch.softmax(torch.randn(2, 3, 5, 4), -1)
    writer = memory.begin_call("a", weights.shape, weights.dtype)
    for first in range(0, 5, 2):
        writer.write(torch.arange(first, min(5, first + 2)), weights[:, :, first:first + 2])
    writer.commit()
    torch.testing.assert_close(memory.values["a"][0], weights)


# ----------------------------------------------------------------- Selection
def test_selection_resolves_applies_and_round_trips_through_saved_metadata():
    s = Selection.parse(heads=[2, 0], rows=slice(1, None, 2), keys=[-1])
    kept = s.resolve(4, 5, 6, "layer 'x'")
    assert kept == ((2, 0), (1, 3), (5,))
    weights = torch.rand(1, 4, 5, 6)
    torch.testing.assert_close(s.apply(weights, "layer 'x'"), weights[:, [2, 0]][:, :, [1, 3]][..., [5]])
    assert Selection.from_saved({"selection": s.describe()}) == s
    assert Selection.from_saved({"layer": []}) == Selection() and Selection().apply(weights, "w") is weights
    with pytest.raises(AttentionHookerError, match=r"heads=\[2, 0\] names head\(s\) \[2\], but layer 'y' has 2 heads"):
        s.resolve(2, 5, 6, "layer 'y'")
    with pytest.raises(AttentionHookerError, match=r"rows='first' is not a selection of query rows"):
        Selection.parse(rows="first")


@pytest.mark.parametrize("use_softmax", [False, True])
def test_the_selection_is_the_same_on_the_route_that_computes_it_and_the_one_that_cuts_it(use_softmax):
    """The sdpa route computes only the selected heads, rows and keys; the softmax route
    sees the whole map and the router cuts it: both give Selection.apply of the whole map."""
    torch.manual_seed(0)
    model = SdpaAttention(use_softmax=use_softmax).eval()
    x = torch.randn(2, 7, 16)
    options = dict(heads=[3, 1], rows=[-1, 2], keys=slice(0, 4))
    with TransformerAttentionHooker(model) as whole, torch.no_grad():
        model(x)
    with TransformerAttentionHooker(model, **options) as picked, torch.no_grad():
        model(x)
    expected = Selection.parse(**options).apply(whole.values[""][0], "layer ''")
    torch.testing.assert_close(picked.values[""][0], expected)
    assert picked.selection == Selection.parse(**options).describe()


# ------------------------------------------------ review findings on this change
class _Pieces(nn.Module):
    """Eager attention in two pieces of different lengths: refused as a whole."""

    num_heads = 2

    def forward(self, x):  # x (B, 2, 6, 8)
        first = torch.softmax(x[:, :, :4] @ x.transpose(-2, -1), -1)  # (B, 2, 4, 6)
        second = torch.softmax(x[:, :, 4:] @ x.transpose(-2, -1), -1)  # (B, 2, 2, 6)
        return torch.cat([first, second], 2) @ x


def test_pieces_of_a_refused_call_are_not_checked_against_the_selection():
    """rows=[3] fits the first piece (4 rows), not the second (2): the layer call is refused
    for being made in pieces, as before; the selection is applied only to a call that is kept."""
    model = _Pieces()
    with TransformerAttentionHooker(model, layer_regex="^$", rows=[3]) as hooker, pytest.warns(AttentionCaptureWarning):
        model(torch.randn(1, 2, 6, 8))
    assert hooker.report()[""].status == "refused" and "2 attention calls" in hooker.report()[""].reason


class _PackedDecode(nn.Module):
    """One decode step of grouped-query attention packed as transformers packs it for sdpa."""

    num_heads, num_key_value_groups = 4, 2

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(8, 16), nn.Linear(8, 16)

    def forward(self, token, context):
        b = token.shape[0]
        q = self.q(token).view(b, 4, 1, 4).reshape(b, 2, 2, 4)  # (B, Hk, groups, E)
        k, v = self.kv(context).view(b, -1, 2, 2, 4).permute(2, 0, 3, 1, 4)  # (B, Hk, S, E)
        return nn.functional.scaled_dot_product_attention(q, k, v).reshape(b, 16)


def test_packed_decode_weights_are_rounded_once_into_the_stored_dtype():
    """A bfloat16 model stored as float32: the packed decode rows are computed in float32 and
    stored as they are, not rounded to bfloat16 first."""
    torch.manual_seed(0)
    model = _PackedDecode().to(torch.bfloat16)
    token, context = torch.randn(2, 1, 8).bfloat16(), torch.randn(2, 50, 8).bfloat16()
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex="^$", dtype=torch.float32) as hooker:
        model(token, context)
    (weights,) = hooker.values[""]
    assert weights.dtype == torch.float32 and weights.shape == (2, 4, 1, 50)
    assert (weights.bfloat16().float() - weights).abs().max() > 0, "values between bfloat16 steps are kept"


def test_a_refused_reduce_into_leaves_the_reduction_in_use():
    model = Stack().eval()
    pooled = PooledAttention(2)
    hooker = TransformerAttentionHooker(model).reduce_into(pooled)
    with pytest.raises(AttentionHookerError, match="reduce_into\\(\\) takes"):
        hooker.reduce_into(object())
    with hooker, torch.no_grad():
        model(torch.randn(1, 4, 16))
    assert len(pooled.values["blocks.0"]) == 1 and hooker.values == {}


def test_a_keeper_that_fails_to_begin_a_call_leaves_no_call_begun_in_the_others():
    class Refusing(Recorder):
        def begin_call(self, layer, shape, dtype, sources=None):
            raise AttentionHookerError("no room")

    router, recorder = _router(), Recorder()
    router.attach(recorder)
    router.attach(Refusing())
    with pytest.raises(AttentionHookerError, match="no room"):
        router.begin_call("a", (1, 1, 2, 2), torch.float32)
    assert [e[0] for e in recorder.events] == ["begin", "discard"]
