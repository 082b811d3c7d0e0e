"""Which flatten order a Linear weight was trained with, judged from the weight alone.

A Linear layer that reads a ``kh × kw × C`` patch (or ``L × C``, or
``D × H × W × C``) has one weight column per patch element. In a trained
layer the columns that read one channel at neighbouring positions are alike:
neighbouring features are alike, and weight decay spreads the weight evenly
over inputs that move together. Read in a wrong order, the "neighbours" are
columns of far-apart positions or of other channels, and the likeness is gone.

**The statistic.** For one order, take the kernel
``K = linear_weight_to_conv(weight, patch, order)`` and, per channel ``c`` and
direction (down ``i → i+1``, across ``j → j+1``; along ``l`` in 1-D, and also
from frame to frame in 3-D), the contiguity ratio of Geary, summed over the
output rows::

    ratio = mean over neighbour pairs (a, b) in that direction  ‖K[:, c, a] − K[:, c, b]‖²
            / mean over all pairs of positions (a, b) of channel c ‖K[:, c, a] − K[:, c, b]‖²

The direction's score is the mean of ``1 − ratio`` over channels (each channel
counts alike, however large its weights), and the order's score is the
*lowest* of its directions' scores. It reads "neighbouring columns differ
this much less than any two columns of the channel": near 0 for weights
without spatial structure, up to 1 for smooth ones. Taking the lower
direction matters: a half-right reading such as ``hcw`` for a ``chw`` head
pairs every column with its true neighbour across (only the channel and row
labels are wrong) and so keeps half the evidence of a mean, but none of the
minimum.

**The noise.** A clear margin is judged against the same weight with its
columns shuffled at random (fixed seed: the answer is deterministic). Under
shuffling every order is as good as any other, so the spread of those scores
is exactly how far apart orders drift by chance for *this* weight, whatever
its size, scale or tails.

**What cannot be known** is decided exactly, never from the scores: orders
with equal :func:`~fcconv.geometry.index_map` are the same permutation;
orders whose kernels have the same pairs of neighbouring columns are
different permutations that no statistic of this kind can tell apart (on a
square patch, the two readings that swap ``h`` and ``w``: a transpose; in
3-D, any renaming of spatial axes of equal length).

A 1-D patch has two orders (``cl``, ``lc``), a 2-D one six, a 3-D one 24.
A 3-D patch is judged only when a side is 1 (it is then read exactly like a
1-D or 2-D one): with three sides longer than 1, trained heads re-flattened
in each of the 24 orders showed wrong readings scoring *above* the right one
(``benchmarks/evidence_nd.py``), so no margin could be trusted and fcconv
asks for the order instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from fcconv.errors import SpecError
from fcconv.geometry import same_permutation, spatial_relabellings
from fcconv.patches import AnyPatch, as_nd, orders_for, parse_order_nd
from fcconv.verify.arrays import as_array
from fcconv.verify.exact import linear_columns

MIN_MARGIN = 0.1
"""Smallest lead in score of the best family over the next that counts as clear.

The trained sample heads, flattened in each of the six orders, lead by 0.24
to 0.36. The floor keeps a big head, whose noise is tiny, from being judged
on a slight systematic lean.
"""

MIN_SIGMAS = 8.0
"""Smallest lead, in standard deviations of the shuffled-column noise, that counts.

Measured on 1,650 random weights (normal, uniform and cubed normal entries,
eleven shapes from 1×384 to 256×1568) the lead never exceeded 4.2 noise
deviations (99.9 % stayed below 4.0); the trained sample heads, flattened in
each of the six orders, lead by 15 to 26.
"""

NULL_SAMPLES = 24, 128
"""Fewest and most column shuffles scored to measure the noise."""

NULL_ELEMENTS = 1 << 23
"""Elements all shuffles together may read, when that allows more than the fewest."""

READ_ELEMENTS = 1 << 19
"""About this many weight elements are judged: whole output rows, evenly spaced.

