"""Flatten order from evidence: trained heads are recognised, ties are exact, noise is noise."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcconv.errors import SpecError
from fcconv.evidence import (
    MIN_MARGIN,
    MIN_SIGMAS,
    OrderEvidence,
    indistinguishable_families,
    permutation_groups,
    rank_orders,
)
from fcconv.geometry import (
    ORDERS,
    Patch,
    coinciding_orders,
    conv_weight_to_linear,
    index_map,
    linear_weight_to_conv,
)

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
TRAINED_PATCH = Patch(6, 4, 16)
TRUE_ORDER = {"nchw": "chw", "nhwc": "hwc"}


def trained_kernel(layout: str) -> torch.Tensor:
    """The committed trained head's weight as the conv kernel ``[12, 16, 6, 4]``."""
    path = SAMPLES / f"trained_{layout}.pt"
    state = torch.load(path, weights_only=True)
    weight = state["fc.weight"]
    assert weight.shape == (12, TRAINED_PATCH.features)
    return linear_weight_to_conv(weight, TRAINED_PATCH, TRUE_ORDER[layout])


def judge(kernel: torch.Tensor, order: str) -> OrderEvidence:
    """Flatten ``kernel`` in ``order`` and let the evidence name the order."""
    _, channels, height, width = kernel.shape
    return rank_orders(conv_weight_to_linear(kernel, order), Patch(height, width, channels))


def test_trained_samples_are_small_plain_state_dicts():
    for layout in TRUE_ORDER:
        path = SAMPLES / f"trained_{layout}.pt"
        assert path.stat().st_size < 2_000_000
        state = torch.load(path, weights_only=True)
        assert set(state) == {"fc.weight", "fc.bias"}
        assert state["fc.bias"].shape == (12,)
        assert state["fc.weight"].dtype == torch.float32


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("layout", sorted(TRUE_ORDER))
def test_trained_head_flattened_in_any_order_is_recognised(layout, order):
    evidence = judge(trained_kernel(layout), order)
    assert evidence.winner == order, evidence.reason
    assert evidence.clear
    assert evidence.candidates == (order,)
    assert evidence.ranking[0][0] == order
    assert evidence.margin >= MIN_MARGIN
    assert evidence.margin_sigmas >= MIN_SIGMAS
    assert evidence.reason.startswith(f"{order} scores ")
    # the warning: silent for the right order, raised for every other one
    assert not evidence.favours_other_than(order)
    assert all(evidence.favours_other_than(other) for other in ORDERS if other != order)


