"""Property-based tests (hypothesis): garbage in never crashes, nothing is lost."""

import collections
import glob
import json
import math
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from beam_pipelines import make_tasks
from tf_limaml import tasks as task_rules
from tf_limaml.features import FeatureSpec, FeatureSpecError

# Numerics that need statistics (mean/std, or the training mean for blanks)
# and "auto" vocabularies, so that generated rows reach the analyzers.
SPEC_JSON = {
    "entity": "member",
    "time": {"column": "ts", "format": "epoch_seconds"},
    "label": {"column": "rating", "threshold": 4},
    "tie_break": "item",
    "meta_features": [
        {"name": "age", "type": "numeric"},
        {"name": "job", "type": "categorical", "vocabulary": "auto"},
    ],
    "request_features": [
        {"name": "item", "type": "categorical", "vocabulary": "auto", "top_k": 4},
        {"name": "genres", "type": "multi_hot", "vocabulary": ["x", "y"]},
        {"name": "price", "type": "numeric", "transform": "log1p"},
        {"name": "score", "type": "numeric", "normalize": False},
    ],
}
SPEC = FeatureSpec.from_dict(SPEC_JSON)

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
            "1e200",
            "-1e200",
            "3e38",
            "NaN",
            "Inf",
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
    "score": st.floats(-5, 5),
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
            for name in ("ts", "price", "score", "age"):
                assert math.isfinite(kept_row[name]), (name, kept_row)
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
        "score": 2.0,
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


# ------------------------------------------ the whole job under fuzz (Beam)
# Each example is one `make_tasks.run` over FUZZ_TABLES generated CSV files
# (one pipeline run checks several tables: a run costs seconds), read back
# from the files the job wrote. `make test` runs FUZZ_EXAMPLES examples,
# `make test-slow` FUZZ_EXAMPLES_SLOW more.
FUZZ_TABLES = 6
FUZZ_EXAMPLES = 10
FUZZ_EXAMPLES_SLOW = 60
FUZZ_FLAGS = {
    "split": "fraction:0.5",
    "max_support": 3,
    "seed": 0,
    "val_fraction": 0.2,
    "test_fraction": 0.1,
}
FUZZ_COLUMNS = [
    "member",
    "ts",
    "rating",
    "item",
    "genres",
    "price",
    "score",
    "age",
    "job",
]
FUZZ_MEMBERS = ["m1", "m2", "m3", "m4", "m5", "../../etc", "ü"]
# Cells a numeric column sometimes holds: finite but beyond float32 (1e200),
# at its edge (3e38, kept), NaN/Inf as text, blanks (the training mean).
ODD_NUMBERS = ["1e200", "-1e200", "3e38", "-3e38", "2.5e38", "NaN", "Inf", "-Inf"]
ODD_NUMBERS += ["nan", "", " ", "1e-300", "1e400"]
REJECTED_NUMBERS = {"1e200", "-1e200", "NaN", "Inf", "-Inf", "nan", "1e400"}
_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=6,
)
fuzz_garbage = st.one_of(
    _text,
    st.sampled_from(ODD_NUMBERS + ["ünïcödé", "../../etc", "a", "x|y", "x|q", "4"]),
    st.integers(-(10**30), 10**30).map(str),
    st.floats().map(repr),
)


def _numeric(plain):
    odd = st.sampled_from(ODD_NUMBERS)
    return st.sampled_from([True] * 5 + [False]).flatmap(
        lambda usual: plain if usual else odd
    )


fuzz_plausible = {
    "member": st.sampled_from(FUZZ_MEMBERS),
    "ts": st.integers(0, 50).map(str),
    "rating": st.integers(1, 5).map(str),
    "item": st.integers(0, 9).map(str),
    "genres": st.sampled_from(["x", "y", "x|y", ""]),
    "price": _numeric(st.floats(0, 100).map(repr)),
    "score": _numeric(st.floats(-5, 5).map(repr)),
    "age": _numeric(st.integers(18, 70).map(str)),
    "job": st.sampled_from(["a", "b", "c", ""]),
}
fuzz_clean = st.fixed_dictionaries(fuzz_plausible)


