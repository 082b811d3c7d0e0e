"""Named phases of long jobs ("reading", "checking layers", "exporting"), told to whoever
listens.

The library marks its phases with :func:`phase` (a context manager) or
:func:`phased` (a decorator); with no listener they cost nothing. The command
line listens (a rich progress display on stderr, a line per phase with
``-v``); a Python caller may too, with :func:`listening`:

>>> seen = []
>>> class Log:
...     def begin(self, name, total): seen.append(("begin", name))
...     def update(self, done, total): seen.append(("update", done))
...     def end(self, name): seen.append(("end", name))
>>> with listening(Log()):
...     with phase("reading", total=2) as advance:
...         advance(1)
>>> seen
[('begin', 'reading'), ('update', 1), ('end', 'reading')]

Phases nest (a check inside a conversion); an update goes to the innermost.
The listener is held in a context variable, so threads a job starts report
through the callable :func:`phase` gave them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

Advance = Callable[..., None]
"""``advance(done, total=None)``: how far the current phase is (bytes, cells, ...)."""

F = TypeVar("F", bound=Callable[..., Any])


class Listener(Protocol):
    """Who hears about phases: the command line's display, or a caller's own."""

    def begin(self, name: str, total: float | None) -> None: ...

    def update(self, done: float, total: float | None) -> None: ...

    def end(self, name: str) -> None: ...


_LISTENER: ContextVar[Listener | None] = ContextVar("fcconv_progress", default=None)


def _ignore(done: float, total: float | None = None) -> None:
    """The advance of a phase nobody listens to."""


@contextlib.contextmanager
def listening(listener: Listener | None) -> Iterator[None]:
    """Tell ``listener`` about every phase the jobs run inside this block."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


@contextlib.contextmanager
def phase(name: str, total: float | None = None) -> Iterator[Advance]:
    """A named phase of a job; yields ``advance(done, total=None)``."""
    listener = _LISTENER.get()
    if listener is None:
        yield _ignore
        return
    listener.begin(name, total)

    def advance(done: float, total: float | None = total) -> None:
        listener.update(done, total)

    try:
        yield advance
    finally:
        listener.end(name)


def phased(name: str) -> Callable[[F], F]:
    """Mark a whole function as the phase ``name``."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return function(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate
