"""Issue 14: head importance (Michel et al. 2019) and value-weighted norms (Kobayashi et al. 2020).

Oracles: autograd through a gate on each head's output (Michel's definition itself), and the
real MiniLM's own modules (its value projection, its output projection, its attention output).
"""

from __future__ import annotations

import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker
from attention_hooker.analysis.attribution import head_importance, value_weighted_norms

HEADS, HEAD_DIM = 12, 32


def _sentences(tokenizer):
    return [tokenizer(text, return_tensors="pt") for text in
            ("The cat sat on the mat because it was tired.", "Attention is not explanation, they said.")]


def _loss(out):
    return out.last_hidden_state[:, 0].pow(2).sum() + out.last_hidden_state[:, -1].sum()


def test_head_importance_equals_the_gradient_of_a_gate_on_each_heads_output(minilm_sdpa, minilm_tokenizer):
    model = minilm_sdpa
    layers = model.encoder.layer
    for enc in _sentences(minilm_tokenizer):
        # The oracle: Michel's gate xi_h multiplying head h's part of each layer's attention output.
        gates = [torch.ones(HEADS, requires_grad=True) for _ in layers]

        def gate(index):
            def hook(module, args, output):
                context = output[0]
                shaped = context.view(*context.shape[:-1], HEADS, HEAD_DIM) * gates[index][:, None]
                return (shaped.view_as(context),) + tuple(output[1:])
            return hook

        handles = [layer.attention.self.register_forward_hook(gate(i)) for i, layer in enumerate(layers)]
        try:
            _loss(model(**enc)).backward()
        finally:
            for handle in handles:
                handle.remove()
        with TransformerAttentionHooker(model, keep_grad=True) as hooker:
            _loss(model(**enc)).backward()
        for (name, weights), grads, xi in zip(hooker.values.items(), hooker.gradients.values(), gates):
            got = head_importance(weights[0], grads[0])
            assert got.shape == (1, HEADS)
            torch.testing.assert_close(got[0], xi.grad.abs().double(), rtol=1e-4, atol=1e-6, msg=name)


def test_head_importance_refuses_a_gradient_of_another_shape():
    with pytest.raises(AttentionHookerError, match=r"grad is \(1, 2, 3, 3\), expected the weights' shape \(1, 2, 3, 4\)"):
        head_importance(torch.full((1, 2, 3, 4), 0.25), torch.zeros(1, 2, 3, 3))


def _minilm_layer_parts(model, enc, index):
    """Layer ``index``'s weights (our capture), its value vectors and attention output (the model's own)."""
    seen = {}
    attention = model.encoder.layer[index].attention
    def keep(name, pick=lambda o: o):
        def hook(module, args, output):
            seen[name] = pick(output)  # returns None: the output is left as it is
        return hook

    handles = [
        attention.self.value.register_forward_hook(keep("value")),
        attention.self.register_forward_hook(keep("context", lambda o: o[0])),
        attention.output.dense.register_forward_hook(keep("dense")),
    ]
    try:
        with torch.no_grad(), TransformerAttentionHooker(model, rf"layer\.{index}\.attention\.self$") as hooker:
            model(**enc)
    finally:
        for handle in handles:
            handle.remove()
    batch, tokens = enc["input_ids"].shape
    value = seen["value"].view(batch, tokens, HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, T, Dh)
    return next(iter(hooker.values.values()))[0], value, seen, attention.output.dense


def test_value_weighted_norms_of_the_real_minilm_against_its_own_modules(minilm_sdpa, minilm_tokenizer):
    enc = _sentences(minilm_tokenizer)[0]
    weights, value, seen, dense = _minilm_layer_parts(minilm_sdpa, enc, 2)
    norms = value_weighted_norms(weights, value, dense.weight)
    tokens = weights.shape[-1]
    assert norms.shape == (1, HEADS, tokens, tokens)
    # Oracle 1: each head's f_h(x_j) through the output projection, by masking the other heads' features.
    flat = value.transpose(1, 2).reshape(1, tokens, HEADS * HEAD_DIM)  # (B, T, H*Dh) as the layer lays it out
    with torch.no_grad():
        for h in (0, 5, 11):
            only = torch.zeros_like(flat)
            only[..., h * HEAD_DIM:(h + 1) * HEAD_DIM] = flat[..., h * HEAD_DIM:(h + 1) * HEAD_DIM]
            f = torch.nn.functional.linear(only, dense.weight)  # (B, T, D), no bias
            want = weights[:, h].double() * f.norm(dim=-1).double()[:, None, :]
            torch.testing.assert_close(norms[:, h], want, rtol=1e-5, atol=1e-7)
    # Oracle 2: the contributions add up to what the model computed: sum_j sum_h alpha f_h(x_j) + b_O.
    transformed = torch.einsum("bhkd,ehd->bhke", value.double(),
                               dense.weight.double().view(-1, HEADS, HEAD_DIM))  # (B, H, K, D)
    rebuilt = torch.einsum("bhqk,bhke->bqe", weights.double(), transformed) + dense.bias.double()
    torch.testing.assert_close(rebuilt.float(), seen["dense"], rtol=1e-4, atol=1e-4)
    summed = value_weighted_norms(weights, value, dense.weight, summed=True)
    explicit = torch.einsum("bhqk,bhke->bqke", weights.double(), transformed).norm(dim=-1)
    torch.testing.assert_close(summed, explicit, rtol=1e-6, atol=1e-9)


