"""The checkpoint jobs, each a whole command: inspect, convert and verify checkpoint files.

Every job takes paths and options in library terms (strings as on the
command line, or parsed values) and returns a result that is truthy on
success, has ``.to_dict()`` (exactly the document ``fcconv … --json``
prints) and ``.exit_code`` (0 done / equivalent, 1 verification found a
difference). A problem the caller can fix raises an
:class:`~fcconv.errors.FcconvError` subclass, with fields, before any file
is written.

>>> import fcconv
>>> result = fcconv.convert_checkpoint(  # doctest: +SKIP
...     "model.pt", "model.conv.pt", layers=["fc"], patch="20x20x10", input_size="100x60"
... )
>>> bool(result), result.to_dict()["layers"][0]["conv_shape"]  # doctest: +SKIP
(True, [64, 10, 20, 20])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv.api.inspection import order_evidence, spec_of
from fcconv.errors import OrderUndecidedError, OutputError, SpecError
from fcconv.io.atomic import STDIO, check_output_path, default_output, inputs_protected
from fcconv.io.checkpoint import IN_MEMORY, SAFETENSORS, TORCH, format_for, save_checkpoint
from fcconv.io.keras import KERAS, KERAS_FORMATS
from fcconv.io.provenance import PROVENANCE_KEY, with_provenance
from fcconv.io.sources import SHARDED, Source, open_source, source_of
from fcconv.patches import AnySpec, PatchSpecNd, parse_extent
from fcconv.plan import (
    AUTO,
    LayerPlan,
    LayerRequest,
    layer_inputs,
    parse_order_option,
    plan_layers,
)
from fcconv.windows import make_grid

if TYPE_CHECKING:
    from fcconv.evidence import OrderEvidence
    from fcconv.verify import VerifyResult

FLIP_WARNING = (
    "kernels flipped for a framework that convolves (Theano, textbook convolution); "
    "PyTorch, Keras 3 and ONNX cross-correlate: there, run weight.flip(2, 3) instead"
)


def flip_warning(plans: Sequence[LayerPlan]) -> str:
    """:data:`FLIP_WARNING`, naming the flip back of each rank converted (``flip(2)`` in 1-D)."""
    ranks = sorted({plan.ndim for plan in plans})
    calls = " or ".join(f"weight.flip({', '.join(str(2 + a) for a in range(n))})" for n in ranks)
    return FLIP_WARNING.replace("weight.flip(2, 3)", calls)


Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``, called as an output is written."""

Size = str | Sequence[int] | None


# ------------------------------------------------------------------- options


