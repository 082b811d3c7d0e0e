"""Whole-model surgery: a classifier's ``flatten → Linear → … → Linear`` head as convolutions.

This is what the FCN paper calls *convolutionalization* and OverFeat calls
dense sliding-window evaluation. The model is traced with ``torch.fx`` at its
native input size; the flatten that feeds the first Linear, and any
``permute``/``transpose`` before it, tell the patch (the feature map's
``C × kh × kw``) and the flatten order. The flatten is removed, the first
Linear becomes ``Conv2d(C, O, (kh, kw), stride)``, every later Linear a 1×1
conv, and the layers between them are carried over. On a larger input the
result emits a map whose every cell equals the original head applied to one
``kh × kw`` window of the trunk's feature map.

The weights are only permuted (:func:`fcconv.geometry.linear_weight_to_conv`);
nothing is recomputed. :func:`verify_dense` proves the equivalence on random
inputs, :func:`save_exported` writes a ``torch.export`` program (``.pt2``)
with dynamic batch, height and width that loads without the model's code.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
>>> dense = convolutionalize(net, (8, 8))
>>> tuple(dense(torch.zeros(1, 3, 8, 8)).shape), tuple(dense(torch.zeros(1, 3, 12, 10)).shape)
((1, 5, 1, 1), (1, 5, 5, 3))
"""

from __future__ import annotations

from fcconv.errors import ArchitectureError, ConvolutionalizeError, UntraceableModelError
from fcconv.fcn.check import head_on_windows, verify_dense, window_stride
from fcconv.fcn.export import save_exported, save_state_dict
from fcconv.fcn.load import load_model
from fcconv.fcn.results import Conversion, DenseCheck, ExportInfo, LayerChange
from fcconv.fcn.rewrite import convolutionalize, convolutionalize_detailed

__all__ = [
    "ArchitectureError",
    "Conversion",
    "ConvolutionalizeError",
    "DenseCheck",
    "ExportInfo",
    "LayerChange",
    "UntraceableModelError",
    "convolutionalize",
    "convolutionalize_detailed",
    "head_on_windows",
    "load_model",
    "save_exported",
    "save_state_dict",
    "verify_dense",
    "window_stride",
]
