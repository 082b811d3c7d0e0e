"""A ``.pt2`` archive read as data: the strings ``torch.export.load`` would evaluate or resolve.

Loading a ``torch.export`` program is not only unpickling. The archive's
model JSON holds strings that torch turns into code or objects:

* **shape expressions** (``expr_str`` of symbolic sizes, strides and
  arguments) go to ``sympy.sympify``, which ``eval``\\ s them with the
  builtins at hand (``__import__('os').system(...)`` runs);
* **guards** (``guards_code``) are pasted into Python source that
  ``.module()`` ``exec``\\ s and every call runs;
* **node targets** and operator arguments are resolved by attribute
  paths from ``torch``, ``_operator`` and ``math``, and then *called* when
  the program runs (``torch.save``, ``torch.hub.load``...);
* **range constraints** name symbols whose numbers drive loops.

:func:`code_in_program` reads the archive (a zip: nothing in it runs) and
says why a string falls outside a strict grammar: expressions built from
integers, symbol names, arithmetic, comparisons and sympy's and torch's
shape functions; guards over the inputs' sizes; targets in torch's operator
namespaces or the symbolic integer operators. Everything fcconv writes
passes; anything else needs ``--trust-code``.
"""

from __future__ import annotations

import ast
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_MODEL_JSON = 64 << 20
"""A model JSON larger than this (unpacked) is not read."""
MAX_EXPRESSION = 20_000
"""Characters in one expression or guard."""
MAX_DEPTH = 200
"""Nesting of one expression, and of the model JSON."""

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]{1,7}\Z")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}\Z")

OPERATOR_NAMESPACES = frozenset({"aten", "prims", "higher_order"})
"""``torch.ops.<namespace>`` whose operators a program may call."""

SYMBOLIC_OPERATORS = frozenset(
    [f"_operator.{n}" for n in "eq ne le ge lt gt neg pos mul add sub floordiv mod pow".split()]
    + [f"_operator.{n}" for n in "truediv and_ or_ lshift rshift".split()]
    + ["math.trunc"]
    + [f"torch.sym_{n}" for n in "not int float ite max min sqrt".split()]
)
"""The symbolic-integer targets torch serializes outside ``torch.ops`` (its ``_SYM_OPS``)."""

SHAPE_FUNCTIONS = frozenset(
    # sympy's own, as ``srepr`` writes them
    "Symbol Integer Rational Float Add Mul Pow Max Min Abs Eq Ne Lt Le Gt Ge And Or Not "
    "Equality Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan Piecewise "
    "ExprCondPair floor ceiling sqrt "
    # torch.utils._sympy.functions, as the deserializer names them
    "FloorDiv ModularIndexing Where PythonMod Mod CleanDiv CeilToInt FloorToInt CeilDiv "
    "LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv "
    "IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal "
    "ToFloat Identity".split()
)
SHAPE_CONSTANTS = frozenset("true false True False oo zoo nan int_oo".split())
SYMBOL_ASSUMPTIONS = frozenset(
    "positive negative integer real nonnegative nonpositive finite rational zero".split()
)
GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
GUARD_FUNCTIONS = frozenset({"max", "min", "abs"})

_ARITHMETIC = (
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift,
    ast.RShift, ast.BitAnd, ast.BitOr, ast.BitXor,
)  # fmt: skip
_UNARY = (ast.UAdd, ast.USub, ast.Not, ast.Invert)
_COMPARE = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def code_in_program(file: str | Path) -> str | None:
    """Why loading the ``.pt2`` archive ``file`` could run code, or None when it could not.

    Raises nothing: an archive this cannot read is reported as a reason.

    >>> code_in_program("no-such.pt2")
    'it cannot be read as a zip archive'
    """
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError):
        return "it cannot be read as a zip archive"
    with archive:
        infos = archive.infolist()
        models = [i for i in infos if re.fullmatch(r"[^/]+/models/[^/]+\.json", i.filename)]
        if not models:
            return "it holds no models/*.json (an older or foreign archive format)"
        for info in models:
            if info.file_size > MAX_MODEL_JSON:
                return f"{info.filename} declares {info.file_size} bytes"
            reason = _model_reason(archive.read(info), info.filename)
            if reason is not None:
                return reason
    return None


def _model_reason(data: bytes, name: str) -> str | None:
    if json_depth(data) > MAX_DEPTH:
        return f"{name} nests deeper than {MAX_DEPTH} levels"
    try:
        model = json.loads(data)
    except (ValueError, RecursionError):
        return f"{name} is not JSON"
    if not isinstance(model, dict):
        return f"{name} is not a JSON object"
    for where, problem in _problems(model):
        return f"{name}: {where} {problem}"
    return None


