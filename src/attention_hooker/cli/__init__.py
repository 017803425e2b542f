"""The command line: ``attention-hooker demo | run | layers | stats | heads | flow``."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
