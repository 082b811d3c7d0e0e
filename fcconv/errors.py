"""The user-error hierarchy: exceptions with fields, rendered only at the edge.

Everything raised from here is the user's to fix: the CLI prints it as one
line and exits 2. Anything else that escapes is a bug (the CLI says so, also
with exit 2, and shows the traceback with ``--debug``).

A message names the *parameters* the user can change as placeholders such as
``{order}`` or ``{force}``. ``str(error)`` renders them in library terms
(``order=``, ``force=True``); the CLI renders the same error with its flag
names (``--order``, ``--force``). No code ever parses a message's text: what
a caller needs to branch on is a field or a subclass.

>>> error = SpecError("no clear order; choose one with {order}", layer="fc")
>>> str(error)
'no clear order; choose one with order='
>>> error.render(CLI_NAMES)
'no clear order; choose one with --order'
>>> error.layer
'fc'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

PARAMETERS = (
    "arch",
    "channel",
    "channels",
    "check_size",
    "flip",
    "force",
    "format",
    "head",
    "input_size",
    "layers",
    "link",
    "map_output",
    "mean",
    "no_verify",
    "order",
    "output",
    "output_stride",
    "outputs",
    "patch",
    "picture",
    "rank",
    "state_dict_out",
    "seed",
    "std",
    "stride",
    "tile",
    "trust_pickle",
)
"""The parameters a message may name as ``{placeholder}``."""

LIBRARY_NAMES: Mapping[str, str] = {
    "arch": "arch=",
    "channel": "channel=",
    "channels": "in_channels=",
    "check_size": "larger_size=",
    "flip": "flip=True",
    "force": "force=True",
    "format": "format=",
    "head": "head=",
    "input_size": "input_size=",
    "layers": "layers=",
    "link": "link=True",
    "map_output": "output=",
    "mean": "mean=",
    "no_verify": "verify=False",
    "order": "order=",
    "output": "output path",
    "output_stride": "output_stride=",
    "outputs": "outputs=",
    "patch": "patch=",
    "picture": "picture=",
    "rank": "rank=",
    "state_dict_out": "state_dict_out=",
    "seed": "seed=",
    "std": "std=",
    "stride": "stride=",
    "tile": "tile=",
    "trust_pickle": "trust_pickle=True",
}
"""How :class:`FcconvError` names parameters for Python callers."""

CLI_NAMES: Mapping[str, str] = {
    "arch": "--arch",
    "channel": "--channel",
    "channels": "--channels",
    "check_size": "--check-size",
    "flip": "--flip",
    "force": "--force",
    "format": "--format",
    "head": "--head",
    "input_size": "--input",
    "layers": "--layer",
    "link": "--link",
    "map_output": "--output",
    "mean": "--mean",
    "no_verify": "--no-verify",
    "order": "--order",
    "output": "-o",
    "output_stride": "--output-stride",
    "outputs": "--keep-output",
    "patch": "--patch",
    "picture": "--picture",
    "rank": "--rank",
    "state_dict_out": "--state-dict-out",
    "seed": "--seed",
    "std": "--std",
    "stride": "--stride",
    "tile": "--tile",
    "trust_pickle": "--trust-pickle",
}
"""How the command line names the same parameters."""

_PLACEHOLDER = re.compile(r"\{(" + "|".join(PARAMETERS) + r")\}")


class FcconvError(Exception):
    """A problem with the user's input that the user can fix; exit code 2.

    Attributes:
        template: the message, with parameters as ``{placeholders}``.
        path: the file or folder concerned, when there is one.
        layer: the layer (module name) concerned, when there is one.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, layer: str | None = None):
        self.template = message
        self.path = None if path is None else str(path)
        self.layer = layer
        super().__init__(self.render(LIBRARY_NAMES))

    def render(self, names: Mapping[str, str]) -> str:
        """The message with each ``{parameter}`` spelt as ``names`` says."""
        return _PLACEHOLDER.sub(lambda match: names[match.group(1)], self.template)

    def fields(self) -> dict[str, Any]:
        """Every field of this error (``path``, ``layer`` and a subclass's own), JSON-ready.

        A field holding a result object (an order ranking) comes as its ``to_dict()``.
        """
        return {
            name: _plain(value)
            for name, value in vars(self).items()
            if name != "template" and not name.startswith("_")
        }

    def to_dict(self, names: Mapping[str, str] = LIBRARY_NAMES) -> dict[str, Any]:
        """The error as data: ``kind`` (its class), ``kinds`` (its classes up to
        :class:`FcconvError`, to branch on a family), ``message`` and its fields.

        >>> SpecError("bad {patch}", layer="fc").to_dict(CLI_NAMES)["kinds"]
        ['SpecError', 'FcconvError']
        """
        kinds = [k.__name__ for k in type(self).__mro__ if issubclass(k, FcconvError)]
        return {"kind": kinds[0], "kinds": kinds, "message": self.render(names), **self.fields()}


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it: results by their ``to_dict()``, paths as text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return str(value)


class SpecError(FcconvError):
    """A malformed or inconsistent patch, stride, order or input size."""


class PatchSpellingError(SpecError):
    """A patch spelt with the wrong axis last: the conv before the layer in the
    checkpoint has ``channels`` outputs; ``proposed`` is the spelling that fits;
    ``conv`` the conv's name."""

    def __init__(self, message: str, *, layer: str, proposed: str, channels: int, conv: str):
        super().__init__(message, layer=layer)
        self.proposed, self.channels, self.conv = proposed, channels, conv


class LayerError(FcconvError):
    """An unknown, ambiguous or unsuitable layer name."""


class OrderUndecidedError(SpecError):
    """``order="auto"`` found no clear winner; ``evidence`` holds the ranking."""

    def __init__(self, message: str, *, evidence: object, layer: str | None = None):
        super().__init__(message, layer=layer)
        self.evidence = evidence


class CheckpointError(FcconvError):
    """A checkpoint that cannot be read or written safely."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would need arbitrary unpickling to load."""


class OutputError(CheckpointError):
    """An output path that may not be written: an input, a device, someone else's folder."""


class ConvolutionalizeError(LayerError):
    """A model whose head fcconv cannot rewrite as convolutions."""


class NotDenseError(ConvolutionalizeError):
    """A converted model whose map is one cell on every input (a global pool): not dense.

    ``layer`` is the layer that collapses the feature maps, ``where`` its ``file:line``.
    """

    def __init__(self, message: str, *, layer: str | None = None, where: str | None = None):
        super().__init__(message, layer=layer)
        self.where = where


class UntraceableModelError(ConvolutionalizeError):
    """A model that neither ``torch.fx`` nor ``torch.export`` can trace."""


class UserCodeError(FcconvError):
    """User code (``arch``, a model's ``forward``) failed; ``where`` is its ``file:line``."""

    def __init__(self, message: str, *, where: str | None = None, path: str | None = None):
        super().__init__(message, path=path)
        self.where = where


class ArchitectureError(UserCodeError):
    """An ``arch`` (``package.module:callable``) that cannot be imported or called."""


class ImageError(FcconvError):
    """An image that cannot be read, or that does not fit the model it is fed to."""


class MissingExtraError(FcconvError):
    """An optional dependency is not installed; ``extra`` names the pip extra."""

    def __init__(self, message: str, *, extra: str):
        super().__init__(message)
        self.extra = extra
