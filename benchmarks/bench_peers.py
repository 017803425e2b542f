"""Cost of capture next to the peers that also give per-head attention maps, as ratios to the plain forward.

Run by hand (not part of the test suite), after making the peers' environments once:

    benchmarks/peers_setup.sh /work/peers
    HF_HUB_OFFLINE=1 python benchmarks/bench_peers.py [--rounds 15] [--repeat 0] [--sizes 1x128,8x128,1x512]
                                                      [--only gpt2|vit] [--peers /work/peers] [--threads 2]
                                                      [--warm] [--allocator default|steady]
                                                      [--no-memory | --memory-only]

A full default run takes roughly 25 minutes on 2 idle threads of a slow VM (GPT-2 (1, 128) at 0.8 s a
forward), and over twice that beside a busy test suite (estimated; ``--rounds 3 --repeat 3`` took 38 minutes there).

Nothing is downloaded: the models are built here with random weights (seed 0), saved once in a
temporary folder, and every contender loads that folder, so all of them run identical weights.

Works (CPU, ``--threads`` threads):

- GPT-2 small (the official gpt2 config: 12 layers, 12 heads, 768 dims, vocab 50257) as a
  ``GPT2LMHeadModel``, at (batch, tokens) = (1, 128), (8, 128) and (1, 512);
- timm ViT-S/16 (``vit_small_patch16_224``), batch 8 of 224x224 images.

Contenders, each giving the maps of every layer and head for each call:

- ours:          TransformerAttentionHooker on the sdpa model (the fused-attention timm model),
                 attached once; per call: forward, read ``hooker.values``, ``hooker.clear()``
- ours_weights:  the same with ``output_from="weights"``: the output is computed from the
                 captured weights instead of by the kernel (outputs equal within float tolerance)
- hf_eager:      the eager model called with ``output_attentions=True`` (project environment)
- tl_bridge:     TransformerLens 4 ``TransformerBridge.boot_transformers(folder)``,
                 ``run_with_cache`` keeping only the ``hook_pattern`` activations (``tl4``)
- nnsight:       nnsight 0.8 ``NNsight`` around the eager model, saving ``attn.output[1]`` (the
                 weights) of every block in a ``trace`` (``tl4``)
- tl3_hooked:    TransformerLens 3 ``HookedTransformer`` built from a ``HookedTransformerConfig``
                 and the converted weights, with no weight processing (no LayerNorm folding, no
                 centering) so that its maps are the model's; ``run_with_cache`` with a names
                 filter for ``hook_pattern`` (``tl3``)
- timm_fx, timm_hook: timm's ``AttentionExtract`` (``method="fx"``: a traced graph that returns
                 the softmax nodes, and so stops after the last one; ``method="hook"``: forward
                 hooks on ``attn_drop``), on the model with ``fused_attn`` off (project environment)

Every contender's maps are compared with ours on the benchmark's own input before any timing; one
whose maps differ by 1e-5 or more is reported as differing and not timed.

Method: one long-lived worker process per (environment, work), speaking JSON lines on
stdin/stdout; the driver waits for each answer, so workers never run at the same time. Each worker
times against a plain forward of the sdpa model (fused timm model) in its own process, as the
environments may hold different torch builds. In each round the driver asks the workers in a
shuffled order; a worker takes its contenders in a shuffled order and times, for each, a block of
``--repeat`` plain forwards and a block of ``--repeat`` calls of the contender (the two blocks in a
random order); the default ``--repeat 0`` takes as many calls as make about one second of plain
forwards in that worker (1 to 5), so that the large works do not take hours. A ratio is contender/plain within one round; the table shows the median over
``--rounds`` rounds and the quartiles. One untimed call of everything comes before the first round.

``--warm`` puts one untimed call before every timed block (the plain ones too). Without it, a block's
first call pays for what the contender before it in the same process did to the C heap: glibc gives
freed memory back to the system, and the next call faults it in again (ViT-S at batch 8 measured
25,000-83,000 page faults per call in a mixed order, 5,000-6,000 in a row of the same contender).
With it, each contender runs as in a loop over a dataset; without it, as after other work.

Each row also gives the minor page faults per call (``ru_minflt``), of the plain forward and of each
contender: on this project's CPU machine a fault costs about 2 us, and glibc's heap decides how many
there are. Its mmap threshold grows with what was freed before, and it gives memory back to the
system past a trim threshold, so two identical forwards in two processes can differ by tens of
thousands of faults (ViT-S at batch 8, measured: the plain sdpa model 51,000 per call, the eager one
4,900 in a process of its own and 52,000 beside other models; 13% of the forward). That is the
process's history, not the work. ``--allocator steady`` fixes glibc's thresholds in every worker
(``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``, environment variables glibc reads at
start; elsewhere they do nothing), so that the figures are the work's: a timing worker keeps every
byte under 32 MiB it freed for reuse (as ``bench_capture.py --allocator steady`` does; larger tensors, such
as GPT-2's logits, are mapped and faulted alike for every contender), and a memory
process maps every allocation of 1 MiB or more on its own and returns it when it is freed (the peak is
the bytes alive, not the heap's holes). ``--allocator default`` leaves glibc as a user's
process has it.

Memory (GPT-2 at (1, 512)): each contender in three fresh processes; the peak RSS (``ru_maxrss``,
its high-water mark reset through ``/proc/self/clear_refs`` once the model is loaded, one plain
forward of it ran and the C heap gave back what that forward freed, ``malloc_trim``) minus the RSS at that point, in MB, median of the three (and the median ratio of the
two). ``--memory-only`` measures only this row.

A peer environment that is missing is reported in one line and its columns are left empty.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

GPT2_SIZES = [(1, 128), (8, 128), (1, 512)]
VIT_BATCH = 8
MEMORY_SIZE = (1, 512)
TOLERANCE = 1e-5
BLOCK_SECONDS, MAX_REPEAT = 1.0, 5  # --repeat 0: plain calls enough for about a second, 1 to 5
MEMORY_PROCESSES = 3
# --allocator steady: glibc's thresholds in the workers' environment (see the module's docstring).
# Timing: everything under 32 MiB (glibc's largest threshold on 64 bits) from the heap, which never shrinks.
STEADY_TIMING = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**36)}
STEADY_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}  # 1 MiB and over: a mapping of its own, freed at once
VIT_NAME = "vit_small_patch16_224"

# contender -> environment it runs in ("project" is the interpreter running this driver)
ENVIRONMENT = {
    "ours": "project", "ours_weights": "project", "hf_eager": "project", "timm_fx": "project",
    "timm_hook": "project", "tl_bridge": "tl4", "nnsight": "tl4", "tl3_hooked": "tl3",
}
CONTENDERS = {
    "gpt2": ["ours", "ours_weights", "hf_eager", "tl_bridge", "nnsight", "tl3_hooked"],
    "vit": ["ours", "ours_weights", "timm_fx", "timm_hook"],
}
PEERS = ["hf_eager", "tl_bridge", "nnsight", "tl3_hooked", "timm_fx", "timm_hook"]
# table columns: (title, contenders shown in the cell, joined by " / ")
COLUMNS = [
    ("ours", ["ours"]),
    ('ours (output_from="weights")', ["ours_weights"]),
    ("HF eager", ["hf_eager"]),
    ("TL4 bridge", ["tl_bridge"]),
    ("nnsight", ["nnsight"]),
    ("TL3 HookedTransformer", ["tl3_hooked"]),
    ("timm fx / hook", ["timm_fx", "timm_hook"]),
]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- models (any environment)
def _gpt2(folder: str, implementation: str):
    """The saved GPT-2 as a ``GPT2LMHeadModel`` with the given attention implementation."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder, attn_implementation=implementation).eval()


