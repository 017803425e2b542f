"""``attention-hooker run --text-file FILE --generate N --batching continuous``: the prompts
served together by transformers' continuous batching (``model.generate_batch``), each
request's attention captured on its own, stitched, and written as its own page."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import CommandError
from .capture_runs import Capture, check_generation_length
from .models import LoadedModel, token_labels, token_limit, with_article
from .outputs import prepare_out, write_outputs

__all__ = ["check_batching_options", "capture_requests", "write_request_outputs", "requests_summary"]

PAGE_TOKENS = 16  # tokens per page of the paged cache sized for the job


def check_batching_options(args) -> None:
    """``--batching continuous`` takes prompts from ``--text-file`` and needs ``--generate``;
    what it cannot go with is said before any work."""
    if args.batching is None:
        if args.text_file is not None:
            raise CommandError("--text-file goes with --batching continuous (one request per line); for one text use "
                               "--text")
        return
    if args.text_file is None:
        raise CommandError("--batching continuous serves the lines of --text-file FILE as requests: give one")
    if not args.generate:
        raise CommandError("--batching continuous generates: give --generate N (new tokens per request)")
    given = [flag for flag, value in (("--text", args.text), ("--image", args.image), ("--target", args.target),
                                      ("--rows", args.rows), ("--pool", args.pool), ("--stream", args.stream),
                                      ("--save", args.save), ("--words", args.words)) if value]
    if given:
        raise CommandError(f"--batching continuous writes one stitched page per request of --text-file; drop "
                           f"{'/'.join(given)}")


def capture_requests(loaded: LoadedModel, prompts: List[str], generate: int, *, layers: Optional[str] = None,
                     max_tokens: Optional[int] = None) -> List[Tuple[str, Capture]]:
    """Serves ``prompts`` together, ``generate`` greedy new tokens each, and returns each
    request's capture: ``(request id, Capture)`` in the order of the prompts, every layer
    stitched into one causal ``(1, heads, T, T)``."""
    from ..analysis.core import stitch_steps
    from ..hooker import TransformerAttentionHooker

    transformers = _continuous_batching(loaded)
    tokenizer, model = loaded.tokenizer, loaded.model
    limit = token_limit(loaded, max_tokens)
    ids = []
    for number, prompt in enumerate(prompts, start=1):
        encoded = tokenizer(prompt, truncation=True, max_length=limit)["input_ids"]
        if not encoded:
            raise CommandError(f"line {number} ({prompt[:40]!r}) tokenizes to no token with {loaded.name}'s tokenizer")
        check_generation_length(loaded, len(encoded), generate)
        ids.append(list(encoded))
    config = copy.deepcopy(model.generation_config)  # its eos, as generate() would use
    config.update(max_new_tokens=generate, do_sample=False, num_beams=1)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pages = sum(math.ceil((len(p) + generate) / PAGE_TOKENS) + 1 for p in ids)  # a cache sized for the job
    # Every prompt computed whole (no pages shared between prompts), on the capturable kernels, with no
    # CUDA graph (a replayed graph runs no Python): each request's map is whole and stitches.
    options = dict(page_size=PAGE_TOKENS, num_blocks=pages, allow_block_sharing=False, auto_switch_to_flash=False,
                   use_cuda_graph=False)
    fields = getattr(transformers.ContinuousBatchingConfig, "__dataclass_fields__", options)
    cache = transformers.ContinuousBatchingConfig(**{k: v for k, v in options.items() if k in fields})
    with torch.no_grad(), TransformerAttentionHooker(model, layers, device="cpu") as hooker:
        outputs = model.generate_batch(ids, generation_config=config, continuous_batching_config=cache,
                                       progress_bar=False)
    captures = []
    for number, prompt_ids in enumerate(ids):
        rid = f"req_{number}"
        if rid not in outputs or rid not in hooker.requests:
            raise CommandError(f"the engine returned no result for line {number + 1} ({rid}); its log says why")
        values = hooker.requests[rid]
        stitched = {name: [stitch_steps(calls)] for name, calls in values.items() if calls}
        if not stitched:
            raise CommandError(f"no attention was captured for line {number + 1}: {hooker.report()!r}")
        length = next(iter(stitched.values()))[0].shape[-1]
        generated = list(outputs[rid].generated_tokens)
        sequence = (prompt_ids + generated)[:length]
        text = tokenizer.decode(prompt_ids + generated, skip_special_tokens=True)
        capture = Capture(stitched, [token_labels(tokenizer, sequence)], hooker, generated_text=text,
                          raw_values=dict(values), prompt_length=len(prompt_ids), generated=len(generated))
        captures.append((rid, capture))
    return captures


def _continuous_batching(loaded: LoadedModel):
    """transformers, when it serves this model by continuous batching; else why not."""
    import transformers

    if loaded.kind != "decoder" or not hasattr(loaded.model, "generate_batch"):
        raise CommandError(f"--batching continuous needs a causal language model that transformers serves by "
                           f"continuous batching (generate_batch); {loaded.name} is {with_article(loaded.kind)}")
    if not hasattr(transformers, "ContinuousBatchingConfig"):
        raise CommandError(f"--batching continuous needs transformers' ContinuousBatchingConfig; transformers "
                           f"{transformers.__version__} has none: upgrade it")
    return transformers


def write_request_outputs(captures: List[Tuple[str, Capture]], out, *, title: str, grids: bool = True,
                          color_scale: Optional[str] = None) -> Dict[str, Dict[str, object]]:
    """Each request's pictures and page into ``out/requests/<request id>``; returns their paths."""
    out = prepare_out(out)
    return {rid: write_outputs(capture, Path(out) / "requests" / rid, title=f"{title}, {rid}", grids=grids,
                               color_scale=color_scale)
            for rid, capture in captures}


def requests_summary(loaded: LoadedModel, captures: List[Tuple[str, Capture]], files: Dict[str, Dict[str, object]],
                     seconds: float) -> str:
    """What was served and where each request's page is."""
    first = next(iter(captures[0][1].values.values()))[0]
    lines = [f"model:    {loaded.name} ({loaded.kind}), served by continuous batching",
             f"layers:   {len(captures[0][1].values)} captured, {first.shape[1]} heads each",
             f"requests: {len(captures)}, each stored on its own (prompt, then one call per step) and stitched"]
    for rid, capture in captures:
        read = len(capture.tokens[0])
        lines.append(f"  {rid}: {capture.prompt_length} prompt + {capture.generated} generated tokens (the map covers "
                     f"the {read} the model read), page {files[rid]['page']}")
        lines.append(f"    text: {capture.generated_text!r}")
    lines.append(f"done in {seconds:.1f} s")
    return "\n".join(lines)
