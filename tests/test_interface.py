"""One interface for every command: the ``--json`` envelope validated against the published
schemas (success, difference and failure), ``-q``/``-v``/``-V``, help with examples."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from referencing import Registry, Resource
from torch import nn

from fcconv import schemas
from fcconv.cli import cli

ENVELOPE_KEYS = {"schema_version", "command", "ok", "exit_code", "error"}


def validator(command: str) -> jsonschema.protocols.Validator:
    registry = Registry().with_resources(
        (uri, Resource.from_contents(document)) for uri, document in schemas.schemas().items()
    )
    schema = schemas.schema(command)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def document_of(result, command: str | None) -> dict:
    """The one JSON document on stdout, checked against ``command``'s schema (or the
    envelope's, when the command line named none)."""
    document = json.loads(result.stdout)  # exactly one document: json.loads refuses two
    validator(command or "envelope").validate(document)
    assert ENVELOPE_KEYS <= set(document)
    assert document["exit_code"] == result.exit_code
    assert document["command"] == command
    assert document["ok"] is (result.exit_code == 0)
    return document


def failed(result, command: str | None, kind: str) -> dict:
    document = document_of(result, command)
    assert document["exit_code"] == 2 and document["error"]["kind"] == kind, document
    assert set(document) == ENVELOPE_KEYS  # a failure has no body
    assert result.stderr.startswith("fcconv: error: ") and len(result.stderr.splitlines()) == 1
    return document["error"]


def test_every_published_schema_is_valid_and_shipped() -> None:
    for command in ("envelope", *schemas.COMMANDS):
        schema = schemas.schema(command)
        jsonschema.validators.validator_for(schema).check_schema(schema)
    assert set(schemas.COMMANDS) == set(cli.commands), "a command without a published schema"


# ------------------------------------------------------------ checkpoint commands


def test_inspect_envelope(invoke, samples: Path, tmp_path: Path) -> None:
    document = document_of(invoke("inspect", samples / "seed_fc.pt", "--json"), "inspect")
    assert document["error"] is None and document["layers"][0]["name"] == "fc"
    error = failed(invoke("inspect", tmp_path / "nope.pt", "--json", exit=2), "inspect",
                   "CheckpointError")  # fmt: skip
    assert error["path"] == str(tmp_path / "nope.pt") and "FcconvError" in error["kinds"]


def test_convert_and_verify_envelopes(invoke, samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "seed.conv.safetensors"
    args = ("--layer", "fc", "--patch", "20x20x10")
    document = document_of(
        invoke("convert", samples / "seed_fc.safetensors", "-o", out, *args, "--json"), "convert"
    )
    assert document["written"] is True and document["layers"][0]["patch"] == "20x20x10"
    document = document_of(invoke("verify", samples / "seed_fc.safetensors", out, "--json"),
                           "verify")  # fmt: skip
    assert document["equivalent"] is True
    # a difference is exit 1 with a body and no error
    different = invoke("verify", samples / "seed_fc.safetensors", out, "--order", "hwc",
                       "--json", exit=1)  # fmt: skip
    document = document_of(different, "verify")
    assert document["equivalent"] is False and document["error"] is None
    # refusals: a patch that does not fit names its layer; an existing output its path
    error = failed(
        invoke("convert", samples / "seed_fc.safetensors", "-o", tmp_path / "x.pt",
               "--layer", "fc", "--patch", "9x9", "--json", exit=2),
        "convert", "SpecError",
    )  # fmt: skip
    assert error["layer"] == "fc"
    error = failed(
        invoke("convert", samples / "seed_fc.safetensors", "-o", out, *args, "--json", exit=2),
        "convert", "OutputError",
    )  # fmt: skip
    assert "CheckpointError" in error["kinds"]
    failed(invoke("verify", tmp_path / "nope.pt", out, "--json", exit=2), "verify",
           "CheckpointError")  # fmt: skip


def test_onnx_envelopes(invoke, samples: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    dense = tmp_path / "dense.onnx"
    document = document_of(
        invoke("convolutionalize", samples / "tiny_cnn.onnx", "-o", dense, "--json"),
        "convolutionalize",
    )
    assert document["format"] == "onnx"
    document = document_of(invoke("verify", samples / "tiny_cnn.onnx", dense, "--json"), "verify")
    assert document["equivalent"] is True


# ------------------------------------------------------------ whole models and maps


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.trunk(x), 1))


@pytest.fixture
def tiny_arch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[str, Path]:
    from safetensors.torch import save_file

    module = types.ModuleType("fcconv_interface_archs")
    module.tiny = Tiny
    monkeypatch.setitem(sys.modules, module.__name__, module)
    weights = tmp_path / "tiny.safetensors"
    save_file(Tiny().state_dict(), weights)
    return f"{module.__name__}:tiny", weights