@st.composite
def fuzz_line(draw):
    """(kind, cells): a row of text cells, or a line the reader cannot read."""
    kind = draw(
        st.sampled_from(
            ["clean"] * 5 + ["corrupted", "corrupted", "garbage", "fields", "bytes"]
        )
    )
    cells = draw(fuzz_clean)
    if kind == "corrupted":
        for column in draw(
            st.sets(st.sampled_from(FUZZ_COLUMNS), min_size=1, max_size=3)
        ):
            cells[column] = draw(fuzz_garbage)
    elif kind == "garbage":
        cells = {c: draw(st.one_of(st.just(""), fuzz_garbage)) for c in FUZZ_COLUMNS}
    elif kind == "fields":
        cells["_fields"] = draw(st.sampled_from([-1, 1, 2]))
    elif kind == "bytes":
        cells["_bytes"] = draw(st.sampled_from(FUZZ_COLUMNS))
    return kind, cells


fuzz_table = st.tuples(
    st.permutations(FUZZ_COLUMNS), st.lists(fuzz_line(), min_size=4, max_size=30)
)
# Stands for bytes that are not UTF-8 until the line is encoded.
_NOT_UTF8 = "\x01not-utf8\x01"


def write_fuzz_tables(tables, directory) -> tuple[list[dict], int]:
    """Writes part-T.csv files; returns (the readable rows as the job should
    read them, the count of lines it cannot read)."""
    import csv
    import io

    rows, unreadable = [], 0
    for t, (header, lines) in enumerate(tables):
        text = io.StringIO()
        # "\r\n" ends lines: the writer then quotes a cell holding "\r" or
        # "\n" (with "\n" alone it leaves a "\r" bare, a line break to a reader).
        writer = csv.writer(text, lineterminator="\r\n")
        writer.writerow(header)
        for kind, cells in lines:
            cells = dict(cells)
            if cells.get("member") in FUZZ_MEMBERS:
                # Each table its own entities (garbage ids may meet across tables).
                cells["member"] = f"t{t}-{cells['member']}"
            values = [cells[c] for c in header]
            if kind == "fields":
                n = cells["_fields"]
                values = values[:n] if n < 0 else values + ["extra"] * n
                unreadable += 1
            elif kind == "bytes":
                values[header.index(cells["_bytes"])] = _NOT_UTF8
                unreadable += 1
            else:
                rows.append({c: cells[c] for c in header})
            writer.writerow(values)
        data = (
            text.getvalue().encode("utf-8").replace(_NOT_UTF8.encode(), b"\xff\xfeok")
        )
        with open(os.path.join(directory, f"part-{t}.csv"), "wb") as f:
            f.write(data)
    return rows, unreadable


def run_fuzz_job(directory) -> dict:
    """`make_tasks.run` on DIR/part-*.csv into DIR/out; {"out", "error"}."""
    from beam_pipelines import make_tasks
    from tf_limaml.errors import UserInputError

    with open(os.path.join(directory, "spec.json"), "w") as f:
        json.dump(SPEC_JSON, f)
    out = os.path.join(directory, "out")
    argv = [
        "--input",
        os.path.join(directory, "part-*.csv"),
        "--features",
        os.path.join(directory, "spec.json"),
        "--output",
        out,
        "--min-valid-fraction",
        "0",
    ]
    for name, value in FUZZ_FLAGS.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    try:
        make_tasks.run(argv)
    except UserInputError as err:
        # Nothing valid, no positive label, or an auto vocabulary no train
        # value reaches: the job says so in one line after writing the dead
        # letter and stats.json.
        return {"out": out, "error": str(err)}
    return {"out": out, "error": None}


def _f32(x: float) -> float:
    # As a record stores it; beyond float32 (the row bound off) it is inf.
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def _row_key(entity: str, part: str, row: dict) -> tuple:
    return (
        entity,
        part,
        int(row["ts"]),
        float(row["label"]),
        row["item"],
        tuple(row["genres"]),
        _f32(row["price"]),
        _f32(row["score"]),
    )


