"""The ``fcconv`` command: parse, call the library, render, exit 0 / 1 / 2.

Exit codes follow ``cmp``: 0 done or equivalent, 1 verification found a
difference, 2 the command could not run. Torch is imported only by the
commands that touch tensors, so ``fcconv --help`` starts at once.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from fcconv import __version__
from fcconv.errors import CLI_NAMES, FcconvError, SpecError

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


def _attach_convolutionalize() -> None:
    from fcconv.cli_convolutionalize import convolutionalize

    cli.add_command(convolutionalize)


_attach_convolutionalize()


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
@click.option(
    "--patch",
    metavar="HxWxC",
    help="Rank the six flatten orders by the weights' evidence for this patch.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--trust-pickle", is_flag=True, help="Allow arbitrary unpickling (trusted files).")
@_debug_option
def inspect(
    checkpoint: str,
    channels: int | None,
    input_shape: str | None,
    patch: str | None,
    as_json: bool,
    trust_pickle: bool,
) -> int:
    """List the Linear-shaped entries of CKPT and the patches that fit each."""
    from fcconv.geometry import candidate_patches, parse_patch
    from fcconv.layers import linear_entries
    from fcconv.report import emit_json, render_inspect, stderr_console
    from fcconv.sources import open_source

    limit = parse_patch(input_shape) if input_shape else None
    if limit is not None:
        channels = limit.channels or channels
    # Headers only for safetensors and shards: no tensor bytes read, no torch import.
    loaded = open_source(checkpoint, trust_pickle=trust_pickle, lazy=True)
    info = loaded.info
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
    evidence = _inspect_orders(loaded, entries, parse_patch(patch)) if patch is not None else {}
    if as_json:
        emit_json(
            {
                "source": loaded.path,
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
                "order_evidence": {name: ev.to_dict() for name, ev in evidence.items()},
            }
        )
    else:
        console = stderr_console()
        render_inspect(console, loaded.path, loaded.format, entries, fits, converted)
        for name, ev in evidence.items():
            verdict = f"order {ev.winner}" if ev.winner else "undecided"
            console.print(f"{name} (patch {ev.patch}): {verdict}: {ev.reason}", markup=False)
            console.print(f"  ranking: {ranking_text(ev)}", markup=False)
    return EXIT_OK


def _inspect_orders(source: Any, entries: list, spec: Any) -> dict[str, Any]:
    """Order evidence for every entry whose in_features the patch fits."""
    from fcconv.geometry import DEFAULT_ORDER, resolve_patch
    from fcconv.layers import LayerPlan

    found = {}
    for entry in entries:
        try:
            fitted = resolve_patch(spec, entry.in_features, entry.name)
        except SpecError:
            continue
        plan = LayerPlan(
            entry.name, entry.weight_key, entry.bias_key, entry.out_features, fitted,
            DEFAULT_ORDER, (fitted.height, fitted.width), entry.dtype,
        )  # fmt: skip
        found[entry.name] = order_evidence(source, plan)
    if not found:
        raise SpecError(f"patch {spec} fits no Linear-shaped entry; see the patches that fit")
    return found


def _converted_layers(provenance: dict[str, Any], info: dict) -> list[dict[str, Any]]:
    from fcconv.layers import param_key

    layers = []
    for name, record in provenance.get("layers", {}).items():
        weight = info.get(param_key(name, "weight"))
        if weight is not None and len(weight.shape) == 4:
            layers.append({"layer": name, "conv_shape": list(weight.shape), **record})
    return layers


# ------------------------------------------------------------------- convert


@dataclass
class ConvertOptions:
    """Everything ``convert`` was asked, parsed."""

    checkpoint: str
    output: str
    requests: list
    patch: Any
    order: str | None
    stride: tuple[int, int] | None
    size: tuple[int, int] | None
    as_json: bool
    force: bool
    verify: bool
    fmt: str | None
    link: bool
    quiet: bool
    evidence: dict[str, Any] = field(default_factory=dict)


@cli.command()
@click.argument("checkpoint", metavar="CKPT")
@click.option(
    "-o",
    "--output",
    metavar="OUT",
    help="Output path (default: <stem>.conv<suffix> beside the input; - = stdout).",
)
@_layer_options
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--no-verify", is_flag=True, help="Skip the checks before writing.")
@click.option(
    "--format",
    "fmt",
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
    link: bool,
    quiet: bool,
) -> int:
    """Convert Linear layers of CKPT into Conv2d weights and write a new checkpoint.

    CKPT is a .pt/.pth/.bin/.ckpt or .safetensors file, - for stdin, or a
    sharded checkpoint's folder (or its *.safetensors.index.json).
    """
    from fcconv.layers import LayerRequest
    from fcconv.sources import SHARDED, open_source

    patch_spec, order, stride_hw, size = _parsed(patch, order, stride, input_size)
    requests = [LayerRequest.parse(text) for text in layers]
    if not requests:
        raise SpecError("no layer to convert; name one with --layer NAME[=HxWxC]")
    options = ConvertOptions(
        checkpoint, output or "", requests, patch_spec, order, stride_hw, size, as_json,
        force, not no_verify, fmt, link, quiet,
    )  # fmt: skip
    source = open_source(checkpoint, trust_pickle=trust_pickle, lazy=True)
    if source.format == SHARDED:
        return _convert_sharded(source, options)
    options.output = output or _default_output(checkpoint)
    _check_output(options)
    out_format = _output_format(options, source.format)
    if source.on_disk and out_format == "safetensors" and options.output != "-":
        return _convert_streaming(source, options)
    if source.on_disk:
        source = open_source(checkpoint, trust_pickle=trust_pickle, lazy=False)
    return _convert_in_memory(source, options, out_format)


def _default_output(checkpoint: str) -> str:
    from fcconv.checkpoint import default_output

    return default_output(checkpoint)


def _check_output(options: ConvertOptions) -> None:
    from fcconv.atomic import check_output_path

    if options.output == "-":
        if options.as_json:
            raise SpecError(
                "--json puts its report on stdout, so the checkpoint cannot go there too; "
                "write it to a file with -o"
            )
        if sys.stdout.isatty():
            raise SpecError(
                "refusing to write a binary checkpoint to the terminal; redirect stdout "
                "or write to a file with -o"
            )
        return
    sources = (Path(options.checkpoint),) if options.checkpoint != "-" else ()
    check_output_path(Path(options.output), options.force, sources)


def _output_format(options: ConvertOptions, input_format: str) -> str:
    from fcconv.checkpoint import format_for

    return format_for(options.output, options.fmt, input_format)


def _plan(source: Any, options: ConvertOptions) -> list:
    from fcconv.geometry import DEFAULT_ORDER, make_grid
    from fcconv.layers import layer_inputs, plan_layers

    plans = plan_layers(
        source.info,
        options.requests,
        default_patch=options.patch,
        order=options.order or DEFAULT_ORDER,
        stride=options.stride,
        source=source.path,
    )
    if options.size is not None:  # refuse a too-small --input before anything is written
        for plan, size in zip(plans, layer_inputs(plans, options.size), strict=True):
            make_grid(size, plan.patch, plan.stride)
    return _settle_orders(plans, source, options)


def _layer_keys(plans: list) -> list[str]:
    return [p.weight_key for p in plans] + [p.bias_key for p in plans if p.bias_key]


def _convert_in_memory(source: Any, options: ConvertOptions, out_format: str) -> int:
    from fcconv.checkpoint import SAFETENSORS, save_checkpoint, with_provenance
    from fcconv.layers import apply_plans
    from fcconv.verify import verify_conversion

    loaded = source.loaded
    plans = _plan(source, options)
    converted = apply_plans(loaded.tensors, plans)
    result = None
    if options.verify:
        result = verify_conversion(plans, loaded.tensors, converted, options.size)
        if not result:
            return _report_failure(plans, result, options)
    new = loaded.with_tensors(converted)
    if out_format == SAFETENSORS:
        new.metadata = with_provenance(loaded.metadata, {p.name: p.provenance() for p in plans})
    written = save_checkpoint(
        new, options.output, fmt=out_format, force=options.force, sources=(options.checkpoint,)
    )
    return _report_success(plans, result, options, written, how="in memory")


def _verifying(plans: list, source: Any, options: ConvertOptions, read_after: Any, results: list):
    """A check for the streaming writers: verify the finished temporary output, or abort."""
    from fcconv.verify import VerificationFailed, verify_conversion

    keys = _layer_keys(plans)

    def check(built: Any) -> None:
        result = verify_conversion(plans, source.read(keys), read_after(built, keys), options.size)
        results.append(result)
        if not result:
            raise VerificationFailed(result)

    return check if options.verify else None


def _convert_streaming(source: Any, options: ConvertOptions) -> int:
    from fcconv.checkpoint import with_provenance
    from fcconv.streaming import read_tensors, stream_convert

    def write(layers: dict, plans: list, check: Any, progress: Any) -> None:
        metadata = with_provenance(source.metadata, {p.name: p.provenance() for p in plans})
        stream_convert(
            source.path, options.output, layers, metadata,
            force=options.force, progress=progress, check=check,
        )  # fmt: skip

    return _streamed(source, options, write, read_tensors, "safetensors")


def _convert_sharded(source: Any, options: ConvertOptions) -> int:
    from fcconv.checkpoint import with_provenance
    from fcconv.sharded import convert_sharded, default_output, read_sharded_tensors

    options.output = options.output or str(default_output(options.checkpoint))

    def write(layers: dict, plans: list, check: Any, progress: Any) -> None:
        by_weight = {p.weight_key: p for p in plans}

        def metadata(header: Any, shard_layers: Any) -> dict[str, str]:
            records = {by_weight[key].name: by_weight[key].provenance() for key in shard_layers}
            return with_provenance(header.metadata, records)

        convert_sharded(
            options.checkpoint, options.output, layers, metadata,
            force=options.force, link=options.link, progress=progress, check=check,
        )  # fmt: skip

    return _streamed(source, options, write, read_sharded_tensors, "sharded safetensors")


def _streamed(source: Any, options: ConvertOptions, write: Any, read_after: Any, label: str) -> int:
    """Plan, then let a streaming writer convert, verifying its output before the rename."""
    from fcconv.streaming import progress_bar
    from fcconv.verify import VerificationFailed

    plans = _plan(source, options)
    results: list = []
    check = _verifying(plans, source, options, read_after, results)
    layers = {p.weight_key: (p.patch, p.order) for p in plans}
    try:
        with progress_bar("converting", enabled=False if options.quiet else None) as progress:
            write(layers, plans, check, progress)
    except VerificationFailed as failure:
        return _report_failure(plans, failure.result, options)
    return _report_success(plans, results[0] if results else None, options, label, how="streamed")


def _document(plans: list, result: Any, options: ConvertOptions) -> dict[str, Any]:
    from fcconv.layers import layer_inputs
    from fcconv.report import plan_dict

    sizes = layer_inputs(plans, options.size)
    layers = [plan_dict(plan, size) for plan, size in zip(plans, sizes, strict=True)]
    for layer, plan in zip(layers, plans, strict=True):
        evidence = options.evidence.get(plan.name)
        layer["order_evidence"] = evidence.to_dict() if evidence is not None else None
    return {
        "source": options.checkpoint,
        "output": options.output,
        "layers": layers,
        "verification": result.to_dict() if result is not None else None,
        "written": False,
    }


def _report_failure(plans: list, result: Any, options: ConvertOptions) -> int:
    from fcconv.report import render_verification

    def human(console: Any) -> None:
        render_verification(console, result)
        console.print("[red]not written[/]: the conversion failed verification")

    _render(_document(plans, result, options), options.as_json, human)
    return EXIT_DIFFERENT


def _report_success(
    plans: list, result: Any, options: ConvertOptions, written: str, how: str
) -> int:
    from fcconv.report import render_plans, render_verification

    document = {**_document(plans, result, options), "written": True, "format": written}
    document["mode"] = how

    def human(console: Any) -> None:
        render_plans(console, plans, options.size)
        if result is not None:
            render_verification(console, result)
        where = "stdout" if options.output == "-" else options.output
        console.print(f"wrote {where} ({written}, {how})", markup=False)

    _render(document, options.as_json, human)
    return EXIT_OK


def _settle_orders(plans: list, source: Any, options: ConvertOptions) -> list:
    """Resolve ``--order auto`` from the weights, and warn when they contradict the order."""
    from fcconv.layers import AUTO

    settled = []
    for plan in plans:
        if plan.order != AUTO and not options.verify:
            # --no-verify skips every check, this one too: it would import torch.
            settled.append(plan)
            continue
        evidence = order_evidence(source, plan)
        options.evidence[plan.name] = evidence
        if plan.order == AUTO:
            if evidence.winner is None:
                ask = "" if "--order" in evidence.reason else "; give --order"
                raise SpecError(
                    f"cannot choose the flatten order of {plan.name}: {evidence.reason}; "
                    f"ranking: {ranking_text(evidence)}{ask}"
                )
            plan = plan.with_order(evidence.winner)
            ranking = ranking_text(evidence)
            _say(f"{plan.name}: order {plan.order} chosen from the weights ({ranking})")
        elif evidence.favours_other_than(plan.order):
            _say(
                f"warning: {_disagreement(plan.name, plan.order, evidence)}; converting as "
                f"{plan.order} as asked (see --order auto)",
            )
        settled.append(plan)
    return settled


def order_evidence(source: Any, plan: Any) -> Any:
    """How the weights rank the six flatten orders for ``plan``'s patch (rows read only)."""
    from fcconv.evidence import rank_orders, sample_rows

    rows = sample_rows(plan.out_features, plan.patch.features).tolist()
    return rank_orders(source.read_rows(plan.weight_key, rows), plan.patch)


