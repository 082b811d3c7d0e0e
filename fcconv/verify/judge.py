"""The one judge: every numerical comparison in fcconv, under a named tolerance rule.

A comparison hands :func:`compare` what it got and what it expected (numpy
arrays or torch tensors, any shape) and the name of a rule; it gets back a
:class:`Comparison`: the largest difference, the scale of the reference the
tolerance is relative to, the tolerance, the tolerance that would have been
needed, and whether it passed. Every tolerance is relative to the reference:
there is no absolute floor, so a model whose outputs are around ``1e-9`` is
judged as sharply as one whose outputs are around 1. A reference too small
for the rule to judge (all zeros, or below the rule's floor) is *not judged*:
the comparison says why and does not pass.

The rules (each chosen by name; :data:`RULES` holds the fixed ones):

``float64-sharp``
    A checkpoint layer run in float64 against Linear-on-every-window:
    ``|conv − reference| ≤ 1e-9 · (|W|·|x| + |b|)`` per element. Float64
    rounding is ``≤ γ_N·(|W|·|x|+|b|)``, about ``1e-12`` of it for the
    largest layers; a wrong order or weight errs by the size of the output.
``rounding-bound``
    The same layer run in its own dtype (u its unit roundoff, N its
    in_features): reported as multiples of ``u·(|W|·|x|+|b|)`` (healthy:
    well under 1), failing only beyond the rigorous bound
    ``2·γ_N·(|W|·|x|+|b|)``, ``γ_N = (N+1)·u / (1 − (N+1)·u)``
    (:func:`rounding_bound`).
``model-float64``
    A whole model's outputs in float64 (a dense map against the original
    head on every window, a stitched map, crops):
    ``|got − expected| ≤ 1e-9 · max|expected|`` per output tensor.
``model-float32``
    The same in float32 (tiles of a map): ``≤ 1e-4 · max|expected|``.
``model-half``
    The same in float16 or bfloat16: ``≤ 1e-2 · max|expected|``.
``runtime-float32``
    A converted model run in its own runtime (Keras, onnxruntime), which
    computes in float32: ``≤ 1e-4 · max|expected|``.

A reference value that is NaN or infinite must be matched by the same kind
(NaN, +inf, −inf) and is left out of the differences; any other NaN in what
was got is a difference of infinite size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

FLOAT64_TINY = 2.2250738585072014e-308
FLOAT32_TINY = 1.1754943508222875e-38


@dataclass(frozen=True)
class Rule:
    """A named tolerance: ``|got − expected| ≤ tolerance · scale``.

    ``scale`` is ``|W|·|x| + |b|`` per element when the caller knows it
    (checkpoint layers), else ``max|expected|`` over the compared tensor.
    ``floor`` is the smallest reference scale the rule can judge: below it
    ``tolerance · scale`` would leave the dtype's normal range.
    """

    name: str
    tolerance: float
    floor: float
    unit: float | None = None
    """The unit roundoff the differences are also reported in (``rounding-bound``)."""


def _rule(name: str, tolerance: float, tiny: float) -> Rule:
    return Rule(name, tolerance, tiny / tolerance)


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        _rule("float64-sharp", 1e-9, FLOAT64_TINY),
        _rule("model-float64", 1e-9, FLOAT64_TINY),
        _rule("model-float32", 1e-4, FLOAT32_TINY),
        _rule("model-half", 1e-2, FLOAT32_TINY),
        _rule("runtime-float32", 1e-4, FLOAT32_TINY),
    )
}
"""The fixed rules by name; ``rounding-bound`` depends on the dtype and N."""


def rounding_bound(eps: float, tiny: float, features: int) -> Rule | None:
    """The ``rounding-bound`` rule of a dtype (machine ``eps``, smallest normal ``tiny``)
    for a dot product of ``features`` terms plus a bias; None when ``(N+1)·u ≥ 1``
    (the bound says nothing: the float64 rule is the only judge).

    >>> rule = rounding_bound(2.0**-52, FLOAT64_TINY, 4000)
    >>> round(rule.tolerance / rule.unit)  # 2·γ_N in units of u
    8002
    """
    unit = eps / 2
    nu = (features + 1) * unit
    if nu >= 1:
        return None
    tolerance = 2 * nu / (1 - nu)
    return Rule("rounding-bound", tolerance, tiny / tolerance, unit)


def rule_named(name: str) -> Rule:
    """One of :data:`RULES`, by name."""
    return RULES[name]


def model_rule(dtype: str) -> str:
    """The rule for a whole model's outputs computed in ``dtype`` (torch's name).

    >>> model_rule("float64"), model_rule("float32"), model_rule("bfloat16")
    ('model-float64', 'model-float32', 'model-half')
    """
    return {"float64": "model-float64", "float32": "model-float32"}.get(dtype, "model-half")


@dataclass(frozen=True)
class Comparison:
    """What one comparison found, under one rule; truthy when it passed.

    ``tolerance`` and ``needed_tolerance`` are relative to the reference
    scale (``needed_tolerance`` is the largest ``|got − expected| / scale``:
    the tolerance that would just have passed). ``judged`` is False when
    the reference was too small for the rule (``reason`` says why); such a
    comparison does not pass.
    """

    rule: str
    max_abs_diff: float
    reference_scale: float
    tolerance: float
    needed_tolerance: float
    judged: bool = True
    reason: str | None = None
    elements: int = 0
    nonfinite: int = 0
    """Reference values that are NaN or infinite (matched by kind, not by size)."""
    nonfinite_mismatches: int = 0
    """Of those, values where what was got is another kind."""
    unit: float | None = None

    @property
    def passed(self) -> bool:
        return (
            self.judged
            and not self.nonfinite_mismatches
            and self.needed_tolerance <= self.tolerance
        )

    def __bool__(self) -> bool:
        return self.passed

    @property
    def identical(self) -> bool:
        """Every value equal (NaN matching NaN): true whatever the rule or the scale."""
        return self.max_abs_diff == 0 and not self.nonfinite_mismatches

    @property
    def ratio(self) -> float:
        """``needed_tolerance / tolerance``: ≤ 1 passes."""
        if self.tolerance > 0:
            return self.needed_tolerance / self.tolerance
        return math.inf if self.needed_tolerance > 0 else 0.0

    @property
    def units(self) -> float | None:
        """The largest difference in units of ``u·scale`` (``rounding-bound`` only)."""
        return None if self.unit is None else self.needed_tolerance / self.unit

    def summary(self) -> str:
        """One line: the difference against the tolerance, or why it was not judged."""
        if not self.judged:
            return f"could not judge ({self.rule}): {self.reason}"
        if self.nonfinite_mismatches:
            return (
                f"{self.nonfinite_mismatches} NaN or infinite value(s) are not the same kind "
                "(NaN, +inf, -inf) as the reference's"
            )
        return (
            f"max |Δ| {self.max_abs_diff:.3g} = {self.needed_tolerance:.3g}× the reference "
            f"scale, tolerance {self.tolerance:.3g}× ({self.rule})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "passed": self.passed,
            "judged": self.judged,
            "reason": self.reason,
            "max_abs_diff": _finite_or_none(self.max_abs_diff),
            "reference_scale": self.reference_scale,
            "tolerance": self.tolerance,
            "needed_tolerance": _finite_or_none(self.needed_tolerance),
            "ratio": _finite_or_none(self.ratio),
            "units_of_u": None if self.units is None else _finite_or_none(self.units),
            "elements": self.elements,
            "nonfinite": self.nonfinite,
            "nonfinite_mismatches": self.nonfinite_mismatches,
        }


def _finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an infinite difference (a NaN where a number was due) is null."""
    return value if math.isfinite(value) else None