def _cell(lists, part: str, name: str, i: int, kind: str):
    return getattr(lists[f"{part}/{name}"].feature[i], kind).value


def decode_fuzz_records(out: str) -> dict:
    """Rows, meta and every float of the records the job wrote, by kind."""
    import tensorflow as tf

    decoded = {
        "rows": collections.Counter(),
        "meta": collections.Counter(),
        "train": collections.defaultdict(list),
        "floats": [],
    }
    files = sorted(glob.glob(os.path.join(out, "*.tfrecord.gz")))
    for path in files:
        split = os.path.basename(path).split("-")[0]
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            example = tf.train.SequenceExample.FromString(record.numpy())
            context = example.context.feature
            entity = context["entity_id"].bytes_list.value[0].decode()
            age = context["age"].float_list.value[0]
            job = context["job"].bytes_list.value[0].decode()
            decoded["meta"][(entity, split == "cold", age, job)] += 1
            decoded["floats"].append(age)
            lists = example.feature_lists.feature_list
            for part in ("support", "query"):
                n = len(lists[f"{part}/label"].feature)
                for i in range(n):

                    row = {
                        "ts": _cell(lists, part, "time", i, "int64_list")[0],
                        "label": _cell(lists, part, "label", i, "float_list")[0],
                        "item": _cell(lists, part, "item", i, "bytes_list")[0].decode(),
                        "genres": [
                            v.decode()
                            for v in _cell(lists, part, "genres", i, "bytes_list")
                        ],
                        "price": _cell(lists, part, "price", i, "float_list")[0],
                        "score": _cell(lists, part, "score", i, "float_list")[0],
                    }
                    decoded["rows"][_row_key(entity, part, row)] += 1
                    decoded["floats"] += [row["price"], row["score"]]
                    if split == "train":
                        for name in ("price", "score", "item", "genres"):
                            decoded["train"][name].append(row[name])
            if split == "train":
                decoded["train"]["age"].append(age)
                decoded["train"]["job"].append(job)
    return decoded


def fuzz_reference(rows: list[dict]) -> dict:
    """What the job must write, from the in-process `build_tasks` on the same rows."""
    from unittest import mock

    impute = task_rules.impute_histories
    train_values: dict[str, list[float]] = collections.defaultdict(list)

    def keep_train_values(spec, histories, train, *args, **kwargs):
        # The train values before the blanks are filled: what the moments see.
        for h in histories:
            if h.entity_id in train:
                train_values["age"].append(h.meta["age"])
                for row in h.support + h.query:
                    train_values["price"].append(row["price"])
        return impute(spec, histories, train, *args, **kwargs)

    with mock.patch.object(task_rules, "impute_histories", keep_train_values):
        histories, rejected, counts = task_rules.build_tasks(
            SPEC,
            rows,
            FUZZ_FLAGS["split"],
            max_support=FUZZ_FLAGS["max_support"],
            seed=FUZZ_FLAGS["seed"],
            val_fraction=FUZZ_FLAGS["val_fraction"],
            test_fraction=FUZZ_FLAGS["test_fraction"],
        )
    reference = {
        "rows": collections.Counter(),
        "meta": collections.Counter(),
        "rejected": collections.Counter(
            (reason, json.dumps(row, sort_keys=True)) for row, reason in rejected
        ),
        "counts": counts,
        "train_values": {
            name: [x for x in values if not math.isnan(x)]
            for name, values in train_values.items()
        },
    }
    for h in histories:
        for part, part_rows in (("support", h.support), ("query", h.query)):
            for row in part_rows:
                reference["rows"][_row_key(h.entity_id, part, row)] += 1
        reference["meta"][
            (h.entity_id, h.cold, _f32(h.meta["age"]), h.meta["job"])
        ] += 1
    return reference


