"""Denser maps (``--output-stride``) against references that never use fcconv's code.

The test models keep their trunk and head apart (``model.trunk``,
``model.head``), so the reference is plain PyTorch:

- *every cell*: run ``k`` of a map at stride ``S`` reads
  ``x[k·S : k·S + n − (f−1)·S]`` along each axis (``f`` = trunk stride / S);
  cell ``j`` is cell ``j // f`` of run ``j % f``: ``model.head`` on that
  window of ``model.trunk(run)``, in float64;
- *where a cell lies*: nudge one input pixel at a time and see which cells move;
- *which cells equal the model on their crop*: run the model on every crop.

Hypothesis draws 2-D trunks of convs (kernel, stride, padding per axis), max and
average pools (``ceil_mode``), the native size and the output stride.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from fcconv.errors import FcconvError, SpecError
from fcconv.fcn import convolutionalize_detailed, measure_cost, verify_dense, with_output_stride
from fcconv.fcn.stride import interleave, verify_output_stride

CHANNELS = 2

pair = st.tuples(st.integers(1, 3), st.integers(1, 3))
conv = st.tuples(
    st.just("conv"), pair, st.tuples(st.integers(1, 2), st.integers(1, 2)), st.integers(0, 1)
)
pool = st.tuples(
    st.sampled_from(["max", "avg"]),
    st.tuples(st.integers(1, 2), st.integers(1, 2)),
    st.tuples(st.integers(1, 2), st.integers(1, 2)),
    st.booleans(),
)
trunks = st.lists(st.one_of(conv, pool), min_size=1, max_size=3)


class Net(nn.Module):
    """``trunk`` (drawn layers, each with tanh) then ``head`` (flatten, Linear, tanh, Linear)."""

    def __init__(self, spec: list[tuple], native: tuple[int, int], pools: str | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        for kind, kernel, stride, extra in spec:
            if kind == "conv":
                layers.append(nn.Conv2d(CHANNELS, CHANNELS, kernel, stride, padding=extra))
            else:
                kind = pools or kind
                if kind == "max":
                    layers.append(nn.MaxPool2d(kernel, stride, ceil_mode=extra))
                else:
                    layers.append(nn.AvgPool2d(kernel, stride, ceil_mode=extra))
            layers.append(nn.Tanh())
        self.trunk = nn.Sequential(*layers)
        with torch.no_grad():
            features = self.trunk(torch.zeros(1, CHANNELS, *native))
        if features.shape[-1] < 1 or features.shape[-2] < 1:
            raise RuntimeError("the trunk leaves nothing of this input")
        self.features = tuple(features.shape[-2:])
        width = CHANNELS * math.prod(self.features)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def build(spec, native, pools=None) -> Net:
    try:
        model = Net(spec, native, pools)
    except RuntimeError:
        assume(False)
    generator = torch.Generator().manual_seed(sum(native) + 7 * len(spec))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


def reads_its_input(model: nn.Module, native: tuple[int, int]) -> bool:
    """Whether the output at the native size depends on the input at all.

    A trunk can read only its own padding (1×1 convs at stride 2, padded, on a
    1-pixel map): its output then ignores the input, and every cell equals every
    crop whatever the crop account says; such models are left out.
    """
    x = torch.randn(1, CHANNELS, *native, dtype=torch.float64, generator=torch.Generator())
    x.requires_grad_(True)
    model(x).square().sum().backward()
    return bool(x.grad.any())


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def runs_of(x: torch.Tensor, step, phases, native):
    """``{(kh, kw): run}``: the tail from ``(kh·Sh, kw·Sw)``; runs shorter than native left out."""
    n_h, n_w = x.shape[-2:]
    (s_h, s_w), (f_h, f_w) = step, phases
    return {
        (kh, kw): x[..., kh * s_h :, kw * s_w :]
        for kh in range(f_h)
        for kw in range(f_w)
        if n_h - kh * s_h >= native[0] and n_w - kw * s_w >= native[1]
    }


def reference_map(model: Net, x: torch.Tensor, step, phases, native) -> torch.Tensor:
    """The original head on every window of the trunk of every tail run, cell by cell.

    Cell ``j`` along an axis is cell ``j // f`` of run ``j % f``; the map ends
    before the first place no run fills.
    """
    (f_h, f_w), (k_h, k_w) = phases, model.features
    features = {shift: model.trunk(run) for shift, run in runs_of(x, step, phases, native).items()}
    counts = {shift: tuple(n - k + 1 for n, k in zip(f.shape[-2:], (k_h, k_w), strict=True))
              for shift, f in features.items()}  # fmt: skip
    # the map ends before the first place no run fills (usually: every cell of every run)
    rows = min(f_h * (counts[k, 0][0] if (k, 0) in counts else 0) + k for k in range(f_h))
    columns = min(f_w * (counts[0, k][1] if (0, k) in counts else 0) + k for k in range(f_w))
    out = torch.empty(x.shape[0], 3, rows, columns, dtype=x.dtype)
    for j_h in range(rows):
        for j_w in range(columns):
            i_h, i_w = j_h // f_h, j_w // f_w
            window = features[j_h % f_h, j_w % f_w][..., i_h : i_h + k_h, i_w : i_w + k_w]
            out[:, :, j_h, j_w] = model.head(window)
    return out


FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stitched(model: Net, native, data) -> tuple:
    conversion = convolutionalize_detailed(model, native, in_channels=CHANNELS)
    coarse = conversion.outputs[0].cells.stride
    step = tuple(data.draw(st.sampled_from(divisors(m)), label=f"S of {m}") for m in coarse)
    return with_output_stride(conversion, step), coarse, step


@FAST
@given(
    spec=trunks,
    native=st.tuples(st.integers(4, 12), st.integers(4, 12)),
    extra=st.tuples(st.integers(0, 9), st.integers(0, 9)),
    data=st.data(),
)
def test_every_cell_is_the_original_head_on_its_window_of_a_shifted_run(
    spec, native, extra, data
) -> None:
    model = build(spec, native).double()
    finer, coarse, step = stitched(model, native, data)
    phases = tuple(m // s for m, s in zip(coarse, step, strict=False))
    assert finer.phases == phases and finer.output_stride == step
    size = tuple(
        n + (f - 1) * s + e for n, f, s, e in zip(native, phases, step, extra, strict=False)
    )
    x = torch.randn(2, CHANNELS, *size, dtype=torch.float64, generator=torch.Generator())
    with torch.no_grad():
        got = finer.model(x)
        want = reference_map(model, x, step, phases, native)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@FAST
@given(
    spec=trunks,
    native=st.tuples(st.integers(4, 10), st.integers(4, 10)),
    data=st.data(),
)
def test_cell_boxes_are_the_pixels_that_move_each_cell(spec, native, data) -> None:
    model = build(spec, native, pools="avg").double()  # every pixel of a window counts
    finer, _, step = stitched(model, native, data)
    cells, phases = finer.outputs[0].cells, finer.phases
    size = tuple(n + (f - 1) * s + 3 for n, f, s in zip(native, phases, step, strict=False))
    x = torch.randn(1, CHANNELS, *size, dtype=torch.float64, generator=torch.Generator())
    pixels = size[0] * size[1]
    nudged = x.repeat(pixels + 1, 1, 1, 1)
    nudged[1:] += torch.eye(pixels, dtype=x.dtype).reshape(pixels, 1, *size)
    with torch.no_grad():
        out = finer.model(nudged)
    moved = (out[1:] != out[:1]).any(dim=1).reshape(*size, *out.shape[-2:])
    run_length = tuple(n - (f - 1) * s for n, f, s in zip(size, phases, step, strict=False))
    for p in range(out.shape[-2]):
        for q in range(out.shape[-1]):
            rows, columns = torch.nonzero(moved[:, :, p, q], as_tuple=True)
            assert rows.numel(), f"cell {(p, q)} moves with no pixel"
            (top, bottom), (left, right) = cells.box(p, q)
            assert top <= int(rows.min()) and int(rows.max()) < bottom, (p, q)
            assert left <= int(columns.min()) and int(columns.max()) < right, (p, q)
            starts = ((p % phases[0]) * step[0], (q % phases[1]) * step[1])
            inside = all(
                lo >= s and hi <= s + n
                for (lo, hi), s, n in zip(cells.box(p, q), starts, run_length, strict=False)
            )
            if inside:  # a box within its run's input: every pixel of it moves the cell
                assert (int(rows.min()), int(rows.max()) + 1) == (top, bottom), (p, q)
                assert (int(columns.min()), int(columns.max()) + 1) == (left, right), (p, q)


@FAST
@given(
    spec=trunks,
    native=st.tuples(st.integers(4, 10), st.integers(4, 10)),
    steps=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    data=st.data(),
)
def test_the_crop_account_names_exactly_the_cells_that_equal_their_crop(
    spec, native, steps, data
) -> None:
    from fcconv.fcn.check import exact_along

    model = build(spec, native, pools="avg").double()
    assume(reads_its_input(model, native))
    finer, coarse, step = stitched(model, native, data)
    phases, plan = finer.phases, finer.crop_plan
    # run 0 a whole number of coarse steps (plus the drawn extra) past the native size
    extra = tuple(
        data.draw(st.integers(0, s * (f - 1)), label="extra")
        for s, f in zip(step, phases, strict=True)
    )
    size = tuple(n + t * m + e for n, t, m, e in zip(native, steps, coarse, extra, strict=True))
    x = torch.randn(1, CHANNELS, *size, dtype=torch.float64, generator=torch.Generator())
    with torch.no_grad():
        out = finer.model(x)
    for p in range(out.shape[-2]):
        for q in range(out.shape[-1]):
            predicted = all(
                exact_along(plan, axis, index, native[axis], size[axis], step[axis], phases[axis])
                for axis, index in enumerate((p, q))
            )
            top, left = p * step[0], q * step[1]
            if top + native[0] > size[0] or left + native[1] > size[1]:
                assert not predicted, (p, q)  # no crop to equal
                continue
            with torch.no_grad():
                crop = model(x[..., top : top + native[0], left : left + native[1]])
            equal = bool(torch.allclose(out[:, :, p, q], crop, rtol=0, atol=1e-12))
            # a run (the tail from k·S) a whole number of coarse steps past the native
            # size has no floor slack at its end: there the account is exact both ways
            no_slack = all(
                (n - (j % f) * s - w) % m == 0
                for j, n, f, s, w, m in zip((p, q), size, phases, step, native, coarse, strict=True)
            )
            if no_slack:
                assert predicted == equal, (p, q, predicted, equal)
            else:
                assert equal or not predicted, (p, q, predicted, equal)


def test_interleave_puts_cell_i_of_run_k_at_k_plus_f_times_i() -> None:
    runs = torch.arange(2 * 3 * 1 * 2 * 4).reshape(6, 1, 2, 4)  # 2×3 runs, batch 1, map 2×4
    merged = interleave(runs, (2, 3), (2, 3))
    assert merged.shape == (1, 1, 4, 12)
    for k_h in range(2):
        for k_w in range(3):
            run = runs[k_h * 3 + k_w]
            for i_h in range(2):
                for i_w in range(4):
                    assert merged[0, 0, k_h + 2 * i_h, k_w + 3 * i_w] == run[0, i_h, i_w]


def _tiny() -> nn.Module:
    """Conv(1 → 2, 2×2, stride 2), Linear(8 → 3) at 4×4: FLOPs easy to count by hand."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_cost_counts_flops_by_hand_and_lists_the_three_paths() -> None:
    model = _tiny()
    coarse = convolutionalize_detailed(model, (4, 4))
    finer = with_output_stride(coarse, 1)
    cost = measure_cost(
        model, coarse.model, finer.model, finer.layout, (6, 6), (1, 1), (2, 3), repeats=1
    )
    stitched_row, coarse_row, crops_row = cost.rows
    # runs on the tails 6×6, 6×5, 5×6, 5×5: conv 9 + 6 + 6 + 4 outputs × 2·(1·2·2·2),
    # head 4 + 2 + 2 + 1 outputs × 2·(8·3): a cell for each of the 3×3 windows
    assert stitched_row.flops == 25 * 16 + 9 * 48 and stitched_row.cells == 9
    # one run on 6×6: conv 3×3 outputs, head 2×2 outputs
    assert coarse_row.flops == 9 * 16 + 4 * 48 and coarse_row.cells == 4
    # 9 crops of 4×4 at stride 1, each conv 2×2 outputs + Linear(8 → 3)
    assert crops_row.flops == 9 * (4 * 16 + 48) and crops_row.cells == 9
    document = cost.to_dict()
    assert document["rows"][0]["flops_ratio"] == 1.0
    assert document["rows"][2]["flops_ratio"] == pytest.approx(9 * 112 / (25 * 16 + 9 * 48))
    assert all(row["seconds"] > 0 for row in document["rows"])


