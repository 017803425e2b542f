"""The sdpa route: recomputed weights against PyTorch's own kernel, and invariants.

Oracle: ``weights @ value`` must equal what ``F.scaled_dot_product_attention``
returns for the same call (the kernel is PyTorch's, not ours).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as imported_sdpa

from attention_hooker import TransformerAttentionHooker, sdpa_attention_weights

B, H, L, S, E = 2, 4, 5, 7, 8


def _qkv(heads_kv: int = H, length: int = L, source: int = S):
    q = torch.randn(B, H, length, E, dtype=torch.float64)
    k = torch.randn(B, heads_kv, source, E, dtype=torch.float64)
    v = torch.randn(B, heads_kv, source, E, dtype=torch.float64)
    return q, k, v


def _expand_kv(w, v):
    if v.shape[1] != w.shape[1]:
        v = v.repeat_interleave(w.shape[1] // v.shape[1], dim=1)
    return v


CASES = {
    "plain": dict(),
    "scale": dict(scale=0.3),
    "bool_mask": dict(attn_mask=torch.rand(B, 1, L, S) > 0.3),
    "bool_mask_per_head": dict(attn_mask=torch.rand(B, H, L, S) > 0.4),
    "float_mask": dict(attn_mask=torch.randn(L, S, dtype=torch.float64)),
    "float_mask_neg_inf": dict(
        attn_mask=torch.zeros(B, 1, 1, S, dtype=torch.float64).masked_fill(torch.arange(S) >= 4, float("-inf"))
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_weights_times_value_equal_the_kernel(case):
    torch.manual_seed(1)
    kwargs = dict(CASES[case])
    if kwargs.get("attn_mask") is not None and kwargs["attn_mask"].dtype == torch.bool:
        kwargs["attn_mask"][..., 0] = True  # every query keeps one key: the kernel is defined
    q, k, v = _qkv()
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    w = sdpa_attention_weights(q, k, kwargs.get("attn_mask"), False, kwargs.get("scale"))
    assert w.shape == (B, H, L, S)
    torch.testing.assert_close(w @ v, expected)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, L, dtype=w.dtype))
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype == torch.bool:
        assert (w.masked_select(~mask.expand_as(w)) == 0).all(), "masked keys must get 0"


@pytest.mark.parametrize("length, source", [(5, 5), (3, 7), (7, 7)])
def test_causal_matches_kernel_and_is_lower_triangular(length, source):
    q, k, v = _qkv(length=length, source=source)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    w = sdpa_attention_weights(q, k, is_causal=True)
    torch.testing.assert_close(w @ v, expected)
    assert (w.triu(1) == 0).all()


def test_grouped_query_attention_reports_every_query_head():
    q, k, v = _qkv(heads_kv=2)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    w = sdpa_attention_weights(q, k, enable_gqa=True)
    assert w.shape == (B, H, L, S)
    torch.testing.assert_close(w @ _expand_kv(w, v), expected)


def test_head_subset_equals_those_heads_of_the_full_weights():
    q, k, _ = _qkv(heads_kv=2)
    mask = torch.rand(B, H, L, S) > 0.2
    mask[..., 0] = True
    full = sdpa_attention_weights(q, k, mask)
    part = sdpa_attention_weights(q, k, mask, heads=[3, 0])
    torch.testing.assert_close(part, full[:, [3, 0]])


def test_fully_masked_rows_are_zero_not_nan():
    q, k, _ = _qkv()
    mask = torch.ones(B, 1, L, S, dtype=torch.bool)
    mask[:, :, 2] = False
    w = sdpa_attention_weights(q, k, mask)
    assert torch.isfinite(w).all()
    assert (w[:, :, 2] == 0).all()
    torch.testing.assert_close(w[:, :, 3].sum(-1), torch.ones(B, H, dtype=w.dtype))


@pytest.mark.parametrize("kind", ["bool", "float_neg_inf", "bool_and_causal"])
def test_rows_left_without_keys_are_zero_and_others_sum_to_one(kind):
    q, k, v = _qkv(length=S, source=S)
    if kind == "float_neg_inf":
        mask = torch.zeros(B, 1, S, S, dtype=torch.float64)
        mask[0, :, 1] = float("-inf")  # batch 0, query 1: every key
        empty = (0, 1)
    else:
        mask = torch.ones(B, 1, S, S, dtype=torch.bool)
        if kind == "bool":
            mask[1, :, 4] = False
            empty = (1, 4)
        else:
            mask[1, :, :, 0] = False  # with the causal mask, query 0 of batch 1 keeps no key
            empty = (1, 0)
    w = sdpa_attention_weights(q, k, mask, is_causal=kind == "bool_and_causal")
    assert torch.isfinite(w).all()
    assert (w[empty[0], :, empty[1]] == 0).all()
    sums = w.sum(-1)
    sums[empty[0], :, empty[1]] = 1.0
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_no_mask_and_no_keys_masked_needs_no_cleanup_pass():
    from attention_hooker.capture.routes.sdpa import _empty_rows

    def causal(length, source):
        return torch.ones(length, source, dtype=torch.bool).triu_(1)

    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    assert _empty_rows(None, causal(9, 3)) is None
    assert _empty_rows(mask, None) is None
    assert _empty_rows(torch.zeros(1, 1, L, S), causal(L, S)) is None
    mask[0, 0, 0, 0] = False
    empty = _empty_rows(mask, causal(L, S))  # causal query 0 had only key 0
    assert empty.shape == (B, 1, L, 1) and empty[0, 0, 0, 0] and int(empty.sum()) == 1


@pytest.mark.parametrize("batch", [3, 70])  # one product per batch item; beyond 64 items, one copy
def test_projections_seen_through_a_transpose_give_the_same_weights(batch):
    # Hugging Face layout: (B, L, H, E) projections transposed to (B, H, L, E), not flattenable.
    projected = torch.randn(batch, L, 2, H, E, dtype=torch.float64)
    q, k = projected[:, :, 0].transpose(1, 2), projected[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous()
    w = sdpa_attention_weights(q, k, scale=0.3)
    torch.testing.assert_close(w, torch.softmax(0.3 * q.contiguous() @ k.contiguous().transpose(-2, -1), -1))


def test_empty_sequences_give_empty_weights():
    q, k = torch.randn(B, H, 0, E), torch.randn(B, H, S, E)
    assert sdpa_attention_weights(q, k).shape == (B, H, 0, S)


def test_unbatched_and_half_precision_inputs():
    q, k = torch.randn(H, L, E), torch.randn(H, S, E)
    assert sdpa_attention_weights(q, k).shape == (1, H, L, S)
    qh, kh = q.half(), k.half()
    wh = sdpa_attention_weights(qh, kh)
    assert wh.dtype == torch.float16
    torch.testing.assert_close(wh.float(), sdpa_attention_weights(q, k), atol=2e-3, rtol=1e-2)


class _HandwrittenSdpaAttention(nn.Module):
    """Custom attention calling sdpa through a name imported at module level."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, causal=False):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        self.last_inputs = (q.detach(), k.detach())
        y = imported_sdpa(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, N, Dh)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class _TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_HandwrittenSdpaAttention(), _HandwrittenSdpaAttention()])

    def forward(self, x, mask=None, causal=False):
        for block in self.blocks:
            x = x + block(x, mask, causal)
        return x


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_imported_by_name_is_captured_and_output_unchanged(causal):
    model = _TwoBlocks()
    x = torch.randn(2, 6, 16)
    mask = None if causal else torch.rand(2, 1, 6, 6) > 0.3
    if mask is not None:
        mask[..., 0] = True
    expected = model(x, mask, causal)
    with TransformerAttentionHooker(model) as hooker:
        out = model(x, mask, causal)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert hooker.hooked_layers == ["blocks.0", "blocks.1"]
    for i, block in enumerate(model.blocks):
        q, k = block.last_inputs
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if causal:
            scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        else:
            scores = scores.masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(hooker.values[f"blocks.{i}"][0], scores.softmax(-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [None, 1.0, 0.5])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "keep_grad_path"])