def check_fuzz_job(job: dict, rows: list[dict], unreadable: int) -> collections.Counter:
    """The job's files hold exactly the reference's rows; its statistics are
    numpy's on the train records, and finite.

    Returns:
        What the example reached (for `test_fuzz_examples_reach_the_analyzers`).
    """
    out, reached = job["out"], collections.Counter()
    reference = fuzz_reference(rows)
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["rows_read"] == len(rows) + unreadable, (stats, len(rows))
    assert stats["conservation"]["holds"], stats
    for key in ("rows_in_tasks", "rows_cold", "rows_dropped_by_caps"):
        assert stats[key] == reference["counts"][key], (key, stats, reference)
    dead = [
        json.loads(line)
        for path in sorted(glob.glob(os.path.join(out, "rejected-*")))
        for line in open(path, encoding="utf-8")
    ]
    unread = [d for d in dead if d["reason"] == task_rules.REASON_MALFORMED_ROW]
    assert len(unread) == unreadable, (len(unread), unreadable)
    read = collections.Counter(
        (d["reason"], json.dumps(d["row"], sort_keys=True))
        for d in dead
        if d["reason"] != task_rules.REASON_MALFORMED_ROW
    )
    assert read == reference["rejected"], (
        read - reference["rejected"],
        reference["rejected"] - read,
    )
    reached["unreadable lines"] += unreadable
    reached["beyond float32 rejected"] += sum(
        d["reason"] == task_rules.REASON_BAD_NUMERIC and "beyond" in d["detail"]
        for d in dead
    )
    if job["error"] is not None:
        # Stopped before the blanks were filled: no spec.json, so the records
        # are not a training input; what is checked is that it said why.
        assert job["error"].startswith("make-tasks stopped: ") or (
            "'auto': no training value occurs" in job["error"]
        ), job["error"]
        assert not os.path.exists(os.path.join(out, "spec.json"))
        reached["job stopped in a line"] += 1
        return reached
    decoded = decode_fuzz_records(out)
    # Multiplicity, not membership: every kept row as often as in the reference.
    assert decoded["rows"] == reference["rows"], (
        "written rows differ from the kept rows, counted with multiplicity",
        decoded["rows"] - reference["rows"],
        reference["rows"] - decoded["rows"],
    )
    assert decoded["meta"] == reference["meta"], (
        decoded["meta"] - reference["meta"],
        reference["meta"] - decoded["meta"],
    )
    assert sum(decoded["rows"].values()) == stats["rows_in_tasks"] + stats["rows_cold"]
    bad = [x for x in decoded["floats"] if not math.isfinite(x)]
    assert not bad, f"records hold non-finite floats: {bad[:5]}"
    spec = FeatureSpec.load(os.path.join(out, "spec.json"))
    assert spec.missing_statistics() == []
    train = decoded["train"]
    for name in ("age", "price"):
        feature = spec.feature(name)
        # The train entities' values before blanks are filled, as validated.
        raw = np.array(reference["train_values"][name], dtype=np.float64)
        x = np.sign(raw) * np.log1p(np.abs(raw)) if name == "price" else raw
        assert math.isfinite(feature.mean) and math.isfinite(feature.std), feature
        assert feature.statistics["count"] == len(x)
        if len(x):
            reached["moments"] += 1
            reached["moments of values >= 1e38"] += bool(np.abs(raw).max() >= 1e38)
            std = x.std() or 1.0
            assert feature.mean == pytest.approx(x.mean(), rel=1e-6, abs=1e-6 * std)
            assert feature.std == pytest.approx(std, rel=1e-6)
    for name, values in (("job", train["job"]), ("item", train["item"])):
        feature = spec.feature(name)
        counts = collections.Counter(v for v in values if v)
        want = sorted(counts, key=lambda v: (-counts[v], v))[: feature.top_k]
        assert list(feature.vocabulary) == want, (name, feature.vocabulary, want)
        reached["vocabularies"] += 1
        reached["vocabularies cut by top_k"] += len(counts) > len(want)
    if spec.feature("score").default is not None:
        reached["blanks filled with the train mean"] += 1
    return reached


