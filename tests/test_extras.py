"""A missing extra names an install that works for this fcconv: a clone's folder or the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcconv import extras
from fcconv.errors import MissingExtraError

ROOT = Path(__file__).resolve().parent.parent


def test_an_install_from_this_clone_is_told_to_install_from_it() -> None:
    """The test environment is `pip install -e` of this clone (make install)."""
    assert extras._installed_from() == str(ROOT)
    advice = extras.install_advice("map")
    assert advice.startswith(f"pip install -e '{ROOT}[map]'")


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
