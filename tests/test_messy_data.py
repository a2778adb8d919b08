"""A messy table, as users export it, through `limaml make-tasks` from the CLI.

Times as ISO-8601 text (with and without a zone) and Parquet timestamps,
`yes`/`no` labels, blank numerics and categoricals, prices such as "N/A" and
"$12.99", empty ids and duplicate rows: every row is accounted for in
stats.json. A table with nothing usable stops in one line (exit 2) that names
the real reason and the dead letter, and leaves no `beam-temp-*` behind.
"""

from __future__ import annotations

import csv
import datetime
import glob
import json
import math
import os

import pytest
from guarantees import (
    check_blanks_get_the_train_mean,
    decoded_task_rows,
    make_tasks_with_blank_prices,
)

from tf_limaml import cli, evaluation
from tf_limaml import tasks as task_rules
from tf_limaml.features import FeatureSpec, FeatureSpecError

COLUMNS = ("user", "ts", "clicked", "item", "price", "age", "country")
SPEC = {
    "entity": "user",
    "time": "ts",
    "label": {"column": "clicked", "positive": ["yes"]},
    "meta_features": [
        {"name": "age", "type": "numeric", "missing_indicator": True},
        {"name": "country", "type": "categorical", "vocabulary": "auto"},
    ],
    "request_features": [
        {"name": "item", "type": "categorical", "hash_buckets": 64},
        {"name": "price", "type": "numeric", "transform": "log1p"},
    ],
}


def messy_rows() -> tuple[list[dict], dict]:
    """30 users x 8 rows with every kind of mess, and what each should count as."""
    rows = []
    expected = {
        "missing_entity": 0,
        "bad_numeric": 0,
        "blank_age": 0,
        "blank_country": 0,
        "blank_price": 0,
        "duplicates": 0,
    }
    for u in range(30):
        user = f"üser-{u}" if u % 4 else f"user, {u}"  # unicode, quoted commas
        age = "" if u % 6 == 0 else str(20 + u)
        country = "" if u % 7 == 0 else ("Côte d'Ivoire" if u % 2 else "US")
        for k in range(8):
            when = datetime.datetime(2024, 3, 1, 12) + datetime.timedelta(hours=u + k)
            ts = when.isoformat() + ("Z" if k % 2 else "")
            price = f"{1.5 + k}"
            if (u + k) % 11 == 0:
                price = ""
            row = {
                "user": user,
                "ts": ts,
                "clicked": "yes" if (u + k) % 3 == 0 else "no",
                "item": f"item {k}, size M",
                "price": price,
                "age": age,
                "country": country,
            }
            if u == 3 and k == 2:
                row["price"] = "N/A"
                expected["bad_numeric"] += 1
            elif u == 4 and k == 5:
                row["price"] = "$12.99"
                expected["bad_numeric"] += 1
            elif u == 5 and k == 1:
                row["user"] = ""
                expected["missing_entity"] += 1
            else:
                expected["blank_age"] += not row["age"]
                expected["blank_country"] += not row["country"]
                expected["blank_price"] += not row["price"]
            rows.append(row)
    for copy in (rows[10], rows[11], rows[40]):  # exact duplicates
        rows.append(dict(copy))
        expected["duplicates"] += 1
        expected["blank_age"] += not copy["age"]
        expected["blank_country"] += not copy["country"]
        expected["blank_price"] += not copy["price"]
    return rows, expected


def write_csv(path, rows, columns=COLUMNS):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def make_tasks(tmp_path, input_path, spec=SPEC, *extra, fmt="csv", name="out"):
    spec_path = tmp_path / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    output = str(tmp_path / name)
    argv = [
        "make-tasks",
        "--input",
        str(input_path),
        "--format",
        fmt,
        "--features",
        str(spec_path),
        "--output",
        output,
        "--split",
        "last:2",
        *extra,
    ]
    return cli.main(argv), output


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_conservation(stats):
    terms = (
        stats["rows_in_tasks"]
        + stats["rows_rejected"]
        + stats["rows_dropped_by_caps"]
        + stats["rows_cold"]
        + stats["rows_dropped_as_duplicates"]
    )
    assert stats["rows_read"] == terms, stats
    assert stats["conservation"]["holds"], stats["conservation"]
    assert sum(stats["rejected_by_reason"].values()) == stats["rows_rejected"]


def no_beam_temp(output):
    return not glob.glob(os.path.join(output, "beam-temp-*"))


