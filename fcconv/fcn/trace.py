"""Tracing a model at its native input size into an fx graph that larger inputs can run.

``torch.fx`` traces first, with three allowances for ordinary model code:

- parameters after the input that have defaults (``forward(self, x,
  embed=False)``) are traced at their defaults;
- a Python condition on sizes only (``if x.shape[-1] != 28: raise ...``) is
  evaluated at the native size; the branch it takes there is the one every
  crop takes, so a size guard disappears from the graph and is reported;
- each node keeps the user's ``file:line``, so every refusal can name it.

When fx fails for another reason (``range(x.size(2))``, ``math.ceil`` on a
size, ...), ``torch.export`` (non-strict) traces the model at the native size,
and the exported graph's ATen calls of plain ``torch.nn`` layers are lifted
back to those modules. A condition on tensor *values* is refused, naming the
line.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import linecache
import operator
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from fcconv.errors import SpecError, UntraceableModelError
from fcconv.fcn.ops import ancestors, descendants, plain
from fcconv.fcn.usercode import (
    at,
    caller_frame,
    error_location,
    frame_location,
    is_user_file,
    shown_path,
    stack_location,
    user_code_error,
)

WEIGHT_ONLY_HINT = "for weight-only conversion use `fcconv convert CKPT {layers} NAME`"

# What a condition on the input's size (or type) may read besides Python's own operators.
_SIZE_METHODS = frozenset({"size", "dim", "numel", "nelement", "is_floating_point"})
_SIZE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})
_ASSERTS = (operator.eq, torch._assert, fx._symbolic_trace._assert_is_none)


@dataclass(frozen=True)
class InputLayout:
    """The input tensor: ``[B, C, *size]``, or ``[B, *size]`` when it has no channel axis."""

    channels: int | None
    size: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        first = 1 if self.channels is None else 2
        return tuple(range(first, first + self.ndim))

    def shape(self, batch: int, size: Sequence[int] | None = None) -> tuple[int, ...]:
        channel = () if self.channels is None else (self.channels,)
        return (batch, *channel, *(self.size if size is None else tuple(size)))

    def example(
        self,
        batch: int,
        *,
        size: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A standard-normal input of this layout (on the CPU generator, then moved)."""
        shape = self.shape(batch, size)
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)

    def describe(self, size: Sequence[int] | None = None) -> str:
        """``2x3x24x24`` style, batch 1 left out: ``3x24x24`` or ``1024``."""
        return "x".join(str(n) for n in self.shape(1, size)[1:])

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "size": list(self.size)}


@dataclass
class Traced:
    """A traced model: its graph (shapes recorded at the native size) and how it was made."""

    gm: fx.GraphModule
    layout: InputLayout
    tracer: str
    notes: list[str] = field(default_factory=list)


class _DataDependent(Exception):
    """Python control flow on tensor values: neither tracer can follow it."""

    def __init__(self, location: tuple[str, str] | None):
        super().__init__("control flow on tensor values")
        self.location = location


# ------------------------------------------------------------------- layouts


def first_layer(model: nn.Module) -> tuple[int, int] | None:
    """``(in_channels, spatial dims)`` of the model's first conv or batch norm."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels, len(module.kernel_size)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(module), 2)
            return module.num_features, dims
    return None


def candidate_layouts(
    model: nn.Module, size: tuple[int, ...], in_channels: int | None
) -> list[InputLayout]:
    """The input layouts to try, the most likely first.

    ``[B, C, *size]`` with C from the first conv; one number for a 2-D or 3-D
    model is a square (cube); a model whose first conv has one channel may
    also take ``[B, *size]`` (raw audio) and add the channel axis itself.
    """
    first = first_layer(model)
    if in_channels is None and first is None:
        raise SpecError(
            "cannot tell how many channels the model's input has (no conv or batch norm "
            "found); give them with {channels}"
        )
    channels = in_channels or first[0]  # type: ignore[index]
    dims = first[1] if first is not None else len(size)
    sizes = [size * dims if len(size) == 1 and dims > 1 else size, size]
    layouts = [InputLayout(channels, s) for s in dict.fromkeys(sizes)]
    if channels == 1:
        layouts.append(InputLayout(None, size))
    return layouts


# ------------------------------------------------------------------- fx


def _input_names(model: nn.Module) -> dict[str, Any]:
    """The defaults of ``forward``'s parameters after the input, to trace at."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    concrete = {}
    for parameter in parameters[1:]:
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if parameter.default is inspect.Parameter.empty:
            where = _definition(model.forward)
            kind = "input" if parameter.kind in positional else "keyword argument"
            raise UntraceableModelError(
                f"cannot convolutionalize: {type(model).__name__}.forward needs a second "
                f"{kind} {parameter.name!r} without a default{where}; fcconv feeds one "
                f"input tensor; wrap the model in a module whose forward takes one; "
                f"{WEIGHT_ONLY_HINT}"
            )
        concrete[parameter.name] = parameter.default
    return concrete


