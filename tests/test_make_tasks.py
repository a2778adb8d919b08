"""Tests of the Beam task pipeline (beam_pipelines/make_tasks.py).

The pipeline tests run `BuildTasks` on hand-made rows with TestPipeline and
`assert_that`; the file tests go through `run()` / `limaml make-tasks`. Tasks
are compared as decoded summaries: (split, entity, support, query, meta), where
support and query are the (time, item, label) triples in record order.
"""

import datetime
import glob
import json
import math
import os
import random
import shutil

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to
from guarantees import check_every_row_accounted_for, make_tasks_with_every_kind_of_loss

from beam_pipelines import make_tasks
from tf_limaml import tasks as task_rules
from tf_limaml.features import FeatureSpec

SPEC = FeatureSpec.from_dict(
    {
        "entity": "user",
        "time": "ts",
        "label": "click",
        "tie_break": "item",
        "meta_features": [
            {"name": "country", "type": "categorical", "vocabulary": ["us", "fr"]},
            # Blanks rejected, not imputed: the dead-letter tests need the reason.
            {"name": "age", "type": "numeric", "missing": "reject"},
        ],
        "request_features": [
            {"name": "item", "type": "categorical", "hash_buckets": 100},
            {"name": "price", "type": "numeric", "missing": "reject"},
            {
                "name": "tags",
                "type": "multi_hot",
                "vocabulary": ["a", "b", "c"],
                "max_values": 2,
            },
        ],
    }
)


def row(user, ts, item, click=1, country="us", age=30, price=1.5, tags="a"):
    return {
        "user": user,
        "ts": ts,
        "click": click,
        "item": item,
        "country": country,
        "age": age,
        "price": price,
        "tags": tags,
    }


def history(user, n, start=100, step=10, **kwargs):
    """n rows of one user at distinct times, items i0..i{n-1}."""
    return [row(user, start + step * k, f"i{k}", **kwargs) for k in range(n)]


def strip_statistics(spec: FeatureSpec) -> dict:
    """The spec's JSON without what the analyzer fills in."""
    obj = spec.to_dict()
    for feature in obj["meta_features"] + obj["request_features"]:
        for key in ("mean", "std", "statistics"):
            feature.pop(key, None)
    return obj


def pipeline():
    # flags=[] so Beam never reads pytest's sys.argv.
    return TestPipeline(options=PipelineOptions(flags=[]))


def summarize(record: bytes):
    """(entity, support, query, meta) of a serialized task record."""
    import tensorflow as tf

    example = tf.train.SequenceExample.FromString(record)
    context = example.context.feature
    lists = example.feature_lists.feature_list

    def part(name):
        times = [int(f.int64_list.value[0]) for f in lists[f"{name}/time"].feature]
        items = [f.bytes_list.value[0].decode() for f in lists[f"{name}/item"].feature]
        labels = [int(f.float_list.value[0]) for f in lists[f"{name}/label"].feature]
        return tuple(zip(times, items, labels, strict=True))

    meta = (
        context["country"].bytes_list.value[0].decode(),
        round(context["age"].float_list.value[0], 3),
    )
    return (
        context["entity_id"].bytes_list.value[0].decode(),
        part("support"),
        part("query"),
        meta,
    )


def summarize_task(task):
    split, entity_id, record = task
    summary = summarize(record)
    assert summary[0] == entity_id
    return (split,) + summary


def stats_matcher(check):
    """An assert_that matcher that runs `check(stats)` on the single stats dict."""

    def _match(actual):
        if len(actual) != 1:
            raise BeamAssertException(f"expected one stats dict, got {len(actual)}")
        check(actual[0])

    return _match


def build(p, rows, **kwargs):
    return (
        p
        | "Rows" >> beam.Create(rows)
        | "BuildTasks" >> make_tasks.BuildTasks(SPEC, **kwargs)
    )


def untagged(tasks_pcoll, label):
    """Drops the split so expectations do not depend on the hash."""
    return tasks_pcoll | label >> beam.Map(lambda t: summarize(t[2]))


# ------------------------------------------------------------------ split rules
RULE_CASES = {
    # 5 rows at t=100..140: floor(5 * 0.5) = 2 support rows.
    "fraction:0.5": (2, 3),
    # Rows strictly before t=125: 100, 110, 120.
    "cutoff:125": (3, 2),
    # The last 1 row is query.
    "last:1": (4, 1),
}


