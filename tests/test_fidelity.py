"""Exact weights or a named refusal, never a plausible tensor with another meaning (issue 9)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attention_hooker import AttentionCaptureWarning, TransformerAttentionHooker
from tiny_models import ExpOverSumAttention, SdpaAttention

transformers = pytest.importorskip("transformers")


def _eager_reference(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_attentions=True)


def test_bmm_style_attention_on_batch_times_heads_is_captured_per_head_xglm():
    """XGLM's eager attention is a softmax over (batch * heads, query, key): nothing was
    captured; the module declares its head count, so the rows are (batch, heads, query, key)."""
    config = transformers.XGLMConfig(num_layers=2, attention_heads=4, d_model=32, ffn_dim=64, vocab_size=100,
                                     max_position_embeddings=64, pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.XGLMModel(config).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    reference = _eager_reference(model, dict(input_ids=ids, attention_mask=mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttentionCaptureWarning)
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            model(input_ids=ids, attention_mask=mask)
    calls = list(hooker.values.values())
    assert len(calls) == len(reference.attentions) == 2
    for (got,), expected in zip(calls, reference.attentions):
        assert got.shape == expected.shape == (2, 4, 7, 7)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert hooker.report().missing == []


@pytest.mark.parametrize("tokens", [16, 4])
def test_longformer_local_softmax_is_never_stored_as_heads(tokens):
    """Longformer's local softmax is (batch, seq, heads, window): it was stored as if it
    were (batch, heads, query, key) (with 4 tokens for 4 heads the band (2, 4, 4, 5) matched
    the heads by shape), then refused. Its band is now placed at its keys (issue 24,
    tests/test_longformer.py checks the values): what is stored is (batch, heads, tokens, tokens)."""
    config = transformers.LongformerConfig(num_hidden_layers=1, num_attention_heads=4, hidden_size=32,
                                           intermediate_size=64, vocab_size=100, attention_window=4,
                                           max_position_embeddings=64, pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.LongformerModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(3, 100, (2, tokens))
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(input_ids=ids)
    ((got,),) = hooker.values.values()
    assert got.shape == (2, 4, tokens, tokens)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, tokens))
    near = (torch.arange(tokens)[:, None] - torch.arange(tokens)[None, :]).abs() <= 2
    assert (got[..., ~near] == 0).all(), "keys outside the window are exact zeros"
    assert hooker.report().missing == []


def test_layers_that_ran_without_capture_are_named_once_even_when_others_captured():
    """Issue 9: when other layers of the same model captured, no warning named the missing ones."""
    model = nn.Sequential(SdpaAttention(8, 2), ExpOverSumAttention(8), SdpaAttention(8, 2)).eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        with pytest.warns(AttentionCaptureWarning, match=r"1 of the 3 hooked layers of Sequential that ran gave no attention: 1\b"):
            model(torch.randn(1, 5, 8))
        with warnings.catch_warnings():
            warnings.simplefilter("error", AttentionCaptureWarning)
            model(torch.randn(1, 5, 8))  # once per hooker, not per call
    report = hooker.report()
    assert report.missing == ["1"]
    assert [report[n].status for n in ("0", "1", "2")] == ["captured", "nothing captured", "captured"]
    assert [report[n].runs for n in ("0", "1", "2")] == [2, 2, 2]
    assert repr(report) == "CoverageReport(3 layers: 2 captured, 1 nothing captured)"
    hooker.clear()
    assert hooker.report().missing == []


class _FoldedSdpaAttention(SdpaAttention):
    def forward(self, x):  # heads folded into the batch: (B * H, T, E) given to the kernel as 3-D (timm's SAM)
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4).reshape(3, b * 2, t, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v).view(b, 2, t, 4).transpose(1, 2).reshape(b, t, 8)


@pytest.mark.parametrize("keep_grad", [False, True])
def test_an_sdpa_call_with_heads_folded_into_the_batch_of_one_input_is_unfolded(keep_grad):
    """A 3-D query (heads, T, E) of one input, the declared heads folded into its batch of 1,
    is (1, heads, T, T) (as a 3-D softmax is): it was refused ("6 query heads, while the layer
    declares 2"). With keep_grad, the gradient is the one a loss gives an eager map of the same
    weights."""
    model = _FoldedSdpaAttention(8, 2).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        expected = model(x)
    q, k, v = model.qkv(x).view(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)  # (B, H, T, E) each
    oracle = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)  # (B, H, T, T)
    oracle.retain_grad()
    (oracle @ v).transpose(1, 2).reshape(1, 5, 8).pow(2).sum().backward()
    with torch.set_grad_enabled(keep_grad), TransformerAttentionHooker(model, keep_grad=keep_grad) as hooker:
        out = model(x)
        if keep_grad:
            out.pow(2).sum().backward()
    torch.testing.assert_close(out.detach(), expected, atol=0, rtol=0)
    assert hooker.report().missing == []
    ((got,),) = hooker.values.values()
    torch.testing.assert_close(got.detach(), oracle.detach(), atol=1e-6, rtol=1e-5)
    if keep_grad:
        ((grad,),) = hooker.gradients.values()
        torch.testing.assert_close(grad, oracle.grad, atol=1e-5, rtol=1e-4)


class _HeadMajorSdpaAttention(SdpaAttention):
    def forward(self, x):  # heads folded head-major: (H * B, T, E), the same shape as batch-major
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 3, 0, 1, 4).reshape(3, 2 * b, t, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v).view(2, b, t, 4).permute(1, 2, 0, 3).reshape(b, t, 8)


@pytest.mark.parametrize("module", [_FoldedSdpaAttention, _HeadMajorSdpaAttention], ids=["batch-major", "head-major"])
def test_an_sdpa_call_folding_several_inputs_and_heads_is_refused_unless_the_module_is_known_to_fold_batch_major(
        module):
    """(batch * heads, T, E) and (heads * batch, T, E) have one shape: the head-major fold was
    unfolded batch-major and stored with wrong rows (0.34 off), silently. Only a module read to
    fold batch-major (timm's VisionTransformerSAM, tests/test_windows_sam.py) is unfolded."""
    model = module(8, 2).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        expected = model(x)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        with pytest.warns(AttentionCaptureWarning, match=r"batch-major \(batch \* heads\) cannot be told from "
                                                           r"head-major"):
            out = model(x)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert dict(hooker.values) == {}


def test_an_sdpa_call_whose_heads_contradict_the_module_is_refused():
    class TokensFoldedAttention(SdpaAttention):
        def forward(self, x):  # (B * T, H, E): attention across the heads of each token, not tokens
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b * t, 3, 2, 4).unbind(1)
            return nn.functional.scaled_dot_product_attention(q, k, v).reshape(b, t, 8)

    model = TokensFoldedAttention(8, 2).eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        with pytest.warns(AttentionCaptureWarning, match=r"every attention call was refused: a scaled_dot_product_"
                          r"attention call on a 3-D query \(12, 2, 4\) whose 1st dim \(12\) is not the layer's batch "
                          r"times its 2 heads"):
            model(torch.randn(3, 4, 8))
    assert dict(hooker.values) == {}


def test_learned_attention_sinks_are_dropped_as_the_model_drops_them_gpt_oss():
    """gpt-oss: softmax(cat([scores, sinks]))[..., :-1]; the sink column was stored, so
    rows did not match what multiplied the values. Oracle: gpt-oss's output_attentions."""
    from attention_hooker import head_entropy

    config = transformers.GptOssConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       hidden_size=32, head_dim=8, intermediate_size=32, num_local_experts=2,
                                       num_experts_per_tok=1, vocab_size=100, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.GptOssModel(config).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_(0, 2)  # sinks that take a visible share
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    reference = _eager_reference(model, dict(input_ids=ids, attention_mask=mask))
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(input_ids=ids, attention_mask=mask)
    for (got,), expected in zip(hooker.values.values(), reference.attentions):
        assert got.shape == expected.shape == (2, 4, 7, 7)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert float(got[0].sum(-1).max()) < 0.999, "the sinks' share is on no key"
        assert head_entropy(got).shape == (2, 4)  # the analyses take rows that sum to less than 1


def test_a_softmax_used_whole_is_recorded_whole():
    """Only a slice that keeps (batch, heads, query) and drops key columns replaces the record."""

    class RowSliceAttention(SdpaAttention):
        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
            probs = torch.softmax(q @ k.transpose(-2, -1), -1)  # (B, H, T, T)
            first_rows = probs[:, :, :1]  # a slice of queries, not of keys: not a sink
            return (probs @ v).transpose(1, 2).reshape(b, t, 8) + first_rows.sum()

    model = RowSliceAttention(8, 2).eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(torch.randn(1, 5, 8))
    assert hooker.values[""][0].shape == (1, 2, 5, 5)


def test_blocked_sdpa_on_a_5d_query_is_refused_not_folded_into_the_batch():
    """Windowed attention as (batch, windows, heads, query, dim) (timm Twins, NesT) was
    flattened into a batch of batch * windows: refused with the reason instead."""

    class WindowedAttention(SdpaAttention):
        def forward(self, x):  # (B, T, C) -> 2 windows of T/2 tokens each, attention inside a window
            b, t, c = x.shape
            q, k, v = self.qkv(x).view(b, 2, t // 2, 3, 2, 4).permute(3, 0, 1, 4, 2, 5)  # (B, W, H, T/W, E)
            y = nn.functional.scaled_dot_product_attention(q, k, v)
            return y.permute(0, 1, 3, 2, 4).reshape(b, t, c)

    model = WindowedAttention(8, 2).eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        with pytest.warns(AttentionCaptureWarning, match=r"5-D query \(1, 2, 2, 3, 4\): blocked or windowed"):
            model(torch.randn(1, 6, 8))
    assert dict(hooker.values) == {} and hooker.report()[""].status == "refused"


class _PackedDecodeAttention(nn.Module):
    """One decode step of grouped-query attention, packed as transformers packs it for sdpa:
    4 query heads over 2 kv heads, the single query given as (batch, kv_heads, groups, dim)."""

    num_heads, num_key_value_groups = 4, 2

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 16)
        self.kv = nn.Linear(8, 16)

    def forward(self, token, context):
        b = token.shape[0]
        q = self.q(token).view(b, 4, 1, 4).reshape(b, 2, 2, 4)  # (B, Hk, groups, E): packed
        k, v = self.kv(context).view(b, -1, 2, 2, 4).permute(2, 0, 3, 1, 4)  # (B, Hk, S, E) each
        return nn.functional.scaled_dot_product_attention(q, k, v).reshape(b, 16)


@pytest.mark.parametrize("keep_grad", [False, True])
def test_packed_decode_queries_are_labelled_per_query_head_on_the_gradient_path_too(keep_grad):
    torch.manual_seed(0)
    model = _PackedDecodeAttention()
    token, context = torch.randn(2, 1, 8), torch.randn(2, 5, 8)
    with TransformerAttentionHooker(model, keep_grad=keep_grad) as hooker:
        model(token, context).square().sum().backward()
    (weights,) = hooker.values[""]
    assert weights.shape == (2, 4, 1, 5)
    q = model.q(token).view(2, 4, 1, 4)  # (B, H, 1, E)
    k = model.kv(context).view(2, 5, 2, 2, 4)[:, :, 0].transpose(1, 2).repeat_interleave(2, dim=1)  # (B, H, S, E)
    torch.testing.assert_close(weights, torch.softmax(q @ k.transpose(-2, -1) / 2, -1).detach(), atol=1e-6, rtol=1e-5)
    if keep_grad:  # oracle: d loss / d P with out = P @ V computed by hand, per query head
        p = weights.clone().requires_grad_()
        v = model.kv(context).view(2, 5, 2, 2, 4)[:, :, 1].transpose(1, 2).repeat_interleave(2, dim=1)  # (B, H, S, E)
        (p @ v.detach()).reshape(2, 16).square().sum().backward()
        torch.testing.assert_close(hooker.gradients[""][0], p.grad, atol=1e-5, rtol=1e-5)


class _PiecesAttention(nn.Module):
    """Attention computed in pieces inside one layer call, as PEGASUS-X (global + blocked
    local), DiffLlama (two softmaxes, mixed after the product with V) and BigBird do."""

    def __init__(self, kind: str, dim: int = 8, heads: int = 2):
        super().__init__()
        self.kind, self.num_heads = kind, heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.kind == "differential":  # (softmax(q1 k1) - 0.5 softmax(q2 k2)) v, two sdpa calls
            y = nn.functional.scaled_dot_product_attention(q, k, v) - 0.5 * nn.functional.scaled_dot_product_attention(
                q.flip(-1), k, v)
        elif self.kind == "global_and_blocked":  # one 4-D softmax for the first token, a 5-D one per block
            scores = q @ k.transpose(-1, -2)
            first = scores[:, :, :1].softmax(-1) @ v  # (B, H, 1, E): labelled alone
            blocks = scores.view(b, self.num_heads, 1, t, t).softmax(-1)  # (B, H, blocks, T, T)
            y = torch.cat([first, (blocks @ v.unsqueeze(2)).squeeze(2)[:, :, 1:]], 2)
        else:  # a loop over heads, each a 3-D softmax
            y = torch.stack([(q[:, h] @ k[:, h].transpose(-1, -2)).softmax(-1) @ v[:, h]
                             for h in range(self.num_heads)], 1)
        return y.transpose(1, 2).reshape(b, t, c)


@pytest.mark.parametrize("kind", ["differential", "global_and_blocked", "loop_over_heads"])
def test_attention_computed_in_pieces_is_refused_for_the_whole_layer_call(kind):
    """Each piece used to be stored as if it were a call of the layer (two 'calls' per forward
    for DiffLlama, the labellable half of PEGASUS-X's global + local attention alone): one
    forward of an attention layer now stores its one map, or nothing, with the reason."""
    model = _PiecesAttention(kind).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = model(x)
        with TransformerAttentionHooker(model) as hooker, pytest.warns(AttentionCaptureWarning, match="refused"):
            out = model(x)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    coverage = hooker.report()[""]
    assert dict(hooker.values) == {} and coverage.status == "refused", coverage
    assert re.search(r"attention calls|5-D tensor|1st dim", coverage.reason), coverage.reason


def test_a_5d_softmax_is_never_passed_over_in_silence_longt5():
    """LongT5's local attention (a softmax over (batch, blocks, heads, block, 3 * block)) was
    seen by no route: the layer was "nothing captured" with no reason; then refused, named. Its
    blocks are now placed at their tokens (issue 24, tests/test_local_blocks.py checks the
    values): what is stored is (batch, heads, tokens, tokens), zero beyond the local radius."""
    config = transformers.LongT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                       local_radius=2, encoder_attention_type="local")
    model = transformers.LongT5EncoderModel(config).eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(input_ids=torch.randint(0, 64, (1, 9)))
    ((got,),) = hooker.values.values()
    assert got.shape == (1, 4, 9, 9)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 4, 9))
    near = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).abs() <= 2
    assert (got[..., ~near] == 0).all(), "keys beyond the local radius are exact zeros"
    assert hooker.report().missing == []


