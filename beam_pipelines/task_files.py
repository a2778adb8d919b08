"""Writing make-tasks' outputs: task, cold and dead-letter shards, stats.json, spec.json.

Every sharded file goes through the one deterministic shard writer
(`beam_pipelines.shards.WriteShards`), so the same input and flags give
byte-identical files on every run and runner.

Example:

    outputs = rows | BuildTasks(spec, "last:2")
    outputs | WriteTaskFiles("tasks/", spec, num_shards=4)
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipelines.build_tasks import COLD
from beam_pipelines.dead_letter import REJECTED
from beam_pipelines.shards import TEMP_PREFIX, TEXT, TFRECORD, WriteShards
from beam_pipelines.task_stats import log_conservation
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