def test_verification_catches_a_wrong_interleave() -> None:
    model = _tiny()
    finer = with_output_stride(convolutionalize_detailed(model, (4, 4)), 1)
    finer.model.phases = (2, 2)
    finer.model.map_axes = [(3, 2)]  # rows and columns swapped in the stitching
    check = verify_output_stride(model, finer.model, (4, 4), (8, 7))
    assert not check and check.problems
    assert check.to_dict()["passed"] is False


def test_verification_figures_of_a_good_stitch() -> None:
    model = _tiny()
    finer = with_output_stride(convolutionalize_detailed(model, (4, 4)), 1)
    check = verify_dense(model, finer.model, 4)  # hands a stitched map to verify_output_stride
    assert check, check.problems
    facts = check.to_dict()
    assert facts["method"] == "shift-and-stitch" and facts["runs"] == 4
    assert facts["smallest_size"] == [4, 4] and facts["larger_size"] == [8, 8]
    assert facts["dense_max_abs_diff"] < 1e-12 and facts["smallest_max_abs_diff"] < 1e-12
    assert facts["crops"]["crop_exact"] == facts["crops"]["cells"]  # no padding anywhere


@pytest.mark.parametrize(
    ("step", "problem"),
    [(3, "must divide the trunk's stride 2x2"), ((1, 1, 1), "does not fit a 2-D map"), (0, "")],
)
def test_bad_output_strides_are_refused(step, problem: str) -> None:
    conversion = convolutionalize_detailed(_tiny(), (4, 4))
    with pytest.raises(SpecError) as caught:
        with_output_stride(conversion, step)
    assert problem in str(caught.value) and "output_stride=" in str(caught.value)