def _vit(folder: str, fused: bool):
    """The saved ViT-S/16, its attention fused (sdpa) or not (softmax visible to timm's extractor)."""
    import timm

    model = timm.create_model(VIT_NAME, pretrained=False)
    model.load_state_dict(torch.load(Path(folder) / "vit.pt"))
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model.eval()


def _gpt2_forward(model):
    """A call of an HF GPT-2 on token ids, without the key/value cache."""
    return lambda x: model(input_ids=x, use_cache=False)


def _plain(work: str, folder: str):
    """The reference every ratio divides by: a forward of the never-hooked sdpa (fused) model."""
    return _gpt2_forward(_gpt2(folder, "sdpa")) if work == "gpt2" else _vit(folder, fused=True)


# ---------------------------------------------------------------- contenders
# Each builder returns (plain, run): ``plain(x)`` is an uncaptured forward of the contender's own
# model (used by the memory measurement), ``run(x)`` does the contender's work and returns the maps
# as a list of (batch, heads, query, key) tensors, one per layer in model order.


def _ours(work: str, folder: str, output_from: str = "kernel"):
    """Our hooker, attached at the first run and kept attached; values read and cleared per call."""
    from attention_hooker import TransformerAttentionHooker

    model = _gpt2(folder, "sdpa") if work == "gpt2" else _vit(folder, fused=True)
    forward = _gpt2_forward(model) if work == "gpt2" else model
    hooker = TransformerAttentionHooker(model, output_from=output_from)
    attached = []  # attached once, at the first run (a plain forward may come before it)

    def run(x):
        if not attached:
            attached.append(hooker.setup())
        forward(x)
        maps = [calls[0] for calls in hooker.values.values()]
        hooker.clear()
        return maps

    return forward, run


