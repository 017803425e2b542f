"""Multi-head latent attention whose class name does not say attention (LongCat-Flash's
``LongcatFlashMLA``): found by what it declares (a head count, the low-rank query projections
``q_a_proj`` / ``q_b_proj`` and ``o_proj``), and captured equal to transformers' own eager
``output_attentions`` on eager and sdpa, with the model's outputs unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from attention_hooker import TransformerAttentionHooker  # noqa: E402
from attention_hooker.capture.discovery import find_attention_modules  # noqa: E402


class LowRankQueryMixer(nn.Module):
    """A handwritten latent-attention layer whose class name does not say attention: queries through ``q_a_proj`` then ``q_b_proj``."""

    def __init__(self, dim=8, heads=2, rank=4):
        super().__init__()
        self.num_heads = heads
        self.q_a_proj, self.q_b_proj = nn.Linear(dim, rank), nn.Linear(rank, dim)
        self.kv_proj, self.o_proj = nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # (batch, tokens, dim)
        b, n, d = x.shape
        q = self.q_b_proj(self.q_a_proj(x)).view(b, n, self.num_heads, -1).transpose(1, 2)
        k, v = (t.view(b, n, self.num_heads, -1).transpose(1, 2) for t in self.kv_proj(x).chunk(2, -1))
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # (batch, heads, query, key)
        return self.o_proj((weights @ v).transpose(1, 2).reshape(b, n, d))


def test_a_module_with_a_low_rank_query_projection_is_found_by_what_it_declares():
    model = nn.Sequential(LowRankQueryMixer(), nn.Linear(8, 8))
    assert [name for name, _ in find_attention_modules(model)] == ["0"]


def _longcat(attn):
    config = transformers.AutoConfig.for_model(
        "longcat_flash", vocab_size=100, hidden_size=32, num_layers=1, num_attention_heads=4, num_key_value_heads=4,
        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, head_dim=4,
        ffn_hidden_size=64, expert_ffn_hidden_size=32, n_routed_experts=4, moe_topk=1, zero_expert_num=1,
        max_position_embeddings=64, pad_token_id=0)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_longcat_flash_latent_attention_is_captured_as_transformers_returns_it(attn):
    model, eager = _longcat(attn), _longcat("eager")
    eager.load_state_dict(model.state_dict())
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with TransformerAttentionHooker(model) as hooker:
            hooked = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(plain, hooked)
    assert hooker.report().missing == []
    calls = [call for layer_calls in hooker.values.values() for call in layer_calls]
    assert all(type(model.get_submodule(n)).__name__ == "LongcatFlashMLA" for n in hooker.values)
    assert len(calls) == len(expected) > 0
    rows = mask.bool()[:, None, :, None]
    for got, want in zip(calls, expected):
        assert got.shape == want.shape == (2, 4, 7, 7)
        torch.testing.assert_close(got.masked_select(rows), want.masked_select(rows), atol=1e-5, rtol=1e-4)
