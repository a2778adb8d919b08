"""Reading interaction and entity tables (CSV with a header, or Parquet) as row dicts.

A CSV value stays a string and validation parses it, so a bad cell becomes a
dead-letter reason instead of a reader error; a line the reader cannot split
becomes a `MalformedRow`. Parquet values keep their types.

`check_spec_columns` looks at the first input file before a job starts, so a
column the spec needs and the input lacks fails in a line, not as a dead letter
of the whole input.

Example:

    rows = pipeline | ReadInteractions("data/*.csv", "csv")
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import data_guard
from tf_limaml.errors import UserInputError
from tf_limaml.features import FeatureSpec

logger = logging.getLogger(__name__)

FORMATS = ("csv", "parquet")


@dataclasses.dataclass(frozen=True)
class MalformedRow:
    """A record the reader could not turn into a row; validation dead-letters it.

    Attributes:
        row: What could be read of it (column -> value), for the dead letter.
        detail: What was wrong, with the file and line.
    """

    row: dict
    detail: str


@data_guard.guarded_iter
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


# ------------------------------------------------------- columns, before a job
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


def first_rows(
    pattern: str, file_format: str, columns: Sequence[str], n: int = 1000
) -> list[dict]:
    """The first `n` rows of the first input file, only the given columns.

    What make-tasks looks at before the job, e.g. to detect the time format
    once (`tf_limaml.tasks.resolve_time_format`) instead of per row.
    """
    path = _first_file(pattern, "--input")
    with FileSystems.open(path) as f:
        if file_format == "parquet":
            import pyarrow.parquet as pq  # noqa: PLC0415 - only Parquet runs need it

            parquet = pq.ParquetFile(f)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            rows: list[dict] = []
            for batch in parquet.iter_batches(batch_size=n, columns=present):
                rows.extend(batch.to_pylist())
                if len(rows) >= n:
                    break
            return rows[:n]
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
        reader = csv.reader(text)
        header = [name.strip() for name in next(reader, [])]
        rows = []
        try:
            for values in reader:
                if len(values) == len(header):
                    row = dict(zip(header, values, strict=True))
                    rows.append({c: row.get(c) for c in columns})
                if len(rows) >= n:
                    break
        except csv.Error:
            pass  # The job dead-letters the bad line; the rows so far suffice.
        return rows


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
            raise UserInputError(
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
    required += [
        (f.name, "request feature") for f in spec.request_features if not f.is_derived
    ]
    if not entities_pattern:
        required += [
            (f.name, "meta feature") for f in spec.meta_features if not f.is_derived
        ]
        check_columns(input_pattern, file_format, required, "--input")
        return
    input_columns = check_columns(input_pattern, file_format, required, "--input")
    table_columns = check_columns(
        entities_pattern, file_format, [(spec.entity, "entity")], "--entities"
    )
    for feature in spec.meta_features:
        if feature.is_derived:
            continue
        if feature.name not in input_columns and feature.name not in table_columns:
            raise UserInputError(
                f"The spec's meta feature {feature.name!r} is a column of neither --input "
                f"{input_pattern!r} (columns {input_columns}) nor --entities "
                f"{entities_pattern!r} (columns {table_columns}); fix the spec or the files"
            )
