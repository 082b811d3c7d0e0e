"""The ``fcconv`` click group and what every command shares: exit codes, the one-line
error, the ``--json`` envelope of a failure, the options every command takes, ``finish``.

The commands (:mod:`fcconv.cli.checkpoints`, ...) register on :data:`cli`; the
package :mod:`fcconv.cli` imports them.

Exit codes follow ``cmp``: 0 done or equivalent, 1 verification found a
difference, 2 the command could not run. Every job lives in
:mod:`fcconv.api`; this module knows people and pipes only. Torch is
imported only by the jobs that touch tensors, so ``fcconv --help`` starts at
once.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import click

from fcconv import report
from fcconv.errors import CLI_NAMES, FcconvError, OutputError
from fcconv.io import stdio
from fcconv.report import printable

EXIT_OK, EXIT_DIFFERENT, EXIT_TROUBLE = 0, 1, 2
BUG_REPORT = "https://github.com/fcconv/fcconv/issues"


class FcconvGroup(click.Group):
    """A click group that owns the exit codes, the one-line error format, and the
    ``--json`` document of a command that fails (the envelope with its ``error``)."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Register ``cmd`` with the options every command has: ``-q``, ``-v``, ``--debug``."""
        have = {option for param in cmd.params for option in getattr(param, "opts", ())}
        cmd.params.extend(option for option in COMMON_OPTIONS if not set(option.opts) & have)
        super().add_command(cmd, name)

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        stdio.ensure_standard_fds()  # before anything is opened: nothing may land on fd 0-2
        args = list(sys.argv[1:] if args is None else args)
        extra.pop("standalone_mode", None)
        run = _Run(self._command_in(args), "--json" in args, "--debug" in args)
        report.reset_emitted()
        try:
            code = super().main(args, prog_name or "fcconv", standalone_mode=False, **extra)
        except FcconvError as error:
            code = run.fail(error.render(CLI_NAMES), error.to_dict(CLI_NAMES))
        except click.exceptions.NoArgsIsHelpError as error:
            _echo(error.ctx.get_help() if error.ctx else str(error))
            code = run.fail(None, _usage_error(error))
        except click.ClickException as error:
            hint = (
                f" (see '{error.ctx.command_path} --help')" if getattr(error, "ctx", None) else ""
            )
            message = f"{error.format_message()}{hint}"
            code = run.fail(message, {**_usage_error(error), "message": message})
        except (click.exceptions.Abort, KeyboardInterrupt):
            _echo("fcconv: aborted")
            code = run.fail(None, _plain_error("Aborted", "aborted"), code=130)
        except MemoryError:
            message = "ran out of memory; the checkpoint needs more memory than this machine has"
            code = run.fail(message, _plain_error("MemoryError", message))
        except OSError as error:  # the system refused something no check could foresee
            where = f" ({error.filename})" if error.filename else ""
            reason = error.strerror or str(error)
            message = f"{reason}{where}; check the paths, the disk and its permissions"
            fields = {
                "path": None if error.filename is None else str(error.filename),
                "errno": errno.errorcode.get(error.errno or 0),
            }
            code = run.fail(message, {**_plain_error("OSError", message), **fields})
        except Exception as error:  # a bug: still one line and exit 2, never 1
            detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            message = (
                f"internal error ({type(error).__name__}{': ' + detail if detail else ''}); "
                f"this is a bug in fcconv: rerun with --debug and report the traceback at "
                f"{BUG_REPORT}"
            )
            fields = {"exception": type(error).__name__}
            code = run.fail(message, {**_plain_error("InternalError", message), **fields})
        code = code if isinstance(code, int) else EXIT_OK
        failure = stdio.flush_standard_streams()
        if failure is not None and code == EXIT_OK:  # the payload did not all arrive
            code = run.fail(failure.render(CLI_NAMES), failure.to_dict(CLI_NAMES))
        sys.exit(code)

    def _command_in(self, args: list[str]) -> str | None:
        """The subcommand the command line names: its first word that is one."""
        return next((arg for arg in args if arg in self.commands), None)

    def invoke(self, ctx: click.Context) -> Any:
        from fcconv import progress

        display = report.PhaseDisplay(_display_settings)
        ctx.meta["fcconv.display"] = display
        try:
            with progress.listening(display):
                return super().invoke(ctx)
        except OSError as error:
            # click turns a broken pipe into exit 1, which means "different" here
            if error.errno != errno.EPIPE:
                raise
            stdio.silence()
            raise OutputError(
                "a pipe fcconv was writing to was closed by its reader (broken pipe); the "
                "output is incomplete"
            ) from error
        finally:
            display.close()


def _display_settings() -> tuple[bool, bool]:
    """``(live, verbose)`` for the phase display: live on a terminal unless ``-q``."""
    context = click.get_current_context(silent=True)
    level = verbosity(context) if context is not None else 0
    return level >= 0 and stdio.is_terminal(stdio.STDERR), level > 0


def phases(context: click.Context | None = None) -> report.PhaseDisplay:
    """The running command's phase display (a writer's bytes go to its ``bytes``)."""
    context = context or click.get_current_context()
    display = context.meta.get("fcconv.display")
    return display if display is not None else report.PhaseDisplay(lambda: (False, False))


