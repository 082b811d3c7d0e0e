"""Keras 3 files, read and written with h5py (no TensorFlow, no Keras import).

Three kinds, told apart by their content:

- ``keras``: a ``.keras`` zip holding ``config.json``, ``metadata.json`` and
  ``model.weights.h5``; layer ``fc6``'s Dense kernel ``[N, O]`` sits at
  ``layers/dense/vars/0`` of the inner h5;
- ``keras-weights``: a ``.weights.h5`` file (Keras 3 ``save_weights``), the
  same layout;
- ``keras-h5``: a legacy ``.h5`` model, its config in the root attribute
  ``model_config``, the kernel at ``model_weights/fc6/…/kernel``.

In a Keras 3 h5 the group of a layer is named after its *class*
(``dense``, ``dense_1``, ``conv2d``, in the order of the model's layers);
its ``vars`` group carries the user's layer name as the attribute ``name``.

fcconv sees every file in PyTorch's terms, so that planning and verification
are the ones of every other format: layer ``fc6``'s Dense kernel is the Linear
weight ``fc6.weight`` ``[O, N]`` (its transpose), a Conv2D kernel
``[kh, kw, C, O]`` is ``NAME.weight`` ``[O, C, kh, kw]``, a bias is
``NAME.bias``, BatchNormalization's variables are ``weight``, ``bias``,
``running_mean``, ``running_var``. Every other dataset is named by its path
with dots (``optimizer.vars.0``). These are permutations of the elements:
the bits are never touched (:mod:`fcconv.geometry` owns them).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv.errors import CheckpointError
from fcconv.io.checkpoint import KERAS as KERAS
from fcconv.io.checkpoint import KERAS_FORMATS as KERAS_FORMATS
from fcconv.io.checkpoint import KERAS_H5 as KERAS_H5
from fcconv.io.checkpoint import KERAS_WEIGHTS as KERAS_WEIGHTS
from fcconv.io.hdf5 import checked
from fcconv.io.keras_schema import check_keras_config
from fcconv.io.provenance import PROVENANCE_KEY

if TYPE_CHECKING:
    import h5py
    import torch

    from fcconv.io.checkpoint import Checkpoint

"""The Keras kinds of file, as ``Source.format`` and ``format=`` name them."""

CONFIG_MEMBER, METADATA_MEMBER, WEIGHTS_MEMBER = "config.json", "metadata.json", "model.weights.h5"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

# Keras's variable order per layer class (Keras 3 numbers them), and PyTorch's names.
_TORCH_NAMES = {
    "Dense": ("weight", "bias"),
    "Conv2D": ("weight", "bias"),
    "BatchNormalization": ("weight", "bias", "running_mean", "running_var"),
    "PReLU": ("weight",),  # alpha; torch's nn.PReLU holds it 1-D
}
_LEGACY_NAMES = {
    "kernel": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
    "alpha": "weight",
}
# The class of a Keras 3 h5 group, from its name when no config says it.
_SNAKE_CLASSES = {
    "dense": "Dense",
    "conv2d": "Conv2D",
    "batch_normalization": "BatchNormalization",
    "p_re_lu": "PReLU",
}


def kind_of(path: str | Path) -> str | None:
    """Which Keras file ``path`` is, by its content; ``None`` when it is none."""
    file = Path(path)
    if not file.is_file():
        return None
    with open(file, "rb") as handle:
        head = handle.read(8)
    if head == HDF5_MAGIC:
        return _h5_kind(file)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(file) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, IndexError):
            return None  # a damaged zip is no Keras file; the torch loader says what is wrong
        if CONFIG_MEMBER in names and WEIGHTS_MEMBER in names:
            return KERAS
    return None


def _h5_kind(file: Path) -> str | None:
    h5py = _h5py()
    try:
        with h5py.File(file, "r") as handle:
            if "model_weights" in handle or "model_config" in handle.attrs:
                return KERAS_H5
            if "layers" in handle or "vars" in handle:
                return KERAS_WEIGHTS
    except OSError as error:
        raise CheckpointError(f"{file} is a corrupt HDF5 file ({error}); re-save it") from None
    return None


def _h5py() -> Any:
    from fcconv.extras import require

    return require("h5py", "keras", purpose="to read and write Keras files")


def snake_case(name: str) -> str:
    """Keras's group name for a layer class: ``Conv2D`` → ``conv2d``, ``BatchNormalization`` →
    ``batch_normalization`` (``keras.src.utils.naming.to_snake_case``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def group_names(classes: list[str]) -> list[str]:
    """The h5 group Keras 3 gives each layer of a model, from the layers' classes in order.

    >>> group_names(["Conv2D", "Flatten", "Dense", "Dense", "Conv2D"])
    ['conv2d', 'flatten', 'dense', 'dense_1', 'conv2d_1']
    """
    used: dict[str, int] = {}
    names = []
    for cls in classes:
        base = snake_case(cls)
        used[base] = used.get(base, -1) + 1
        names.append(base if used[base] == 0 else f"{base}_{used[base]}")
    return names


# --------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Variable:
    """One dataset of the file and its name and layout in PyTorch's terms."""

    key: str  # fc6.weight
    path: str  # layers/dense/vars/0
    layer: str | None  # the Keras layer's name, fc6
    layout: str  # "dense" ([N, O] ↔ [O, N]), "conv" ([kh, kw, C, O] ↔ OIHW), "raw"


@dataclass
class KerasLayer:
    """A layer that owns variables: its name, class and where they sit."""

    name: str
    cls: str
    group: str  # the path of the group holding its variables


@dataclass
class KerasFile:
    """A Keras file: its kind, config, layers with variables, and the torch view of them."""

    path: str
    kind: str
    config: dict[str, Any] | None
    metadata: dict[str, Any]
    layers: list[KerasLayer]
    variables: dict[str, Variable]
    weights: bytes | None = None  # the inner h5 of a .keras zip
    members: dict[str, bytes] = field(default_factory=dict)  # other zip members, kept

    def open_h5(self) -> h5py.File:
        """The weights' h5, read-only."""
        h5py = _h5py()
        if self.weights is not None:
            return checked(h5py.File(io.BytesIO(self.weights), "r"), self.path)
        return checked(h5py.File(self.path, "r"), self.path)

    def provenance(self) -> dict[str, str] | None:
        """fcconv's record as safetensors-style metadata (``{"fcconv": json}``), if any."""
        record = self.metadata.get(PROVENANCE_KEY)
        return {PROVENANCE_KEY: record} if isinstance(record, str) else None

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors in PyTorch's layout."""
        with self.open_h5() as handle:
            return {key: _to_torch(handle, self.variables[key], self.path) for key in keys}

    def checkpoint(self) -> Checkpoint:
        """Every tensor in PyTorch's layout, as a loaded checkpoint (in file order)."""
        from fcconv.io.checkpoint import Checkpoint

        tensors = self.read(list(self.variables))
        return Checkpoint(tensors, self.kind, self.path, metadata=self.provenance())


def _to_torch(handle: h5py.File, variable: Variable, source: str) -> torch.Tensor:
    import numpy as np
    import torch

    from fcconv.geometry import keras_conv_to_oihw, keras_dense_to_linear

    array = np.asarray(handle[variable.path][()])
    try:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    except TypeError:
        raise CheckpointError(
            f"{source}: {variable.path} has dtype {array.dtype}, which fcconv cannot read"
        ) from None
    if variable.layout == "dense":
        return keras_dense_to_linear(tensor)
    if variable.layout == "conv":
        return keras_conv_to_oihw(tensor)
    if variable.layout == "prelu":
        return tensor.reshape(-1)
    return tensor


def read_keras(path: str | Path) -> KerasFile:
    """Read a Keras file's config, metadata and variable map (no tensor is loaded).

    Raises:
        CheckpointError: the file is not a Keras file fcconv reads, or is corrupt.
    """
    kind = kind_of(path)
    if kind is None:
        raise CheckpointError(f"{path} is not a Keras file (.keras, .weights.h5 or .h5)")
    h5py = _h5py()
    config, metadata, weights, members = None, {}, None, {}
    try:
        if kind == KERAS:
            config, metadata, weights, members = _read_zip(Path(path))
            check_keras_config(config, str(path))
        file = KerasFile(str(path), kind, config, metadata, [], {}, weights, members)
        with file.open_h5() as handle:
            if kind == KERAS_H5:
                file.config = _legacy_config(handle, str(path))
                file.metadata = _root_metadata(handle)
                if file.config is not None:
                    check_keras_config(file.config, str(path))
                _read_legacy(file, handle)
            else:
                if kind == KERAS_WEIGHTS:
                    file.metadata = _root_metadata(handle)
                _read_keras3(file, handle)
    except (OSError, KeyError, ValueError, RecursionError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{path} is a truncated or corrupt Keras file ({type(error).__name__}: "
            f"{str(error)[:160]}); re-save the model"
        ) from None
    del h5py
    return file


MAX_INFLATION = 16
"""A .keras zip may declare at most this many times its own size (plus 16 MiB) unpacked."""


def _read_zip(path: Path) -> tuple[dict, dict, bytes, dict[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        declared = sum(info.file_size for info in archive.infolist())
        if declared > MAX_INFLATION * path.stat().st_size + (16 << 20):
            raise ValueError(
                f"its members declare {declared} bytes unpacked, far more than a "
                f"{path.stat().st_size}-byte model holds"
            )
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members.pop(CONFIG_MEMBER))
    metadata = json.loads(members.pop(METADATA_MEMBER, b"{}"))
    weights = members.pop(WEIGHTS_MEMBER)
    if not isinstance(config, dict) or not isinstance(metadata, dict):
        raise ValueError("config.json or metadata.json is not a JSON object")
    return config, metadata, weights, members


def _root_metadata(handle: h5py.File) -> dict[str, Any]:
    record = handle.attrs.get(PROVENANCE_KEY)
    if isinstance(record, bytes):
        record = record.decode("utf-8", "replace")
    return {PROVENANCE_KEY: record} if isinstance(record, str) else {}


def _legacy_config(handle: h5py.File, source: str) -> dict[str, Any] | None:
    text = handle.attrs.get("model_config")
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    config = json.loads(text)
    if not isinstance(config, dict):
        raise ValueError(f"{source}: model_config is not a JSON object")
    return config


def config_classes(config: dict[str, Any] | None) -> dict[str, str]:
    """Layer name → class name for every layer of a model config of any Keras era; a layer
    of a nested model is named ``outer.inner``."""
    from fcconv.keras.graph import layer_class, nested_models

    return {name: layer_class(layer) for name, layer in nested_models(config)}


def _read_keras3(file: KerasFile, handle: h5py.File) -> None:
    """Every ``vars`` group: the layer that owns it, then its numbered variables."""
    h5py = _h5py()
    classes = config_classes(file.config)
    groups: list[str] = []
    handle.visit(
        lambda name: (
            groups.append(name)
            if name.rsplit("/", 1)[-1] == "vars" and isinstance(handle[name], h5py.Group)
            else None
        )
    )
    taken: set[str] = set()
    for group in sorted(groups, key=_natural):
        owner = group.rsplit("/", 1)[0] if "/" in group else ""
        name = _qualified_name(handle, owner)
        base = re.sub(r"_\d+$", "", owner.rsplit("/", 1)[-1])
        cls = classes.get(name, _SNAKE_CLASSES.get(base, "")) if name else ""
        count = len(handle[group])
        known = _TORCH_NAMES.get(cls)
        use_torch = (
            name is not None
            and known is not None
            and count == len(known)
            and name not in taken
            # a nested layer's name is unique in its own model, which the config must show
            and (owner.count("/") == 1 or name in classes or not classes)
        )
        if name is not None and owner.count("/") == 1:
            file.layers.append(KerasLayer(name, cls, group))
        if name is not None:
            taken.add(name)
        for index in sorted(handle[group], key=_natural):
            path = f"{group}/{index}"
            if use_torch:
                assert known is not None and name is not None
                torch_name = known[int(index)]
                layout = _layout(cls, torch_name, handle[path].shape)
                key = f"{name}.{torch_name}"
            else:
                key, layout = path.replace("/", "."), "raw"
            file.variables[key] = Variable(key, path, name, layout)


def _qualified_name(handle: h5py.File, owner: str) -> str | None:
    """``layers/sequential/layers/dense`` → ``head.fc1``: each level's ``vars`` names it."""
    parts = owner.split("/")
    if len(parts) < 2 or len(parts) % 2 or any(p != "layers" for p in parts[::2]):
        return None
    names = []
    for depth in range(2, len(parts) + 1, 2):
        vars_group = handle.get("/".join([*parts[:depth], "vars"]))
        name = vars_group.attrs.get("name") if vars_group is not None else None
        name = name.decode() if isinstance(name, bytes) else name
        if not isinstance(name, str):
            return None
        names.append(name)
    return ".".join(names)


def _read_legacy(file: KerasFile, handle: h5py.File) -> None:
    """``model_weights/<layer>`` groups, each listing its datasets in ``weight_names``."""
    classes = config_classes(file.config)
    root = handle["model_weights"] if "model_weights" in handle else handle
    prefix = "model_weights/" if "model_weights" in handle else ""
    for layer in _names(root.attrs.get("layer_names", list(root))):
        group = root[layer]
        cls = classes.get(layer, "")
        file.layers.append(KerasLayer(layer, cls, f"{prefix}{layer}"))
        for weight in _names(group.attrs.get("weight_names", [])):
            path = f"{prefix}{layer}/{weight}"
            owner, variable = _legacy_owner(layer, weight)
            owner_cls = classes.get(owner, "") if owner != layer else cls
            torch_name = _LEGACY_NAMES.get(variable) if owner_cls in _TORCH_NAMES else None
            if torch_name is None:
                key, layout = f"{owner}.{variable}", "raw"
            else:
                layout = _layout(owner_cls, torch_name, handle[path].shape)
                key = f"{owner}.{torch_name}"
            if key in file.variables:
                key, layout = path.replace("/", "."), "raw"
            file.variables[key] = Variable(key, path, layer, layout)
    for name in handle:
        if name != "model_weights" and prefix:
            _add_raw(file, handle, name)


def _legacy_owner(layer: str, weight: str) -> tuple[str, str]:
    """The layer that owns a legacy weight, and the variable's name: ``head/fc1/kernel:0``
    under ``head`` is ``("head.fc1", "kernel")``; ``conv1/kernel:0`` is ``("conv1", "kernel")``."""
    parts = weight.split("/")
    variable = parts[-1].split(":")[0]
    scopes = [part for part in parts[:-1] if part]
    if scopes and scopes[0] == layer:
        scopes = scopes[1:]
    if not scopes or scopes == [layer]:
        return layer, variable
    return f"{layer}.{scopes[-1]}", variable


def _add_raw(file: KerasFile, handle: h5py.File, top: str) -> None:
    h5py = _h5py()
    item = handle[top]
    paths = [top] if isinstance(item, h5py.Dataset) else []
    if isinstance(item, h5py.Group):
        item.visit(
            lambda name: (
                paths.append(f"{top}/{name}") if isinstance(item[name], h5py.Dataset) else None
            )
        )
    for path in paths:
        key = path.replace("/", ".")
        file.variables[key] = Variable(key, path, None, "raw")


def _layout(cls: str, torch_name: str, shape: tuple[int, ...]) -> str:
    if torch_name != "weight":
        return "raw"
    if cls == "Dense" and len(shape) == 2:
        return "dense"
    if cls == "Conv2D" and len(shape) == 4:
        return "conv"
    if cls == "PReLU" and len(shape) > 1 and all(side == 1 for side in shape[:-1]):
        return "prelu"  # one alpha per channel, shared over the map: 1-D as torch's
    return "raw"


def _names(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _natural(text: str) -> list[Any]:
    """``vars/10`` after ``vars/9``: numbers in names compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------- writing


@dataclass(frozen=True)
class NewLayout:
    """Where each variable goes in the output h5, and what it holds.

    ``moves`` maps an input path to an output path (same bytes, new place);
    ``replaced`` maps an output path to a new array (a converted kernel).
    Datasets not named in either are copied to the same path.
    """

    moves: dict[str, str] = field(default_factory=dict)
    replaced: dict[str, Any] = field(default_factory=dict)
    group_names: dict[str, str] = field(default_factory=dict)  # new vars group → layer name
    dropped_groups: tuple[str, ...] = ()


def write_h5(
    file: KerasFile,
    target: Path | io.BytesIO,
    layout: NewLayout,
    *,
    root_attrs: dict[str, str] | None = None,
) -> None:
    """Write a new h5: the input's objects copied (moved where ``layout`` says), kernels replaced.

    Untouched datasets are copied by h5py object copy: same bytes, dtype,
    chunking and attributes.
    """
    h5py = _h5py()
    with file.open_h5() as source, h5py.File(target, "w") as out:
        for name, value in source.attrs.items():
            out.attrs[name] = value
        for name, value in (root_attrs or {}).items():
            out.attrs[name] = value
        skip = set(layout.moves) | set(layout.dropped_groups)
        _copy_tree(source, out, "", skip, layout.dropped_groups)
        for old, new in layout.moves.items():
            if new in layout.replaced:
                continue
            out.require_group(new.rsplit("/", 1)[0])
            source.copy(source[old], out, name=new)
        for path, array in layout.replaced.items():
            if path in out:
                del out[path]
            out.create_dataset(path, data=array)
        for group, name in layout.group_names.items():
            out.require_group(group).attrs["name"] = name


def _copy_tree(
    source: h5py.Group, out: h5py.Group, prefix: str, skip: set[str], dropped: tuple[str, ...]
) -> None:
    h5py = _h5py()
    for name, item in source.items():
        path = f"{prefix}{name}"
        if path in skip or any(path == d or path.startswith(f"{d}/") for d in dropped):
            continue
        if isinstance(item, h5py.Dataset):
            source.copy(item, out, name=name)
            continue
        group = out.require_group(name)
        for key, value in item.attrs.items():
            group.attrs[key] = value
        _copy_tree(item, group, f"{path}/", skip, dropped)


def keras_zip(
    file: KerasFile, config: dict[str, Any], weights: bytes, metadata: dict[str, Any]
) -> Callable[[Path], None]:
    """A writer of a ``.keras`` zip (as Keras writes it: members stored, not compressed)."""

    def write(target: Path) -> None:
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(METADATA_MEMBER, json.dumps(metadata))
            archive.writestr(CONFIG_MEMBER, json.dumps(config))
            archive.writestr(WEIGHTS_MEMBER, weights)
            for name, data in file.members.items():
                archive.writestr(name, data)

    return write
