"""The exact and functional checks of SPEC §4, and result objects truthy on pass.

Exact: the converted kernel, flattened back in the layer's order, equals the
Linear weight bit for bit; biases and every other tensor are identical.

Functional: on a random input, every cell of the conv output is compared
with "cut the window, flatten it in ORDER, apply the Linear", computed here
independently from the *original* weight with ``unfold`` and a matmul.

The exact check reads every element of both weights, a block of rows at a
time (:mod:`fcconv.exact`). The functional check runs on
:func:`functional_rows` output channels: all of them in a layer of up to
``FUNCTIONAL_ELEMENTS`` weight elements, else evenly spaced rows, the first and
last included. Every row goes through the same permutation, which the exact
check has proved element by element, so a subset of rows is enough to prove
that the permutation is the convolution's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from fcconv import dtypes
from fcconv.compare import bitwise_equal, untouched_differences
from fcconv.errors import LayerError, SpecError
from fcconv.exact import Mismatch, Tensors, as_tensors, permuted_mismatch
from fcconv.geometry import (
    Patch,
    default_input,
    make_grid,
    unravel_index,
)
from fcconv.plan import (
    LayerPlan,
    layer_inputs,
)
from fcconv.threads import torch_threads

if TYPE_CHECKING:
    import torch

FLOAT64_TOLERANCE = 1e-9
"""The float64 judge: |conv − reference| ≤ 1e-9 · (|W|·|x| + |b|) per element."""

BLOCK_ELEMENTS = 1 << 24
"""Weight elements converted to float64 at a time by the functional check (128 MB)."""

FUNCTIONAL_ELEMENTS = 1 << 22
"""Weight elements the functional check reads at most (whole rows; at least two rows).

VGG-16's fc6 (4096 × 25088) is checked on 167 evenly spaced output channels.
"""

MAX_CHECK_ELEMENTS = 1 << 24
"""The most elements the functional check holds in one float64 tensor (128 MB): the
input, the window vectors, or one map of the output."""

MAX_CHECK_MACS = 1 << 33
"""The most multiply-adds one pass of the functional check may take (a few seconds)."""


# ------------------------------------------------------------- result objects


@dataclass
class FunctionalCheck:
    """Conv output vs. Linear-on-every-window, on one random input."""

    input_size: tuple[int, int]
    output_grid: tuple[int, int]
    cells: int
    float64_max_error: float
    float64_ratio: float  # max error / (1e-9·scale): ≤ 1 passes
    dtype: str
    max_abs_error: float | None  # in the layer's dtype, against the float64 reference
    roundoff_units: float | None  # max error / (u·scale): healthy ≪ 1
    bound_ratio: float | None  # max error / (2·γ_N·scale); None when N·u ≥ 1 or not run
    needed_rtol: float | None  # the tolerance, relative to scale, that would have passed
    notes: list[str] = field(default_factory=list)
    nonfinite_cells: int = 0  # cells whose reference is NaN or ±inf (the weight holds them)
    nonfinite_mismatches: int = 0  # of those, cells where the conv gives another kind
    channels_checked: int | None = None  # output channels compared (see functional_rows)

    @property
    def float64_passed(self) -> bool:
        return self.float64_ratio <= 1.0 and not self.nonfinite_mismatches

    @property
    def dtype_passed(self) -> bool:
        return self.bound_ratio is None or self.bound_ratio <= 1.0

    def __bool__(self) -> bool:
        return self.float64_passed and self.dtype_passed


@dataclass
class LayerCheck:
    """Both checks for one converted layer."""

    plan: LayerPlan
    exact: bool
    problems: list[str] = field(default_factory=list)
    functional: FunctionalCheck | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.exact and not self.problems and bool(self.functional)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.plan.to_dict(),
            "exact": self.exact,
            "problems": self.problems,
            "functional": asdict(self.functional) if self.functional is not None else None,
            "notes": self.notes,
            "passed": self.passed,
        }


@dataclass
class VerifyResult:
    """The verdict over every converted layer and every untouched tensor."""

    layers: list[LayerCheck]
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runtime: list[Any] = field(default_factory=list)
    """Checks of the converted model in its own runtime (Keras, onnxruntime), if any."""

    @property
    def passed(self) -> bool:
        return bool(self.layers) and all(self.layers) and not self.differences and all(self.runtime)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def exit_code(self) -> int:
        """0 equivalent, 1 a difference was found (``cmp`` convention)."""
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "equivalent": self.passed,
            "exit_code": self.exit_code,
            "layers": [layer.to_dict() for layer in self.layers],
            "differences": self.differences,
            "notes": self.notes,
            "runtime": [check.to_dict() for check in self.runtime],
        }


class VerificationFailed(Exception):
    """Raised from a writer's check to abort a write whose result failed verification."""

    def __init__(self, result: VerifyResult) -> None:
        super().__init__("the conversion failed verification")
        self.result = result


