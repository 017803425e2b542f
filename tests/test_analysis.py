"""Analyses and interchange: rollout, gradient rollout, head statistics, stitching, save/load, export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import attention_hooker
from attention_hooker import (
    AttentionHookerError,
    HeadStatsAccumulator,
    TransformerAttentionHooker,
    attention_rollout,
    gradient_weighted_rollout,
    head_entropy,
    mean_attention_distance,
    sink_share,
    stitch_steps,
    to_bertviz,
    to_numpy,
)


def _random_attention(layers=3, batch=2, heads=4, tokens=5):
    return [torch.rand(batch, heads, tokens, tokens, dtype=torch.float64).softmax(-1) for _ in range(layers)]


# ------------------------------------------------------------------------------ rollout
def test_rollout_equals_the_published_formula_written_out():
    layers = _random_attention()
    expected = None
    for a in layers:  # Abnar & Zuidema: 0.5 * A + 0.5 * I (rows of A sum to 1), multiplied from the left
        step = 0.5 * a.mean(1) + 0.5 * torch.eye(5, dtype=torch.float64)
        expected = step if expected is None else torch.bmm(step, expected)
    result = attention_rollout(layers)
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(result.sum(-1), torch.ones(2, 5, dtype=torch.float64))


def test_rollout_small_case_by_hand():
    a1 = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])  # (1, 1, 2, 2)
    a2 = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    # A~1 = [[1, 0], [.25, .75]], A~2 = [[.5, .5], [.5, .5]]; R = A~2 A~1 = [[.625, .375], [.625, .375]]
    expected = torch.tensor([[[0.625, 0.375], [0.625, 0.375]]])
    torch.testing.assert_close(attention_rollout([a1, a2]), expected)
    torch.testing.assert_close(attention_rollout([a1, a2], add_residual=False), a2[0, 0] @ a1[0, 0][None])


@pytest.mark.parametrize("fusion, reduce", [("max", lambda a: a.amax(1)), ("min", lambda a: a.amin(1))])
def test_rollout_head_fusion(fusion, reduce):
    layers = _random_attention(layers=2)
    expected = None
    for a in layers:
        step = reduce(a) + torch.eye(5, dtype=torch.float64)
        step = step / step.sum(-1, keepdim=True)
        expected = step if expected is None else step @ expected
    torch.testing.assert_close(attention_rollout(layers, head_fusion=fusion), expected)


def test_rollout_errors():
    with pytest.raises(AttentionHookerError, match="head_fusion='median' must be one of"):
        attention_rollout(_random_attention(), head_fusion="median")
    with pytest.raises(AttentionHookerError, match="square self-attention"):
        attention_rollout([torch.rand(1, 2, 3, 4)])
    with pytest.raises(AttentionHookerError, match="expected 4 dims"):
        attention_rollout([torch.rand(2, 3, 3)])
    with pytest.raises(AttentionHookerError, match="is empty"):
        attention_rollout([])


# ----------------------------------------------------------------------- head statistics
def test_entropy_uniform_one_hot_and_masked_queries():
    uniform = torch.full((1, 1, 3, 4), 0.25)
    torch.testing.assert_close(head_entropy(uniform), torch.tensor([[math.log(4)]], dtype=torch.float64))
    one_hot = torch.eye(4)[None, None]
    torch.testing.assert_close(head_entropy(one_hot), torch.zeros(1, 1, dtype=torch.float64))
    mixed = torch.cat([torch.eye(4)[None, None, :2], torch.full((1, 1, 2, 4), 0.25)], dim=2)  # 2 one-hot + 2 uniform rows
    torch.testing.assert_close(head_entropy(mixed), torch.tensor([[math.log(4) / 2]], dtype=torch.float64))
    only_one_hot = head_entropy(mixed, padding_mask=torch.tensor([[1, 1, 0, 0]]))
    torch.testing.assert_close(only_one_hot, torch.zeros(1, 1, dtype=torch.float64))


def test_distance_on_a_hand_built_matrix_and_a_patch_grid():
    attn = torch.tensor([[[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.0, 0.5]]]])
    # rows: |0-1| = 1; |1-2| = 1; 0.5*|2-0| + 0.5*0 = 1 -> mean 1
    torch.testing.assert_close(mean_attention_distance(attn), torch.tensor([[1.0]], dtype=torch.float64))
    # ViT: [CLS] + 2x2 patches; every patch looks at the patch diagonally opposite (distance sqrt 2).
    vit = torch.zeros(1, 1, 5, 5)
    vit[0, 0, 0, 0] = 1
    for patch, opposite in ((1, 4), (2, 3), (3, 2), (4, 1)):
        vit[0, 0, patch, opposite] = 0.8
        vit[0, 0, patch, 0] = 0.2  # mass on [CLS] is left out and rows renormalised
    torch.testing.assert_close(
        mean_attention_distance(vit, grid=(2, 2), prefix_tokens=1), torch.tensor([[math.sqrt(2)]], dtype=torch.float64)
    )
    with pytest.raises(AttentionHookerError, match="grid=\\(3, 3\\) has 9 patches"):
        mean_attention_distance(vit, grid=(3, 3), prefix_tokens=1)


def test_sink_share_and_padding():
    attn = torch.tensor([[[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.0, 0.0, 1.0]]]])
    torch.testing.assert_close(sink_share(attn, [0]), torch.tensor([[0.8 / 3]], dtype=torch.float64))
    torch.testing.assert_close(
        sink_share(attn, [-1], padding_mask=torch.tensor([[1, 1, 0]])), torch.tensor([[0.45]], dtype=torch.float64)
    )


def test_accumulator_equals_statistics_over_all_inputs_at_once():
    a = torch.rand(3, 2, 4, 4).softmax(-1)
    b = torch.rand(2, 2, 4, 4).softmax(-1)
    mask_a = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    mask_b = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    acc = HeadStatsAccumulator()
    acc.update({"l0": [a]}, padding_mask=mask_a)
    acc.update({"l0": [b]}, padding_mask=mask_b)
    both = torch.cat([a, b])
    mask = torch.cat([mask_a, mask_b])
    rows = mask.sum(-1).double()[:, None]
    result = acc.result()
    expected = (head_entropy(both, padding_mask=mask) * rows).sum(0) / rows.sum()
    np.testing.assert_allclose(result["entropy"][0], expected.numpy())
    expected_distance = (mean_attention_distance(both, padding_mask=mask) * rows).sum(0) / rows.sum()
    np.testing.assert_allclose(result["distance"][0], expected_distance.numpy())
    assert result["entropy"].shape == (1, 2) and acc.inputs == 2 and acc.sequences == 5


# -------------------------------------------------------------------------- stitching
def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=64,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def test_stitched_generation_equals_one_full_forward():
    model = _tiny_gpt2()
    prompt = torch.randint(3, 100, (2, 5))
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
    with torch.no_grad(), TransformerAttentionHooker(model) as full:
        model(generated[:, :-1])  # the last token is generated but never attends
    for name, calls in hooker.values.items():
        stitched = stitch_steps(calls)
        assert stitched.shape == (2, 4, 8, 8)
        torch.testing.assert_close(stitched, full.values[name][0], atol=1e-5, rtol=1e-5)
        assert (stitched.triu(1) == 0).all()


def test_stitch_rejects_calls_that_are_not_generation_steps():
    with pytest.raises(AttentionHookerError, match="starts with the prompt, square"):
        stitch_steps([torch.rand(1, 2, 1, 3)])
    with pytest.raises(AttentionHookerError, match="must see 4 keys, not 5"):
        stitch_steps([torch.rand(1, 2, 3, 3), torch.rand(1, 2, 1, 5)])
    with pytest.raises(AttentionHookerError, match="batch 1 and 2 heads"):
        stitch_steps([torch.rand(1, 2, 3, 3), torch.rand(1, 3, 1, 4)])


# ---------------------------------------------------------------- gradient-weighted rollout
class _TinyAttentionModel(nn.Module):
    """Two handwritten attention layers that keep their own probabilities (with retain_grad)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_KeepingAttention(), _KeepingAttention()])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x[:, 0])