Time is bounded by the patch, not by the head: VGG's fc6 (4096 × 25088) is
judged on 20 of its rows, which already holds its noise near 0.001, far below
what ``MIN_MARGIN`` asks.
"""

MIN_ROWS = 4
"""Rows read at least (all of them in a smaller head), however wide the rows."""

BLOCK_ELEMENTS = 1 << 19
"""Elements of the weight converted to the compute dtype at once (bounds memory)."""

MAX_FEATURES = 1 << 22
"""The widest patch (``C·kh·kw``) judged: wider ones are reported without evidence.

The ranking gathers the columns once per family through an index map of
``in_features`` entries, so its memory grows with the patch, not the rows
read. 4M features (VGG's fc6 has 25,088) keep that under ~200 MB whatever
a file declares.
"""

_SEED = 0
_FAMILIAR = ("chw", "hwc", "cl", "lc", "cdhw", "dhwc")

FLIP_UNSEEN = (
    "a flip of the patch (a kernel for a framework that convolves) cannot be seen here: "
    "flipping keeps every pair of neighbouring columns, so it scores the same; fcconv "
    "verify tells a flipped kernel exactly, by its permutation"
)
"""What the weights cannot tell about a flip, said wherever the evidence is shown."""


@dataclass(frozen=True)
class OrderEvidence:
    """The flatten orders (two, six or 24 by rank) ranked by the evidence in one Linear weight.

    Attributes:
        patch: The patch the weight was judged against.
        ranking: Every order with its score, best first; orders of one family
            share one score. Empty when the patch offers no evidence (1×1,
            2×1, or all orders one permutation).
        groups: Orders that are the same permutation for this patch (equal
            index maps): spellings of one conversion, e.g. ``chw``, ``cwh``
            and ``hcw`` on a ``1×W`` patch. In ``ORDERS`` order.
        families: Unions of groups that no neighbour statistic can tell apart
            (the same neighbour pairs), best first when there is a ranking.
            A family of more than one group holds genuinely different
            permutations, e.g. ``chw`` and ``cwh`` on a square patch.
        margin: Score of the best family minus that of the next; ``None``
            without a ranking or with a single family.
        noise: Standard deviation of the scores of the weight with its
            columns shuffled: how far orders drift apart by chance.
        clear: Whether the best family leads the next by at least
            ``MIN_MARGIN`` and ``MIN_SIGMAS`` × ``noise``.
        winner: The order to use, only where it is known: a clear lead of a
            family of one permutation, or a patch on which all six orders are
            one permutation. Otherwise ``None``.
        candidates: The orders still in question, one spelling per
            permutation (``chw`` or ``hwc`` where the group has it), best
            first; ``(winner,)`` when there is a winner.
        reason: One line in plain words: what was found, or why not.
        rows_used: How many output rows of the weight were read.
    """

    patch: AnyPatch
    ranking: tuple[tuple[str, float], ...]
    groups: tuple[tuple[str, ...], ...]
    families: tuple[tuple[str, ...], ...]
    margin: float | None
    noise: float | None
    clear: bool
    winner: str | None
    candidates: tuple[str, ...]
    reason: str
    rows_used: int

    @property
    def margin_sigmas(self) -> float | None:
        """The margin in units of ``noise`` (``None`` without a margin)."""
        if self.margin is None or self.noise is None:
            return None
        if self.noise == 0:
            return math.inf if self.margin > 0 else 0.0
        return self.margin / self.noise

    def _order(self, order: str) -> str:
        return parse_order_nd(order, as_nd(self.patch).ndim)

    def score(self, order: str) -> float | None:
        """The score of ``order``; ``None`` when the patch offers no evidence."""
        order = self._order(order)
        return dict(self.ranking).get(order)

    def group_of(self, order: str) -> tuple[str, ...]:
        """The spellings that are the same permutation as ``order`` on this patch."""
        order = self._order(order)
        return next(group for group in self.groups if order in group)

    def family_of(self, order: str) -> tuple[str, ...]:
        """The orders the weights cannot tell apart from ``order`` (itself included)."""
        order = self._order(order)
        return next(family for family in self.families if order in family)

    def favours_other_than(self, order: str) -> bool:
        """Whether the evidence clearly points to a family that ``order`` is not in.

        The test for a one-line warning when the user's ``--order`` (or the
        default ``chw``) disagrees with the weights. ``False`` when the
        evidence is not clear, and when ``order`` is only indistinguishable
        from the best (a transpose): the weights cannot say it is wrong.
        """
        order = self._order(order)
        return self.clear and order not in self.families[0]

    def ranking_text(self) -> str:
        """``chw 0.419, wch 0.100, …; margin 0.319 = 21.9σ of noise`` in one line."""
        scores = ", ".join(f"{order} {score:.3f}" for order, score in self.ranking) or "no scores"
        sigmas = self.margin_sigmas
        if self.margin is None or sigmas is None:
            return scores
        return f"{scores}; margin {self.margin:.3f} = {sigmas:.1f}σ of noise"

    def disagreement(self, name: str, order: str) -> str:
        """``the weights of fc favour order hwc (0.362) over chw (-0.006)``."""
        best = self.families[0][0]
        return (
            f"the weights of {name} favour order {'/'.join(self.families[0])} "
            f"({self.score(best):.3f}) over {order} ({self.score(order):.3f})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The same facts as plain JSON-ready values."""
        sigmas = self.margin_sigmas
        return {
            "patch": str(self.patch),
            "ranking": [{"order": o, "score": s} for o, s in self.ranking],
            "groups": [list(group) for group in self.groups],
            "families": [list(family) for family in self.families],
            "margin": self.margin,
            "noise": self.noise,
            "margin_sigmas": sigmas if sigmas is None or math.isfinite(sigmas) else None,
            "clear": self.clear,
            "winner": self.winner,
            "candidates": list(self.candidates),
            "reason": self.reason,
            "rows_used": self.rows_used,
            "thresholds": {"min_margin": MIN_MARGIN, "min_sigmas": MIN_SIGMAS},
            "flip": FLIP_UNSEEN,
        }