def _ours_weights(work: str, folder: str):
    """Our hooker with ``output_from="weights"``."""
    return _ours(work, folder, output_from="weights")


def _hf_eager(work: str, folder: str):
    """The eager model asked for ``output_attentions=True``."""
    model = _gpt2(folder, "eager")
    return _gpt2_forward(model), lambda x: list(model(input_ids=x, use_cache=False, output_attentions=True).attentions)


def _tl_bridge(work: str, folder: str):
    """TransformerLens 4: the bridge booted from the saved folder, caching only the patterns."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(folder, device="cpu")
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(bridge.cfg.n_layers)]
    wanted = set(names)

    def run(x):
        _, cache = bridge.run_with_cache(x, names_filter=lambda name: name in wanted)
        return [cache[name] for name in names]

    return bridge, run


def _nnsight(work: str, folder: str):
    """nnsight: a trace of the eager model that saves each block's attention weights."""
    from nnsight import NNsight

    model = _gpt2(folder, "eager")
    traced = NNsight(model)

    def run(x):
        maps = []
        with traced.trace(x, use_cache=False):
            for block in traced.transformer.h:
                maps.append(block.attn.output[1].save())
        return maps

    return _gpt2_forward(model), run


def _tl3_hooked(work: str, folder: str):
    """TransformerLens 3: a HookedTransformer holding the HF weights unprocessed."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    hf = _gpt2(folder, "eager")
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn=c.activation_function,
        normalization_type="LN", eps=c.layer_norm_epsilon, positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", default_prepend_bos=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False,
    )
    model.eval()
    del hf
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(cfg.n_layers)]

    def run(x):
        _, cache = model.run_with_cache(x, names_filter=lambda name: name.endswith("hook_pattern"))
        return [cache[name] for name in names]

    return model, run


def _timm(method: str):
    """A builder for timm's AttentionExtract with this method, on the unfused model."""

    def build(work: str, folder: str):
        from timm.utils import AttentionExtract

        model = _vit(folder, fused=False)
        extract = AttentionExtract(model, method=method)
        return model, lambda x: list(extract(x).values())

    return build


BUILDERS = {
    "ours": _ours, "ours_weights": _ours_weights, "hf_eager": _hf_eager, "tl_bridge": _tl_bridge,
    "nnsight": _nnsight, "tl3_hooked": _tl3_hooked, "timm_fx": _timm("fx"), "timm_hook": _timm("hook"),
}


# ---------------------------------------------------------------- worker side
def _one_line(error: BaseException) -> str:
    """An exception as one short line."""
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text[:200]


def _max_diff(maps, reference) -> float:
    """Largest absolute difference between two lists of maps (inf when their shapes differ)."""
    if len(maps) != len(reference):
        return float("inf")
    worst = 0.0
    for a, b in zip(maps, reference):
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, (a.detach().float().cpu() - b.float()).abs().max().item())
    return worst


