"""Every comparison fcconv makes: the one judge, and the checks built on it.

============================  ================================================
module                        what it holds
============================  ================================================
:mod:`~fcconv.verify.judge`    the named tolerance rules and :class:`Comparison`
:mod:`~fcconv.verify.bits`     the one bit-equality (elements as integers)
:mod:`~fcconv.verify.exact`    a converted kernel against the permuted Linear, bit for bit
:mod:`~fcconv.verify.windows`  a conv against Linear-on-every-window (SPEC §4)
:mod:`~fcconv.verify.layers`   both checks per layer; :class:`VerifyResult`
:mod:`~fcconv.verify.untouched` everything else of two checkpoints, bit for bit
:mod:`~fcconv.verify.orders`   which layers are converted, and the order each is judged in
:mod:`~fcconv.verify.runtime`  a converted model in its own runtime (Keras, onnxruntime)
============================  ================================================

The names below are importable from :mod:`fcconv.verify` itself; they load
on first use, so importing a submodule (``fcconv.verify.bits``) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Comparison": "judge",
    "RULES": "judge",
    "Rule": "judge",
    "compare": "judge",
    "rounding_bound": "judge",
    "bitwise_equal": "bits",
    "tensor_bits": "bits",
    "BLOCK_ELEMENTS": "windows",
    "FUNCTIONAL_ELEMENTS": "windows",
    "MAX_CHECK_ELEMENTS": "windows",
    "MAX_CHECK_MACS": "windows",
    "FunctionalCheck": "windows",
    "check_work": "windows",
    "functional_check": "windows",
    "functional_rows": "windows",
    "LayerCheck": "layers",
    "VerificationFailed": "layers",
    "VerifyResult": "layers",
    "check_layer": "layers",
    "verify_conversion": "layers",
    "untouched_differences": "untouched",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fcconv.verify' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fcconv.verify.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_WHERE))


__all__ = sorted(_WHERE)
