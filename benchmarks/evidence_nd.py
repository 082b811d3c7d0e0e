"""How well ``--order auto`` reads 1-D and 3-D heads: trained ones, and random weights.

    python benchmarks/evidence_nd.py [--random N]

The thresholds of :mod:`fcconv.evidence` (a lead of ``MIN_MARGIN`` and
``MIN_SIGMAS`` noise deviations) were measured on 2-D heads. This script
measures the same two things for the other ranks, from a fixed seed:

- **trained 1-D heads**: a small Conv1d network on synthetic sequences (a
  bump or a step, the class says where and which), trained twice, flattening
  channels first (``cl``) and last (``lc``); each head is re-flattened in
  both orders and must be recognised, with the margin and the noise
  deviations it wins by;
- **trained 3-D heads**, why fcconv does not judge them: a small Conv3d
  network on synthetic clips (a blob or a bar in one of 24 regions of space
  and time, a 3×6×4 map), trained twice (``cdhw``, ``dhwc``), re-flattened in
  all 24 orders, each reading scored by the same statistic: how often some
  wrong reading scores above the right one;
- **random weights** of many shapes (normal, uniform and cubed normal
  entries), which must never give a clear answer: the largest lead seen, in
  noise deviations (3-D shapes with a side of 1, which are judged).

Nothing here is shipped or timed; the README quotes what it prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fcconv.evidence import rank_orders  # noqa: E402
from fcconv.geometry import conv_weight_to_linear_nd, linear_weight_to_conv_nd  # noqa: E402
from fcconv.patches import PatchNd, orders_for  # noqa: E402

SEED = 0
STEPS = 250
SAMPLES = 1536


def sequences(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 1, 48]``: a bump or a step at a random place; class = quarter × kind."""
    length = 48
    t = torch.arange(length, dtype=torch.float32).view(1, length)
    centre = torch.rand(n, 1, generator=g) * (length - 8) + 4
    is_step = torch.rand(n, generator=g) < 0.5
    bump = torch.exp(-((t - centre) ** 2) / (2 * 2.5**2))
    step = ((t - centre).abs() < 5).float() * torch.sign(t - centre + 0.5)
    signal = torch.where(is_step.view(n, 1), step, bump)
    x = (signal + 0.15 * torch.randn(n, length, generator=g)).unsqueeze(1)
    quarter = (centre.view(n) * 4 / length).long().clamp(max=3)
    return x, quarter * 2 + is_step.long()