def permutation_groups(patch: AnyPatch) -> tuple[tuple[str, ...], ...]:
    """Orders that are the same permutation for ``patch``, by exact index maps.

    >>> from fcconv.patches import Patch, PatchNd
    >>> permutation_groups(Patch(1, 5, 3)), permutation_groups(PatchNd((4,), 1))
    ((('chw', 'cwh', 'hcw'), ('hwc', 'wch', 'whc')), (('cl', 'lc'),))
    """
    orders = orders_for(as_nd(patch).ndim)
    return _partition(orders, lambda a, b: same_permutation(patch, a, b))


def indistinguishable_families(patch: AnyPatch) -> tuple[tuple[str, ...], ...]:
    """Orders that no statistic of neighbouring columns can tell apart.

    Each family is a union of :func:`permutation_groups`. On a square patch,
    the orders that swap the roles of ``h`` and ``w`` (``chw`` and ``cwh``)
    read it as transposes of each other: every column has the same neighbours
    (one's "down" is the other's "across"), so they share a family. Nothing
    else does: the tests check, patch by patch, that orders share a family
    exactly when their kernels have the same pairs of neighbouring columns.

    >>> from fcconv.patches import Patch, PatchNd
    >>> indistinguishable_families(Patch(3, 3, 2))
    (('chw', 'cwh'), ('hcw', 'wch'), ('hwc', 'whc'))
    >>> len(indistinguishable_families(Patch(3, 4, 2)))
    6
    >>> len(indistinguishable_families(PatchNd((2, 3, 3), 4)))  # h and w of 3: pairs
    12
    """
    groups = permutation_groups(patch)
    orders = orders_for(as_nd(patch).ndim)
    families = _partition(
        range(len(groups)), lambda a, b: _is_transpose(patch, groups[a][0], groups[b][0])
    )
    return tuple(
        tuple(sorted((o for g in family for o in groups[g]), key=orders.index))
        for family in families
    )


def _partition(items, same) -> tuple[tuple, ...]:
    classes: list[list] = []
    for item in items:
        for cls in classes:
            if same(cls[0], item):
                cls.append(item)
                break
        else:
            classes.append([item])
    return tuple(tuple(cls) for cls in classes)


