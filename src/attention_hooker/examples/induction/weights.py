"""The trained weights shipped with the package, and the record of how they were trained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from ...errors import AttentionHookerError
from .model import AttentionOnlyTransformer, InductionConfig

__all__ = ["WEIGHTS", "load_induction_model", "save_induction_model", "read_record"]

WEIGHTS = Path(__file__).with_name("induction.safetensors")
"""The trained weights; ``induction.json`` beside them is their record (config, seed, training, losses)."""


def _record_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def _safetensors():
    try:
        from safetensors import torch as safetensors_torch
    except ImportError:
        raise AttentionHookerError("the induction model's weights are safetensors: pip install "
                                   "'transformer-attention-hooker[io]' (or pip install safetensors)") from None
    return safetensors_torch


def read_record(weights: Union[str, Path] = WEIGHTS) -> dict:
    """The record beside ``weights``: ``{"config": ..., "seed": ..., "training": ..., "losses": ...}``."""
    path = _record_path(Path(weights))
    if not path.is_file():
        raise AttentionHookerError(f"no record {path.name} beside {weights}: the weights' config is read from it")
    return json.loads(path.read_text())


def load_induction_model(weights: Union[str, Path] = WEIGHTS) -> Tuple[AttentionOnlyTransformer, InductionConfig]:
    """The trained model (in eval mode, on the CPU) and its config.

    Args:
        weights: a ``.safetensors`` file with its ``.json`` record beside it (the shipped ones by default).
    """
    record = read_record(weights)
    config = InductionConfig(**record["config"])
    model = AttentionOnlyTransformer(config)
    model.load_state_dict(_safetensors().load_file(str(weights)))
    return model.eval(), config


def save_induction_model(model: AttentionOnlyTransformer, weights: Union[str, Path], *, seed: int,
                         training: dict, losses: Optional[dict] = None) -> Path:
    """Writes ``weights`` (safetensors) and its ``.json`` record; returns the weights' path."""
    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    _safetensors().save_file(state, str(weights))
    record = {"config": model.config.to_dict(), "seed": seed, "training": training, "losses": losses or {},
              "torch": torch.__version__}
    _record_path(weights).write_text(json.dumps(record, indent=2) + "\n")
    return weights
