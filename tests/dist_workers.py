"""What each rank of the multi-process tests runs (spawned by tests/test_distributed.py; gloo on CPU).

Each worker builds the same model on every rank, wraps it, captures an input of its own
(seeded by its rank) and checks the capture against the unwrapped model's capture of
the same input: values, layer names, and (with keep_grad) gradients. A failed check
raises, and torch.multiprocessing.spawn hands the error to the test.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch
import torch.distributed as dist


def _exits_at_once(worker):
    """A worker that passed leaves without the interpreter's teardown: under load, gloo's
    threads were once torn down mid-flight there ("terminate called without an active
    exception", SIGABRT) after every check had passed. A failure still raises, and
    torch.multiprocessing.spawn reports it."""

    @functools.wraps(worker)
    def run(*args):
        worker(*args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    return run


@contextlib.contextmanager
def _gloo_group(rank: int, world_size: int, port: int):
    """This process as rank ``rank`` of a gloo group on this machine, for the block."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _bert(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()


def _capture(model, inputs, **options):
    from attention_hooker import TransformerAttentionHooker

    with TransformerAttentionHooker(model, **options) as hooker:
        out = model(**inputs)
        if options.get("keep_grad"):
            out.last_hidden_state.pow(2).mean().backward()
    return hooker


def _assert_same_capture(wrapped, plain, what):
    assert list(wrapped.values) == list(plain.values), (what, list(wrapped.values)[:2], list(plain.values)[:2])
    for name, calls in plain.values.items():
        assert len(wrapped.values[name]) == len(calls), (what, name)
        for got, want in zip(wrapped.values[name], calls):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")
    for name, grads in plain.gradients.items():
        for got, want in zip(wrapped.gradients[name], grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7, msg=f"{what}: gradient of {name}")


@_exits_at_once
def wrapped_models(rank: int, world_size: int, port: int, path: str, wrapper: str) -> None:
    with _gloo_group(rank, world_size, port):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        texts = [["Rank zero reads this sentence.", "And a second one."], ["Rank one reads another text."]][rank % 2]
        inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
        keep_grad = wrapper in ("ddp", "fsdp2")
        torch.manual_seed(0)
        plain = _capture(_bert(path), inputs, keep_grad=keep_grad)
        model = _bert(path)
        if wrapper == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        elif wrapper == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy
            from transformers.models.bert.modeling_bert import BertLayer

            wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({BertLayer}),
                                               use_orig_params=True, device_id=torch.device("cpu"))
        elif wrapper == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world_size,))
            for layer in model.encoder.layer:
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        elif wrapper == "data_parallel":
            wrapped = torch.nn.DataParallel(model)
        else:
            raise AssertionError(wrapper)
        torch.manual_seed(0)
        captured = _capture(wrapped, inputs, keep_grad=keep_grad)
        _assert_same_capture(captured, plain, f"{wrapper} rank {rank}")
        if wrapper in ("ddp", "fsdp1", "data_parallel"):
            from attention_hooker import TransformerAttentionHooker

            full = TransformerAttentionHooker(wrapped, wrapper_names=True).hooked_layers
            assert all(n.startswith("module.") or "_fsdp_wrapped_module" in n for n in full), full[:2]
        dist.barrier()


@_exits_at_once
def streamed_ranks(rank: int, world_size: int, port: int, path: str, folder: str) -> None:
    """Each rank streams the capture of its own input; rank 0 loads the folder as one capture."""
    from transformers import AutoTokenizer

    from attention_hooker import TransformerAttentionHooker, load

    with _gloo_group(rank, world_size, port):
        tokenizer = AutoTokenizer.from_pretrained(path)
        texts = [["Rank zero reads this sentence."], ["Rank one reads another, longer text than that."]]
        model = _bert(path)
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            stream = hooker.stream_to(folder, shard_bytes=1)
            model(**tokenizer(texts[rank], return_tensors="pt"))
        assert stream.folder.endswith(f"rank-{rank:05d}"), stream.folder
        dist.barrier()
        if rank == 0:
            loaded = load(folder)
            assert loaded.metadata["ranks"] == {f"rank-{r:05d}": {n: 1 for n in loaded.values} for r in range(2)}
            for r in range(world_size):
                expected = _capture(model, dict(tokenizer(texts[r], return_tensors="pt")))
                for name, calls in expected.values.items():
                    torch.testing.assert_close(loaded.values[name][r], calls[0], rtol=1e-5, atol=1e-6)
        dist.barrier()


@_exits_at_once
def tensor_parallel(rank: int, world_size: int, port: int, path: str, route: str) -> None:
    """A LLaMA whose attention is split by heads over the ranks (colwise q/k/v, rowwise o)."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from attention_hooker import TransformerAttentionHooker
    from attention_hooker.distributed import assemble_heads

    with _gloo_group(rank, world_size, port):
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=route).eval()
        ids = torch.randint(3, 60, (2, 11))
        with torch.no_grad(), TransformerAttentionHooker(model) as whole:
            expected_logits = model(ids).logits
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.model.layers:
            parallelize_module(layer.self_attn, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                                       "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            logits = model(ids).logits
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
        local = 8 // world_size
        for name, calls in whole.values.items():
            assert hooker.head_indices[name] == list(range(rank * local, rank * local + local)), hooker.head_indices
            torch.testing.assert_close(hooker.values[name][0], calls[0][:, rank * local:(rank + 1) * local],
                                       rtol=1e-5, atol=1e-6)
        assembled = assemble_heads(hooker)
        assert list(assembled) == list(whole.values)
        for name, calls in whole.values.items():
            torch.testing.assert_close(assembled[name][0], calls[0], rtol=1e-5, atol=1e-5)
        dist.barrier()


@_exits_at_once
def transformers_tp_plan(rank: int, world_size: int, port: int, path: str) -> None:
    """A LLaMA loaded with transformers' own tensor-parallel plan (tp_plan="auto")."""
    import transformers

    from attention_hooker import TransformerAttentionHooker
    from attention_hooker.distributed import assemble_heads

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", attn_implementation="sdpa").eval()
    try:
        ids = torch.arange(3, 14)[None]
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            logits = model(ids).logits
        assembled = assemble_heads(hooker)
        reference = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
        with torch.no_grad(), TransformerAttentionHooker(reference) as whole:
            expected = reference(ids).logits
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        for name, calls in whole.values.items():
            assert hooker.head_indices[name] == list(range(rank * 4, rank * 4 + 4))
            torch.testing.assert_close(assembled[name][0], calls[0], rtol=1e-5, atol=1e-5)
        dist.barrier()
    finally:
        dist.destroy_process_group()