def _definition(function: Any) -> str:
    try:
        filename = inspect.getsourcefile(function)
        line = inspect.getsourcelines(function)[1]
    except (OSError, TypeError):
        return ""
    return f" ({shown_path(filename)}:{line})" if filename else ""


def _size_only(node: fx.Node) -> bool:
    """Whether ``node`` is computed from tensor sizes only (never from tensor values)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "call_method" and current.target in _SIZE_METHODS:
            continue
        if (
            current.op == "call_function"
            and current.target is getattr
            and current.args[1] in _SIZE_ATTRIBUTES
        ):
            continue
        if current.op != "call_function" or not _python_operator(current.target):
            return False
        stack.extend(current.all_input_nodes)
    return True


def _python_operator(target: Any) -> bool:
    owner = getattr(target, "__module__", None)
    return owner in ("_operator", "operator", "builtins", "math")


class _Tracer(fx.Tracer):
    """fx's tracer with stack traces, and size conditions evaluated at the native size."""

    def __init__(self, example: torch.Tensor) -> None:
        super().__init__()
        self.record_stack_traces = True
        self.example = example
        self.conditions: list[str] = []

    def to_bool(self, obj: fx.Proxy) -> bool:
        frame = caller_frame()
        location = frame_location(frame)
        if not _size_only(obj.node):
            raise _DataDependent(location)
        value = bool(self._evaluate(obj.node))
        note = _size_condition_note(frame, value)
        if note not in self.conditions:
            self.conditions.append(note)
        return value

    def _evaluate(self, node: fx.Node) -> Any:
        """The value of a size condition on the example input, from the graph so far."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        wanted = ancestors(node) | {node}
        for current in self.graph.nodes:
            if current in wanted:
                env[current] = graph.node_copy(current, lambda n: env[n])
        graph.output(env[node])
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        module = fx.GraphModule(self.root, graph)
        with torch.no_grad(), running_eval(self.root):  # no BatchNorm statistics updated
            return _Unpatched(module).run(*[self.example] * len(placeholders))


class _Unpatched(fx.Interpreter):
    """Runs modules by their ``forward``: while fx traces, ``nn.Module.__call__`` records."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self.fetch_attr(target).forward(*args, **kwargs)


def _statement(frame: traceback.FrameSummary) -> ast.stmt | None:
    """The ``if``/``assert``/``while`` statement whose condition holds the frame's line."""
    try:
        tree = ast.parse("".join(linecache.getlines(frame.filename)))
    except (SyntaxError, ValueError):
        return None
    line = frame.lineno or 0
    found = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.While, ast.Assert)):
            test = node.test
            if test.lineno <= line <= (test.end_lineno or test.lineno):
                found = node
    return found


def _raises(body: list[ast.stmt]) -> bool:
    return bool(body) and isinstance(body[0], ast.Raise)


def _size_condition_note(frame: traceback.FrameSummary | None, value: bool) -> str:
    """Plain words for a condition on sizes evaluated at the native size."""
    location = at(frame_location(frame))
    statement = _statement(frame) if frame is not None else None
    guard = isinstance(statement, ast.Assert) or (
        isinstance(statement, ast.If) and _raises(statement.orelse if value else statement.body)
    )
    if guard:
        return (
            f"removed the size guard{location}: it checks the input's size only and passes "
            "at the native size, as on every crop, so larger inputs now run"
        )
    return (
        f"the condition{location} depends only on the input's size or type; it is {value} "
        "at the native size, as on every crop, and the converted model always takes that "
        "branch"
    )


