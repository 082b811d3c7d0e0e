"""The conversions whose bytes stream from file to file, verified before the rename.

:func:`streamed` is the pipeline they share: plan, write into a temporary
output, check it while the disk is still busy writing it, rename. The
writers: safetensors (:func:`convert_streaming`), torch zip checkpoints
(:func:`convert_torch_streaming`), and sharded folders
(:func:`fcconv.api.checkpoints.convert_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv.api.checkpoints import (
    ConvertResult,
    Job,
    Progress,
    plan_job,
    records_of,
    weigh_orders,
)
from fcconv.io.provenance import with_provenance
from fcconv.io.sources import Source, open_source
from fcconv.plan import LayerPlan
from fcconv.progress import phased

if TYPE_CHECKING:
    from fcconv.verify import VerifyResult


def streamed(
    job: Job,
    write: Callable[..., None],
    read_output: Callable[[Any], tuple[Source, list[str]]],
    label: str,
) -> ConvertResult:
    """Plan, then let a streaming writer convert, verifying its output before the rename.

    The check reads the finished temporary output back from the page cache
    while the disk is still writing it: every element of each converted
    weight against the original (:mod:`fcconv.verify.exact`), the biases, the names,
    dtypes and shapes of every tensor, then the functional check on
    :func:`~fcconv.verify.functional_rows` and the order evidence.
    ``read_output`` describes what ``write`` built, with any differences
    found in reading it.
    """
    from fcconv.io.sources import DiskTensors, byte_differences
    from fcconv.verify import VerificationFailed, verify_conversion

    plans = plan_job(job)
    results: list[VerifyResult] = []

    def check(built: Any) -> None:
        after, differences = read_output(built)
        weights = {p.weight_key for p in plans}
        biases = {p.bias_key for p in plans if p.bias_key}
        differences += byte_differences(job.source, after, weights, only=biases)
        result = verify_conversion(
            plans, DiskTensors(job.source), DiskTensors(after), job.size, differences=differences
        )
        weigh_orders(plans, job)
        results.append(result)
        if not result:
            raise VerificationFailed(result)

    layers = {p.weight_key: (p.patch, p.order) for p in plans}
    try:
        write(layers, plans, check if job.verify else None)
    except VerificationFailed as failure:
        return job.result(plans, failure.result)
    return job.result(plans, results[0] if results else None, format=label, mode="streamed")


@phased("writing")
def convert_streaming(job: Job, progress: Progress | None) -> ConvertResult:
    from fcconv.io.streaming import stream_convert

    def write(layers: dict, plans: list[LayerPlan], check: Any) -> None:
        metadata = with_provenance(job.source.metadata, records_of(plans))
        stream_convert(
            job.source.path, job.output, layers, metadata,
            force=job.force, progress=progress, check=check,
        )  # fmt: skip

    return streamed(job, write, lambda temporary: (open_source(str(temporary)), []), "safetensors")


@phased("writing")
def convert_torch_streaming(
    job: Job, progress: Progress | None, trust_pickle: bool
) -> ConvertResult | None:
    """A torch zip checkpoint rewritten record by record; None when it must go in memory."""
    from fcconv.io import torch_streaming as torchzip

    try:
        archive = torchzip.open_archive(job.source.path, trust_pickle=trust_pickle)
    except torchzip.Unsupported:
        return None
    loaded, job.source = job.source, torchzip.archive_source(archive)

    def write(layers: dict, plans: list[LayerPlan], check: Any) -> None:
        for plan in plans:  # a bias the checks cannot read by its bytes: in memory instead
            if plan.bias_key is not None:
                archive.span(plan.bias_key)
        torchzip.stream_convert_torch(
            archive, job.output, layers, force=job.force, progress=progress,
            check=(lambda temporary, rewrite: check((temporary, rewrite))) if check else None,
        )  # fmt: skip

    def read_output(built: tuple[Path, Any]) -> tuple[Source, list[str]]:
        after = torchzip.read_back(built[0], trust_pickle)
        return torchzip.archive_source(after), torchzip.differences(archive, after, built[1])

    try:
        return streamed(job, write, read_output, "torch")
    except torchzip.Unsupported:
        job.source = loaded
        job.evidence.clear()
        job.notes.clear()
        job.warnings.clear()
        return None
