"""The one JSON envelope every ``--json`` document shares, and its published JSON Schemas.

Every command prints one JSON document on stdout with ``--json``, success or
failure. The envelope's keys sit at the top level beside the command's own
body keys (so consumers of a body key keep working):

- ``schema_version``: :data:`SCHEMA_VERSION`, raised when a key changes meaning
  or goes away (new keys do not raise it);
- ``command``: ``inspect``, ``convert``, ``verify``, ``convolutionalize``, ``map``
  (None when the command line named none);
- ``ok``: ``exit_code == 0``;
- ``exit_code``: the process's exit code (0 done / equivalent, 1 verification
  found a difference, 2 the command could not run, 130 interrupted);
- ``error``: None, or the error as data: ``kind`` (``SpecError``,
  ``UsageError``, ``InternalError``, …), ``kinds`` (its families), ``message``
  and its fields (``path``, ``layer``, …). A failed command's document holds no
  body keys.

The schemas (JSON Schema 2020-12) ship with the package: ``envelope.schema.json``
defines the envelope and the error; ``<command>.schema.json`` each command's
document.

>>> document = envelope("inspect", {"layers": []}, exit_code=0)
>>> [document[key] for key in ("schema_version", "command", "ok", "error")]
[1, 'inspect', True, None]
>>> schema("inspect")["$id"]
'urn:fcconv:schema:inspect'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

SCHEMA_VERSION = 1
"""The version of the envelope and of the bodies' meanings."""

COMMANDS = ("inspect", "convert", "verify", "convolutionalize", "map")
"""The commands with a published document schema."""

ENVELOPE_KEYS = ("schema_version", "command", "ok", "exit_code", "error")


def envelope(
    command: str | None,
    body: Mapping[str, Any] | None,
    *,
    exit_code: int,
    error: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``--json`` document: the envelope's keys first, then the body's (which cannot
    override them)."""
    document: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "ok": exit_code == 0,
        "exit_code": exit_code,
        "error": None if error is None else dict(error),
    }
    for key, value in (body or {}).items():
        document.setdefault(key, value)
    return document


def schema(name: str) -> dict[str, Any]:
    """The published schema ``name`` (a command, or ``envelope``) as a dict."""
    text = resources.files(__name__).joinpath(f"{name}.schema.json").read_text("utf-8")
    return json.loads(text)


def schemas() -> dict[str, dict[str, Any]]:
    """Every published schema by its ``$id`` (the envelope's included), for a validator's
    registry."""
    found = [schema(name) for name in ("envelope", *COMMANDS)]
    return {document["$id"]: document for document in found}