def test_convolutionalize_and_map_envelopes(invoke, tiny_arch, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    arch, weights = tiny_arch
    program = tmp_path / "tiny.pt2"
    document = document_of(
        invoke("convolutionalize", weights, "--arch", arch, "--input", "8x8", "-o", program,
               "--json"),
        "convolutionalize",
    )  # fmt: skip
    assert document["verification"] and program.is_file()
    # without --input: click's usage error, as data
    error = failed(
        invoke("convolutionalize", weights, "--arch", arch, "-o", program, "--json", exit=2),
        "convolutionalize", "UsageError",
    )  # fmt: skip
    assert error["kinds"] == ["UsageError"]
    image = tmp_path / "image.png"
    pixels = np.random.default_rng(0).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    picture = tmp_path / "map.png"
    document = document_of(invoke("map", program, image, "-o", picture, "--json"), "map")
    assert document["picture"] == str(picture) and picture.is_file()
    said = phases_said(invoke("map", program, image, "-o", picture, "--force", "-v").stderr)
    assert {"loading the program", "reading the image", "running the model", "drawing"} <= set(
        said
    ), said
    failed(invoke("map", tmp_path / "none.pt2", image, "-o", tmp_path / "m.png", "--json",
                  exit=2), "map", "CheckpointError")  # fmt: skip


# ------------------------------------------------------------ errors of every kind


def test_usage_errors_are_documents(invoke, samples: Path) -> None:
    error = failed(invoke("convert", samples / "seed_fc.pt", "--bogus", "--json", exit=2),
                   "convert", "UsageError")  # fmt: skip
    assert error["parameter"] == "--bogus"
    error = failed(invoke("inspect", "--json", exit=2), "inspect", "UsageError")
    assert error["parameter"] == "CKPT" or error["parameter"] == "checkpoint"
    failed(invoke("--json", "--bogus", exit=2), None, "UsageError")


def test_an_internal_error_is_a_document(invoke, samples, monkeypatch) -> None:
    import fcconv.api

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(fcconv.api, "inspect_checkpoint", broken)
    error = failed(invoke("inspect", samples / "seed_fc.pt", "--json", exit=2), "inspect",
                   "InternalError")  # fmt: skip
    assert error["exception"] == "RuntimeError"


def test_without_json_stdout_stays_empty_on_errors(invoke, tmp_path: Path) -> None:
    result = invoke("inspect", tmp_path / "nope.pt", exit=2)
    assert result.stdout == "" and result.stderr.startswith("fcconv: error: ")


# ------------------------------------------------------------ -q, -v, -V


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_takes_json_quiet_verbose_and_has_examples(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--json", "-q, --quiet", "-v, --verbose", "--debug"):
        assert option in result.output, f"{command} --help lacks {option}"
    assert "Examples:" in result.output
    assert f"fcconv {command} " in result.output.split("Examples:", 1)[1]


def test_version(invoke) -> None:
    from importlib import metadata

    for flag in ("-V", "--version"):
        assert metadata.version("fcconv") in invoke(flag).stdout


def test_quiet_prints_nothing_but_the_verbose_say_more(invoke, samples, tmp_path) -> None:
    quiet = invoke("inspect", samples / "seed_fc.pt", "-q")
    assert quiet.stdout == "" and quiet.stderr == ""
    out = tmp_path / "o.pt"
    args = ("convert", samples / "seed_fc.pt", "-o", out, "--layer", "fc", "--patch", "20x20x10")
    assert invoke(*args, "-q").stderr == ""
    normal = invoke(*args, "--force")
    assert "nn.Conv2d(10, 64" in normal.stderr
    # -q does not silence the --json document
    document = document_of(invoke(*args, "--force", "-q", "--json"), "convert")
    assert document["written"]
    contradiction = failed(invoke(*args, "--force", "-q", "-v", "--json", exit=2), "convert",
                           "UsageError")  # fmt: skip
    assert contradiction["message"]


# ------------------------------------------------------------ progress in named phases


def phases_said(stderr: str) -> list[str]:
    """The phases ``-v`` reported, in the order they ended."""
    return [line.split(": ")[1] for line in stderr.splitlines() if line.endswith(" s")]


def test_verbose_names_each_phase_and_quiet_none(invoke, samples, tmp_path) -> None:
    out = tmp_path / "o.safetensors"
    args = ("--layer", "fc", "--patch", "20x20x10")
    said = phases_said(invoke("convert", samples / "seed_fc.safetensors", "-o", out, *args,
                              "-v").stderr)  # fmt: skip
    assert {"planning", "checking layers", "writing"} <= set(said), said
    said = phases_said(invoke("verify", samples / "seed_fc.safetensors", out, "-v").stderr)
    assert "checking layers" in said and "planning" not in said, said
    quiet = invoke("verify", samples / "seed_fc.safetensors", out, "-q")
    assert quiet.stderr == "" and quiet.stdout == ""


def test_the_library_reports_phases_to_a_listener(samples, tmp_path) -> None:
    import fcconv
    from fcconv.progress import listening

    events: list[tuple[str, str]] = []

    class Log:
        def begin(self, name, total):
            events.append(("begin", name))

        def update(self, done, total):
            pass

        def end(self, name):
            events.append(("end", name))

    with listening(Log()):
        fcconv.convert_checkpoint(samples / "seed_fc.pt", tmp_path / "o.pt", layers=["fc=20x20x10"])
    begun = [name for kind, name in events if kind == "begin"]
    assert {"reading", "planning", "checking layers", "writing"} <= set(begun), events
    assert sorted(begun) == sorted(name for kind, name in events if kind == "end")
