"""A griffe extension for the API reference (mkdocs.yml loads it): the package's docstrings head their
doctests ``Example:``, which Google style allows and griffe reads as a note (the ``>>>`` lines would be
shown as prose, their ``x[0]`` read as Markdown links); here such a section is read as ``Examples:``, code.
"""

from __future__ import annotations

import re

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.M)


class SingularExamples(griffe.Extension):
    """Reads a docstring's ``Example:`` section as griffe's ``Examples:`` (code, not a note)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
