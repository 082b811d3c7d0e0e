"""Time and peak memory of fcconv on the nastiest inputs: what a file declares must not matter.

Each case runs the real command in its own process; wall time comes from
the clock, peak RSS from ``wait4`` (what ``/usr/bin/time -v`` reports as
"Maximum resident set size"). The promise (README, "Guarantees"): every
call stays within 30 s and 2 GB, whatever the file declares. A case that
breaks it is marked ``OVER`` and the script exits 1.

    python benchmarks/hostile_limits.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SECONDS, BYTES = 30.0, 2 << 30


def declaring(path: Path, shape: list[int]) -> str:
    raw = json.dumps({"fc.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    raw += " " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw.encode())
    return path.name


def wide_header(path: Path, megabytes: float, key: str = "data_offsets", count: int = 0) -> str:
    """A valid file with ``megabytes`` (10**6 bytes) of tiny tensor entries in its header."""
    entry = '"t{}":{{"dtype":"F32","shape":[0],"KEY":[0,0]}}'.replace("KEY", key)
    count = count or int(megabytes * 10**6) // len(entry.format(10**6))
    raw = "{" + ",".join(entry.format(i) for i in range(count)) + "}"
    raw += " " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw.encode())
    return path.name


def prepare(folder: Path) -> list[tuple[str, list[str], dict]]:
    import torch

    huge = declaring(folder / "huge.safetensors", [0, 2**60])
    torch.save({"fc.weight": torch.empty(0, 2**30)}, folder / "zero.pt")
    torch.save({"fc.weight": torch.randn(64, 4000)}, folder / "small.pt")
    deep = folder / "deep.safetensors"
    raw = '{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": '
    raw += "[" * 100_000 + "]" * 100_000 + "}}"
    raw += " " * (-len(raw) % 8)
    deep.write_bytes(len(raw).to_bytes(8, "little") + raw.encode())
    wide = wide_header(folder / "wide.safetensors", 95)  # safetensors' limit: 100 MB
    hidden = wide_header(folder / "hidden.safetensors", 95, key="data\\u005foffsets")
    largest = wide_header(folder / "largest.safetensors", 0, count=1 << 18)  # MAX_TENSORS
    os.mkfifo(folder / "fifo.safetensors.index.json")
    with open(folder / "big.safetensors.index.json", "wb") as handle:
        handle.truncate(1 << 30)
    zero_stdin = {"stdin": "/dev/zero"}
    pipe_stdin = {"pipe": True}
    return [
        ("inspect, [0, 2**60] in 104 bytes", ["inspect", huge], {}),
        ("inspect --channels 1, same", ["inspect", huge, "--channels", "1"], {}),
        (
            "convert, same, patch 32x32",
            ["convert", huge, "-o", "o1.safetensors", "--layer", "fc", "--patch", "32x32"],
            {},
        ),  # fmt: skip
        (
            "convert, same, --order auto",
            [
                "convert",
                huge,
                "-o",
                "o2.safetensors",
                "--layer",
                "fc",
                "--patch",
                "32x32",
                "--order",
                "auto",
            ],
            {},
        ),  # fmt: skip
        ("inspect --patch, [0, 2**30] .pt", ["inspect", "zero.pt", "--patch", "32768x32768x1"], {}),
        (
            "convert, [0, 2**30] .pt",
            ["convert", "zero.pt", "-o", "o3.pt", "--layer", "fc", "--patch", "32768x32768x1"],
            {},
        ),  # fmt: skip
        ("verify, [0, 2**30] .pt", ["verify", "zero.pt", "o3.pt"], {}),
        (
            "convert --input 300000x300000",
            [
                "convert",
                "small.pt",
                "-o",
                "o4.pt",
                "--layer",
                "fc",
                "--patch",
                "20x20x10",
                "--input",
                "300000x300000",
            ],
            {},
        ),  # fmt: skip
        (
            "convert --stride 99999x99999",
            [
                "convert",
                "small.pt",
                "-o",
                "o5.pt",
                "--layer",
                "fc",
                "--patch",
                "20x20x10",
                "--stride",
                "99999x99999",
            ],
            {},
        ),  # fmt: skip
        ("inspect - < /dev/zero", ["inspect", "-"], zero_stdin),
        ("endless pipe | inspect -", ["inspect", "-"], pipe_stdin),
        ("inspect, header nested 100k deep", ["inspect", deep.name], {}),
        ("inspect, 95 MB header (1.5M tensors)", ["inspect", wide], {}),
        ("inspect --json, same", ["inspect", wide, "--json"], {}),
        ("inspect, same with escaped keys", ["inspect", hidden], {}),
        ("inspect, 262144 tensors (the most read)", ["inspect", largest], {}),
        ("inspect --json, same", ["inspect", largest, "--json"], {}),
        ("inspect, index is a FIFO", ["inspect", "fifo.safetensors.index.json"], {}),
        ("inspect, 1 GiB index", ["inspect", "big.safetensors.index.json"], {}),
    ]


def measure(args: list[str], folder: Path, how: dict) -> tuple[int, float, int, str]:
    """Exit code, wall seconds, peak RSS in bytes (from /usr/bin/time), first stderr line."""
    report = folder / "time.txt"
    command = ["/usr/bin/time", "-f", "%e %M", "-o", str(report)]
    command += [sys.executable, "-m", "fcconv", *args]
    with open(how.get("stdin", os.devnull), "rb") as device:
        stdin = subprocess.PIPE if how.get("pipe") else device
        process = subprocess.Popen(
            command, cwd=folder, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if how.get("pipe"):
            chunk = b"\x80" * (1 << 20)
            try:
                while process.poll() is None:
                    process.stdin.write(chunk)
            except BrokenPipeError:
                pass
            process.stdin.close()
        error = process.stderr.read().decode(errors="replace")
        process.wait()
        process.stderr.close()
    seconds, kilobytes = report.read_text().split()[-2:]
    return process.returncode, float(seconds), int(kilobytes) * 1024, error.split("\n")[0]


def main() -> int:
    over = 0
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        print(f"{'case':40} {'exit':>4} {'wall s':>7} {'peak MiB':>9}  message")
        for name, args, how in prepare(folder):
            code, elapsed, peak, message = measure(args, folder, how)
            verdict = "" if elapsed <= SECONDS and peak <= BYTES and code in (0, 1, 2) else "OVER "
            over += bool(verdict)
            shown = message.removeprefix("fcconv: error: ")[:70]
            print(f"{name:40} {code:>4} {elapsed:>7.2f} {peak / (1 << 20):>9.0f}  {verdict}{shown}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
