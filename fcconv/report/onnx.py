"""An ONNX graph made fully convolutional, for people: the head before and after, the checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fcconv.report.console import size, table, text

if TYPE_CHECKING:
    from rich.console import Console

    from fcconv.api.onnx import OnnxConvolutionalizeResult, OnnxVerifyResult


def render_onnx_convolutionalize(console: Console, result: OnnxConvolutionalizeResult) -> None:
    """The graph's facts, its linear layers as they became, the onnxruntime check."""
    patch, check, where = result.patch, result.check, result.coordinates
    facts = [
        ("model", result.model),
        ("native input", size(result.input_size)),
        ("feature map / patch", f"{patch.describe()} ({patch})"),
        ("order", f"{result.order} (from the model: {result.order_from})"),
        ("stride", f"{size(result.stride)} feature-map cells"),
    ]
    for index, layer in enumerate(result.layers):
        weight = f" [{'×'.join(map(str, layer['weight']))}]" if layer["weight"] else ""
        facts.append((f"layer {index + 1}", f"{layer['was']}{weight} → {layer['now']}"))
    console.print(table(text(f"fcconv convolutionalize {result.model}"), facts))
    rows = [("check", check.summary())]
    if where is not None:
        rows.append(
            (
                "coordinates",
                f"cell (p, q) looks at rows {where.offset[0]}+{where.stride[0]}p … and columns "
                f"{where.offset[1]}+{where.stride[1]}q …, a {size(where.window)} window",
            )
        )
        if where.crops_compared:
            rows.append(
                (
                    "whole model on crops",
                    f"{where.crop_exact} of {where.crops_compared} cells equal the original "
                    f"model on their crop (max |Δ| {where.crop_max_abs_diff:.3g})",
                )
            )
        if where.note:
            rows.append(("note", where.note))
    for problem in check.problems:
        rows.append(("difference", problem))
    console.print(table(text("verification (onnxruntime, float32)"), rows))
    if result.written:
        console.print(text(f"wrote {result.output} (ONNX, dynamic batch, height and width)"))
    else:
        console.print(text(("nothing written", "red"), ": the dense graph failed verification"))


def render_onnx_verification(console: Console, result: OnnxVerifyResult) -> None:
    """The verdict of a dense ONNX graph against its original, in one table."""
    verdict = ("equivalent", "green") if result else ("NOT equivalent", "red")
    rows = [
        ("feature map / patch", f"{result.patch}, order {result.order}"),
        ("stride", f"{size(result.stride)} feature-map cells"),
        ("check", result.check.summary()),
    ]
    rows += [("difference", problem) for problem in result.check.problems]
    console.print(table(text(f"{result.converted} vs {result.original}: ", verdict), rows))


def head_lines(head: dict[str, Any] | None) -> list[str]:
    """What ``inspect`` read of a Keras or ONNX model's head, one fact a line."""
    if head is None:
        return []
    if not head.get("found"):
        order = f" (order {head['order']}, {head['order_from']})" if "order" in head else ""
        return [f"head: none to rewrite{order}: {head.get('reason', '')}"]
    lines = [f"head: reads {head.get('feeder')}'s map{_map(head)}"]
    steps = [*head.get("removed", []), *head.get("permute", [])]
    flatten = head.get("pool") or head.get("flatten")
    if flatten:
        steps.append(str(head.get("flatten")))
    if steps:
        lines.append(f"  through: {' → '.join(dict.fromkeys(steps))}")
    lines.append(
        f"  order: {head.get('order')} (from the {'graph' if 'nodes' in head else 'config'}: "
        f"{head.get('order_detail')})"
    )
    linears = head.get("dense") or head.get("linears") or []
    lines.append(f"  linear layers: {', '.join(map(str, linears))}")
    lines.append(f"  outputs: {', '.join(map(str, head.get('outputs', [])))}")
    return lines


def _map(head: dict[str, Any]) -> str:
    feature_map = head.get("feature_map")
    layout = head.get("layout")
    if feature_map is None:
        return ""
    return f", a {feature_map} feature map" + (f" ({layout})" if layout else "")
