"""Whole-model surgery: a model's ``flatten → Linear → …`` head(s) as convolutions.

This is what the FCN paper calls *convolutionalization* and OverFeat calls
dense sliding-window evaluation. The model is traced at its native input size
(:mod:`~fcconv.fcn.trace`: ``torch.fx``, else ``torch.export``); each output
is followed back to the flatten that feeds it, which, with any
``permute``/``transpose`` before it, tells the patch (the feature map's
``C × kh × kw``, or ``C × L``, ``C × D × H × W``) and the flatten order
(:mod:`~fcconv.fcn.analyse`). The flatten is removed, the first Linear of
each branch becomes a conv with the feature map as kernel, every later Linear
a 1×1 conv, and the layers between them are carried over
(:mod:`~fcconv.fcn.rewrite`). On a larger input every output is a map whose
every cell equals the original head applied to one window of the trunk's
feature map; :mod:`~fcconv.fcn.cells` says where each cell lies on the input
and which cells also equal the model run on their crop. A global pool before
the head (``AdaptiveAvgPool2d(1)``, ``x.mean((2, 3))``, ...) becomes the same
pool over every native-size window of the map at stride 1, and its head's
Linears 1×1 convs; ``head="cam"`` removes it instead, for a class activation
map (the head at every feature cell).

The weights are only permuted (:func:`fcconv.geometry.linear_weight_to_conv_nd`);
nothing is recomputed. :func:`verify_dense` proves the equivalence on random
inputs in float64 (:mod:`~fcconv.fcn.check`), :func:`save_exported` writes a
``torch.export`` program (``.pt2``) with dynamic batch and sizes that loads
without the model's code (:mod:`~fcconv.fcn.export`).
:func:`with_output_stride` makes the map denser by shift-and-stitch
(:mod:`~fcconv.fcn.stride`), :func:`verify_output_stride` proves every cell
and :func:`measure_cost` says what it costs (:mod:`~fcconv.fcn.cost`).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
>>> dense = convolutionalize(net, (8, 8))
>>> tuple(dense(torch.zeros(1, 3, 8, 8)).shape), tuple(dense(torch.zeros(1, 3, 12, 10)).shape)
((1, 5, 1, 1), (1, 5, 5, 3))
"""

from __future__ import annotations

from fcconv.errors import (
    ArchitectureError,
    ConvolutionalizeError,
    UntraceableModelError,
    UserCodeError,
)
from fcconv.fcn.cells import OutputCells
from fcconv.fcn.check import head_on_windows, verify_dense
from fcconv.fcn.cost import MapCost, measure_cost
from fcconv.fcn.export import METADATA, save_exported, save_state_dict
from fcconv.fcn.load import load_model
from fcconv.fcn.results import (
    Conversion,
    CropAccount,
    DenseCheck,
    ExportInfo,
    LayerChange,
    OutputCheck,
    OutputFacts,
)
from fcconv.fcn.rewrite import convolutionalize, convolutionalize_detailed
from fcconv.fcn.stride import (
    StitchedMap,
    StrideCheck,
    smallest_size,
    verify_output_stride,
    with_output_stride,
)
from fcconv.fcn.trace import InputLayout
from fcconv.geometry import CellGeometry

__all__ = [
    "METADATA",
    "ArchitectureError",
    "CellGeometry",
    "Conversion",
    "ConvolutionalizeError",
    "CropAccount",
    "DenseCheck",
    "ExportInfo",
    "InputLayout",
    "LayerChange",
    "MapCost",
    "OutputCells",
    "OutputCheck",
    "OutputFacts",
    "StitchedMap",
    "StrideCheck",
    "UntraceableModelError",
    "UserCodeError",
    "convolutionalize",
    "convolutionalize_detailed",
    "head_on_windows",
    "load_model",
    "measure_cost",
    "save_exported",
    "save_state_dict",
    "smallest_size",
    "verify_dense",
    "verify_output_stride",
    "with_output_stride",
]