def _spelling(orders: tuple[str, ...]) -> str:
    """The familiar name among equivalent spellings: ``chw``, then ``hwc``."""
    return next((o for o in _FAMILIAR if o in orders), orders[0])


def _is_transpose(patch: AnyPatch, first: str, second: str) -> bool:
    """Whether ``first`` reads the patch as a transpose of what ``second`` reads.

    True exactly when renaming spatial axes of equal length (``h`` and ``w``
    of a square patch) turns ``second`` into ``first``, up to axes of length
    1: decided from the patch alone, without index maps.
    """
    return any(
        same_permutation(patch, first, second.translate(table))
        for table in spatial_relabellings(patch)
    )


def _sums(kernel: np.ndarray) -> np.ndarray:
    """``[ndim + 1, C]`` sums over rows of squared steps along each spatial axis, and deviations.

    ``kernel`` is ``[rows, C, *sizes]``; the deviations are from each row's
    channel mean.
    """
    channels, sizes = kernel.shape[1], kernel.shape[2:]
    spatial = tuple(range(2, kernel.ndim))
    sums = np.zeros((len(sizes) + 1, channels), dtype=kernel.dtype)
    for axis, size in enumerate(sizes):
        if size > 1:
            sums[axis] = np.square(np.diff(kernel, axis=2 + axis)).sum((0, *spatial))
    deviation = kernel - kernel.mean(axis=spatial, keepdims=True)
    sums[-1] = np.square(deviation).sum((0, *spatial))
    return sums


def _score(sums: np.ndarray, patch: AnyPatch) -> float:
    """The lowest over directions of the mean over channels of ``1 − ratio``."""
    sizes = as_nd(patch).sizes
    positions = math.prod(sizes)
    # the mean of (a − b)² over all pairs of n values is 2·Σ(x − x̄)² / (n − 1)
    per_pair = 2 * sums[-1] / (positions - 1)
    # a channel whose columns are all equal (up to rounding) has nothing to say
    live = per_pair > 1e-10 * per_pair.max()
    if not bool(live.any()):
        return 0.0
    scores = []
    for axis, size in enumerate(sizes):
        pairs = (size - 1) * positions // size
        if pairs:
            ratio = sums[axis][live] / pairs / per_pair[live]
            scores.append(float(1 - ratio.mean()))
    return min(scores)


