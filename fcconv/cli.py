"""The ``fcconv`` command: parse, call the library, render, exit 0 / 1 / 2.

Exit codes follow ``cmp``: 0 done or equivalent, 1 verification found a
difference, 2 the command could not run. Torch is imported only by the
commands that touch tensors, so ``fcconv --help`` starts at once.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import click

from fcconv import __version__
from fcconv.errors import FcconvError, SpecError

EXIT_OK, EXIT_DIFFERENT, EXIT_TROUBLE = 0, 1, 2


class FcconvGroup(click.Group):
    """A click group that owns the exit codes and the one-line error format."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        extra.pop("standalone_mode", None)
        debug = "--debug" in args
        try:
            code = super().main(args, prog_name or "fcconv", standalone_mode=False, **extra)
        except FcconvError as error:
            code = _fail(str(error), debug)
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
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def _fail(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    click.echo(f"fcconv: error: {message}", err=True)
    return EXIT_TROUBLE


def _debug_option(function: Any) -> Any:
    return click.option(
        "--debug", is_flag=True, expose_value=False, help="Show tracebacks for errors."
    )(function)


def _layer_options(function: Any) -> Any:
    options = [
        click.option(
            "--layer",
            "layers",
            multiple=True,
            metavar="NAME[=PATCH]",
            help="Layer to convert, e.g. fc or fc6=7x7x512 (repeatable).",
        ),
        click.option(
            "--patch",
            metavar="HxWxC",
            help="Patch of every --layer without its own (HxW: C inferred).",
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
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout."),
        click.option(
            "--trust-pickle",
            is_flag=True,
            help="Allow arbitrary unpickling (runs code in the file: only for files you trust).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return _debug_option(function)


@click.group(cls=FcconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fcconv")
@_debug_option
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


def _parsed(patch: str | None, order: str | None, stride: str | None, size: str | None) -> tuple:
    from fcconv.geometry import parse_patch, parse_size, parse_stride
    from fcconv.layers import parse_order_option

    return (
        parse_patch(patch) if patch is not None else None,
        parse_order_option(order) if order is not None else None,
        parse_stride(stride) if stride is not None else None,
        parse_size(size) if size is not None else None,
    )


# ------------------------------------------------------------------- inspect


@cli.command()
@click.argument("checkpoint", metavar="CKPT")
@click.option("--channels", type=click.IntRange(min=1), help="Channels C of the patch, if known.")
@click.option(
    "--input",
    "input_shape",
    metavar="HxWxC",
    help="Feature map fed to the layer, if known: limits the patches listed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--trust-pickle", is_flag=True, help="Allow arbitrary unpickling (trusted files).")
@_debug_option
def inspect(
    checkpoint: str,
    channels: int | None,
    input_shape: str | None,
    as_json: bool,
    trust_pickle: bool,
) -> int:
    """List the Linear-shaped entries of CKPT and the patches that fit each."""
    from fcconv.checkpoint import load_checkpoint
    from fcconv.geometry import candidate_patches, parse_patch
    from fcconv.layers import describe, linear_entries
    from fcconv.report import emit_json, render_inspect, stderr_console

    limit = parse_patch(input_shape) if input_shape else None
    if limit is not None:
        channels = limit.channels or channels
    loaded = load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    info = describe(loaded.tensors)
    entries = linear_entries(info)
    fits = {
        entry.name: [
            str(p)
            for p in candidate_patches(entry.in_features, channels, limit=32 if limit else 6)
            if limit is None or (p.height <= limit.height and p.width <= limit.width)
        ][:6]
        for entry in entries
    }
    converted = _converted_layers(loaded.provenance, info)
    if as_json:
        emit_json(
            {
                "source": loaded.source,
                "format": loaded.format,
                "layers": [
                    {
                        "name": e.name,
                        "weight": e.weight_key,
                        "bias": e.bias_key,
                        "out_features": e.out_features,
                        "in_features": e.in_features,
                        "dtype": e.dtype,
                        "patches": fits[e.name],
                    }
                    for e in entries
                ],
                "converted": converted,
            }
        )
    else:
        render_inspect(stderr_console(), loaded.source, loaded.format, entries, fits, converted)
    return EXIT_OK


def _converted_layers(provenance: dict[str, Any], info: dict) -> list[dict[str, Any]]:
    from fcconv.layers import param_key

    layers = []
    for name, record in provenance.get("layers", {}).items():
        weight = info.get(param_key(name, "weight"))
        if weight is not None and len(weight.shape) == 4:
            layers.append({"layer": name, "conv_shape": list(weight.shape), **record})
    return layers


# ------------------------------------------------------------------- convert


@cli.command()
@click.argument("checkpoint", metavar="CKPT")
@click.option(
    "-o", "--output", metavar="OUT", help="Output path (default: <stem>.conv<suffix>; - = stdout)."
)
@_layer_options
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--no-verify", is_flag=True, help="Skip the checks before writing.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["torch", "safetensors"]),
    help="Output format (default: from the output's extension, else the input's).",
)
def convert(
    checkpoint: str,
    output: str | None,
    layers: tuple[str, ...],
    patch: str | None,
    order: str | None,
    stride: str | None,
    input_size: str | None,
    as_json: bool,
    trust_pickle: bool,
    force: bool,
    no_verify: bool,
    fmt: str | None,
) -> int:
    """Convert Linear layers of CKPT into Conv2d weights and write a new checkpoint."""
    from fcconv.atomic import check_output_path
    from fcconv.checkpoint import STDIO, default_output, load_checkpoint
    from fcconv.layers import LayerRequest

    patch_spec, order, stride_hw, size = _parsed(patch, order, stride, input_size)
    requests = [LayerRequest.parse(text) for text in layers]
    if not requests:
        raise SpecError("no layer to convert; name one with --layer NAME[=HxWxC]")
    output = output or default_output(checkpoint)
    if output == STDIO and as_json:
        raise SpecError(
            "--json puts its report on stdout, so the checkpoint cannot go there too; "
            "write it to a file with -o"
        )
    if output == STDIO and sys.stdout.isatty():
        raise SpecError(
            "refusing to write a binary checkpoint to the terminal; redirect stdout "
            "or write to a file with -o"
        )
    if output != STDIO:
        sources = (Path(checkpoint),) if checkpoint != STDIO else ()
        check_output_path(Path(output), force, sources)
    loaded = load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    return _convert_loaded(
        loaded, output, requests, patch_spec, order, stride_hw, size, as_json, force,
        not no_verify, fmt, checkpoint,
    )  # fmt: skip


def _convert_loaded(
    loaded: Any,
    output: str,
    requests: list,
    patch_spec: Any,
    order: str | None,
    stride: tuple[int, int] | None,
    size: tuple[int, int] | None,
    as_json: bool,
    force: bool,
    verify: bool,
    fmt: str | None,
    source_path: str,
) -> int:
    from fcconv.checkpoint import SAFETENSORS, format_for, save_checkpoint, with_provenance
    from fcconv.geometry import DEFAULT_ORDER
    from fcconv.layers import apply_plans, describe, plan_layers
    from fcconv.report import plan_dict, render_plans, render_verification
    from fcconv.report import stderr_console as console
    from fcconv.verify import verify_conversion

    plans = plan_layers(
        describe(loaded.tensors),
        requests,
        default_patch=patch_spec,
        order=order or DEFAULT_ORDER,
        stride=stride,
        source=loaded.source,
    )
    plans = _settle_orders(plans, loaded.tensors, explicit=order is not None, quiet=as_json)
    converted = apply_plans(loaded.tensors, plans)
    result = verify_conversion(plans, loaded.tensors, converted, size) if verify else None
    document = {
        "source": loaded.source,
        "output": output,
        "layers": [plan_dict(plan, size) for plan in plans],
        "verification": result.to_dict() if result is not None else None,
        "written": False,
    }
    if result is not None and not result:
        _render(document, as_json, lambda c: render_verification(c, result))
        if not as_json:
            console().print("[red]not written[/]: the conversion failed verification")
        return EXIT_DIFFERENT
    out_format = format_for(output, fmt, loaded.format)
    new = loaded.with_tensors(converted)
    if out_format == SAFETENSORS:
        new.metadata = with_provenance(loaded.metadata, {p.name: p.provenance() for p in plans})
    document["format"] = save_checkpoint(
        new, output, fmt=out_format, force=force, sources=(source_path,)
    )
    document["written"] = True

    def human(c: Any) -> None:
        render_plans(c, plans, size)
        if result is not None:
            render_verification(c, result)
        where = "stdout" if output == "-" else output
        c.print(f"wrote {where} ({document['format']})", markup=False)

    _render(document, as_json, human)
    return EXIT_OK


def _settle_orders(plans: list, tensors: Any, explicit: bool, quiet: bool) -> list:
    """Resolve ``--order auto`` from the weights, and warn when they contradict the order."""
    from fcconv.layers import AUTO

    try:
        from fcconv import evidence
    except ImportError:  # pragma: no cover - evidence ships with fcconv
        evidence = None
    settled = []
    for plan in plans:
        if plan.order == AUTO:
            settled.append(plan.with_order(_auto_order(evidence, plan, tensors)))
            continue
        settled.append(plan)
    return settled


def _auto_order(evidence: Any, plan: Any, tensors: Any) -> str:
    raise SpecError(f"--order auto is not available for {plan.name}; give --order")


def _render(document: dict, as_json: bool, human: Any) -> None:
    from fcconv.report import emit_json, stderr_console

    if as_json:
        emit_json(document)
    else:
        human(stderr_console())


# -------------------------------------------------------------------- verify


@cli.command()
@click.argument("original", metavar="ORIGINAL")
@click.argument("converted", metavar="CONVERTED")
@_layer_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random input.")
def verify(
    original: str,
    converted: str,
    layers: tuple[str, ...],
    patch: str | None,
    order: str | None,
    stride: str | None,
    input_size: str | None,
    as_json: bool,
    trust_pickle: bool,
    seed: int,
) -> int:
    """Check that CONVERTED holds exactly ORIGINAL's layers as convolutions.

    Exit 0 when equivalent, 1 when a difference is found.
    """
    from fcconv.checkpoint import STDIO, load_checkpoint
    from fcconv.layers import LayerRequest
    from fcconv.report import render_verification
    from fcconv.verify import plan_verification, verify_conversion

    if original == STDIO and converted == STDIO:
        raise SpecError("only one of ORIGINAL and CONVERTED can be - (stdin)")
    patch_spec, order, stride_hw, size = _parsed(patch, order, stride, input_size)
    before = load_checkpoint(original, trust_pickle=trust_pickle)
    after = load_checkpoint(converted, trust_pickle=trust_pickle)
    plans, notes = plan_verification(
        before.tensors,
        after.tensors,
        requests=[LayerRequest.parse(text) for text in layers],
        default_patch=patch_spec,
        order=order,
        stride=stride_hw,
        provenance=after.provenance.get("layers", {}),
        source=before.source,
    )
    result = verify_conversion(plans, before.tensors, after.tensors, size, seed)
    result.notes = notes
    _render(result.to_dict(), as_json, lambda c: render_verification(c, result))
    return result.exit_code


if __name__ == "__main__":  # pragma: no cover
    main()
