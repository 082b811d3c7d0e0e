"""Loading the model to convolutionalize: a trusted pickle, or a factory and its weights.

``arch`` names the factory: ``package.module:callable``, optionally called
with literal arguments, ``package.module:Net(depth=3, name="x")``. The
arguments are read with :func:`ast.literal_eval` (numbers, strings, tuples,
lists, dicts, ``True``/``False``/``None``), never evaluated. The callable
must be a model factory (an ``nn.Module`` class, or a function outside the
standard library and torch): ``os:system("...")`` or ``builtins:exec`` is
refused before anything is called, a standard-library module before it is
imported (:func:`~fcconv.fcn.usercode.check_factory`). The module itself is
imported, which runs its code: ``--arch`` trusts the module it names. The weights come
through fcconv's safe checkpoint loaders, matched to the model's keys by
unique dot-boundary suffix (a wrapper's ``model.`` prefix on either side).

The working folder may hold the factory's module, but never shadows an
installed one: it is put at the *end* of ``sys.path`` while the factory is
imported and called, then taken off again. Anything the user's code raises
becomes a one-line :class:`~fcconv.errors.UserCodeError` with its ``file:line``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fcconv.errors import (
    ArchitectureError,
    CheckpointError,
    UnsafeCheckpointError,
    UserCodeError,
)
from fcconv.fcn.usercode import (
    check_arch_module,
    check_factory,
    running_user_code,
    shown_path,
)
from fcconv.io.stdio import read_stdin
from fcconv.plan import suffix_matches
from fcconv.progress import phased

_ARCH_EXAMPLE = "e.g. fcconv.samples_models:tiny_vgg or mypkg.models:Net(depth=3)"


@dataclass(frozen=True)
class ArchSpec:
    """A parsed ``arch``: the module, the callable's dotted name, its literal arguments."""

    module: str
    attribute: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def _malformed(spec: str, why: str) -> ArchitectureError:
    return ArchitectureError(
        f"malformed {{arch}} {spec!r}: {why}; expected package.module:callable, optionally "
        f"with literal arguments ({_ARCH_EXAMPLE})"
    )


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = _dotted(node.value)
        return None if owner is None else f"{owner}.{node.attr}"
    return None


