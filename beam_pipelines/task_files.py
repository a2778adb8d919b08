"""Writing make-tasks' outputs: task, cold and dead-letter shards, stats.json, spec.json.

Every sharded file goes through the one deterministic shard writer
(`beam_pipelines.shards.WriteShards`), so the same input and flags give
byte-identical files on every run and runner.

Example:

    outputs = rows | BuildTasks(spec, "last:2")
    outputs | WriteTaskFiles("tasks/", spec, num_shards=4)
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Mapping
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipelines.analyze import (
    ERROR_KEY,
    complete_from_partials,
    imputed_names,
    vocabulary_limits,
)
from beam_pipelines.build_tasks import COLD
from beam_pipelines.dead_letter import REJECTED
from beam_pipelines.imputation import fill_files
from beam_pipelines.passes import (
    PARTIAL_PATTERN,
    WritePartial,
    read_partials,
    write_text,
)
from beam_pipelines.shards import TEMP_PREFIX, TEXT, TFRECORD, Partition, WriteShards
from beam_pipelines.task_stats import finalize_stats, log_conservation
from beam_pipelines.value_counts import WriteValueCounts, merge_value_counts
from tf_limaml.features import FeatureSpec
from tf_limaml.tasks import SPLITS

TASK_SUFFIX = ".tfrecord.gz"
REJECTED_SUFFIX = ".jsonl"
# Every file name the pipeline writes in DIR, for --overwrite and the stale-output check.
OUTPUT_PATTERNS = tuple(f"{name}-*{TASK_SUFFIX}" for name in SPLITS + (COLD,)) + (
    f"rejected-*{REJECTED_SUFFIX}",
    "stats.json",
    "spec.json",
    f"{TEMP_PREFIX}*",
    PARTIAL_PATTERN,
    # What Beam's text sink leaves behind when a job fails mid-write.
    "beam-temp-*",
)

logger = logging.getLogger(__name__)


def _cold_item(item: tuple[str, bytes]) -> tuple[str, str, bytes]:
    return COLD, item[0], item[1]


def _rejected_item(item: tuple[str, str]) -> tuple[str, str, bytes]:
    key, line = item
    return REJECTED, key, line.encode("utf-8", "backslashreplace")


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
        partition: In a run of several passes, this pass: only its shards are
            written, and `outputs["partial"]` goes to its partial file
            (stats.json and spec.json come from `finish_passes`).
    """

    def __init__(
        self,
        output_dir: str,
        spec: FeatureSpec,
        num_shards: int = 0,
        partition: Partition | None = None,
    ):
        super().__init__()
        self.output_dir = output_dir
        self.spec = spec
        self.num_shards = num_shards
        self.partition = partition

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
            | "WriteShards"
            >> WriteShards(
                self.output_dir, formats, self.num_shards, partition=self.partition
            )
        )
        if self.partition is not None:
            _ = outputs["partial"] | "WritePartial" >> WritePartial(
                self.output_dir, self.partition
            )
            if "value_counts" in outputs and vocabulary_limits(self.spec):
                _ = outputs["value_counts"] | "WriteValueCounts" >> WriteValueCounts(
                    self.output_dir, self.partition
                )
            return outputs
        (
            outputs["stats"]
            | "CheckConservation" >> beam.Map(log_conservation)
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


def finish_passes(output_dir: str, spec: FeatureSpec, passes: int) -> dict[str, Any]:
    """Merges every pass's partial into DIR/stats.json and DIR/spec.json.

    The counts add up, then become stats.json as in a one-pass run
    (`finalize_stats`); the partial moments and the vocabularies selected
    from every pass's value counts (`value_counts.merge_value_counts`, in
    bounded memory) complete the spec (`complete_from_partials`), and the blanks the passes left in their
    records get the training means (`imputation.fill_files`). The partial
    files are deleted.

    Returns:
        The stats.
    """
    partials = read_partials(output_dir, passes)
    counts: collections.Counter = collections.Counter()
    for partial in partials:
        counts.update({tuple(key): n for key, n in partial["counts"]})
    first = partials[0]
    stats = finalize_stats(
        counts, first["options"], first["with_entity_table"], first["feature_names"]
    )
    log_conservation(stats)
    write_text(output_dir, "stats.json", json.dumps(stats, indent=2))
    analyses = [partial["analysis"] for partial in partials]
    vocab = merge_value_counts(output_dir, spec)
    completed = complete_from_partials(
        spec, analyses, imputed=imputed_names(counts), vocab=vocab
    )
    write_text(output_dir, "spec.json", completed)
    obj = json.loads(completed)
    if ERROR_KEY not in obj:
        pattern = FileSystems.join(output_dir, f"*{TASK_SUFFIX}")
        paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
        fill_files(paths, FeatureSpec.from_dict(obj))
    logger.info("Merged the statistics of %d passes into %s", passes, output_dir)
    return stats