def ranking_text(evidence: Any) -> str:
    """``chw 0.419, wch 0.100, … (margin 0.319 = 21.9σ)`` in one line."""
    scores = ", ".join(f"{order} {score:.3f}" for order, score in evidence.ranking) or "no scores"
    sigmas = evidence.margin_sigmas
    margin = (
        f"; margin {evidence.margin:.3f} = {sigmas:.1f}σ of noise"
        if evidence.margin is not None and sigmas is not None
        else ""
    )
    return scores + margin


def _disagreement(name: str, order: str, evidence: Any) -> str:
    best = evidence.families[0][0]
    return (
        f"the weights of {name} favour order {'/'.join(evidence.families[0])} "
        f"({evidence.score(best):.3f}) over {order} ({evidence.score(order):.3f})"
    )


def _say(line: str) -> None:
    click.echo(f"fcconv: {line}", err=True)


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
    from fcconv.checkpoint import STDIO
    from fcconv.layers import LayerRequest
    from fcconv.report import render_verification
    from fcconv.sources import byte_differences, open_source, read_all, tensors_of
    from fcconv.verify import plan_verification, verify_conversion

    if original == STDIO and converted == STDIO:
        raise SpecError("only one of ORIGINAL and CONVERTED can be - (stdin)")
    patch_spec, order, stride_hw, size = _parsed(patch, order, stride, input_size)
    before_source = open_source(original, trust_pickle=trust_pickle)
    after_source = open_source(converted, trust_pickle=trust_pickle)
    # Two files on disk are compared by their bytes; only the layers are loaded.
    on_disk = before_source.on_disk and after_source.on_disk
    before = tensors_of(before_source) if on_disk else read_all(before_source)
    after = tensors_of(after_source) if on_disk else read_all(after_source)
    plans, notes = plan_verification(
        before,
        after,
        requests=[LayerRequest.parse(text) for text in layers],
        default_patch=patch_spec,
        order=order,
        stride=stride_hw,
        provenance=after_source.provenance.get("layers", {}),
        source=original,
        info=(before_source.info, after_source.info),
    )
    skip = {plan.weight_key for plan in plans}
    differences = byte_differences(before_source, after_source, skip) if on_disk else None
    result = verify_conversion(plans, before, after, size, seed, differences)
    result.notes = notes + _evidence_notes(plans, before)
    _render(result.to_dict(), as_json, lambda c: render_verification(c, result))
    return result.exit_code


def _evidence_notes(plans: list, tensors: Any) -> list[str]:
    """Where the weights clearly favour another order than the one the files agree on."""
    from fcconv.evidence import rank_orders

    notes = []
    for plan in plans:
        evidence = rank_orders(tensors[plan.weight_key], plan.patch)
        if evidence.favours_other_than(plan.order):
            notes.append(
                f"{_disagreement(plan.name, plan.order, evidence)}: the two files agree, "
                f"but the layer was probably trained on {evidence.families[0][0]}-flattened "
                "patches"
            )
    return notes


if __name__ == "__main__":  # pragma: no cover
    main()
