"""Dense evaluation: a convolutionalized classifier vs. cropping windows, in one run.

A VGG-style classifier (five conv stages, native 224×224, head
``Linear(256·7·7 → 1024) → ReLU → Linear(1024 → 10)``) is evaluated on every
224×224 window of a 448×448 input at stride 32 (an 8×8 map of 64 windows):

* dense: the convolutionalized model, one forward pass on the whole input;
* batched crops: the 64 windows cut out and run through the original as one
  batch (the best a user does without fcconv);
* unbatched crops: the 64 windows one at a time.

The FLOPs of each path are counted with ``torch.utils.flop_counter`` and the
measured speedups are printed beside the FLOP ratio. The dense map is also
compared with the original head applied to every window of the trunk's
feature map (must agree to float32 rounding) and, for information, with the
whole original model on each crop (differs: the trunk pads).

    .venv/bin/python benchmarks/bench_convolutionalize.py [--repeat 2] [--threads N]
        [--device cpu|cuda] [--json]

Timings are the best of ``--repeat`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcconv.fcn import convolutionalize_detailed, head_on_windows  # noqa: E402
from fcconv.samples_models import vgg_style  # noqa: E402

NATIVE = 224


def timed(
    function: Callable[[], torch.Tensor], repeat: int, device: torch.device, warm_up: bool = True
) -> tuple[float, torch.Tensor]:
    """Best wall time of ``repeat`` runs after one warm-up, and the last result.

    The minimum, not the median: on shared cores the other processes only
    ever add time, so the fastest run is the closest to the code's own cost.
    """
    result = function() if warm_up else None
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def flops(module: torch.nn.Module, inputs: list[torch.Tensor]) -> int:
    """FLOPs of running ``module`` on each of ``inputs``, counted on meta tensors (no compute)."""
    state = {k: v.to("meta") for k, v in module.named_parameters()}
    state.update({k: v.to("meta") for k, v in module.named_buffers()})
    with FlopCounterMode(display=False) as counter:
        for x in inputs:
            torch.func.functional_call(module, state, (x.to("meta"),))
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=448, help="input side (default 448)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per path (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    model = vgg_style()
    conversion = convolutionalize_detailed(model, (NATIVE, NATIVE))
    dense_model = conversion.model.eval().to(device)
    model = model.to(device)
    step = conversion.window_stride
    assert step is not None, "the trunk's window stride could not be determined"
    x = torch.randn(1, 3, args.size, args.size).to(device)
    rows = (args.size - NATIVE) // step[0] + 1
    cols = (args.size - NATIVE) // step[1] + 1
    offsets = [(p * step[0], q * step[1]) for p in range(rows) for q in range(cols)]

    def dense() -> torch.Tensor:
        return dense_model(x)

    def batched() -> torch.Tensor:
        crops = torch.cat([x[:, :, t : t + NATIVE, s : s + NATIVE] for t, s in offsets])
        return model(crops)

    def unbatched() -> torch.Tensor:
        return torch.cat([model(x[:, :, t : t + NATIVE, s : s + NATIVE]) for t, s in offsets])

    # The heads alone: the dense path's first conv on the whole feature map vs.
    # the original first Linear on the 64 flattened windows (same FLOPs).
    first = conversion.changes[[c.conv2d is not None for c in conversion.changes].index(True)]
    head_conv = dense_model.get_submodule(first.name)
    head_linear = model.get_submodule(first.name)
    feature_map = torch.randn(1, conversion.patch.channels, rows + 6, cols + 6).to(device)
    vectors = torch.randn(len(offsets), head_linear.in_features).to(device)

    with torch.inference_mode():
        crops = [x[:, :, t : t + NATIVE, s : s + NATIVE] for t, s in offsets]
        dense_flops = flops(dense_model, [x])
        batched_flops = flops(model, [torch.cat(crops)])
        unbatched_flops = flops(model, crops)
        dense_time, dense_map = timed(dense, args.repeat, device)
        batched_time, batched_scores = timed(batched, args.repeat, device)
        # the batched run warmed the same kernels up; one pass of 64 crops is long enough
        unbatched_time, _ = timed(unbatched, 1, device, warm_up=False)
        conv_time, _ = timed(lambda: head_conv(feature_map), args.repeat * 3, device)
        linear_time, _ = timed(lambda: head_linear(vectors), args.repeat * 3, device)
    # The equivalence check runs in full float32: on CUDA, cuDNN convolutions use
    # TF32 by default, whose 10-bit mantissa would hide a real difference.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        exact_map = dense_model(x)
        reference = head_on_windows(model, (NATIVE, NATIVE), x)
    head_diff = float((exact_map - reference).abs().max())
    as_cells = batched_scores.reshape(rows, cols, -1).permute(2, 0, 1).unsqueeze(0)
    crop_diff = float((dense_map - as_cells).abs().max())
    flop_ratio = batched_flops / dense_flops
    result = {
        "model": "VGG-style, 5 stages, head Linear(256*7*7 -> 1024) -> ReLU -> Linear(1024 -> 10)",
        "input": [args.size, args.size],
        "windows": len(offsets),
        "map": [rows, cols],
        "window_stride": list(step),
        "threads": torch.get_num_threads(),
        "gflops": {
            "dense": dense_flops / 1e9,
            "batched_crops": batched_flops / 1e9,
            "unbatched_crops": unbatched_flops / 1e9,
        },
        "seconds": {
            "dense": dense_time,
            "batched_crops": batched_time,
            "unbatched_crops": unbatched_time,
        },
        "device": str(device),
        "first_head_layer_seconds": {"dense_conv": conv_time, "linear_on_windows": linear_time},
        "flop_ratio": flop_ratio,
        "speedup_vs_batched": batched_time / dense_time,
        "speedup_vs_unbatched": unbatched_time / dense_time,
        "speedup_over_flop_ratio": batched_time / dense_time / flop_ratio,
        "max_abs_diff_dense_vs_head_on_windows": head_diff,
        "max_abs_diff_dense_vs_whole_model_on_crops": crop_diff,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']}")
    print(
        f"input {args.size}x{args.size}: {len(offsets)} windows of {NATIVE}x{NATIVE}, "
        f"{step[0]} px apart -> {rows}x{cols} map; {device}, {result['threads']} threads"
    )
    print(f"{'path':<18}{'GFLOP':>10}{'seconds':>10}{'speedup':>10}{'FLOP ratio':>12}")
    for name, key, seconds in (
        ("dense (fcconv)", "dense", dense_time),
        ("batched crops", "batched_crops", batched_time),
        ("unbatched crops", "unbatched_crops", unbatched_time),
    ):
        gflop = result["gflops"][key]
        print(
            f"{name:<18}{gflop:>10.2f}{seconds:>10.3f}{seconds / dense_time:>9.2f}x"
            f"{gflop * 1e9 / dense_flops:>11.2f}x"
        )
    print(
        f"speedup vs batched crops = {result['speedup_over_flop_ratio']:.2f} of the FLOP ratio "
        "(target >= 0.9)"
    )
    print(
        f"first head layer alone: Conv2d on the {rows + 6}x{cols + 6} map {conv_time:.4f} s vs "
        f"Linear on {len(offsets)} windows {linear_time:.4f} s (same FLOPs)"
    )
    print(f"max |dense - original head on each window| = {head_diff:.3g}")
    print(
        f"max |dense - whole original model on each crop| = {crop_diff:.3g} "
        "(expected: the trunk pads, so crops see zeros at their borders)"
    )


if __name__ == "__main__":
    main()
