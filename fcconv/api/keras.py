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
from fcconv.keras.config import (
    KERAS_ORDER,
    KerasHead,
    MapOrder,
    find_head,
    layer_classes,
    read_order,
    rewrite,
)
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


def _fill_requests(job: Job, file: KerasFile, head: KerasHead | None) -> str:
    """No layers named: the head's Dense layers, each reading the map gets it as its patch."""
    if not job.requests:
        if head is None or head.patch is None:
            raise SpecError(
                f"no layer to convert in {job.source.path}: its config shows no Flatten → "
                "Dense head with a known feature map; name one with {layers} NAME=HxWxC"
            )
        job.requests = [LayerRequest(name, _given_or(job, head, name)) for name in head.dense]
    return _settle_file_order(job, file)


def _given_or(job: Job, head: KerasHead, name: str) -> Any:
    """``{patch}`` for the layers that read the map (checked against the config), else theirs."""
    if job.patch is not None and name in head.map_readers and head.pool is None:
        return job.patch
    return _reader_patch(head, name)


def _reader_patch(head: KerasHead, name: str) -> PatchSpec:
    """The patch of a head's Dense layer: the map for a flatten's reader, else 1x1."""
    assert head.patch is not None
    if name in head.map_readers and head.pool is None:
        return PatchSpec(*_hwc(head.patch))
    if name in head.map_readers:
        return PatchSpec(1, 1, head.patch.channels)
    return PatchSpec(1, 1)  # C inferred from in_features


def _settle_file_order(job: Job, file: KerasFile) -> str:
    """The order of the layers that read the map: the flag, else the config, else ``hwc``.

    Every request is looked up in the model's config; a layer that reads a
    flattened map takes its patch from it when none is given (and must agree
    with it when one is). A file with no config (``.weights.h5``) gets Keras's
    channels-last ``hwc``, said out loud: a ``Permute`` before the ``Flatten``
    or a ``channels_first`` trunk would change it. Returns where the order came
    from (``flag``, ``model`` or ``default``).
    """
    found: dict[str, MapOrder] = {}
    for index, request in enumerate(job.requests):
        read = read_order(file.config, request.name) if file.config is not None else None
        if read is None or read.pool is not None:
            continue
        found[request.name] = read
        if read.patch is not None and request.patch is None and job.patch is None:
            job.requests[index] = LayerRequest(request.name, PatchSpec(*_hwc(read.patch)))
        else:
            _check_patch(request, job, read)
    orders = {read.order for read in found.values()}
    if len(orders) > 1:
        raise SpecError(
            "the layers named read maps flattened in different orders ("
            + ", ".join(f"{name}: {read.order}" for name, read in found.items())
            + "); convert them one at a time"
        )
    if job.order is not None:
        for name, read in found.items():
            if read.order != job.order:
                job.warnings.append(
                    f"{name}: {{order}} {job.order} given, but the model's config flattens "
                    f"its map as {read.order} ({read.detail})"
                )
        return "flag"
    if found:
        name, read = next(iter(found.items()))
        job.order = read.order
        job.notes.append(f"{name}: order {read.order} read from the model's config ({read.detail})")
        return "model"
    job.order = KERAS_ORDER
    if not any(_pointwise(request, job) for request in job.requests):
        job.warnings.append(_default_order_warning(job, file))
    return "default"


def _pointwise(request: LayerRequest, job: Job) -> bool:
    spec = request.patch or job.patch
    return isinstance(spec, PatchSpec) and (spec.height, spec.width) == (1, 1)


def _default_order_warning(job: Job, file: KerasFile) -> str:
    names = ", ".join(request.name for request in job.requests)
    why = (
        "has no model config"
        if file.config is None
        else f"has a config that does not show how {names} read a flattened map"
    )
    return (
        f"{job.source.path} {why}: order hwc assumed for {names} (Keras's Flatten of a "
        "channels-last map); a Permute before the Flatten (MTCNN's Permute((3, 2, 1)) "
        "makes whc) or a channels_first trunk would change it: then give {order}"
    )


def _check_patch(request: LayerRequest, job: Job, read: MapOrder) -> None:
    spec = request.patch or job.patch
    if read.patch is None or not isinstance(spec, PatchSpec):
        return
    given = (spec.height, spec.width, spec.channels or read.patch.channels)
    if given != _hwc(read.patch):
        raise SpecError(
            f"{request.name} reads a {read.patch} feature map in the model's config "
            f"({read.detail}), not {spec}; leave its patch out or give {request.name}="
            f"{read.patch}",
            layer=request.name,
        )


def _hwc(patch: Any) -> tuple[int, int, int]:
    return patch.height, patch.width, patch.channels


