"""Property-based tests (hypothesis): garbage in never crashes, nothing is lost."""

import collections
import json
import math

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from beam_pipelines import make_tasks
from tf_limaml import tasks as task_rules
from tf_limaml.features import FeatureSpec, FeatureSpecError

SPEC = FeatureSpec.from_dict(
    {
        "entity": "member",
        "time": "ts",
        "label": {"column": "rating", "threshold": 4},
        "tie_break": "item",
        "meta_features": [
            {"name": "age", "type": "numeric", "normalize": False},
            {"name": "job", "type": "categorical", "vocabulary": ["a", "b"]},
        ],
        "request_features": [
            {"name": "item", "type": "categorical", "hash_buckets": 50},
            {"name": "genres", "type": "multi_hot", "vocabulary": ["x", "y"]},
            {"name": "price", "type": "numeric", "normalize": False},
        ],
    }
)

garbage = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(
        [
            "",
            " ",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "ünïcödé",
            "../../etc",
            "a",
            "b",
            "x|y",
            "x|q",
            "4",
            "5",
            "1",
        ]
    ),
)
plausible = {
    "member": st.sampled_from(["m1", "m2", "m3", "../../etc", "ü"]),
    "ts": st.integers(0, 50),
    "rating": st.integers(1, 5),
    "item": st.integers(0, 9).map(str),
    "genres": st.sampled_from(["x", "y", "x|y", ""]),
    "price": st.floats(-5, 5),
    "age": st.integers(18, 70),
    "job": st.sampled_from(["a", "b"]),
}
columns = list(plausible)
# Plausible rows with every column present, so that tasks are actually built;
# some with a few cells corrupted (garbage or missing) and some pure garbage.
clean_row = st.fixed_dictionaries(plausible)


@st.composite
def corrupted_row(draw):
    row = draw(clean_row)
    for column in draw(st.sets(st.sampled_from(columns), min_size=1, max_size=3)):
        if draw(st.booleans()):
            row[column] = draw(garbage)
        else:
            del row[column]
    return row


garbage_row = st.fixed_dictionaries({}, optional={c: garbage for c in columns})
# sampled_from weighs the kinds: half clean, a quarter corrupted, a quarter garbage.
row = st.sampled_from(["clean", "clean", "corrupted", "garbage"]).flatmap(
    {"clean": clean_row, "corrupted": corrupted_row(), "garbage": garbage_row}.get
)
rows_strategy = st.lists(row, max_size=40)


def _check_outcomes(rows, histories, rejected, counts, max_support, max_query):
    """Every row in exactly one outcome, checked against the rows themselves."""
    assert counts["rows_read"] == len(rows)
    assert counts["rows_read"] == (
        counts["rows_in_tasks"]
        + counts["rows_rejected"]
        + counts["rows_dropped_by_caps"]
        + counts["rows_cold"]
    )
    assert len(rejected) == counts["rows_rejected"]
    for _, reason in rejected:
        assert reason in task_rules.REJECT_REASONS
    # Independently of build_tasks' own counters: the valid rows of each entity.
    valid: dict[str, list] = {}
    for raw in rows:
        try:
            clean = task_rules.validate_row(SPEC, raw)
        except task_rules.RowError:
            continue
        valid.setdefault(clean["member"], []).append(clean)
    assert len(rows) - sum(len(v) for v in valid.values()) == len(rejected)
    assert sorted(h.entity_id for h in histories) == sorted(valid)
    tasks = [h for h in histories if not h.cold]
    assert counts["rows_in_tasks"] == sum(len(h.support) + len(h.query) for h in tasks)
    assert counts["rows_cold"] == sum(h.n_rows for h in histories if h.cold)
    for history in histories:
        mine = valid[history.entity_id]
        assert history.n_rows + history.dropped_by_caps == len(mine)
        kept = history.support + history.query
        for kept_row in kept:
            assert any(_same_row(kept_row, clean) for clean in mine), kept_row
            assert math.isfinite(kept_row["ts"]) and math.isfinite(kept_row["price"])
            assert kept_row["label"] in (0, 1)
        if not history.cold:
            assert max_support is None or len(history.support) <= max_support
            assert max_query is None or len(history.query) <= max_query
    return len(tasks)


def _same_row(kept: dict, clean: dict) -> bool:
    """`kept` is `clean`, but for blanks (NaN there) filled with a finite mean."""
    if set(kept) != set(clean):
        return False
    for name, value in clean.items():
        if isinstance(value, float) and math.isnan(value):
            if not math.isfinite(kept[name]):
                return False
        elif kept[name] != value:
            return False
    return True


# Examples seen and examples that built at least one task, per property test.
SEEN = {"in_process": collections.Counter(), "beam": collections.Counter()}


def _record(kind: str, n_tasks: int) -> None:
    event("built a task" if n_tasks else "built no task")
    SEEN[kind]["examples"] += 1
    SEEN[kind]["with_tasks"] += bool(n_tasks)


@settings(max_examples=300, deadline=None)
@given(
    rows=rows_strategy,
    max_support=st.one_of(st.none(), st.integers(1, 4)),
    max_query=st.one_of(st.none(), st.integers(1, 4)),
    rule=st.sampled_from(["fraction:0.5", "last:2", "cutoff:25", "fraction:0.3"]),
)
def test_every_row_lands_in_exactly_one_outcome(rows, max_support, max_query, rule):
    histories, rejected, counts = task_rules.build_tasks(
        SPEC, rows, rule, max_support=max_support, max_query=max_query
    )
    n_tasks = _check_outcomes(rows, histories, rejected, counts, max_support, max_query)
    target(float(n_tasks), label="tasks built")
    _record("in_process", n_tasks)


