"""Issue 12: many processes. torchrun's environment, statistics merged exactly across ranks,
and `torchrun -m attention_hooker stats` giving the numbers of one process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from attention_hooker import AttentionHookerError, HeadStatsAccumulator
from attention_hooker.distributed import Launch, launch_from_environment, share

FULL = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_the_launch_is_read_from_torchruns_environment():
    assert launch_from_environment({}) is None
    assert launch_from_environment(dict(FULL, WORLD_SIZE="1")) is None, "a job of one runs as one process"
    assert launch_from_environment(FULL) == Launch(0, 2, 0)
    assert launch_from_environment(dict(FULL, RANK="1", LOCAL_RANK="1")).is_main is False


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "1"}, r"launched half configured: RANK=1 set but WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"),
    ({k: v for k, v in FULL.items() if k != "MASTER_PORT"}, r"MASTER_PORT not; start every process with torchrun"),
    (dict(FULL, RANK="one"), r"RANK='one'.* must be whole numbers"),
    (dict(FULL, RANK="2"), r"RANK=2 is not one of the WORLD_SIZE=2 ranks \(0..1\)"),
])
def test_a_half_configured_launch_is_refused_by_name(environ, message):
    with pytest.raises(AttentionHookerError, match=message):
        launch_from_environment(environ)


def test_shares_cover_the_lines_once_in_order():
    lines = list(range(11))
    for world in (1, 2, 3, 4, 16):
        shares = [share(lines, rank, world) for rank in range(world)]
        assert sum(shares, []) == lines
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_statistics_merged_from_shares_equal_those_of_all_inputs_at_once(minilm_sdpa, minilm_tokenizer):
    from attention_hooker import TransformerAttentionHooker

    texts = ["One short line.", "A somewhat longer line of text here.", "Three.", "Attention is all you need."]
    whole, halves = HeadStatsAccumulator(sink_positions=[0, 1]), [HeadStatsAccumulator(sink_positions=[0, 1])
                                                                  for _ in range(2)]
    for accumulator, batch in [(whole, texts[:2]), (whole, texts[2:]), (halves[0], texts[:2]), (halves[1], texts[2:])]:
        enc = minilm_tokenizer(batch, return_tensors="pt", padding=True)
        with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
            hooker.reduce_into(accumulator, padding_mask=enc["attention_mask"])
            minilm_sdpa(**enc)
            accumulator.add_input(len(batch))
    merged = HeadStatsAccumulator(sink_positions=[0, 1])
    for half in halves:
        merged.merge_state(half.state())
    assert merged.layers == whole.layers and merged.sequences == whole.sequences == 4
    for key, table in whole.result().items():
        assert abs(merged.result()[key] - table).max() < 1e-12, key
    with pytest.raises(AttentionHookerError, match="give every process the same sink_positions"):
        HeadStatsAccumulator().merge_state(halves[0].state())


def _stats(minilm_path, text_file, out, *launcher):
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, *launcher, "-m", "attention_hooker", "stats", "--model", str(minilm_path),
               "--text-file", str(text_file), "--out", str(out), "--batch-size", "8"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _table(path):
    with open(path) as handle:
        return {(row["layer"], row["head"]): row for row in csv.DictReader(handle)}


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


@pytest.mark.parametrize("n_lines", [200, 1], ids=["200_lines", "one_line_for_two_ranks"])
def test_torchrun_stats_on_two_gloo_ranks_writes_the_csv_of_one_process(minilm_path, tmp_path, n_lines):
    words = "the cat sat on a mat while attention heads looked at every token of it".split()
    text = "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 23)) for i in range(n_lines))
    text_file = tmp_path / "lines.txt"
    text_file.write_text(text + "\n")
    one = _stats(minilm_path, text_file, tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = _stats(minilm_path, text_file, tmp_path / "two", *TORCHRUN)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("model:") == 1, "rank 0 alone prints the summary"
    assert "ranks:   2 (gloo)" in two.stdout and f"lines:   {n_lines} in" in two.stdout
    single, merged = _table(tmp_path / "one" / "head_stats.csv"), _table(tmp_path / "two" / "head_stats.csv")
    assert single.keys() == merged.keys() and len(single) == 6 * 12
    for key, row in single.items():
        for column, value in row.items():
            if column not in ("layer", "head"):
                assert abs(float(merged[key][column]) - float(value)) <= 1e-6 * max(1.0, abs(float(value))), (key, column)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def test_stats_launched_half_configured_says_so_in_one_line(minilm_path, tmp_path):
    text_file = tmp_path / "lines.txt"
    text_file.write_text("one line\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", RANK="1")
    for name in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "attention_hooker", "stats", "--model", str(minilm_path),
                             "--text-file", str(text_file), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0].startswith("attention-hooker stats: error: launched half configured: RANK=1")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp1", "fsdp2", "data_parallel"])
def test_wrapped_models_capture_per_rank_what_the_unwrapped_model_gives_under_the_same_names(wrapper, minilm_path):
    """Two gloo ranks, each with its own input: values (and gradients with keep_grad, under DDP
    and FSDP2) equal those of the unwrapped model, and layer names carry no wrapper prefix."""
    import torch.multiprocessing as mp

    import dist_workers

    mp.spawn(dist_workers.wrapped_models, args=(2, _free_port(), str(minilm_path), wrapper), nprocs=2, join=True)


def test_a_capture_streamed_by_two_ranks_loads_as_one(minilm_path, tmp_path):
    import torch.multiprocessing as mp

    import dist_workers

    mp.spawn(dist_workers.streamed_ranks, args=(2, _free_port(), str(minilm_path), str(tmp_path / "c")), nprocs=2,
             join=True)
    assert sorted(os.listdir(tmp_path / "c")) == ["rank-00000", "rank-00001"]


@pytest.mark.parametrize("route", ["sdpa", "eager"])
def test_tensor_parallel_heads_are_labelled_globally_and_assemble_to_the_unsharded_capture(route):
    import torch.multiprocessing as mp

    import dist_workers

    mp.spawn(dist_workers.tensor_parallel, args=(2, _free_port(), "", route), nprocs=2, join=True)


def test_a_model_dispatched_by_device_map_with_disk_offload_is_captured_and_its_outputs_unchanged(
        minilm_path, minilm_tokenizer, tmp_path):
    """accelerate's hooks move each offloaded layer's weights in for its forward and out after;
    the capture sits beside them: the same weights as the plain model, the same outputs."""
    pytest.importorskip("accelerate", reason="accelerate is a dev dependency: pip install -e '.[dev]'")
    from transformers import AutoModel

    from attention_hooker import TransformerAttentionHooker

    device_map = {"embeddings": "cpu", "pooler": "cpu",
                  **{f"encoder.layer.{i}": ("disk" if i % 2 else "cpu") for i in range(6)}}
    dispatched = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa", device_map=device_map,
                                           offload_folder=str(tmp_path)).eval()
    plain = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    assert hasattr(dispatched.encoder.layer[1], "_hf_hook"), "layer 1 is offloaded to disk by accelerate"
    inputs = minilm_tokenizer(["Offloaded layers come in from disk.", "Short."], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = dispatched(**inputs).last_hidden_state
        with TransformerAttentionHooker(dispatched) as hooker:
            during = dispatched(**inputs).last_hidden_state
        with TransformerAttentionHooker(plain) as reference:
            plain(**inputs)
    assert torch.equal(during, before), "outputs unchanged"
    assert list(hooker.values) == list(reference.values) and len(hooker.values) == 6
    for name, calls in reference.values.items():
        torch.testing.assert_close(hooker.values[name][0], calls[0], rtol=1e-6, atol=1e-7)


def test_layers_wrapped_for_activation_checkpointing_keep_their_names_and_values(minilm_path, minilm_tokenizer):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers import AutoModel
    from transformers.models.bert.modeling_bert import BertLayer

    from attention_hooker import TransformerAttentionHooker

    plain = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    wrapped = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, BertLayer))
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_modules())
    inputs = minilm_tokenizer(["Checkpointed layers."], return_tensors="pt")
    with torch.no_grad(), TransformerAttentionHooker(plain) as expected, TransformerAttentionHooker(wrapped) as got:
        plain(**inputs)
        wrapped(**inputs)
    assert list(got.values) == list(expected.values)
    for name, calls in expected.values.items():
        torch.testing.assert_close(got.values[name][0], calls[0])
    full = TransformerAttentionHooker(wrapped, wrapper_names=True).hooked_layers
    assert all("_checkpoint_wrapped_module" in name for name in full)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL needs two GPUs: runs wherever they are available")
def test_torchrun_stats_on_two_nccl_ranks_writes_the_csv_of_one_process(minilm_path, tmp_path):
    text_file = tmp_path / "lines.txt"
    text_file.write_text("\n".join(f"line {i} of a small corpus for two GPUs" for i in range(40)) + "\n")
    one = _stats(minilm_path, text_file, tmp_path / "one")
    two = _stats(minilm_path, text_file, tmp_path / "two", *TORCHRUN)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert "ranks:   2 (nccl)" in two.stdout
    single, merged = _table(tmp_path / "one" / "head_stats.csv"), _table(tmp_path / "two" / "head_stats.csv")
    for key, row in single.items():
        for column, value in row.items():
            if column not in ("layer", "head"):
                assert abs(float(merged[key][column]) - float(value)) <= 1e-4, (key, column)  # GPU kernels vs CPU


def test_transformers_tp_plan_heads_assemble_to_the_unsharded_capture(tmp_path):
    import torch.multiprocessing as mp
    import transformers

    import dist_workers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    mp.spawn(dist_workers.transformers_tp_plan, args=(2, _free_port(), str(tmp_path / "llama")), nprocs=2, join=True)