def test_half_precision_weights_are_computed_in_float32_like_the_kernel(dtype, scale, grad):
    """Issue 9: scores were rounded to bf16/fp16 before the softmax (error up to 0.09 at
    scale 1.0); the kernels accumulate in float32. Oracle: float64 from the same inputs;
    what remains is the final rounding to the half dtype."""
    torch.manual_seed(0)
    q, k = (torch.randn(2, 4, 16, 64) * 3).to(dtype), (torch.randn(2, 4, 24, 64) * 3).to(dtype)
    mask = torch.rand(2, 1, 16, 24) > 0.2
    factor = 1 / 8 if scale is None else scale
    scores = q.double() @ k.double().transpose(-2, -1) * factor
    oracle = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    if grad:
        q = q.clone().requires_grad_()
    with torch.set_grad_enabled(grad):
        got = sdpa_attention_weights(q, k, mask, scale=scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got.detach().double(), oracle, atol=torch.finfo(dtype).eps / 2, rtol=0)


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask_rows", "gqa_heads", "half", "empty_rows"])
@pytest.mark.parametrize("tile_rows", [1, 3, 7, 100])
def test_weights_computed_in_tiles_equal_the_whole_computation(case, tile_rows):
    """Issue 11: tiles of query rows, written into the stored dtype, give the same
    weights as the whole (batch, heads, query, key) computation (fp32 1e-6)."""
    from attention_hooker.capture.routes.sdpa import sdpa_attention_weights

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 13, 8)
    kwargs = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(2, 1, 1, 13) > 0.3
    elif case == "float_mask_rows":
        kwargs["attn_mask"] = torch.randn(2, 4, 10, 13)
    elif case == "gqa_heads":
        k = torch.randn(2, 2, 13, 8)
        kwargs["heads"] = [3, 0]
    elif case == "half":
        q, k = q.half(), k.half()
    elif case == "empty_rows":
        mask = torch.rand(2, 1, 10, 13) > 0.5
        mask[:, :, 4] = False  # a row with every key masked gets zeros
        kwargs["attn_mask"] = mask
    whole = sdpa_attention_weights(q, k, **kwargs)
    row_bytes = 2 * whole.shape[1] * 13 * 4
    tiled = sdpa_attention_weights(q, k, **kwargs, store_as=(torch.float64, torch.device("cpu")),
                                   tile_bytes=tile_rows * row_bytes)
    assert tiled.dtype == torch.float64 and tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole.double(), atol=1e-6 if case != "half" else 1e-3, rtol=0)