def test_split_rules():
    rows = history("u1", 5) + history("u2", 1, start=200)
    u1 = tuple((100 + 10 * k, f"i{k}", 1) for k in range(5))
    # One pipeline, one BuildTasks per rule: a failure names the rule's label.
    with pipeline() as p:
        created = p | "Rows" >> beam.Create(rows)
        for rule, (n_support, n_query) in RULE_CASES.items():
            out = created | f"Build[{rule}]" >> make_tasks.BuildTasks(SPEC, rule=rule)
            assert n_support + n_query == len(u1)
            assert_that(
                untagged(out["tasks"], f"Summaries[{rule}]"),
                equal_to([("u1", u1[:n_support], u1[n_support:], ("us", 30.0))]),
                label=f"Tasks[{rule}]",
            )
            # u2's single row cannot give both a support and a query row: cold.
            assert_that(
                out["cold"] | f"ColdIds[{rule}]" >> beam.Map(lambda c: c[0]),
                equal_to(["u2"]),
                label=f"Cold[{rule}]",
            )


def test_cutoff_rule_colds_entities_with_no_query_rows():
    rows = (
        history("early", 3, start=100)
        + history("late", 3, start=1000)
        + (history("both", 2, start=400) + history("both_after", 2, start=600))
        + [row("u", 400, "a"), row("u", 600, "b")]
    )
    with pipeline() as p:
        out = build(p, rows, rule="cutoff:500", min_support=1, min_query=1)
        assert_that(
            untagged(out["tasks"], "Summaries"),
            equal_to([("u", ((400, "a", 1),), ((600, "b", 1),), ("us", 30.0))]),
        )
        assert_that(
            out["cold"] | beam.Map(lambda c: c[0]),
            equal_to(["early", "late", "both", "both_after"]),
            label="Cold",
        )


# ---------------------------------------------------------------------- ties
TIED_ROWS = [
    row("u", 100, "10"),
    row("u", 100, "9", click=1),
    row("u", 50, "20"),
    row("u", 100, "9", click=0),
]
# Time first; at t=100 item 9 before item 10 (numeric tie-break); the two
# (100, "9") rows by content (click 0 before click 1).
TIED_ORDER = ((50, "20", 1), (100, "9", 0), (100, "9", 1), (100, "10", 1))


def test_timestamp_ties_split_the_same_way_in_any_input_order():
    shuffled = list(TIED_ROWS)
    random.Random(5).shuffle(shuffled)
    orders = {
        "given": list(TIED_ROWS),
        "reversed": TIED_ROWS[::-1],
        "shuffled": shuffled,
    }
    expected = ("u", TIED_ORDER[:2], TIED_ORDER[2:], ("us", 30.0))
    with pipeline() as p:
        for name, rows in orders.items():
            out = (
                p
                | f"Rows[{name}]" >> beam.Create(rows)
                | f"Build[{name}]" >> make_tasks.BuildTasks(SPEC, rule="last:2")
            )
            assert_that(
                untagged(out["tasks"], f"Summaries[{name}]"),
                equal_to([expected]),
                label=f"Tasks[{name}]",
            )
    # The in-process reference implementation agrees, in every order.
    for rows in orders.values():
        histories, _, _ = task_rules.build_tasks(SPEC, rows, "last:2")
        reference = [
            (int(r["ts"]), r["item"], r["label"])
            for r in histories[0].support + histories[0].query
        ]
        assert tuple(reference) == TIED_ORDER


# ---------------------------------------------------------------------- caps
def test_caps_keep_latest_support_and_first_query():
    rows = history("u", 10)  # t = 100..190, fraction 0.5 -> 5 support, 5 query
    support = tuple((100 + 10 * k, f"i{k}", 1) for k in (3, 4))
    query = ((150, "i5", 1),)
    with pipeline() as p:
        out = build(p, rows, rule="fraction:0.5", max_support=2, max_query=1)
        assert_that(
            untagged(out["tasks"], "Summaries"),
            equal_to([("u", support, query, ("us", 30.0))]),
        )

        def check(stats):
            assert stats["rows_dropped_by_caps"] == 7, stats
            assert stats["rows_in_tasks"] == 3, stats
            assert stats["support_size_histogram"] == {"2-3": 1}, stats
            assert stats["query_size_histogram"] == {"1": 1}, stats

        assert_that(out["stats"], stats_matcher(check), label="Stats")


