"""Rewriting a large safetensors checkpoint costs about what copying it costs.

Builds a VGG-16-shaped fp32 checkpoint (``classifier.0.weight`` 4096×25088,
patch 7×7×512, plus filler tensors up to ``--size-gb``) in a scratch folder,
then times each case as a whole process, side by side in one run, against
``cp`` of the same file:

- ``cp``, and ``cp`` followed by ``sync FILE`` (a durable copy: fcconv fsyncs
  its output before renaming it into place, ``cp`` does not);
- the streaming rewrite, order ``chw`` (only the header changes);
- the streaming rewrite, order ``hwc`` (the 411 MB weight is permuted);
- for reference, the naive rewrite: ``safetensors.torch.load_file``, convert,
  ``save_file``.

Peak RSS is each process's own (``os.wait4``). Runs are interleaved and the
median is reported; the page cache holds the input throughout, as it would
right after a download. Targets (SPEC §7): ``chw`` ≤ 1.1× ``cp`` and
``hwc`` ≤ 1.3× ``cp``, both in ≤ 256 MiB.

    python benchmarks/bench_rewrite.py              # 2 GB, 3 rounds
    python benchmarks/bench_rewrite.py --quick      # 200 MB, for a smoke test
    FCCONV_BENCH_GB=4 python benchmarks/bench_rewrite.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
LAYER = "classifier.0"
TARGET = f"{LAYER}.weight"
PATCH = (7, 7, 512)  # H, W, C
LIMITS = {"chw": (1.1, 256), "hwc": (1.3, 256)}


# ----------------------------------------------------------------------------
FCCONV = str(Path(sys.executable).parent / "fcconv")


def convert_command(src: Path, dst: Path, order: str, *, verify: bool = False) -> list[str]:
    """``fcconv convert`` of ``src`` into ``dst`` with ``classifier.0`` in ``order``."""
    command = [FCCONV, "convert", str(src), "-o", str(dst), "--layer", f"{LAYER}=7x7x512"]
    command += ["--order", order, "--force", "-q"]
    return command if verify else [*command, "--no-verify"]


def naive_command(src: Path, dst: Path, order: str) -> list[str]:
    """Load everything, convert, save everything: the reference the streaming path beats."""
    code = (
        "import sys\n"
        "from safetensors import safe_open\n"
        "from safetensors.torch import load_file, save_file\n"
        "from fcconv.geometry import Patch, linear_weight_to_conv\n"
        "with safe_open(sys.argv[1], 'pt') as f:\n"
        "    metadata = f.metadata()\n"
        "tensors = load_file(sys.argv[1])\n"
        f"tensors[{TARGET!r}] = linear_weight_to_conv(tensors[{TARGET!r}],"
        " Patch(7, 7, 512), sys.argv[3])\n"
        "save_file(tensors, sys.argv[2], metadata=metadata)\n"
    )
    return [sys.executable, "-c", code, str(src), str(dst), order]


def make_checkpoint(path: Path, size_bytes: int) -> int:
    """Write a VGG-16-shaped fp32 safetensors file of about ``size_bytes``; return its O."""
    features = PATCH[0] * PATCH[1] * PATCH[2]
    # The full VGG head when it fits; a head with fewer rows for --quick.
    rows = 4096 if size_bytes >= 1024 * MiB else max(64, size_bytes // 2 // (features * 4))
    shapes: dict[str, list[int]] = {
        TARGET: [rows, features],
        "classifier.0.bias": [rows],
        "classifier.3.weight": [4096, rows],
        "classifier.3.bias": [4096],
        "classifier.6.weight": [1000, 4096],
        "classifier.6.bias": [1000],
    }
    used = sum(4 * int(np.prod(s)) for s in shapes.values())
    filler = 0
    while used < size_bytes:  # conv-like filler, 3×3 kernels of 512×512 (9.4 MB each)
        shape = [512, 512, 3, 3]
        shapes[f"features.{filler:03d}.weight"] = shape
        used += 4 * int(np.prod(shape))
        filler += 1
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for shape in shapes.values():
            remaining = int(np.prod(shape))
            while remaining:
                count = min(remaining, 16 * MiB)
                handle.write(rng.standard_normal(count, dtype=np.float32).tobytes())
                remaining -= count
    return rows


# Measures one process from a small launcher: a child forked from this (large)
# process would count this process's memory in its own peak RSS until it execs.
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_WRONLY, 0) for fd in (1, 2)]
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, file_actions=quiet)
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one whole process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCHER, *command],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    elapsed, peak_kib, code = result.stdout.split()
    if int(code):
        raise SystemExit(f"benchmark command failed ({code}): {' '.join(command[:3])} ...")
    return float(elapsed), int(peak_kib) / 1024  # Linux reports KiB


def check_output(src: Path, dst: Path, rows: int, order: str) -> None:
    """The rewritten weight, checked on a few rows against a plain numpy permutation."""
    from fcconv.io.safetensors import read_header

    before, after = read_header(src), read_header(dst)
    assert after.tensors[TARGET].shape == (rows, PATCH[2], PATCH[0], PATCH[1])
    features = PATCH[0] * PATCH[1] * PATCH[2]
    sizes = {"c": PATCH[2], "h": PATCH[0], "w": PATCH[1]}
    for row in (0, rows // 2, rows - 1):
        offset = row * features * 4
        w = np.fromfile(
            src,
            np.float32,
            features,
            offset=before.data_start + before.tensors[TARGET].begin + offset,
        )
        k = np.fromfile(
            dst,
            np.float32,
            features,
            offset=after.data_start + after.tensors[TARGET].begin + offset,
        )
        expected = w.reshape([sizes[a] for a in order]).transpose([order.index(a) for a in "chw"])
        assert np.array_equal(expected.reshape(-1).view(np.uint32), k.view(np.uint32)), row
    tail = next(reversed(before.tensors))
    a = np.fromfile(src, np.uint8, 4096, offset=before.file_bytes - 4096)
    b = np.fromfile(dst, np.uint8, 4096, offset=after.file_bytes - 4096)
    assert np.array_equal(a, b), tail


def make_pt_twin(src: Path, pt: Path) -> None:
    """The same tensors written by torch.save (zip format), for the pickle path."""
    code = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "torch.save(load_file(sys.argv[1]), sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(src), str(pt)], check=True)


VERIFY_ONLY = """
import sys, time
from safetensors import safe_open
from fcconv.geometry import Patch, linear_weight_to_conv
from fcconv.plan import LayerPlan
from fcconv.verify import check_layer
with safe_open(sys.argv[1], "pt") as f:
    weight, bias = f.get_tensor(sys.argv[2] + ".weight"), f.get_tensor(sys.argv[2] + ".bias")