def test_fixed_rows_build_tasks_and_account_for_every_row():
    clean = {
        "ts": 0,
        "rating": 5,
        "item": "1",
        "genres": "x",
        "price": 1.0,
        "age": 30,
        "job": "a",
    }
    rows = [dict(clean, member="m1", ts=t) for t in range(6)]  # 3 + 3, cap drops 1
    rows += [dict(clean, member="m2", ts=t, rating=1) for t in range(4)]  # 2 + 2
    rows += [dict(clean, member="m3")]  # cold: no query row
    rows += [dict(clean, member="m1", price="nan"), {"member": "m2"}, {}]  # rejected
    histories, rejected, counts = task_rules.build_tasks(
        SPEC, rows, "fraction:0.5", max_support=2
    )
    assert _check_outcomes(rows, histories, rejected, counts, 2, None) == 2
    assert [counts[k] for k in ("rows_in_tasks", "rows_dropped_by_caps")] == [9, 1]
    assert (counts["rows_cold"], counts["rows_rejected"]) == (1, 3)
    assert [r for _, r in rejected] == ["bad_numeric", "missing_time", "missing_entity"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Six examples only (each runs a pipeline): at least eight rows each, so that
# most of them build tasks.
@given(rows=st.lists(row, min_size=8, max_size=40))
def test_beam_pipeline_never_crashes_and_conserves_rows(rows):
    _, _, expected = task_rules.build_tasks(SPEC, rows, "fraction:0.5", max_support=3)

    def check_stats(actual):
        if len(actual) != 1:
            raise BeamAssertException(f"expected one stats dict, got {actual}")
        stats = actual[0]
        if stats["rows_read"] != len(rows) or not stats["conservation"]["holds"]:
            raise BeamAssertException(f"rows lost: {stats}")
        got = {k: stats[k] for k in expected if k in stats}
        if got != {k: expected[k] for k in got} or len(got) < 6:
            raise BeamAssertException(f"{got} != build_tasks' {expected}")

    def check_tasks(tasks):
        rows_in_tasks = sum(_record_rows(record) for _, _, record in tasks)
        if rows_in_tasks != expected["rows_in_tasks"]:
            raise BeamAssertException(f"{rows_in_tasks} rows in task records")

    with TestPipeline(options=PipelineOptions(flags=[])) as p:
        out = (
            p
            | beam.Create(rows, reshuffle=False)
            | make_tasks.BuildTasks(SPEC, "fraction:0.5", max_support=3)
        )
        assert_that(out["stats"], check_stats)
        assert_that(out["tasks"], check_tasks, label="TaskRows")
        # Every dead-letter line is valid JSON with the row and a reason.
        assert_that(
            out["rejected"] | beam.MapTuple(lambda _, line: sorted(json.loads(line))),
            lambda lines: (
                all({"reason", "row"} <= set(k) for k in lines)
                and len(lines) == expected["rows_rejected"]
            )
            or (_raise(lines)),
            label="DeadLetterIsJson",
        )
    _record("beam", expected["entities"])


def test_most_property_examples_build_tasks():
    """Conservation over examples that build nothing would prove nothing."""
    tests = {
        "in_process": test_every_row_lands_in_exactly_one_outcome,
        "beam": test_beam_pipeline_never_crashes_and_conserves_rows,
    }
    for kind, test in tests.items():
        if not SEEN[kind]["examples"]:  # run alone (-k): run the property here
            test()
        seen = SEEN[kind]
        assert seen["with_tasks"] > seen["examples"] / 2, (kind, seen)


def _record_rows(record: bytes) -> int:
    import tensorflow as tf

    lists = tf.train.SequenceExample.FromString(record).feature_lists.feature_list
    return len(lists["support/label"].feature) + len(lists["query/label"].feature)


def _raise(lines):
    raise BeamAssertException(f"bad dead-letter lines: {lines}")


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 10**6),
        st.floats(allow_nan=False),
        st.text(max_size=6),
        st.sampled_from(["numeric", "categorical", "multi_hot"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "type",
                    "vocabulary",
                    "hash_buckets",
                    "dim",
                    "separator",
                    "column",
                    "threshold",
                    "max_values",
                    "x",
                ]
            ),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=20,
)
spec_like = st.fixed_dictionaries(
    {},
    optional={
        "entity": json_values,
        "time": json_values,
        "label": json_values,
        "meta_features": st.lists(json_values, max_size=3),
        "request_features": st.lists(json_values, max_size=3),
        "tie_break": json_values,
        "extra": json_values,
    },
)


@settings(max_examples=500, deadline=None)
@given(obj=st.one_of(spec_like, json_values))
def test_random_spec_json_is_accepted_or_rejected_clearly(obj):
    try:
        spec = FeatureSpec.from_dict(obj)
    except FeatureSpecError as err:
        message = str(err)
        assert message.startswith("Invalid feature spec: `"), message
        return
    # Accepted specs survive a JSON round trip unchanged.
    assert FeatureSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '{"entity": "e"}', "\x00"])
def test_malformed_spec_text_is_rejected_clearly(text):
    with pytest.raises(FeatureSpecError, match="Invalid feature spec"):
        FeatureSpec.from_json(text)