def json_depth(data: bytes) -> int:
    """The deepest bracket nesting of JSON text (strings skipped), without parsing it.

    >>> json_depth(b'{"a": [1, "[[[\\"]"]}')
    2
    """
    import numpy as np

    bare = _STRING.sub(b"", data)
    codes = np.frombuffer(bare, dtype=np.uint8)
    if not codes.size:
        return 0
    steps = np.isin(codes, (0x5B, 0x7B)).astype(np.int64) - np.isin(codes, (0x5D, 0x7D))
    return int(max(0, np.cumsum(steps).max()))


def _problems(model: dict[str, Any]) -> Iterator[tuple[str, str]]:
    guards = model.get("guards_code", [])
    if not isinstance(guards, list):
        yield "guards_code", "is not a list"
    for guard in guards if isinstance(guards, list) else []:
        problem = guard_problem(guard)
        if problem:
            yield f"guard {str(guard)[:60]!r}", problem
    ranges = model.get("range_constraints", {})
    if not isinstance(ranges, dict):
        yield "range_constraints", "is not an object"
    for key, value in ranges.items() if isinstance(ranges, dict) else []:
        if not _SYMBOL.match(key):
            yield f"range constraint {key[:60]!r}", "is not a symbol name"
        bounds = (value.get("min_val"), value.get("max_val")) if isinstance(value, dict) else ()
        if not bounds or any(b is not None and type(b) is not int for b in bounds):
            yield f"range constraint {key[:60]!r}", "has bounds that are not integers"
    yield from _walk(model)


def _walk(model: Any) -> Iterator[tuple[str, str]]:
    stack = [model]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
            continue
        if not isinstance(value, dict):
            continue
        for key, item in value.items():
            if key == "expr_str":
                problem = expression_problem(item)
                if problem:
                    yield f"shape expression {str(item)[:60]!r}", problem
            elif key == "as_operator" or (key == "target" and "inputs" in value):
                problem = target_problem(item)
                if problem:
                    yield f"target {str(item)[:60]!r}", problem
            elif key == "source_fn_stack" and isinstance(item, str):
                for entry in item.split(";"):
                    target = entry.rpartition(",")[2]
                    if target and not _dotted_name(target):
                        yield f"source function {target[:60]!r}", "is not a dotted name"
            else:
                stack.append(item)


def _dotted_name(text: str) -> bool:
    parts = text.split(".")
    return all(_IDENTIFIER.match(p) and not p.startswith("__") for p in parts)


def target_problem(target: Any) -> str | None:
    """Why a node target is not one of torch's operators, or None.

    >>> target_problem("torch.ops.aten.conv2d.default") is None
    True
    >>> target_problem("torch.hub.load")
    'is not an operator of torch.ops.aten, prims or higher_order, nor a symbolic operator'
    """
    if not isinstance(target, str):
        return "is not a string"
    if target in SYMBOLIC_OPERATORS:
        return None
    parts = target.split(".")
    if (
        len(parts) in (4, 5)
        and parts[:2] == ["torch", "ops"]
        and parts[2] in OPERATOR_NAMESPACES
        and _dotted_name(target)
    ):
        return None
    return "is not an operator of torch.ops.aten, prims or higher_order, nor a symbolic operator"


def _parsed(text: Any) -> ast.expr | str:
    if not isinstance(text, str):
        return "is not a string"
    if len(text) > MAX_EXPRESSION:
        return f"is longer than {MAX_EXPRESSION} characters"
    if text.count("(") + text.count("[") > MAX_DEPTH * 20:
        return "nests too deep"
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "is not one expression"
    return tree.body


def _depth_ok(node: ast.AST) -> bool:
    stack = [(node, 0)]
    while stack:
        current, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(current))
    return True


