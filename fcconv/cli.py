"""The ``fcconv`` command: parse, one library call, render, exit 0 / 1 / 2.

Exit codes follow ``cmp``: 0 done or equivalent, 1 verification found a
difference, 2 the command could not run. Every job lives in
:mod:`fcconv.api`; this module knows people and pipes only. Torch is
imported only by the jobs that touch tensors, so ``fcconv --help`` starts at
once.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from fcconv import __version__
from fcconv.errors import CLI_NAMES, FcconvError, SpecError
from fcconv.report import printable

EXIT_OK, EXIT_DIFFERENT, EXIT_TROUBLE = 0, 1, 2
BUG_REPORT = "https://github.com/fcconv/fcconv/issues"


class FcconvGroup(click.Group):
    """A click group that owns the exit codes and the one-line error format."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        extra.pop("standalone_mode", None)
        debug = "--debug" in args
        try:
            code = super().main(args, prog_name or "fcconv", standalone_mode=False, **extra)
        except FcconvError as error:
            code = _fail(error.render(CLI_NAMES), debug)
        except click.exceptions.NoArgsIsHelpError as error:
            click.echo(error.ctx.get_help() if error.ctx else str(error), err=True)
            code = EXIT_TROUBLE
        except click.ClickException as error:
            hint = (
                f" (see '{error.ctx.command_path} --help')" if getattr(error, "ctx", None) else ""
            )
            code = _fail(f"{error.format_message()}{hint}", debug)
        except click.exceptions.Abort:
            click.echo("fcconv: aborted", err=True)
            code = 130
        except BrokenPipeError:
            code = EXIT_TROUBLE
        except Exception as error:  # a bug: still one line and exit 2, never 1
            detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            code = _fail(
                f"internal error ({type(error).__name__}{': ' + detail if detail else ''}); "
                f"this is a bug in fcconv: rerun with --debug and report the traceback at "
                f"{BUG_REPORT}",
                debug,
            )
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def _fail(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    click.echo(f"fcconv: error: {printable(message)}", err=True)
    return EXIT_TROUBLE


def _finish(result: Any, as_json: bool, render: Callable[[Any, Any], None]) -> None:
    """Print ``result`` as one JSON document on stdout, or for people on stderr; exit."""
    from fcconv import report

    if as_json:
        report.emit_json(result.to_dict())
    else:
        render(report.stderr_console(), result)
    raise click.exceptions.Exit(result.exit_code)


def _options(*options: Any) -> Callable[[Any], Any]:
    def apply(function: Any) -> Any:
        for option in reversed(options):
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
LAYER_OPTIONS = _options(
    click.option(
        "--layer",
        "layers",
        multiple=True,
        metavar="NAME[=PATCH]",
        help="Layer to convert, e.g. fc or fc6=7x7x512 (repeatable).",
    ),
    click.option(
        "--patch", metavar="HxWxC", help="Patch of every --layer without its own (HxW: C inferred)."
    ),
    click.option(
        "--order",
        metavar="ORDER",
        help="Flatten order of the patch, slowest axis first: chw (default), hwc, whc, ...",
    ),
    click.option("--stride", metavar="SHxSW", help="Window stride (default: the patch size)."),
    click.option(
        "--input",
        "input_size",
        metavar="HxW",
        help="Input size for the geometry and the functional check (default: 2×2 windows).",
    ),
    JSON,
    TRUST,
    DEBUG,
)


@click.group(cls=FcconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fcconv")
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


@cli.command()
@click.argument("checkpoint", metavar="CKPT")
@click.option("--channels", type=click.IntRange(min=1), help="Channels C of the patch, if known.")
@click.option(
    "--input",
    "feature_map",
    metavar="HxWxC",
    help="Feature map fed to the layer, if known: limits the patches listed.",
)
@click.option(
    "--patch", metavar="HxWxC", help="Rank the six flatten orders by the weights' evidence."
)
@_options(JSON, TRUST, DEBUG)
def inspect(checkpoint: str, as_json: bool, **options: Any) -> None:
    """List the Linear-shaped entries of CKPT and the patches that fit each."""
    from fcconv import api, report

    _finish(api.inspect_checkpoint(checkpoint, **options), as_json, report.render_inspect)


@cli.command()
@click.argument("checkpoint", metavar="CKPT")
@click.option(
    "-o",
    "--output",
    metavar="OUT",
    help="Output path (default: <stem>.conv<suffix> beside the input; - = stdout).",
)
@LAYER_OPTIONS
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--no-verify", is_flag=True, help="Skip the checks before writing.")
@click.option(
    "--format",
    type=click.Choice(["torch", "safetensors"]),
    help="Output format (default: from the output's extension, else the input's).",
)
@click.option(
    "--link", is_flag=True, help="Sharded input: hard-link untouched shards instead of copying."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def convert(
    checkpoint: str,
    output: str | None,
    as_json: bool,
    no_verify: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Convert Linear layers of CKPT into Conv2d weights and write a new checkpoint.

    CKPT is a .pt/.pth/.bin/.ckpt or .safetensors file, - for stdin, or a
    sharded checkpoint's folder (or its *.safetensors.index.json).
    """
    from fcconv import api, report

    if (output or (checkpoint if checkpoint == "-" else None)) == "-":
        _check_stdout_takes_data(as_json)
    with report.progress_bar("converting", enabled=False if quiet else None) as progress:
        result = api.convert_checkpoint(
            checkpoint, output, verify=not no_verify, progress=progress, **options
        )
    for line in result.notes:
        click.echo(f"fcconv: {printable(line)}", err=True)
    for line in result.warnings:
        click.echo(f"fcconv: warning: {printable(line)}", err=True)
    _finish(result, as_json, report.render_convert)


def _check_stdout_takes_data(as_json: bool) -> None:
    if as_json:
        raise SpecError(
            "--json puts its report on stdout, so the checkpoint cannot go there too; "
            "write it to a file with -o"
        )
    if sys.stdout.isatty():
        raise SpecError(
            "refusing to write a binary checkpoint to the terminal; redirect stdout "
            "or write to a file with -o"
        )


@cli.command()
@click.argument("original", metavar="ORIGINAL")
@click.argument("converted", metavar="CONVERTED")
@LAYER_OPTIONS
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random input.")
def verify(original: str, converted: str, as_json: bool, **options: Any) -> None:
    """Check that CONVERTED holds exactly ORIGINAL's layers as convolutions.

    Exit 0 when equivalent, 1 when a difference is found.
    """
    from fcconv import api, report

    result = api.verify_checkpoints(original, converted, **options)
    _finish(result, as_json, report.render_verification)


CONVOLUTIONALIZE_EPILOG = """\b
Examples:
  fcconv convolutionalize weights.pt --arch fcconv.samples_models:tiny_vgg \\
      --input 32x32 -o tiny_vgg.pt2
  fcconv convolutionalize model.pt --trust-pickle --input 224x224 -o dense.pt2 \\
      --stride 2x2 --state-dict-out dense.safetensors --json

\b
The .pt2 program loads without your code:
  torch.export.load("dense.pt2").module()(images)  # [B, classes, H', W']
"""


@cli.command("convolutionalize", epilog=CONVOLUTIONALIZE_EPILOG)
@click.argument("model", metavar="MODEL")
@click.option("-o", "--output", required=True, help="The .pt2 torch.export program to write.")
@click.option(
    "--input",
    "input_size",
    required=True,
    metavar="HxW",
    help="The native input size the classifier was trained at (e.g. 224x224).",
)
@click.option(
    "--arch",
    metavar="PKG.MOD:FN",
    help="A callable that builds the model; MODEL then holds its weights.",
)
@click.option(
    "--layer",
    "layers",
    multiple=True,
    metavar="NAME",
    help="A Linear layer of the head (repeatable); default: found from the trace.",
)
@click.option(
    "--stride",
    metavar="SHxSW",
    help="The first conv's stride in feature-map cells (default 1x1: a window at every offset).",
)
@click.option(
    "--channels",
    type=click.IntRange(min=1),
    help="Input channels, when the model does not start with a conv.",
)
@click.option(
    "--check-size",
    metavar="HxW",
    help="The larger input the dense map is verified on (default: one window step larger).",
)
@click.option("--state-dict-out", help="Also write the converted weights (.safetensors or .pt).")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@_options(TRUST, DEBUG, JSON)
def convolutionalize(model: str, as_json: bool, layers: tuple[str, ...], **options: Any) -> None:
    """Make a classifier fully convolutional and save it as a .pt2 program.

    MODEL is a pickled nn.Module (only with --trust-pickle) or, with --arch,
    the weights for the model the factory builds. The flatten before the first
    Linear (and any permute before it) gives the patch and the order; the
    Linear layers become convolutions and the result is verified on the native
    size and on a larger input before anything is written.
    """
    from fcconv import api, report

    result = api.convolutionalize_file(model, layers=layers or None, **options)
    _finish(result, as_json, report.render_convolutionalize)


if __name__ == "__main__":  # pragma: no cover
    main()
