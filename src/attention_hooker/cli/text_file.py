"""The ``--text-file`` of the command line: one input per line, UTF-8."""

from __future__ import annotations

from pathlib import Path
from typing import List

from ..errors import CommandError

__all__ = ["read_lines"]


def read_lines(path) -> List[str]:
    """The file's non-empty lines.

    Raises:
        CommandError: when the file is missing, not UTF-8, or has no non-empty line.
    """
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"text file {path} does not exist")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not UTF-8 text") from None
    if not lines:
        raise CommandError("the text file has no non-empty line: put one text per line")
    return lines