@pytest.mark.parametrize("then", ["remove_hooks", "next_forward"])
def test_a_layer_call_that_raised_after_its_attention_still_stores_it(then):
    """Calls are kept with the running layer call until it returns. One that raises after
    its attention never returns: what it computed is stored when its scope is found stale
    (at the next forward, or when the hooks come off), as it was stored before."""

    class FailsOnceAttention(SdpaAttention):
        fail = True

        def forward(self, x):
            y = super().forward(x)
            if self.fail:
                self.fail = False
                raise RuntimeError("after the attention")
            return y

    model = FailsOnceAttention(8, 2).eval()
    x = torch.randn(1, 3, 8)
    hooker = TransformerAttentionHooker(model).setup()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="after the attention"):
            model(x)
        if then == "next_forward":
            model(x)
    hooker.remove_hooks()
    calls = hooker.values[""]
    assert len(calls) == (2 if then == "next_forward" else 1)
    q, k, _ = model.qkv(x).view(1, 3, 3, 2, 4).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(calls[0], (q @ k.transpose(-1, -2) / 2).softmax(-1).detach(), atol=1e-6, rtol=1e-5)


def test_bigbird_block_sparse_attention_is_one_map_per_layer_call_not_five():
    """BigBird's block-sparse layer makes five softmaxes per call (global rows, sliding
    blocks as a 5-D tensor, ...): the 4-D ones used to be stored as separate 'calls', then
    the call was refused; now it is assembled into one (batch, heads, query, key) map
    (capture/block_sparse.py; tests/test_bigbird.py checks it against the weights)."""
    config = transformers.BigBirdConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, attention_type="block_sparse", block_size=2,
                                        num_random_blocks=1, max_position_embeddings=64, sep_token_id=3)
    model = transformers.BigBirdModel(config).eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(input_ids=torch.randint(0, 64, (1, 32)))
    assert model.config.attention_type == "block_sparse"  # long enough not to fall back to full attention
    assert hooker.report()["encoder.layer.0.attention.self"].status == "captured"
    ((call,),) = hooker.values.values()
    assert call.shape == (1, 2, 32, 32)
    torch.testing.assert_close(call.sum(-1), torch.ones(1, 2, 32))


