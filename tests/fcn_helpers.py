"""Helpers shared by the whole-model tests (``test_convolutionalize*.py``)."""

from __future__ import annotations

import torch
from torch import nn


def seeded(model: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Deterministic weights of a healthy scale, random BatchNorm statistics, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator))
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
    return model.eval()