def fixed_fuzz_tables() -> list:
    """Two tables holding every kind of cell the fuzz draws, at fixed places."""
    tables = []
    for t in range(2):
        lines = []
        for m, member in enumerate(FUZZ_MEMBERS):
            for ts in range(6):
                cells = {
                    "member": member,
                    "ts": str(ts),
                    "rating": str(1 + (ts + m) % 5),
                    "item": str((ts * 3 + m) % 7),
                    "genres": ["x", "y", "x|y", ""][ts % 4],
                    "price": f"{1.5 * (ts + 1)}",
                    "score": "" if ts == 2 else f"{ts - m}",
                    "age": str(20 + m),
                    "job": "abc"[m % 3],
                }
                lines.append(("clean", cells))
        huge = dict(lines[0][1], ts="7", price="1e200")
        edge = dict(lines[1][1], ts="8", price="3e38", score="-3e38")
        lines += [("clean", huge), ("clean", edge)]
        lines += [("corrupted", dict(lines[2][1], score=odd)) for odd in ("NaN", "Inf")]
        lines += [
            ("fields", dict(lines[3][1], _fields=-1)),
            ("fields", dict(lines[3][1], _fields=2)),
            ("bytes", dict(lines[4][1], _bytes="item")),
            ("garbage", {c: "" for c in FUZZ_COLUMNS}),
        ]
        tables.append((list(reversed(FUZZ_COLUMNS)) if t else FUZZ_COLUMNS, lines))
    return tables


def check_fixed_fuzz_tables(directory) -> collections.Counter:
    """`check_fuzz_job` on `fixed_fuzz_tables()`, which reaches every path."""
    rows, unreadable = write_fuzz_tables(fixed_fuzz_tables(), directory)
    reached = check_fuzz_job(run_fuzz_job(directory), rows, unreadable)
    assert reached["beyond float32 rejected"] == 2, reached
    assert reached["moments"] == 2 and reached["moments of values >= 1e38"], reached
    assert reached["vocabularies cut by top_k"] == 1, reached
    return reached


def test_make_tasks_on_fixed_tables_of_every_kind_of_cell(tmp_path):
    check_fixed_fuzz_tables(str(tmp_path))


FUZZ_REACHED: collections.Counter = collections.Counter()


def _fuzz_example(tables) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        rows, unreadable = write_fuzz_tables(tables, directory)
        job = run_fuzz_job(directory)
        reached = check_fuzz_job(job, rows, unreadable)
    for what, n in reached.items():
        event(f"reached: {what}")
        FUZZ_REACHED[what] += n
    FUZZ_REACHED["examples"] += 1
    target(float(reached["moments"] + reached["vocabularies"]), label="analyzers")


# derandomize: `make test` runs the same examples every time (the reach
# check below must not be flaky); the slow suite explores at random.
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
@given(tables=st.lists(fuzz_table, min_size=FUZZ_TABLES, max_size=FUZZ_TABLES))
def test_make_tasks_under_fuzz_writes_every_row_once_and_finite_statistics(tables):
    _fuzz_example(tables)


@pytest.mark.slow
@settings(
    max_examples=FUZZ_EXAMPLES_SLOW,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(tables=st.lists(fuzz_table, min_size=FUZZ_TABLES, max_size=FUZZ_TABLES))
def test_make_tasks_under_more_fuzz(tables):
    _fuzz_example(tables)


def test_fuzz_examples_reach_the_analyzers():
    """A property whose examples never reach the moments proves nothing of them."""
    if not FUZZ_REACHED["examples"]:  # run alone (-k): run the property here
        test_make_tasks_under_fuzz_writes_every_row_once_and_finite_statistics()
    n = FUZZ_REACHED["examples"]
    assert FUZZ_REACHED["moments"] >= n, FUZZ_REACHED  # most examples, both features
    assert FUZZ_REACHED["vocabularies"] >= n, FUZZ_REACHED
    for what in (
        "unreadable lines",
        "beyond float32 rejected",
        "moments of values >= 1e38",
        "vocabularies cut by top_k",
        "blanks filled with the train mean",
    ):
        assert FUZZ_REACHED[what] > 0, (what, FUZZ_REACHED)


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