def clips(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 1, 12, 24, 16]``: a blob or a bar; class = where in time × rows × columns × kind."""
    depth, height, width = 12, 24, 16
    ds = torch.arange(depth, dtype=torch.float32).view(1, depth, 1, 1)
    ys = torch.arange(height, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, width)
    cd = torch.rand(n, 1, 1, 1, generator=g) * (depth - 2) + 1
    cy = torch.rand(n, 1, 1, 1, generator=g) * (height - 4) + 2
    cx = torch.rand(n, 1, 1, 1, generator=g) * (width - 4) + 2
    is_bar = torch.rand(n, generator=g) < 0.5
    blob = torch.exp(-((ds - cd) ** 2 / 4 + (ys - cy) ** 2 / 6 + (xs - cx) ** 2 / 6))
    bar = torch.exp(-((ds - cd) ** 2 / 4 + (ys - cy) ** 2 / 1.5)) * ((xs - cx).abs() < 5)
    shape = torch.where(is_bar.view(n, 1, 1, 1), bar, blob)
    x = (shape + 0.15 * torch.randn(n, depth, height, width, generator=g)).unsqueeze(1)
    when = (cd.view(n) * 2 / depth).long().clamp(max=1)
    row = (cy.view(n) * 3 / height).long().clamp(max=2)
    col = (cx.view(n) * 2 / width).long().clamp(max=1)
    return x, ((when * 3 + row) * 2 + col) * 2 + is_bar.long()


class Net(nn.Module):
    """Two conv blocks, the map flattened channels first or last, then ``fc``."""

    def __init__(self, ndim: int, channels_last: bool, classes: int, features: int) -> None:
        super().__init__()
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if ndim == 1 else (nn.Conv3d, nn.MaxPool3d)
        width = 16 if ndim == 1 else 8
        self.channels_last = channels_last
        self.features = nn.Sequential(
            conv(1, width, 3, padding=1), nn.ReLU(), pool(2),
            conv(width, width, 3, padding=1), nn.ReLU(), pool(2),
        )  # fmt: skip
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.channels_last:
            x = x.movedim(1, -1)
        return self.fc(x.flatten(1))


def train(ndim: int, channels_last: bool) -> tuple[torch.Tensor, PatchNd, float]:
    """A trained head's weight, its patch, and the training accuracy."""
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    x, y = sequences(SAMPLES, g) if ndim == 1 else clips(SAMPLES, g)
    patch = PatchNd((12,), 16) if ndim == 1 else PatchNd((3, 6, 4), 8)
    model = Net(ndim, channels_last, int(y.max()) + 1, patch.features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(STEPS):
        batch = torch.randint(0, SAMPLES, (128,), generator=g)
        optimizer.zero_grad()
        loss_fn(model(x[batch]), y[batch]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    return model.fc.weight.detach().clone(), patch, accuracy


def scores(weight: torch.Tensor, patch: PatchNd) -> dict[str, float]:
    """Every reading's score by the statistic of :mod:`fcconv.evidence`, all rows read."""
    from fcconv.evidence import _score, _sums

    return {
        order: _score(_sums(linear_weight_to_conv_nd(weight, patch, order)), patch)
        for order in orders_for(patch.ndim)
    }


def trained_report() -> list[str]:
    lines = []
    for channels_last in (False, True):
        weight, patch, accuracy = train(1, channels_last)
        truth = "lc" if channels_last else "cl"
        kernel = linear_weight_to_conv_nd(weight, patch, truth)
        right, margins, sigmas = 0, [], []
        for order in orders_for(1):
            evidence = rank_orders(conv_weight_to_linear_nd(kernel, order), patch)
            right += evidence.winner == order
            margins.append(evidence.margin or 0.0)
            sigmas.append(evidence.margin_sigmas or 0.0)
        lines.append(
            f"1-D head flattened {truth} (train accuracy {accuracy:.2f}), re-flattened in both "
            f"orders: recognised {right}/2, margins {min(margins):.3f}-{max(margins):.3f} "
            f"({min(sigmas):.1f}-{max(sigmas):.1f} sigma)"
        )
    for channels_last in (False, True):
        weight, patch, accuracy = train(3, channels_last)
        truth = "dhwc" if channels_last else "cdhw"
        kernel = linear_weight_to_conv_nd(weight, patch, truth)
        beaten = 0
        for order in orders_for(3):
            found = scores(conv_weight_to_linear_nd(kernel, order), patch)
            beaten += max(found.values()) > found[order]
        lines.append(
            f"3-D head flattened {truth} (train accuracy {accuracy:.2f}), re-flattened in all "
            f"24 orders: a wrong reading scores above the right one in {beaten}/24"
        )
    return lines


def random_report(count: int) -> list[str]:
    g = torch.Generator().manual_seed(SEED)
    shapes = {
        1: [PatchNd((n,), c) for n in (3, 4, 8, 16, 33) for c in (1, 4, 16, 64)],
        3: [
            PatchNd(s, c) for s in ((1, 3, 4), (3, 1, 3), (1, 5, 5), (4, 2, 1)) for c in (1, 4, 16)
        ],
    }
    lines = []
    for ndim, patches in shapes.items():
        worst, clear, judged = 0.0, 0, 0
        for k in range(count):
            patch = patches[k % len(patches)]
            rows = int(torch.randint(1, 64, (1,), generator=g))
            weight = torch.randn(rows, patch.features, generator=g)
            kind = k % 3
            if kind == 1:
                weight = torch.rand(rows, patch.features, generator=g)
            elif kind == 2:
                weight = weight**3
            evidence = rank_orders(weight, patch)
            judged += 1
            clear += evidence.clear
            worst = max(worst, evidence.margin_sigmas or 0.0)
        lines.append(
            f"{ndim}-D random weights: {judged} judged, {clear} clear, largest lead "
            f"{worst:.1f} sigma"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random", type=int, default=600, help="random weights per rank")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    for line in trained_report() + random_report(args.random):
        print(line)
    print(f"measured in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
