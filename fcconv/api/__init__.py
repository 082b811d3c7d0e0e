"""The library API: every job the command line does, for Python callers.

Each job returns a result that is truthy on success, has ``.to_dict()``
(the body of the document ``--json`` prints, which adds the envelope of
:mod:`fcconv.schemas`) and ``.exit_code``; problems the
caller can fix raise :class:`~fcconv.errors.FcconvError` subclasses.
"""

from fcconv.api.checkpoints import ConvertResult, convert_checkpoint, verify_checkpoints
from fcconv.api.inspection import InspectResult, inspect_checkpoint, order_evidence
from fcconv.api.maps import MapResult, map_image
from fcconv.api.models import ConvolutionalizeResult, convolutionalize_file

__all__ = [
    "ConvertResult",
    "ConvolutionalizeResult",
    "InspectResult",
    "MapResult",
    "convert_checkpoint",
    "convolutionalize_file",
    "inspect_checkpoint",
    "map_image",
    "order_evidence",
    "verify_checkpoints",
]