def test_min_support_makes_short_histories_cold_before_caps():
    rows = history("short", 4) + history("long", 8, start=500)
    with pipeline() as p:
        out = build(p, rows, rule="fraction:0.5", min_support=3, max_support=1)
        assert_that(out["tasks"] | beam.Map(lambda t: t[1]), equal_to(["long"]))
        assert_that(
            out["cold"] | beam.Map(lambda c: c[0]), equal_to(["short"]), label="Cold"
        )

        def check(stats):
            assert (stats["rows_cold"], stats["entities_cold"]) == (4, 1), stats
            assert stats["rows_dropped_by_caps"] == 3, stats

        assert_that(out["stats"], stats_matcher(check), label="Stats")


# ---------------------------------------------------------------- hash split
def test_hash_split_matches_assign_split_whatever_the_input_order():
    users = [f"user-{k}" for k in range(300)]
    rows = [r for u in users for r in history(u, 2)]
    random.Random(0).shuffle(rows)
    expected = [(task_rules.assign_split(u, 7, 0.2, 0.3), u) for u in users]
    counts = {
        s: sum(1 for split, _ in expected if split == s) for s in task_rules.SPLITS
    }
    # The hash really spreads entities (else this test would prove little).
    assert all(c > 30 for c in counts.values()), counts
    with pipeline() as p:
        out = build(p, rows, seed=7, val_fraction=0.2, test_fraction=0.3)
        assert_that(out["tasks"] | beam.Map(lambda t: (t[0], t[1])), equal_to(expected))
    other_seed = [task_rules.assign_split(u, 8, 0.2, 0.3) for u in users]
    assert other_seed != [split for split, _ in expected]
    # Pinned: SHA-256("7:user-0") maps to 0.4225, in val = [0.3, 0.5). A change of
    # the hash would move entities between train and test across versions.
    assert [split for split, _ in expected[:10]] == [
        "val",
        "train",
        "val",
        "test",
        "test",
        "val",
        "train",
        "test",
        "test",
        "test",
    ]


# --------------------------------------------------------------- dead letter
class Opaque:
    """A value with no JSON form."""

    def __repr__(self):
        return "Opaque()"


BAD_ROWS = [
    (row("", 100, "a"), task_rules.REASON_MISSING_ENTITY),
    (row(None, 100, "a"), task_rules.REASON_MISSING_ENTITY),
    (row("u", "", "a"), task_rules.REASON_MISSING_TIME),
    (row("u", "yesterday", "a"), task_rules.REASON_BAD_TIME),
    (row("u", float("inf"), "a"), task_rules.REASON_BAD_TIME),
    (row("u", 100, "a", click=None), task_rules.REASON_MISSING_LABEL),
    (row("u", 100, "a", click="2"), task_rules.REASON_BAD_LABEL),
    (row("u", 100, "a", click="yes"), task_rules.REASON_BAD_LABEL),
    (row("u", 100, "a", price="nan"), task_rules.REASON_BAD_NUMERIC),
    (row("u", 100, "a", price="-inf"), task_rules.REASON_BAD_NUMERIC),
    (row("u", 100, "a", price="cheap"), task_rules.REASON_BAD_NUMERIC),
    (row("u", 100, "a", age=float("nan")), task_rules.REASON_MISSING_FEATURE),
    (row("u", 100, "a", price=""), task_rules.REASON_MISSING_FEATURE),
    (row("u", 100, "a", country="de"), task_rules.REASON_OUT_OF_VOCABULARY),
    (row("u", 100, "a", tags="a|zzz"), task_rules.REASON_OUT_OF_VOCABULARY),
    (
        make_tasks.MalformedRow(
            {"user": "u", "_extra_fields": ["x"]}, "f.csv:3: 9 fields"
        ),
        task_rules.REASON_MALFORMED_ROW,
    ),
    (["not", "a", "mapping"], task_rules.REASON_MALFORMED_ROW),
]
# Garbage that must still come out as valid JSON in the dead letter.
GARBAGE = {
    "blob": b"\xff\x00",
    "when": datetime.datetime(2024, 1, 2, 3, 4, 5),
    "odd": Opaque(),
    "nested": {1: [float("nan"), float("-inf")]},
}


def _strict_json(line):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=reject)


