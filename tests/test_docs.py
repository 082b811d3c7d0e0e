"""The documentation runs as written, and the package behaves as its README says.

Every ```console and ```python block of README.md and docs/ runs, page by page,
in order, in a fresh folder per page that holds a copy of the shipped
``sample_checkpoints/`` (as a fresh clone does), with the project's
environment on ``PATH`` (``fcconv``, ``python``). The convention the pages
follow (docs/architecture.md, "Runnable docs"):

- In a ```console block, a line starting with ``$ `` is a command (a line
  ending in ``\\`` continues it); every other line is output shown to the
  reader and not compared. A command must exit 0, unless the output shown
  under it starts with ``fcconv: error:`` (exit 2 expected) or the command
  ends with a comment ``# exit N``.
- A ```python block is a self-contained script, run with the project's
  Python in the page's folder; it must exit 0.
- A block whose first line is ``# not run: <why>`` is shown, not run (an
  install, a cluster, your own model): use it sparingly.
- ```text, ```json and other languages are never run.
- Outputs go under ``out/`` (made by the page's first block), never beside
  the inputs: the test fails if anything in ``sample_checkpoints/`` changes.

The README's page is in the quick suite; the docs pages are marked slow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from fcconv.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN = ("console", "python")
NOT_RUN = "# not run:"
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```\s*$", flags=re.S | re.M)
EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")
COMMAND_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: its language, its text, the line it starts on."""

    page: Path
    line: int
    language: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUN and not self.text.lstrip().startswith(NOT_RUN)


@dataclass(frozen=True)
class Command:
    """A ``$ `` command of a console block and the exit status it must end with."""

    text: str
    exit_code: int


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` that starts at the left margin, in order."""
    text = page.read_text()
    return [
        Block(page, text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2))
        for match in FENCE.finditer(text)
    ]


def commands(block: Block) -> list[Command]:
    """The commands of a console block, continuation lines joined."""
    found: list[Command] = []
    lines = block.text.replace("\\\n", " ").splitlines()
    for number, line in enumerate(lines):
        if not line.startswith("$ "):
            continue
        shown = lines[number + 1] if number + 1 < len(lines) else ""
        explicit = EXIT.search(line)
        if explicit:
            code = int(explicit.group(1))
        else:
            code = 2 if shown.startswith("fcconv: error:") else 0
        found.append(Command(line[2:].strip(), code))
    return found


def _environment(folder: Path) -> dict[str, str]:
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment.update(
        KERAS_BACKEND="torch",
        KERAS_HOME=str(folder / ".keras"),
        MPLBACKEND="Agg",
        MPLCONFIGDIR=str(folder / ".matplotlib"),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    return environment


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


def _run(block: Block, folder: Path, environment: dict[str, str]) -> None:
    if block.language == "python":
        done = subprocess.run(
            [sys.executable, "-"],
            input=block.text,
            cwd=folder,
            env=environment,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert done.returncode == 0, f"{block.where}: python block failed\n{done.stderr[-3000:]}"
        return
    for command in commands(block):
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command.text],
            cwd=folder,
            env=environment,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert done.returncode == command.exit_code, (
            f"{block.where}: `{command.text}` exited {done.returncode}, "
            f"not {command.exit_code}\n{done.stderr[-3000:]}"
        )


def run_page(page: Path, folder: Path) -> None:
    """Run every runnable block of ``page`` in order in ``folder`` (a fresh clone's view)."""
    shutil.copytree(ROOT / "sample_checkpoints", folder / "sample_checkpoints")
    before = _snapshot(folder / "sample_checkpoints")
    environment = _environment(folder)
    for block in blocks(page):
        if block.runs:
            _run(block, folder, environment)
    assert _snapshot(folder / "sample_checkpoints") == before, "an example wrote beside the inputs"


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    run_page(ROOT / "README.md", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES[1:], ids=_page_id)
def test_every_docs_page_runs_as_written(page: Path, tmp_path: Path) -> None:
    run_page(page, tmp_path)


def test_the_readme_is_a_door() -> None:
    """Short, with the install, the seed case on shipped samples, and links into the docs."""
    lines = README.splitlines()
    assert len(lines) <= 300, len(lines)
    first_commands = [c.text for b in blocks(ROOT / "README.md") if b.runs for c in commands(b)]
    assert any("sample_checkpoints/seed_fc." in text for text in first_commands[:4])
    assert "make test" in README and "make demo" in README
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / link).is_file(), link


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_block_follows_the_convention(page: Path) -> None:
    """Runnable blocks start at the margin, console lines are commands or output, and
    outputs are written under out/ or to stdout, never beside the samples."""
    text = page.read_text()
    indented = re.findall(r"^[ \t]+```(?:console|python)\b", text, flags=re.M)
    assert not indented, f"{page}: an indented runnable block would not be run"
    for block in blocks(page):
        if block.language != "console" or not block.runs:
            continue
        for command in commands(block):
            for target in re.findall(r"(?:^|\s)(?:-o|--output-dir)\s+(\S+)", command.text):
                assert target == "-" or target.startswith("out/"), (block.where, target)


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


def test_the_package_declares_its_types_and_licence() -> None:
    assert (ROOT / "fcconv" / "py.typed").is_file()
    assert 'fcconv = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()


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


def test_the_api_reference_shows_doctests_as_code() -> None:
    """scripts/griffe_doctests.py fences doctests outside Example sections, once."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "griffe_doctests", ROOT / "scripts" / "griffe_doctests.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "Summary.\n\n>>> f()\n['a', 'b']\n\nMore.\n\nExample:\n    >>> g()\n    1\n"
    fenced = module.fence_doctests(text).splitlines()
    assert fenced[2:6] == ["```pycon", ">>> f()", "['a', 'b']", "```"]
    assert fenced[-3:] == ["Example:", "    >>> g()", "    1"]
    assert module.fence_doctests("```\n>>> h()\n```") == "```\n>>> h()\n```"
