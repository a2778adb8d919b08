"""The paired bootstrap over entities: by hand, exactness, coverage, determinism."""

import ast
import math
import pathlib
import time

import numpy as np
import pytest

from tf_limaml import evaluation, intervals
from tf_limaml.intervals import EntityBootstrap, Resampled

# Two entities: A ranks its positive first (AUC 1), B its negative (AUC 0).
IDS = np.array([b"A", b"A", b"B", b"B"])
LABELS = np.array([1, 0, 1, 0])
SCORES = np.array([0.9, 0.2, 0.3, 0.6])


def _fixed(counts):
    """The tiny bootstrap with hand-chosen resamples (counts per entity)."""
    boot = EntityBootstrap(IDS, LABELS, n_resamples=len(counts), seed=0)
    boot.counts = np.asarray(counts, dtype=np.float64)
    return boot


def test_auc_per_resample_by_hand():
    # {A, A}: only A's pairs, each twice over: 0.9 > 0.2, AUC 1.
    # {B, B}: 0.3 < 0.6, AUC 0.
    # {A, B}: positives 0.9, 0.3 against negatives 0.2, 0.6: 0.9 beats both,
    # 0.3 beats 0.2 only: 3 of 4 pairs, AUC 0.75 (the observed data).
    boot = _fixed([[2, 0], [0, 2], [1, 1]])
    auc = boot.auc(SCORES)
    assert auc.estimate == 0.75
    np.testing.assert_array_equal(auc.samples, [1.0, 0.0, 0.75])
    # Mean per-entity AUC: A 1, B 0; an entity drawn twice counts twice.
    member = boot.member_auc(SCORES)
    assert member.estimate == 0.5
    np.testing.assert_array_equal(member.samples, [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(boot.entity_auc(SCORES), [1.0, 0.0])


def test_ties_count_one_half_and_one_class_gives_nan():
    ids = np.array([b"A", b"A", b"C", b"C", b"D"])
    labels = np.array([1, 0, 1, 0, 1])
    scores = np.array([0.5, 0.5, 0.7, 0.5, 0.1])
    boot = EntityBootstrap(ids, labels, n_resamples=2, seed=0)
    boot.counts = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
    auc = boot.auc(scores)
    # Observed: positives .5, .7, .1 vs negatives .5, .5: .5 ties both (1),
    # .7 beats both (2), .1 loses both (0): 3 of 6.
    assert auc.estimate == 0.5 == evaluation.auc(labels, scores)
    # {A, D}: .5 ties .5 (0.5), .1 loses (0): 0.25. {D, D}: no negative: NaN.
    assert auc.samples[0] == 0.25 and math.isnan(auc.samples[1])
    np.testing.assert_array_equal(boot.entity_auc(scores)[[0, 1]], [0.5, 1.0])
    assert math.isnan(boot.entity_auc(scores)[2])


@pytest.mark.parametrize("max_units", [1000, 7])
def test_each_resample_equals_the_exact_auc_of_its_rows(max_units):
    rng = np.random.default_rng(3)
    rows = rng.integers(1, 12, 40)
    ids = np.repeat([f"e{i}" for i in range(40)], rows)
    labels = rng.random(ids.size) < 0.4
    scores = np.round(labels * 0.4 + rng.normal(size=ids.size), 1)  # many ties
    boot = EntityBootstrap(ids, labels, n_resamples=20, seed=1, max_units=max_units)
    auc, member = boot.auc(scores), boot.member_auc(scores)
    assert auc.estimate == pytest.approx(evaluation.auc(labels, scores), abs=1e-12)
    assert member.estimate == pytest.approx(
        evaluation.mean_entity_auc(ids, labels, scores)[0], abs=1e-12
    )
    per_entity = boot.entity_auc(scores)
    for b in range(boot.n_resamples):
        drawn = boot.counts[b][boot.unit_of_entity].astype(int)  # per entity
        rows_of = [np.flatnonzero(boot.entity == e) for e in range(boot.n_entities)]
        picked = np.concatenate(
            [np.tile(r, c) for r, c in zip(rows_of, drawn, strict=True)]
        )
        assert auc.samples[b] == pytest.approx(
            evaluation.auc(labels[picked], scores[picked]), abs=1e-12
        )
        values = np.repeat(per_entity, drawn)
        assert member.samples[b] == pytest.approx(np.nanmean(values), abs=1e-12)


def test_identical_scores_differ_by_exactly_zero_with_a_zero_width_interval():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(150), 9)
    labels = rng.random(ids.size) < 0.5
    scores = labels + rng.normal(size=ids.size)
    boot = EntityBootstrap(ids, labels, n_resamples=500, seed=0)
    for stat in (boot.auc, boot.member_auc):
        diff = stat(scores) - stat(scores.copy())
        assert diff.estimate == 0.0
        assert np.all(diff.samples == 0.0)
        assert diff.interval(0.95) == (0.0, 0.0)
    assert intervals.paired_difference(ids, labels, scores, scores) == {
        "estimate": 0.0,
        "low": 0.0,
        "high": 0.0,
        "level": 0.9,
    }


def _null_pair(rng, entities, rows=8):
    """Two models whose scores are exchangeable: their true AUC difference is 0."""
    ids = np.repeat(np.arange(entities), rows)
    taste = rng.normal(size=entities)[ids]
    labels = rng.random(ids.size) < 1 / (1 + np.exp(-taste))
    signal = labels + 0.5 * taste
    return (
        ids,
        labels,
        signal + rng.normal(size=ids.size),
        signal + rng.normal(size=ids.size),
    )


def test_coverage_of_a_true_zero_difference_is_near_the_level():
    rng = np.random.default_rng(0)
    covered = 0
    replicates = 200
    for r in range(replicates):
        ids, labels, a, b = _null_pair(rng, entities=60)
        low, high = (
            (lambda boot: (boot.auc(a) - boot.auc(b)))(
                EntityBootstrap(ids, labels, n_resamples=300, seed=r)
            )
        ).interval(0.9)
        covered += low <= 0.0 <= high
    # 90% nominal (the percentile interval runs a little short with 60
    # entities); binomial sd over 200 replicates is about 0.021.
    assert 0.80 <= covered / replicates <= 0.97, covered


def test_interval_narrows_like_one_over_root_entities():
    widths = []
    for entities in (100, 400):
        rng = np.random.default_rng(1)
        ids, labels, a, b = _null_pair(rng, entities)
        boot = EntityBootstrap(ids, labels, n_resamples=1000, seed=0)
        low, high = (boot.auc(a) - boot.auc(b)).interval()
        widths.append(high - low)
    assert 0.35 < widths[1] / widths[0] < 0.7, widths


def test_a_seed_fixes_the_resamples():
    rng = np.random.default_rng(2)
    ids, labels, a, b = _null_pair(rng, 50)
    first = EntityBootstrap(ids, labels, n_resamples=200, seed=7).auc(a)
    again = EntityBootstrap(ids, labels, n_resamples=200, seed=7).auc(a)
    other = EntityBootstrap(ids, labels, n_resamples=200, seed=8).auc(a)
    np.testing.assert_array_equal(first.samples, again.samples)
    assert first.estimate == other.estimate
    assert not np.array_equal(first.samples, other.samples)


def test_a_few_hundred_entities_take_well_under_a_second():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(400), rng.integers(2, 40, 400))
    labels = rng.random(ids.size) < 0.5
    a, b = labels + rng.normal(size=ids.size), labels + rng.normal(size=ids.size)
    start = time.perf_counter()
    boot = EntityBootstrap(ids, labels, n_resamples=1000, seed=0)
    (boot.auc(a) - boot.auc(b)).interval()
    (boot.member_auc(a) - boot.member_auc(b)).interval()
    # Typically ~0.1 s; the bound leaves room for a loaded 2-core machine.
    assert time.perf_counter() - start < 2.0