def _drop_concrete_inputs(graph: fx.Graph) -> None:
    """Remove fx's placeholders and assertions for the arguments traced at their defaults."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][1:]
    for placeholder in reversed(placeholders):
        users = sorted(descendants(placeholder), key=_position(graph), reverse=True)
        if any(u.op != "call_function" or u.target not in _ASSERTS for u in users):
            continue
        for user in users:
            graph.erase_node(user)
        graph.erase_node(placeholder)


def _position(graph: fx.Graph) -> Any:
    order = {node: index for index, node in enumerate(graph.nodes)}
    return order.__getitem__


def _fx_trace(model: nn.Module, example: torch.Tensor) -> Traced:
    tracer = _Tracer(example)
    concrete = _input_names(model)
    graph = tracer.trace(model, concrete_args=concrete or None)
    _drop_concrete_inputs(graph)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    notes = list(tracer.conditions)
    if concrete:
        shown = ", ".join(f"{k}={v!r}" for k, v in concrete.items())
        notes.append(f"forward was traced with its defaults {shown}")
    return Traced(gm, InputLayout(None, ()), "torch.fx", notes)


# ------------------------------------------------------------------- torch.export


_LIFTABLE: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.PReLU,
    nn.Softmax,
    nn.LogSoftmax,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


def _lift_targets(exported: fx.GraphModule, model: nn.Module) -> dict[fx.Node, str]:
    """ATen nodes that are the whole call of a plain ``torch.nn`` layer: node → module path."""
    groups: dict[str, list[fx.Node]] = {}
    for node in exported.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            key = next(reversed(stack))
            groups.setdefault(key, []).append(node)
    lifted = {}
    for key, nodes in groups.items():
        path = nodes[0].meta["nn_module_stack"][key][0]
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if len(nodes) == 1 and path and plain(module, _LIFTABLE):
            if nodes[0].args and isinstance(nodes[0].args[0], fx.Node):
                lifted[nodes[0]] = path
    return lifted


def _fetch(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _lift(program: torch.export.ExportedProgram, model: nn.Module) -> fx.GraphModule:
    """The exported graph with plain layers as modules again and the user's output structure."""
    exported = program.module()
    lifted = _lift_targets(exported, model)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    modules: dict[str, Any] = {}
    for node in exported.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
            continue  # export's checks of the example's static sizes
        if node.op == "output":
            leaves = list(node.args[0])
            graph.output(
                pytree.tree_unflatten([env[n] for n in leaves], program.call_spec.out_spec)
            )
        elif node in lifted:
            path = lifted[node]
            modules[path] = copy.deepcopy(model.get_submodule(path))
            env[node] = graph.call_module(path, (env[node.args[0]],))
            env[node].meta["stack_trace"] = node.meta.get("stack_trace")
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    # the graph has no module yet, which fx's own purity check of module calls needs
    graph.eliminate_dead_code(lambda n: n.op != "call_module" and n.is_impure())
    for node in graph.nodes:
        if node.op == "get_attr":
            modules[str(node.target)] = _fetch(exported, str(node.target))
    return fx.GraphModule(modules, graph, type(model).__name__)


def _export_trace(model: nn.Module, example: torch.Tensor) -> Traced:
    batch = {0: torch.export.Dim.AUTO}
    with running_eval(model), torch.no_grad():
        program = torch.export.export(model, (example,), strict=False, dynamic_shapes=(batch,))
    return Traced(_lift(program, model), InputLayout(None, ()), "torch.export")


@contextlib.contextmanager
def running_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode, then give every submodule its own flag back."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


# ------------------------------------------------------------------- shapes


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once, recording each tensor's shape in ``meta["fcconv_shape"]``."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as error:  # the model does not run this way: say where
            raise _RunFailed(n, error) from error
        if isinstance(result, torch.Tensor):
            n.meta["fcconv_shape"] = tuple(result.shape)
        return result


