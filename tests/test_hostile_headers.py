"""Hostile safetensors headers and provenance records (issue 9).

A seeded generator mutates the header of a small valid file structurally:
values of the wrong type or size anywhere in the JSON tree, keys removed,
added or duplicated, dtypes, shapes and offsets replaced, raw tokens that
Python's ``json`` accepts but safetensors' parser does not (``NaN``, ``-0``,
``1e400``, lone surrogates, deep nesting), a wrong length field, a cut or
padded data section. For every mutant, ``inspect``, ``convert`` and
``verify`` (run in-process as library calls) either succeed or raise an
:class:`~fcconv.FcconvError`; nothing else escapes, exit codes stay 0/1/2,
``convert`` never reports a difference in its own conversion, and fcconv's
parser never accepts a header that safetensors itself refuses. A few
mutants also go through the real command in a subprocess.
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import deserialize, safe_open
from safetensors.torch import save

from fcconv import FcconvError, convert_checkpoint, inspect_checkpoint, verify_checkpoints
from fcconv.io.provenance import PROVENANCE_KEY, layer_records
from fcconv.io.safetensors import read_header

MUTANTS = 400
SEED = 9


def base_file() -> bytes:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "fc.weight": torch.randn(4, 6, generator=g),
        "fc.bias": torch.randn(4, generator=g),
        "steps": torch.arange(2, dtype=torch.int64),
    }
    return save(tensors, metadata={"format": "pt"})


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def assemble(text: str, body: bytes, length: int | None = None) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + body


# Raw JSON tokens that a Python value cannot spell: json.dumps would write them
# differently or not at all. Placed as "@@n@@" strings, then substituted.
RAW_TOKENS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "-0",
    "1e400",
    "-1",
    "1.5",
    str(2**63),
    str(2**64),
    str(10**400),
    '"\\ud800"',
    "[" * 130 + "]" * 130,
    "[" * 20 + "]" * 20,
    "null",
    "true",
    '"x"',
    "{}",
    "[]",
    "0",
    "18446744073709551615",
]
VALUES: list[Any] = [0, 1, 7, 24, 96, 2**32, [], {}, None, "F32", "", [0, 0], [4, 6], [[1]]]
SHAPE_DIMS = [0, 1, 2, 3, 4, 6, 24, 2**31, 2**40, 2**60, 2**63 - 1]
NAMES = ["x", "__metadata__", "fcconv", "fc.weight", "fc.bias", "é[/]\x1b[31m", "0", "", "a\nb"]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "C64", "F4", "XX", ""]


class Mutator:
    """One random structural change of a header, returned as the bytes of a whole file."""

    def __init__(self, rng: random.Random, header: dict[str, Any], body: bytes) -> None:
        self.rng, self.header, self.body = rng, header, body
        self.raw: list[str] = []

    def token(self) -> str:
        self.raw.append(self.rng.choice(RAW_TOKENS))
        return f"@@{len(self.raw) - 1}@@"

    def value(self) -> Any:
        return self.token() if self.rng.random() < 0.5 else copy.deepcopy(self.rng.choice(VALUES))

    def mutant(self) -> bytes:
        header = copy.deepcopy(self.header)
        body = self.body
        length = None
        for _ in range(self.rng.choice([1, 1, 1, 2, 3])):
            kind = self.rng.randrange(11)
            if kind == 9:  # mostly valid: a metadata entry of any text
                metadata = header.setdefault("__metadata__", {})
                if isinstance(metadata, dict):
                    metadata[self.rng.choice(NAMES)] = self.rng.choice(NAMES)
            elif kind == 10:  # mostly valid: a tensor renamed
                names = [k for k in header if k != "__metadata__"]
                if names:
                    header[self.rng.choice(NAMES)] = header.pop(self.rng.choice(names))
            elif kind == 0:
                self.replace_somewhere(header)
            elif kind == 1:
                self.drop_somewhere(header)
            elif kind == 2:
                self.add_key(header)
            elif kind == 3:
                entry = self.entry(header)
                entry["dtype"] = self.rng.choice(DTYPES)
            elif kind == 4:
                entry = self.entry(header)
                entry["shape"] = [self.rng.choice(SHAPE_DIMS) for _ in range(self.rng.randrange(4))]
            elif kind == 5:
                entry = self.entry(header)
                entry["data_offsets"] = [self.rng.choice(SHAPE_DIMS + [16, 112]) for _ in range(2)]
            elif kind == 6:
                cut = body[: self.rng.randrange(len(body) + 1)]
                body = self.rng.choice([cut, body + b"\0" * 8])
            elif kind == 7:
                length = self.rng.choice([0, 1, 7, 2**20, 2**63, 10**8 + 8])
            else:
                header[self.rng.choice(["fc.weight", "fc.bias", "dup"])] = copy.deepcopy(
                    self.entry(header)
                )
        text = json.dumps(header)
        if self.rng.random() < 0.1:  # a key written twice
            text = text.replace("{", '{"fc.bias": {"dtype": "F32", "shape": [], '
                                '"data_offsets": [0, 4]}, ', 1)  # fmt: skip
        for index, token in enumerate(self.raw):
            text = text.replace(f'"@@{index}@@"', token)
        self.raw.clear()
        return assemble(text, body, length)

    def entry(self, header: dict[str, Any]) -> dict[str, Any]:
        names = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
        if not names:
            header["fc.weight"] = {}
            names = ["fc.weight"]
        return header[self.rng.choice(names)]

    def containers(self, value: Any, found: list) -> list:
        if isinstance(value, dict | list):
            found.append(value)
            for item in value.values() if isinstance(value, dict) else value:
                self.containers(item, found)
        return found

    def replace_somewhere(self, header: dict[str, Any]) -> None:
        target = self.rng.choice(self.containers(header, []))
        if isinstance(target, dict) and target:
            target[self.rng.choice(list(target))] = self.value()
        elif isinstance(target, list) and target:
            target[self.rng.randrange(len(target))] = self.value()

    def drop_somewhere(self, header: dict[str, Any]) -> None:
        target = self.rng.choice(self.containers(header, []))
        if isinstance(target, dict) and target:
            del target[self.rng.choice(list(target))]
        elif isinstance(target, list) and target:
            del target[self.rng.randrange(len(target))]

    def add_key(self, header: dict[str, Any]) -> None:
        target = self.rng.choice([c for c in self.containers(header, []) if isinstance(c, dict)])
        target[self.rng.choice(NAMES)] = self.value()


def mutants() -> list[bytes]:
    rng = random.Random(SEED)
    header, body = split(base_file())
    mutator = Mutator(rng, header, body)
    return [mutator.mutant() for _ in range(MUTANTS)]


def safetensors_accepts(data: bytes) -> bool:
    try:
        deserialize(data)
    except Exception:
        return False
    return True


def run_job(job, *args, **kwargs) -> int:
    """The exit code the command line would give: 0/1 from the result, 2 for an FcconvError."""
    try:
        result = job(*args, **kwargs)
    except FcconvError:
        return 2
    assert result.exit_code in (0, 1), result
    return result.exit_code


def test_header_mutants_never_crash_and_never_pass_what_safetensors_refuses(
    tmp_path: Path,
) -> None:
    original = tmp_path / "original.safetensors"
    original.write_bytes(base_file())
    accepted = refused = 0
    for number, data in enumerate(mutants()):
        path = tmp_path / f"m{number}.safetensors"
        path.write_bytes(data)
        try:
            read_header(path)
        except FcconvError as error:
            assert "\n" not in str(error), error
            refused += 1
            continue
        accepted += 1
        assert safetensors_accepts(data), f"mutant {number}: fcconv accepts, safetensors refuses"
    assert accepted >= 60 and refused >= 200, (accepted, refused)  # the generator reaches both


def test_header_mutants_through_every_job(tmp_path: Path) -> None:
    original = tmp_path / "original.safetensors"
    original.write_bytes(base_file())
    codes: dict[str, set[int]] = {"inspect": set(), "convert": set(), "verify": set()}
    for number, data in enumerate(mutants()):
        path = tmp_path / f"m{number}.safetensors"
        path.write_bytes(data)
        out = tmp_path / f"m{number}.conv.safetensors"
        codes["inspect"].add(run_job(inspect_checkpoint, path))
        convert = run_job(convert_checkpoint, path, out, layers=["fc"], patch="1x6")
        codes["convert"].add(convert)
        assert convert != 1, f"mutant {number}: fcconv's own conversion failed verification"
        if convert == 0:
            with safe_open(str(out), framework="pt") as handle:  # fcconv wrote a valid file
                assert handle.get_tensor("fc.weight").shape == (4, 1, 1, 6)
            assert run_job(verify_checkpoints, path, out) == 0, f"mutant {number}"
        codes["verify"].add(run_job(verify_checkpoints, original, path))
        assert run_job(verify_checkpoints, path, path) == 2  # nothing converted: not a verdict
    assert codes["convert"] == {0, 2} and 2 in codes["inspect"], codes


def test_a_few_mutants_through_the_command_line(tmp_path: Path) -> None:
    """The real process: no traceback, one line, exit 2 (no torch import on this path)."""
    chosen = [data for data in mutants() if not safetensors_accepts(data)][:4]
    for number, data in enumerate(chosen):
        path = tmp_path / f"bad{number}.safetensors"
        path.write_bytes(data)
        done = subprocess.run(
            [sys.executable, "-m", "fcconv", "inspect", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("fcconv: error: "), done.stderr


# ------------------------------------------------------------ raw tokens, one by one


def with_text(tmp_path: Path, text: str, body: bytes = b"") -> Path:
    path = tmp_path / "raw.safetensors"
    path.write_bytes(assemble(text, body))
    return path


@pytest.mark.parametrize(
    "text",
    [
        '{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": NaN}}',
        '{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": -Infinity}}',
        '{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": 1e400}}',
        '{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}',
        '{"a": {"dtype": "F32", "shape": [0, 18446744073709551616], "data_offsets": [0, 0]}}',
        '{"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 0], "data_offsets": [0, 0]}}',
        '{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": "\\ud800"}}',
        '{"\\udc00": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}',
        '{"__metadata__": {"k": "\\ud800"}}',
        '{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": '
        + "[" * 126
        + "]" * 126
        + "}}",
        '{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": '
        + "[" * 5000
        + "]" * 5000
        + "}}",
    ],
    ids=lambda text: text[60:90],
)
def test_what_safetensors_refuses_fcconv_refuses(tmp_path: Path, text: str) -> None:
    path = with_text(tmp_path, text)
    assert not safetensors_accepts(path.read_bytes())
    with pytest.raises(FcconvError) as raised:
        read_header(path)
    assert "corrupt safetensors header" in str(raised.value)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": '
        + "[" * 125
        + "]" * 125
        + "}}",  # 127 levels: the deepest safetensors reads
        '{"a": {"dtype": "F32", "shape": [0, 4294967296, 4294967296], "data_offsets": [0, 0]}}',
        '{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": "\\ud83d\\ude00"}}',
        '{"__metadata__": null, "a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}',
    ],
    ids=["depth 127", "zero first", "surrogate pair", "null metadata"],
)
def test_what_safetensors_accepts_fcconv_reads(tmp_path: Path, text: str) -> None:
    path = with_text(tmp_path, text)
    assert safetensors_accepts(path.read_bytes())
    assert list(read_header(path).tensors) == ["a"]


def test_a_dimension_torch_cannot_hold_is_refused_before_torch_sees_it(tmp_path: Path) -> None:
    """safetensors accepts [0, 2**64 - 1]; torch cannot make the tensor: one line, not a crash."""
    text = '{"a": {"dtype": "F32", "shape": [0, 18446744073709551615], "data_offsets": [0, 0]}}'
    path = with_text(tmp_path, text)
    assert safetensors_accepts(path.read_bytes())
    with pytest.raises(FcconvError, match="more than torch can hold"):
        read_header(path)


# --------------------------------------------------------------- provenance


JUNK_RECORDS = [
    "[1, 2",
    "null",
    "[]",
    '"layers"',
    "[" * 5000 + "]" * 5000,
    '{"layers": []}',
    '{"layers": {"fc": "x"}}',
    '{"layers": {"fc": {"patch": 5, "order": "xyz", "stride": [0, 0]}}}',
    '{"layers": {"fc": {"patch": "9x9x9", "order": "hwc", "stride": [1, 2, 3]}}}',
    '{"layers": {"fc": {"patch": "' + "9" * 100 + 'x1", "stride": [-1, 1]}}}',
    '{"layers": {"fc": {"stride": [true, 1], "linear_shape": "4x6"}}}',
    '{"layers": {"fc": {"stride": [1, 1073741824]}}}',
    '{"layers": {"fc": {"order": "hwc"}, "[/]\\u001b": {"order": "chw"}}}',
    '{"layers": {"fc": {"order": "hwc"}}}' + " " * (1 << 21),
]


def converted_with_record(tmp_path: Path, record: str) -> Path:
    """fcconv's own conversion of fc (order hwc), its provenance record replaced."""
    original = tmp_path / "original.safetensors"
    original.write_bytes(base_file())
    out = tmp_path / "out.safetensors"
    convert_checkpoint(original, out, layers=["fc"], patch="2x3", order="hwc", force=True)
    header, body = split(out.read_bytes())
    header["__metadata__"][PROVENANCE_KEY] = record
    out.write_bytes(assemble(json.dumps(header), body))
    return out


@pytest.mark.parametrize("record", JUNK_RECORDS, ids=range(len(JUNK_RECORDS)))
def test_junk_provenance_is_ignored_field_by_field(tmp_path: Path, record: str) -> None:
    out = converted_with_record(tmp_path, record)
    records = layer_records(read_header(out).metadata)
    for fields in records.values():  # only well-formed facts survive
        assert set(fields) <= {"patch", "order", "stride", "linear_shape"}
        assert fields.get("order", "chw") in ("chw", "cwh", "hcw", "hwc", "wch", "whc")
        assert all(type(s) is int and s > 0 for s in fields.get("stride", [1]))
    assert run_job(inspect_checkpoint, out) == 0
    code = run_job(verify_checkpoints, tmp_path / "original.safetensors", out)
    # The record is a claim checked against the weights: a false order or stride is a
    # difference (1), a stride too large to check is refused (2); nothing else.
    recorded = records.get("fc", {})
    if recorded.get("stride") == [1, 1073741824]:
        assert code == 2
    elif recorded.get("order", "hwc") != "hwc" or recorded.get("stride", [2, 3]) != [2, 3]:
        assert code == 1
    else:
        assert code == 0
