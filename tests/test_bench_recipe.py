"""`bench/limaml_recipe.py --intervals`: paired lifts over the first model."""

import os

import numpy as np

from bench.limaml_recipe import PairedLifts
from tf_limaml.experiments.protocol import Protocol, Splits, records_from_dir
from tf_limaml.features import LABEL_KEY, QUERY


def _test_batch(synthetic_tasks, synthetic_spec):
    records = records_from_dir(os.path.dirname(synthetic_tasks["spec"]))
    return Splits.from_records(records, synthetic_spec, Protocol()).test


def test_paired_lifts_are_zero_for_the_same_scores_and_above_zero_for_better_ones(
    synthetic_tasks, synthetic_spec
):
    batch = _test_batch(synthetic_tasks, synthetic_spec)
    labels = np.asarray(batch[f"{QUERY}_{LABEL_KEY}"], dtype=np.float64)
    noise = np.random.default_rng(0).normal(size=labels.shape)
    paired = PairedLifts(batch, (1, None))
    calls = []

    def noisy(cut, k):
        calls.append(k)
        return noise

    assert paired.lifts("reference", noisy) is None
    same = paired.lifts("same", noisy)
    assert same["vs"] == "reference"
    assert set(same["lift"]) == {"1", "all", "mean"}
    for lift, low, high in same["lift"].values():
        assert lift == low == high == 0.0
    # Scores that carry the labels rank better on every resample.
    better = paired.lifts("better", lambda cut, k: noise + 3.0 * labels)
    for lift, low, high in better["lift"].values():
        assert 0.0 < low <= lift <= high
    assert calls == [1, None, 1, None]
