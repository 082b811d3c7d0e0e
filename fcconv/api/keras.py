"""The convert job for Keras files: plan in PyTorch's terms, write Keras (or PyTorch) files.

A Keras file is seen in PyTorch's layout (:mod:`fcconv.io.keras`), so the
plan, the permutation and the checks are those of every checkpoint. What
differs is the output:

- a ``.keras`` model comes out as a ``.keras`` model whose config has the
  flatten removed and the Dense layers replaced by ``Conv2D``
  (:mod:`fcconv.keras.config`); it is loaded and run in Keras before it is
  renamed into place (:mod:`fcconv.keras.check`);
- a legacy ``.h5`` model the same, in its own layout;
- a ``.weights.h5`` file comes out as one whose converted kernels sit in the
  groups Keras gives the new ``Conv2D`` layers;
- ``format="torch"``/``"safetensors"`` writes PyTorch's layout (OIHW kernels).

With a model config and no layers named, the head is read off the config:
the Dense layers after the flatten, the feature map's size, and the order
(``hwc``, or what a ``Permute`` before the flatten makes of it).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv.errors import CheckpointError, FcconvError, SpecError
from fcconv.geometry import PatchSpec, oihw_to_keras_conv
from fcconv.io.atomic import STDIO, atomic_output, check_output_path
from fcconv.io.checkpoint import SAFETENSORS, TORCH, Checkpoint, format_for, save_checkpoint
from fcconv.io.keras import (
    KERAS,
    KERAS_H5,
    KERAS_WEIGHTS,
    KerasFile,
    NewLayout,
    group_names,
    keras_zip,
    read_keras,
    write_h5,
)
from fcconv.io.provenance import PROVENANCE_KEY, with_provenance
from fcconv.keras.config import KERAS_ORDER, KerasHead, find_head, layer_classes, rewrite
from fcconv.plan import LayerPlan, LayerRequest

if TYPE_CHECKING:
    from fcconv.api.checkpoints import ConvertResult, Job
    from fcconv.verify.runtime import RuntimeCheck

_SUFFIX = {KERAS: ".keras", KERAS_WEIGHTS: ".weights.h5", KERAS_H5: ".h5"}
_TORCH_SUFFIX = {TORCH: ".pt", SAFETENSORS: ".safetensors"}


def default_keras_output(path: str | Path, kind: str, fmt: str | None) -> str:
    """``model.keras`` → ``model.conv.keras``; ``x.weights.h5`` → ``x.conv.weights.h5``;
    with ``fmt`` torch or safetensors, ``model.conv.pt`` / ``model.conv.safetensors``.

    >>> default_keras_output("m/x.weights.h5", "keras-weights", None)
    'm/x.conv.weights.h5'
    """
    source = Path(path)
    name = source.name
    suffix = _SUFFIX[kind] if name.lower().endswith(_SUFFIX[kind]) else source.suffix
    stem = name[: len(name) - len(suffix)] if suffix else name
    return str(source.with_name(f"{stem}.conv{_TORCH_SUFFIX.get(fmt or '', suffix)}"))


def _output_format(job: Job, fmt: str | None) -> str:
    kind = job.source.format
    by_name = format_for(job.output, None, kind)
    if fmt is not None and by_name in _SUFFIX and fmt != by_name:
        raise SpecError(
            f"output {job.output} is named as a Keras file but {{format}} says {fmt}; "
            f"name it .pt or .safetensors, or leave {{format}} out"
        )
    out = fmt or by_name
    if out in _SUFFIX and out != kind:
        raise SpecError(
            f"{job.source.path} is a {kind} file and fcconv writes Keras files of the same "
            f"kind ({_SUFFIX[kind]}) or PyTorch files; name the output {_SUFFIX[kind]}, or "
            "give {format} torch or safetensors"
        )
    if out not in (*_SUFFIX, TORCH, SAFETENSORS):
        raise SpecError(f"unknown output format {out!r}; choose {{format}} torch or safetensors")
    if job.flip and out in _SUFFIX:
        raise SpecError(
            "Keras 3 never flips kernels, so {flip} would write a Keras file that computes "
            "something else; give {format} torch or safetensors for a framework that convolves"
        )
    return out


def _head(file: KerasFile, out: str) -> KerasHead | None:
    """The head read off the model's config, when there is one to read or to rewrite."""
    if file.config is None:
        return None
    if out in (KERAS, KERAS_H5):
        return find_head(file.config)
    try:
        return find_head(file.config)
    except FcconvError:  # a weights-only output needs no head
        return None


