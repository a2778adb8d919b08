"""Passes: a job run as several pipelines, each over a fixed share of the shards.

A runner that keeps a GroupByKey's input in memory (the DirectRunner, and the
job service of a portable runner launched with `--job_endpoint=embed`) needs
memory that grows with the data. With `--passes P` a job runs P pipelines one
after the other; pass p keeps only the records whose output shard `s`
satisfies `s % P == p` (`Partition.keeps`), writes exactly those shards, and
leaves its counts (and make-tasks' partial feature statistics) in a hidden
partial file. When every pass is done the driver merges the partials into
the job's summary files and deletes them. So peak memory follows the records
of one pass, not of the whole input. A shard is always written whole, by
one pass, from the same records: make-tasks writes the same bytes as a
one-pass run with the same `--num-shards`, embed the same rows (an embedding
to float rounding, as its batch differs).

Each pass reads the whole input again, so passes trade time for memory. A
distributed runner (Dataflow, Flink, Spark) spreads a GroupByKey over its
workers and needs no passes.

A pass's share of the shards is a `beam_pipelines.shards.Partition`.

Example:

    def build(pipeline, partition):  # partition: None in a one-pass run
        ...
    run_passes(build, make_pipeline, passes=4, num_shards=8, job="make-tasks")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipelines.shards import Partition
from tf_limaml.errors import UserInputError

logger = logging.getLogger(__name__)

# A pass's partial file: DIR/.pass-PPPPP-of-QQQQQ.json, deleted after the merge.
PARTIAL_PREFIX = ".pass-"
PARTIAL_PATTERN = f"{PARTIAL_PREFIX}*"


def check_passes(passes: int, num_shards: int) -> int:
    """The shard count of a run in `passes` passes (raises on a bad pair).

    Args:
        passes: --passes (1: one pipeline, the usual run).
        num_shards: --num-shards (0: automatic, which one pass allows; with
            several passes it becomes `passes`, one shard per pass).

    Returns:
        The shard count to use.

    Raises:
        ValueError: passes < 1, or more passes than shards.
    """
    if passes < 1:
        raise UserInputError(f"--passes must be at least 1, got {passes}")
    if passes == 1:
        return num_shards
    if num_shards == 0:
        logger.info("--passes %d without --num-shards: one shard per pass", passes)
        return passes
    Partition(0, passes, num_shards)  # validates the pair
    return num_shards


def partial_name(partition: Partition) -> str:
    """The partial file of a pass, relative to the output directory."""
    return f"{PARTIAL_PREFIX}{partition.index:05d}-of-{partition.count:05d}.json"


class WritePartial(beam.PTransform):
    """One JSON-able element -> the pass's partial file, DIR/.pass-PPPPP-of-QQQQQ.json."""

    def __init__(self, output_dir: str, partition: Partition):
        super().__init__()
        self.path = FileSystems.join(output_dir, partial_name(partition))

    def expand(self, partial):
        return (
            partial
            | "PartialToJson" >> beam.Map(json.dumps)
            | "WritePartialFile"
            >> beam.io.WriteToText(self.path, num_shards=1, shard_name_template="")
        )


def read_partials(output_dir: str, count: int) -> list[Any]:
    """Every pass's partial element, in pass order; then deletes the files.

    Raises:
        FileNotFoundError: A pass left no partial file (it did not finish).
    """
    paths = [
        FileSystems.join(output_dir, partial_name(Partition(index, count, count)))
        for index in range(count)
    ]
    partials = []
    for path in paths:
        if not FileSystems.exists(path):
            raise FileNotFoundError(
                f"Pass file {path} is missing: that pass did not finish"
            )
        with FileSystems.open(path) as f:
            partials.append(json.loads(f.read().decode("utf-8")))
    FileSystems.delete(paths)
    return partials


def write_text(output_dir: str, name: str, text: str) -> None:
    """Writes DIR/name as `WriteToText` writes one element: the text and a newline."""
    with FileSystems.create(FileSystems.join(output_dir, name)) as f:
        f.write((text + "\n").encode("utf-8"))


def run_passes(
    build: Callable[[beam.Pipeline, Partition | None], None],
    make_pipeline: Callable[[], beam.Pipeline],
    passes: int,
    num_shards: int,
    job: str,
    on_pass: Callable[[int, int], None] | None = None,
) -> Sequence[beam.runners.runner.PipelineResult]:
    """Runs `build` as one pipeline, or as `passes` pipelines one after the other.

    Args:
        build: Adds the job to a pipeline; its partition is None in a one-pass
            run.
        make_pipeline: A new pipeline with the run's options.
        passes: Pipelines to run.
        num_shards: Shards of every output (> 0 with several passes).
        job: Name of the job, for the log.
        on_pass: Called as on_pass(index, passes) before each pass of a run
            of several (the CLI prints a progress line).

    Returns:
        Every pass's finished PipelineResult.
    """
    results = []
    for index in range(passes):
        partition = Partition(index, passes, num_shards) if passes > 1 else None
        if partition is not None:
            logger.info("%s: pass %d of %d", job, index + 1, passes)
            if on_pass is not None:
                on_pass(index, passes)
        pipeline = make_pipeline()
        build(pipeline, partition)
        result = pipeline.run()
        result.wait_until_finish()
        results.append(result)
    return results
