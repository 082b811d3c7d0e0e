"""Results rendered for people (rich, on stderr) and for scripts (JSON, on stdout).

Text that comes from files (tensor and layer names, paths, metadata) is
printed as text: never parsed as rich markup, and with control characters
(terminal escapes) shown as ``\\x1b``-style escapes instead of reaching the
terminal.
"""

from fcconv.report.checkpoints import (
    geometry_lines,
    render_convert,
    render_inspect,
    render_plans,
    render_verification,
)
from fcconv.report.console import (
    PhaseDisplay,
    emit_json,
    emitted,
    num,
    printable,
    progress_bar,
    reset_emitted,
    shape,
    size,
    stderr_console,
    table,
    text,
)
from fcconv.report.maps import render_map
from fcconv.report.models import render_convolutionalize
from fcconv.report.onnx import (
    render_onnx_convolutionalize,
    render_onnx_verification,
)

__all__ = [
    "text",
    "table",
    "size",
    "shape",
    "num",
    "PhaseDisplay",
    "emit_json",
    "emitted",
    "geometry_lines",
    "printable",
    "progress_bar",
    "render_convert",
    "render_convolutionalize",
    "render_onnx_convolutionalize",
    "render_onnx_verification",
    "render_inspect",
    "render_map",
    "render_plans",
    "render_verification",
    "reset_emitted",
    "stderr_console",
]