class _RunFailed(Exception):
    def __init__(self, node: fx.Node, error: BaseException):
        super().__init__(str(error))
        self.node, self.error = node, error


def record_shapes(gm: fx.GraphModule, example: torch.Tensor) -> Any:
    """Run ``gm`` on ``example`` in eval mode without gradients, recording every shape."""
    with torch.no_grad(), running_eval(gm):
        return _ShapeRecorder(gm).run(example)


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _located_failure(error: BaseException, node: fx.Node | None = None) -> str:
    location = error_location(error)
    if location is None and node is not None:
        location = stack_location(node.meta.get("stack_trace"))
    return f"{type(error).__name__}{at(location)}: {_short(error)}"


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else ""


def _raised_by_user(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is the user's code."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and is_user_file(frames[-1].filename)


@dataclass
class _Failure:
    kind: str  # "run": traced, fails at this size; "trace": untraceable; "user": model raised
    text: str
    error: BaseException


def _trace_one(model: nn.Module, example: torch.Tensor) -> Traced | _Failure:
    """Trace with fx, or with torch.export when fx fails; a failure says why."""
    try:
        return _fx_trace(model, example)
    except (_DataDependent, UntraceableModelError):
        raise
    except Exception as fx_error:  # fx cannot follow this code: torch.export may
        try:
            traced = _export_trace(model, example)
        except Exception as error:  # noqa: BLE001 - the model's, or export's
            if _raised_by_user(error):
                return _Failure("user", _located_failure(error), error)
            return _Failure(
                "trace",
                f"torch.fx cannot trace it ({_located_failure(fx_error)}) and torch.export "
                f"failed too ({_located_failure(error)})",
                error,
            )
        traced.notes.insert(
            0,
            f"torch.fx could not trace the model ({_located_failure(fx_error)}), so "
            "torch.export traced it at the native size: Python code on sizes ran as there",
        )
        return traced


def trace_model(
    model: nn.Module, input_size: tuple[int, ...], in_channels: int | None = None
) -> Traced:
    """Trace ``model`` at ``input_size`` and record every shape; refusals name the line.

    Each candidate layout (:func:`candidate_layouts`) is tried in turn; the
    first that traces and runs wins. Otherwise the first layout's failure is
    reported.

    Raises:
        UntraceableModelError: neither torch.fx nor torch.export can trace it.
        SpecError: it does not run at ``input_size``.
        UserCodeError: the model's own code raised while it was traced.
    """
    dtype, device = model_dtype_device(model)
    failures: list[_Failure] = []
    for layout in candidate_layouts(model, input_size, in_channels):
        generator = torch.Generator().manual_seed(0)
        example = layout.example(2, dtype=dtype, device=device, generator=generator)
        try:
            traced = _trace_one(model, example)
        except _DataDependent as error:
            raise UntraceableModelError(
                f"cannot convolutionalize: {type(model).__name__} branches on tensor values"
                f"{at(error.location)}; neither torch.fx nor torch.export can trace Python "
                f"control flow on data; {WEIGHT_ONLY_HINT}"
            ) from None
        if isinstance(traced, _Failure):
            failures.append(traced)
            continue
        traced.layout = layout
        try:
            record_shapes(traced.gm, example)
        except _RunFailed as failure:
            text = f"a {layout.describe()} input fails: " + _located_failure(
                failure.error, failure.node
            )
            failures.append(_Failure("run", text, failure.error))
            continue
        return traced
    raise _refusal(model, input_size, failures[0])


def _refusal(model: nn.Module, size: tuple[int, ...], failure: _Failure) -> Exception:
    name = type(model).__name__
    if failure.kind == "trace":
        return UntraceableModelError(f"cannot convolutionalize: {failure.text}; {WEIGHT_ONLY_HINT}")
    if failure.kind == "user":
        return user_code_error(
            f"{name}.forward",
            failure.error,
            "check that {input_size} is the size the model was trained at",
        )
    shape = "x".join(str(n) for n in size)
    return SpecError(
        f"{name} does not run at {{input_size}} {shape}: {failure.text}; give the size "
        "it was trained at with {input_size} (and {channels} C)"
    )
