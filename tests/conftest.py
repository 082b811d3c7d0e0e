"""Fixtures shared by the CLI-level tests: the shipped samples and an in-process runner.

Tests run torch with one thread (and so do the fcconv processes they start):
the checks work on small tensors, where a second thread only adds
synchronisation, and CI machines have few, busy cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _keras_at_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keras runs on torch (no TensorFlow here) and writes its keras.json in a temp folder."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    os.environ["KERAS_HOME"] = str(tmp_path_factory.mktemp("keras_home"))


@pytest.fixture
def samples() -> Path:
    """The folder of shipped sample checkpoints (read them, never write there)."""
    return SAMPLES


@pytest.fixture
def invoke() -> Callable[..., Result]:
    """Run the ``fcconv`` command in-process and check its exit code.

    ``invoke("convert", path, "--layer", "fc", exit=0, input=b"...")`` returns
    click's ``Result`` (``stdout``, ``stderr``, ``stdout_bytes`` kept apart)
    after asserting the exit code (``exit=None`` skips that) and that nothing
    escaped as an unhandled exception: CliRunner reports a crash as exit 1,
    which must not pass for "verification found a difference".
    """
    from fcconv.cli import cli

    runner = CliRunner()

    def run(*args: object, exit: int | None = 0, input: bytes | str | None = None) -> Result:
        result = runner.invoke(cli, [str(a) for a in args], input=input)
        crash = result.exception if not isinstance(result.exception, SystemExit) else None
        where = "".join(traceback.format_exception(crash)) if crash else ""
        assert crash is None, f"fcconv {' '.join(map(str, args))} crashed:\n{where}"
        if exit is not None:
            assert result.exit_code == exit, (
                f"fcconv {' '.join(map(str, args))} exited {result.exit_code}, "
                f"expected {exit}\n--- stderr\n{result.stderr}\n--- stdout\n{result.stdout[:3000]}"
            )
        return result

    return run