class _KeepingAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (B, H, N, 8) each
        att = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1)
        att.retain_grad()
        self.att = att
        return (att @ v).transpose(1, 2).reshape(b, n, 16)


def test_gradient_weighted_rollout_matches_a_direct_implementation():
    torch.manual_seed(0)
    model = _TinyAttentionModel()
    x = torch.randn(2, 5, 16)
    with TransformerAttentionHooker(model, keep_grad=True) as hooker:
        model(x)[:, 1].sum().backward()
    direct = torch.eye(5, dtype=torch.float64).expand(2, 5, 5)
    for layer in model.layers:
        cam = (layer.att.grad * layer.att).clamp(min=0).mean(1).double()
        direct = direct + cam @ direct
    result = gradient_weighted_rollout(hooker.values, hooker.gradients)
    torch.testing.assert_close(result.double(), direct, atol=1e-6, rtol=1e-5)


def test_gradient_weighted_rollout_on_the_real_minilm(minilm_path, minilm_batch):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    with TransformerAttentionHooker(model, keep_grad=True) as hooker:
        out = model(**minilm_batch).last_hidden_state
        out[:, 0].norm(dim=-1).sum().backward()  # score: the size of each [CLS] embedding
    relevance = gradient_weighted_rollout(hooker.values, hooker.gradients)
    plain = attention_rollout(hooker.values)
    n = minilm_batch["input_ids"].shape[1]
    assert relevance.shape == plain.shape == (2, n, n)
    assert torch.isfinite(relevance).all()
    assert not torch.allclose(relevance / relevance.sum(-1, keepdim=True), plain, atol=1e-3)
    with pytest.raises(AttentionHookerError, match="keep_grad=True"):
        gradient_weighted_rollout(hooker.values, [None] * 6)


