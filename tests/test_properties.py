"""Property-based tests (hypothesis): garbage in never crashes, nothing is lost."""

import json
import math

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that
from hypothesis import HealthCheck, given, settings
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
row = st.fixed_dictionaries(
    {}, optional={c: st.one_of(plausible[c], garbage) for c in columns}
)
rows_strategy = st.lists(row, max_size=40)


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
    for history in histories:
        for kept in history.support + history.query:
            assert math.isfinite(kept["ts"]) and math.isfinite(kept["price"])
            assert kept["label"] in (0, 1)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy)
def test_beam_pipeline_never_crashes_and_conserves_rows(rows):
    def check(actual):
        if len(actual) != 1:
            raise BeamAssertException(f"expected one stats dict, got {actual}")
        stats = actual[0]
        if stats["rows_read"] != len(rows) or not stats["conservation"]["holds"]:
            raise BeamAssertException(f"rows lost: {stats}")

    with TestPipeline(options=PipelineOptions(flags=[])) as p:
        out = (
            p
            | beam.Create(rows, reshuffle=False)
            | make_tasks.BuildTasks(SPEC, "fraction:0.5", max_support=3)
        )
        assert_that(out["stats"], check)
        # Every dead-letter line is valid JSON with the row and a reason.
        assert_that(
            out["rejected"] | beam.Map(lambda line: sorted(json.loads(line))),
            lambda lines: all({"reason", "row"} <= set(k) for k in lines)
            or (_raise(lines)),
            label="DeadLetterIsJson",
        )


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
