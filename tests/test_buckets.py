"""Per-bucket reporting: bucket labels, metrics per bucket, aggregation, report."""

import json

import numpy as np
import pytest

from tf_limaml import evaluation
from tf_limaml.experiments import protocol, report
from tf_limaml.features import FeatureSpec

SPEC = FeatureSpec.from_dict(
    {
        "entity": "member",
        "time": "t",
        "label": {"column": "y"},
        "meta_features": [],
        "request_features": [
            {"name": "item", "type": "categorical", "hash_buckets": 10, "dim": 2}
        ],
    }
)


def _batch():
    """4 members: support lengths 1, 2, 5, 9; 3 query rows each (one padded)."""
    support_mask = np.zeros((4, 9), np.float32)
    for t, n in enumerate((1, 2, 5, 9)):
        support_mask[t, :n] = 1
    query_mask = np.array([[1, 1, 0]] * 4, np.float32)
    items = np.array(
        [["a", "b", "z"], ["a", "c", "z"], ["b", "c", "z"], ["a", "d", "z"]],
        dtype=object,
    )
    return {
        "entity_id": np.array([b"m0", b"m1", b"m2", b"m3"]),
        "support_mask": support_mask,
        "support_label": np.zeros((4, 9), np.float32),
        "support_item": np.full((4, 9), "a", dtype=object),
        "query_mask": query_mask,
        "query_label": np.array(
            [[1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]], np.float32
        ),
        "query_item": items,
    }


def test_member_history_buckets_follow_support_length():
    labels = protocol.member_history_buckets(_batch(), edges=(1, 3, 9))
    assert labels.shape == (4, 3)
    assert list(labels[:, 0]) == ["1-2", "1-2", "3-8", "9+"]
    # Every query row of a member carries the member's bucket.
    assert (labels == labels[:, :1]).all()


def test_history_edges_are_quantiles_of_the_lengths():
    assert protocol.history_edges(np.arange(1, 101)) == (1, 26, 51, 76)
    assert protocol.history_edges(np.full(10, 7)) == (7,)


def test_item_popularity_counts_training_rows():
    counts = protocol.item_counts([_batch()], SPEC, "item")
    # Support: 17 real rows of "a"; query: the real rows only, never padding.
    assert counts == {"a": 17 + 3, "b": 2, "c": 2, "d": 1}
    labels = protocol.item_popularity_buckets(
        _batch(), SPEC, "item", {"a": 150, "b": 7, "c": 0}, edges=(0, 5, 20, 100)
    )
    assert list(labels[0]) == ["100+", "5-19", "0-4"]
    assert labels[3, 1] == "0-4"  # unseen item "d": zero training ratings


def test_query_metrics_per_bucket_equal_the_metrics_of_the_subset():
    batch = _batch()
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=(4, 3)).astype(np.float32)
    labelled = protocol.with_buckets(
        batch, {"member_history": np.array([["short"] * 3] * 2 + [["long"] * 3] * 2)}
    )
    out = protocol.query_metrics(labelled, scores)
    for name, members in (("short", [0, 1]), ("long", [2, 3])):
        rows = np.zeros((4, 3), bool)
        rows[members] = batch["query_mask"][members] > 0
        cell = out["buckets"]["member_history"][name]
        assert cell["auc"] == pytest.approx(
            evaluation.auc(batch["query_label"][rows], scores[rows])
        )
        assert cell["n_rows"] == int(rows.sum()) and cell["members"] == 2
    # Without labels there are no buckets, and models never see the labels.
    assert "buckets" not in protocol.query_metrics(batch, scores)
    assert set(protocol.without_buckets(labelled)) == set(batch)


