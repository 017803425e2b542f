"""Issue 14: attention flow (Abnar & Zuidema 2020). Oracles: networkx's Edmonds-Karp maximum flow on
the same layered graph, as the authors' code computes it, and hand-computed bottlenecks."""

from __future__ import annotations

import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker, attention_rollout
from attention_hooker.analysis.flow import attention_flow

nx = pytest.importorskip("networkx")


def _networkx_flows(layers, normalize=True):
    """The authors' method: a DiGraph from each layer's residual-augmented mean attention, the maximum
    flow from each top node to each input node, each top node's row divided by its sum."""
    graphs = []
    for a in layers:
        fused = a[0].double().mean(0) + torch.eye(a.shape[-1], dtype=torch.float64)
        graphs.append(fused / fused.sum(-1, keepdim=True))
    tokens, n_layers = graphs[0].shape[0], len(graphs)
    g = nx.DiGraph()
    for level, graph in enumerate(graphs):
        for i in range(tokens):
            for j in range(tokens):
                g.add_edge((level + 1, i), (level, j), capacity=float(graph[i, j]))
    flows = torch.zeros(tokens, tokens, dtype=torch.float64)
    for i in range(tokens):
        for j in range(tokens):
            flows[i, j] = nx.maximum_flow_value(g, (n_layers, i), (0, j), flow_func=nx.algorithms.flow.edmonds_karp)
    return flows / flows.sum(-1, keepdim=True) if normalize else flows


@pytest.mark.parametrize("normalize", [True, False])
def test_flow_equals_networkx_maximum_flow_on_the_same_graph(normalize):
    torch.manual_seed(0)
    layers = [(torch.randn(1, 2, 6, 6) * 2).softmax(-1) for _ in range(3)]
    got = attention_flow(layers, normalize=normalize)
    want = _networkx_flows(layers, normalize)
    assert got.shape == (1, 6, 6)
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=0)
    some = attention_flow(layers, output_positions=[-1, 0], normalize=normalize)
    torch.testing.assert_close(some[0], want[[5, 0]], atol=1e-6, rtol=0)


def test_flow_is_bounded_by_the_narrowest_layer_where_rollout_multiplies():
    # Two tokens, two layers, no residual: token 1 of the top draws all on token 1 of the middle,
    # which draws 0.5 on each input. Then the middle's token 0 draws all on input 0.
    top = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    bottom = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    flow = attention_flow([bottom, top], add_residual=False, normalize=False)
    assert flow[0].tolist() == [[1.0, 0.0], [0.5, 0.5]]
    # One path of two edges of 0.5 each: the flow through it is its narrowest edge, 0.5, where
    # rollout multiplies the edges (0.25).
    top = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
    bottom = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
    flow = attention_flow([bottom, top], add_residual=False, normalize=False)
    rollout = attention_rollout([bottom, top], add_residual=False)
    assert flow[0, 0].tolist() == [0.5, 1.0] and rollout[0, 0].tolist() == [0.25, 0.75]


def test_flow_of_the_real_minilm_on_cls_rows_sum_to_one(minilm_sdpa, minilm_batch):
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
        minilm_sdpa(input_ids=minilm_batch["input_ids"][:1, :12], attention_mask=minilm_batch["attention_mask"][:1, :12])
    flow = attention_flow(hooker.values, output_positions=[0])
    assert flow.shape == (1, 1, 12)
    torch.testing.assert_close(flow.sum(-1), torch.ones(1, 1, dtype=torch.float64))
    raw = attention_flow(hooker.values, output_positions=[0], normalize=False)
    assert (raw <= 1 + 1e-6).all() and (raw > 0).all()


def test_flow_refuses_what_it_cannot_compute():
    layers = [torch.full((1, 1, 3, 3), 1 / 3)]
    with pytest.raises(AttentionHookerError, match="output_positions"):
        attention_flow(layers, output_positions=[3])
    with pytest.raises(AttentionHookerError, match="head_fusion"):
        attention_flow(layers, head_fusion="median")
    with pytest.raises(AttentionHookerError, match="square self-attention"):
        attention_flow([torch.full((1, 1, 2, 3), 1 / 3)])