# ------------------------------------------------------------------- checks


def exact_problems(
    plan: LayerPlan,
    original: Tensors | Mapping[str, torch.Tensor],
    converted: Tensors | Mapping[str, torch.Tensor],
) -> list[str]:
    """Where the converted layer is not a pure permutation of the original, in words.

    Every element of the weight is compared, bit for bit, a block of rows at a
    time (:func:`fcconv.exact.permuted_mismatch`); the biases as wholes.
    """
    original, converted = as_tensors(original), as_tensors(converted)
    weight, kernel = original.describe(plan.weight_key), converted.describe(plan.weight_key)
    problems = []
    if kernel is None:
        problems.append(f"{plan.weight_key} is missing from the converted checkpoint")
    elif kernel.dtype != weight.dtype:
        problems.append(f"{plan.weight_key} changed dtype: {weight.dtype} → {kernel.dtype}")
    elif kernel.layout != weight.layout:
        problems.append(f"{plan.weight_key} changed layout: {weight.layout} → {kernel.layout}")
    elif tuple(kernel.shape) != plan.conv_shape:
        problems.append(
            f"{plan.weight_key} has shape {tuple(kernel.shape)}, expected "
            f"{plan.conv_shape} for patch {plan.patch}"
        )
    else:
        found = permuted_mismatch(
            original, converted, plan.weight_key, plan.patch, plan.order, plan.out_features,
            flip=plan.flip,
        )  # fmt: skip
        if found is not None:
            problems.append(_weight_mismatch(plan, original, converted, found))
    if plan.bias_key is not None and not _same_tensor(original, converted, plan.bias_key):
        problems.append(f"{plan.bias_key} differs from the original bias")
    return problems


def _same_tensor(original: Tensors, converted: Tensors, key: str) -> bool:
    if converted.describe(key) is None:
        return False
    return bitwise_equal(original.tensor(key), converted.tensor(key))


def _weight_mismatch(
    plan: LayerPlan, original: Tensors, converted: Tensors, found: Mismatch
) -> str:
    channel, i, j = unravel_index(found.tap, plan.patch.sizes("chw"))
    kernel = converted.rows(plan.weight_key, [found.row]).reshape(-1)[found.tap]
    weight = original.rows(plan.weight_key, [found.row]).reshape(-1)[found.column]
    return (
        f"{plan.weight_key}: {found.count} element(s) are not the original's under order "
        f"{plan.order}; first at conv [{found.row}, {channel}, {i}, {j}] = Linear "
        f"[{found.row}, {found.column}]: {kernel.item()!r} vs original {weight.item()!r}"
    )


def _dtype(tensor: torch.Tensor) -> str:
    return dtypes.name_of(tensor.dtype)