class _Run:
    """One run of the command line: what it needs to report a failure."""

    def __init__(self, command: str | None, as_json: bool, debug: bool) -> None:
        self.command, self.as_json, self.debug = command, as_json, debug

    def fail(self, message: str | None, error: dict[str, Any], code: int = 2) -> int:
        """Say why on stderr (one line), and with ``--json`` on stdout as the envelope's
        ``error``, unless a document was already printed; return the exit code."""
        if message is not None:
            code = _fail(message, self.debug) if code == EXIT_TROUBLE else code
        if self.as_json and not report.emitted():
            from fcconv.schemas import envelope

            with contextlib.suppress(FcconvError, OSError, ValueError):
                report.emit_json(envelope(self.command, None, exit_code=code, error=error))
        return code


def _plain_error(kind: str, message: str) -> dict[str, Any]:
    return {"kind": kind, "kinds": [kind], "message": message}


def _usage_error(error: click.ClickException) -> dict[str, Any]:
    """A click error as data: ``kind`` UsageError, ``parameter`` the option at fault."""
    param = getattr(error, "param", None)
    name = None
    if param is not None:
        name = param.opts[0] if getattr(param, "opts", None) else param.name
    elif getattr(error, "option_name", None):
        name = error.option_name
    fields = {"parameter": name, "click": type(error).__name__}
    return {**_plain_error("UsageError", printable(error.format_message())), **fields}


def _echo(message: str) -> None:
    """A line on stderr, if stderr can still take one."""
    try:
        click.echo(message, err=True)
    except (OSError, ValueError):
        pass


def _fail(message: str, debug: bool) -> int:
    if debug:
        with contextlib.suppress(OSError, ValueError):
            traceback.print_exc()
    _echo(f"fcconv: error: {printable(message)}")
    return EXIT_TROUBLE


def finish(result: Any, as_json: bool, render: Callable[[Any, Any], None]) -> None:
    """Print ``result`` as one JSON document on stdout (the envelope around its body), or
    for people on stderr (not with ``-q``); exit with its exit code."""
    context = click.get_current_context()
    if as_json:
        from fcconv.schemas import envelope

        command = context.command.name
        report.emit_json(envelope(command, result.to_dict(), exit_code=result.exit_code))
    elif verbosity(context) >= 0:
        render(report.stderr_console(), result)
    raise click.exceptions.Exit(result.exit_code)


def verbosity(context: click.Context | None = None) -> int:
    """-1 with ``-q``, 0 by default, the number of ``-v`` otherwise."""
    context = context or click.get_current_context()
    quiet, verbose = context.meta.get("fcconv.quiet"), context.meta.get("fcconv.verbose", 0)
    return -1 if quiet else verbose


def say(lines: Iterable[str], prefix: str = "fcconv: ") -> None:
    """Plain-words notes on stderr, one line each; silent with ``-q``."""
    if verbosity() < 0:
        return
    for line in lines:
        click.echo(f"{prefix}{printable(line)}", err=True)


def warn(lines: Iterable[str]) -> None:
    """Warnings on stderr, one line each (shown with ``-q`` too)."""
    for line in lines:
        click.echo(f"fcconv: warning: {printable(line)}", err=True)


def _remember(context: click.Context, param: click.Parameter, value: Any) -> Any:
    if value:
        context.meta[f"fcconv.{param.name}"] = value
        if context.meta.get("fcconv.quiet") and context.meta.get("fcconv.verbose"):
            raise click.UsageError("-q and -v contradict each other; give one of them")
    return value


def with_options(*decorators: Any) -> Callable[[Any], Any]:
    def apply(function: Any) -> Any:
        for option in reversed(decorators):
            function = option(function)
        return function

    return apply


DEBUG = click.option("--debug", is_flag=True, expose_value=False, help="Show tracebacks.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
COMMON_OPTIONS = (
    click.Option(
        ["-q", "--quiet"],
        is_flag=True,
        expose_value=False,
        callback=_remember,
        help="Print only warnings and errors: no progress, no notes, no report.",
    ),
    click.Option(
        ["-v", "--verbose"],
        count=True,
        expose_value=False,
        callback=_remember,
        help="Say more: each phase as it ends, with its time.",
    ),
    click.Option(["--debug"], is_flag=True, expose_value=False, help="Show tracebacks."),
)
"""Options every command gets when it is registered (see :meth:`FcconvGroup.add_command`)."""
TRUST = click.option(
    "--trust-pickle",
    "--trust-code",
    "trust_pickle",
    is_flag=True,
    help=(
        "Load what runs code: pickles, and .pt2 programs whose shape expressions, guards "
        "or targets torch would evaluate (only for files you trust)."
    ),
)


@click.group(cls=FcconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(  # the version is looked up only if asked
    None, "-V", "--version", package_name="fcconv", prog_name="fcconv"
)
@DEBUG
def cli() -> None:
    """Rewrite Linear layers of a PyTorch checkpoint as the equivalent strided Conv2d.

    A Linear layer trained on flattened HxWxC patches becomes the Conv2d that
    computes the same thing on every window of a larger input (the FCN /
    OverFeat trick), and fcconv proves the two agree.

    \b
      fcconv inspect model.pt
      fcconv convert model.pt -o model_conv.pt --layer fc --patch 20x20x10
      fcconv verify model.pt model_conv.pt --input 100x60

    Exit codes: 0 done / equivalent, 1 verification found a difference,
    2 the command could not run.
    """
