"""Paired bootstrap over entities: intervals for AUC and its differences.

Query rows of one entity are not independent (an entity's rows share its
taste, its support and its adapted embedding), so the unit of resampling is
the entity: a resample draws the entities with replacement, each keeping all
its rows, and every statistic is recomputed on it. Scores of several models
on the same rows are resampled with the *same* draws, so a difference of two
models is taken resample by resample (a paired bootstrap): what the two share
(the entities drawn) cancels, and what separates them is left.

AUC per resample is exact, the Mann-Whitney statistic of the resampled rows
with ties counted one half, and costs no sort per resample: the rows are
sorted once, the pair counts between every two entities are tabulated once
(`pairs[a, b]` = positive rows of a ranked above negative rows of b), and a
resample drawing entity e c_e times has

    AUC = sum_ab c_a c_b pairs[a, b] / (sum_a c_a pos_a * sum_b c_b neg_b),

one matrix product for every resample at once. The counts are integers and
the pair table holds half-integers stored doubled, so the arithmetic is exact
in float64: identical scores give a difference of exactly 0 in every resample.
Above `MAX_UNITS` entities, the entities are dealt (seeded) into `MAX_UNITS`
blocks that are resampled whole; blocks of independent entities are
independent, so the bootstrap stays valid and its cost stays bounded.

The interval is the percentile interval of the resampled statistic: at
`level` 0.9 the 5th and 95th percentiles of 1000 resamples (the defaults).

TensorFlow-free (numpy only), so the evaluation of any model can use it.

Example:

    boot = EntityBootstrap(entity_ids, labels, n_resamples=1000, seed=0)
    lift = boot.auc(candidate_scores) - boot.auc(global_scores)
    low, high = lift.interval(0.9)   # a paired 90% interval of the AUC lift
    lift.summary()                   # {"estimate", "low", "high", "level"}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.9
# Most resampling units: the pair table is MAX_UNITS**2 and one resample costs
# MAX_UNITS**2 multiply-adds, so 1000 resamples stay well under a second.
MAX_UNITS = 500


@dataclasses.dataclass(frozen=True)
class Resampled:
    """A statistic on the data as observed, and once per resample of its entities.

    Statistics of one `EntityBootstrap` share its resamples, so they can be
    subtracted and averaged resample by resample: `a - b` is the paired
    difference, `Resampled.mean([...])` the mean of several (over support
    sizes, or over seeds).

    Attributes:
        estimate: The statistic on the observed rows.
        samples: Float array [n_resamples]; NaN where a resample holds one
            class only (no AUC).
    """

    estimate: float
    samples: np.ndarray

    def __sub__(self, other: Resampled) -> Resampled:
        _check_paired(self, other)
        return Resampled(self.estimate - other.estimate, self.samples - other.samples)

    def __add__(self, other: Resampled) -> Resampled:
        _check_paired(self, other)
        return Resampled(self.estimate + other.estimate, self.samples + other.samples)

    @staticmethod
    def mean(items: Sequence[Resampled]) -> Resampled:
        """The mean of statistics of the same resamples, resample by resample.

        Raises:
            ValueError: `items` is empty.
        """
        if not items:
            raise ValueError("Resampled.mean needs at least one statistic, got none")
        for item in items[1:]:
            _check_paired(items[0], item)
        return Resampled(
            float(np.mean([i.estimate for i in items])),
            np.mean(np.stack([i.samples for i in items]), axis=0),
        )

    def interval(self, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
        """The percentile interval: (low, high) holding `level` of the resamples.

        NaN resamples are left out; (nan, nan) when every one is NaN.

        Raises:
            ValueError: `level` outside (0, 1).
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"interval level must be in (0, 1), got {level!r}")
        finite = self.samples[np.isfinite(self.samples)]
        if finite.size == 0:
            return float("nan"), float("nan")
        tail = 50.0 * (1.0 - level)
        low, high = np.percentile(finite, [tail, 100.0 - tail])
        return float(low), float(high)

    def summary(self, level: float = DEFAULT_LEVEL) -> dict[str, float]:
        """{"estimate", "low", "high", "level"}: plain floats, JSON-ready."""
        low, high = self.interval(level)
        return {
            "estimate": float(self.estimate),
            "low": low,
            "high": high,
            "level": float(level),
        }


def _check_paired(a: Resampled, b: Resampled) -> None:
    if a.samples.shape != b.samples.shape:
        raise ValueError(
            "Resampled statistics combine only over the same resamples: got "
            f"{a.samples.shape[0]} and {b.samples.shape[0]} resamples; take both "
            "from one EntityBootstrap"
        )


