"""The README's promises about the package itself: its Python example runs, every
command has help and is documented, and the package behaves as Python packages do."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from fcconv.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _python_blocks(section: str) -> list[str]:
    start = README.index(f"## {section}\n")
    end = README.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", README[start:end], flags=re.S)


def test_the_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (block,) = _python_blocks("Python API")
    shutil.copytree(ROOT / "sample_checkpoints", tmp_path / "sample_checkpoints")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("['20x20x10'")
    assert printed[1].startswith("nn.Conv2d(10, 64, kernel_size=(20, 20)")
    assert printed[2].startswith("SpecError fc patch 9x9 does not fit fc")
    assert printed[3] == "(1, 10, 5, 3)"
    assert (tmp_path / "seed_fc.conv.pt").is_file() and (tmp_path / "tiny_vgg.pt2").is_file()
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help_and_is_in_the_readme(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and "--help" in result.output
    assert f"fcconv {command}" in README


def test_python_dash_m_runs_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fcconv", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"fcconv, version {metadata.version('fcconv')}"


def test_version_comes_from_the_installed_metadata() -> None:
    import fcconv

    assert fcconv.__version__ == metadata.version("fcconv")
    assert 'version = "' not in (ROOT / "fcconv" / "__init__.py").read_text()


def test_the_package_declares_its_types() -> None:
    assert (ROOT / "fcconv" / "py.typed").is_file()
    assert 'fcconv = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def test_python_dash_m_never_runs_a_module_planted_in_the_working_folder(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for name in ("rich.py", "click.py", "safetensors.py"):
        (tmp_path / name).write_text(f"open({str(marker)!r}, 'w').write('{name}')\n")
    sample = ROOT / "sample_checkpoints" / "seed_fc.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "fcconv", "inspect", str(sample)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), marker.read_text()
