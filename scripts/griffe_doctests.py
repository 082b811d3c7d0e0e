"""A griffe extension for the API reference: doctests in docstrings shown as code.

fcconv's docstrings carry doctests (``>>> ...`` and the output under them),
which pytest runs (``--doctest-modules``). Outside a Google ``Example:``
section Markdown would read them as prose: ``['a', 'b']`` as a link, ``*``
as emphasis. This wraps every run of doctest lines that is not already in a
fenced block or an ``Example:``/``Examples:`` section in a ```` ```pycon ````
fence, so `mkdocs build --strict` renders them as written.
Configured in mkdocs.yml (``extensions:`` of the python handler).
"""

from __future__ import annotations

import re
from typing import Any

try:
    import griffe
except ImportError:  # without the docs extra, fence_doctests still serves the tests
    griffe = None

SECTION = re.compile(r"^\s*Examples?:\s*$")


def fence_doctests(text: str) -> str:
    """``text`` with each top-level run of doctest lines fenced as ``pycon``."""
    out: list[str] = []
    fenced = in_section = in_run = False
    section_indent = run_indent = 0
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if in_run and (not stripped or indent < run_indent):
            out.append(" " * run_indent + "```")
            in_run = False
        if stripped.startswith("```"):
            fenced = not fenced
        elif SECTION.match(line):
            in_section, section_indent = True, indent
        elif in_section and stripped and indent <= section_indent:
            in_section = False
        if not (fenced or in_section or in_run) and stripped.startswith(">>>"):
            run_indent = indent
            out.append(" " * indent + "```pycon")
            in_run = True
        out.append(line)
    if in_run:
        out.append(" " * run_indent + "```")
    return "\n".join(out)


if griffe is not None:

    class DoctestFences(griffe.Extension):
        """Fence the doctests of every docstring griffe loads."""

        def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
            if obj.docstring is not None and ">>>" in obj.docstring.value:
                obj.docstring.value = fence_doctests(obj.docstring.value)