def test_mean_and_summary():
    x = Resampled(0.1, np.array([0.0, 0.2, 0.4]))
    y = Resampled(0.3, np.array([0.2, 0.2, 0.2]))
    mean = Resampled.mean([x, y])
    assert mean.estimate == pytest.approx(0.2)
    np.testing.assert_allclose(mean.samples, [0.1, 0.2, 0.3])
    summary = (x + y).summary(0.5)
    assert summary["estimate"] == pytest.approx(0.4) and summary["level"] == 0.5
    assert (summary["low"], summary["high"]) == pytest.approx((0.3, 0.5))
    assert Resampled(0.0, np.full(3, np.nan)).interval() == pytest.approx(
        (math.nan, math.nan), nan_ok=True
    )


def test_errors_name_the_values():
    with pytest.raises(ValueError, match="one entry per row, got 4 and 3"):
        EntityBootstrap(IDS, LABELS[:3])
    with pytest.raises(ValueError, match="n_resamples must be >= 1, got 0"):
        EntityBootstrap(IDS, LABELS, n_resamples=0)
    boot = EntityBootstrap(IDS, LABELS, n_resamples=10)
    with pytest.raises(ValueError, match=r"one entry per row of the bootstrap \(4\)"):
        boot.auc(SCORES[:3])
    with pytest.raises(ValueError, match="not finite"):
        boot.auc(np.array([0.1, np.nan, 0.2, 0.3]))
    other = EntityBootstrap(IDS, LABELS, n_resamples=11)
    with pytest.raises(ValueError, match="same resamples"):
        boot.auc(SCORES) - other.auc(SCORES)
    with pytest.raises(ValueError, match="level"):
        boot.auc(SCORES).interval(95)
    with pytest.raises(ValueError, match="at least one"):
        Resampled.mean([])


def test_the_module_is_numpy_only():
    # A core module that evaluation can use: no TensorFlow, no experiments.
    path = pathlib.Path(intervals.__file__)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "dataclasses", "collections", "numpy"}, imported


def test_one_tie_group_of_every_row_gives_one_half_in_every_resample():
    ids = np.repeat(np.arange(50), 6)
    labels = np.tile([1, 0, 0, 1, 1, 0], 50)
    boot = EntityBootstrap(ids, labels, n_resamples=100, seed=0)
    auc = boot.auc(np.full(ids.size, 0.3))
    assert auc.estimate == 0.5 and np.all(auc.samples == 0.5)
