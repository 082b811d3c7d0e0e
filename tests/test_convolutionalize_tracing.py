"""Tracing real model code, ``--arch`` factories and the user's code failing (SPEC sections 5, 9).

Models written the way published packages write them: a defaulted flag
(``forward(self, x, embed=False)``), a size guard (``if x.shape[-1] != 28:
raise``), Python arithmetic on sizes that ``torch.fx`` cannot follow. And
every way the user's code can fail through the command line: each must be
exit 2, one line, with the ``file:line`` where it happened, nothing written.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fcn_helpers import seeded
from torch import nn

from fcconv.errors import ArchitectureError, UntraceableModelError, UserCodeError
from fcconv.fcn import convolutionalize, convolutionalize_detailed, load_model, verify_dense
from fcconv.fcn.load import ArchSpec, parse_arch


class Digits(nn.Module):
    """An MNIST classifier with a size guard and a defaulted flag, as example code has them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5)
        self.fc = nn.Linear(4 * 12 * 12, 10)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dim() == 3 and x.is_floating_point():  # one unbatched image
            x = x[None]
        if x.shape[-1] != 28 or x.shape[-2] != 28:
            raise ValueError(f"expected 28x28 digits, got {tuple(x.shape)}")
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        if return_features:
            return x
        return F.log_softmax(self.fc(torch.flatten(x, 1)), dim=1)


