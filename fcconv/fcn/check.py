"""Verifying a converted model: the original head on every window, in float64.

The reference cuts the original model into its trunk and its head, runs the
head on every window of the trunk's feature map, and compares; the whole
original model run on native-size crops is compared for information.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn

from fcconv.fcn.analyse import (
    _Analysis,
    _analyze,
    _ancestors,
    _eval_mode,
    _model_dtype_device,
    _size_pair,
)
from fcconv.fcn.results import DenseCheck
from fcconv.geometry import Patch


def _output_size(model: nn.Module, channels: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """The spatial size of ``model``'s output at ``size``, computed on meta tensors."""
    dtype, _ = _model_dtype_device(model)
    state = {name: t.to("meta") for name, t in model.named_parameters()}
    state.update({name: t.to("meta") for name, t in model.named_buffers()})
    probe = torch.empty(1, channels, *size, device="meta", dtype=dtype)
    try:
        out = torch.func.functional_call(model, state, (probe,))
    except Exception:  # a layer without meta support: no stride report, no crops
        return None
    return tuple(out.shape[-2:]) if out.dim() == 4 else None


def _guess(size: tuple[int, int], patch: Patch, stride: tuple[int, int]) -> tuple[int, int]:
    """The window stride of a trunk that divides its input evenly (VGG: 224 → 7)."""
    return (
        stride[0] * (size[0] // patch.height) if size[0] % patch.height == 0 else 0,
        stride[1] * (size[1] // patch.width) if size[1] % patch.width == 0 else 0,
    )


def window_stride(
    model: nn.Module,
    input_size: Sequence[int],
    in_channels: int,
    guess: Sequence[int] | None = None,
) -> tuple[int, int] | None:
    """How many input pixels apart the windows of a converted model's cells lie.

    Found by growing the input until the output map gains a row (a column),
    then another: the distance between the two jumps. ``None`` when the map
    does not grow (e.g. a global pool) or a layer cannot run on meta tensors.
    A ``guess`` (per axis) is confirmed with four probes instead of a search.

    >>> from torch import nn
    >>> window_stride(nn.Conv2d(3, 4, 8, stride=4), (8, 8), 3)
    (4, 4)
    """
    native = _size_pair(tuple(input_size), "input_size")
    base = _output_size(model, in_channels, native)
    if base is None:
        return None
    result = []
    for axis in (0, 1):

        def cells(extra: int, axis: int = axis) -> int:
            size = list(native)
            size[axis] += extra
            out = _output_size(model, in_channels, (size[0], size[1]))
            return -1 if out is None else out[axis]

        limit = 8 * native[axis]

        def first_reaching(count: int, cells=cells, limit=limit) -> int | None:
            low, high = 1, limit
            if cells(high) < count:
                return None
            while low < high:
                middle = (low + high) // 2
                if cells(middle) >= count:
                    high = middle
                else:
                    low = middle + 1
            return low

        if guess is not None and guess[axis] > 0:
            g = guess[axis]
            if (
                cells(g - 1) == base[axis]
                and cells(g) == base[axis] + 1
                and cells(2 * g - 1) == base[axis] + 1
                and cells(2 * g) == base[axis] + 2
            ):
                result.append(g)
                continue
        one = first_reaching(base[axis] + 1)
        two = first_reaching(base[axis] + 2) if one is not None else None
        if one is None or two is None:
            return None
        result.append(two - one)
    return result[0], result[1]


def _split(an: _Analysis) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The trunk (input → feature map, identity pools bypassed) and the original head."""
    gm = an.gm
    keep = _ancestors(an.source) | {an.source}
    trunk_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    pools = set(an.pools)
    for node in gm.graph.nodes:
        if node not in keep:
            continue
        if node in pools:
            env[node] = env[node.args[0]]
            continue
        env[node] = trunk_graph.node_copy(node, lambda n: env[n])
    trunk_graph.output(env[an.source])
    head_graph = fx.Graph()
    head_env = {an.source: head_graph.placeholder("features")}
    for node in gm.graph.nodes:
        if node in keep or node.op == "placeholder":
            continue
        if node.op != "get_attr" and not all(n in head_env for n in node.all_input_nodes):
            continue
        head_env[node] = head_graph.node_copy(node, lambda n: head_env[n])
    trunk = fx.GraphModule(gm, trunk_graph, "Trunk")
    head = fx.GraphModule(gm, head_graph, "Head")
    return trunk, head


def _windows(
    features: torch.Tensor, patch: Patch, stride: tuple[int, int]
) -> tuple[torch.Tensor, int, int]:
    """Every ``kh × kw`` window of ``features``, batched: ``[B·P·Q, C, kh, kw]``."""
    batch, channels, height, width = features.shape
    rows = (height - patch.height) // stride[0] + 1
    cols = (width - patch.width) // stride[1] + 1
    cells = [
        features[
            :,
            :,
            p * stride[0] : p * stride[0] + patch.height,
            q * stride[1] : q * stride[1] + patch.width,
        ]
        for p in range(rows)
        for q in range(cols)
    ]
    stacked = torch.stack(cells, dim=1)
    return stacked.reshape(batch * rows * cols, channels, patch.height, patch.width), rows, cols


def head_on_windows(
    original: nn.Module,
    input_size: Sequence[int] | int,
    x: torch.Tensor,
    *,
    stride: Sequence[int] | int = 1,
    layers: Sequence[str] | None = None,
    in_channels: int | None = None,
) -> torch.Tensor:
    """The reference for a converted model: the original head on every window.

    Runs the original trunk (adaptive pools that are the identity at the
    native size bypassed) on ``x``, cuts every ``kh × kw`` window of its
    feature map at ``stride``, and applies the original head (permute,
    flatten, Linear, …) to each, in eval mode and without gradients.

    Returns:
        ``[B, O, P, Q]``: cell ``(p, q)`` is the head on window ``(p, q)``.
    """
    step = _size_pair(stride, "stride")
    with torch.no_grad(), _eval_mode(original):
        an = _analyze(original, input_size, layers, in_channels)
        trunk, head = _split(an)
        windows, rows, cols = _windows(trunk(x), an.patch, step)
        scores = head(windows)
    return scores.reshape(x.shape[0], rows, cols, -1).permute(0, 3, 1, 2)


def _padding_layers(trunk: fx.GraphModule) -> list[str]:
    found = []
    for name, module in trunk.named_modules():
        padding = getattr(module, "padding", 0)
        if isinstance(
            module,
            (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd),
        ):
            flat = (padding,) if isinstance(padding, (int, str)) else tuple(padding)
            if any(p not in (0, "valid") for p in flat):
                found.append(name)
    return found


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def verify_dense(
    original: nn.Module,
    converted: nn.Module,
    input_size: Sequence[int] | int,
    larger_size: Sequence[int] | int | None = None,
    *,
    stride: Sequence[int] | int | None = None,
    layers: Sequence[str] | None = None,
    in_channels: int | None = None,
    batch: int = 2,
    seed: int = 0,
    max_crops: int = 16,
    rtol: float = 1e-9,
) -> DenseCheck:
    """Prove ``converted`` computes the original head on every window, in float64.

    1. At ``input_size`` its output ``[B, O, 1, 1]`` equals the original's ``[B, O]``.
    2. At ``larger_size`` (default: one window step larger each way, a 2×2
       map) every cell equals the original head applied to the matching
       window of the trunk's feature map (:func:`head_on_windows`).

    Both within ``rtol · max(1, max|reference|)``: float64 rounding is far
    below that, a wrong order or weight is of the size of the output. Then,
    for information, the whole original model is run on up to ``max_crops``
    native-size crops at the window positions; a trunk that pads differs
    there, and the result says so in words.

    Args:
        original: the model before conversion (copied, never modified).
        converted: the model under test, e.g. from :func:`convolutionalize`.
        input_size: the native ``(H, W)``.
        larger_size: the larger ``(H, W)`` for the dense check.
        stride: the first conv's stride in feature-map cells; default: the one
            recorded by :func:`convolutionalize`, else 1.
        layers: as for :func:`convolutionalize`.
        in_channels: as for :func:`convolutionalize`.
        batch: inputs per check.
        seed: for the random inputs.
        max_crops: at most this many whole-model crops are run.
        rtol: the relative tolerance of the float64 judge.

    Returns:
        A :class:`DenseCheck`, truthy on pass.
    """
    native = _size_pair(input_size, "input_size")
    recorded = (
        getattr(converted, "meta", {}).get("fcconv", {}) if hasattr(converted, "meta") else {}
    )
    step = _size_pair(
        stride if stride is not None else tuple(recorded.get("stride", (1, 1))), "stride"
    )
    reference = copy.deepcopy(original).double().eval()
    candidate = copy.deepcopy(converted).double().eval()
    an = _analyze(reference, native, layers, in_channels or recorded.get("in_channels"))
    channels = an.in_channels
    trunk, head = _split(an)
    spacing = window_stride(candidate, native, channels, _guess(native, an.patch, step))
    if larger_size is None:
        grow = spacing if spacing is not None else native
        larger = (native[0] + grow[0], native[1] + grow[1])
    else:
        larger = _size_pair(larger_size, "larger_size")
    generator = torch.Generator().manual_seed(seed)
    problems: list[str] = []
    check = DenseCheck(
        native_size=native,
        larger_size=larger,
        map_size=None,
        native_max_abs_diff=None,
        dense_max_abs_diff=None,
        tolerance=0.0,
        window_stride=spacing,
        problems=problems,
    )
    with torch.no_grad():
        x = torch.randn(batch, channels, *native, generator=generator, dtype=torch.float64)
        expected = reference(x)
        got = candidate(x)
        tolerance = rtol * max(1.0, float(expected.abs().max()))
        if got.shape != (*expected.shape, 1, 1):
            problems.append(
                f"at the native size {native[0]}x{native[1]} the converted model gives "
                f"shape {tuple(got.shape)}, expected {(*expected.shape, 1, 1)}"
            )
        else:
            check.native_max_abs_diff = _max_abs(got.flatten(1), expected)
            if check.native_max_abs_diff > tolerance:
                problems.append(
                    f"at the native size the outputs differ by up to "
                    f"{check.native_max_abs_diff:.3g} (tolerance {tolerance:.3g})"
                )
        big = torch.randn(batch, channels, *larger, generator=generator, dtype=torch.float64)
        dense = candidate(big)
        features = trunk(big)
        windows, rows, cols = _windows(features, an.patch, step)
        wanted = head(windows).reshape(batch, rows, cols, -1).permute(0, 3, 1, 2)
        tolerance = max(tolerance, rtol * max(1.0, float(wanted.abs().max())))
        check.tolerance = tolerance
        check.map_size = (rows, cols)
        if dense.shape != wanted.shape:
            problems.append(
                f"at {larger[0]}x{larger[1]} the converted model gives a map of shape "
                f"{tuple(dense.shape)}, but the trunk's {features.shape[-2]}x"
                f"{features.shape[-1]} feature map holds {rows}x{cols} windows "
                f"(expected {tuple(wanted.shape)})"
            )
        else:
            check.dense_max_abs_diff = _max_abs(dense, wanted)
            if check.dense_max_abs_diff > tolerance:
                problems.append(
                    f"at {larger[0]}x{larger[1]} the map differs from the original head "
                    f"on each window by up to {check.dense_max_abs_diff:.3g} "
                    f"(tolerance {tolerance:.3g})"
                )
            _compare_crops(check, reference, big, dense, native, spacing, max_crops, trunk)
    return check


def _compare_crops(
    check: DenseCheck,
    reference: nn.Module,
    big: torch.Tensor,
    dense: torch.Tensor,
    native: tuple[int, int],
    spacing: tuple[int, int] | None,
    max_crops: int,
    trunk: fx.GraphModule,
) -> None:
    if spacing is None:
        check.crop_note = (
            "the whole original model was not run on crops: the map does not grow with "
            "the input (a global pool, see the notes) or the distance between windows "
            "could not be determined"
        )
        return
    height, width = big.shape[-2:]
    cells = [
        (p, q)
        for p in range(dense.shape[2])
        for q in range(dense.shape[3])
        if p * spacing[0] + native[0] <= height and q * spacing[1] + native[1] <= width
    ][:max_crops]
    if not cells:
        return
    crops = torch.cat(
        [
            big[
                :,
                :,
                p * spacing[0] : p * spacing[0] + native[0],
                q * spacing[1] : q * spacing[1] + native[1],
            ]
            for p, q in cells
        ]
    )
    scores = reference(crops).reshape(len(cells), big.shape[0], -1)
    expected = torch.stack([dense[:, :, p, q] for p, q in cells])
    check.crops_compared = len(cells)
    check.crop_max_abs_diff = _max_abs(scores, expected)
    where = (
        f"running the whole original model on each {native[0]}x{native[1]} crop "
        f"(windows {spacing[0]}x{spacing[1]} pixels apart)"
    )
    if check.crop_max_abs_diff <= check.tolerance:
        check.crop_note = f"{where} gives the same scores as the dense map"
        return
    padded = _padding_layers(trunk)
    if padded:
        shown = ", ".join(padded[:3]) + (", …" if len(padded) > 3 else "")
        check.crop_note = (
            f"{where} differs from the dense map by up to {check.crop_max_abs_diff:.3g}, "
            f"as expected: the trunk pads ({shown}), so a crop sees zeros at its own "
            "borders where the whole input has real pixels, and the cells near each "
            "crop's border differ; the dense map is the original head on every window "
            "of the whole input's feature map, as verified above"
        )
    else:
        check.crop_note = (
            f"{where} differs from the dense map by up to {check.crop_max_abs_diff:.3g}; "
            "the trunk does not pad, so a layer whose output depends on the input size "
            "(or pooling that does not align with the window stride) makes crops see "
            "other feature maps than the whole input"
        )
