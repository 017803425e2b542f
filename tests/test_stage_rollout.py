"""Rollout across the stages of a Swin (issue 24, part 4): carried through each 2 x 2 patch merge
by the mean of a merged token's real parents, over every layer of a transformers Swin."""

import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker
from attention_hooker.analysis.stage_rollout import merge_matrix, stage_rollout

transformers = pytest.importorskip("transformers")


def _by_hand(layers, grid, add_residual=True):
    """Rollout written apart: each layer's head mean (+ I) renormalised, multiplied in loops; a merge
    is a 2 x 2 average pool with ceil_mode (its divisor counts only the cells inside the grid) of
    the rollout's rows laid out on the grid."""
    h, w = grid
    rollout = None
    for a in layers:
        a = a.double()
        b, _, t, _ = a.shape
        step = a.mean(1) + (torch.eye(t, dtype=torch.float64) if add_residual else 0)
        step = step / step.sum(-1, keepdim=True)
        if rollout is not None and t != rollout.shape[1]:
            sources = rollout.shape[-1]
            image = rollout.transpose(1, 2).reshape(b, sources, h, w)  # channel j: how much each token draws on j
            image = torch.nn.functional.avg_pool2d(image, 2, ceil_mode=True)
            h, w = image.shape[-2:]
            rollout = image.reshape(b, sources, h * w).transpose(1, 2)
        rollout = step if rollout is None else torch.einsum("bij,bjk->bik", step, rollout)
    return rollout


def _random_maps(batch, heads, tokens, generator):
    return torch.softmax(torch.randn(batch, heads, tokens, tokens, generator=generator) * 2, -1)


@pytest.mark.parametrize("grid, merges", [((4, 4), [(2, 2)]), ((5, 7), [(3, 4), (2, 2), (1, 1)])])
def test_stage_rollout_equals_a_construction_by_hand(grid, merges):
    g = torch.Generator().manual_seed(0)
    layers = [_random_maps(2, 3, grid[0] * grid[1], g), _random_maps(2, 3, grid[0] * grid[1], g)]
    for h, w in merges:  # odd grids: the merge pads, and a border token has 2 (or 1) real parents
        layers.append(_random_maps(2, 3, h * w, g))
    for add_residual in (True, False):
        got = stage_rollout(layers, grid=grid if grid[0] != grid[1] else None, add_residual=add_residual)
        expected = _by_hand(layers, grid, add_residual)
        assert got.shape == (2, merges[-1][0] * merges[-1][1], grid[0] * grid[1])
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:2]), atol=1e-5, rtol=0)


def test_the_merge_matrix_is_the_mean_of_the_real_parents():
    m = merge_matrix((3, 3))  # merged 2 x 2: parents 4, 2, 2 and 1
    assert m.shape == (4, 9)
    assert m[0].tolist() == [0.25, 0.25, 0, 0.25, 0.25, 0, 0, 0, 0]
    assert m[1].tolist() == [0, 0, 0.5, 0, 0, 0.5, 0, 0, 0]
    assert m[3].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1.0]


def test_a_change_of_tokens_that_is_not_a_merge_is_refused():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(AttentionHookerError, match="not a 2 x 2 merge"):
        stage_rollout([_random_maps(1, 1, 16, g), _random_maps(1, 1, 9, g)])
    with pytest.raises(AttentionHookerError, match=r"not a square grid; pass grid=\(height, width\)"):
        stage_rollout([_random_maps(1, 1, 12, g)])


def _swin_224():
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=224, patch_size=4, embed_dim=8, depths=[2, 2, 2, 2],
                                     num_heads=[1, 1, 2, 2], window_size=7, attn_implementation="eager")
    return transformers.SwinModel(config).eval()  # 56x56, 28x28, 14x14, 7x7 tokens


def test_rollout_runs_over_every_layer_of_a_swin_at_224_through_its_merges():
    model = _swin_224()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), TransformerAttentionHooker(model) as dense:
        model(x)
    assert not dense.report().missing and len(dense.values) == 8
    rollout = stage_rollout(dense.values)
    assert rollout.shape == (1, 49, 3136)  # the last stage's 7x7 tokens over the first stage's 56x56
    torch.testing.assert_close(rollout.sum(-1), torch.ones(1, 49), atol=1e-5, rtol=0)
    layers = [calls[0] for calls in dense.values.values()]
    torch.testing.assert_close(rollout.double(), _by_hand(layers, (56, 56)), atol=1e-9, rtol=1e-6)
    # The last token draws on tokens outside its own 32 x 32 pixel (8 x 8 token) area: windows and stages crossed.
    area = torch.zeros(56, 56, dtype=torch.bool)
    area[48:, 48:] = True
    assert rollout[0, 48, ~area.flatten()].sum() > 1e-3

    with torch.no_grad(), TransformerAttentionHooker(model, windows="keep") as kept:  # per window, placed on demand
        model(x)
    again = stage_rollout(kept.values, window_index=kept.window_index)
    torch.testing.assert_close(again, rollout, atol=0, rtol=0)