def _literal(node: ast.expr, spec: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        raise _malformed(
            spec,
            f"argument {ast.unparse(node)!r} is not a Python literal (numbers, strings, "
            "tuples, lists, dicts, True, False, None)",
        ) from None


def parse_arch(spec: str) -> ArchSpec:
    """Parse ``package.module:callable`` or ``package.module:callable(args)``.

    >>> parse_arch('pkg.models:Net(3, depth=2, name="x")')
    ArchSpec(module='pkg.models', attribute='Net', args=(3,), kwargs={'depth': 2, 'name': 'x'})
    """
    module, colon, rest = spec.partition(":")
    module, rest = module.strip(), rest.strip()
    if not colon or not module or not rest:
        raise _malformed(spec, "no ':' between the module and the callable")
    if module.startswith("."):
        raise _malformed(spec, "a relative module name cannot be imported from the command line")
    try:
        tree = ast.parse(rest, mode="eval").body
    except SyntaxError:
        raise _malformed(spec, f"{rest!r} is not a name or a call") from None
    call = tree if isinstance(tree, ast.Call) else None
    attribute = _dotted(call.func if call else tree)
    if attribute is None:
        raise _malformed(spec, f"{rest!r} is not a name or a call")
    if call is None:
        return ArchSpec(module, attribute)
    if any(isinstance(a, ast.Starred) for a in call.args) or any(
        k.arg is None for k in call.keywords
    ):
        raise _malformed(spec, "*args and **kwargs are not accepted")
    args = tuple(_literal(a, spec) for a in call.args)
    kwargs = {k.arg: _literal(k.value, spec) for k in call.keywords}
    return ArchSpec(module, attribute, args, kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def working_folder_last() -> Iterator[None]:
    """The working folder at the end of ``sys.path`` (and nowhere else) for a while.

    A module that only the working folder has (``models.py`` beside the
    weights) is found; a planted ``safetensors.py`` or ``rich/`` there never
    shadows the installed package, which comes first.
    """
    cwd = os.getcwd()
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != cwd] + [cwd]
    try:
        yield
    finally:
        sys.path[:] = saved


def _import(spec: str, arch: ArchSpec) -> Any:
    """Import the module of ``arch``; a missing module is an ArchitectureError."""
    check_arch_module(arch.module, spec)
    try:
        with running_user_code(f"importing {arch.module!r} for {{arch}} {spec}"):
            return importlib.import_module(arch.module)
    except UserCodeError as error:
        cause = error.__cause__
        missing = getattr(cause, "name", None)
        if (
            isinstance(cause, ModuleNotFoundError)
            and missing is not None
            and (arch.module == missing or arch.module.startswith(missing + "."))
        ):
            raise ArchitectureError(
                f"cannot import {arch.module!r} for {{arch}} {spec} (no module named "
                f"{missing!r}); run from the folder that holds it or install its package"
            ) from None
        raise


def _factory(spec: str, arch: ArchSpec) -> Any:
    module = _import(spec, arch)
    factory: Any = module
    for part in arch.attribute.split("."):
        if not hasattr(factory, part):
            origin = getattr(module, "__file__", None)
            where = f" (imported from {shown_path(origin)})" if origin else ""
            raise ArchitectureError(
                f"module {arch.module!r}{where} has no attribute {arch.attribute!r} "
                f"({{arch}} {spec})"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ArchitectureError(f"{{arch}} {spec} is not callable")
    check_factory(factory, spec)
    try:
        inspect.signature(factory).bind(*arch.args, **arch.kwargs)
    except TypeError as error:
        raise ArchitectureError(
            f"{{arch}} {spec} cannot be called with these arguments ({error}); give them "
            f"as package.module:callable(...) ({_ARCH_EXAMPLE})"
        ) from None
    except ValueError:  # no signature to check (a builtin): the call will tell
        pass
    return factory


def build_model(spec: str) -> nn.Module:
    """Import and call the factory ``spec`` names; it must return an ``nn.Module``.

    Raises:
        ArchitectureError: malformed, not importable, not callable with the
            arguments, or returns something else than a module.
        UserCodeError: the module or the factory raised (``SystemExit`` included).
    """
    arch = parse_arch(spec)
    with working_folder_last():
        factory = _factory(spec, arch)
        with running_user_code(f"{{arch}} {spec}"):
            model = factory(*arch.args, **arch.kwargs)
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"{{arch}} {spec} returned {type(model).__name__}, not an nn.Module; name a "
            "callable that builds the model"
        )
    return model


# ------------------------------------------------------------------ weights


def _pick(candidates: list[str], longest: bool) -> str | None:
    """The unique best candidate: the longest (or shortest) name, or None on a tie."""
    if not candidates:
        return None
    best = (max if longest else min)(len(c) for c in candidates)
    chosen = [c for c in candidates if len(c) == best]
    return chosen[0] if len(chosen) == 1 else None


def match_keys(state: dict[str, Any], wanted: list[str]) -> tuple[dict[str, str], list[str]]:
    """Which file key feeds each model key, and the model keys nothing feeds.

    An exact key wins; else a file key that ends with the model's key on a
    dot boundary (the file has a wrapper's prefix, ``module.fc.weight``), the
    least prefixed one; else the longest file key the model's key ends with
    (the model is the wrapper). Ties are left unmatched.

    >>> match_keys({"module.fc.weight": 1, "b": 2}, ["fc.weight", "model.b"])
    ({'fc.weight': 'module.fc.weight', 'model.b': 'b'}, [])
    """
    mapping: dict[str, str] = {}
    missing = []
    for key in wanted:
        if key in state:
            mapping[key] = key
            continue
        found = _pick(suffix_matches(key, state), longest=False)
        if found is None:
            found = _pick([k for k in state if suffix_matches(k, [key])], longest=True)
        if found is None:
            missing.append(key)
        else:
            mapping[key] = found
    return mapping, missing


def _definition(model: nn.Module) -> str | None:
    try:
        filename = inspect.getsourcefile(type(model))
        line = inspect.getsourcelines(type(model))[1]
    except (OSError, TypeError):
        return None
    return f"{shown_path(filename)}:{line}" if filename else None


def _load_weights(model: nn.Module, state: dict[str, Any], source: str, spec: str) -> None:
    own = model.state_dict()
    mapping, missing = match_keys(state, list(own))
    unexpected = [k for k in state if k not in set(mapping.values())]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}")
        raise CheckpointError(
            f"{source} does not fit {{arch}} {spec}: {'; '.join(parts)}; check that the "
            "factory builds the architecture the weights were trained for"
        )
    for key, found in mapping.items():
        have, got = tuple(own[key].shape), tuple(getattr(state[found], "shape", ()))
        if have != got:
            where = _definition(model)
            shown = f" (defined at {where})" if where else ""
            raise UserCodeError(
                f"{source} does not fit {{arch}} {spec}: {found!r} is "
                f"{'×'.join(map(str, got)) or 'a scalar'} in the file but {key!r} is "
                f"{'×'.join(map(str, have))} in the {type(model).__name__} the factory "
                f"builds{shown}; give the factory the arguments the weights were trained "
                "with",
                where=where,
            )
    model.load_state_dict({key: state[found] for key, found in mapping.items()})


