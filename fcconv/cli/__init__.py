"""The ``fcconv`` command: parse, one library call, render, exit 0 / 1 / 2.

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
from collections.abc import Callable
from typing import Any

import click

from fcconv.errors import CLI_NAMES, FcconvError, OutputError
from fcconv.io import stdio
from fcconv.report import printable

EXIT_OK, EXIT_DIFFERENT, EXIT_TROUBLE = 0, 1, 2
BUG_REPORT = "https://github.com/fcconv/fcconv/issues"


class FcconvGroup(click.Group):
    """A click group that owns the exit codes and the one-line error format."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        stdio.ensure_standard_fds()  # before anything is opened: nothing may land on fd 0-2
        args = list(sys.argv[1:] if args is None else args)
        extra.pop("standalone_mode", None)
        debug = "--debug" in args
        try:
            code = super().main(args, prog_name or "fcconv", standalone_mode=False, **extra)
        except FcconvError as error:
            code = _fail(error.render(CLI_NAMES), debug)
        except click.exceptions.NoArgsIsHelpError as error:
            _echo(error.ctx.get_help() if error.ctx else str(error))
            code = EXIT_TROUBLE
        except click.ClickException as error:
            hint = (
                f" (see '{error.ctx.command_path} --help')" if getattr(error, "ctx", None) else ""
            )
            code = _fail(f"{error.format_message()}{hint}", debug)
        except (click.exceptions.Abort, KeyboardInterrupt):
            _echo("fcconv: aborted")
            code = 130
        except MemoryError:
            code = _fail(
                "ran out of memory; the checkpoint needs more memory than this machine has",
                debug,
            )
        except OSError as error:  # the system refused something no check could foresee
            where = f" ({error.filename})" if error.filename else ""
            reason = error.strerror or str(error)
            code = _fail(f"{reason}{where}; check the paths, the disk and its permissions", debug)
        except Exception as error:  # a bug: still one line and exit 2, never 1
            detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            code = _fail(
                f"internal error ({type(error).__name__}{': ' + detail if detail else ''}); "
                f"this is a bug in fcconv: rerun with --debug and report the traceback at "
                f"{BUG_REPORT}",
                debug,
            )
        code = code if isinstance(code, int) else EXIT_OK
        failure = stdio.flush_standard_streams()
        if failure is not None and code == EXIT_OK:  # the payload did not all arrive
            code = _fail(failure.render(CLI_NAMES), debug)
        sys.exit(code)

    def invoke(self, ctx: click.Context) -> Any:
        try:
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
    """Print ``result`` as one JSON document on stdout, or for people on stderr; exit."""
    from fcconv import report

    if as_json:
        report.emit_json(result.to_dict())
    else:
        render(report.stderr_console(), result)
    raise click.exceptions.Exit(result.exit_code)


def with_options(*decorators: Any) -> Callable[[Any], Any]:
    def apply(function: Any) -> Any:
        for option in reversed(decorators):
            function = option(function)
        return function

    return apply


DEBUG = click.option("--debug", is_flag=True, expose_value=False, help="Show tracebacks.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
TRUST = click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow arbitrary unpickling (runs code in the file: only for files you trust).",
)


@click.group(cls=FcconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fcconv", prog_name="fcconv")  # looked up only if asked
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


main = cli


# The commands register themselves on `cli` when their modules are imported.
from fcconv.cli import checkpoints as _checkpoints  # noqa: E402, F401
from fcconv.cli import maps as _maps  # noqa: E402, F401
from fcconv.cli import models as _models  # noqa: E402, F401
from fcconv.cli.models import convolutionalize  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    main()
