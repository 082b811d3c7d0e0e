"""The shipped samples are what the committed script makes, byte for byte, and small."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"


def test_samples_are_reproduced_by_the_script(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_samples.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    made = sorted(p.name for p in tmp_path.iterdir())
    # Outputs of the README's examples (model.conv.pt beside the input) are not samples.
    shipped = sorted(p.name for p in SAMPLES.iterdir() if ".conv" not in p.name)
    assert made == shipped
    for name in made:
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name
        assert (SAMPLES / name).stat().st_size < 2_000_000, name