def _minor_faults() -> int:
    """Minor page faults of this process so far (pages the kernel mapped on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _block(fn, x, repeat: int, warm: bool = False) -> tuple:
    """``(seconds, minor page faults)`` per call over ``repeat`` calls (after one untimed call of
    ``fn`` when ``warm``)."""
    if warm:
        fn(x)
    faults, start = _minor_faults(), time.perf_counter()
    for _ in range(repeat):
        fn(x)
    return (time.perf_counter() - start) / repeat, (_minor_faults() - faults) / repeat


def _round(plain, runs: dict, x, repeat: int, warm: bool = False) -> tuple:
    """One round: for each contender in a shuffled order, a plain block and its own block (each
    after one untimed call of what it times, when ``warm``).

    Returns ``(times, faults)``: ``{contender: [plain, its own]}`` in seconds and in minor page
    faults, per call."""
    times, faults = {}, {}
    order = list(runs)
    random.shuffle(order)
    for name in order:
        pair = [("plain", plain), (name, runs[name])]
        random.shuffle(pair)
        measured = {label: _block(fn, x, repeat, warm) for label, fn in pair}
        times[name] = [measured["plain"][0], measured[name][0]]
        faults[name] = [measured["plain"][1], measured[name][1]]
    return times, faults


def _checked_runs(config: dict, x) -> tuple:
    """Builds the worker's contenders and keeps those whose maps equal the reference.

    The worker that holds ``ours`` writes the reference (ours' maps on this input) first."""
    runs, diffs, errors = {}, {}, {}
    for name in config["contenders"]:
        try:
            runs[name] = BUILDERS[name](config["work"], config["folder"])[1]
        except Exception as error:  # noqa: BLE001 - a peer whose API or install does not fit: reported
            errors[name] = f"could not be built: {_one_line(error)}"
    if "ours" in runs:
        torch.save(runs["ours"](x), config["reference"])
    reference = torch.load(config["reference"]) if os.path.exists(config["reference"]) else None
    for name in list(runs):
        try:
            maps = runs[name](x)
        except Exception as error:  # noqa: BLE001 - reported in the table, not timed
            errors[name] = f"failed: {_one_line(error)}"
            del runs[name]
            continue
        if reference is None:
            errors[name] = "no reference maps (ours did not run)"
            del runs[name]
            continue
        diffs[name] = _max_diff(maps, reference)
        if not diffs[name] < TOLERANCE:
            errors[name] = f"maps differ from ours (max abs diff {diffs[name]:.2e}), not timed"
            del runs[name]
    return runs, diffs, errors


def _reply(message: dict) -> None:
    """One JSON line to the driver."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def worker_main(config: dict) -> None:
    """A timing worker: builds and checks its contenders, then answers rounds until told to quit."""
    torch.set_num_threads(config["threads"])
    warnings.simplefilter("ignore")
    x = torch.load(config["inputs"])
    with torch.no_grad():
        plain = _plain(config["work"], config["folder"])
        runs, diffs, errors = _checked_runs(config, x)
        plain_s = _block(plain, x, 1)[0]  # the untimed warm-up of everything (it sizes the automatic blocks)
        for run in runs.values():
            run(x)
        auto = min(MAX_REPEAT, max(1, round(BLOCK_SECONDS / plain_s)))
        _reply({"torch": torch.__version__, "diffs": diffs, "errors": errors, "timed": list(runs)})
        for line in sys.stdin:
            request = json.loads(line)
            if request["cmd"] != "round":
                break
            times, faults = _round(plain, runs, x, request["repeat"] or auto, request.get("warm", False))
            _reply({"times": times, "faults": faults})


def _rss_kb() -> int:
    """The process's resident set size now, in KiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _trim_heap() -> None:
    """Gives the C heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Without it the base RSS holds whatever the plain forward freed but glibc kept (its logits, its
    activations), and a contender whose work happens to reuse those holes shows a smaller peak over
    that base than one whose work does not: a difference of heap layout, not of the work."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_main(config: dict) -> None:
    """A memory process: one contender's model, one plain forward, then two calls of its work.

    Prints ``{"base": RSS, "peak": ru_maxrss}`` in KiB; the high-water mark is reset after the
    plain forward, so the loading's own peak does not count."""
    torch.set_num_threads(config["threads"])
    warnings.simplefilter("ignore")
    x = torch.load(config["inputs"])
    with torch.no_grad():
        plain, run = BUILDERS[config["contender"]](config["work"], config["folder"])
        plain(x)
        _trim_heap()  # the base is memory in use: what the plain forward freed is given back first
        base = _rss_kb()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets the peak RSS to the current RSS
        for _ in range(2):
            run(x)
    _reply({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})


# ---------------------------------------------------------------- driver side
class Worker:
    """A worker process in one environment, talked to in JSON lines; its stderr goes to a log."""

    def __init__(self, python: str, config: dict, log: Path, malloc: dict | None = None):
        self.log = log
        self.names = config["contenders"]
        self._stderr = log.open("w")
        self.process = subprocess.Popen(
            [python, __file__, "--worker", json.dumps(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, env=_worker_env(config["threads"], malloc),
        )

    def answer(self) -> dict:
        """The next JSON line it writes (other printed lines are skipped); raises if it died."""
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker died: {_last_line(self.log)}")

    def ask(self, request: dict) -> dict:
        """Sends a request and waits for the answer; raises RuntimeError if the worker died."""
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except OSError:
            pass  # it died: answer() says why
        return self.answer()

    def close(self) -> None:
        try:
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.close()
        except OSError:
            pass
        self.process.wait()
        self._stderr.close()


def _worker_env(threads: int, malloc: dict | None = None) -> dict:
    """The environment of a worker: offline, ``threads`` threads, nothing of this venv's path, and
    ``malloc``'s glibc settings (``--allocator steady``); glibc's own from the caller's environment are
    dropped, so that ``--allocator default`` is what a user's process gets."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(OFFLINE, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(malloc or {}))
    return env


def _last_line(log: Path) -> str:
    """The last non-empty line of a worker's stderr log."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def _environments(peers: Path) -> dict:
    """{environment: python}, missing peer environments left out with a one-line message."""
    found = {"project": sys.executable}
    for name in ("tl4", "tl3"):
        python = peers / name / "bin" / "python"
        if python.exists():
            found[name] = str(python)
        else:
            print(f"note: no peer environment {peers / name} (make it with benchmarks/peers_setup.sh "
                  f"{peers}); its contenders are skipped", file=sys.stderr)
    return found


def _save_models(folder: Path, works) -> None:
    """Builds the models with random weights (seed 0) and saves them where the workers load them."""
    if "gpt2" in works:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(folder / "gpt2")
        _save_tokenizer(folder / "gpt2", config.vocab_size)
    if "vit" in works:
        import timm

        torch.manual_seed(0)
        torch.save(timm.create_model(VIT_NAME, pretrained=False).state_dict(), folder / "vit.pt")


def _save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary: TransformerLens' bridge loads one with the
    model (the benchmark feeds token ids; gpt2's real tokenizer would need the hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special,
                                   unk_token=special)
    fast.save_pretrained(folder)


def _inputs(folder: Path, work: str, size: tuple) -> Path:
    """Saves the work's input (token ids, or images) once, for every worker to load."""
    generator = torch.Generator().manual_seed(1)
    if work == "gpt2":
        x = torch.randint(0, 50257, size, generator=generator)
    else:
        x = torch.randn(size[0], 3, 224, 224, generator=generator)
    path = folder / f"inputs_{work}_{size[0]}x{size[1]}.pt"
    torch.save(x, path)
    return path


def _quartiles(values: list) -> tuple:
    """First and third quartiles (the value twice for a single round)."""
    if len(values) < 2:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=4)
    return cuts[0], cuts[2]


def bench_work(work: str, size: tuple, folder: Path, environments: dict, args) -> dict:
    """Times every contender of one work in interleaved rounds.

    Returns ``{contender: {"ratio", "quartiles", "plain_ms", "diff"} or {"error"}}``."""
    inputs = _inputs(folder, work, size)
    reference = folder / f"reference_{work}.pt"
    groups = {}
    for name in CONTENDERS[work]:
        if name in ENVIRONMENT and ENVIRONMENT[name] in environments:
            groups.setdefault(ENVIRONMENT[name], []).append(name)
    results, workers = {}, []
    try:
        for environment, names in groups.items():  # "project" first: it writes the reference
            config = {"work": work, "folder": str(folder / work) if work == "gpt2" else str(folder),
                      "inputs": str(inputs), "reference": str(reference), "contenders": names, "threads": args.threads}
            worker = Worker(environments[environment], config, folder / f"{environment}_{work}.log",
                            STEADY_TIMING if args.allocator == "steady" else None)
            try:
                setup = worker.answer()
            except RuntimeError as error:
                results.update({name: {"error": str(error)} for name in names})
                worker.close()
                continue
            results.update({name: {"error": message} for name, message in setup["errors"].items()})
            for name in setup["timed"]:
                results[name] = {"diff": setup["diffs"][name], "torch": setup["torch"], "samples": [], "faults": []}
            workers.append(worker)
        for _ in range(args.rounds):
            random.shuffle(workers)
            for worker in list(workers):
                try:
                    answer = worker.ask({"cmd": "round", "repeat": args.repeat, "warm": args.warm})
                except RuntimeError as error:  # its contenders get the reason instead of a ratio
                    results.update({name: {"error": str(error)} for name in worker.names})
                    workers.remove(worker)
                    worker.close()
                    continue
                for name, (plain, own) in answer["times"].items():
                    results[name]["samples"].append((plain, own))
                    results[name]["faults"].append(tuple(answer["faults"][name]))
    finally:
        for worker in workers:
            worker.close()
        reference.unlink(missing_ok=True)
    for result in results.values():
        samples, faults = result.pop("samples", None), result.pop("faults", None)
        if samples:
            ratios = [own / plain for plain, own in samples]
            result.update(ratio=statistics.median(ratios), quartiles=_quartiles(ratios),
                          plain_ms=statistics.median(plain for plain, _ in samples) * 1e3,
                          faults=(statistics.median(plain for plain, _ in faults),
                                  statistics.median(own for _, own in faults)))
    return results


def bench_memory(folder: Path, environments: dict, args) -> dict:
    """{contender: (median peak - base RSS in MB, median peak/base)} for GPT-2 at MEMORY_SIZE, each in
    fresh processes. The added megabytes are what compares: each contender's base differs (its imports,
    its own copy of the model), so a ratio over it favours whoever loads more."""
    inputs = _inputs(folder, "gpt2", MEMORY_SIZE)
    results = {}
    for name in CONTENDERS["gpt2"]:
        if ENVIRONMENT[name] not in environments:
            continue
        config = {"work": "gpt2", "folder": str(folder / "gpt2"), "inputs": str(inputs), "contender": name,
                  "threads": args.threads}
        ratios, added = [], []
        for _ in range(MEMORY_PROCESSES):
            done = subprocess.run([environments[ENVIRONMENT[name]], __file__, "--memory", json.dumps(config)],
                                  capture_output=True, text=True, check=False,
                                  env=_worker_env(args.threads, STEADY_MEMORY if args.allocator == "steady" else None))
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                tail = [line for line in done.stderr.splitlines() if line.strip()] or ["(no output)"]
                results[name] = f"failed: {tail[-1][:150]}"
                break
            answer = json.loads(lines[-1])
            ratios.append(answer["peak"] / answer["base"])
            added.append((answer["peak"] - answer["base"]) / 1024)
        else:
            results[name] = (statistics.median(added), statistics.median(ratios))
    return results


# ---------------------------------------------------------------- report
def _cell(result) -> str:
    """A table cell: the median ratio and its quartiles, or why there is none."""
    if result is None:
        return ""
    if "error" in result:
        return result["error"]
    low, high = result["quartiles"]
    return f"{result['ratio']:.2f}x ({low:.2f}-{high:.2f})"


def _row_title(work: str, size: tuple) -> str:
    if work == "gpt2":
        return f"GPT-2 small ({size[0]}, {size[1]})"
    return f"ViT-S/16 ({size[0]}, 224x224)"


def print_report(rows: list, memory: dict, args) -> None:
    """The markdown table, the ours/best-peer lines and the memory row."""
    calls = f"{args.repeat} calls" if args.repeat else f"~{BLOCK_SECONDS:g} s of plain calls (1 to {MAX_REPEAT})"
    calls += ", each block after one untimed call of what it times" if args.warm else ""
    calls += ", glibc's thresholds fixed (--allocator steady)" if args.allocator == "steady" else ""
    print(f"\n{args.rounds} rounds x {calls} per block, {args.threads} threads, CPU; "
          "each cell: median of contender/plain (quartiles) within its own process\n")
    titles = [title for title, _ in COLUMNS]
    print("| work | plain ms (project venv) | " + " | ".join(titles) + " |")
    print("|" + "---|" * (len(titles) + 2))
    for (work, size), results in rows:
        plain_ms = results.get("ours", {}).get("plain_ms")
        cells = [" / ".join(_cell(results.get(name)) for name in names if name in results) for _, names in COLUMNS]
        print(f"| {_row_title(work, size)} | {plain_ms:.1f} | " if plain_ms else f"| {_row_title(work, size)} | | ",
              end="")
        print(" | ".join(cells) + " |")
    if memory:
        cells = []
        for _, names in COLUMNS:
            values = [memory.get(name) for name in names if name in memory]
            cells.append(" / ".join(f"+{v[0]:.0f} MB ({v[1]:.2f}x)" if isinstance(v, tuple) else str(v)
                                    for v in values))
        print(f"| peak RSS over the RSS after load (and their ratio), GPT-2 small {MEMORY_SIZE} | | "
              + " | ".join(cells) + " |")
    print()
    for (work, size), results in rows:
        print(f"{_row_title(work, size)}: {_versus_best(results)}")
    print()
    for (work, size), results in rows:  # the check every timed contender passed
        diffs = ", ".join(f"{name} {r['diff']:.1e}" for name, r in results.items() if "diff" in r)
        print(f"max abs diff to ours, {_row_title(work, size)}: {diffs}")
    print()
    for (work, size), results in rows:  # what glibc's heap did (see the module's docstring)
        faults = {name: r["faults"] for name, r in results.items() if "faults" in r}
        if faults:
            plain = statistics.median(f[0] for f in faults.values())
            own = ", ".join(f"{name} {f[1]:,.0f}" for name, f in faults.items())
            print(f"minor page faults per call, {_row_title(work, size)}: plain {plain:,.0f}; {own}")


def _versus_best(results: dict) -> str:
    """``ours/best peer`` (and the same for ours_weights): below 1 is faster than every peer."""
    timed = {name: r["ratio"] for name, r in results.items() if "ratio" in r}
    peers = {name: ratio for name, ratio in timed.items() if name in PEERS}
    if not peers:
        return "no peer timed"
    best = min(peers, key=peers.get)
    parts = [f"{name}/best peer {timed[name] / peers[best]:.2f}" for name in ("ours", "ours_weights") if name in timed]
    return ", ".join(parts) + f" (best peer: {best}, {peers[best]:.2f}x)"


# ---------------------------------------------------------------- main
def _sizes(text: str) -> list:
    """``"1x128,8x128"`` -> [(1, 128), (8, 128)]."""
    return [tuple(int(n) for n in item.split("x")) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=0, help="calls per timed block (0: about a second's worth)")
    parser.add_argument("--sizes", type=_sizes, default=GPT2_SIZES, help="GPT-2 (batch)x(tokens), comma separated")
    parser.add_argument("--only", choices=["gpt2", "vit"], default=None)
    parser.add_argument("--peers", type=Path, default=Path("/work/peers"), help="folder with the tl4 and tl3 venvs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warm", action="store_true",
                        help="one untimed call before each timed block: each contender in its own steady state")
    parser.add_argument("--allocator", choices=["default", "steady"], default="default",
                        help="steady: glibc's heap thresholds fixed in every worker, so that page faults and the "
                             "heap's holes follow the work and not the process's history")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory row")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory row (no timing)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.memory:
        return memory_main(json.loads(args.memory))
    os.environ.update(OFFLINE)
    warnings.simplefilter("ignore")
    works = ["gpt2", "vit"] if args.only is None else [args.only]
    environments = _environments(args.peers)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as name:
        folder = Path(name)
        _save_models(folder, ["gpt2"] if args.memory_only else works)
        rows = []
        for work in [] if args.memory_only else works:
            for size in args.sizes if work == "gpt2" else [(VIT_BATCH, 224)]:
                print(f"{_row_title(work, size)} ...", file=sys.stderr, flush=True)
                row_started = time.perf_counter()
                rows.append(((work, size), bench_work(work, size, folder, environments, args)))
                print(f"    {time.perf_counter() - row_started:.0f} s", file=sys.stderr, flush=True)
        memory = {}
        if ("gpt2" in works or args.memory_only) and not args.no_memory:
            print("memory ...", file=sys.stderr, flush=True)
            memory = bench_memory(folder, environments, args)
    print_report(rows, memory, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
