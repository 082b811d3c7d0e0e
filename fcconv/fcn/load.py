"""Loading the model to convolutionalize: a trusted pickle, or a factory and its weights.

The factory (``arch``, ``package.module:callable``) builds the model and the
weights come through fcconv's safe checkpoint loaders; a pickled module is
unpickled only when the caller trusts it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fcconv.errors import ArchitectureError, CheckpointError, UnsafeCheckpointError
from fcconv.fcn.analyse import _first_line


def _import_factory(spec: str) -> Any:
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ArchitectureError(
            f"malformed {{arch}} {spec!r}: expected package.module:callable "
            "(e.g. fcconv.samples_models:tiny_vgg)"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        # like `python -m`, let a factory from the working folder be found
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ArchitectureError(
            f"cannot import {module_name!r} for {{arch}} {spec} ({_first_line(error)}); "
            "run from the folder that holds it or install its package"
        ) from None
    factory = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ArchitectureError(
                f"module {module_name!r} has no attribute {attribute!r} ({{arch}} {spec})"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ArchitectureError(f"{{arch}} {spec} is not callable")
    return factory


def _build(spec: str) -> nn.Module:
    factory = _import_factory(spec)
    try:
        model = factory()
    except TypeError as error:
        raise ArchitectureError(
            f"{{arch}} {spec} cannot be called without arguments ({_first_line(error)}); "
            "wrap it in a function that takes none"
        ) from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"{{arch}} {spec} returned {type(model).__name__}, not an nn.Module"
        )
    return model


def _strip_prefix(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    wanted = set(model.state_dict())
    if set(state) & wanted:
        return state
    for prefix in ("module.", "model."):
        if all(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _load_weights(model: nn.Module, state: dict[str, Any], source: str, spec: str) -> None:
    state = _strip_prefix(state, model)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:4])}")
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:4])}")
        raise CheckpointError(
            f"{source} does not fit {{arch}} {spec}: {'; '.join(parts)}; check that the "
            "factory builds the architecture the weights were trained for"
        )


def load_model(
    source: str | os.PathLike[str], *, arch: str | None = None, trust_pickle: bool = False
) -> nn.Module:
    """Load the model to convolutionalize, in eval mode.

    With ``arch`` (``package.module:callable``) the callable builds the model
    and ``source`` provides its weights, read through the safe checkpoint
    loaders. Without it, ``source`` must be a pickled ``nn.Module``, which
    only ``trust_pickle=True`` may unpickle, since unpickling runs code.
    ``-`` reads the file from stdin.

    Raises:
        UnsafeCheckpointError: a pickled module without ``trust_pickle``.
        ArchitectureError: ``arch`` cannot be imported, called, or built.
        CheckpointError: unreadable file, or weights that do not fit ``arch``.
    """
    from fcconv.io.checkpoint import load_state_dict

    with _readable_path(source) as path:
        if arch is not None:
            model = _build(arch)
            _load_weights(
                model, load_state_dict(path, trust_pickle=trust_pickle), str(source), arch
            )
            return model.eval()
        if not trust_pickle:
            try:
                load_state_dict(path)
            except UnsafeCheckpointError:
                raise UnsafeCheckpointError(
                    f"{source} is a pickled model: loading it runs code from the file; "
                    "pass {trust_pickle} if you trust where it came from, or give "
                    "{arch} package.module:callable to build the model and load only "
                    "its weights"
                ) from None
            raise CheckpointError(
                f"{source} holds only weights, not a model; give {{arch}} "
                "package.module:callable to build the architecture they belong to"
            )
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as error:
            raise CheckpointError(
                f"{source} refers to code that cannot be imported here "
                f"({_first_line(error)}); run where the model's classes are importable, "
                "or save a state dict and use {arch}"
            ) from None
        except Exception as error:
            raise CheckpointError(f"cannot read {source}: {_first_line(error)}") from None
        if not isinstance(loaded, nn.Module):
            raise CheckpointError(
                f"{source} holds a {type(loaded).__name__}, not an nn.Module; give "
                "{arch} package.module:callable to build the model for these weights"
            )
        return loaded.eval()


@contextlib.contextmanager
def _readable_path(source: str | os.PathLike[str]) -> Iterator[str]:
    if str(source) != "-":
        yield str(source)
        return
    data = sys.stdin.buffer.read()
    handle, name = tempfile.mkstemp(suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        yield name
    finally:
        os.unlink(name)
