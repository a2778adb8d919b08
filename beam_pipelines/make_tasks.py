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

With `--passes P` the job runs as P pipelines, each over 1/P of the output
shards (`beam_pipelines.passes`): the DirectRunner holds every GroupByKey's
input in memory, so a pass needs about 1/P of the memory, and the files are
the same bytes as one pass with the same `--num-shards`.

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

The parts live beside it: `reading` (ReadInteractions, CSV/Parquet),
`dead_letter`, `counting` (counts as elements, shared with embed),
`task_stats` (stats.json), `build_tasks` (ValidateRows, SplitEntities,
BuildTasks), `shards` (the deterministic shard writer, shared with embed) and
`task_files` (WriteTaskFiles). This module holds the whole job (`MakeTasks`)
and the command line (`run`), and re-exports the parts' public names.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

# The parts of the job, re-exported: `from beam_pipelines.make_tasks import X`
# keeps working for every public name.
from beam_pipelines.build_tasks import (
    ANALYSIS,
    COLD,
    NAMESPACE,
    SOURCE_ENTITIES,
    SOURCE_INTERACTIONS,
    BuildTasks,
    SplitEntities,
    ValidateEntities,
    ValidateRows,
)
from beam_pipelines.counting import STATS, CountingDoFn, SumCounts, SumStats
from beam_pipelines.dead_letter import (
    REJECTED,
    dead_letter,
    dead_letter_line,
    dead_letter_record,
    json_safe,
)
from beam_pipelines.options import make_tasks_arguments
from beam_pipelines.outcome import check_outcome, remove_beam_temp
from beam_pipelines.outputs import prepare_output
from beam_pipelines.passes import check_passes, run_passes
from beam_pipelines.reading import (
    FORMATS,
    MalformedRow,
    ReadInteractions,
    check_columns,
    check_spec_columns,
    first_rows,
    read_csv_file,
)
from beam_pipelines.shards import (
    AUTO_SHARD_BYTES,
    TEMP_PREFIX,
    TEXT,
    TFRECORD,
    Partition,
    WriteShards,
    shard_count,
    shard_name,
    shard_of,
)
from beam_pipelines.task_files import (
    OUTPUT_PATTERNS,
    REJECTED_SUFFIX,
    TASK_SUFFIX,
    WriteTaskFiles,
    finish_passes,
)
from beam_pipelines.task_stats import CONSERVATION, finalize_stats, size_bucket
from tf_limaml.errors import UserInputError
from tf_limaml.features import FeatureSpec
from tf_limaml.tasks import SPLITS, SplitRule, resolve_time_format

__all__ = [
    "ANALYSIS",
    "AUTO_SHARD_BYTES",
    "COLD",
    "CONSERVATION",
    "FORMATS",
    "NAMESPACE",
    "OUTPUT_PATTERNS",
    "REJECTED",
    "REJECTED_SUFFIX",
    "SOURCE_ENTITIES",
    "SOURCE_INTERACTIONS",
    "STATS",
    "TASK_SUFFIX",
    "TEMP_PREFIX",
    "TEXT",
    "TFRECORD",
    "BuildTasks",
    "CountingDoFn",
    "MakeTasks",
    "MalformedRow",
    "ReadInteractions",
    "SplitEntities",
    "SumCounts",
    "SumStats",
    "ValidateEntities",
    "ValidateRows",
    "WriteShards",
    "WriteTaskFiles",
    "check_columns",
    "check_spec_columns",
    "dead_letter",
    "dead_letter_line",
    "dead_letter_record",
    "finalize_stats",
    "json_safe",
    "read_csv_file",
    "run",
    "shard_count",
    "shard_name",
    "shard_of",
    "size_bucket",
]

logger = logging.getLogger(__name__)


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
        partition: In a run of several passes (`beam_pipelines.passes`), this
            pass; `task_files.finish_passes` writes stats.json and spec.json
            after the last.
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
        partition: Partition | None = None,
        **build_kwargs: Any,
    ):
        super().__init__()
        self.partition = partition
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
            partition=self.partition,
            **self.build_kwargs,
        )
        return outputs | "WriteTaskFiles" >> WriteTaskFiles(
            self.output_dir, self.spec, self.num_shards, self.partition
        )