def as_float64(values: Any) -> np.ndarray:
    """``values`` (numpy array, torch tensor of any float dtype, scalar) as float64 numpy."""
    import numpy as np

    if hasattr(values, "detach"):  # a torch tensor; bfloat16/float8 widen exactly
        values = values.detach().cpu()
        if values.dtype.is_complex:
            raise TypeError("fcconv judges real values only")
        return values.double().numpy()
    return np.asarray(values, dtype=np.float64)


def compare(
    got: Any,
    expected: Any,
    rule: str | Rule,
    *,
    scale: Any = None,
    where: Any = None,
) -> Comparison:
    """Judge ``got`` against ``expected`` (same shape) under ``rule``.

    Args:
        got: what the thing under test computed.
        expected: the independent reference.
        rule: a :class:`Rule` or the name of one of :data:`RULES`.
        scale: the per-element scale the tolerance is relative to
            (``|W|·|x| + |b|``), broadcastable to ``expected``; default
            ``max|expected|`` over its finite values.
        where: a boolean mask of the elements to judge by size (others are
            left out, e.g. where the scale exceeds the dtype's range);
            non-finite reference values are always judged by kind.

    Returns:
        A :class:`Comparison`. An empty comparison passes (nothing can
        differ); a reference whose scale is below the rule's floor (all
        zeros, say) is not judged.
    """
    import numpy as np

    rule = rule if isinstance(rule, Rule) else rule_named(rule)
    got, expected = as_float64(got), as_float64(expected)
    if got.shape != expected.shape:
        raise ValueError(f"compare needs equal shapes, got {got.shape} and {expected.shape}")
    finite = np.isfinite(expected)
    same_kind = (np.isnan(expected) & np.isnan(got)) | (expected == got)
    nonfinite = int(np.count_nonzero(~finite))
    mismatched = int(np.count_nonzero(~finite & ~same_kind))
    judged = finite if where is None else finite & np.asarray(where, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):  # inf − inf: judged by kind above
        error = np.abs(got - expected)
    error = np.where(judged, np.where(np.isnan(error), np.inf, error), 0.0)
    if scale is None:
        largest = float(np.abs(expected[judged]).max()) if judged.any() else 0.0
        allowed = np.full(expected.shape, largest)
    else:
        allowed = np.broadcast_to(as_float64(scale), expected.shape)
        largest = float(allowed[judged].max()) if judged.any() else 0.0
    max_diff = float(error.max()) if error.size else 0.0
    common = dict(
        rule=rule.name,
        max_abs_diff=max_diff,
        reference_scale=largest,
        tolerance=rule.tolerance,
        elements=int(expected.size),
        nonfinite=nonfinite,
        nonfinite_mismatches=mismatched,
        unit=rule.unit,
    )
    if not judged.any():
        if expected.size and not nonfinite:
            return Comparison(needed_tolerance=0.0, judged=False, reason="nothing left to judge",
                              **common)  # fmt: skip
        return Comparison(needed_tolerance=0.0, **common)
    if not largest >= rule.floor:
        reason = (
            "the reference is all zeros"
            if largest == 0
            else f"the reference's scale {largest:.3g} is below the rule's floor {rule.floor:.3g}"
        )
        return Comparison(needed_tolerance=_needed(error, allowed), judged=False, reason=reason,
                          **common)  # fmt: skip
    return Comparison(needed_tolerance=_needed(error, allowed), **common)


def _needed(error: np.ndarray, allowed: np.ndarray) -> float:
    """The largest ``error / allowed``: 0/0 is 0, anything else over 0 is infinite."""
    import numpy as np

    if not error.size:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, error / np.where(allowed > 0, allowed, 1.0), np.inf)
    ratio = np.where(error == 0, 0.0, ratio)
    return float(ratio.max())


def worst(comparisons: list[Comparison]) -> Comparison | None:
    """The comparison furthest from passing: one not judged, else the largest ratio."""
    if not comparisons:
        return None
    return max(comparisons, key=lambda c: (not c.judged, c.nonfinite_mismatches > 0, c.ratio))


__all__ = [
    "RULES",
    "Comparison",
    "Rule",
    "as_float64",
    "compare",
    "model_rule",
    "rounding_bound",
    "rule_named",
    "worst",
]
