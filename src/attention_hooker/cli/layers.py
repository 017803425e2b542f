"""The ``attention-hooker layers`` command: the modules a capture of a model would hook."""

from __future__ import annotations

__all__ = ["command"]


def command(args) -> None:
    from . import workflows
    from ..hooker import TransformerAttentionHooker

    loaded = workflows.load_hf_model(args.model)
    hooker = TransformerAttentionHooker(loaded.model, args.layers, device="cpu")
    modules = dict(loaded.model.named_modules())
    print(f"{loaded.name} ({loaded.kind}): {len(hooker.hooked_layers)} module(s) hooked")
    for name in hooker.hooked_layers:
        print(f"  {name}  ({type(modules[name]).__name__})")