def test_every_dead_letter_reason_is_routed_counted_and_json_safe():
    from apache_beam.metrics.metric import MetricsFilter

    assert {reason for _, reason in BAD_ROWS} == set(task_rules.REJECT_REASONS)
    bad = []
    for element, _reason in BAD_ROWS:
        if isinstance(element, dict):
            element = {**element, **GARBAGE}
        bad.append(element)
    rows = bad + history("good", 4) + history("cold", 1, start=900)
    expected_reasons = [reason for _, reason in BAD_ROWS]
    p = pipeline()
    out = build(p, rows)
    parsed = out["rejected"] | "Parse" >> beam.MapTuple(
        lambda _, line: _strict_json(line)
    )
    assert_that(
        parsed | "Reasons" >> beam.Map(lambda r: r["reason"]),
        equal_to(expected_reasons),
    )

    def check_records(records):
        for record in records:
            assert record["source"] == "interactions" and record["detail"], record
            if "blob" in record["row"]:
                assert record["row"]["nested"] == {"1": ["nan", "-inf"]}, record
                assert record["row"]["when"] == "2024-01-02T03:04:05", record
                assert record["row"]["odd"] == "Opaque()", record

    assert_that(parsed, check_records, label="Records")
    assert_that(
        out["tasks"] | beam.Map(lambda t: t[1]), equal_to(["good"]), label="Good"
    )

    def check(stats):
        want = {r: expected_reasons.count(r) for r in task_rules.REJECT_REASONS}
        assert stats["rejected_by_reason"] == want, stats
        assert stats["rows_rejected"] == len(BAD_ROWS), stats
        assert stats["conservation"]["holds"], stats

    assert_that(out["stats"], stats_matcher(check), label="Stats")
    result = p.run()
    result.wait_until_finish()

    # The same numbers are Beam counters (the runner's job summary).
    query = result.metrics().query(MetricsFilter().with_namespace(make_tasks.NAMESPACE))
    counters = {c.key.metric.name: c.committed for c in query["counters"]}
    for reason in task_rules.REJECT_REASONS:
        assert counters[f"rejected_by_reason.{reason}"] == expected_reasons.count(
            reason
        ), (reason, counters)
    assert counters["rows_read"] == len(rows)
    assert counters["rows_rejected"] == len(BAD_ROWS)
    assert (counters["rows_in_tasks"], counters["rows_cold"]) == (4, 1)
    assert counters["entities_cold"] == 1


def test_dead_letter_json_safe_handles_numpy_sets_and_undecodable_text():
    import numpy as np

    line = make_tasks.dead_letter_record(
        {
            "a": np.float32("nan"),
            "b": np.arange(2),
            "c": {3, 1},
            "d": np.int64(4),
            "caf\udcc3": "\udcff",
        },
        "bad_numeric",
        "x",
        "interactions",
    )
    line.encode("utf-8")  # surrogates from undecodable bytes are escaped
    record = _strict_json(line)
    assert record["row"] == {
        "a": "nan",
        "b": [0, 1],
        "c": [1, 3],
        "d": 4,
        "caf\\udcc3": "\\udcff",
    }


# --------------------------------------------------------- conservation
def test_conservation_identity_with_every_kind_of_loss():
    rows = (
        history("capped", 12)  # 6 + 6, caps drop 3 + 2
        + history("cold", 1, start=50)  # cold: no support row
        + [r for r, _ in BAD_ROWS[:5]]  # 5 rejected
        + history("plain", 4, start=900)
    )  # 2 + 2
    with pipeline() as p:
        out = build(p, rows, rule="fraction:0.5", max_support=3, max_query=4)

        def check(stats):
            assert stats["rows_read"] == len(rows) == 22, stats
            terms = (
                stats["rows_in_tasks"],
                stats["rows_rejected"],
                stats["rows_dropped_by_caps"],
                stats["rows_cold"],
            )
            assert terms == (11, 5, 5, 1), stats
            assert stats["conservation"] == {
                "identity": make_tasks.CONSERVATION,
                "rows_read": 22,
                "sum": 22,
                "holds": True,
            }, stats
            assert sum(s["interactions"] for s in stats["splits"].values()) == 11, stats
            assert sum(s["entities"] for s in stats["splits"].values()) == 2, stats

        assert_that(out["stats"], stats_matcher(check))
        # The records themselves, decoded: which entities, how many rows each.
        assert_that(
            out["tasks"] | "TaskRows" >> beam.Map(lambda t: (t[1], _rows_of(t[2]))),
            equal_to([("capped", 7), ("plain", 4)]),
            label="TaskRowsByEntity",
        )
        assert_that(
            out["cold"] | "ColdRows" >> beam.Map(lambda c: (c[0], _rows_of(c[1]))),
            equal_to([("cold", 1)]),
            label="ColdRowsByEntity",
        )
        assert_that(
            out["rejected"] | "CountRejected" >> beam.combiners.Count.Globally(),
            equal_to([5]),
            label="DeadLetterLines",
        )
    # build_tasks, the in-process reference, counts the same.
    _, _, counts = task_rules.build_tasks(
        SPEC, rows, "fraction:0.5", max_support=3, max_query=4
    )
    assert (
        counts["rows_read"],
        counts["rows_in_tasks"],
        counts["rows_rejected"],
        counts["rows_dropped_by_caps"],
        counts["rows_cold"],
    ) == (22, 11, 5, 5, 1)