@pytest.mark.parametrize("layout", sorted(TRUE_ORDER))
def test_the_right_reading_scores_the_same_whatever_the_flatten(layout):
    """Read in its own order, every flattening gives back the same kernel and score."""
    kernel = trained_kernel(layout)
    reference = judge(kernel, TRUE_ORDER[layout])
    for order in ORDERS:
        evidence = judge(kernel, order)
        assert evidence.score(order) == pytest.approx(reference.ranking[0][1], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_precision_weights(dtype):
    kernel = trained_kernel("nhwc")
    evidence = judge(kernel.to(dtype), "hwc")
    assert evidence.winner == "hwc", evidence.reason
    reference = judge(kernel, "hwc")
    assert evidence.score("hwc") == pytest.approx(reference.score("hwc"), abs=0.01)


@pytest.mark.parametrize(("layout", "pair"), [("nchw", ("chw", "cwh")), ("nhwc", ("hwc", "whc"))])
def test_square_patch_transpose_is_named_not_guessed(layout, pair):
    square = trained_kernel(layout)[:, :, :4, :]  # a trained 4x4 patch
    patch = Patch(4, 4, 16)
    for order in pair:
        evidence = judge(square, order)
        assert evidence.winner is None
        assert evidence.clear, "the family itself is clearly right"
        assert evidence.candidates == pair
        assert evidence.family_of(order) == tuple(sorted(pair, key=ORDERS.index))
        assert evidence.reason == (
            f"{pair[0]} and {pair[1]} read a square patch as transposes of each "
            "other; the weights cannot tell them apart"
        )
        # equal scores because the two are transposes, decided from the index maps
        assert evidence.score(pair[0]) == evidence.score(pair[1])
        assert torch.equal(index_map(patch, pair[0]), index_map(patch, pair[1]).transpose(1, 2))
        assert not any(evidence.favours_other_than(o) for o in pair)
        assert all(evidence.favours_other_than(o) for o in ORDERS if o not in pair)


@pytest.mark.parametrize("layout", sorted(TRUE_ORDER))
def test_width_one_patch_groups_coinciding_spellings(layout):
    column = trained_kernel(layout)[:, :, :, :1]  # a trained 6x1 patch
    patch = Patch(6, 1, 16)
    c_first, h_first = ("chw", "cwh", "wch"), ("hcw", "hwc", "whc")
    truth = "chw" if layout == "nchw" else "hwc"
    same = c_first if truth == "chw" else h_first
    evidences = [judge(column, order) for order in same]
    for order, evidence in zip(same, evidences, strict=True):
        assert evidence.groups == (c_first, h_first)
        assert evidence.families == ((same, h_first if same == c_first else c_first))
        assert evidence.group_of(order) == same
        assert evidence.winner == truth, evidence.reason
        assert evidence.candidates == (truth,)
        assert not any(evidence.favours_other_than(o) for o in same)
    # the three spellings are literally the same weight, hence the same evidence
    weights = [conv_weight_to_linear(column, order) for order in same]
    assert all(torch.equal(weights[0], w) for w in weights[1:])
    assert evidences[0] == evidences[1] == evidences[2]
    for group in evidences[0].groups:
        assert group == tuple(coinciding_orders(patch, group[0]))


def test_one_by_one_patch_has_no_evidence_and_needs_none():
    evidence = rank_orders(torch.randn(10, 16), Patch(1, 1, 16))
    assert evidence.ranking == ()
    assert evidence.groups == (ORDERS,)
    assert evidence.winner == "chw"
    assert evidence.margin is None and not evidence.clear
    assert "1x1 patch has no neighbours" in evidence.reason
    assert "same permutation" in evidence.reason
    assert not any(evidence.favours_other_than(o) for o in ORDERS)
    assert evidence.score("hwc") is None


def test_two_position_patch_offers_no_evidence():
    evidence = rank_orders(torch.randn(10, 2 * 3), Patch(2, 1, 3))
    assert evidence.ranking == ()
    assert evidence.winner is None
    assert evidence.candidates == ("chw", "hwc")
    assert evidence.reason.startswith("no evidence: a 2x1x3 patch has two positions")


def _neighbour_pairs(patch: Patch, order: str) -> set[tuple[int, int]]:
    im = index_map(patch, order)
    down = zip(im[:, :-1, :].flatten().tolist(), im[:, 1:, :].flatten().tolist(), strict=True)
    across = zip(im[:, :, :-1].flatten().tolist(), im[:, :, 1:].flatten().tolist(), strict=True)
    return {(min(a, b), max(a, b)) for a, b in itertools.chain(down, across)}


@pytest.mark.parametrize("height", [1, 2, 3, 4])
def test_families_are_exactly_the_orders_with_the_same_neighbours(height):
    """No statistic of neighbouring columns can separate orders with equal neighbour
    pairs; the families are exactly those, and the groups exactly equal index maps."""
    for width, channels in itertools.product(range(1, 5), range(1, 4)):
        patch = Patch(height, width, channels)
        groups = permutation_groups(patch)
        for a, b in itertools.combinations(ORDERS, 2):
            same_map = torch.equal(index_map(patch, a), index_map(patch, b))
            assert same_map == any(a in g and b in g for g in groups), (patch, a, b)
        families = indistinguishable_families(patch)
        for a, b in itertools.combinations(ORDERS, 2):
            same_pairs = _neighbour_pairs(patch, a) == _neighbour_pairs(patch, b)
            same_family = any(a in f and b in f for f in families)
            if patch.height * patch.width > 1:
                assert same_pairs == same_family, (patch, a, b)
            if same_family and not any(a in g and b in g for g in groups):
                assert patch.height == patch.width  # a transpose, nothing else


@pytest.mark.parametrize("seed", range(4))
def test_random_weight_of_the_sample_shape_is_no_clear_evidence(seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(12, TRAINED_PATCH.features, generator=generator)
    evidence = rank_orders(weight, TRAINED_PATCH)
    assert evidence.winner is None
    assert not evidence.clear
    assert evidence.reason == "no clear evidence: random-looking weights"
    assert len(evidence.candidates) > 1
    assert not any(evidence.favours_other_than(o) for o in ORDERS)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out_features=st.integers(1, 48),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    channels=st.integers(1, 12),
    kind=st.sampled_from(["normal", "uniform", "heavy", "half"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_weights_never_give_a_confident_answer(
    out_features, height, width, channels, kind, seed
):
    patch = Patch(height, width, channels)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, patch.features, generator=generator)
    if kind == "uniform":
        weight = torch.rand(out_features, patch.features, generator=generator)
    elif kind == "heavy":
        weight = weight**3
    elif kind == "half":
        weight = weight.half()
    evidence = rank_orders(weight, patch)
    assert not any(evidence.favours_other_than(o) for o in ORDERS)
    assert not evidence.clear
    if len(evidence.groups) > 1:
        assert evidence.winner is None, evidence.reason
        assert len(evidence.candidates) > 1
    else:
        assert evidence.winner == "chw"  # one permutation: nothing to guess


def test_wide_heads_are_judged_on_a_bounded_number_of_rows():
    weight = torch.randn(2048, 4096)
    evidence = rank_orders(weight, Patch(8, 8, 64))
    assert evidence.rows_used == 128
    assert evidence.winner is None


def test_evidence_is_deterministic_and_json_ready():
    kernel = trained_kernel("nchw")
    first, second = judge(kernel, "hwc"), judge(kernel, "hwc")
    assert first == second
    document = json.loads(json.dumps(first.to_dict()))
    assert document["winner"] == "hwc"
    assert document["patch"] == "6x4x16"
    assert [entry["order"] for entry in document["ranking"]][0] == "hwc"
    assert len(document["ranking"]) == 6
    assert document["thresholds"] == {"min_margin": MIN_MARGIN, "min_sigmas": MIN_SIGMAS}
    assert document["margin_sigmas"] >= MIN_SIGMAS


def test_non_finite_and_constant_weights_offer_no_evidence():
    patch = Patch(3, 3, 2)
    weight = torch.randn(4, 18)
    weight[1, 5] = float("nan")
    evidence = rank_orders(weight, patch)
    assert evidence.winner is None and "NaN" in evidence.reason
    evidence = rank_orders(torch.ones(4, 18), patch)
    assert evidence.winner is None and "constant" in evidence.reason


def test_wrong_shape_is_a_spec_error():
    with pytest.raises(SpecError, match="expected \\[out, 384\\]"):
        rank_orders(torch.zeros(3, 100), TRAINED_PATCH)