# --------------------------------------------------------- the messy CSV
@pytest.mark.parametrize("duplicates", ["keep", "drop"])
def test_messy_csv_every_row_is_accounted_for(tmp_path, duplicates):
    rows, expected = messy_rows()
    write_csv(tmp_path / "clicks.csv", rows)
    code, out = make_tasks(
        tmp_path, tmp_path / "clicks.csv", SPEC, "--duplicates", duplicates
    )
    assert code == 0
    stats = read_json(os.path.join(out, "stats.json"))
    check_conservation(stats)
    assert stats["rows_read"] == len(rows)
    assert stats["rejected_by_reason"]["missing_entity"] == expected["missing_entity"]
    assert stats["rejected_by_reason"]["bad_numeric"] == expected["bad_numeric"]
    assert (
        stats["rows_rejected"] == expected["missing_entity"] + expected["bad_numeric"]
    )
    assert stats["imputed_by_feature"]["age"] == expected["blank_age"]
    assert stats["imputed_by_feature"]["country"] == expected["blank_country"]
    assert stats["imputed_by_feature"]["price"] == expected["blank_price"]
    assert stats["duplicate_rows"] == expected["duplicates"]
    dropped = expected["duplicates"] if duplicates == "drop" else 0
    assert stats["rows_dropped_as_duplicates"] == dropped
    assert stats["labels"]["positive"] > 0 and stats["labels"]["negative"] > 0
    # Every user with an id is there: no row was lost to a blank.
    decoded = decoded_task_rows(out)
    users = {r["user"] for r in rows if r["user"]}
    assert set(decoded["tasks"]) | set(decoded["cold"]) == users
    assert sum(decoded["tasks"].values()) == stats["rows_in_tasks"]
    # The completed spec says how times were read and what a blank became.
    spec = FeatureSpec.load(os.path.join(out, "spec.json"))
    assert spec.time_format == "iso8601"
    assert spec.feature("age").default is not None
    assert spec.feature("price").default is not None
    assert spec.feature("age_missing").indicator_of == "age"
    assert spec.missing_statistics() == []
    assert no_beam_temp(out)


def test_messy_csv_time_in_records_is_utc_seconds(tmp_path):
    import tensorflow as tf

    rows = [
        {**dict.fromkeys(COLUMNS, "1"), "user": "a", "ts": ts, "clicked": c}
        for ts, c in (
            ("2024-03-01T12:00:00Z", "yes"),
            ("2024-03-01 13:00:00", "no"),  # naive: UTC
            ("2024-03-01T15:00:00+01:00", "yes"),  # 14:00 UTC
        )
    ]
    write_csv(tmp_path / "t.csv", rows)
    code, out = make_tasks(tmp_path, tmp_path / "t.csv", SPEC, "--val-fraction", "0")
    assert code == 0
    files = sorted(glob.glob(os.path.join(out, "*.tfrecord.gz")))
    times = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        example = tf.train.SequenceExample.FromString(record.numpy())
        for part in ("support", "query"):
            times += [
                f.int64_list.value[0]
                for f in example.feature_lists.feature_list[f"{part}/time"].feature
            ]
    noon = int(datetime.datetime(2024, 3, 1, 12, tzinfo=datetime.UTC).timestamp())
    assert times == [noon, noon + 3600, noon + 7200]


# ----------------------------------------------------- Parquet timestamps
def test_parquet_timestamp_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, _ = messy_rows()
    rows = [r for r in rows if r["user"] and r["price"] not in ("N/A", "$12.99")]
    start = datetime.datetime(2024, 3, 1, tzinfo=datetime.UTC)
    times = [start + datetime.timedelta(minutes=i) for i in range(len(rows))]
    times[7] = None  # a missing time: the one row rejected
    table = pa.table(
        {
            "user": [r["user"] for r in rows],
            "ts": pa.array(times, pa.timestamp("us", tz="UTC")),
            "clicked": [r["clicked"] == "yes" for r in rows],  # booleans
            "item": [r["item"] for r in rows],
            "price": [float(r["price"]) if r["price"] else None for r in rows],
            "age": [float(r["age"]) if r["age"] else None for r in rows],
            "country": [r["country"] or None for r in rows],
        }
    )
    pq.write_table(table, tmp_path / "clicks.parquet")
    spec = {**SPEC, "label": {"column": "clicked", "positive": ["true"]}}
    code, out = make_tasks(tmp_path, tmp_path / "clicks.parquet", spec, fmt="parquet")
    assert code == 0
    stats = read_json(os.path.join(out, "stats.json"))
    check_conservation(stats)
    assert stats["rows_read"] == len(rows)
    assert stats["rejected_by_reason"]["missing_time"] == stats["rows_rejected"] == 1
    assert stats["imputed_by_feature"]["price"] == sum(
        1 for r in rows if not r["price"]
    )
    assert FeatureSpec.load(os.path.join(out, "spec.json")).time_format == "iso8601"
    assert no_beam_temp(out)