def test_value_weighted_norms_with_grouped_kv_heads_and_their_checks():
    torch.manual_seed(0)
    attn = torch.rand(2, 4, 3, 5).softmax(-1)
    value = torch.randn(2, 2, 5, 3)  # 2 kv heads, each serving 2 query heads
    weight = torch.randn(6, 12)
    got = value_weighted_norms(attn, value, weight)
    for h in range(4):
        f = value[:, h // 2] @ weight[:, 3 * h:3 * h + 3].T  # (B, K, D)
        torch.testing.assert_close(got[:, h], attn[:, h].double() * f.norm(dim=-1).double()[:, None])
    with pytest.raises(AttentionHookerError, match=r"value is \(2, 3, 5, 3\), expected \(batch, kv_heads, key"):
        value_weighted_norms(attn, torch.randn(2, 3, 5, 3), weight)
    with pytest.raises(AttentionHookerError, match=r"out_weight is \(12, 6\), expected \(model_dim, heads \* head_dim\)"):
        value_weighted_norms(attn, value, weight.T)


# ------------------------------------------------------------------ keep_values: the value vectors each call used
def _rebuilt_output(weights, value, heads):
    v = value.repeat_interleave(heads // value.shape[1], dim=1)  # grouped kv heads serve their query heads
    return (weights @ v).transpose(1, 2).flatten(2)  # (B, Q, H * Dh)


def test_keep_values_gives_the_value_vectors_each_route_multiplied_its_weights_with(minilm_sdpa, minilm_batch):
    """Oracle: the weights times the kept value vectors, through the module's own output projection,
    give back what the module computed (sdpa: MiniLM and a grouped-query LLaMA; nn.MultiheadAttention
    with bias_kv and a zero key)."""
    transformers = pytest.importorskip("transformers")
    outputs = {}
    dense = minilm_sdpa.encoder.layer[1].attention.output.dense
    handle = dense.register_forward_hook(lambda m, a, o: outputs.update(dense=(a[0], o)) and None)
    try:
        with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa, keep_values=True) as hooker:
            minilm_sdpa(**minilm_batch)
    finally:
        handle.remove()
    name = "encoder.layer.1.attention.self"
    weights, value = hooker.values[name][0], hooker.value_vectors[name][0]
    assert value.shape == (2, HEADS, weights.shape[-1], HEAD_DIM)
    assert list(hooker.value_vectors) == list(hooker.values)
    torch.testing.assert_close(_rebuilt_output(weights, value, HEADS), outputs["dense"][0], rtol=1e-4, atol=1e-5)

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    llama = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    o_proj_in = {}
    attention = llama.model.layers[0].self_attn
    handle = attention.o_proj.register_forward_hook(lambda m, a, o: o_proj_in.update(x=a[0]) and None)
    try:
        with torch.no_grad(), TransformerAttentionHooker(llama, keep_values=True) as hooker:
            llama(torch.randint(3, 60, (1, 9)))
    finally:
        handle.remove()
    weights, value = hooker.values["model.layers.0.self_attn"][0], hooker.value_vectors["model.layers.0.self_attn"][0]
    assert value.shape == (1, 2, 9, 8), "two kv heads, kept as the kernel took them"
    torch.testing.assert_close(_rebuilt_output(weights, value, 4), o_proj_in["x"], rtol=1e-5, atol=1e-6)
    norms = value_weighted_norms(weights, value, attention.o_proj.weight)
    assert norms.shape == (1, 4, 9, 9)

    mha = torch.nn.MultiheadAttention(16, 4, add_bias_kv=True, add_zero_attn=True).eval()  # (L, B, E) layout
    x = torch.randn(5, 2, 16)
    with TransformerAttentionHooker(mha, keep_values=True) as hooker:
        out, _ = mha(x, x, x, need_weights=False)
    ((weights,),), ((value,),) = hooker.values.values(), hooker.value_vectors.values()
    assert weights.shape == (2, 4, 5, 7) and value.shape == (2, 4, 7, 4), "bias_v and the zero key: 2 more keys"
    torch.testing.assert_close(mha.out_proj(_rebuilt_output(weights, value, 4)).transpose(0, 1), out)


def test_keep_values_on_the_softmax_route_come_from_the_product_with_the_weights(minilm_eager, minilm_sdpa,
                                                                                 minilm_batch):
    """Eager code: the value vectors are the other operand of the product the weights reach
    (HF's matmul, nanoGPT's ``@``, ``bmm``-style code), equal to what the sdpa route sees; code
    whose product the capture does not follow (einsum) gives None, not a guess."""
    with torch.no_grad(), TransformerAttentionHooker(minilm_eager, keep_values=True) as eager:
        minilm_eager(**minilm_batch)
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa, keep_values=True) as sdpa:
        minilm_sdpa(**minilm_batch)
    assert len(eager.value_vectors) == 6
    for name in eager.values:
        torch.testing.assert_close(eager.value_vectors[name][0], sdpa.value_vectors[name][0], rtol=1e-4, atol=1e-5)

    class Handwritten(torch.nn.Module):
        def __init__(self, how):
            super().__init__()
            self.how, self.qkv = how, torch.nn.Linear(8, 24)

        def forward(self, x):  # (B, T, 8), 2 heads of 4
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)  # each (B, H, T, Dh)
            att = (q @ k.transpose(-2, -1) / 2).softmax(-1)
            att = torch.nn.functional.dropout(att, 0.1, training=False)
            if self.how == "matmul":
                return att @ v, v
            if self.how == "bmm":
                flat = torch.bmm(att.reshape(b * 2, t, t), v.reshape(b * 2, t, 4))
                return flat, v
            return torch.einsum("bhqk,bhkd->bhqd", att, v), v

    x = torch.randn(3, 5, 8)
    for how in ("matmul", "bmm", "einsum"):
        module = Handwritten(how)
        with torch.no_grad(), TransformerAttentionHooker(module, r"^$", keep_values=True) as hooker:
            _, v = module(x)
        (value,) = next(iter(hooker.value_vectors.values()))
        if how == "einsum":
            assert value is None, "a product the capture does not follow: no value vectors"
        else:
            torch.testing.assert_close(value, v)
            assert next(iter(hooker.values.values()))[0].shape == (3, 2, 5, 5)