def _rows_of(record: bytes) -> int:
    """Support plus query rows of a serialized task record."""
    _, support, query, _ = summarize(record)
    assert len(support) > 0 or len(query) > 0
    return len(support) + len(query)


def test_files_account_for_every_row(tmp_path):
    """The written files, decoded: every input row is in exactly one outcome."""
    run = make_tasks_with_every_kind_of_loss(tmp_path)
    found = check_every_row_accounted_for(run["output"], run["rows_in"])
    assert found["stats"]["rows_dropped_by_caps"] > 0
    assert list(found["decoded"]["cold"]) == ["lonely"]
    assert sorted(r["reason"] for r in found["rejected"]) == [
        "bad_label",
        "bad_time",
        "missing_entity",
    ]
    assert len(found["decoded"]["tasks"]) == 12


def test_finalize_stats_reports_a_broken_identity():
    stats = make_tasks.finalize_stats(
        {("rows_read",): 10, ("rows_in_tasks",): 9}, {}, False
    )
    assert stats["conservation"]["holds"] is False
    assert stats["conservation"]["sum"] == 9


# ------------------------------------------------------------ meta features
def test_meta_conflicts_latest_wins_and_entity_table_overrides():
    rows = [
        row("u1", 100, "a", country="fr", age=20),
        row("u1", 300, "b", country="us", age=22),  # latest: us, 22
        row("u1", 200, "c", country="fr", age=21),
        row("u2", 100, "a", country="fr", age=40),
        row("u2", 200, "b", country="fr", age=40),
        row("u3", 100, "a"),
        row("u3", 200, "b"),
    ]
    table = [
        {"user": "u2", "country": "us", "age": "50"},
        {"user": "u3", "country": "fr", "age": 60},
        {"user": "u3", "country": "us", "age": 61},  # duplicate: a conflict
        {"user": "nobody", "country": "us", "age": 1},  # no interactions
        {"user": "u4", "country": "de", "age": 1},
    ]  # out of vocabulary
    with pipeline() as p:
        entities = p | "Table" >> beam.Create(table)
        out = build(p, rows, rule="last:1", entities=entities)
        metas = out["tasks"] | beam.Map(lambda t: (t[1], summarize(t[2])[3]))
        # u1 from its rows (latest wins), u2 from the table, u3 from the table's
        # greatest duplicate by content (age 61 > 60).
        assert_that(
            metas,
            equal_to(
                [("u1", ("us", 22.0)), ("u2", ("us", 50.0)), ("u3", ("us", 61.0))]
            ),
        )
        assert_that(
            out["rejected"]
            | beam.MapTuple(
                lambda _, r: (json.loads(r)["source"], json.loads(r)["reason"])
            ),
            equal_to([("entities", "out_of_vocabulary")]),
            label="Rejected",
        )

        def check(stats):
            assert stats["meta_conflicts"] == 2, stats  # country and age of u1
            assert stats["entity_table"]["conflicts"] == 1, stats
            assert stats["entity_table"]["entities_used"] == 2, stats
            # "nobody"; u4's only table row was rejected, so it is not counted.
            assert stats["entity_table"]["entities_without_interactions"] == 1, stats
            assert stats["entity_table"]["rows_rejected"] == 1, stats
            assert stats["rows_rejected"] == 0 and stats["conservation"]["holds"], stats

        assert_that(out["stats"], stats_matcher(check), label="Stats")


