"""What goes to the terminal and to stdout: text made safe to print, tables, number
formats, the phase display on stderr, and the one JSON document on stdout.

Text that comes from files (tensor and layer names, paths, metadata) is
printed as text: never parsed as rich markup, and with control characters
(terminal escapes) shown as ``\\x1b``-style escapes instead of reaching the
terminal. The renderers of each command (:mod:`fcconv.report.checkpoints`,
...) build on these; :mod:`fcconv.report` re-exports them.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
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


# ------------------------------------------------------------------ phases


class PhaseDisplay:
    """The command line's listener for :mod:`fcconv.progress`: each phase a line of a rich
    progress display on stderr (only when stderr is a terminal), and with ``verbose`` a
    line per phase as it ends, with its time.

    ``settings`` is called at the first phase: ``(live, verbose)``, so that the
    options parsed by then decide.
    """

    def __init__(self, settings: Callable[[], tuple[bool, bool]]) -> None:
        self._settings = settings
        self._decided: tuple[bool, bool] | None = None
        self._bar: Any = None
        self._stack: list[tuple[str, Any, float]] = []
        self._lock = threading.RLock()  # a writer reports from its own threads

    def _decide(self) -> tuple[bool, bool]:
        if self._decided is None:
            self._decided = self._settings()
        return self._decided

    def _progress(self) -> Any:
        live, _ = self._decide()
        if self._bar is None and live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
        return self._bar

    def begin(self, name: str, total: float | None) -> None:
        with self._lock:
            bar = self._progress()
            task = bar.add_task(printable(name), total=total) if bar is not None else None
            self._stack.append((name, task, time.perf_counter()))

    def update(self, done: float, total: float | None) -> None:
        with self._lock:
            if self._stack and self._bar is not None:
                self._bar.update(self._stack[-1][1], completed=done, total=total)

    def end(self, name: str) -> None:
        with self._lock:
            self._end(name)

    def _end(self, name: str) -> None:
        for index in range(len(self._stack) - 1, -1, -1):
            if self._stack[index][0] == name:
                _, task, start = self._stack.pop(index)
                if self._bar is not None:
                    self._bar.remove_task(task)
                if self._decide()[1]:
                    self._say(f"fcconv: {printable(name)}: {time.perf_counter() - start:.2f} s")
                return

    def bytes(self, name: str) -> Callable[[int, int], None]:
        """A writer's ``progress(done, total)``, shown as the phase ``name`` from its
        first call until :meth:`close`."""

        def progress(done: int, total: int) -> None:
            with self._lock:
                if not any(entry[0] == name for entry in self._stack):
                    self.begin(name, total)
                if self._stack[-1][0] == name:
                    self.update(done, total)

        return progress

    def close(self) -> None:
        """End what is still open (a writer's phase) and take the display away."""
        with self._lock:
            while self._stack:
                self._end(self._stack[-1][0])
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _say(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