def _fill_requests(job: Job, head: KerasHead | None) -> None:
    """No layers named: the head's Dense layers; the first gets the map as its patch."""
    if job.order is None:
        job.order = head.order if head is not None else KERAS_ORDER
    patch = head.patch if head is not None else None
    if job.requests:
        first = job.requests[0]
        if head is not None and patch is not None and first.patch is None and job.patch is None:
            job.requests[0] = LayerRequest(first.name, PatchSpec(*_hwc(patch)))
        return
    if head is None or patch is None:
        raise SpecError(
            f"no layer to convert in {job.source.path}: its config shows no Flatten → Dense "
            "head with a known feature map; name one with {layers} NAME=HxWxC"
        )
    job.requests = [LayerRequest(head.dense[0], job.patch or PatchSpec(*_hwc(patch)))]
    job.requests += [LayerRequest(name, PatchSpec(1, 1)) for name in head.dense[1:]]


def _hwc(patch: Any) -> tuple[int, int, int]:
    return patch.height, patch.width, patch.channels


def _check_model_plans(plans: list[LayerPlan], head: KerasHead) -> None:
    """A rewritten model needs its first Dense converted on the map, the rest pointwise."""
    names = [plan.name for plan in plans]
    if names[0] != head.dense[0] or any(name not in head.dense for name in names):
        raise SpecError(
            f"a Keras model's head is rewritten from its first Dense layer on: convert "
            f"{', '.join(head.dense)} in that order (or leave {{layers}} out), or give "
            "{format} torch to write weights only"
        )
    if head.patch is not None and plans[0].patch != head.patch:
        raise SpecError(
            f"{names[0]} reads a {head.patch} feature map in the model's config, not "
            f"{plans[0].patch}; leave {{patch}} out or give {{format}} torch",
            layer=names[0],
        )
    for plan in plans[1:]:
        if (plan.patch.height, plan.patch.width) != (1, 1):
            raise SpecError(
                f"{plan.name} follows the first Dense layer, so it becomes a 1x1 Conv2D; "
                f"give {{layers}} {plan.name}=1x1",
                layer=plan.name,
            )


def convert_keras(job: Job, dst: str | Path | None, fmt: str | None) -> ConvertResult:
    """Convert Dense layers of a Keras file (see the module's doc)."""
    from fcconv.api.checkpoints import apply_and_verify, plan_job, records_of
    from fcconv.verify import VerificationFailed

    file = read_keras(job.source.path)
    if dst is None:
        job.output = default_keras_output(job.source.path, file.kind, fmt)
    if job.output == STDIO:
        raise SpecError("Keras files are written to files; give a file name as {output}")
    out = _output_format(job, fmt)
    check_output_path(Path(job.output), job.force, (Path(job.source.path),))
    head = _head(file, out)
    _fill_requests(job, head)
    plans = plan_job(job)
    if out in (KERAS, KERAS_H5) and head is not None:
        _check_model_plans(plans, head)
    loaded = job.source.loaded
    assert loaded is not None
    converted, verification = apply_and_verify(job, plans)
    if verification is not None and not verification:
        return job.result(plans, verification)
    records = records_of(plans)
    if out in (TORCH, SAFETENSORS):
        metadata = with_provenance(loaded.metadata, records) if out == SAFETENSORS else None
        new = Checkpoint(converted, out, job.source.path, metadata=metadata)
        written = save_checkpoint(
            new, job.output, fmt=out, force=job.force, sources=(job.source.path,)
        )
        return job.result(plans, verification, format=written, mode="in memory")
    record = with_provenance(file.provenance(), records)[PROVENANCE_KEY]
    target = Path(job.output)
    try:
        with atomic_output(target, force=job.force, sources=(job.source.path,)) as temporary:
            _write(file, out, head, plans, converted, record, temporary)
            if job.verify and out == KERAS and head is not None:
                _run_in_keras(job, head, plans, temporary, verification)
    except VerificationFailed as failure:
        return job.result(plans, failure.result)
    return job.result(plans, verification, format=out, mode="rewritten")


def check_in_keras(
    original: str, converted: str, plans: list[LayerPlan], seed: int = 0
) -> RuntimeCheck:
    """Two ``.keras`` models run in Keras: the converted map vs. the original head on windows."""
    from fcconv.keras.check import check_models

    file = read_keras(original)
    if file.config is None:
        raise CheckpointError(f"{original} holds no model config; it cannot run in Keras")
    head = find_head(file.config)
    first = next((plan for plan in plans if plan.name == head.dense[0]), plans[0])
    return check_models(original, converted, head, first.patch, first.stride, seed=seed)


def _run_in_keras(
    job: Job, head: KerasHead, plans: list[LayerPlan], temporary: Path, verification: Any
) -> None:
    from fcconv.keras.check import check_models
    from fcconv.verify import VerificationFailed

    check = check_models(job.source.path, temporary, head, plans[0].patch, plans[0].stride)
    verification.runtime.append(check)
    if not check:
        raise VerificationFailed(verification)


def _kernels(plans: list[LayerPlan], converted: dict[str, Any]) -> dict[str, Any]:
    """Layer name → its converted kernel in Keras's Conv2D layout ``[kh, kw, C, O]``."""
    return {plan.name: oihw_to_keras_conv(converted[plan.weight_key]).numpy() for plan in plans}