# ------------------------------------------------------- a clear stop
def _one_line_stop(capsys, code, out):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    assert os.path.join(out, "rejected-*.jsonl") in errors[0], errors[0]
    assert glob.glob(os.path.join(out, "rejected-*.jsonl")), "no dead letter"
    assert no_beam_temp(out)
    assert not os.path.exists(os.path.join(out, "spec.json"))
    return errors[0]


def test_every_row_rejected_names_the_real_reason(tmp_path, capsys):
    rows, _ = messy_rows()
    # Times stated as epoch seconds: every ISO time is rejected.
    write_csv(tmp_path / "clicks.csv", rows)
    spec = {**SPEC, "time": {"column": "ts", "format": "epoch_seconds"}}
    code, out = make_tasks(tmp_path, tmp_path / "clicks.csv", spec)
    line = _one_line_stop(capsys, code, out)
    assert "bad_time" in line and "0 of" in line, line
    assert "2024-03-01" in line, line  # an example row
    assert "vocabulary" not in line, line  # not the symptom


def test_yes_no_labels_without_positive_stop_at_the_label(tmp_path, capsys):
    rows, _ = messy_rows()
    write_csv(tmp_path / "clicks.csv", rows)
    spec = {**SPEC, "label": "clicked"}
    code, out = make_tasks(tmp_path, tmp_path / "clicks.csv", spec)
    line = _one_line_stop(capsys, code, out)
    assert "bad_label" in line and '"positive"' in line, line


def test_header_only_csv(tmp_path, capsys):
    write_csv(tmp_path / "empty.csv", [])
    code, out = make_tasks(tmp_path, tmp_path / "empty.csv")
    line = _one_line_stop(capsys, code, out)
    assert "no data row" in line, line


def test_no_positive_label(tmp_path, capsys):
    rows, _ = messy_rows()
    write_csv(tmp_path / "clicks.csv", [{**r, "clicked": "no"} for r in rows])
    code, out = make_tasks(tmp_path, tmp_path / "clicks.csv")
    line = _one_line_stop(capsys, code, out)
    assert "positive label" in line and "clicked" in line, line


def test_min_valid_fraction(tmp_path, capsys):
    rows, _ = messy_rows()
    rows = [{**r, "price": "N/A"} if i % 3 else r for i, r in enumerate(rows)]
    write_csv(tmp_path / "clicks.csv", rows)
    code, out = make_tasks(tmp_path, tmp_path / "clicks.csv")
    line = _one_line_stop(capsys, code, out)
    assert "bad_numeric" in line and "--min-valid-fraction is 0.5" in line, line
    code, out = make_tasks(
        tmp_path,
        tmp_path / "clicks.csv",
        SPEC,
        "--min-valid-fraction",
        "0.2",
        name="ok",
    )
    assert code == 0


def test_stale_beam_temp_is_removed(tmp_path):
    rows, _ = messy_rows()
    write_csv(tmp_path / "clicks.csv", rows)
    stale = tmp_path / "out" / "beam-temp-stats-0123"
    stale.mkdir(parents=True)
    (stale / "part").write_text("x")
    code, out = make_tasks(tmp_path, tmp_path / "clicks.csv", SPEC)
    assert code == 0 and no_beam_temp(out)


# ------------------------------------------------ the spec's new forms
def test_time_label_and_missing_forms_round_trip():
    obj = {
        **SPEC,
        "time": {"column": "ts", "format": "epoch_millis"},
        "label": {"column": "clicked", "positive": ["Yes", 1], "negative": ["nope"]},
    }
    spec = FeatureSpec.from_dict(obj)
    assert spec.time_format == "epoch_millis"
    assert spec.label.positive == ("yes", "1")
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    assert [spec.label.binarize(v) for v in ("YES ", 1.0, 1, "nope")] == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="neither"):
        spec.label.binarize("no")  # not in the given negatives
    with pytest.raises(FeatureSpecError, match="format"):
        FeatureSpec.from_dict({**SPEC, "time": {"column": "ts", "format": "unix"}})
    with pytest.raises(FeatureSpecError, match="not both"):
        FeatureSpec.from_dict(
            {**SPEC, "label": {"column": "c", "threshold": 1, "positive": ["y"]}}
        )
    reject = {**SPEC["request_features"][1], "missing": "reject"}
    strict = FeatureSpec.from_dict({**SPEC, "request_features": [reject]})
    with pytest.raises(task_rules.RowError) as err:
        task_rules.validate_row(
            strict, {"user": "u", "ts": "1", "clicked": "yes", "price": ""}
        )
    assert err.value.reason == task_rules.REASON_MISSING_FEATURE