@pytest.mark.parametrize("layout", ["contiguous", "transposed_projections", "one_row_decoding", "bfloat16",
                                    "causal_tiles", "mask_and_rows"])
def test_grouped_query_weights_equal_the_kernels_without_repeating_the_keys(layout, monkeypatch):
    """Issue 11: each kv head serves its group of query heads inside the product; the keys are
    never copied once per query head (at long context that copy was the call's largest tensor)."""
    from attention_hooker.capture.routes import sdpa

    torch.manual_seed(0)
    batch, heads, kv_heads, length, width = 2, 8, 2, 9, 16
    if layout == "transposed_projections":  # Hugging Face's (B, L, H, E) seen through a transpose
        q = torch.randn(batch, length, heads, width).transpose(1, 2)
        k = torch.randn(batch, length, kv_heads, width).transpose(1, 2)
    else:
        q, k = torch.randn(batch, heads, length, width), torch.randn(batch, kv_heads, length, width)
    if layout == "one_row_decoding":
        q = q[:, :, -1:]
    v = torch.randn(batch, kv_heads, k.shape[2], width)
    if layout == "bfloat16":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    kwargs, options = {}, {}
    if layout == "causal_tiles":
        kwargs["is_causal"] = True
        options = {"store_as": (torch.float32, torch.device("cpu")), "tile_bytes": 1}
    if layout == "mask_and_rows":
        kwargs["attn_mask"] = torch.rand(batch, 1, length, length) > 0.3
        kwargs["attn_mask"][..., 0] = True
        options = {"rows": [0, -1]}
    repeated = []
    real = torch.Tensor.repeat_interleave
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", lambda *a, **kw: repeated.append(1) or real(*a, **kw))
    w = sdpa_attention_weights(q, k, **kwargs, enable_gqa=True, **options)
    assert not repeated, "the keys were repeated per query head"
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", real)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs, enable_gqa=True)
    if "rows" in options:
        expected = expected[:, :, [0, length - 1]]
    out = w.float() @ v.float().repeat_interleave(heads // kv_heads, dim=1)
    tolerance = 1e-5 if w.dtype == torch.float32 else 2e-2  # bfloat16 weights: rounded to 8 bits
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
    by_repeat = sdpa.sdpa_attention_weights(q, k.repeat_interleave(heads // kv_heads, dim=1), **kwargs, **options)
    torch.testing.assert_close(w, by_repeat, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["whole", "tiles", "differentiable"])
def test_a_row_with_every_key_masked_is_zero_unless_a_score_is_nan_and_a_nan_row_elsewhere_stays_nan(path):
    # The kernel gives a fully masked row zeros, and a row with a NaN query NaN, masked or not;
    # zeroing every NaN once some row was empty (or every fully masked row) showed "attends to
    # nothing" where the model's output was NaN (the second case found by review).
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    q[0, 1, 2] = q[1, 0, 4] = float("nan")
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, 3] = mask[1, 0, 4] = False  # row 3 of item 0 and row 4 of item 1 see no key
    kwargs = {"store_as": (torch.float32, torch.device("cpu")), "tile_bytes": 2 * 2 * 2 * 5 * 4} if path == "tiles" else {}
    if path == "differentiable":
        q.requires_grad_(True)
    weights = sdpa_attention_weights(q, k, mask, **kwargs).detach()
    out = F.scaled_dot_product_attention(q.detach(), k, v, mask)
    assert torch.isnan(out[0, 1, 2]).all() and torch.isnan(weights[0, 1, 2]).all()
    assert (weights[0, :, 3] == 0).all() and (out[0, :, 3] == 0).all()
    assert torch.isnan(out[1, 0, 4]).all() and torch.isnan(weights[1, 0, 4]).all()  # masked, with a NaN query
    assert (weights[1, 1, 4] == 0).all() and (out[1, 1, 4] == 0).all()  # the same row of the other head
    finite = torch.ones(2, 2, 5, dtype=torch.bool)
    finite[0, 1, 2] = finite[0, :, 3] = finite[1, :, 4] = False
    torch.testing.assert_close(weights.sum(-1)[finite], torch.ones(int(finite.sum())))
    torch.testing.assert_close((weights @ v)[finite], out[finite], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_gradients_through_a_row_that_sees_no_key_are_the_kernels(kind):
    # The softmax of a row of -inf is NaN; its backward spread NaN to every key's gradient under a
    # float mask, where the kernel's gradients are finite (that row gets none).
    torch.manual_seed(0)
    q0, k0, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    keep[0, 0, 2] = False  # query row 2 sees no key
    mask = keep if kind == "bool" else torch.zeros(1, 1, 4, 4).masked_fill(~keep, float("-inf"))
    grads = []
    for weights_of in (lambda q, k: sdpa_attention_weights(q, k, mask) @ v,
                       lambda q, k: F.scaled_dot_product_attention(q, k, v, mask)):
        q, k = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
        weights_of(q, k).sum().backward()
        grads.append((q.grad, k.grad))
    (ours_q, ours_k), (kernel_q, kernel_k) = grads
    assert torch.isfinite(ours_q).all() and torch.isfinite(ours_k).all()
    torch.testing.assert_close(ours_q, kernel_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_k, kernel_k, atol=1e-5, rtol=1e-5)