def test_keep_values_refuses_what_it_cannot_serve(minilm_eager):
    with pytest.raises(AttentionHookerError, match="keep_values=True cannot be combined with heads="):
        TransformerAttentionHooker(minilm_eager, keep_values=True, heads=[0])
    with pytest.raises(AttentionHookerError, match="keep_values='yes' must be True or False"):
        TransformerAttentionHooker(minilm_eager, keep_values="yes")
    hooker = TransformerAttentionHooker(minilm_eager, keep_values=True)
    with pytest.raises(AttentionHookerError, match="reduce_into\\(\\) cannot be combined with keep_grad=True, "
                                                   "keep_values=True"):
        from attention_hooker import HeadStatsAccumulator

        hooker.reduce_into(HeadStatsAccumulator())
    with pytest.raises(AttentionHookerError, match="stream_to\\(\\) cannot be combined with keep_values=True"):
        hooker.stream_to("/tmp/never-written")


def test_keep_values_follows_max_calls_and_clear():
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=4, batch_first=True).eval()
    with TransformerAttentionHooker(layer, keep_values=True, max_calls=2, keep="last") as hooker:
        for n in (3, 4, 5):
            layer(torch.randn(1, n, 16))
        assert [v.shape[2] for v in hooker.value_vectors["self_attn"]] == [4, 5], "the last two calls, as values"
        hooker.clear()
        assert hooker.value_vectors == {}


def test_find_output_projection_in_or_beside_the_attention_module(minilm_sdpa):
    from attention_hooker.analysis.attribution import find_output_projection

    transformers = pytest.importorskip("transformers")
    bert = find_output_projection(minilm_sdpa, "encoder.layer.2.attention.self", 384)
    assert bert is minilm_sdpa.encoder.layer[2].attention.output.dense.weight, "beside it: attention.output.dense"
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=4, n_embd=32))
    conv = gpt2.transformer.h[0].attn.c_proj
    assert torch.equal(find_output_projection(gpt2, "transformer.h.0.attn", 32), conv.weight.T), "Conv1D: (in, out)"
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        vocab_size=64))
    assert find_output_projection(llama, "model.layers.0.self_attn", 32) is llama.model.layers[0].self_attn.o_proj.weight
    with pytest.raises(AttentionHookerError, match=r"found no output projection taking 31 features"):
        find_output_projection(llama, "model.layers.0.self_attn", 31)
    with pytest.raises(AttentionHookerError, match="has no module 'nope'"):
        find_output_projection(llama, "nope", 32)