def _write(
    file: KerasFile,
    out: str,
    head: KerasHead | None,
    plans: list[LayerPlan],
    converted: dict[str, Any],
    record: str,
    target: Path,
) -> None:
    kernels = _kernels(plans, converted)
    if out == KERAS_H5:
        _write_legacy(file, head, plans, kernels, record, target)
        return
    if file.config is not None and head is not None:
        convert = {plan.name: (plan.patch, plan.stride) for plan in plans}
        new_config = rewrite(file.config, head, convert)
    else:
        new_config = None
    layout = _keras3_layout(file, new_config, kernels)
    if out == KERAS_WEIGHTS:
        write_h5(file, target, layout, root_attrs={PROVENANCE_KEY: record})
        return
    buffer = io.BytesIO()
    write_h5(file, buffer, layout)
    metadata = {**file.metadata, PROVENANCE_KEY: record}
    assert new_config is not None
    keras_zip(file, new_config, buffer.getvalue(), metadata)(target)


def _keras3_layout(
    file: KerasFile, new_config: dict[str, Any] | None, kernels: dict[str, Any]
) -> NewLayout:
    """Every layer's group moved to the name Keras gives it in the converted model."""
    old = _groups_by_name(file)
    if new_config is not None:
        assert file.config is not None
        expected = _named_groups(layer_classes(file.config))
        if any(old.get(name, group) != group for name, group in expected.items()):
            raise CheckpointError(
                f"{file.path}: the weights' groups do not follow the model's layers as "
                "Keras 3 names them; re-save the model with Keras 3"
            )
        new = _named_groups(layer_classes(new_config))
    else:
        new = _weights_only_groups(file, set(kernels))
    moves = {old[name]: group for name, group in new.items() if name in old}
    replaced = {f"{new[name]}/vars/0": kernel for name, kernel in kernels.items()}
    dropped = tuple(sorted(set(old.values())))
    return NewLayout(moves=moves, replaced=replaced, dropped_groups=dropped)


def _groups_by_name(file: KerasFile) -> dict[str, str]:
    """Layer name → its group in the file (``layers/dense``), from the ``vars`` groups."""
    return {layer.name: layer.group.rsplit("/", 1)[0] for layer in file.layers}


def _named_groups(classes: list[tuple[str, str]]) -> dict[str, str]:
    names = group_names([cls for _, cls in classes])
    return {name: f"layers/{group}" for (name, _), group in zip(classes, names, strict=True)}


def _weights_only_groups(file: KerasFile, converted: set[str]) -> dict[str, str]:
    """New groups without a config: converted Dense layers become the Conv2D layers after
    every existing Conv2D (a trunk, then its head), each class keeping its order."""
    by_class: dict[str, list[tuple[int, str]]] = {}
    for layer in file.layers:
        group = layer.group.rsplit("/", 1)[0].rsplit("/", 1)[-1]
        base, _, number = group.rpartition("_")
        if not number.isdigit():
            base, number = group, "0"
        cls = "conv2d" if layer.name in converted else base
        rank = int(number) + (1 << 20 if layer.name in converted else 0)
        by_class.setdefault(cls, []).append((rank, layer.name))
    new = {}
    for cls, members in by_class.items():
        for index, (_, name) in enumerate(sorted(members)):
            new[name] = f"layers/{cls}" if index == 0 else f"layers/{cls}_{index}"
    return new


def _write_legacy(
    file: KerasFile,
    head: KerasHead | None,
    plans: list[LayerPlan],
    kernels: dict[str, Any],
    record: str,
    target: Path,
) -> None:
    """A legacy ``.h5``: datasets stay under their layer's name; the config is rewritten."""
    replaced = {file.variables[plan.weight_key].path: kernels[plan.name] for plan in plans}
    attrs = {PROVENANCE_KEY: record}
    dropped: tuple[str, ...] = ()
    if file.config is not None and head is not None:
        convert = {plan.name: (plan.patch, plan.stride) for plan in plans}
        attrs["model_config"] = json.dumps(rewrite(file.config, head, convert))
        kept = {name for name, _ in layer_classes(json.loads(attrs["model_config"]))}
        dropped = tuple(
            layer.group for layer in file.layers if layer.name not in kept and layer.group
        )
    write_h5(file, target, NewLayout(replaced=replaced, dropped_groups=dropped), root_attrs=attrs)
    if dropped:
        _drop_layer_names(target, {group.rsplit("/", 1)[-1] for group in dropped})


def _drop_layer_names(target: Path, removed: set[str]) -> None:
    import h5py
    import numpy as np

    with h5py.File(target, "r+") as handle:
        group = handle["model_weights"] if "model_weights" in handle else handle
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["layer_names"]]
        kept = [n for n in names if n not in removed]
        group.attrs["layer_names"] = np.array([n.encode() for n in kept], dtype="S")