def test_the_trunk_stride_itself_keeps_the_model() -> None:
    conversion = convolutionalize_detailed(_tiny(), (4, 4))
    same = with_output_stride(conversion, 2)
    assert same.model is conversion.model and same.phases == (1, 1)
    assert same.model.meta["fcconv"]["output_stride"] == [2, 2]


# ------------------------------------------------------------------ files


def test_cli_refuses_stride_with_output_stride_and_onnx_inputs(invoke, samples, tmp_path) -> None:
    both = invoke(
        "convolutionalize",
        samples / "blob_net.safetensors",
        "--arch",
        "fcconv.samples_models:blob_net",
        "--input",
        "96x96",
        "-o",
        tmp_path / "x.pt2",
        "--stride",
        "2",
        "--output-stride",
        "8",
        exit=2,
    )
    assert "--stride" in both.stderr and "--output-stride" in both.stderr
    assert len(both.stderr.strip().splitlines()) == 1
    onnx = invoke(
        "convolutionalize", samples / "tiny_cnn.onnx", "-o", tmp_path / "x.onnx",
        "--output-stride", "2", exit=2,
    )  # fmt: skip
    assert "leave out --output-stride" in onnx.stderr
    bad = invoke(
        "convolutionalize",
        samples / "blob_net.safetensors",
        "--arch",
        "fcconv.samples_models:blob_net",
        "--input",
        "96x96",
        "-o",
        tmp_path / "x.pt2",
        "--output-stride",
        "12",
        exit=2,
    )
    assert "must divide the trunk's stride 32x32" in bad.stderr and "--output-stride" in bad.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_written_program_is_the_stitched_map_at_any_size(invoke, samples, tmp_path) -> None:
    target = tmp_path / "blobs_s16.pt2"
    result = invoke(
        "convolutionalize",
        samples / "blob_net.safetensors",
        "--arch",
        "fcconv.samples_models:blob_net",
        "--input",
        "96x96",
        "-o",
        target,
        "--output-stride",
        "16",
        "--json",
    )
    document = json.loads(result.stdout)
    assert document["conversion"]["outputs"][0]["cells"]["stride"] == [16, 16]
    assert document["verification"]["passed"] and document["verification"]["runs"] == 4
    # 160x160: the padded trunk's 3 cells on each tail run (160 and 144 long) per axis
    assert [row["cells"] for row in document["cost"]["rows"]][:2] == [36, 9]
    assert document["export"]["ranges"]["height"][0] == 96
    extra = {"fcconv.json": ""}
    program = torch.export.load(target, extra_files=extra).module()
    facts = json.loads(extra["fcconv.json"])
    assert facts["output_stride"] == [16, 16] and facts["phases"] == [2, 2]
    from fcconv.samples_models import blob_net

    finer = with_output_stride(convolutionalize_detailed(blob_net(), (96, 96)), 16)
    for size in ((112, 112), (130, 171)):
        x = torch.rand(1, 3, *size)
        torch.testing.assert_close(program(x), finer.model(x))


