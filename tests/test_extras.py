"""A missing extra names an install that works for this fcconv: a clone's folder or the package."""

from __future__ import annotations

import json

import pytest

from fcconv import extras
from fcconv.errors import MissingExtraError


class _Distribution:
    """What importlib.metadata finds: one file, direct_url.json, or none."""

    def __init__(self, direct_url: str | None) -> None:
        self.direct_url = direct_url

    def read_text(self, name: str) -> str | None:
        return self.direct_url if name == "direct_url.json" else None


def _installed(monkeypatch, *found: _Distribution) -> None:
    from importlib import metadata

    monkeypatch.setattr(metadata, "distributions", lambda **_: iter(found))


def test_an_install_from_a_clone_is_told_to_install_from_it(tmp_path, monkeypatch) -> None:
    """pip records `pip install -e <clone>` in direct_url.json; a stale egg-info records none."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'fcconv'\n")
    record = json.dumps({"url": tmp_path.as_uri(), "dir_info": {"editable": True}})
    _installed(monkeypatch, _Distribution(None), _Distribution(record))
    assert extras._installed_from() == str(tmp_path)
    assert extras.install_advice("map").startswith(f"pip install -e '{tmp_path}[map]'")


def test_an_install_from_a_wheel_file_is_not_a_clone(tmp_path, monkeypatch) -> None:
    wheel = tmp_path / "fcconv-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    _installed(monkeypatch, _Distribution(json.dumps({"url": wheel.as_uri(), "archive_info": {}})))
    assert extras._installed_from() is None
    assert extras.install_advice("map").startswith("pip install 'fcconv[map]'")


def test_a_packaged_install_is_told_the_package_and_the_clone_form(monkeypatch) -> None:
    monkeypatch.setattr(extras, "_installed_from", lambda: None)
    advice = extras.install_advice("onnx")
    assert advice.startswith("pip install 'fcconv[onnx]'")
    assert "pip install -e '.[onnx]'" in advice


def test_the_error_carries_the_extra_and_the_advice() -> None:
    with pytest.raises(MissingExtraError) as caught:
        extras.require("fcconv_no_such_module", "keras", purpose="to read Keras files")
    assert caught.value.extra == "keras"
    assert extras.install_advice("keras") in str(caught.value)