def check_work(
    patch: Patch,
    out_features: int,
    stride: tuple[int, int],
    input_size: tuple[int, int] | None,
    layer: str = "layer",
    skippable: bool = False,
) -> None:
    """Refuse a functional check too large to run, before anything is allocated.

    The check holds the input, every window's vector and a few maps of the
    output in float64, and computes ``out_features · cells · N`` products
    several times: each is bounded (:data:`MAX_CHECK_ELEMENTS`,
    :data:`MAX_CHECK_MACS`), so no input size, stride or declared shape can
    make it run for hours or exhaust memory.

    Raises:
        SpecError: naming the sizes and what to change.
    """
    if out_features == 0:
        return  # nothing to compare, nothing is allocated
    size = input_size or default_input(patch, stride)
    grid = make_grid(size, patch, stride)
    cells = grid.rows * grid.cols
    measures = (
        ("input values", patch.channels * size[0] * size[1], MAX_CHECK_ELEMENTS),
        ("window values", cells * patch.features, MAX_CHECK_ELEMENTS),
        ("output values", cells * out_features, MAX_CHECK_ELEMENTS),
        ("products", cells * patch.features * out_features, MAX_CHECK_MACS),
    )
    over = [(what, count, limit) for what, count, limit in measures if count > limit]
    if not over:
        return
    what, count, limit = over[0]
    skip = " or skip the checks with {no_verify}" if skippable else ""
    raise SpecError(
        f"the functional check of {layer} on a {size[0]}x{size[1]} input ({cells} windows at "
        f"stride {stride[0]}x{stride[1]}) is too large to run: {count:.3g} {what}, at most "
        f"{limit:.3g}; give a smaller {{input_size}} or {{stride}}{skip}",
        layer=layer,
    )


_NATIVE_CONV = ("float64", "float32", "float16", "bfloat16")
"""Dtypes torch convolves on the CPU; others (float8) are judged in float64 only."""