# ---------------------------------------------------------------------- save / load / export
def test_save_load_round_trip_is_exact(tmp_path):
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), 2).eval()
    with TransformerAttentionHooker(model) as hooker:
        model(torch.randn(2, 4, 16))
        model(torch.randn(2, 6, 16))
    path = tmp_path / "nested" / "capture.safetensors"
    hooker.save(path, tokens=["a", "b", "c", "d"])
    loaded = attention_hooker.load(path)
    assert list(loaded.values) == list(hooker.values)
    for name, calls in hooker.values.items():
        assert len(loaded.values[name]) == 2
        for ours, theirs in zip(calls, loaded.values[name]):
            assert torch.equal(ours, theirs) and ours.dtype == theirs.dtype
    assert loaded.tokens == ["a", "b", "c", "d"]
    assert loaded.metadata["model_class"] == "TransformerEncoder"
    assert loaded.metadata["library_version"] == attention_hooker.__version__
    assert loaded.metadata["dtype"] == ["float32"]
    assert "2 layers, 4 calls" in repr(loaded)


def test_load_rejects_files_that_are_not_ours(tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file at all")
    with pytest.raises(AttentionHookerError, match="is not a safetensors file saved by attention_hooker"):
        attention_hooker.load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(AttentionHookerError, match="not an attention_hooker capture"):
        attention_hooker.load(foreign)
    with pytest.raises(FileNotFoundError):
        attention_hooker.load(tmp_path / "missing.safetensors")
    with pytest.raises(AttentionHookerError, match="nothing to save"):
        TransformerAttentionHooker(nn.MultiheadAttention(4, 1)).save(tmp_path / "empty.safetensors")


def test_bertviz_export_renders(minilm_sdpa, minilm_tokenizer):
    bertviz = pytest.importorskip("bertviz")
    enc = minilm_tokenizer("The cat sat on the mat.", return_tensors="pt")
    tokens = minilm_tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
        minilm_sdpa(**enc)
    attention = to_bertviz(hooker)
    assert len(attention) == 6 and attention[0].shape == (1, 12, len(tokens), len(tokens))
    html = bertviz.head_view(attention, tokens, html_action="return")
    assert "[CLS]" in html.data and len(html.data) > 10_000
    arrays = to_numpy(hooker)
    assert isinstance(arrays["encoder.layer.0.attention.self"][0], np.ndarray)
    with pytest.raises(AttentionHookerError, match="unknown layer"):
        to_bertviz(hooker, layers=["nope"])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_the_last_real_tokens_share_is_read_at_the_last_real_position_wherever_the_padding_lies(padding):
    # (the last review: each item's last real key was taken as its count of real tokens minus one, a
    # middle token under left padding)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]) if padding == "left" else \
        torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    last = [4, 4] if padding == "left" else [2, 4]
    maps = torch.zeros(2, 1, 5, 5)
    for item in range(2):
        maps[item, 0, :, last[item]] = 1.0  # every row on its item's last real token
    stats = HeadStatsAccumulator()
    stats.update({"layer": [maps]}, padding_mask=mask)
    torch.testing.assert_close(torch.as_tensor(stats.result()["last_token_share"]).double(), torch.ones(1, 1, dtype=torch.float64))
