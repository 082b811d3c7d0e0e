"""The exact and functional checks of SPEC §4, and result objects truthy on pass.

Exact: the converted kernel, flattened back in the layer's order, equals the
Linear weight bit for bit; biases and every other tensor are identical.

Functional: on a random input, every cell of the conv output is compared
with "cut the window, flatten it in ORDER, apply the Linear", computed here
independently from the *original* weight, in numpy (no torch).

The exact check reads every element of both weights, a block of rows at a
time (:mod:`fcconv.verify.exact`). The functional check runs on
:func:`functional_rows` output channels: all of them in a layer of up to
``FUNCTIONAL_ELEMENTS`` weight elements, else evenly spaced rows, the first and
last included. Every row goes through the same permutation, which the exact
check has proved element by element, so a subset of rows is enough to prove
that the permutation is the convolution's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fcconv.errors import LayerError
from fcconv.geometry import unravel_index
from fcconv.patches import as_nd
from fcconv.plan import LayerPlan, layer_inputs
from fcconv.progress import phased
from fcconv.verify.bits import bitwise_equal
from fcconv.verify.exact import (
    MemoryTensors,
    Mismatch,
    Tensors,
    as_tensors,
    permuted_mismatch,
)
from fcconv.verify.untouched import untouched_differences
from fcconv.verify.windows import (
    BLOCK_ELEMENTS,
    FUNCTIONAL_ELEMENTS,
    MAX_CHECK_ELEMENTS,
    MAX_CHECK_MACS,
    FunctionalCheck,
    check_work,
    functional_check,
    functional_rows,
)

if TYPE_CHECKING:
    import torch

# ------------------------------------------------------------- result objects


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
            "functional": self.functional.to_dict() if self.functional is not None else None,
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
    time (:func:`fcconv.verify.exact.permuted_mismatch`); the biases as wholes.
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
    """Bit for bit; tensors on disk are compared as bits, without torch."""
    import numpy as np

    before, after = original.describe(key), converted.describe(key)
    if after is None or before is None:
        return False
    if isinstance(original, MemoryTensors) and isinstance(converted, MemoryTensors):
        return bitwise_equal(original.tensor(key), converted.tensor(key))
    if (before.dtype, before.shape, before.layout) != (after.dtype, after.shape, after.layout):
        return False
    rows = before.shape[0] if before.shape else 1
    return bool(np.array_equal(original.row_bits(key, 0, rows), converted.row_bits(key, 0, rows)))


def _weight_mismatch(
    plan: LayerPlan, original: Tensors, converted: Tensors, found: Mismatch
) -> str:
    tap = ", ".join(map(str, unravel_index(found.tap, as_nd(plan.patch).kernel_shape)))
    kernel = converted.array_rows(plan.weight_key, [found.row]).reshape(-1)[found.tap]
    weight = original.array_rows(plan.weight_key, [found.row]).reshape(-1)[found.column]
    return (
        f"{plan.weight_key}: {found.count} element(s) are not the original's under order "
        f"{plan.order}; first at conv [{found.row}, {tap}] = Linear "
        f"[{found.row}, {found.column}]: {float(kernel)!r} vs original {float(weight)!r}"
    )


def check_layer(
    plan: LayerPlan,
    original: Tensors | Mapping[str, torch.Tensor],
    converted: Tensors | Mapping[str, torch.Tensor],
    input_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> LayerCheck:
    """The exact check, then the functional check, for one layer.

    ``original`` and ``converted`` are mappings of tensors, or
    :class:`~fcconv.verify.exact.Tensors` that read them from disk a part at a time.

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
            original.array_rows(plan.weight_key, rows),
            original.array_rows(plan.bias_key, rows) if plan.bias_key else None,
            converted.array_rows(plan.weight_key, rows),
            converted.array_rows(plan.bias_key, rows) if plan.bias_key else None,
            plan.patch,
            plan.order,
            plan.stride,
            input_size,
            seed,
            rows=rows,
            flip=plan.flip,
        )
        problems += functional_problems(functional)
    return LayerCheck(plan, exact=exact, problems=problems, functional=functional)


def functional_problems(functional: FunctionalCheck) -> list[str]:
    """What the functional check found wrong (or could not judge), in words."""
    float64, in_dtype = functional.float64, functional.in_dtype
    if not float64.judged:
        return [
            f"the functional check could not judge the conv: {float64.reason} (the layer's "
            "weights and bias give Linear-on-every-window no size to compare against)"
        ]
    if float64.nonfinite_mismatches:
        return [
            f"{float64.nonfinite_mismatches} NaN or infinite output value(s) of the conv "
            "are not the same kind (NaN, +inf, -inf) as Linear-on-every-window's"
        ]
    if not float64.passed:
        return [
            f"conv output differs from Linear-on-every-window by up to "
            f"{float64.max_abs_diff:.3g} in float64 ({float64.ratio:.3g}× the "
            f"{float64.tolerance:g}·(|W|·|x|+|b|) tolerance)"
        ]
    if in_dtype is not None and in_dtype.judged and not in_dtype.passed:
        return [
            f"in {functional.dtype} the error {in_dtype.max_abs_diff:.3g} exceeds "
            f"the floating-point bound ({in_dtype.ratio:.3g}× 2·γ_N); it "
            f"would have needed tolerance {in_dtype.needed_tolerance:.3g}"
        ]
    return []


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


@phased("checking layers")
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
    "BLOCK_ELEMENTS",
    "FUNCTIONAL_ELEMENTS",
    "MAX_CHECK_ELEMENTS",
    "MAX_CHECK_MACS",
    "FunctionalCheck",
    "LayerCheck",
    "VerificationFailed",
    "VerifyResult",
    "bitwise_equal",
    "check_layer",
    "check_work",
    "functional_problems",
    "functional_check",
    "functional_rows",
    "untouched_differences",
    "verify_conversion",
]