def functional_rows(out_features: int, in_features: int) -> list[int]:
    """The output rows the functional check compares: all, or evenly spaced ones.

    Every row of a layer of at most ``FUNCTIONAL_ELEMENTS`` weight elements;
    else as many rows as that budget holds (at least 2), evenly spaced, the
    first and the last included.

    >>> functional_rows(5, 100)
    [0, 1, 2, 3, 4]
    >>> len(functional_rows(4096, 25088)), functional_rows(4096, 25088)[-1]
    (167, 4095)
    """
    count = max(2, FUNCTIONAL_ELEMENTS // max(1, in_features))
    if out_features <= count:
        return list(range(out_features))
    step = (out_features - 1) / (count - 1)
    return sorted({round(k * step) for k in range(count)})


def functional_check(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: torch.Tensor,
    kernel_bias: torch.Tensor | None,
    patch: Patch,
    order: str,
    stride: tuple[int, int],
    input_size: tuple[int, int] | None = None,
    seed: int = 0,
    *,
    rows: Sequence[int] | None = None,
    flip: bool = False,
) -> FunctionalCheck:
    """Compare the conv with the Linear applied to every window of a random input.

    ``weight``/``bias`` are the original Linear's; ``kernel``/``kernel_bias``
    the converted conv's. The reference never touches ``kernel``. By default
    the tensors hold every output row and the check compares
    :func:`functional_rows` of them; ``rows`` says which output rows they hold
    when they hold only some (read that way from disk). With ``flip`` the
    kernel is run as a framework that convolves runs it (its spatial axes
    reversed as it slides), which is how a flipped kernel is used. Cells whose
    reference is not finite (the weight holds NaN or ±inf) must be the same
    kind in the conv (NaN, +inf or −inf); the others are judged by the
    tolerances. A dtype torch cannot convolve (float8) is judged in float64,
    from the same upcast values.
    """
    import torch

    if rows is None:
        rows = functional_rows(kernel.shape[0], patch.features)
        if len(rows) < kernel.shape[0]:
            index = torch.tensor(rows, dtype=torch.long)
            weight, kernel = weight[index], kernel[index]
            bias = bias[index] if bias is not None else None
            kernel_bias = kernel_bias[index] if kernel_bias is not None else None
    with torch_threads(len(rows) * patch.features):
        check = _compare_on_windows(
            weight, bias, kernel, kernel_bias, patch, order, stride, input_size, seed, flip
        )
    check.channels_checked = len(rows)
    return check


def _compare_on_windows(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: torch.Tensor,
    kernel_bias: torch.Tensor | None,
    patch: Patch,
    order: str,
    stride: tuple[int, int],
    input_size: tuple[int, int] | None,
    seed: int,
    flip: bool,
) -> FunctionalCheck:
    import torch
    import torch.nn.functional as F

    if flip:
        kernel = kernel.flip(2, 3)  # true convolution = cross-correlation with the flip
    size = input_size or default_input(patch, stride)
    grid = make_grid(size, patch, stride)
    dtype_name = _dtype(kernel)
    notes = grid.warnings()
    if kernel.shape[0] == 0:
        notes.append("the layer has no outputs: there is nothing to compare")
        return FunctionalCheck(
            tuple(size), (grid.rows, grid.cols), grid.rows * grid.cols, 0.0, 0.0,
            dtype_name, 0.0, 0.0, None, 0.0, notes,
        )  # fmt: skip
    check_work(patch, kernel.shape[0], stride, size)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, patch.channels, *size, generator=generator, dtype=torch.float64)
    x = x.to(kernel.dtype)  # the input the layer's dtype can hold exactly
    x64 = x.double()

    # float64 copies of the weight are made a block of output rows at a time, so
    # a VGG-sized layer is checked in ~100 MB instead of three 800 MB copies.
    vectors = _window_vectors(x64, patch, order, stride)
    bias64, kernel_bias64 = _bias64(bias, weight), _bias64(kernel_bias, kernel)
    step = max(1, BLOCK_ELEMENTS // patch.features)
    blocks = []
    for rows in (slice(s, s + step) for s in range(0, kernel.shape[0], step)):
        reference, scale = _linear_on_windows(vectors, weight[rows].double(), bias64[rows])
        dense64 = F.conv2d(x64, kernel[rows].double(), kernel_bias64[rows], stride=stride)
        blocks.append((reference, scale, dense64))
    reference, scale, dense64 = (torch.cat(parts, dim=1) for parts in zip(*blocks, strict=True))
    finite = torch.isfinite(reference)
    same_kind = (torch.isnan(reference) & torch.isnan(dense64)) | (reference == dense64)
    nonfinite, mismatched = int((~finite).sum()), int((~finite & ~same_kind).sum())
    if nonfinite:
        notes.append(
            f"{nonfinite} output value(s) are NaN or infinite (the weights hold such values); "
            f"{nonfinite - mismatched} of them match the reference in kind"
        )
    error64 = torch.where(finite, (dense64 - reference).abs(), 0.0)
    result = FunctionalCheck(
        input_size=tuple(size),
        output_grid=(grid.rows, grid.cols),
        cells=grid.rows * grid.cols,
        float64_max_error=_largest(error64),
        float64_ratio=_max_ratio(error64, FLOAT64_TOLERANCE * scale),
        dtype=dtype_name,
        max_abs_error=None,
        roundoff_units=None,
        bound_ratio=None,
        needed_rtol=None,
        notes=notes,
        nonfinite_cells=nonfinite,
        nonfinite_mismatches=mismatched,
    )
    if dtype_name not in _NATIVE_CONV:
        notes.append(
            f"torch cannot convolve {dtype_name} on this machine: judged in float64 from the "
            f"same {dtype_name} values, without the {dtype_name} rounding bound"
        )
        return result
    with _reliable_conv(kernel.dtype):
        dense = F.conv2d(x, kernel, kernel_bias, stride=stride)
    _judge_in_dtype(result, dense, reference, scale, finite, torch.finfo(kernel.dtype), patch)
    return result


def _judge_in_dtype(
    result: FunctionalCheck,
    dense: torch.Tensor,
    reference: torch.Tensor,
    scale: torch.Tensor,
    finite: torch.Tensor,
    info: Any,
    patch: Patch,
) -> None:
    """The error of the conv run in the layer's own dtype, against the rigorous bound."""
    import torch

    # Where |W|·|x| + |b| exceeds the dtype's range the rounding bound says nothing.
    judged = finite & (scale <= info.max)
    error = torch.where(judged, (dense.double() - reference).abs(), 0.0)
    u = info.eps / 2
    nu = (patch.features + 1) * u  # N products and the bias: N + 1 roundings
    gamma = nu / (1 - nu) if nu < 1 else math.inf
    if gamma == math.inf:
        result.notes.append(
            f"the rigorous {result.dtype} bound is vacuous for N={patch.features} "
            "(N·u ≥ 1); the float64 check is the judge"
        )
    out_of_range = int((finite & ~judged).sum())
    if out_of_range:
        result.notes.append(
            f"{out_of_range} output value(s) exceed the range of {result.dtype}; judged in "
            "float64 only"
        )
    result.max_abs_error = _largest(error)
    result.roundoff_units = _max_ratio(error, u * scale)
    result.bound_ratio = None if gamma == math.inf else _max_ratio(error, 2 * gamma * scale)
    result.needed_rtol = _max_ratio(error, scale)


def _largest(values: torch.Tensor) -> float:
    return float(values.max()) if values.numel() else 0.0


@contextlib.contextmanager
def _reliable_conv(dtype: torch.dtype) -> Iterator[None]:
    """Run a bfloat16 conv on torch's native CPU path instead of oneDNN.

    oneDNN's bfloat16 conv on CPU (torch 2.13) returns wrong numbers for some
    small shapes with one output column (pytorch/pytorch#169688, #163347);
    the check judges fcconv's kernel, not that backend.
    """
    import torch

    if dtype != torch.bfloat16:
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # flags() would warn about Intel GPUs
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _bias64(bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    import torch

    if bias is None:
        return torch.zeros(weight.shape[0], dtype=torch.float64)
    return bias.double()


def _window_vectors(
    x: torch.Tensor, patch: Patch, order: str, stride: tuple[int, int]
) -> torch.Tensor:
    """Every window of ``x`` flattened in ``order``: ``[B, H', W', N]``, by ``unfold``."""
    windows = x.unfold(2, patch.height, stride[0]).unfold(3, patch.width, stride[1])
    batch, _, rows, cols, _, _ = windows.shape  # [B, C, H', W', kh, kw]
    axis = {"c": 1, "h": 4, "w": 5}
    vectors = windows.permute(0, 2, 3, *(axis[a] for a in order))
    return vectors.reshape(batch, rows, cols, patch.features)


def _linear_on_windows(
    vectors: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Linear on every window vector, and the error scale |W||x|+|b|, as ``[B, O, H', W']``."""
    output = vectors @ weight.T + bias
    scale = vectors.abs() @ weight.abs().T + bias.abs()
    return output.permute(0, 3, 1, 2), scale.permute(0, 3, 1, 2)


def _max_ratio(error: torch.Tensor, allowed: torch.Tensor) -> float:
    import torch

    if not error.numel():
        return 0.0
    ratio = torch.where(allowed > 0, error / allowed, torch.where(error > 0, math.inf, 0.0))
    return float(ratio.max())


def check_layer(
    plan: LayerPlan,
    original: Tensors | Mapping[str, torch.Tensor],
    converted: Tensors | Mapping[str, torch.Tensor],
    input_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> LayerCheck:
    """The exact check, then the functional check, for one layer.

    ``original`` and ``converted`` are mappings of tensors, or
    :class:`~fcconv.exact.Tensors` that read them from disk a part at a time.

    Raises:
        LayerError: the original weight is not one fcconv converts (integer,
            boolean, quantized or sparse): there is no conversion to judge.
    """
    original, converted = as_tensors(original), as_tensors(converted)
    _check_judgeable(plan, original)
    problems = exact_problems(plan, original, converted)
    exact = not problems
    functional = None
    if _runnable(plan, original, converted):
        rows = functional_rows(plan.out_features, plan.patch.features)
        functional = functional_check(
            original.rows(plan.weight_key, rows),
            original.rows(plan.bias_key, rows) if plan.bias_key else None,
            converted.rows(plan.weight_key, rows),
            converted.rows(plan.bias_key, rows) if plan.bias_key else None,
            plan.patch,
            plan.order,
            plan.stride,
            input_size,
            seed,
            rows=rows,
            flip=plan.flip,
        )
        if functional.nonfinite_mismatches:
            problems.append(
                f"{functional.nonfinite_mismatches} NaN or infinite output value(s) of the conv "
                "are not the same kind (NaN, +inf, -inf) as Linear-on-every-window's"
            )
        elif not functional.float64_passed:
            problems.append(
                f"conv output differs from Linear-on-every-window by up to "
                f"{functional.float64_max_error:.3g} in float64 "
                f"({functional.float64_ratio:.3g}× the 1e-9 tolerance)"
            )
        elif not functional.dtype_passed:
            problems.append(
                f"in {functional.dtype} the error {functional.max_abs_error:.3g} exceeds "
                f"the floating-point bound ({functional.bound_ratio:.3g}× 2·γ_N); it "
                f"would have needed rtol {functional.needed_rtol:.3g}"
            )
    return LayerCheck(plan, exact=exact, problems=problems, functional=functional)


def _check_judgeable(plan: LayerPlan, original: Tensors) -> None:
    weight = original.describe(plan.weight_key)
    if weight is not None and weight.floating:
        return
    kind = weight.kind if weight is not None else "missing"
    raise LayerError(
        f"{plan.weight_key} is {kind}; fcconv converts and verifies dense floating-point "
        "weights only",
        layer=plan.name,
    )


def _runnable(plan: LayerPlan, original: Tensors, converted: Tensors) -> bool:
    """Whether the conv can run at all; when it cannot, the exact check already says why."""
    kernel, weight = converted.describe(plan.weight_key), original.describe(plan.weight_key)
    if kernel is None or weight is None:
        return False
    if tuple(kernel.shape) != plan.conv_shape or kernel.dtype != weight.dtype:
        return False
    if kernel.layout != weight.layout:
        return False
    if plan.bias_key is None:
        return True
    bias = converted.describe(plan.bias_key)
    return (
        bias is not None
        and bias.dtype == weight.dtype
        and tuple(bias.shape) == (plan.out_features,)
    )


def verify_conversion(
    plans: list[LayerPlan],
    original: Tensors | Mapping[str, torch.Tensor],
    converted: Tensors | Mapping[str, torch.Tensor],
    input_size: tuple[int, int] | None = None,
    seed: int = 0,
    differences: list[str] | None = None,
) -> VerifyResult:
    """All layer checks plus the untouched-tensor comparison.

    ``differences`` replaces the in-memory comparison of untouched tensors
    (e.g. with :func:`fcconv.io.sources.byte_differences` for files on disk);
    it is required when a side is read from disk rather than given as a mapping.
    """
    sizes = layer_inputs(plans, input_size)
    for plan, size in zip(plans, sizes, strict=True):
        check_work(plan.patch, plan.out_features, plan.stride, size, plan.name)
    checks = [
        check_layer(plan, original, converted, size, seed)
        for plan, size in zip(plans, sizes, strict=True)
    ]
    if differences is None:
        if isinstance(original, Tensors) or isinstance(converted, Tensors):
            raise TypeError("verify_conversion needs differences= for tensors read from disk")
        differences = untouched_differences(original, converted, [p.weight_key for p in plans])
    return VerifyResult(checks, differences)


__all__ = [
    "FunctionalCheck",
    "LayerCheck",
    "VerificationFailed",
    "VerifyResult",
    "bitwise_equal",
    "check_layer",
    "check_work",
    "functional_check",
    "functional_rows",
    "untouched_differences",
    "verify_conversion",
]