def test_label_threshold_rule_from_the_spec():
    spec = FeatureSpec.from_dict(
        {**SPEC.to_dict(), "label": {"column": "rating", "threshold": 4}}
    )
    rows = [
        {**row("u", 100 + k, f"i{k}"), "rating": rating}
        for k, rating in enumerate(["5", "3", "4.0", "1"])
    ]
    with pipeline() as p:
        out = p | beam.Create(rows) | make_tasks.BuildTasks(spec, rule="fraction:0.5")
        labels = out["tasks"] | beam.Map(
            lambda t: tuple(x[2] for x in summarize(t[2])[1] + summarize(t[2])[2])
        )
        assert_that(labels, equal_to([(1, 0, 1, 0)]))


def test_build_tasks_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_support"):
        make_tasks.BuildTasks(SPEC, max_support=0)
    with pytest.raises(ValueError, match="val_fraction"):
        make_tasks.BuildTasks(SPEC, val_fraction=0.6, test_fraction=0.6)
    with pytest.raises(ValueError, match="fraction:F"):
        make_tasks.BuildTasks(SPEC, rule="half")


# ------------------------------------------------------ files, runners, CLI
def _write_inputs(tmp_path, rows, fmt="csv"):
    import pandas as pd

    spec_path = str(tmp_path / "spec.json")
    SPEC.save(spec_path)
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        path = str(tmp_path / "interactions.csv")
        frame.to_csv(path, index=False)
    else:
        path = str(tmp_path / "interactions.parquet")
        frame.to_parquet(path, index=False)
    return path, spec_path


def read_records(output_dir, prefix):
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(output_dir, f"{prefix}-*.tfrecord.gz")))
    assert files, f"no {prefix} files in {output_dir}"
    return [
        r.numpy()
        for f in files
        for r in tf.data.TFRecordDataset(f, compression_type="GZIP")
    ]


def all_records(output_dir):
    """Every record, by split, sorted by entity id: what must match across runs."""
    out = {}
    for prefix in task_rules.SPLITS + ("cold",):
        records = read_records(output_dir, prefix)
        out[prefix] = sorted(records, key=lambda r: summarize(r)[0])
    return out


def _rows_for_files(num_users=40):
    rows = [r for k in range(num_users) for r in history(f"u{k:03d}", 3 + k % 5)]
    rows += history("lonely", 1)
    rows += [row("u000", 999, "zz", price="abc")]
    return rows


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """One in-memory run() over a shuffled CSV with ties, caps, a cold and a bad row."""
    tmp_path = tmp_path_factory.mktemp("csv_run")
    rows = _rows_for_files()
    # Ties and duplicates, so the order of arrival would matter without the rules.
    rows += [row("u001", 100, "i0", click=0), row("u001", 100, "i0", click=1)]
    random.Random(1).shuffle(rows)
    input_path, spec_path = _write_inputs(tmp_path, rows)
    out = str(tmp_path / "out")
    argv = [
        "--input",
        input_path,
        "--features",
        spec_path,
        "--max-support",
        "3",
        "--max-query",
        "2",
        "--seed",
        "1",
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
    ]
    make_tasks.run(argv + ["--output", out])
    return {
        "rows": rows,
        "argv": argv,
        "input": input_path,
        "out": out,
        "records": all_records(out),
    }