def sample_rows(out_features: int, in_features: int) -> np.ndarray:
    """The output rows :func:`rank_orders` reads: evenly spaced, about ``READ_ELEMENTS``.

    A caller holding the weight on disk can read just these rows and pass
    them to :func:`rank_orders`, which then reads all of them: same verdict.
    """
    count = max(MIN_ROWS, READ_ELEMENTS // in_features)
    if out_features <= count:
        return np.arange(out_features)
    return np.linspace(0, out_features - 1, count).round().astype(np.int64)


def _null_count(elements: int) -> int:
    fewest, most = NULL_SAMPLES
    return max(fewest, min(most, NULL_ELEMENTS // max(1, elements)))


def rank_orders(weight: Any, patch: AnyPatch) -> OrderEvidence:
    """Rank the flatten orders by how alike neighbouring weight columns are.

    Args:
        weight: A Linear weight ``[out_features, N]`` of any float dtype, a
            numpy array (bfloat16 and float8 as ``ml_dtypes``) or a torch
            tensor (fp16 and bf16 are judged in float32, fp64 in float64,
            all in numpy). About
            ``READ_ELEMENTS`` of it are read, as whole rows evenly spaced,
            in blocks; it is never modified.
        patch: The patch the layer reads, of any rank (two orders in 1-D,
            six in 2-D, 24 in 3-D).

    Returns:
        The ranking with its scores, the exact ties, and a winner only where
        the weights clearly name one permutation.

    Raises:
        SpecError: If ``weight`` is not a Linear weight for ``patch``.

    A smooth kernel flattened NHWC is recognised; cut square, it is a tie:

    >>> import torch
    >>> from fcconv.geometry import Patch, PatchNd, conv_weight_to_linear, conv_weight_to_linear_nd
    >>> g = torch.Generator().manual_seed(0)
    >>> ramp = torch.linspace(0, 1, 6).view(6, 1) + torch.linspace(0, 1, 4)
    >>> kernel = torch.randn(32, 8, 1, 1, generator=g) * ramp
    >>> kernel += 0.1 * torch.randn(32, 8, 6, 4, generator=g)
    >>> rank_orders(conv_weight_to_linear(kernel, "hwc"), Patch(6, 4, 8)).winner
    'hwc'
    >>> square = conv_weight_to_linear(kernel[:, :, :4], "hwc")
    >>> rank_orders(square, Patch(4, 4, 8)).candidates
    ('hwc', 'whc')
    >>> rank_orders(torch.randn(8, 12), Patch(1, 1, 12)).winner  # nothing to decide
    'chw'
    >>> smooth = torch.randn(32, 8, 1, generator=g) * torch.linspace(0, 1, 12)
    >>> smooth += 0.1 * torch.randn(32, 8, 12, generator=g)
    >>> rank_orders(conv_weight_to_linear_nd(smooth, "lc"), PatchNd((12,), 8)).winner
    'lc'
    """
    return _rank_orders(as_array(weight), patch)


def _rank_orders(weight: np.ndarray, patch: AnyPatch) -> OrderEvidence:
    if weight.ndim != 2 or weight.shape[1] != patch.features:
        raise SpecError(
            f"weight of shape {tuple(weight.shape)} is not a Linear weight for patch "
            f"{patch} (expected [out, {patch.features}])"
        )
    nd = as_nd(patch)
    positions = math.prod(nd.sizes)
    groups = permutation_groups(patch)
    families = indistinguishable_families(patch)
    rows = sample_rows(*weight.shape)
    verdict = partial(_verdict, patch=patch, groups=groups, rows_used=len(rows))
    undecided = tuple(_spelling(group) for group in groups)

    if len(groups) == 1:
        why = "any order gives the same conversion"
        if positions == 1:
            why += f" (and a {'x'.join(['1'] * nd.ndim)} patch has no neighbours to compare)"
        every = {2: "both", 6: "all six"}.get(len(orders_for(nd.ndim)), "all 24")
        reason = f"{every} orders are the same permutation of a {patch} patch; {why}"
        return verdict(families, reason, candidates=undecided, winner=undecided[0])
    if patch.features > MAX_FEATURES:
        reason = (
            f"not judged: a {patch} patch has {patch.features} elements, more than the "
            f"{MAX_FEATURES} fcconv ranks orders for"
        )
        return verdict(families, reason, candidates=undecided)
    if sum(size > 1 for size in nd.sizes) > 2:
        reason = (
            f"not judged: a {patch} patch has three spatial axes longer than 1, and on "
            "trained heads the neighbour statistic ranks some wrong readings of such patches "
            "above the right one"
        )
        return verdict(families, reason, candidates=undecided)
    if weight.shape[0] == 0:
        reason = "no evidence: the weight has no rows"
        return verdict(families, reason, candidates=undecided)
    if positions == 2:
        reason = (
            f"no evidence: a {patch} patch has two positions per channel, so every "
            "pair of its columns is a neighbour pair"
        )
        return verdict(families, reason, candidates=undecided)

    dtype = np.float64 if weight.dtype == np.float64 else np.float32
    step = max(1, BLOCK_ELEMENTS // patch.features)
    chunks = [rows[start : start + step] for start in range(0, len(rows), step)]
    shape = nd.kernel_shape
    cache: list[np.ndarray] = []

    def blocks() -> Iterator[np.ndarray]:
        """The rows read, a block at a time (kept when they are one block)."""
        if cache:
            yield cache[0]
            return
        for chunk in chunks:
            block = weight[chunk].astype(dtype)
            if len(chunks) == 1:
                cache.append(block)
            yield block

    representatives = [family[0] for family in families]
    maps = [linear_columns(nd, order) for order in representatives]
    sums_shape = (nd.ndim + 1, patch.channels)
    real = np.zeros((len(representatives), *sums_shape), dtype=dtype)
    for block in blocks():
        if not bool(np.isfinite(block).all()):
            reason = "no evidence: the weight holds NaN or infinite values"
            return verdict(families, reason, candidates=undecided)
        # gathering the columns in index-map order lays each kernel out contiguously
        for f, columns in enumerate(maps):
            real[f] += _sums(block[:, columns].reshape(len(block), *shape))
    generator = np.random.default_rng(_SEED)
    null = np.zeros((_null_count(len(rows) * patch.features), *sums_shape), dtype=dtype)
    for s in range(len(null)):
        columns = generator.permutation(patch.features)
        for block in blocks():
            null[s] += _sums(block[:, columns].reshape(len(block), *shape))
    if not bool(real[:, -1].any()):
        reason = "no evidence: the weight is constant within every channel"
        return verdict(families, reason, candidates=undecided)

    family_scores = [_score(sums, patch) for sums in real]
    null_scores = np.array([_score(sums, patch) for sums in null], dtype=dtype)
    noise = float(null_scores.std(ddof=1))
    ranked = sorted(range(len(families)), key=lambda f: (-family_scores[f], f))
    families = tuple(families[f] for f in ranked)
    scores = [family_scores[f] for f in ranked]
    ranking = tuple(
        (order, score) for family, score in zip(families, scores, strict=True) for order in family
    )
    found = partial(verdict, families, ranking=ranking, noise=noise)
    best = tuple(_spelling(group) for group in groups if group[0] in families[0])
    if len(families) == 1:
        return found(_tie(patch, best), candidates=best)

    margin = scores[0] - scores[1]
    needed = max(MIN_MARGIN, MIN_SIGMAS * noise)
    if margin < needed:
        in_question = tuple(
            _spelling(group)
            for family, score in zip(families, scores, strict=True)
            if scores[0] - score < needed
            for group in groups
            if group[0] in family
        )
        above_chance = scores[0] - float(null_scores.mean())
        if scores[0] < MIN_MARGIN or above_chance < MIN_SIGMAS / 2 * noise:
            what = "random-looking weights"
        else:
            what = (
                f"{_spelling(families[0])} leads {_spelling(families[1])} by only "
                f"{margin:.3f}, {_sigmas(margin, noise)} sigma of the noise (clear: "
                f"{MIN_MARGIN} and {MIN_SIGMAS:.0f} sigma)"
            )
        reason = f"no clear evidence: {what}"
        return found(reason, margin=margin, candidates=in_question)
    if len(best) > 1:
        return found(_tie(patch, best), margin=margin, candidates=best, clear=True)
    reason = (
        f"{best[0]} scores {scores[0]:.3f}, ahead of {_spelling(families[1])} at "
        f"{scores[1]:.3f} (margin {margin:.3f}, {_sigmas(margin, noise)} sigma of the noise)"
    )
    return found(reason, margin=margin, candidates=best, clear=True, winner=best[0])


def _sigmas(margin: float, noise: float) -> str:
    return f"{margin / noise:.1f}" if noise > 0 else "infinitely many"


def _tie(patch: AnyPatch, candidates: tuple[str, ...]) -> str:
    names = " and ".join(candidates)
    if len(candidates) == 2 and _is_transpose(patch, *candidates):
        how = "read a square patch as transposes of each other"
    else:
        how = "give every column the same neighbours"
    return f"{names} {how}; the weights cannot tell them apart"


def _verdict(
    families: tuple[tuple[str, ...], ...],
    reason: str,
    *,
    patch: AnyPatch,
    groups: tuple[tuple[str, ...], ...],
    rows_used: int,
    candidates: tuple[str, ...],
    ranking: tuple[tuple[str, float], ...] = (),
    margin: float | None = None,
    noise: float | None = None,
    clear: bool = False,
    winner: str | None = None,
) -> OrderEvidence:
    return OrderEvidence(
        patch=patch,
        ranking=ranking,
        groups=groups,
        families=families,
        margin=margin,
        noise=noise,
        clear=clear,
        winner=winner,
        candidates=candidates,
        reason=reason,
        rows_used=rows_used,
    )