def test_errors_name_the_output_stride_parameter() -> None:
    error = SpecError("choose one with {output_stride}")
    assert str(error).endswith("output_stride=")
    assert isinstance(error, FcconvError)


def test_python_convolutionalize_takes_an_output_stride() -> None:
    import fcconv
    from fcconv.fcn import StitchedMap

    model = _tiny()
    finer = fcconv.convolutionalize(model, (4, 4), output_stride=1)
    assert isinstance(finer, StitchedMap) and finer.phases == (2, 2)
    x = torch.randn(1, 1, 9, 7)
    with torch.no_grad():
        got = finer(x)
        want = reference_map_sequential(model, x)
    torch.testing.assert_close(got, want)
    assert fcconv.verify_dense(model, finer, (4, 4))


def reference_map_sequential(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The stride-1 map of ``_tiny`` by its definition: runs of one length, cell by cell."""
    rows, columns = x.shape[-2] - 1, x.shape[-1] - 1  # each run drops one pixel per axis
    cells = [[None] * ((columns - 4) // 2 + 1) * 2 for _ in range(((rows - 4) // 2 + 1) * 2)]
    for j_h in range(len(cells)):
        for j_w in range(len(cells[0])):
            k_h, i_h, k_w, i_w = j_h % 2, j_h // 2, j_w % 2, j_w // 2
            run = x[..., k_h : k_h + rows, k_w : k_w + columns]
            cells[j_h][j_w] = model(run[..., 2 * i_h : 2 * i_h + 4, 2 * i_w : 2 * i_w + 4])
    return torch.stack([torch.stack(row, -1) for row in cells], -2)


def test_one_dimensional_and_two_headed_models_stitch_every_output() -> None:
    from fcconv.samples_models import detector_stage

    class Audio(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.conv, self.fc = nn.Conv1d(1, 3, 5, stride=2), nn.Linear(3 * 6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(nn.functional.max_pool1d(self.conv(x).relu(), 2), 1))

    audio = Audio().eval()
    finer = with_output_stride(convolutionalize_detailed(audio, 28), 1)
    assert finer.phases == (4,) and finer.outputs[0].cells.stride == (1,)
    x = torch.randn(1, 1, 40)
    with torch.no_grad():
        got = finer.model(x)  # valid layers only: every cell is the model on its crop
        for j in range(got.shape[-1]):
            torch.testing.assert_close(got[..., j], audio(x[..., j : j + 28]))
    detector = detector_stage()
    both = with_output_stride(convolutionalize_detailed(detector, (24, 24)), 2)
    check = verify_dense(detector, both.model, (24, 24))
    assert check, check.problems
    assert [o.name for o in check.outputs] == ["face", "box"] and check.map_size == (6, 6)
    assert check.crops.cells == 72 and check.warnings  # ceil_mode pools: no interior crop


# ------------------------------------------------------------------ every window gets its cell


class BarNet(nn.Module):
    """No padding, trunk stride 4, native 22×22: the map's cells are exactly the crops that fit."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 4 * 4, 6), nn.Tanh(), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


@pytest.mark.parametrize(
    ("size", "step", "cells"),
    [
        ((46, 38), 2, (13, 9)),
        ((46, 38), 1, (25, 17)),
        ((47, 41), 2, (13, 10)),
        ((23, 29), 1, (2, 8)),
        ((22, 22), 2, (1, 1)),  # the native size is still the smallest input
        ((25, 22), 4, (1, 1)),
    ],
)
def test_every_window_that_fits_gets_its_cell_equal_to_the_model_on_its_crop(
    size, step, cells
) -> None:
    torch.manual_seed(3)
    model = BarNet().double().eval()
    finer = with_output_stride(convolutionalize_detailed(model, (22, 22)), step)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        got = finer.model(x)
        assert tuple(got.shape[-2:]) == cells == tuple((n - 22) // step + 1 for n in size)
        crops = torch.cat(
            [
                x[..., p * step : p * step + 22, q * step : q * step + 22]
                for p in range(cells[0])
                for q in range(cells[1])
            ]
        )
        want = model(crops).reshape(*cells, 2, 2).permute(2, 3, 0, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@FAST
@given(
    spec=trunks,
    native=st.tuples(st.integers(4, 10), st.integers(4, 10)),
    extra=st.tuples(st.integers(0, 13), st.integers(0, 13)),
    data=st.data(),
)
def test_the_finer_map_has_a_cell_per_window_and_holds_the_coarse_map(
    spec, native, extra, data
) -> None:
    model = build(spec, native).double()
    finer, coarse, step = stitched(model, native, data)
    phases = finer.phases
    size = tuple(n + e for n, e in zip(native, extra, strict=True))
    x = torch.randn(1, CHANNELS, *size, dtype=torch.float64, generator=torch.Generator())
    with torch.no_grad():
        fine = finer.model(x)
        whole = convolutionalize_detailed(model, native, in_channels=CHANNELS).model(x)
    for axis in range(2):
        assert fine.shape[2 + axis] >= (size[axis] - native[axis]) // step[axis] + 1
    every = fine[..., :: phases[0], :: phases[1]]  # run 0 is the coarse map (or its start)
    torch.testing.assert_close(
        every, whole[..., : every.shape[-2], : every.shape[-1]], rtol=0, atol=0
    )
