"""Running the user's code, saying in one line where it failed, and what ``--arch`` may name.

An ``arch`` module, its factory and a model's ``forward`` may raise anything
(``SystemExit`` included). :func:`running_user_code` turns that into a
:class:`~fcconv.errors.UserCodeError` whose ``where`` is the ``file:line`` of
the last frame of the traceback that is the user's: not fcconv's, not
torch's, not the standard library's. A model from an installed package
(``site-packages/facenet_pytorch/...``) is user code too.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import os
import re
import sys
import sysconfig
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from fcconv.errors import ArchitectureError, FcconvError, UserCodeError

_LIBRARY_ROOTS = tuple(
    str(Path(root).resolve()) + os.sep
    for root in (
        Path(__file__).resolve().parent.parent,  # the fcconv package
        Path(torch.__file__).parent,
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["platstdlib"],
    )
)
# The shipped sample models are model code like any user's.
_SAMPLES = str(Path(__file__).resolve().parent.parent / "samples_models.py")
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)')


def is_user_file(filename: str) -> bool:
    """True for a real file outside fcconv, torch and the standard library."""
    if not filename or filename.startswith("<"):  # <frozen importlib>, fx's <eval_with_key>
        return False
    resolved = str(Path(filename).resolve())
    return resolved == _SAMPLES or not resolved.startswith(_LIBRARY_ROOTS)


def shown_path(filename: str) -> str:
    """``filename`` relative to the working folder when it lies inside it."""
    try:
        return str(Path(filename).resolve().relative_to(Path.cwd()))
    except ValueError:
        return filename


def _code(filename: str, line: int) -> str:
    text = linecache.getline(filename, line).strip()
    return text if len(text) <= 90 else text[:87] + "..."


def _located(frames: Iterable[tuple[str, int]]) -> tuple[str, str] | None:
    users = [(f, n) for f, n in frames if is_user_file(f)]
    if not users:
        return None
    filename, line = users[-1]
    return f"{shown_path(filename)}:{line}", _code(filename, line)


def error_location(error: BaseException) -> tuple[str, str] | None:
    """``(file:line, code)`` of the last user frame of ``error``'s traceback, if any."""
    if isinstance(error, SyntaxError) and error.filename and error.lineno:
        return f"{shown_path(error.filename)}:{error.lineno}", (error.text or "").strip()
    frames = traceback.extract_tb(error.__traceback__)
    return _located((frame.filename, frame.lineno or 0) for frame in frames)


def stack_location(stack_trace: str | None) -> tuple[str, str] | None:
    """``(file:line, code)`` of the last user frame in an fx node's ``stack_trace`` text."""
    if not stack_trace:
        return None
    return _located((m["file"], int(m["line"])) for m in _FRAME.finditer(stack_trace))


def caller_frame() -> traceback.FrameSummary | None:
    """The innermost user frame on the current stack."""
    users = [f for f in traceback.extract_stack() if is_user_file(f.filename)]
    return users[-1] if users else None


def frame_location(frame: traceback.FrameSummary | None) -> tuple[str, str] | None:
    """``(file:line, code)`` of a frame."""
    if frame is None:
        return None
    return f"{shown_path(frame.filename)}:{frame.lineno}", _code(frame.filename, frame.lineno or 0)


def at(location: tuple[str, str] | None) -> str:
    """`` at model.py:12 (`x = self.fc(x)`)``, or nothing when unknown."""
    if location is None:
        return ""
    where, code = location
    return f" at {where}" + (f" (`{code}`)" if code else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else "")[:200]


def user_code_error(what: str, error: BaseException, hint: str = "") -> UserCodeError:
    """The one-line :class:`UserCodeError` for ``error`` raised while ``what`` ran."""
    location = error_location(error)
    detail = _first_line(error)
    kind = type(error).__name__ + (f": {detail}" if detail else "")
    message = f"{what} raised {kind}{at(location)}"
    return UserCodeError(
        message + (f"; {hint}" if hint else ""), where=location[0] if location else None
    )


@contextlib.contextmanager
def running_user_code(what: str, hint: str = "") -> Iterator[None]:
    """Turn anything the user's code raises into a :class:`UserCodeError`.

    fcconv's own errors pass through. ``SystemExit`` and ``KeyboardInterrupt``
    raised by the user's code are caught too: an ``arch`` that calls
    ``sys.exit()`` must not end fcconv with exit 0 and nothing written.
    """
    try:
        yield
    except FcconvError:
        raise
    except BaseException as error:  # noqa: BLE001 - user code may raise anything
        if isinstance(error, GeneratorExit):
            raise
        raise user_code_error(what, error, hint) from error


# ------------------------------------------------------------ what --arch may name

_NOT_FACTORIES = ("torch",)
"""Packages whose *functions* are no model factories: ``torch.load``, ``torch.hub.load``
and ``torch.jit.load`` run other code. Their ``nn.Module`` classes are factories."""


def _top(module: str | None) -> str:
    return (module or "").split(".")[0]


def is_standard_library(module: str | None) -> bool:
    """Whether ``module`` (a dotted name) belongs to Python itself (``builtins`` included).

    >>> is_standard_library("os.path"), is_standard_library("torchvision.models")
    (True, False)
    """
    top = _top(module)
    return top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "builtins"


def check_arch_module(module: str, spec: str) -> None:
    """Refuse an ``--arch`` module of the standard library before it is even imported."""
    if is_standard_library(module):
        raise ArchitectureError(
            f"{{arch}} {spec} names the standard library's {_top(module)!r}; {{arch}} "
            "imports and runs a model factory: an nn.Module class or a function of the model's own "
            "package (package.module:Net)"
        )


def check_factory(factory: object, spec: str) -> None:
    """Refuse an ``--arch`` target that is not a model factory, before it is called.

    A factory is a class that subclasses ``nn.Module``, or a Python function
    (or a class's method) defined in a module outside the standard library
    and outside torch. Builtins (``exec``, ``os.system``), standard-library
    functions (``subprocess.run``), partials and other callable objects are
    refused, whatever module re-exports them.

    Raises:
        ArchitectureError: what ``spec`` names instead, in one line.
    """
    if inspect.isclass(factory):
        if issubclass(factory, torch.nn.Module):
            return
        raise _not_a_factory(spec, f"the class {factory.__qualname__}, not an nn.Module")
    function = factory.__func__ if inspect.ismethod(factory) else factory
    if not inspect.isfunction(function):
        kind = type(factory).__name__
        raise _not_a_factory(spec, f"a {kind}, not a Python function or an nn.Module class")
    module = getattr(function, "__module__", None)
    if is_standard_library(module):
        raise _not_a_factory(spec, f"a function of the standard library ({module})")
    if _top(module) in _NOT_FACTORIES:
        raise _not_a_factory(spec, f"a function of {module}, which loads or runs other code")


def _not_a_factory(spec: str, what: str) -> ArchitectureError:
    return ArchitectureError(
        f"{{arch}} {spec} is {what}; {{arch}} names a model factory: an nn.Module class or a "
        "function of the model's own package that builds one (package.module:Net)"
    )