# ------------------------------------------------------------ command line
def run(
    argv: Sequence[str] | None = None,
    save_main_session: bool = True,
    on_pass: Callable[[int, int], None] | None = None,
) -> beam.runners.runner.PipelineResult:
    """Runs the pipeline: `limaml make-tasks ...` or `python -m beam_pipelines.make_tasks`.

    Args:
        argv: Flags (see `beam_pipelines.options.make_tasks_arguments`); flags
            this parser does not know go to Beam's PipelineOptions. None: no
            flags (sys.argv is never read here).
        save_main_session: Pickle the main module's globals for the workers.
        on_pass: With --passes, called as on_pass(index, passes) before each.

    Returns:
        The finished PipelineResult (of the last pass with --passes).

    Before the job, an "auto" time format is detected once from the first
    rows of the first input file and written into the completed spec. After
    it, `beam_pipelines.outcome.check_outcome` stops the run in one line when
    too little survived validation; the dead letter and stats.json are
    written either way, and no `beam-temp-*` is left in --output.

    Raises:
        FileNotFoundError: The spec or the input files are missing.
        ValueError: A flag value is wrong, a needed column is missing, or
            --output holds an earlier run (without --overwrite).
        beam_pipelines.outcome.NothingLeftError: Too few rows passed
            validation, or none has a positive label.
    """
    parser = argparse.ArgumentParser(
        prog="make_tasks", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    make_tasks_arguments(parser)
    known, pipeline_args = parser.parse_known_args(list(argv or []))
    spec = FeatureSpec.load(known.features)
    rule = SplitRule.parse(known.split)
    if known.val_fraction + known.test_fraction > 1.0:
        raise UserInputError(
            f"--val-fraction {known.val_fraction} + --test-fraction "
            f"{known.test_fraction} is more than 1; lower one of them"
        )
    check_spec_columns(spec, known.input, known.format, known.entities)
    spec = _resolve_time(spec, known.input, known.format)
    num_shards = check_passes(known.passes, known.num_shards)
    prepare_output(known.output, OUTPUT_PATTERNS, known.overwrite)
    if not FileSystems.exists(known.output):
        FileSystems.mkdirs(known.output)

    options = PipelineOptions(pipeline_args)
    options.view_as(SetupOptions).save_main_session = save_main_session

    def build(pipeline: beam.Pipeline, partition: Partition | None) -> None:
        _ = pipeline | "MakeTasks" >> MakeTasks(
            known.input,
            spec,
            known.output,
            file_format=known.format,
            rule=rule,
            entities_pattern=known.entities,
            num_shards=num_shards,
            partition=partition,
            min_support=known.min_support,
            min_query=known.min_query,
            max_support=known.max_support,
            max_query=known.max_query,
            seed=known.seed,
            val_fraction=known.val_fraction,
            test_fraction=known.test_fraction,
            duplicates=known.duplicates,
        )

    try:
        results = run_passes(
            build,
            lambda: beam.Pipeline(options=options),
            known.passes,
            num_shards,
            "make-tasks",
            on_pass,
        )
        if known.passes > 1:
            finish_passes(known.output, spec, known.passes)
    finally:
        remove_beam_temp(known.output)
    if FileSystems.exists(FileSystems.join(known.output, "stats.json")):
        check_outcome(known.output, spec, known.min_valid_fraction)
    _log_summary(known.output)
    return results[-1]


def _resolve_time(spec: FeatureSpec, pattern: str, file_format: str) -> FeatureSpec:
    """The spec with its "auto" time format detected from the first rows."""
    if spec.time_format != "auto":
        return spec
    resolved = resolve_time_format(spec, first_rows(pattern, file_format, [spec.time]))
    if resolved.time_format != spec.time_format:
        logger.info(
            "Time column %r read as %s (detected from the first rows; state it "
            'in the spec as "time": {"column": ..., "format": ...} to choose)',
            spec.time,
            resolved.time_format,
        )
    return resolved


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
