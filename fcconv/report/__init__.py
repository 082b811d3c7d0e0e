"""Results rendered for people (rich, on stderr) and for scripts (JSON, on stdout).

Text that comes from files (tensor and layer names, paths, metadata) is
printed as text: never parsed as rich markup, and with control characters
(terminal escapes) shown as ``\\x1b``-style escapes instead of reaching the
terminal.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text


def printable(text: object) -> str:
    r"""``text`` with every control or unprintable character written as an escape.

    >>> printable("fc\x1b[31m\n")
    'fc\\x1b[31m\\n'
    """
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text)
    )


def text(*parts: object | tuple[object, str]) -> Text:
    """A rich ``Text`` from plain parts or ``(part, style)`` pairs; no markup is parsed."""
    from rich.text import Text

    text = Text()
    for part in parts:
        if isinstance(part, tuple):
            text.append(printable(part[0]), style=part[1])
        else:
            text.append(printable(part))
    return text


def stderr_console() -> Console:
    """The console for people: stderr, so stdout stays clean for data."""
    from rich.console import Console

    # soft_wrap: long lines (the nn.Conv2d(...) call) stay whole, ready to copy.
    return Console(stderr=True, highlight=False, soft_wrap=True)


_emitted: list[bool] = [False]


def emit_json(document: Mapping[str, Any]) -> None:
    """Write exactly one strict JSON document to stdout (NaN and infinities become null).

    Raises:
        OutputError: stdout is closed, full, or its reader went away.
    """
    from fcconv.io.stdio import write_stdout

    text = json.dumps(_strict(document), indent=2, default=str, allow_nan=False)
    _emitted[0] = True  # even if the write fails: a second document must not follow a part
    write_stdout(text + "\n")


def emitted() -> bool:
    """Whether this run has printed its JSON document (see :func:`reset_emitted`)."""
    return _emitted[0]


def reset_emitted() -> None:
    """Start a run: no JSON document printed yet."""
    _emitted[0] = False


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(item) for item in value]
    return value


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def shape(shape: Iterable[int]) -> str:
    return "×".join(map(str, shape))


def size(pair: Any) -> str:
    return "?" if pair is None else f"{pair[0]}x{pair[1]}"


def table(title: Text, rows: Iterable[tuple[object, object]]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        table.add_row(text(label), text(value))
    return table


# ------------------------------------------------------------------ progress


@contextlib.contextmanager
def progress_bar(
    description: str, *, enabled: bool | None = None
) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr as a ``progress(done, total)`` callback, or None.

    Enabled by default only when stderr is a terminal, so pipes and logs stay clean.

    Example:
        >>> with progress_bar("converting", enabled=False) as progress:
        ...     progress is None
        True
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


from fcconv.report.checkpoints import (  # noqa: E402
    geometry_lines,
    render_convert,
    render_inspect,
    render_plans,
    render_verification,
)
from fcconv.report.maps import render_map  # noqa: E402
from fcconv.report.models import render_convolutionalize  # noqa: E402
from fcconv.report.onnx import (  # noqa: E402
    render_onnx_convolutionalize,
    render_onnx_verification,
)

__all__ = [
    "emit_json",
    "emitted",
    "geometry_lines",
    "printable",
    "progress_bar",
    "render_convert",
    "render_convolutionalize",
    "render_onnx_convolutionalize",
    "render_onnx_verification",
    "render_inspect",
    "render_map",
    "render_plans",
    "render_verification",
    "reset_emitted",
    "stderr_console",
]