patch = Patch(7, 7, 512)
plan = LayerPlan(sys.argv[2], sys.argv[2] + ".weight", sys.argv[2] + ".bias", weight.shape[0],
                 patch, "hwc", (7, 7), "float32")
after = {plan.weight_key: linear_weight_to_conv(weight, patch, "hwc"), plan.bias_key: bias}
start = time.perf_counter()
check = check_layer(plan, {plan.weight_key: weight, plan.bias_key: bias}, after)
assert check, check.problems
print(f"{time.perf_counter() - start:.2f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size-gb", type=float, default=float(os.environ.get("FCCONV_BENCH_GB", "2"))
    )
    parser.add_argument("--quick", action="store_true", help="a 200 MB checkpoint")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive load+save")
    parser.add_argument("--no-pt", action="store_true", help="skip the torch pickle cases")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench_out" / "rewrite")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    size = int((0.2 if args.quick else args.size_gb) * 1e9)

    args.dir.mkdir(parents=True, exist_ok=True)
    src, dst = args.dir / "vgg16.safetensors", args.dir / "out.safetensors"
    pt, pt_dst = args.dir / "vgg16.pt", args.dir / "out.pt"
    try:
        print(f"making a {size / 1e9:.1f} GB checkpoint in {args.dir} ...", file=sys.stderr)
        rows = make_checkpoint(src, size)
        # name: (command, output, baseline case, time ratio limit, peak RSS limit in MiB)
        cases: dict[str, tuple[list[str], Path, str, float | None, float | None]] = {
            "cp": (["cp", str(src), str(dst)], dst, "cp", None, None),
            "cp + sync": (
                ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(src), str(dst)],
                dst, "cp", None, None,
            ),
            "convert chw": (convert_command(src, dst, "chw"), dst, "cp", 1.1, 256),
            "convert hwc": (convert_command(src, dst, "hwc"), dst, "cp", 1.3, 256),
            "convert hwc verified": (
                convert_command(src, dst, "hwc", verify=True), dst, "cp", 2.0, None,
            ),
        }  # fmt: skip
        if not args.no_naive:
            cases["naive load+save hwc"] = (naive_command(src, dst, "hwc"), dst, "cp", None, None)
        if not args.no_pt:
            make_pt_twin(src, pt)
            pt_mib = pt.stat().st_size / MiB
            cases["cp .pt"] = (["cp", str(pt), str(pt_dst)], pt_dst, "cp .pt", None, None)
            cases[".pt convert hwc"] = (
                convert_command(pt, pt_dst, "hwc"), pt_dst, "cp .pt", 2.5, 1.2 * pt_mib,
            )  # fmt: skip
        cases["fcconv --help"] = ([FCCONV, "--help"], dst, "", None, None)
        times: dict[str, list[float]] = {name: [] for name in cases}
        peaks: dict[str, float] = dict.fromkeys(cases, 0.0)
        for file in (src, pt):
            if file.exists():  # warm the page cache, as right after a download
                subprocess.run(["cat", str(file)], stdout=subprocess.DEVNULL, check=True)
        for round_ in range(args.rounds):
            for name, (command, output, *_rest) in cases.items():
                output.unlink(missing_ok=True)
                subprocess.run(["sync"], check=True)  # earlier writes flushed, not timed
                elapsed, peak = run(command)
                times[name].append(elapsed)
                peaks[name] = max(peaks[name], peak)
                if name in ("convert chw", "convert hwc") and round_ == 0:
                    check_output(src, dst, rows, name.split()[-1])
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
        verify_seconds = subprocess.run(
            [sys.executable, "-c", VERIFY_ONLY, str(src), LAYER],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        report(cases, times, peaks, args.rounds, src, rows, verify_seconds)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


def report(cases, times, peaks, rounds: int, src: Path, rows: int, verify_seconds: str) -> None:
    """The table: medians, ratios to the case's own cp, peak RSS, and each target's verdict."""
    median = {name: statistics.median(values) for name, values in times.items()}
    durable = median["cp + sync"]
    print(
        f"\nrewrite of a {src.stat().st_size / 1e9:.2f} GB fp32 checkpoint "
        f"({TARGET} {rows}x{PATCH[0] * PATCH[1] * PATCH[2]}, patch 7x7x512), "
        f"median of {rounds}, {os.cpu_count()} CPUs\n"
    )
    header = f"{'case':<22}{'time s':>8}{'× cp':>8}{'× cp+sync':>11}{'peak RSS':>12}  target"
    print(header)
    print("-" * (len(header) + 30))
    for name, (_command, _output, baseline, ratio, rss) in cases.items():
        cp = median[baseline] if baseline else None
        shown = f"{median[name] / cp:>8.2f}" if cp else f"{'':>8}"
        target = ""
        if ratio is not None:
            ok = median[name] / cp <= ratio and (rss is None or peaks[name] <= rss)
            limit = f", ≤ {rss:.0f} MiB" if rss is not None else ""
            target = f"≤ {ratio}× {baseline}{limit}: {'met' if ok else 'NOT met'}"
        if name == "fcconv --help":
            target = f"≤ 0.3 s: {'met' if median[name] <= 0.3 else 'NOT met'}"
        print(
            f"{name:<22}{median[name]:>8.2f}{shown}{median[name] / durable:>11.2f}"
            f"{peaks[name]:>9.0f} MiB  {target}"
        )
    print(f"\nverification of {TARGET} alone (exact + functional, float64 and float32): "
          f"{verify_seconds} s")  # fmt: skip


if __name__ == "__main__":
    main()