def test_time_parsing_and_detection():
    parse = task_rules.parse_time
    assert parse("1700000000000", "epoch_millis") == 1.7e9
    assert parse(1.7e9, "epoch_seconds") == 1.7e9
    assert parse("2024-03-01", "iso8601") == parse("2024-03-01T00:00:00Z", "iso8601")
    assert parse(datetime.date(2024, 3, 1), "iso8601") == parse("2024-03-01", "auto")
    with pytest.raises(ValueError, match="ISO-8601"):
        parse("1700000000", "iso8601")
    with pytest.raises(ValueError, match="seconds"):
        parse("2024-03-01", "epoch_seconds")
    detect = task_rules.detect_time_format
    assert detect(["2024-03-01T00:00:00Z", "", "x"]) == "iso8601"
    assert detect([1.7e12, 1.7e12 + 1]) == "epoch_millis"
    assert detect(["5", "6"]) == "epoch_seconds"
    assert detect(["", None]) is None


def test_mixed_time_column_rejects_only_its_bad_rows(tmp_path):
    rows, _ = messy_rows()
    rows = [r for r in rows if r["user"] and r["price"] not in ("N/A", "$12.99")]
    rows[3] = {**rows[3], "ts": "1709294400"}  # a number among ISO times
    rows[9] = {**rows[9], "ts": "last tuesday"}
    write_csv(tmp_path / "clicks.csv", rows)
    code, out = make_tasks(tmp_path, tmp_path / "clicks.csv")
    assert code == 0
    stats = read_json(os.path.join(out, "stats.json"))
    assert stats["rejected_by_reason"]["bad_time"] == stats["rows_rejected"] == 2
    details = [
        json.loads(line)["detail"]
        for path in glob.glob(os.path.join(out, "rejected-*.jsonl"))
        for line in open(path, encoding="utf-8")
    ]
    assert all("ISO-8601" in d and "iso8601" in d for d in details), details


# ---------------------------------- imputation uses the training mean only
def test_blank_numerics_get_the_train_mean(tmp_path):
    check_blanks_get_the_train_mean(make_tasks_with_blank_prices(tmp_path))


def test_build_tasks_in_process_imputes_the_train_mean():
    rows, _ = messy_rows()
    spec = FeatureSpec.from_dict(SPEC)
    histories, rejected, counts = task_rules.build_tasks(spec, rows, "last:2")
    assert len(rejected) == 3 and counts["duplicate_rows"] == 3
    for history in histories:
        for row in [history.meta, *history.support, *history.query]:
            for name in ("age", "price"):
                if name in row:
                    assert not math.isnan(row[name]), (history.entity_id, row)


# ------------------------------------------------ evaluate says what it scored
def test_query_coverage_counts_what_a_cap_leaves_out():
    assert evaluation.query_coverage([3, 5, 1], 10)["left_out"] == 0
    cut = evaluation.query_coverage([3, 5, 1], 2)
    assert (cut["in_files"], cut["scored"], cut["left_out"], cut["tasks_cut"]) == (
        9,
        5,
        4,
        2,
    )
    assert "--max-query" in cut["why"]


def test_query_set_sizes_reads_the_records(tmp_path):
    rows, _ = messy_rows()
    write_csv(tmp_path / "clicks.csv", rows)
    code, out = make_tasks(tmp_path, tmp_path / "clicks.csv")
    assert code == 0
    spec = FeatureSpec.load(os.path.join(out, "spec.json"))
    sizes = evaluation.query_set_sizes(os.path.join(out, "*-*.tfrecord.gz"), spec)
    stats = read_json(os.path.join(out, "stats.json"))
    queries = sum(s["query_rows"] for s in stats["splits"].values())
    cold = decoded_task_rows(out)["cold"]
    assert sum(sizes) >= queries and len(sizes) == stats["entities"] + len(cold)