def expression_problem(text: Any) -> str | None:
    """Why a shape expression is outside the grammar ``sympify`` may see, or None.

    The grammar: integers and floats, symbol names, arithmetic and
    comparisons, and calls of sympy's and torch's shape functions whose
    arguments are again expressions (``Symbol('s0', positive=True)`` takes a
    symbol name and assumptions).

    >>> expression_problem("Add(FloorDiv(Symbol('s0', integer=True), Integer(2)), Integer(-1))")
    >>> expression_problem("__import__('os')")
    'calls __import__, which is not a shape function'
    """
    tree = _parsed(text)
    if isinstance(tree, str):
        return tree
    if not _depth_ok(tree):
        return "nests too deep"
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Constant):
            if type(node.value) not in (int, float, bool):
                return f"holds the constant {node.value!r}"
        elif isinstance(node, ast.Name):
            if not (_SYMBOL.match(node.id) or node.id in SHAPE_CONSTANTS):
                return f"names {node.id!r}, which is neither a symbol nor a constant"
        elif isinstance(node, ast.BinOp) and isinstance(node.op, _ARITHMETIC):
            stack += [node.left, node.right]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARY):
            stack.append(node.operand)
        elif isinstance(node, ast.Compare) and all(isinstance(o, _COMPARE) for o in node.ops):
            stack += [node.left, *node.comparators]
        elif isinstance(node, ast.BoolOp):
            stack += node.values
        elif isinstance(node, ast.Call):
            problem = _shape_call_problem(node)
            if problem:
                return problem
            if not (isinstance(node.func, ast.Name) and node.func.id == "Symbol"):
                stack += node.args
            stack += [k.value for k in node.keywords]
        else:
            return f"holds {type(node).__name__}, which is not arithmetic"
    return None


def _shape_call_problem(node: ast.Call) -> str | None:
    if not isinstance(node.func, ast.Name):
        return "calls something that is not a shape function"
    name = node.func.id
    if name not in SHAPE_FUNCTIONS:
        return f"calls {name}, which is not a shape function"
    if name == "Symbol":
        ok = (
            len(node.args) == 1
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and _SYMBOL.match(node.args[0].value)
        )
        if not ok:
            return "makes a Symbol whose name is not a symbol name"
    for keyword in node.keywords:
        allowed = name == "Symbol" and keyword.arg in SYMBOL_ASSUMPTIONS
        if not allowed or not isinstance(keyword.value, ast.Constant):
            return f"passes {keyword.arg}= to {name}"
        if type(keyword.value.value) is not bool:
            return f"passes {keyword.arg}= a value that is not True or False"
    return None


def guard_problem(text: Any) -> str | None:
    """Why a guard is not a condition on the inputs' sizes, or None.

    Guards are pasted into Python that ``.module()`` runs: only arithmetic,
    comparisons and ``and``/``or``/``not`` over integers and
    ``L['name'].size()[i]`` (or ``stride()``, ``storage_offset()``...),
    with ``max``/``min``/``abs``, pass.

    >>> guard_problem("1 < 3*max(1, L['x'].size()[3] // 2)")
    >>> guard_problem("__import__('os').system('touch X')")
    'calls something that is not max, min, abs or a size method'
    """
    tree = _parsed(text)
    if isinstance(tree, str):
        return tree
    if not _depth_ok(tree):
        return "nests too deep"
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Constant):
            if type(node.value) not in (int, float, bool):
                return f"holds the constant {node.value!r}"
        elif isinstance(node, ast.BinOp) and isinstance(node.op, _ARITHMETIC):
            stack += [node.left, node.right]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARY):
            stack.append(node.operand)
        elif isinstance(node, ast.Compare) and all(isinstance(o, _COMPARE) for o in node.ops):
            stack += [node.left, *node.comparators]
        elif isinstance(node, ast.BoolOp):
            stack += node.values
        elif isinstance(node, ast.Subscript):
            problem = _subscript_problem(node)
            if problem:
                return problem
            if not (isinstance(node.value, ast.Name) and node.value.id == "L"):
                stack.append(node.value)
        elif isinstance(node, ast.Call) and not node.keywords:
            function = node.func
            if isinstance(function, ast.Name) and function.id in GUARD_FUNCTIONS:
                stack += node.args
            elif (
                isinstance(function, ast.Attribute)
                and function.attr in GUARD_METHODS
                and isinstance(function.value, ast.Subscript)
                and len(node.args) <= 1
            ):
                stack += [function.value, *node.args]
            else:
                return "calls something that is not max, min, abs or a size method"
        else:
            return f"holds {type(node).__name__}, which is not a condition on sizes"
    return None


def _subscript_problem(node: ast.Subscript) -> str | None:
    index = node.slice
    if not isinstance(index, ast.Constant):
        return "indexes with something that is not a constant"
    if isinstance(node.value, ast.Name):
        if node.value.id != "L" or not (
            isinstance(index.value, str) and _IDENTIFIER.match(index.value)
        ):
            return "indexes something that is not an input L['name']"
        return None
    if type(index.value) is not int:
        return "indexes a size with something that is not an integer"
    return None