@phased("loading the model")
def load_model(
    source: str | os.PathLike[str], *, arch: str | None = None, trust_pickle: bool = False
) -> nn.Module:
    """Load the model to convolutionalize, in eval mode.

    With ``arch`` (``package.module:callable`` or ``…:callable(args)``) the
    callable builds the model and ``source`` provides its weights, read
    through the safe checkpoint loaders. Without it, ``source`` must be a
    pickled ``nn.Module``, which only ``trust_pickle=True`` may unpickle,
    since unpickling runs code. ``-`` reads the file from stdin, into memory
    (nothing is spooled to a temporary file).

    Raises:
        UnsafeCheckpointError: a pickled module without ``trust_pickle``.
        ArchitectureError: ``arch`` cannot be parsed, imported or called.
        UserCodeError: the model's code raised, or built tensors of other shapes.
        CheckpointError: unreadable file, or weights that do not fit ``arch``.
    """
    from fcconv.io.checkpoint import _load_bytes, load_state_dict

    data = read_stdin() if str(source) == "-" else None
    name = "<stdin>" if data is not None else str(source)

    def state_dict(trust: bool) -> dict[str, Any]:
        if data is None:
            return load_state_dict(str(source), trust_pickle=trust)
        return _load_bytes(data, name, trust).tensors

    if arch is not None:
        model = build_model(arch)
        _load_weights(model, state_dict(trust_pickle), name, arch)
        return model.eval()
    if not trust_pickle:
        try:
            state_dict(False)
        except UnsafeCheckpointError:
            raise UnsafeCheckpointError(
                f"{name} is a pickled model: loading it runs code from the file; pass "
                "{trust_pickle} if you trust where it came from, or give {arch} "
                "package.module:callable to build the model and load only its weights"
            ) from None
        raise CheckpointError(
            f"{name} holds only weights, not a model; give {{arch}} "
            "package.module:callable to build the architecture they belong to"
        )
    return _unpickle(data if data is not None else str(source), name)


def _unpickle(file: bytes | str, name: str) -> nn.Module:
    handle = io.BytesIO(file) if isinstance(file, bytes) else file
    try:
        with working_folder_last(), running_user_code(f"unpickling {name}"):
            loaded = torch.load(handle, map_location="cpu", weights_only=False)
    except UserCodeError as error:
        cause = error.__cause__
        if isinstance(cause, (ImportError, AttributeError)):
            raise CheckpointError(
                f"{name} refers to code that cannot be imported here ({type(cause).__name__}: "
                f"{cause}); run where the model's classes are importable, or save a state "
                "dict and use {arch}"
            ) from None
        if error.where is None:
            raise CheckpointError(f"cannot read {name}: {type(cause).__name__}: {cause}") from None
        raise
    if not isinstance(loaded, nn.Module):
        raise CheckpointError(
            f"{name} holds a {type(loaded).__name__}, not an nn.Module; give "
            "{arch} package.module:callable to build the model for these weights"
        )
    return loaded.eval()