def extent(value: Size, what: str) -> tuple[int, ...] | None:
    """A size or stride given as ``"T"``, ``"HxW"``, ``"DxHxW"`` or a sequence of ints.

    One number stands for every axis; how many a layer needs is its patch's
    rank, checked when the layers are planned.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return parse_extent(value, what)
    numbers = (value,) if isinstance(value, int) else value
    if not isinstance(numbers, tuple | list) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in numbers
    ):
        raise SpecError(f'a {what} is text ("2x2"), an int or a tuple of ints, not {value!r}')
    return parse_extent("x".join(map(str, numbers)), what)


def _requests(layers: Sequence[str | LayerRequest]) -> list[LayerRequest]:
    if isinstance(layers, str | tuple) and not isinstance(layers, list):
        layers = [layers] if isinstance(layers, str) or _is_pair(layers) else list(layers)
    if isinstance(layers, Mapping):  # {"fc6": "3x3x32", "fc7": (1, 1)}
        layers = list(layers.items())
    return [LayerRequest.of(r) for r in layers]


def _is_pair(value: tuple[Any, ...]) -> bool:
    """``("fc", (8, 8, 16))``: one layer with its patch, not two layers."""
    return len(value) == 2 and isinstance(value[0], str) and not isinstance(value[1], str)


# ------------------------------------------------------------------- convert


@dataclass
class ConvertResult:
    """What :func:`convert_checkpoint` did: the plans, the checks, and whether it wrote.

    Truthy when the output was written (or, for a state dict converted without an
    output path, returned as ``state_dict``); ``exit_code`` 1 when verification
    found a difference (and nothing was written).
    """

    source: str
    output: str
    plans: list[LayerPlan]
    input_size: tuple[int, ...] | None
    verification: VerifyResult | None
    written: bool
    format: str | None = None
    mode: str | None = None
    evidence: dict[str, OrderEvidence] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    state_dict: Any = None
    """The converted checkpoint, when a state dict was converted with no output path:
    the object given, its tensors converted (untouched ones are the same tensors)."""

    def __bool__(self) -> bool:
        return self.written or self.state_dict is not None

    @property
    def exit_code(self) -> int:
        return 0 if self else 1

    def to_dict(self) -> dict[str, Any]:
        sizes = layer_inputs(self.plans, self.input_size)
        layers = []
        for plan, size in zip(self.plans, sizes, strict=True):
            evidence = self.evidence.get(plan.name)
            layers.append(
                {
                    **plan.to_dict(),
                    "geometry": plan.geometry(size),
                    "order_evidence": evidence.to_dict() if evidence is not None else None,
                }
            )
        return {
            "source": self.source,
            "output": self.output,
            "layers": layers,
            "verification": (
                self.verification.to_dict() if self.verification is not None else None
            ),
            "written": self.written,
            "format": self.format,
            "mode": self.mode,
            "notes": self.notes,
            "warnings": self.warnings,
        }


@dataclass
class Job:
    """One conversion as asked, parsed, and what it has learnt so far."""

    source: Source
    output: str
    requests: list[LayerRequest]
    patch: AnySpec | None
    order: str | None
    stride: tuple[int, ...] | None
    size: tuple[int, ...] | None
    verify: bool
    force: bool
    flip: bool = False
    evidence: dict[str, OrderEvidence] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def result(self, plans: list[LayerPlan], verification: Any, **written: Any) -> ConvertResult:
        return ConvertResult(
            self.source.path, self.output, plans, self.size, verification,
            written=bool(written), evidence=self.evidence, notes=self.notes,
            warnings=self.warnings, **written,
        )  # fmt: skip


@inputs_protected("src")
def convert_checkpoint(
    src: str | Path | Mapping[str, Any],
    dst: str | Path | None = None,
    *,
    layers: Sequence[str | LayerRequest],
    patch: str | AnySpec | None = None,
    order: str | None = None,
    stride: Size = None,
    input_size: Size = None,
    verify: bool = True,
    force: bool = False,
    format: str | None = None,
    link: bool = False,
    trust_pickle: bool = False,
    progress: Progress | None = None,
    flip: bool = False,
) -> ConvertResult:
    """Convert Linear layers of a checkpoint into conv weights and write a new checkpoint.

    Args:
        src: a ``.pt``/``.pth``/``.bin``/``.ckpt`` or ``.safetensors`` file,
            ``-`` for stdin, a sharded checkpoint's folder (or its index), or a
            state dict in memory (``model.state_dict()``, or a training
            checkpoint's dict around one).
        dst: the output; default ``<stem>.conv<suffix>`` beside ``src``;
            ``-`` for stdout. The input is never overwritten. For a state dict
            given in memory, no ``dst`` means nothing is written: the result's
            ``state_dict`` holds the converted one.
        layers: the layers to convert, as names or ``NAME=PATCH`` strings
            (``["fc6=7x7x512", "fc7=1x1"]``, ``["fc1=16", "fc2=1"]`` in 1-D).
        patch: the patch of every layer named without its own: ``HxWxC``,
            or ``HxW`` with C inferred; ``T`` or ``l=T,c=C`` for a
            ``Conv1d``, ``DxHxWxC`` or ``d=D,h=H,w=W[,c=C]`` for a ``Conv3d``.
        order: the flatten order (``chw`` default, ``hwc``, …; ``cl``/``lc``
            in 1-D, ``cdhw``/``dhwc``/… in 3-D), or ``auto`` to read it from
            the weights (1-D, 2-D, and 3-D patches with a side of 1).
        stride: the window stride, one number for every axis or one per
            axis (default: the patch size).
        input_size: the input for the geometry and the functional check,
            one number for every axis or one per axis.
        verify: check the conversion before writing (a failing one is not written).
        force: replace an existing output.
        format: ``torch`` or ``safetensors`` (default: from ``dst``'s extension).
        link: sharded input: hard-link the untouched shards.
        trust_pickle: allow arbitrary unpickling (only for files you trust).
        progress: ``progress(bytes_done, bytes_total)`` while streaming.
        flip: reverse every kernel's spatial axes, for a framework that
            convolves (Theano, textbook convolution); recorded in the
            provenance, which ``verify`` reads.

    Returns:
        A :class:`ConvertResult`, truthy when written.
    """
    requests = _requests(layers)
    # A torch zip file is first only described (mapped, no tensor byte read): the
    # streamed rewrite reads it by byte ranges; the in-memory path reads it whole below.
    in_memory = isinstance(src, Mapping)  # a state dict given as itself
    described = not in_memory and str(src) != STDIO
    source = source_of(src, trust_pickle=trust_pickle, lazy=True, describe_only=described)
    if not requests and source.format not in KERAS_FORMATS:  # a Keras model names its head
        raise SpecError("no layer to convert; name one with {layers} NAME[=HxWxC]")
    job = Job(
        source=source,
        output=str(dst) if dst is not None else IN_MEMORY if in_memory else default_output(src),
        requests=requests,
        patch=spec_of(patch),
        order=parse_order_option(order) if order is not None else None,
        stride=extent(stride, "stride"),
        size=extent(input_size, "input size"),
        verify=verify,
        force=force,
        flip=flip,
    )
    if source.format in KERAS_FORMATS:
        from fcconv.api.keras import convert_keras

        return convert_keras(job, dst, format)
    if source.format == SHARDED:
        if flip:
            raise SpecError(
                "{flip} is not available for sharded checkpoints; convert the shard "
                "folder without it"
            )
        return _convert_sharded(job, link, progress)
    if in_memory and dst is None:  # converted in memory, returned as result.state_dict
        return _convert_in_memory(job, None)
    check_output_path(job.output, force, source.inputs)
    out_format = format_for(job.output, format, source.format)
    if out_format in KERAS_FORMATS:
        raise SpecError(
            f"{source.path} is a PyTorch checkpoint, which fcconv writes as .pt or "
            ".safetensors only; choose another {output}"
        )
    # The streamed rewrites permute rows; a flipped kernel is made in memory.
    if source.on_disk and out_format == SAFETENSORS and job.output != STDIO and not flip:
        from fcconv.api.streamed import convert_streaming

        return convert_streaming(job, progress)
    streams = not flip and not in_memory and STDIO not in (source.path, job.output)
    if source.format == out_format == TORCH and streams:
        from fcconv.api.streamed import convert_torch_streaming

        streamed = convert_torch_streaming(job, progress, trust_pickle)
        if streamed is not None:
            return streamed
    if source.on_disk or (described and source.format == TORCH):
        job.source = open_source(str(src), trust_pickle=trust_pickle, lazy=False)
    return _convert_in_memory(job, out_format)


def plan_job(job: Job) -> list[LayerPlan]:
    if job.source.format in KERAS_FORMATS:
        _refuse_nd_for_keras(job)
    plans = plan_layers(
        job.source.info,
        job.requests,
        default_patch=job.patch,
        order=job.order,
        stride=job.stride,
        source=job.source.path,
        flip=job.flip,
    )
    # refuse a too-small input_size, or a check too large to run, before anything is written
    for plan, size in zip(plans, layer_inputs(plans, job.size), strict=True):
        if job.size is not None:
            make_grid(size, plan.patch, plan.stride)
        if job.verify:
            from fcconv.verify.windows import check_work

            check_work(plan.patch, plan.out_features, plan.stride, size, plan.name, True)
    if job.flip:
        job.warnings.append(flip_warning(plans))
    return [_settle_order(plan, job) for plan in plans]


def _refuse_nd_for_keras(job: Job) -> None:
    """Keras files are read and written as Dense and Conv2D layers: 2-D patches only."""
    for request in job.requests:
        spec = request.patch or job.patch
        if isinstance(spec, PatchSpecNd):
            raise SpecError(
                f"{job.source.path} is a Keras file, whose Dense layers become Conv2D kernels: "
                f"give {request.name} a 2-D {{patch}} (HxWxC), not the {spec.ndim}-D {spec}",
                layer=request.name,
            )


def _settle_order(plan: LayerPlan, job: Job) -> LayerPlan:
    """Resolve ``auto`` from the weights, before anything is written."""
    if plan.order != AUTO:
        return plan
    evidence = order_evidence(job.source, plan)
    job.evidence[plan.name] = evidence
    if evidence.winner is None:
        raise OrderUndecidedError(
            f"cannot choose the flatten order of {plan.name}: {evidence.reason}; "
            f"ranking: {evidence.ranking_text()}; choose it with {{order}}",
            evidence=evidence,
            layer=plan.name,
        )
    job.notes.append(
        f"{plan.name}: order {evidence.winner} chosen from the weights ({evidence.ranking_text()})"
    )
    return plan.with_order(evidence.winner, "weights", evidence.margin)


def weigh_orders(plans: list[LayerPlan], job: Job) -> None:
    """Part of the checks: warn where the weights contradict the order given.

    The streaming paths call it after the bytes are written, while the disk
    is still busy with them, so its torch import and reading cost no time of
    their own; ``--no-verify`` skips it.
    """
    if not job.verify:
        return
    for plan in plans:
        if plan.name in job.evidence:  # order auto: weighed before writing
            continue
        evidence = order_evidence(job.source, plan)
        job.evidence[plan.name] = evidence
        if evidence.favours_other_than(plan.order):
            job.warnings.append(
                f"{evidence.disagreement(plan.name, plan.order)}; converting as {plan.order} "
                "as asked (order auto takes it from the weights)"
            )


def records_of(plans: list[LayerPlan]) -> dict[str, dict[str, Any]]:
    return {plan.name: plan.provenance() for plan in plans}


def apply_and_verify(job: Job, plans: list[LayerPlan]) -> tuple[dict[str, Any], Any]:
    """The converted tensors of a loaded source, and their verification (None if skipped)."""
    from fcconv.plan import apply_plans
    from fcconv.verify import verify_conversion

    loaded = job.source.loaded
    assert loaded is not None
    weigh_orders(plans, job)
    converted = apply_plans(loaded.tensors, plans)
    if not job.verify:
        return converted, None
    return converted, verify_conversion(plans, loaded.tensors, converted, job.size)


def _convert_in_memory(job: Job, out_format: str | None) -> ConvertResult:
    """Convert a loaded source and write it as ``out_format``; None: return it instead."""
    loaded = job.source.loaded
    assert loaded is not None
    plans = plan_job(job)
    converted, verification = apply_and_verify(job, plans)
    if verification is not None and not verification:
        return job.result(plans, verification)
    new = loaded.with_tensors(converted)
    if out_format is None:
        result = job.result(plans, verification)  # nothing written
        result.mode, result.state_dict = "in memory", new.payload()
        return result
    if out_format == SAFETENSORS:
        new.metadata = with_provenance(loaded.metadata, records_of(plans))
    elif loaded.format == SAFETENSORS and set(loaded.metadata or {}) - {PROVENANCE_KEY}:
        keys = ", ".join(sorted(set(loaded.metadata or {}) - {PROVENANCE_KEY}))
        job.warnings.append(
            f"the __metadata__ of {loaded.source} ({keys}) is not kept: a torch file has no "
            "place for it (write a .safetensors output to keep it)"
        )
    written = save_checkpoint(
        new, job.output, fmt=out_format, force=job.force, sources=(job.source.path,)
    )
    return job.result(plans, verification, format=written, mode="in memory")


def _convert_sharded(job: Job, link: bool, progress: Progress | None) -> ConvertResult:
    from fcconv.api.streamed import streamed
    from fcconv.io.sharded import convert_sharded

    if job.output == STDIO:
        raise OutputError(
            f"{job.source.path} is a sharded checkpoint, written as a folder, which cannot "
            "go to stdout; give a folder name as {output}",
            path=job.source.path,
        )

    def write(layers: dict, plans: list[LayerPlan], check: Any) -> None:
        by_weight = {p.weight_key: p for p in plans}

        def metadata(header: Any, shard_layers: Any) -> dict[str, str]:
            records = {by_weight[key].name: by_weight[key].provenance() for key in shard_layers}
            return with_provenance(header.metadata, records)

        convert_sharded(
            job.source.path, job.output, layers, metadata,
            force=job.force, link=link, progress=progress, check=check,
        )  # fmt: skip

    def read_output(built: Any) -> tuple[Source, list[str]]:
        return open_source(str(built.index_path)), []

    return streamed(job, write, read_output, "sharded safetensors")


# -------------------------------------------------------------------- verify


def verify_checkpoints(
    original: str | Path | Mapping[str, Any],
    converted: str | Path | Mapping[str, Any],
    *,
    layers: Sequence[str | LayerRequest] = (),
    patch: str | AnySpec | None = None,
    order: str | None = None,
    stride: Size = None,
    input_size: Size = None,
    seed: int = 0,
    trust_pickle: bool = False,
    flip: bool | None = None,
) -> VerifyResult:
    """Check that ``converted`` holds exactly ``original``'s layers as convolutions.

    No layer arguments are needed: the converted layers are found (2-D in the
    original, a 3-D, 4-D or 5-D conv kernel with as many elements in the
    converted file), their order and stride taken from fcconv's provenance
    where the file has it. Without a record or ``order`` each layer is judged
    in the order the model uses: the weights' evidence when it is clear,
    else the framework's convention (``chw``; ``hwc`` for Keras files); a
    kernel that matches only another order is a difference naming it.
    Arguments given explicitly are checked, not trusted. Two files on disk
    are compared by their bytes; only the converted layers are loaded.
    ``flip`` (default: as the provenance says) checks kernels flipped for a
    framework that convolves. Keras files are compared in PyTorch's layout
    (a Dense kernel as the Linear weight).

    Returns:
        A :class:`~fcconv.verify.VerifyResult`, truthy when equivalent.
    """
    from fcconv.io.sources import DiskTensors, byte_differences, read_all, tensors_of
    from fcconv.verify import verify_conversion
    from fcconv.verify.orders import plan_verification

    if str(original) == STDIO and str(converted) == STDIO:
        raise SpecError("only one of the two checkpoints can be - (stdin)")
    if not -(1 << 63) <= seed < 1 << 64:  # what torch's generator takes
        raise SpecError(f"{{seed}} {seed} is out of range; give a seed below 2**64")
    order_option = parse_order_option(order) if order is not None else None
    before_source = source_of(original, trust_pickle=trust_pickle)
    after_source = source_of(converted, trust_pickle=trust_pickle)
    on_disk = before_source.on_disk and after_source.on_disk
    before = tensors_of(before_source) if on_disk else read_all(before_source)
    after = tensors_of(after_source) if on_disk else read_all(after_source)
    planned = plan_verification(
        before,
        after,
        requests=_requests(layers),
        default_patch=spec_of(patch),
        order=order_option,
        stride=extent(stride, "stride"),
        provenance=after_source.records,
        source=str(original),
        info=(before_source.info, after_source.info),
        flip=flip,
        weigh=_weigher(before_source),
        default_order=default_order(before_source.format),
        model_orders=_model_orders(before_source),
    )
    plans, notes = planned.plans, planned.notes
    size = extent(input_size, "input size")
    if on_disk:
        skip = {plan.weight_key for plan in plans}
        differences = byte_differences(before_source, after_source, skip)
        sides: tuple[Any, Any] = (DiskTensors(before_source), DiskTensors(after_source))
        result = verify_conversion(plans, *sides, size, seed, differences)
    else:
        result = verify_conversion(plans, before, after, size, seed)
    for check in result.layers:
        if check.plan.name in planned.problems:
            check.problems.insert(0, planned.problems[check.plan.name])
    result.differences += _surrounding_differences(before_source, after_source, notes)
    result.notes = notes + _evidence_notes(plans, before_source, planned.evidence)
    if before_source.format == after_source.format == KERAS and result:
        from fcconv.api.keras import check_in_keras

        result.runtime.append(check_in_keras(str(original), str(converted), plans, seed))
    return result


def _surrounding_differences(before: Source, after: Source, notes: list[str]) -> list[str]:
    """Everything but tensors must be kept: metadata, the training state around the weights."""
    from fcconv.verify.untouched import value_differences

    if before.format != after.format:
        notes.append(
            f"only tensors are compared: {before.path} is {before.format} and {after.path} is "
            f"{after.format}, which keep different things around them"
        )
        return []
    return value_differences(before.surroundings, after.surroundings, "checkpoint")


def _model_orders(source: Source) -> dict[str, tuple[str, str]]:
    """The orders a Keras model's config says its Dense layers read (none for other files)."""
    if source.format not in KERAS_FORMATS:
        return {}
    from fcconv.keras.summary import model_orders

    return model_orders(source.path)


def default_order(source_format: str) -> str | None:
    """The framework's convention for a file of this format (None: PyTorch's ``chw``).

    A Keras Dense after a channels_last ``Flatten`` reads ``hwc``.
    """
    return "hwc" if source_format in KERAS_FORMATS else None


def _weigher(source: Source) -> Any:
    """``weigh(name, weight_key, patch, out_features)``: the evidence of one layer's weight."""

    def weigh(name: str, key: str, patch: Any, out_features: int) -> OrderEvidence:
        plan = LayerPlan(name, key, None, out_features, patch, "", (), "")
        return order_evidence(source, plan)

    return weigh


def _evidence_notes(
    plans: list[LayerPlan], source: Source, weighed: dict[str, OrderEvidence]
) -> list[str]:
    """Where the weights clearly favour another order than the one the files agree on."""
    notes = []
    for plan in plans:
        if plan.order_from == "weights":
            continue  # the evidence chose it
        evidence = weighed.get(plan.name) or order_evidence(source, plan)
        if evidence.favours_other_than(plan.order):
            notes.append(
                f"{evidence.disagreement(plan.name, plan.order)}: the two files agree, "
                f"but the layer was probably trained on {evidence.families[0][0]}-flattened "
                "patches"
            )
    return notes
