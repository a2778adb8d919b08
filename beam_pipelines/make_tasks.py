"""Beam pipeline: interactions -> one support/query task record per entity.

Reads an interactions table (CSV with a header, or Parquet), validates every
row against the FeatureSpec, groups rows by entity, sorts and splits each
history into support (earlier) and query (later) rows with the rules of
`tf_limaml.tasks`, assigns each entity to train/val/test by a stable hash, and
writes one `tf.train.SequenceExample` per entity with `tf_limaml.data.encode_task`.

Outputs in DIR:

* `{train,val,test}-SSSSS-of-NNNNN.tfrecord.gz`: the task records (GZIP), read
  by `tf_limaml.data.task_dataset`; NNNNN is `--num-shards`, or with 0 one
  shard per ~128 MiB of records;
* `cold-SSSSS-of-NNNNN.tfrecord.gz`: entities with too little history for the
  split rule, encoded the same way but uncapped (their support rows can still
  give a cold-start embedding);
* `rejected-SSSSS-of-NNNNN.jsonl`: the dead letter, one JSON object per bad row
  with `reason`, `detail`, `source` and the `row` as read;
* `spec.json`: the FeatureSpec the records were written with, completed
  with statistics of the TRAIN entities (numeric mean/std, `"auto"`
  vocabularies; see `beam_pipelines.analyze`) where the input spec left them
  to the data;
* `stats.json`: counts, size histograms, rejections by reason and by feature,
  and the conservation identity
  rows_read = rows_in_tasks + rows_rejected + rows_dropped_by_caps + rows_cold.

The output depends only on the input rows and the flags: every run, on every
runner and in any running mode, writes byte-identical files (ties are ordered
by content, the split is a SHA-256 of seed and entity id, records are
serialized deterministically, the shard of a record is a SHA-256 of its entity
id, a shard holds its records sorted by entity id, and the GZIP header carries
no time stamp). Entity ids are data only: they never become part of a path.

Locally (DirectRunner, in memory or on several processes):

    limaml make-tasks --input 'data/interactions-*.csv' --format csv \\
        --features spec.json --output tasks/ --split fraction:0.5 \\
        --max-support 64 --max-query 32 \\
        --direct_running_mode=multi_processing --direct_num_workers=4

On Dataflow (`--setup_file` makes the workers install this package):

    python -m beam_pipelines.make_tasks \\
        --input 'gs://BUCKET/interactions/*.parquet' --format parquet \\
        --entities 'gs://BUCKET/members/*.parquet' \\
        --features gs://BUCKET/spec.json --output gs://BUCKET/tasks/v1 \\
        --split last:8 --max-support 64 --max-query 16 --seed 0 \\
        --runner DataflowRunner --project PROJECT --region us-central1 \\
        --temp_location gs://BUCKET/tmp --setup_file ./setup.py

In code, `MakeTasks` is the whole job and `BuildTasks` the logic between
reading and writing, for a PCollection of row dicts:

    with beam.Pipeline() as p:
        outputs = (p | beam.Create(rows)
                     | BuildTasks(spec, SplitRule.parse("last:2")))
        outputs["tasks"]     # (split, entity_id, serialized SequenceExample)
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime
import decimal
import hashlib
import io
import json
import logging
import math
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.pvalue import AsDict
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from beam_pipelines.analyze import AnalyzeFeatures, analysis_inputs
from beam_pipelines.options import make_tasks_arguments
from beam_pipelines.outputs import prepare_output
from tf_limaml import data as task_data
from tf_limaml import tasks as task_rules
from tf_limaml.features import FeatureSpec
from tf_limaml.tasks import REJECT_REASONS, SPLITS, RowError, SplitRule

logger = logging.getLogger(__name__)

NAMESPACE = "limaml.make_tasks"
FORMATS = ("csv", "parquet")
SOURCE_INTERACTIONS = "interactions"
SOURCE_ENTITIES = "entities"
# Output tags of the DoFns (besides the main output).
REJECTED = "rejected"
STATS = "stats"
COLD = "cold"
# Inputs of the feature analyzers, emitted for train entities only.
ANALYSIS = "analysis"
TASK_SUFFIX = ".tfrecord.gz"
REJECTED_SUFFIX = ".jsonl"
# A shard file is written under this hidden name, then renamed into place.
TEMP_PREFIX = ".tmp-"
# With --num-shards 0 each output gets one shard per this many bytes of records:
# a count that depends on the data only, never on the runner's bundles.
AUTO_SHARD_BYTES = 128 << 20
CONSERVATION = (
    "rows_read = rows_in_tasks + rows_rejected + rows_dropped_by_caps + rows_cold"
)
# Every file name the pipeline writes in DIR, for --overwrite and the stale-output check.
OUTPUT_PATTERNS = tuple(f"{name}-*{TASK_SUFFIX}" for name in SPLITS + (COLD,)) + (
    f"rejected-*{REJECTED_SUFFIX}",
    "stats.json",
    "spec.json",
    f"{TEMP_PREFIX}*",
)


# ------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class MalformedRow:
    """A record the reader could not turn into a row; validation dead-letters it.

    Attributes:
        row: What could be read of it (column -> value), for the dead letter.
        detail: What was wrong, with the file and line.
    """

    row: dict
    detail: str


def read_csv_file(readable_file: fileio.ReadableFile) -> Iterator[dict | MalformedRow]:
    """Yields each data line of one CSV file (with a header) as a dict of strings.

    Lines with the wrong number of fields, bytes that are not UTF-8, or that
    the csv module rejects come out as `MalformedRow`, never as an exception:
    one bad line must not fail the job.
    """
    path = readable_file.metadata.path
    with readable_file.open() as raw:
        # surrogateescape keeps undecodable bytes visible so the line can be rejected.
        text = io.TextIOWrapper(
            raw, encoding="utf-8-sig", errors="surrogateescape", newline=""
        )
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield MalformedRow({"file": path}, f"{path}: unreadable header: {err}")
            return
        header = [name.strip() for name in header]
        if len(set(header)) != len(header):
            duplicate = next(n for n in header if header.count(n) > 1)
            logger.warning(
                "%s: column %r appears twice in the header; the last one " "is used",
                path,
                duplicate,
            )
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield MalformedRow(
                    {"file": path, "line": reader.line_num},
                    f"{path}:{reader.line_num}: {err}",
                )
                continue
            if not values:
                continue  # A blank line holds no row.
            if len(values) != len(header):
                row = dict(zip(header, values, strict=False))
                if len(values) > len(header):
                    row["_extra_fields"] = values[len(header) :]
                yield MalformedRow(
                    row,
                    f"{path}:{reader.line_num}: {len(values)} fields, "
                    f"the header has {len(header)}",
                )
                continue
            joined = "".join(values)
            if not joined.isascii():
                try:
                    joined.encode("utf-8")
                except UnicodeEncodeError:
                    yield MalformedRow(
                        dict(zip(header, values, strict=True)),
                        f"{path}:{reader.line_num}: bytes that are not UTF-8",
                    )
                    continue
            yield dict(zip(header, values, strict=True))


def _table_rows(table: Any) -> list[dict]:
    """Rows of a pyarrow Table (one Parquet batch) as dicts of Python values."""
    return table.to_pylist()


class ReadInteractions(beam.PTransform):
    """Reads a CSV (with header) or Parquet table into row dicts.

    CSV values stay strings and validation parses them, so a bad cell becomes
    a dead-letter reason instead of a reader error. Parquet values keep their
    types (numbers, strings, timestamps, lists).

    Args:
        file_pattern: Files to read (local, gs://, ... any Beam filesystem).
        file_format: "csv" or "parquet".
    """

    def __init__(self, file_pattern: str, file_format: str = "csv"):
        super().__init__()
        if file_format not in FORMATS:
            raise ValueError(
                f"file_format must be one of {FORMATS}, got {file_format!r}"
            )
        self.file_pattern = file_pattern
        self.file_format = file_format

    def expand(self, pbegin):
        if self.file_format == "parquet":
            return (
                pbegin
                | "ReadParquet" >> beam.io.ReadFromParquetBatched(self.file_pattern)
                | "BatchToRows" >> beam.FlatMap(_table_rows)
            )
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(self.file_pattern)
            # A file is read whole by one worker; spreading the files is
            # what lets several workers read at once.
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadMatches" >> fileio.ReadMatches()
            | "ParseCsv" >> beam.FlatMap(read_csv_file)
        )


# ----------------------------------------------------------------- dead letter
def _text(value: str) -> str:
    # Undecodable bytes (surrogates) cannot be written as UTF-8; escape them.
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def json_safe(value: Any, _depth: int = 0) -> Any:
    """A JSON-serializable copy of any row value (NaN, bytes, dates, numpy, ...).

    Non-finite floats become the strings "nan", "inf", "-inf"; anything
    unknown becomes its repr, so a dead-letter record can always be written.
    """
    if _depth > 16:
        return _text(repr(value))
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else repr(float(value))
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, Mapping):
        return {
            (_text(k) if isinstance(k, str) else _text(repr(k))): json_safe(
                v, _depth + 1
            )
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [json_safe(v, _depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((json_safe(v, _depth + 1) for v in value), key=repr)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        try:
            return json_safe(value.tolist(), _depth + 1)
        except Exception:  # noqa: BLE001 - an odd object still gets written, as repr
            pass
    return _text(repr(value))


def dead_letter_record(row: Any, reason: str, detail: str, source: str) -> str:
    """One line of the dead letter: JSON with reason, detail, source and the row."""
    record = {
        "reason": reason,
        "detail": _text(detail),
        "source": source,
        "row": json_safe(row),
    }
    return json.dumps(record, ensure_ascii=False, allow_nan=False, sort_keys=True)


# ---------------------------------------------------------------- statistics
def _windowed(value: Any) -> WindowedValue:
    return WindowedValue(value, GlobalWindow().max_timestamp(), [GlobalWindow()])


class _CountingDoFn(beam.DoFn):
    """A DoFn that sums its statistics per bundle and emits them once per bundle.

    One stats element per bundle (not per row) keeps the statistics almost free
    at a million rows; Beam counters get the same totals.
    """

    def start_bundle(self):
        self._counts = collections.Counter()

    def finish_bundle(self):
        if not self._counts:
            return
        for key, value in self._counts.items():
            if key[0] not in ("support_size_histogram", "query_size_histogram"):
                Metrics.counter(NAMESPACE, ".".join(key)).inc(value)
        yield beam.pvalue.TaggedOutput(STATS, _windowed(dict(self._counts)))
        self._counts = collections.Counter()


class SumCounts(beam.CombineFn):
    """Sums dicts of {key tuple: count}."""

    def create_accumulator(self):
        return collections.Counter()

    def add_input(self, accumulator, element):
        accumulator.update(element)
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = collections.Counter()
        for accumulator in accumulators:
            merged.update(accumulator)
        return merged

    def extract_output(self, accumulator):
        return dict(accumulator)


def size_bucket(n: int) -> str:
    """Histogram bucket of a set size: "0", "1", "2-3", "4-7", "8-15", ..."""
    if n <= 1:
        return str(n)
    low = 1 << (n.bit_length() - 1)
    return f"{low}-{2 * low - 1}"


def _bucket_low(name: str) -> int:
    return int(name.split("-")[0])


def finalize_stats(
    counts: Mapping[tuple, int],
    options: Mapping[str, Any],
    with_entity_table: bool,
    feature_names: Sequence[str] = (),
) -> dict[str, Any]:
    """Turns the summed counters into the stats.json object.

    Args:
        counts: {key tuple: count} from the pipeline's DoFns.
        options: The flags of the run, recorded for provenance.
        with_entity_table: Whether an entity table was read.
        feature_names: The spec's features, each listed (0 if none) under
            `rejected_by_feature`.

    Returns:
        The stats, with every reject reason and split present (0 if none) and
        the conservation identity checked.
    """

    def get(*key: str) -> int:
        return int(counts.get(key, 0))

    stats: dict[str, Any] = {
        "rows_read": get("rows_read"),
        "rows_in_tasks": get("rows_in_tasks"),
        "rows_rejected": get("rows_rejected"),
        "rows_dropped_by_caps": get("rows_dropped_by_caps"),
        "rows_cold": get("rows_cold"),
    }
    total = (
        stats["rows_in_tasks"]
        + stats["rows_rejected"]
        + stats["rows_dropped_by_caps"]
        + stats["rows_cold"]
    )
    stats["conservation"] = {
        "identity": CONSERVATION,
        "rows_read": stats["rows_read"],
        "sum": total,
        "holds": stats["rows_read"] == total,
    }
    stats["rejected_by_reason"] = {
        r: get("rejected_by_reason", r) for r in REJECT_REASONS
    }
    stats["rejected_by_feature"] = _by_feature(
        counts, "rejected_by_feature", feature_names
    )
    stats["entities"] = get("entities")
    stats["entities_cold"] = get("entities_cold")
    stats["meta_conflicts"] = get("meta_conflicts")
    stats["splits"] = {
        split: {
            name: get("splits", split, name)
            for name in ("entities", "interactions", "support_rows", "query_rows")
        }
        for split in SPLITS
    }
    for part in ("support", "query"):
        name = f"{part}_size_histogram"
        buckets = sorted((key[1] for key in counts if key[0] == name), key=_bucket_low)
        stats[name] = {bucket: get(name, bucket) for bucket in buckets}
    if with_entity_table:
        stats["entity_table"] = {
            "rows_read": get("entity_table", "rows_read"),
            "rows_rejected": get("entity_table", "rows_rejected"),
            "rejected_by_reason": {
                r: get("entity_table", "rejected_by_reason", r) for r in REJECT_REASONS
            },
            "rejected_by_feature": _by_feature(
                counts, ("entity_table", "rejected_by_feature"), feature_names
            ),
            "entities_used": get("entity_table", "entities_used"),
            "conflicts": get("entity_table", "conflicts"),
            "entities_without_interactions": get(
                "entity_table", "entities_without_interactions"
            ),
        }
    stats["options"] = dict(options)
    return stats


def _by_feature(
    counts: Mapping[tuple, int], prefix: str | tuple[str, ...], names: Sequence[str]
) -> dict[str, int]:
    prefix = (prefix,) if isinstance(prefix, str) else prefix
    found = {
        key[len(prefix)]: int(n)
        for key, n in counts.items()
        if key[: len(prefix)] == prefix and len(key) == len(prefix) + 1
    }
    return {name: found.get(name, 0) for name in sorted(set(names) | set(found))}


# ----------------------------------------------------------------- the logic
@dataclasses.dataclass(frozen=True)
class _Checked:
    """What `_check` found: a result, or why the row was rejected."""

    result: Any
    reason: str | None
    detail: str
    row: Any
    feature: str | None = None


def _check(element: Any, check: Any) -> _Checked:
    """Runs `check(row)` on one read element without ever raising.

    Returns:
        reason is None when the row passed; otherwise a REJECT_REASONS key,
        what was wrong, and the feature whose cell broke a rule (if one did).
    """
    if isinstance(element, MalformedRow):
        return _Checked(
            None, task_rules.REASON_MALFORMED_ROW, element.detail, element.row
        )
    row = element._asdict() if hasattr(element, "_asdict") else element  # beam.Row
    if not isinstance(row, Mapping):
        return _Checked(
            None,
            task_rules.REASON_MALFORMED_ROW,
            f"expected a mapping of column to value, got {type(row).__name__}",
            row,
        )
    try:
        return _Checked(check(row), None, "", row)
    except RowError as err:
        return _Checked(None, err.reason, err.detail, row, err.feature)
    except Exception as err:  # noqa: BLE001 - one odd value must not fail the job
        return _Checked(
            None, task_rules.REASON_MALFORMED_ROW, f"{type(err).__name__}: {err}", row
        )


class ValidateRows(_CountingDoFn):
    """Validates interaction rows: (entity_id, clean row), or the dead letter."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.spec = spec

    def _validate(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return task_rules.validate_row(self.spec, row)

    def process(self, element: Any):
        self._counts[("rows_read",)] += 1
        checked = _check(element, self._validate)
        if checked.reason is None:
            yield checked.result[self.spec.entity], checked.result
            return
        self._counts[("rows_rejected",)] += 1
        self._counts[("rejected_by_reason", checked.reason)] += 1
        if checked.feature is not None:
            self._counts[("rejected_by_feature", checked.feature)] += 1
        yield beam.pvalue.TaggedOutput(
            REJECTED,
            dead_letter_record(
                checked.row, checked.reason, checked.detail, SOURCE_INTERACTIONS
            ),
        )


class ValidateEntities(_CountingDoFn):
    """Validates entity-table rows: (entity_id, meta), or the dead letter."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.spec = spec

    def _validate(self, row: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        return task_rules.validate_meta_row(self.spec, row)

    def process(self, element: Any):
        self._counts[("entity_table", "rows_read")] += 1
        checked = _check(element, self._validate)
        if checked.reason is None:
            yield checked.result
            return
        counts = self._counts
        counts[("entity_table", "rows_rejected")] += 1
        counts[("entity_table", "rejected_by_reason", checked.reason)] += 1
        if checked.feature is not None:
            counts[("entity_table", "rejected_by_feature", checked.feature)] += 1
        yield beam.pvalue.TaggedOutput(
            REJECTED,
            dead_letter_record(
                checked.row, checked.reason, checked.detail, SOURCE_ENTITIES
            ),
        )


class SplitEntities(_CountingDoFn):
    """One entity's rows -> its task record (split, entity_id, bytes), or cold.

    Uses `tf_limaml.tasks.split_history` (sort, split, caps, cold, meta merge),
    `tf_limaml.tasks.assign_split` and `tf_limaml.data.encode_task`, the same
    functions as the in-process `tf_limaml.tasks.build_tasks`.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        rule: SplitRule,
        min_support: int = 1,
        min_query: int = 1,
        max_support: int | None = None,
        max_query: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
    ):
        super().__init__()
        self.spec = spec
        self.rule = rule
        self.min_support = min_support
        self.min_query = min_query
        self.max_support = max_support
        self.max_query = max_query
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def _table_meta(self, metas: list[dict]) -> dict | None:
        if not metas:
            return None
        self._counts[("entity_table", "entities_used")] += 1
        if len(metas) == 1:
            return metas[0]
        # The table has no time to say which duplicate is latest; the greatest by
        # content wins, so every runner picks the same one.
        distinct = {task_rules.content_key(m) for m in metas}
        if len(distinct) > 1:
            self._counts[("entity_table", "conflicts")] += 1
        return max(metas, key=task_rules.content_key)

    def process(self, element: tuple[str, Any]):
        entity_id, grouped = element
        if isinstance(grouped, Mapping):  # CoGroupByKey with the entity table
            rows, metas = list(grouped["rows"]), list(grouped["meta"])
            if not rows:
                self._counts[("entity_table", "entities_without_interactions")] += 1
                return
        else:
            rows, metas = grouped, []
        history = task_rules.split_history(
            self.spec,
            entity_id,
            rows,
            self.rule,
            min_support=self.min_support,
            min_query=self.min_query,
            max_support=self.max_support,
            max_query=self.max_query,
            meta=self._table_meta(metas),
        )
        self._counts[("meta_conflicts",)] += history.meta_conflicts
        record = task_data.encode_task(
            self.spec, entity_id, history.meta, history.support, history.query
        ).SerializeToString(deterministic=True)
        if history.cold:
            self._counts[("entities_cold",)] += 1
            self._counts[("rows_cold",)] += history.n_rows
            yield beam.pvalue.TaggedOutput(COLD, (entity_id, record))
            return
        split = task_rules.assign_split(
            entity_id, self.seed, self.val_fraction, self.test_fraction
        )
        n_support, n_query = len(history.support), len(history.query)
        counts = self._counts
        counts[("entities",)] += 1
        counts[("rows_in_tasks",)] += n_support + n_query
        counts[("rows_dropped_by_caps",)] += history.dropped_by_caps
        counts[("splits", split, "entities")] += 1
        counts[("splits", split, "interactions")] += n_support + n_query
        counts[("splits", split, "support_rows")] += n_support
        counts[("splits", split, "query_rows")] += n_query
        counts[("support_size_histogram", size_bucket(n_support))] += 1
        counts[("query_size_histogram", size_bucket(n_query))] += 1
        if split == "train":
            # Statistics come from the training entities only, from exactly the
            # rows of their tasks: a value seen only in val or test never
            # reaches a mean or a vocabulary.
            for item in analysis_inputs(
                self.spec, history.meta, history.support + history.query
            ):
                yield beam.pvalue.TaggedOutput(ANALYSIS, item)
        yield split, entity_id, record


class BuildTasks(beam.PTransform):
    """Row dicts -> task records, cold records, dead letter and statistics.

    The logic of the pipeline between reading and writing: validate each row
    (`tf_limaml.tasks.validate_row`), group by entity (joined with the entity
    table if given), split each history and encode it.

    Args:
        spec: The FeatureSpec.
        rule: How a history is cut into support and query (or its text form).
        min_support: Entities with fewer support rows are cold.
        min_query: Entities with fewer query rows are cold.
        max_support: Keep each entity's most recent N support rows.
        max_query: Keep each entity's first N query rows.
        seed: Seed of the train/val/test hash.
        val_fraction: Share of entities in val.
        test_fraction: Share of entities in test.
        entities: Optional PCollection of entity-table rows (entity id and meta
            features); an entity found there takes its meta features from it.
        options: Extra fields recorded under "options" in the statistics.

    Returns (from `expand`): a dict of PCollections:
        "tasks": (split, entity_id, serialized SequenceExample);
        "cold": (entity_id, serialized SequenceExample) of cold entities;
        "rejected": dead-letter JSON lines (interactions and entity table);
        "stats": one dict, the content of stats.json;
        "spec": one string, the JSON of the spec completed with statistics of
            the train entities (`beam_pipelines.analyze.AnalyzeFeatures`).
    """

    def __init__(
        self,
        spec: FeatureSpec,
        rule: SplitRule | str = "fraction:0.5",
        min_support: int = 1,
        min_query: int = 1,
        max_support: int | None = None,
        max_query: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        entities: beam.PCollection | None = None,
        options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.rule = SplitRule.parse(rule) if isinstance(rule, str) else rule
        for name, value in (("min_support", min_support), ("min_query", min_query)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")
        for name, value in (("max_support", max_support), ("max_query", max_query)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ValueError(
                    f"`{name}` must be a positive integer or None, got " f"{value!r}"
                )
        for name, value in (
            ("val_fraction", val_fraction),
            ("test_fraction", test_fraction),
        ):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
        if val_fraction + test_fraction > 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {val_fraction + test_fraction} "
                "is more than 1; lower one of them"
            )
        self.split_fn = SplitEntities(
            spec,
            self.rule,
            min_support,
            min_query,
            max_support,
            max_query,
            seed,
            val_fraction,
            test_fraction,
        )
        self.entities = entities
        self.options = {
            "split": str(self.rule),
            "min_support": min_support,
            "min_query": min_query,
            "max_support": max_support,
            "max_query": max_query,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            **dict(options or {}),
        }

    def expand(self, rows):
        validated = rows | "ValidateRows" >> beam.ParDo(
            ValidateRows(self.spec)
        ).with_outputs(REJECTED, STATS, main="clean")
        rejected = [validated[REJECTED]]
        stats = [validated[STATS]]
        if self.entities is None:
            grouped = validated.clean | "GroupByEntity" >> beam.GroupByKey()
        else:
            table = self.entities | "ValidateEntities" >> beam.ParDo(
                ValidateEntities(self.spec)
            ).with_outputs(REJECTED, STATS, main="meta")
            rejected.append(table[REJECTED])
            stats.append(table[STATS])
            grouped = {
                "rows": validated.clean,
                "meta": table.meta,
            } | "GroupByEntityWithTable" >> beam.CoGroupByKey()
        split = grouped | "SplitEntities" >> beam.ParDo(self.split_fn).with_outputs(
            COLD, STATS, ANALYSIS, main="tasks"
        )
        stats.append(split[STATS])
        options, with_table = self.options, self.entities is not None
        names = [f.name for f in self.spec.features]
        summary = (
            tuple(stats)
            | "FlattenStats" >> beam.Flatten()
            | "SumStats" >> beam.CombineGlobally(SumCounts())
            | "FinalizeStats" >> beam.Map(finalize_stats, options, with_table, names)
        )
        return {
            "tasks": split.tasks,
            "cold": split[COLD],
            "rejected": tuple(rejected) | "FlattenRejected" >> beam.Flatten(),
            "stats": summary,
            "spec": split[ANALYSIS] | "AnalyzeFeatures" >> AnalyzeFeatures(self.spec),
        }


def _log_conservation(stats: dict[str, Any]) -> dict[str, Any]:
    if not stats["conservation"]["holds"]:
        logger.error(
            "Conservation identity broken: %s, but rows_read = %d and the sum " "is %d",
            CONSERVATION,
            stats["rows_read"],
            stats["conservation"]["sum"],
        )
    return stats


# ------------------------------------------------------------------- writing
TFRECORD = "tfrecord"
TEXT = "text"


def shard_count(total_bytes: int, num_shards: int = 0) -> int:
    """Shards of one output: `num_shards`, or with 0 one per AUTO_SHARD_BYTES (>= 1)."""
    if num_shards:
        return num_shards
    return max(1, math.ceil(total_bytes / AUTO_SHARD_BYTES))


def shard_of(key: str, num_shards: int) -> int:
    """The shard of a record, from a SHA-256 of its key (the same in every process)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_name(name: str, index: int, count: int, suffix: str) -> str:
    """`NAME-SSSSS-of-NNNNN.suffix`, the layout Beam's file sinks use."""
    return f"{name}-{index:05d}-of-{count:05d}{suffix}"


def _payload_size(item: tuple[str, str, bytes]) -> tuple[str, int]:
    return item[0], len(item[2])


def _with_shard_count(name_bytes: tuple[str, int], num_shards: int) -> tuple[str, int]:
    return name_bytes[0], shard_count(name_bytes[1], num_shards)


def _every_shard(name: str, count: int) -> list[tuple[tuple[str, int], None]]:
    # One marker per shard, so that an output with no records still gets its
    # (empty) files and readers never find a shard missing.
    return [((name, index), None) for index in range(count)]


def _key_by_shard(
    item: tuple[str, str, bytes], counts: Mapping[str, int]
) -> tuple[tuple[str, int], tuple[str, bytes]]:
    name, key, payload = item
    return (name, shard_of(key, counts[name])), (key, payload)


def _write_shard(
    element: tuple[tuple[str, int], Any],
    output_dir: str,
    formats: Mapping[str, tuple[str, str]],
    counts: Mapping[str, int],
) -> str:
    """Writes one shard, its records sorted by (key, payload), and returns its path.

    The file is written under a hidden temporary name and renamed into place,
    so a reader never sees half a shard; a retried bundle writes the same bytes
    again.
    """
    (name, index), items = element
    suffix, kind = formats[name]
    records = sorted(item for item in items if item is not None)
    path = FileSystems.join(output_dir, shard_name(name, index, counts[name], suffix))
    temp = FileSystems.join(
        output_dir,
        f"{TEMP_PREFIX}{shard_name(name, index, counts[name], suffix)}-"
        f"{uuid.uuid4().hex}",
    )
    compression = (
        CompressionTypes.GZIP if kind == TFRECORD else (CompressionTypes.UNCOMPRESSED)
    )
    try:
        with FileSystems.create(temp, compression_type=compression) as f:
            for _, payload in records:
                if kind == TFRECORD:
                    # The framing (length, masked CRC32C) Beam's TFRecord sink writes.
                    _TFRecordUtil.write_record(f, payload)
                else:
                    f.write(payload + b"\n")
        FileSystems.rename([temp], [path])
    except BaseException:
        if FileSystems.exists(temp):
            FileSystems.delete([temp])
        raise
    return path


class WriteShards(beam.PTransform):
    """(name, key, payload) triples -> `DIR/NAME-SSSSS-of-NNNNN<suffix>` files.

    Unlike Beam's file sinks, whose shard of a record and order within a shard
    follow the runner's bundles, the files are a function of the data: a
    record's shard is `shard_of(key)`, a shard holds its records sorted by
    (key, payload), and the shard count is `shard_count(bytes, num_shards)`.
    So every run writes byte-identical files. A shard is sorted in memory
    (auto sharding keeps it near AUTO_SHARD_BYTES).

    Args:
        output_dir: Directory (any Beam filesystem).
        formats: {name: (suffix, "tfrecord" or "text")}. TFRecord files are
            GZIP-compressed; text payloads are UTF-8 lines.
        num_shards: Shards per name (0: from the bytes, see `shard_count`).

    Returns (from `expand`): the paths written.
    """

    def __init__(
        self,
        output_dir: str,
        formats: Mapping[str, tuple[str, str]],
        num_shards: int = 0,
    ):
        super().__init__()
        self.output_dir = output_dir
        self.formats = dict(formats)
        self.num_shards = num_shards

    def expand(self, items):
        pipeline = items.pipeline
        counts = (
            (
                items | "PayloadBytes" >> beam.Map(_payload_size),
                pipeline
                | "EveryName" >> beam.Create([(name, 0) for name in self.formats]),
            )
            | "FlattenSizes" >> beam.Flatten()
            | "BytesPerName" >> beam.CombinePerKey(sum)
            | "ShardCounts" >> beam.Map(_with_shard_count, self.num_shards)
        )
        keyed = items | "KeyByShard" >> beam.Map(_key_by_shard, AsDict(counts))
        markers = counts | "EveryShard" >> beam.FlatMapTuple(_every_shard)
        return (
            (keyed, markers)
            | "FlattenShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard"
            >> beam.Map(_write_shard, self.output_dir, self.formats, AsDict(counts))
        )


def _cold_item(item: tuple[str, bytes]) -> tuple[str, str, bytes]:
    return COLD, item[0], item[1]


def _rejected_item(line: str) -> tuple[str, str, bytes]:
    return REJECTED, line, line.encode("utf-8", "backslashreplace")


class WriteTaskFiles(beam.PTransform):
    """Writes `BuildTasks` outputs and the spec to an output directory.

    Task, cold and dead-letter files are written by `WriteShards`, so the
    same outputs give byte-identical files on every run and runner.

    DIR/spec.json is `outputs["spec"]` (the spec completed with statistics
    by `BuildTasks`), so records and spec come from the same job; without it,
    `spec` as given.

    Args:
        output_dir: Directory (any Beam filesystem).
        spec: The FeatureSpec, written to DIR/spec.json when `outputs` has no
            completed spec.
        num_shards: Shards per output (0: one per ~128 MiB of records).
    """

    def __init__(self, output_dir: str, spec: FeatureSpec, num_shards: int = 0):
        super().__init__()
        self.output_dir = output_dir
        self.spec = spec
        self.num_shards = num_shards

    def _path(self, name: str) -> str:
        return FileSystems.join(self.output_dir, name)

    def expand(self, outputs: Mapping[str, beam.PCollection]):
        formats = {name: (TASK_SUFFIX, TFRECORD) for name in SPLITS + (COLD,)}
        formats[REJECTED] = (REJECTED_SUFFIX, TEXT)
        items = (
            outputs["tasks"],  # (split, entity_id, record) already
            outputs["cold"] | "ColdItems" >> beam.Map(_cold_item),
            outputs["rejected"] | "RejectedItems" >> beam.Map(_rejected_item),
        )
        _ = (
            items
            | "FlattenOutputs" >> beam.Flatten()
            | "WriteShards" >> WriteShards(self.output_dir, formats, self.num_shards)
        )
        (
            outputs["stats"]
            | "CheckConservation" >> beam.Map(_log_conservation)
            | "StatsToJson" >> beam.Map(json.dumps, indent=2)
            | "WriteStats"
            >> beam.io.WriteToText(
                self._path("stats"),
                file_name_suffix=".json",
                num_shards=1,
                shard_name_template="",
            )
        )
        spec_json = outputs.get("spec")
        if spec_json is None:
            spec_json = outputs["stats"].pipeline | "SpecJson" >> beam.Create(
                [self.spec.to_json()]
            )
        (
            spec_json
            | "WriteSpec"
            >> beam.io.WriteToText(
                self._path("spec"),
                file_name_suffix=".json",
                num_shards=1,
                shard_name_template="",
            )
        )
        return outputs


class MakeTasks(beam.PTransform):
    """The whole job: read interactions, build tasks, write DIR (see the module doc).

    Args:
        input_pattern: Interaction files.
        spec: The FeatureSpec.
        output_dir: Output directory.
        file_format: "csv" or "parquet" (also the format of `entities_pattern`).
        rule: Split rule or its text form ("fraction:0.5", "cutoff:T", "last:K").
        entities_pattern: Optional entity table files (entity id + meta features).
        num_shards: Shards per output split (0: let the runner decide).
        **build_kwargs: min_support, min_query, max_support, max_query, seed,
            val_fraction, test_fraction (see `BuildTasks`).

    Returns (from `expand`): the `BuildTasks` outputs, after writing them.
    """

    def __init__(
        self,
        input_pattern: str,
        spec: FeatureSpec,
        output_dir: str,
        file_format: str = "csv",
        rule: SplitRule | str = "fraction:0.5",
        entities_pattern: str | None = None,
        num_shards: int = 0,
        **build_kwargs: Any,
    ):
        super().__init__()
        self.input_pattern = input_pattern
        self.spec = spec
        self.output_dir = output_dir
        self.file_format = file_format
        self.rule = rule
        self.entities_pattern = entities_pattern
        self.num_shards = num_shards
        self.build_kwargs = build_kwargs

    def expand(self, pbegin):
        rows = pbegin | "ReadInteractions" >> ReadInteractions(
            self.input_pattern, self.file_format
        )
        entities = None
        if self.entities_pattern:
            entities = pbegin | "ReadEntityTable" >> ReadInteractions(
                self.entities_pattern, self.file_format
            )
        options = {
            "input": self.input_pattern,
            "format": self.file_format,
            "entities": self.entities_pattern,
        }
        outputs = rows | "BuildTasks" >> BuildTasks(
            self.spec,
            self.rule,
            entities=entities,
            options=options,
            **self.build_kwargs,
        )
        return outputs | "WriteTaskFiles" >> WriteTaskFiles(
            self.output_dir, self.spec, self.num_shards
        )


# ------------------------------------------------------------ command line
def _first_file(pattern: str, flag: str) -> str:
    matches = FileSystems.match([pattern])[0].metadata_list
    if not matches:
        raise FileNotFoundError(
            f"{flag} {pattern!r} matches no file; check the path or " "the glob"
        )
    return sorted(m.path for m in matches)[0]


def _columns_of(path: str, file_format: str) -> list[str]:
    with FileSystems.open(path) as f:
        if file_format == "parquet":
            import pyarrow.parquet as pq  # noqa: PLC0415 - only Parquet runs need it

            return list(pq.ParquetFile(f).schema_arrow.names)
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
        header = next(csv.reader(text), [])
        return [name.strip() for name in header]


def check_columns(
    pattern: str, file_format: str, required: Sequence[tuple[str, str]], flag: str
) -> list[str]:
    """Fails fast when the first input file lacks a column every row needs.

    Without the entity, time or label column every row would be rejected, and
    a feature column the file lacks (a typo in the spec, or the wrong file)
    would reject or default every row; saying so before the job starts beats a
    dead letter of the whole input.

    Args:
        pattern: The file pattern.
        file_format: "csv" or "parquet".
        required: (column, what the spec calls it) pairs.
        flag: The flag that named the files, for the message.

    Returns:
        The columns of the first file.

    Raises:
        FileNotFoundError: Nothing matches the pattern.
        ValueError: A required column is missing; the message names it.
    """
    path = _first_file(pattern, flag)
    columns = _columns_of(path, file_format)
    for column, role in required:
        if column not in columns:
            raise ValueError(
                f"{flag} file {path} has no column {column!r} (the spec's {role}); its "
                f"columns are {columns}. Fix the spec or the file (is --format "
                f"{file_format} right?)"
            )
    return columns


def check_spec_columns(
    spec: FeatureSpec,
    input_pattern: str,
    file_format: str,
    entities_pattern: str | None = None,
) -> None:
    """Checks that every column the spec names is in the input (see `check_columns`).

    The entity, time, label, tie-break and request-feature columns must be in
    the interactions; a meta feature may come from the entity table instead.

    Raises:
        FileNotFoundError: A pattern matches no file.
        ValueError: A column is missing; the message names it and the file.
    """
    required = [
        (spec.entity, "entity"),
        (spec.time, "time"),
        (spec.label.column, "label column"),
    ]
    feature_names = {f.name for f in spec.features}
    if spec.tie_break and spec.tie_break not in feature_names:
        required.append((spec.tie_break, "tie_break column"))
    required += [(f.name, "request feature") for f in spec.request_features]
    if not entities_pattern:
        required += [(f.name, "meta feature") for f in spec.meta_features]
        check_columns(input_pattern, file_format, required, "--input")
        return
    input_columns = check_columns(input_pattern, file_format, required, "--input")
    table_columns = check_columns(
        entities_pattern, file_format, [(spec.entity, "entity")], "--entities"
    )
    for feature in spec.meta_features:
        if feature.name not in input_columns and feature.name not in table_columns:
            raise ValueError(
                f"The spec's meta feature {feature.name!r} is a column of neither --input "
                f"{input_pattern!r} (columns {input_columns}) nor --entities "
                f"{entities_pattern!r} (columns {table_columns}); fix the spec or the files"
            )


def run(
    argv: Sequence[str] | None = None, save_main_session: bool = True
) -> beam.runners.runner.PipelineResult:
    """Runs the pipeline: `limaml make-tasks ...` or `python -m beam_pipelines.make_tasks`.

    Args:
        argv: Flags (see `beam_pipelines.options.make_tasks_arguments`); flags
            this parser does not know go to Beam's PipelineOptions. None: no
            flags (sys.argv is never read here).
        save_main_session: Pickle the main module's globals for the workers.

    Returns:
        The finished PipelineResult.

    Raises:
        FileNotFoundError: The spec or the input files are missing.
        ValueError: A flag value is wrong, a needed column is missing, or
            --output holds an earlier run (without --overwrite).
    """
    parser = argparse.ArgumentParser(
        prog="make_tasks", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    make_tasks_arguments(parser)
    known, pipeline_args = parser.parse_known_args(list(argv or []))
    spec = FeatureSpec.load(known.features)
    rule = SplitRule.parse(known.split)
    if known.val_fraction + known.test_fraction > 1.0:
        raise ValueError(
            f"--val-fraction {known.val_fraction} + --test-fraction "
            f"{known.test_fraction} is more than 1; lower one of them"
        )
    check_spec_columns(spec, known.input, known.format, known.entities)
    prepare_output(known.output, OUTPUT_PATTERNS, known.overwrite)
    if not FileSystems.exists(known.output):
        FileSystems.mkdirs(known.output)

    options = PipelineOptions(pipeline_args)
    options.view_as(SetupOptions).save_main_session = save_main_session
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | "MakeTasks" >> MakeTasks(
        known.input,
        spec,
        known.output,
        file_format=known.format,
        rule=rule,
        entities_pattern=known.entities,
        num_shards=known.num_shards,
        min_support=known.min_support,
        min_query=known.min_query,
        max_support=known.max_support,
        max_query=known.max_query,
        seed=known.seed,
        val_fraction=known.val_fraction,
        test_fraction=known.test_fraction,
    )
    result = pipeline.run()
    result.wait_until_finish()
    _log_summary(known.output)
    return result


def _log_summary(output_dir: str) -> None:
    path = FileSystems.join(output_dir, "stats.json")
    try:
        with FileSystems.open(path) as f:
            stats = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as err:  # e.g. a Dataflow template run writes nothing
        logger.info("No stats at %s yet (%s)", path, err)
        return
    logger.info(
        "make-tasks: %d rows read, %d in tasks, %d rejected, %d dropped by caps, %d cold; "
        "entities train/val/test = %s; conservation holds: %s",
        stats["rows_read"],
        stats["rows_in_tasks"],
        stats["rows_rejected"],
        stats["rows_dropped_by_caps"],
        stats["rows_cold"],
        "/".join(str(stats["splits"][s]["entities"]) for s in SPLITS),
        stats["conservation"]["holds"],
    )


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    run(sys.argv[1:])