class _SoftmaxDropoutAttention(nn.Module):
    """Eager attention with dropout on the probabilities (Hugging Face ``eager`` style)."""

    def __init__(self, dim=16, heads=2, p=0.5, fused=False):
        super().__init__()
        self.num_heads, self.p, self.fused = heads, p, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        else:
            out = self.drop((q @ k.transpose(-1, -2) / (d // self.num_heads) ** 0.5).softmax(-1)) @ v
        return out.transpose(1, 2).reshape(b, n, d)


class _MhaDropoutAttention(nn.Module):
    def __init__(self, dim=16, heads=2, p=0.5):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=p, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("route", ["nn.MultiheadAttention", "scaled_dot_product_attention", "softmax"])
def test_in_training_every_route_records_the_weights_before_dropout(route):
    """One statement for every route: in training with dropout the weights are the
    probabilities before dropout, equal to the same call's weights in eval mode."""
    torch.manual_seed(0)
    model = {"nn.MultiheadAttention": lambda: _MhaDropoutAttention(),
             "scaled_dot_product_attention": lambda: _SoftmaxDropoutAttention(fused=True),
             "softmax": lambda: _SoftmaxDropoutAttention(fused=False)}[route]()
    x = torch.randn(2, 6, 16)
    with TransformerAttentionHooker(model) as hooker:
        model.eval()(x)
        trained = model.train()(x)
    assert not torch.equal(trained, model.eval()(x)), "dropout ran"
    (name,) = hooker.values
    evaluated, training = hooker.values[name]
    torch.testing.assert_close(training, evaluated, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(training.sum(-1), torch.ones(2, 2, 6))


class _TokenMixer(nn.Module):
    """Ordinary attention in a class whose name says nothing about attention."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * (d // self.num_heads) ** -0.5).softmax(-1)  # (B, H, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


def test_modules_are_found_by_what_they_declare_not_only_by_class_name():
    from attention_hooker.capture.discovery import find_attention_modules

    torch.manual_seed(0)
    model = nn.Sequential(_TokenMixer(), nn.LayerNorm(16), _TokenMixer())
    assert [name for name, _ in find_attention_modules(model)] == ["0", "2"]
    x = torch.randn(2, 5, 16)
    with TransformerAttentionHooker(model) as hooker:
        with torch.no_grad():
            model(x)
    mixer = model[0]
    q, k, _ = mixer.qkv(x).detach().view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    oracle = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)
    torch.testing.assert_close(hooker.values["0"][0], oracle, atol=1e-6, rtol=1e-5)
    assert hooker.report().missing == []


def _xca_by_hand(attn, x):
    """XCA's channel map ``(B, H, C', C')`` and ``v`` ``(B, H, C', N)`` from the module's own weights: q, k
    L2-normalised over the tokens, ``softmax(q kᵀ * temperature)``."""
    b, n, c = x.shape
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 4, 1)
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        return ((q @ k.transpose(-2, -1)) * attn.temperature).softmax(-1), v


def _xca_capture(model, x, **options):
    """The capture, each XCA layer's input and its proj's input (what ``map @ v`` must give)."""
    from timm.models.xcit import XCA

    inputs, proj_in, handles = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, XCA):
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0])))
            handles.append(m.proj.register_forward_pre_hook(
                lambda mod, args, name=name: proj_in.__setitem__(name, args[0])))
    try:
        with torch.no_grad():
            expected = model(x)
            with TransformerAttentionHooker(model, **options) as hooker:
                out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)  # the capture changed nothing
    return hooker, inputs, proj_in


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "softmax"])
def test_cross_covariance_attention_stores_its_channel_map_as_its_own_entry_never_as_tokens(fused):
    """timm's XCA (XCiT) softmaxes a (batch, heads, channels, channels) map: found by what the module is, it
    is kept as "<layer>:channels", marked "channels", equal to the hand computation from the module's weights,
    and ``map @ v`` is the input of its proj; the layer stores no token map and its coverage says why."""
    timm = pytest.importorskip("timm")
    from attention_hooker._map_kinds import kind_of
    from attention_hooker.analysis.stats import head_entropy
    from attention_hooker.errors import AttentionHookerError

    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, depth=2, img_size=64).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    hooker, inputs, proj_in = _xca_capture(model, torch.randn(2, 3, 64, 64))
    report = hooker.report()
    assert report.missing == ["blocks.0.attn", "blocks.1.attn"]
    for i in range(2):
        layer = f"blocks.{i}.attn"
        assert report[layer].status == "refused" and "channels" in report[layer].reason
        assert f"'{layer}:channels'" in report[layer].reason
        assert layer not in hooker.values
        (got,) = hooker.values[f"{layer}:channels"]
        hand, v = _xca_by_hand(model.blocks[i].attn, inputs[layer])
        assert got.shape == (2, 4, 32, 32)  # xcit_nano: 128 channels in 4 heads
        torch.testing.assert_close(got, hand, atol=1e-6, rtol=1e-5)
        b, h, c, n = v.shape
        torch.testing.assert_close((got @ v).permute(0, 3, 1, 2).reshape(b, n, h * c), proj_in[layer],
                                   atol=1e-6, rtol=1e-5)
        assert kind_of(got).name == "channels"
        with pytest.raises(AttentionHookerError, match="channels of each head, not tokens"):
            head_entropy(got)
    class_attention = [name for name in hooker.values if ":" not in name]
    assert [tuple(hooker.values[n][0].shape) for n in class_attention] == [(2, 4, 1, 17)] * 2


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "softmax"])
@pytest.mark.parametrize("batch,image", [(16, 24), (2, 32)], ids=["channels-equal-batch", "channels-equal-tokens"])
def test_cross_covariance_attention_is_a_channel_entry_when_its_channels_equal_the_batch_or_the_tokens(
        fused, batch, image):
    """16 channels per head with a batch of 16, or with 16 tokens (a 32 x 32 image in 8 x 8
    patches): the channel map's shape is that of token attention, and it was stored as
    such (XCiT-nano at batch 32 hits it). The module decides, not the shape: it is the channel entry."""
    pytest.importorskip("timm")
    from timm.models.xcit import Xcit

    torch.manual_seed(0)
    model = Xcit(img_size=image, patch_size=8, embed_dim=32, depth=1, num_heads=2, cls_attn_layers=1,
                 num_classes=0).eval()
    model.blocks[0].attn.fused_attn = fused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionCaptureWarning)
        hooker, inputs, _ = _xca_capture(model, torch.randn(batch, 3, image, image))
    report = hooker.report()
    assert report["blocks.0.attn"].status == "refused" and "cross-covariance" in report["blocks.0.attn"].reason
    assert "blocks.0.attn" not in hooker.values
    torch.testing.assert_close(hooker.values["blocks.0.attn:channels"][0],
                               _xca_by_hand(model.blocks[0].attn, inputs["blocks.0.attn"])[0], atol=1e-6, rtol=1e-5)
    tokens = (image // 8) ** 2
    assert [tuple(v[0].shape) for n, v in hooker.values.items() if ":" not in n] == [(batch, 2, 1, tokens + 1)]


def test_a_channel_entry_keeps_its_selection_and_its_kind_through_save_and_load(tmp_path):
    pytest.importorskip("timm")
    from timm.models.xcit import Xcit

    from attention_hooker import load
    from attention_hooker._map_kinds import kind_of

    torch.manual_seed(0)
    model = Xcit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, cls_attn_layers=1,
                 num_classes=0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionCaptureWarning)
        hooker, inputs, _ = _xca_capture(model, torch.randn(2, 3, 32, 32), layer_regex=r"^blocks\.0\.attn$",
                                         heads=[1], rows=[0, 3])
    (got,) = hooker.values["blocks.0.attn:channels"]
    hand = _xca_by_hand(model.blocks[0].attn, inputs["blocks.0.attn"])[0]
    torch.testing.assert_close(got, hand[:, [1]][:, :, [0, 3]], atol=1e-6, rtol=1e-5)
    hooker.save(tmp_path / "x.safetensors")
    loaded = load(tmp_path / "x.safetensors")
    assert torch.equal(loaded.values["blocks.0.attn:channels"][0], got)
    assert kind_of(loaded.values["blocks.0.attn:channels"][0]).name == "channels"


def test_a_softmax_whose_first_dim_is_not_batch_times_heads_is_refused():
    """A lambda layer softmaxes its keys, (batch, key_dim, positions); with a batch of 4
    and 4 heads it would read as (batch * heads, query, key) by shape alone."""
    pytest.importorskip("timm")
    from timm.layers.lambda_layer import LambdaLayer

    torch.manual_seed(0)
    layer = LambdaLayer(dim=32, num_heads=4, dim_head=4, r=3).eval()
    with TransformerAttentionHooker(layer, layer_regex="^$") as hooker:  # the user names it
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", AttentionCaptureWarning)
            layer(torch.randn(4, 32, 8, 8))
    assert hooker.values == {}
    assert "batch times its 4 heads" in hooker.report()[""].reason


class _DeformableSampling(nn.Module):
    """Deformable attention's shape of work: per query and head, a softmax over sampled
    points ``(batch, query, heads, levels * points)``, then a weighted sum of samples."""

    def __init__(self, dim=16, n_heads=4, points=3):
        super().__init__()
        self.n_heads, self.points = n_heads, points
        self.sampling_offsets = nn.Linear(dim, n_heads * points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, hidden_states):
        b, q, d = hidden_states.shape
        weights = self.attention_weights(hidden_states).view(b, q, self.n_heads, self.points).softmax(-1)
        offsets = self.sampling_offsets(hidden_states).view(b, q, self.n_heads, self.points, 2)
        samples = self.value_proj(hidden_states).view(b, q, self.n_heads, 1, d // self.n_heads) * offsets[..., :1]
        return self.output_proj((weights.unsqueeze(-1) * samples).sum(3).reshape(b, q, d))


def test_deformable_attention_weights_over_sampled_points_are_refused():
    """Mask2Former's pixel decoder stored its (batch, query, heads, points) softmax as
    (batch, heads, query, key) whenever the queries happened to equal the heads' count."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"self_attn": _DeformableSampling()})
    with TransformerAttentionHooker(model, layer_regex=r"self_attn$") as hooker:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", AttentionCaptureWarning)
            model["self_attn"](torch.randn(2, 4, 16))  # 4 queries, 4 heads
    assert hooker.values == {}
    assert "deformable" in hooker.report()["self_attn"].reason