def _check_model_plans(plans: list[LayerPlan], head: KerasHead) -> None:
    """A rewritten model needs every Dense of its head converted: on the map, or 1x1."""
    names = [plan.name for plan in plans]
    if sorted(names) != sorted(head.dense):
        raise SpecError(
            f"a Keras model's head is rewritten whole: convert {', '.join(head.dense)} (or "
            "leave {layers} out), or give {format} torch to write weights only"
        )
    for plan in plans:
        expected = _reader_patch(head, plan.name)
        if (plan.patch.height, plan.patch.width) != (expected.height, expected.width) or (
            expected.channels is not None and plan.patch.channels != expected.channels
        ):
            raise SpecError(
                f"{plan.name} reads {'the' if plan.name in head.map_readers else 'a'} "
                f"{expected if plan.name in head.map_readers else '1x1'} map in the model's "
                f"config, not {plan.patch}; leave {{patch}} out or give {{format}} torch",
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
    pool_stride = _pool_stride(job, head, out)
    came = _fill_requests(job, file, head)
    plans = [plan.with_order(plan.order, came) for plan in plan_job(job)]
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
            _write(file, out, head, plans, converted, record, temporary, pool_stride)
            if job.verify and out == KERAS and head is not None:
                _run_in_keras(job, head, plans, temporary, verification, pool_stride)
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
    patch, stride = _window_of(head, plans, _converted_pool_stride(converted, head))
    return check_models(original, converted, head, patch, stride, seed=seed)


def _window_of(
    head: KerasHead, plans: list[LayerPlan], pool_stride: tuple[int, int]
) -> tuple[Any, tuple[int, int]]:
    """The patch and stride of the head's windows: the map reader's, or the pool's."""
    first = next((plan for plan in plans if plan.name in head.map_readers), plans[0])
    stride = pool_stride if head.pool else (first.stride[0], first.stride[-1])
    return first.patch, stride


def _converted_pool_stride(converted: str, head: KerasHead) -> tuple[int, int]:
    """The strides of the pool that replaced a global pool, from the converted config."""
    if head.pool is None:
        return (1, 1)
    config = read_keras(converted).config
    layers = (config or {}).get("config", {}).get("layers", [])
    for layer in layers if isinstance(layers, list) else []:
        if (layer.get("config") or {}).get("name") == head.map_order.entry:
            strides = layer["config"].get("strides") or [1, 1]
            return int(strides[0]), int(strides[-1])
    return (1, 1)


def _run_in_keras(
    job: Job,
    head: KerasHead,
    plans: list[LayerPlan],
    temporary: Path,
    verification: Any,
    pool_stride: tuple[int, int],
) -> None:
    from fcconv.keras.check import check_models
    from fcconv.verify import VerificationFailed

    patch, stride = _window_of(head, plans, pool_stride)
    check = check_models(job.source.path, temporary, head, patch, stride)
    verification.runtime.append(check)
    if not check:
        raise VerificationFailed(verification)


def _pool_stride(job: Job, head: KerasHead | None, out: str) -> tuple[int, int]:
    """A global pool becomes a pool at stride 1 (or {stride}); its Dense layers are 1x1."""
    if head is None or head.pool is None or out not in (KERAS, KERAS_H5):
        return (1, 1)
    stride = job.stride
    job.stride = None
    if stride is None:
        return (1, 1)
    return (stride[0], stride[-1]) if len(stride) in (1, 2) else (1, 1)


def _layer(file: KerasFile, name: str) -> Any:
    layer = next((layer for layer in file.layers if layer.name == name), None)
    if layer is None:
        raise CheckpointError(f"{file.path}: the weights hold no layer {name!r}; re-save it")
    return layer


def _prelu_alphas(file: KerasFile, head: KerasHead | None) -> dict[str, Any]:
    """Each head PReLU's alpha, reshaped (same elements) to be shared over the map."""
    import numpy as np

    from fcconv.keras.config import prelu_shape

    if head is None or not head.prelu:
        return {}
    alphas = {}
    with file.open_h5() as handle:
        for name in head.prelu:
            layer = _layer(file, name)
            path = f"{layer.group}/{name}/alpha" if file.kind == KERAS_H5 else f"{layer.group}/0"
            alpha = np.asarray(handle[path][()])
            shape = prelu_shape(head.graph.by_name(name), alpha.size)
            if alpha.size != int(np.prod(shape)):
                raise CheckpointError(
                    f"{file.path}: PReLU {name!r} has {alpha.size} alphas for "
                    f"{shape[-1]} units; re-save the model"
                )
            alphas[name] = alpha.reshape(shape)
    return alphas


def _alpha_path(file: KerasFile, name: str) -> str:
    if file.kind == KERAS_H5:
        variable = file.variables.get(f"{name}.weight") or file.variables.get(f"{name}.alpha")
        if variable is None:
            raise CheckpointError(f"{file.path}: PReLU {name!r} has no alpha; re-save the model")
        return variable.path
    return f"{_layer(file, name).group}/0"


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
    pool_stride: tuple[int, int] = (1, 1),
) -> None:
    kernels = _kernels(plans, converted)
    if out == KERAS_H5:
        _write_legacy(file, head, plans, kernels, record, target, pool_stride)
        return
    if file.config is not None and head is not None:
        convert = {plan.name: (plan.patch, plan.stride) for plan in plans}
        new_config = rewrite(file.config, head, convert, pool_stride)
    else:
        new_config = None
    layout = _keras3_layout(file, new_config, kernels, _prelu_alphas(file, head))
    if out == KERAS_WEIGHTS:
        write_h5(file, target, layout, root_attrs={PROVENANCE_KEY: record})
        return
    buffer = io.BytesIO()
    write_h5(file, buffer, layout)
    metadata = {**file.metadata, PROVENANCE_KEY: record}
    assert new_config is not None
    keras_zip(file, new_config, buffer.getvalue(), metadata)(target)


def _keras3_layout(
    file: KerasFile,
    new_config: dict[str, Any] | None,
    kernels: dict[str, Any],
    alphas: dict[str, Any] | None = None,
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
    replaced.update({f"{new[name]}/vars/0": alpha for name, alpha in (alphas or {}).items()})
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
    pool_stride: tuple[int, int] = (1, 1),
) -> None:
    """A legacy ``.h5``: datasets stay under their layer's name; the config is rewritten."""
    replaced = {file.variables[plan.weight_key].path: kernels[plan.name] for plan in plans}
    for name, alpha in _prelu_alphas(file, head).items():
        replaced[_alpha_path(file, name)] = alpha
    attrs = {PROVENANCE_KEY: record}
    dropped: tuple[str, ...] = ()
    if file.config is not None and head is not None:
        convert = {plan.name: (plan.patch, plan.stride) for plan in plans}
        attrs["model_config"] = json.dumps(rewrite(file.config, head, convert, pool_stride))
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
