"""Capture under each of torch's fast sdpa kernels: flash, memory-efficient, cuDNN and math on a CUDA
device; on a machine without one (CI), the same checks under the kernels torch has on the CPU (flash
and math) and with a shorter long input.

Oracles: Hugging Face's eager model with ``output_attentions=True`` (same weights, same dtype), the
plain sdpa model's own output (bitwise), and, for gradients, autograd through the eager model's
returned attentions. On a GPU machine: ``python -m pytest tests/test_fast_kernels.py`` (a kernel that refuses
a dtype or a mask on that card is skipped with its reason); ``ATTENTION_HOOKER_TEST_DEVICE`` picks
the device.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from attention_hooker import (  # noqa: E402
    HeadStatsAccumulator,
    PooledAttention,
    TransformerAttentionHooker,
    load,
)

import os  # noqa: E402

DEVICE = os.environ.get("ATTENTION_HOOKER_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.startswith("cuda")
LONG = 32768 if ON_GPU else 1024

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
if not ON_GPU:
    BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}  # the CPU's kernels
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Eager softmaxes in float32 and casts to the model's dtype; we recompute from q and k in float32 too.
# The tolerance is the storage dtype's rounding, plus q/k rounding differences between kernels' inputs.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}


def _llama(implementation: str, dtype: torch.dtype):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    return model.eval().to(DEVICE, dtype)


def _bert(implementation: str, dtype: torch.dtype):
    config = transformers.BertConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, attn_implementation=implementation)
    return model.eval().to(DEVICE, dtype)


def _inputs(name: str):
    torch.manual_seed(1)
    ids = torch.randint(3, 250, (2, 128), device=DEVICE)
    if name == "llama":
        return dict(input_ids=ids)
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0  # a padded row: the mask reaches the kernel
    return dict(input_ids=ids, attention_mask=mask)


def _run_plain(model, inputs, backend):
    try:
        with torch.no_grad(), sdpa_kernel([backend]):
            return model(**inputs)
    except RuntimeError as error:  # this kernel refuses this dtype, mask or head size on this card
        pytest.skip(f"torch's {backend.name} kernel refuses this call here: {str(error).splitlines()[0][:120]}")


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_capture_under_each_fast_kernel_equals_eager_output_attentions(arch, dtype, backend):
    dtype, kernel = DTYPES[dtype], BACKENDS[backend]
    build = _llama if arch == "llama" else _bert
    sdpa_model, eager_model = build("sdpa", dtype), build("eager", dtype)
    inputs = _inputs(arch)
    plain = _run_plain(sdpa_model, inputs, kernel)
    with torch.no_grad(), sdpa_kernel([kernel]), TransformerAttentionHooker(sdpa_model, device="cpu") as hooker:
        captured = sdpa_model(**inputs)
    first = plain.logits if arch == "llama" else plain.last_hidden_state
    again = captured.logits if arch == "llama" else captured.last_hidden_state
    assert torch.equal(first, again), "the model's output changed under capture"
    with torch.no_grad():
        expected = eager_model(**inputs, output_attentions=True).attentions
    assert len(hooker.values) == len(expected) == 2
    for (name, calls), want in zip(hooker.values.items(), expected):
        got = calls[0]
        assert got.device.type == "cpu" and got.shape == want.shape == (2, 4, 128, 128), name
        want = want.float().cpu()
        rows = got.float().sum(-1)
        if arch == "bert":  # padded keys get no weight; the padded queries still attend (HF's convention)
            assert got[1, :, :, 100:].abs().max() == 0
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=TOLERANCE[dtype] * 2, rtol=0)
        torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype], rtol=0, msg=lambda m: f"{name}: {m}")


def test_keep_grad_on_cuda_leaves_the_output_bitwise_and_gives_autograds_gradient():
    sdpa_model, eager_model = _llama("sdpa", torch.float32), _llama("eager", torch.float32)
    inputs = _inputs("llama")
    with torch.no_grad():
        plain = sdpa_model(**inputs).logits
    with TransformerAttentionHooker(sdpa_model, keep_grad=True, device=None) as hooker:
        out = sdpa_model(**inputs).logits
        out[:, -1].logsumexp(-1).sum().backward()
    assert torch.equal(out.detach(), plain)
    eager = eager_model(**inputs, output_attentions=True)
    for weights in eager.attentions:
        weights.retain_grad()
    eager.logits[:, -1].logsumexp(-1).sum().backward()
    for (name, grads), want in zip(hooker.gradients.items(), eager.attentions):
        torch.testing.assert_close(grads[0].to(DEVICE), want.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_statistics_pooled_maps_and_streaming_on_cuda_equal_the_full_capture(tmp_path):
    model = _llama("sdpa", torch.float16)
    inputs = dict(input_ids=torch.randint(3, 250, (1, 2048), device=DEVICE))
    with torch.no_grad(), TransformerAttentionHooker(model, device="cpu") as full:  # 32 MiB calls: pinned copies
        model(**inputs)
    expected = HeadStatsAccumulator()
    expected.update({n: c[:1] for n, c in full.values.items()})
    reduced, pooled = HeadStatsAccumulator(), PooledAttention(size=256)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.reduce_into(reduced)
        model(**inputs)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.reduce_into(pooled)
        model(**inputs)
    reduced.add_input(1)
    want, got = expected.result(), reduced.result()
    for key in expected.STATISTICS:
        torch.testing.assert_close(torch.as_tensor(got[key]), torch.as_tensor(want[key]), rtol=2e-3, atol=1e-4)
    for name, calls in full.values.items():
        mean = torch.nn.functional.avg_pool2d(calls[0].float(), 8)
        torch.testing.assert_close(pooled.values[name][0].float(), mean, rtol=0, atol=2e-3)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "s"):
        model(**inputs)
    loaded = load(tmp_path / "s")
    for name, calls in full.values.items():
        assert torch.equal(loaded.values[name][0], calls[0])


def test_last_row_of_a_long_input_under_flash_equals_a_hand_softmax_of_q_and_k():
    model = _llama("sdpa", torch.bfloat16)
    ids = torch.randint(3, 250, (1, LONG), device=DEVICE)
    queries = {}
    attention = model.model.layers[1].self_attn
    handle = attention.q_proj.register_forward_hook(lambda m, a, o: queries.setdefault("q", o))
    handle_k = attention.k_proj.register_forward_hook(lambda m, a, o: queries.setdefault("k", o))
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]), \
                TransformerAttentionHooker(model, rows="last", device="cpu") as hooker:
            model(input_ids=ids)
    finally:
        handle.remove()
        handle_k.remove()
    got = hooker.values["model.layers.1.self_attn"][0]
    assert got.shape == (1, 4, 1, LONG)
    # The oracle: rope applied by the model's own rotary module, then softmax(q k^T / sqrt(d)) by hand.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    positions = torch.arange(LONG, device=DEVICE)[None]
    hidden = torch.zeros(1, LONG, 256, device=DEVICE, dtype=torch.bfloat16)
    cos, sin = model.model.rotary_emb(hidden, positions)
    q = queries["q"].view(1, LONG, 4, 64).transpose(1, 2)
    k = queries["k"].view(1, LONG, 2, 64).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(2, dim=1)
    logits = (q[:, :, -1:].float() @ k.float().transpose(-1, -2)) / 8.0
    want = logits.softmax(-1).cpu()
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=0)
    assert torch.allclose(got.float().sum(-1), torch.ones(1, 4, 1), atol=1e-2)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_sliding_window_tiles_under_each_kernel_equal_eager_and_stream_only_the_window(backend, tmp_path,
                                                                                       monkeypatch):
    """A Mistral's sliding-window mask through band tiles (their keys read from the mask on the model's
    device), on each kernel: the maps equal eager's, statistics equal those of the maps, and a stream
    equals the maps; the model's output stays bitwise its own."""
    from attention_hooker.capture.routes import sdpa

    config = transformers.MistralConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().to(DEVICE)
    ids = torch.randint(3, 250, (2, 96), device=DEVICE)
    with torch.no_grad():
        expected = model(input_ids=ids, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    kernel = BACKENDS[backend]
    plain = _run_plain(model, dict(input_ids=ids), kernel).logits
    monkeypatch.setattr(sdpa, "WHOLE_BYTES", 1)  # tiles of 8 rows, straight into place
    monkeypatch.setattr(sdpa, "TILE_BYTES", 8 * 2 * 4 * 96 * 4)
    monkeypatch.setattr(sdpa, "_tile_bytes", lambda device: 8 * 2 * 4 * 96 * 4)
    stats = HeadStatsAccumulator()
    with torch.no_grad(), sdpa_kernel([kernel]), TransformerAttentionHooker(model, device="cpu") as hooker:
        assert torch.equal(model(input_ids=ids).logits, plain), "the model's output changed under capture"
    with torch.no_grad(), sdpa_kernel([kernel]), TransformerAttentionHooker(model) as reducing, \
            reducing.stream_to(tmp_path / "s", shard_bytes=1):
        reducing.reduce_into(stats)
        model(input_ids=ids)
    streamed = load(tmp_path / "s").values
    for (name, calls), want in zip(hooker.values.items(), expected):
        torch.testing.assert_close(calls[0], want.cpu(), atol=2e-5, rtol=0, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(streamed[name][0], calls[0], atol=1e-6, rtol=0)
        assert not calls[0][:, :, 40:, :24].any(), "keys outside the window carry weight"
    want_stats = HeadStatsAccumulator()
    want_stats.update({n: c[:1] for n, c in hooker.values.items()})
    stats.add_input(2)
    for key in ("entropy", "distance"):
        torch.testing.assert_close(torch.as_tensor(stats.result()[key]), torch.as_tensor(want_stats.result()[key]),
                                   rtol=1e-4, atol=1e-5)


needs_cuda = pytest.mark.skipif(not ON_GPU, reason="device='auto' and pinned copies act on a CUDA device only")


@needs_cuda
def test_auto_keeps_calls_on_the_gpu_within_its_budget_and_the_rest_on_the_cpu_bitwise_equal():
    """The default device: calls stay on the GPU while they fit the budget (here, one layer's worth),
    the next goes to the CPU through pinned copies; every value equals ``device=None``'s (bitwise
    where kept on the GPU)."""
    model = _llama("sdpa", torch.float32)
    ids = torch.randint(3, 250, (1, 512), device=DEVICE)
    with torch.no_grad(), TransformerAttentionHooker(model, device=None) as on_device:
        plain = model(input_ids=ids).logits
    with torch.no_grad(), TransformerAttentionHooker(model) as auto:
        assert torch.equal(model(input_ids=ids).logits, plain)
    assert all(c[0].device.type == "cuda" for c in auto.values.values())  # 4 MiB calls: far within half the GPU
    one_call = 4 * 512 * 512 * 4
    with torch.no_grad(), TransformerAttentionHooker(model) as split:
        split._router.memory.budget._free_memory = lambda device: 2 * one_call + one_call // 2  # half: 1.25 calls
        assert torch.equal(model(input_ids=ids).logits, plain)
    devices = [c[0].device.type for c in split.values.values()]
    assert devices == ["cuda", "cpu"], devices
    for name, calls in on_device.values.items():
        # (the call sent to the CPU is computed in tiles: the same formula, a GEMM of another layout)
        torch.testing.assert_close(split.values[name][0].cpu(), calls[0].cpu(), rtol=0, atol=1e-6)
        assert torch.equal(auto.values[name][0], calls[0]), name
    from attention_hooker import attention_rollout

    # layers on two devices meet on the CPU where they combine
    torch.testing.assert_close(attention_rollout(split.values).cpu(), attention_rollout(on_device.values).cpu())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_long_capture_to_the_cpu_in_tiles_through_pinned_copies_equals_the_one_kept_on_the_gpu(dtype, monkeypatch):
    """Tiles of rows computed on the GPU and copied through the two pinned buffers while the next
    is computed: the stored map equals the map kept on the GPU in the same tiles, bitwise."""
    from attention_hooker.capture.routes import sdpa

    monkeypatch.setattr(sdpa, "_tile_bytes", lambda device: 8 * 2**20)  # 128 rows a tile, both ways: 32 tiles
    model = _llama("sdpa", torch.float32)
    ids = torch.randint(3, 250, (1, 4096), device=DEVICE)
    with torch.no_grad(), TransformerAttentionHooker(model, device=None, dtype=dtype) as on_device:
        model(input_ids=ids)
    with torch.no_grad(), TransformerAttentionHooker(model, device="cpu", dtype=dtype) as on_cpu:
        model(input_ids=ids)
    for name, calls in on_device.values.items():
        got = on_cpu.values[name][0]
        assert got.device.type == "cpu" and got.dtype == dtype
        assert torch.equal(got, calls[0].cpu()), name


@needs_cuda
def test_pinned_copies_equal_a_plain_copy_and_the_source_may_be_overwritten_at_once():
    from attention_hooker.keep.host_copy import HostCopies

    torch.manual_seed(0)
    whole = torch.zeros(2, 3, 300, 500, dtype=torch.float16)
    copies = HostCopies(torch.device(DEVICE), staging_bytes=64 * 1024)  # many pieces, two in flight
    scratch = torch.empty(2, 3, 37, 400, device=DEVICE)
    kept = []
    for first in range(0, 300, 37):
        rows = min(37, 300 - first)
        tile = scratch[:, :, :rows].normal_()  # the same scratch each time, as the tiles use it
        kept.append((first, tile.clone()))  # on the device: no synchronisation between the copies
        copies.copy(whole[:, :, first:first + rows, 50:450], tile)
    copies.finish()
    expected = torch.zeros_like(whole)
    for first, tile in kept:
        expected[:, :, first:first + tile.shape[2], 50:450] = tile.half().cpu()
    assert torch.equal(whole, expected)