class EntityBootstrap:
    """Resamples of the entities of a set of scored rows, drawn once.

    Args:
        entity_ids: The entity of each row, shape [N] (any hashable dtype).
        labels: 0/1 label of each row, shape [N].
        n_resamples: Number of resamples (>= 1).
        seed: Seeds the draws (and the blocks above `max_units`).
        max_units: Most resampling units; above it the entities are dealt
            into this many blocks, resampled whole.

    Raises:
        ValueError: Shapes differ, no rows, n_resamples < 1 or max_units < 1.

    Example:

        boot = EntityBootstrap(ids, labels, n_resamples=500, seed=0)
        boot.auc(scores).interval(0.95)
    """

    def __init__(
        self,
        entity_ids: np.ndarray,
        labels: np.ndarray,
        n_resamples: int = DEFAULT_RESAMPLES,
        seed: int = 0,
        max_units: int = MAX_UNITS,
    ):
        entity_ids = np.asarray(entity_ids).ravel()
        labels = np.asarray(labels).ravel()
        if entity_ids.shape != labels.shape:
            raise ValueError(
                f"entity_ids and labels must have one entry per row, got "
                f"{entity_ids.shape[0]} and {labels.shape[0]}"
            )
        if labels.size == 0:
            raise ValueError("EntityBootstrap needs at least one row, got 0")
        if isinstance(n_resamples, bool) or int(n_resamples) < 1:
            raise ValueError(f"n_resamples must be >= 1, got {n_resamples!r}")
        if int(max_units) < 1:
            raise ValueError(f"max_units must be >= 1, got {max_units!r}")
        self.n_resamples = int(n_resamples)
        self.seed = seed
        rng = np.random.default_rng(seed)
        _, entity = np.unique(entity_ids, return_inverse=True)
        self.entity = entity.ravel()
        self.n_entities = int(self.entity.max()) + 1
        self.positive = labels.astype(np.float64) > 0.5
        if self.n_entities <= max_units:
            self.unit_of_entity = np.arange(self.n_entities)
        else:
            dealt = rng.permutation(self.n_entities)
            self.unit_of_entity = dealt % int(max_units)
        self.n_units = int(self.unit_of_entity.max()) + 1
        self.unit = self.unit_of_entity[self.entity]
        # A resample draws n_units units with replacement; counts[b, u] is how
        # often unit u was drawn in resample b.
        draws = rng.integers(0, self.n_units, size=(self.n_resamples, self.n_units))
        offsets = np.arange(self.n_resamples)[:, None] * self.n_units
        self.counts = (
            np.bincount((draws + offsets).ravel(), minlength=draws.size)
            .reshape(self.n_resamples, self.n_units)
            .astype(np.float64)
        )
        self.pos_per_unit = np.bincount(
            self.unit, weights=self.positive, minlength=self.n_units
        )
        self.neg_per_unit = np.bincount(
            self.unit, weights=~self.positive, minlength=self.n_units
        )
        self._ones = np.ones(self.n_units)

    @property
    def n_rows(self) -> int:
        return int(self.entity.size)

    def _scores(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if scores.shape != self.entity.shape:
            raise ValueError(
                f"scores must have one entry per row of the bootstrap ({self.n_rows}),"
                f" got {scores.shape[0]}"
            )
        if not np.isfinite(scores).all():
            raise ValueError(
                f"{int((~np.isfinite(scores)).sum())} of {scores.size} scores are "
                "not finite; an AUC interval needs finite scores"
            )
        return scores

    def pair_table(self, scores: np.ndarray) -> np.ndarray:
        """Doubled pair counts between units, float64 [n_units, n_units].

        `table[a, b]` = 2 * #(positive row of a, negative row of b) with the
        positive scored higher, + #(such pairs tied). Exact integers.
        """
        scores = self._scores(scores)
        n = scores.size
        order = np.argsort(scores, kind="mergesort")
        sorted_scores = scores[order]
        positive = self.positive[order]
        unit = self.unit[order]
        # Tie groups of the sorted scores: each row's group [start, end).
        new = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
        group = np.cumsum(new) - 1
        starts = np.flatnonzero(new)
        ends = np.r_[starts[1:], n]
        pos_rows = np.flatnonzero(positive)
        neg_rows = np.flatnonzero(~positive)
        units = self.n_units
        if pos_rows.size == 0 or neg_rows.size == 0:
            return np.zeros((units, units))
        # A positive in tie group [lo, hi) beats the negatives before lo and
        # ties those in [lo, hi): doubled, below(lo) + below(hi), where
        # below(x)[b] counts the negatives of unit b among the first x rows.
        # Each position x is weighed with its positive's unit a: table[a] sums
        # below(x) over the positions of a's positives.
        xs = np.concatenate([starts[group[pos_rows]], ends[group[pos_rows]]])
        a = np.concatenate([unit[pos_rows], unit[pos_rows]])
        # below(x) = the negatives before x's chunk of `size` rows (a dense
        # table per chunk, one matrix product) + those in the chunk before x
        # (fewer than `size`, enumerated), so no [rows, units] array is built.
        size = max(8, units // 8)
        chunks = n // size + 1
        per_chunk = np.bincount(
            (neg_rows // size) * units + unit[neg_rows], minlength=chunks * units
        ).reshape(chunks, units)
        before_chunk = np.cumsum(per_chunk, axis=0) - per_chunk
        weights = np.bincount(
            (xs // size) * units + a, minlength=chunks * units
        ).reshape(chunks, units)
        table = weights.T.astype(np.float64) @ before_chunk.astype(np.float64)
        j = xs[:, None] - np.arange(1, size + 1)[None, :]
        local = (j >= ((xs // size) * size)[:, None]) & ~positive[np.maximum(j, 0)]
        pairs = np.broadcast_to(a[:, None], j.shape)[local] * units + unit[j[local]]
        table += np.bincount(pairs, minlength=units * units).reshape(units, units)
        return table

    def auc(self, scores: np.ndarray) -> Resampled:
        """Overall AUC of `scores`, observed and per resample (exact)."""
        table = self.pair_table(scores)
        return Resampled(
            _auc_from(table, self._ones[None, :], self.pos_per_unit, self.neg_per_unit)[
                0
            ],
            _auc_from(table, self.counts, self.pos_per_unit, self.neg_per_unit),
        )

    def entity_auc(self, scores: np.ndarray) -> np.ndarray:
        """Each entity's own AUC, float [n_entities]; NaN with one class."""
        scores = self._scores(scores)
        order = np.lexsort((scores, self.entity))
        entity = self.entity[order]
        sorted_scores = scores[order]
        positive = self.positive[order]
        n = scores.size
        new = np.r_[
            True,
            (entity[1:] != entity[:-1]) | (sorted_scores[1:] != sorted_scores[:-1]),
        ]
        group = np.cumsum(new) - 1
        starts = np.flatnonzero(new)
        ends = np.r_[starts[1:], n]
        below = np.r_[0.0, np.cumsum(~positive)]
        entity_start = np.flatnonzero(np.r_[True, entity[1:] != entity[:-1]])
        start_of_row = entity_start[
            np.cumsum(np.r_[True, entity[1:] != entity[:-1]]) - 1
        ]
        rows = np.flatnonzero(positive)
        doubled = (
            below[starts[group[rows]]]
            + below[ends[group[rows]]]
            - 2.0 * below[start_of_row[rows]]
        )
        wins = np.bincount(entity[rows], weights=doubled, minlength=self.n_entities)
        pos = np.bincount(self.entity, weights=self.positive, minlength=self.n_entities)
        neg = np.bincount(
            self.entity, weights=~self.positive, minlength=self.n_entities
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            out = wins / (2.0 * pos * neg)
        out[(pos == 0) | (neg == 0)] = np.nan
        return out

    def member_auc(self, scores: np.ndarray) -> Resampled:
        """Mean per-entity AUC over the entities with both classes, observed
        and per resample (an entity drawn twice counts twice)."""
        per_entity = self.entity_auc(scores)
        valid = np.isfinite(per_entity)
        total = np.bincount(
            self.unit_of_entity[valid],
            weights=per_entity[valid],
            minlength=self.n_units,
        )
        held = np.bincount(self.unit_of_entity[valid], minlength=self.n_units).astype(
            np.float64
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            samples = (self.counts @ total) / (self.counts @ held)
            estimate = float(total.sum() / held.sum()) if held.sum() else float("nan")
        return Resampled(estimate, samples)


def _auc_from(
    table: np.ndarray, counts: np.ndarray, pos: np.ndarray, neg: np.ndarray
) -> np.ndarray:
    """AUC per row of `counts` [R, units] from a doubled pair table."""
    doubled = ((counts @ table) * counts).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return doubled / (2.0 * (counts @ pos) * (counts @ neg))


def paired_difference(
    entity_ids: np.ndarray,
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same rows, with its paired bootstrap interval.

    Returns:
        {"estimate", "low", "high", "level"}.

    Example:

        paired_difference(ids, labels, candidate, baseline, seed=0)
        # {"estimate": 0.0123, "low": 0.0041, "high": 0.0207, "level": 0.9}
    """
    boot = EntityBootstrap(entity_ids, labels, n_resamples, seed)
    return (boot.auc(scores_a) - boot.auc(scores_b)).summary(level)
