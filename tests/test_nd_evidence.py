"""``--order auto`` for 1-D and 3-D patches: smooth heads are read, noise is noise, ties are exact.

1-D patches have two orders, judged by the neighbour statistic along L. A
3-D patch with a side of 1 is read exactly as the 1-D or 2-D patch it is; a
3-D patch with three sides longer than 1 is not judged (see
``benchmarks/evidence_nd.py``: on trained heads, wrong readings can score
above the right one).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcconv.evidence import indistinguishable_families, permutation_groups, rank_orders
from fcconv.geometry import conv_weight_to_linear_nd, index_map_nd
from fcconv.patches import Patch, PatchNd, orders_for

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def smooth_1d(rows: int, length: int, channels: int, seed: int) -> torch.Tensor:
    """A kernel ``[rows, C, L]`` that varies slowly along L (what training leaves)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, length)
    kernel = torch.randn(rows, channels, 1, generator=g) * ramp
    return kernel + 0.1 * torch.randn(rows, channels, length, generator=g)


@pytest.mark.parametrize("order", ["cl", "lc"])
def test_a_smooth_1d_head_is_read_in_either_flattening(order) -> None:
    patch = PatchNd((12,), 8)
    evidence = rank_orders(conv_weight_to_linear_nd(smooth_1d(32, 12, 8, 0), order), patch)
    assert evidence.winner == order and evidence.clear, evidence.reason
    assert evidence.candidates == (order,)
    assert [o for o, _ in evidence.ranking] == [order, "lc" if order == "cl" else "cl"]
    other = "lc" if order == "cl" else "cl"
    assert evidence.favours_other_than(other) and not evidence.favours_other_than(order)
    assert evidence.to_dict()["patch"] == "l=12,c=8"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 40),
    length=st.integers(1, 24),
    channels=st.integers(1, 12),
    kind=st.sampled_from(["normal", "uniform", "heavy"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_1d_weights_never_give_a_confident_answer(rows, length, channels, kind, seed):
    patch = PatchNd((length,), channels)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, patch.features, generator=g)
    if kind == "uniform":
        weight = torch.rand(rows, patch.features, generator=g)
    elif kind == "heavy":
        weight = weight**3
    evidence = rank_orders(weight, patch)
    assert not evidence.clear and not evidence.favours_other_than("cl")
    if len(evidence.groups) > 1:
        assert evidence.winner is None, evidence.reason
    else:
        assert evidence.winner == "cl"  # one permutation: nothing to guess


def test_1d_patches_that_offer_no_evidence_say_why() -> None:
    two = rank_orders(torch.randn(6, 2 * 5), PatchNd((2,), 5))
    assert two.winner is None and two.reason.startswith("no evidence: a l=2,c=5 patch has two")
    one_channel = rank_orders(torch.randn(6, 9), PatchNd((9,), 1))
    assert one_channel.groups == (("cl", "lc"),) and one_channel.winner == "cl"
    assert one_channel.reason.startswith("both orders are the same permutation")
    point = rank_orders(torch.randn(6, 7), PatchNd((1,), 7))
    assert point.winner == "cl" and "a 1 patch has no neighbours" in point.reason


def test_a_3d_patch_with_three_long_sides_is_not_judged() -> None:
    patch = PatchNd((3, 6, 4), 8)
    kernel = torch.randn(16, 8, 3, 6, 4, generator=torch.Generator().manual_seed(0))
    evidence = rank_orders(conv_weight_to_linear_nd(kernel, "dhwc"), patch)
    assert evidence.winner is None and not evidence.clear and evidence.ranking == ()
    assert evidence.reason.startswith("not judged: a d=3,h=6,w=4,c=8 patch has three spatial")
    assert len(evidence.candidates) == 24
    assert not any(evidence.favours_other_than(o) for o in orders_for(3))


def test_a_pointwise_3d_follower_needs_no_evidence() -> None:
    evidence = rank_orders(torch.randn(5, 12), PatchNd((1, 1, 1), 12))
    assert evidence.winner == "cdhw" and "all 24 orders are the same permutation" in evidence.reason


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_a_3d_patch_of_depth_1_is_read_as_the_2d_patch_it_is(layout) -> None:
    """The trained 6×4×16 sample head as a 1×6×4 clip: same scores, same verdict as in 2-D."""
    truth = {"nchw": ("chw", "cdhw"), "nhwc": ("hwc", "dhwc")}[layout]
    weight = torch.load(SAMPLES / f"trained_{layout}.pt", weights_only=True)["fc.weight"]
    as_2d = rank_orders(weight, Patch(6, 4, 16))
    as_3d = rank_orders(weight, PatchNd((1, 6, 4), 16))
    assert as_2d.winner == truth[0]
    assert truth[1] in as_3d.group_of(as_3d.winner) and as_3d.clear
    assert as_3d.score(truth[1]) == pytest.approx(as_2d.score(truth[0]), abs=1e-12)
    assert as_3d.margin == pytest.approx(as_2d.margin, abs=1e-12)


def _neighbour_pairs(patch: PatchNd, order: str) -> set[tuple[int, int]]:
    """Columns that sit next to each other along some spatial axis, read in ``order``."""
    table = index_map_nd(patch, order)
    pairs = set()
    for axis in range(1, table.dim()):
        first = table.narrow(axis, 0, table.shape[axis] - 1).flatten().tolist()
        second = table.narrow(axis, 1, table.shape[axis] - 1).flatten().tolist()
        pairs |= {(min(a, b), max(a, b)) for a, b in zip(first, second, strict=True)}
    return pairs


@pytest.mark.parametrize(
    "sizes",
    [(1,), (2,), (5,), (1, 1, 1), (1, 2, 3), (2, 2, 1), (2, 2, 2), (1, 3, 3), (3, 1, 2)],
)
def test_families_are_exactly_the_orders_with_the_same_neighbours(sizes) -> None:
    """Groups are exactly equal index maps; families exactly equal neighbour pairs."""
    for channels in (1, 2, 3):
        patch = PatchNd(sizes, channels)
        groups, families = permutation_groups(patch), indistinguishable_families(patch)
        for a, b in itertools.combinations(orders_for(patch.ndim), 2):
            same_map = torch.equal(index_map_nd(patch, a), index_map_nd(patch, b))
            assert same_map == any(a in g and b in g for g in groups), (patch, a, b)
            if sum(sizes) > len(sizes):  # some neighbours to compare
                same_pairs = _neighbour_pairs(patch, a) == _neighbour_pairs(patch, b)
                assert same_pairs == any(a in f and b in f for f in families), (patch, a, b)