def test_run_writes_every_output(csv_run):
    out, rows, records = csv_run["out"], csv_run["rows"], csv_run["records"]
    names = sorted(os.listdir(out))
    for name in names:
        # Only our fixed names: no entity id ever becomes part of a path.
        assert name.split("-")[0].split(".")[0] in (
            "train",
            "val",
            "test",
            "cold",
            "rejected",
            "stats",
            "spec",
        ), name
        assert not any(f"u{k:03d}" in name for k in range(40)), name
    assert {"stats.json", "spec.json"} <= set(names)
    # spec.json is SPEC completed with the train entities' statistics.
    written = FeatureSpec.load(os.path.join(out, "spec.json"))
    assert SPEC.missing_statistics() == ["age", "price"]
    assert written.missing_statistics() == []
    assert written.feature("age").statistics["source"] == "make_tasks"
    # The time format is detected once from the first rows and written down.
    assert strip_statistics(written) == {
        **strip_statistics(SPEC),
        "time": {"column": "ts", "format": "epoch_seconds"},
    }
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["rows_read"] == len(rows)
    assert stats["rejected_by_reason"]["bad_numeric"] == stats["rows_rejected"] == 1
    assert stats["rejected_by_feature"] == {
        "age": 0,
        "country": 0,
        "item": 0,
        "price": 1,
        "tags": 0,
    }
    assert (stats["entities"], stats["entities_cold"]) == (40, 1)
    assert stats["rows_dropped_by_caps"] > 0 and stats["conservation"]["holds"]
    assert stats["options"]["input"] == csv_run["input"]
    assert sum(len(v) for k, v in records.items() if k != "cold") == 40
    assert [summarize(r)[0] for r in records["cold"]] == ["lonely"]
    for split in task_rules.SPLITS:
        assert stats["splits"][split]["entities"] == len(records[split])
        for record in records[split]:
            assert task_rules.assign_split(summarize(record)[0], 1, 0.25, 0.25) == split
    rejected = [
        json.loads(line)
        for f in glob.glob(os.path.join(out, "rejected-*.jsonl"))
        for line in open(f)
    ]
    assert [r["row"]["price"] for r in rejected] == ["abc"]
    # The tied rows of u001 (t=100, item i0) sit in content order: click 0, then 1.
    u001 = next(
        summarize(r)
        for s in task_rules.SPLITS
        for r in records[s]
        if summarize(r)[0] == "u001"
    )
    assert u001[1] == ((100, "i0", 0), (100, "i0", 1), (100, "i0", 1))


def test_multi_processing_rerun_with_overwrite_gives_identical_records(
    csv_run, tmp_path
):
    out = str(tmp_path / "out")
    shutil.copytree(csv_run["out"], out)
    argv = csv_run["argv"] + ["--output", out]
    with pytest.raises(ValueError, match="--overwrite"):
        make_tasks.run(argv)
    make_tasks.run(
        argv
        + [
            "--overwrite",
            "--num-shards",
            "2",
            "--direct_running_mode=multi_processing",
            "--direct_num_workers=2",
        ]
    )
    # The old single shards are gone, so globs never mix two runs.
    assert len(glob.glob(os.path.join(out, "train-*-of-00002.tfrecord.gz"))) == 2
    assert not glob.glob(os.path.join(out, "train-*-of-00001.tfrecord.gz"))
    # Byte-identical records, in-memory vs multi_processing (sorted by entity).
    assert all_records(out) == csv_run["records"]
    assert json.load(open(os.path.join(out, "stats.json"))) == json.load(
        open(os.path.join(csv_run["out"], "stats.json"))
    )


def test_run_reads_parquet_with_timestamp_columns(tmp_path):
    rows = _rows_for_files(num_users=6)
    for r in rows:
        r["ts"] = datetime.datetime(2024, 1, 1) + datetime.timedelta(seconds=r["ts"])
        if r["price"] == "abc":
            r["price"] = None  # a Parquet float column holds no text; null is missing
    input_path, spec_path = _write_inputs(tmp_path, rows, fmt="parquet")
    out = str(tmp_path / "out")
    make_tasks.run(
        [
            "--input",
            input_path,
            "--format",
            "parquet",
            "--features",
            spec_path,
            "--output",
            out,
            "--split",
            "last:1",
        ]
    )
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["rows_read"] == len(rows) and stats["conservation"]["holds"]
    assert stats["entities"] == 6
    assert stats["rejected_by_reason"]["missing_feature"] == stats["rows_rejected"] == 1
    base = int(datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc).timestamp())
    tasks = {
        summarize(r)[0]: summarize(r)
        for s in task_rules.SPLITS
        for r in read_records(out, s)
    }
    # u002 has 5 rows at t = 100..140 after the base time; the last is query.
    assert tasks["u002"][2] == ((base + 140, "i4", 1),)


def test_run_fails_fast_on_a_missing_column_or_input(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "click"} for r in history("u", 3)]
    input_path, spec_path = _write_inputs(tmp_path, rows)
    with pytest.raises(ValueError, match="no column 'click'"):
        make_tasks.run(
            [
                "--input",
                input_path,
                "--features",
                spec_path,
                "--output",
                str(tmp_path / "out"),
            ]
        )
    with pytest.raises(FileNotFoundError, match="matches no file"):
        make_tasks.run(
            [
                "--input",
                str(tmp_path / "nothing-*.csv"),
                "--features",
                spec_path,
                "--output",
                str(tmp_path / "out"),
            ]
        )