def test_evaluate_sweep_keeps_bucket_labels_from_the_scorer():
    labelled = protocol.with_buckets(
        _batch(), {"member_history": protocol.member_history_buckets(_batch())}
    )
    seen = []

    def score(batch, k):
        seen.append(sorted(batch))
        return np.full((4, 3), 0.5, np.float32)

    sweep = protocol.evaluate_sweep(score, labelled, (1, None))
    assert all(not any(k.startswith("bucket/") for k in keys) for keys in seen)
    entry = protocol.measurement(sweep, 1.0)
    assert set(entry["buckets"]["member_history"]) == set(
        protocol.member_history_buckets(_batch()).ravel()
    )
    # Buckets belong to the full-support entry, not to every k.
    assert all("buckets" not in cell for cell in entry["support_k"].values())


def _entry(auc, buckets):
    sweep = {
        k: {"overall_auc": auc, "logloss": 0.6, "mean_member_auc": auc}
        for k in ("1", "all")
    }
    sweep["all"]["buckets"] = {
        "member_history": {
            label: {
                "overall_auc": value,
                "logloss": 0.6,
                "mean_member_auc": value,
                "rows": 10,
                "members": 2,
            }
            for label, value in buckets.items()
        }
    }
    return protocol.measurement(sweep, 1.0)


def test_aggregate_averages_buckets_and_the_report_shows_them(tmp_path):
    seeds = [
        {
            "global": _entry(0.70, {"1-9": 0.60, "10+": 0.72}),
            "limaml": _entry(0.74, {"1-9": 0.66, "10+": 0.75}),
        },
        {
            "global": _entry(0.70, {"1-9": 0.62, "10+": 0.72}),
            "limaml": _entry(0.74, {"1-9": 0.70, "10+": 0.77}),
        },
    ]
    result = report.aggregate(seeds)
    cell = result["models"]["limaml"]["buckets"]["member_history"]["1-9"]
    assert cell["overall_auc"] == pytest.approx(0.68)
    assert cell["overall_auc_std"] == pytest.approx(np.std([0.66, 0.70], ddof=1))
    table = report.bucket_table(result, "member_history")
    assert "| limaml | 0.6800 ± 0.0283 | 0.7600 ± 0.0141 |" in table
    assert "| members / query rows | 2 / 10 | 2 / 10 |" in table
    paths = report.write_report(result, tmp_path)
    text = open(paths["markdown"], encoding="utf-8").read()
    assert "## By activity bucket" in text and table in text
    saved = json.load(open(paths["json"], encoding="utf-8"))
    assert saved["models"]["global"]["buckets"]["member_history"]["10+"][
        "overall_auc"
    ] == pytest.approx(0.72)
    assert (tmp_path / "lift.png").stat().st_size > 0


def test_sequence_targets_compare_with_the_id_embedding_and_limaml():
    def entry(auc, small):
        support = {
            k: {"overall_auc": small, "logloss": 0.6, "mean_member_auc": 0.7}
            for k in ("1", "3", "5")
        }
        support["all"] = {"overall_auc": auc, "logloss": 0.6, "mean_member_auc": 0.7}
        return {
            "overall_auc": auc,
            "logloss": 0.6,
            "mean_member_auc": 0.7,
            "support_k": support,
            "wall_s": 1.0,
        }

    seeds = [
        {
            "global": entry(0.70, 0.70),
            "id_embedding": entry(0.75, 0.74),
            "limaml": entry(0.76, 0.73),
            "limaml_sequence": entry(0.761, 0.745),
        }
    ]
    targets = {t["target"]: t for t in report.aggregate(seeds)["targets"]}
    beat = next(
        t for name, t in targets.items() if "limaml_sequence" in name and "ID" in name
    )
    full = next(
        t for name, t in targets.items() if "full support, limaml_sequence" in name
    )
    assert beat["met"] is True and full["met"] is True
    seeds[0]["limaml_sequence"] = entry(0.75, 0.739)
    targets = {t["target"]: t for t in report.aggregate(seeds)["targets"]}
    beat = next(
        t for name, t in targets.items() if "limaml_sequence" in name and "ID" in name
    )
    full = next(
        t for name, t in targets.items() if "full support, limaml_sequence" in name
    )
    assert beat["met"] is False and full["met"] is False
    assert "-0.0010" in beat["measured"]