class SizeArithmetic(nn.Module):
    """Python on sizes that torch.fx cannot trace: torch.export takes over."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(x.shape[1] // 2):  # a Proxy is not an int
            x = x * 1.0
        x = F.pad(x, (0, math.ceil(x.shape[-1] / 100) - 1))  # zero padding, computed
        return self.fc(F.relu(self.conv(x)).view(x.size(0), -1))


class NeedsTwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) * mask)


def test_size_guard_and_defaulted_flag_are_traced_at_the_native_size() -> None:
    model = seeded(Digits())
    conversion = convolutionalize_detailed(model, 28)
    assert conversion.tracer == "torch.fx" and conversion.layout.size == (28, 28)
    guard = [note for note in conversion.notes if note.startswith("removed the size guard")]
    assert len(guard) == 1
    assert "tests/test_convolutionalize_tracing.py:" in guard[0]
    assert "`if x.shape[-1] != 28 or x.shape[-2] != 28:`" in guard[0]
    assert any("return_features=False" in note for note in conversion.notes)
    (branch,) = [note for note in conversion.notes if note.startswith("the condition at")]
    assert "(`if x.dim() == 3 and x.is_floating_point():" in branch and "is False" in branch
    with torch.no_grad():  # the guard is gone: larger inputs run
        assert conversion.model(torch.randn(1, 1, 40, 36)).shape == (1, 10, 7, 5)
    assert verify_dense(model, conversion.model, 28)


def test_fx_failure_falls_back_to_torch_export() -> None:
    model = seeded(SizeArithmetic())
    conversion = convolutionalize_detailed(model, (8, 8))
    assert conversion.tracer == "torch.export"
    assert "TypeError at tests/test_convolutionalize_tracing.py:" in conversion.notes[0]
    assert "range(x.shape[1] // 2)" in conversion.notes[0]
    assert isinstance(conversion.model.get_submodule("fc"), nn.Conv2d)
    check = verify_dense(model, conversion.model, (8, 8))
    assert check, check.problems
    assert check.crops.crop_exact == check.crops.cells  # a zero-width pad reads nothing


def test_a_second_input_without_default_is_refused_with_its_definition() -> None:
    with pytest.raises(UntraceableModelError, match=r"needs a second input 'mask' without a "):
        convolutionalize(NeedsTwoInputs(), (2, 2), in_channels=1)


def test_a_forward_that_raises_at_the_native_size_is_the_users_error() -> None:
    with pytest.raises(UserCodeError) as raised:
        convolutionalize(seeded(Digits()), 32)
    error = raised.value
    assert error.where is not None and error.where.startswith(
        "tests/test_convolutionalize_tracing.py:"
    )
    assert "Digits.forward raised ValueError: expected 28x28 digits" in str(error)
    assert "`raise ValueError(" in str(error)


# ------------------------------------------------------------------ --arch


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pkg.mod:Net", ArchSpec("pkg.mod", "Net")),
        ("pkg.mod:Outer.build", ArchSpec("pkg.mod", "Outer.build")),
        (
            "m:Net(3, depth=2, name='x', sizes=(1, 2), extra={'a': [1.5, None]}, flag=True)",
            ArchSpec(
                "m",
                "Net",
                (3,),
                {
                    "depth": 2,
                    "name": "x",
                    "sizes": (1, 2),
                    "extra": {"a": [1.5, None]},
                    "flag": True,
                },
            ),
        ),
        (" m : Net() ", ArchSpec("m", "Net")),
    ],
)
def test_parse_arch(text: str, expected: ArchSpec) -> None:
    assert parse_arch(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("pkg.mod", "no ':'"),
        (":Net", "no ':'"),
        (".relative:Net", "relative module name"),
        ("m:Net(os.system('x'))", "is not a Python literal"),
        ("m:Net(depth=__import__('os'))", "is not a Python literal"),
        ("m:Net(*args)", r"\*args and \*\*kwargs"),
        ("m:Net(**kw)", r"\*args and \*\*kwargs"),
        ("m:1 + 2", "is not a name or a call"),
        ("m:Net(", "is not a name or a call"),
    ],
)
def test_parse_arch_refuses(text: str, reason: str) -> None:
    with pytest.raises(ArchitectureError, match=f"malformed arch=.*{reason}"):
        parse_arch(text)


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


MODEL_SOURCE = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=2, name="net"):
            super().__init__()
            self.name = name
            self.conv = nn.Conv2d(1, width, 3)
            self.fc = nn.Linear(width * 4 * 4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding user modules; they are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith(("user_", "planted")):
            del sys.modules[name]


def test_arch_with_constructor_arguments_from_the_working_folder(workdir: Path) -> None:
    write_module(workdir, "user_net", MODEL_SOURCE)
    (workdir / "user_pkg").mkdir()
    (workdir / "user_pkg" / "__init__.py").write_text("")
    write_module(workdir / "user_pkg", "models", "from user_net import Net\n")
    torch.save(_net(width=5).state_dict(), workdir / "w.pt")
    model = load_model(workdir / "w.pt", arch="user_pkg.models:Net(width=5, name='wide')")
    assert model.name == "wide" and model.conv.out_channels == 5 and not model.training
    assert str(workdir) not in sys.path  # taken off again


def test_the_working_folder_never_shadows_an_installed_module(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = workdir / "planted-code-ran"
    for name in ("safetensors", "rich"):  # imported afresh, as in a new process
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
    write_module(workdir, "safetensors", f"open({str(marker)!r}, 'w').write('safetensors')\n")
    (workdir / "rich").mkdir()
    (workdir / "rich" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('rich')\n")
    # the factory's module imports both, as a user's module may
    write_module(
        workdir, "user_uses_both", "import rich, safetensors\n" + textwrap.dedent(MODEL_SOURCE)
    )
    torch.save(seeded(_net()).state_dict(), workdir / "w.pt")
    model = load_model(workdir / "w.pt", arch="user_uses_both:Net")
    assert isinstance(model, nn.Module)
    assert not marker.exists(), marker.read_text()
    assert Path(sys.modules["safetensors"].__file__).parent != workdir


def _net(**arguments: int) -> nn.Module:
    """The ``Net`` of ``MODEL_SOURCE``, built here without importing it."""
    namespace: dict = {}
    exec(textwrap.dedent(MODEL_SOURCE), namespace)
    return namespace["Net"](**arguments)


# ------------------------------------------------------------------ the user's code failing


FAILURES = {
    # name: (module source, arch, expected text, file:line expected)
    "import raises": (
        "import torch\nraise RuntimeError('broken at import')\n",
        "user_mod:Net",
        "RuntimeError: broken at import",
        "user_mod.py:2",
    ),
    "syntax error": ("def Net(:\n    pass\n", "user_mod:Net", "SyntaxError", "user_mod.py:1"),
    "missing dependency": (
        "import not_installed_anywhere\n",
        "user_mod:Net",
        "ModuleNotFoundError: No module named 'not_installed_anywhere'",
        "user_mod.py:1",
    ),
    "factory raises": (
        "def Net():\n    return 1 / 0\n",
        "user_mod:Net",
        "ZeroDivisionError: division by zero",
        "user_mod.py:2",
    ),
    "factory exits": (
        "import sys\ndef Net():\n    sys.exit(0)\n",
        "user_mod:Net",
        "raised SystemExit",
        "user_mod.py:3",
    ),
    "factory interrupted": (
        "def Net():\n    raise KeyboardInterrupt\n",
        "user_mod:Net",
        "raised KeyboardInterrupt",
        "user_mod.py:2",
    ),
    "forward raises": (
        MODEL_SOURCE.replace(
            "return self.fc(", "raise IndexError('bad index')\n            return self.fc("
        ),
        "user_mod:Net",
        "Net.forward raised IndexError: bad index",
        "user_mod.py:13",
    ),
    "wrong weight shapes": (
        MODEL_SOURCE,
        "user_mod:Net(width=3)",
        "'conv.weight' is 2×1×3×3 in the file but 'conv.weight' is 3×1×3×3",
        "user_mod.py:5",
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_user_code_failures_are_exit_2_with_their_line(case: str, workdir: Path, invoke) -> None:
    source, arch, expected, location = FAILURES[case]
    write_module(workdir, "user_mod", textwrap.dedent(source))
    torch.save(seeded(_net()).state_dict(), workdir / "w.pt")
    result = invoke(
        "convolutionalize", "w.pt", "--arch", arch, "--input", "6x6", "-o", "o.pt2", exit=2
    )
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("fcconv: error: ")
    assert expected in result.stderr and location in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(
        p.name for p in workdir.iterdir() if p.suffix != ".py" and p.name != "__pycache__"
    ) == ["w.pt"]


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("sys:exit", "names the standard library's 'sys'"),  # refused before it is called
        ("os:getcwd", "names the standard library's 'os'"),
        ("not_a_module_anywhere:Net", "cannot import 'not_a_module_anywhere' for --arch"),
        (".user_mod:Net", "a relative module name cannot be imported"),
        (
            "user_mod:Missing",
            r"module 'user_mod' \(imported from user_mod.py\) has no attribute 'Missing'",
        ),
        ("user_mod:Net(depth=3)", "cannot be called with these arguments"),
    ],
)
def test_arch_mistakes_are_exit_2(arch: str, expected: str, workdir: Path, invoke) -> None:
    write_module(workdir, "user_mod", MODEL_SOURCE)
    torch.save(seeded(_net()).state_dict(), workdir / "w.pt")
    result = invoke(
        "convolutionalize", "w.pt", "--arch", arch, "--input", "6x6", "-o", "o.pt2", exit=2
    )
    assert result.stderr.startswith("fcconv: error: ") and result.stderr.count("\n") == 1
    import re

    assert re.search(expected, result.stderr), result.stderr
    assert not (workdir / "o.pt2").exists()


def test_stdin_is_read_into_memory_not_spooled(workdir: Path, invoke, monkeypatch) -> None:
    write_module(workdir, "user_mod", MODEL_SOURCE)
    weights = workdir / "w.pt"
    torch.save(seeded(_net()).state_dict(), weights)
    spooled = []
    real = tempfile.mkstemp

    def watching(*args, **kwargs):
        if kwargs.get("dir") is None and (len(args) < 3 or args[2] is None):
            spooled.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", watching)
    result = invoke(
        "convolutionalize", "-", "--arch", "user_mod:Net", "--input", "6x6", "-o", "o.pt2",
        "--json", input=weights.read_bytes(),
    )  # fmt: skip
    assert json.loads(result.stdout)["model"] == "-"
    assert not spooled and (workdir / "o.pt2").is_file()


@pytest.mark.slow
def test_planted_modules_never_run_in_a_real_process(tmp_path: Path) -> None:
    """The installed ``fcconv`` command, run where a safetensors.py and rich/ are planted."""
    marker = tmp_path / "planted-code-ran"
    (tmp_path / "safetensors.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / "rich").mkdir()
    (tmp_path / "rich" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    write_module(tmp_path, "user_mod", "import rich, safetensors\n" + textwrap.dedent(MODEL_SOURCE))
    torch.save(seeded(_net()).state_dict(), tmp_path / "w.pt")
    command = Path(sys.executable).with_name("fcconv")
    done = subprocess.run(
        [
            str(command),
            "convolutionalize",
            "w.pt",
            "--arch",
            "user_mod:Net",
            "--input",
            "6x6",
            "-o",
            "o.pt2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not marker.exists() and (tmp_path / "o.pt2").is_file()