def test_csv_reader_turns_malformed_lines_into_malformed_rows(tmp_path):
    from apache_beam.io.fileio import ReadableFile
    from apache_beam.io.filesystem import FileMetadata

    path = tmp_path / "bad.csv"
    path.write_bytes(
        b"user,ts,click,item,country,age,price,tags\n"
        b"u,100,1,a,us,30,1.5,a\n"
        b"u,110,1,b\n"
        b"\n"
        b"u,120,1,c,us,30,1.5,a,EXTRA\n"
        b"u,130,1,\xff,us,30,1.5,a\n"
        b'u,140,0,e,us,30,1.5,"b|c"\n'
    )
    readable = ReadableFile(FileMetadata(str(path), path.stat().st_size))
    out = list(make_tasks.read_csv_file(readable))
    # The blank line is no row; the other five are, three of them malformed.
    assert len(out) == 5
    good = [r for r in out if isinstance(r, dict)]
    assert [r["item"] for r in good] == ["a", "e"] and good[1]["tags"] == "b|c"
    bad = [r for r in out if isinstance(r, make_tasks.MalformedRow)]
    assert [b.detail.split(": ", 1)[1] for b in bad] == [
        "4 fields, the header has 8",
        "9 fields, the header has 8",
        "bytes that are not UTF-8",
    ]
    assert bad[0].detail.startswith(f"{path}:3")
    assert bad[1].row["_extra_fields"] == ["EXTRA"]
    # The dead letter can still write the undecodable cell.
    line = make_tasks.dead_letter_record(
        bad[2].row, "malformed_row", bad[2].detail, "interactions"
    )
    assert _strict_json(line)["row"]["item"] == "\\udcff"


def test_end_to_end_cli_then_task_dataset_then_one_fit_step(
    tmp_path, small_model_kwargs
):
    import tensorflow as tf

    import tf_limaml
    from tf_limaml import cli, data
    from tf_limaml.datasets import synthetic

    csv_path = str(tmp_path / "interactions.csv")
    synthetic.write_csv(
        synthetic.generate_interactions(num_entities=40, seed=3), csv_path
    )
    spec = synthetic.synthetic_spec()
    spec_path = str(tmp_path / "spec.json")
    spec.save(spec_path)
    out = str(tmp_path / "tasks")
    code = cli.main(
        [
            "make-tasks",
            "--input",
            csv_path,
            "--features",
            spec_path,
            "--output",
            out,
            "--split",
            "last:8",
            "--max-support",
            "16",
            "--val-fraction",
            "0",
            "--test-fraction",
            "0",
        ]
    )
    assert code == 0
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["splits"]["train"]["entities"] == 40 and stats["conservation"]["holds"]

    ds = data.task_dataset(
        os.path.join(out, "train-*.tfrecord.gz"),
        FeatureSpec.load(os.path.join(out, "spec.json")),
        batch_tasks=8,
        max_support=16,
        max_query=8,
        drop_remainder=True,
    )
    batch = next(iter(ds))
    assert batch["support_label"].shape == (8, 16)
    assert float(tf.reduce_min(tf.reduce_sum(batch["query_mask"], axis=1))) == 8.0
    model = tf_limaml.LiMAMLModel(
        spec, tf_limaml.MetaConfig(jit_compile=False), **small_model_kwargs
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    before = [w.numpy().copy() for w in model.trainable_variables]
    history = model.fit(ds.take(1), epochs=1, verbose=0)
    loss = history.history["loss"][0]
    assert math.isfinite(loss) and loss > 0
    after = model.trainable_variables
    assert any(not (b == a.numpy()).all() for b, a in zip(before, after, strict=True))


def test_cli_make_tasks_reports_user_errors_with_exit_code_2(tmp_path, capsys):
    from tf_limaml import cli

    input_path, spec_path = _write_inputs(tmp_path, history("u", 3))
    code = cli.main(
        [
            "make-tasks",
            "--input",
            input_path,
            "--features",
            spec_path,
            "--output",
            str(tmp_path / "out"),
            "--split",
            "half",
        ]
    )
    assert code == 2
    assert "fraction:F" in capsys.readouterr().err
