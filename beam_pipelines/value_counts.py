"""`"auto"` vocabularies of a run in passes, selected in bounded memory.

A vocabulary needs every value's total count over the whole job, and with
`--passes P` each pass counts only its entities' values. Rather than one
partial element holding every distinct value of the pass, which the driver
would then add up in a dict of every distinct value of the job, each pass
writes its (feature, value, count) triples through the shard writer: a
value's shard is a SHA-256 of its key (the same in every pass) and a shard
holds its lines sorted by key. After the last pass the driver walks each
shard's P files together (`heapq.merge`), adds up the counts of a value as
it meets them, and feeds each total once to the bounded selection of
`beam_pipelines.analyze.VocabularyCombineFn`. It holds one line per pass
and, per feature with `top_k`, at most 2 * `top_k` + 2 candidates; a
feature without `top_k` keeps what reaches `min_count`, as its whole
vocabulary is the output. The files are hidden (`.pass-PPPPP-of-QQQQQ-values-
SSSSS-of-NNNNN.jsonl`) and deleted after the merge.

Example:

    value_counts | WriteValueCounts("tasks/", partition)   # in each pass
    vocab = merge_value_counts("tasks/", spec)               # after the last
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipelines.analyze import VocabularyCombineFn, vocabulary_limits
from beam_pipelines.passes import PARTIAL_PREFIX
from beam_pipelines.shards import TEXT, Partition, WriteShards
from tf_limaml import statistics
from tf_limaml.features import FeatureSpec

VALUES_SUFFIX = ".jsonl"
VALUES_PATTERN = f"{PARTIAL_PREFIX}*-values-*{VALUES_SUFFIX}"


def values_name(partition: Partition) -> str:
    """The name of a pass's value-count shards, relative to the output directory."""
    return f"{PARTIAL_PREFIX}{partition.index:05d}-of-{partition.count:05d}-values"


def _key(feature: str, value: str) -> str:
    # ASCII JSON: any value (surrogates included) sorts and encodes the same
    # way in the writer and in the merge.
    return json.dumps([feature, value])


def _item(element: tuple[str, str, int], name: str) -> tuple[str, str, bytes]:
    feature, value, n = element
    line = json.dumps([feature, value, int(n)])
    return name, _key(feature, value), line.encode("ascii")


class WriteValueCounts(beam.PTransform):
    """(feature, value, count) of one pass -> its sorted value-count shards.

    Args:
        output_dir: The job's output directory.
        partition: This pass; its value counts go to every shard (a value's
            shard is the same in every pass), not only to the pass's own.
    """

    def __init__(self, output_dir: str, partition: Partition):
        super().__init__()
        self.output_dir = output_dir
        self.partition = partition

    def expand(self, value_counts):
        name = values_name(self.partition)
        return (
            value_counts
            | "ValueCountItems" >> beam.Map(_item, name)
            | "WriteValueCountShards"
            >> WriteShards(
                self.output_dir,
                {name: (VALUES_SUFFIX, TEXT)},
                self.partition.num_shards,
            )
        )


def _lines(path: str) -> Iterator[tuple[str, str, str, int]]:
    with FileSystems.open(path) as f:
        for raw in f:
            feature, value, n = json.loads(raw.decode("ascii"))
            yield _key(feature, value), feature, value, int(n)


def _paths_by_shard(output_dir: str) -> dict[str, list[str]]:
    pattern = FileSystems.join(output_dir, VALUES_PATTERN)
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    by_shard: dict[str, list[str]] = {}
    for path in paths:
        # .../.pass-PPPPP-of-QQQQQ-values-SSSSS-of-NNNNN.jsonl: group by SSSSS.
        shard = path.rsplit("-values-", 1)[1]
        by_shard.setdefault(shard, []).append(path)
    return by_shard


def merge_value_counts(
    output_dir: str, spec: FeatureSpec, delete: bool = True
) -> dict[str, statistics.VocabularyCounts]:
    """Every pass's value counts -> each `"auto"` vocabulary feature's selection.

    Exactly what one pass would select (`VocabularyCombineFn` on each value's
    total count), in memory that does not grow with the distinct values of
    a feature with `top_k`.

    Args:
        output_dir: The job's output directory.
        spec: The spec as given (its `top_k` and `min_count`).
        delete: Delete the value-count files after the merge.

    Returns:
        {feature name: VocabularyCounts}, for the features that had values.
    """
    combine = VocabularyCombineFn(vocabulary_limits(spec))
    accumulators: dict[str, list] = {}
    by_shard = _paths_by_shard(output_dir)
    for shard in sorted(by_shard):
        streams = [_lines(path) for path in by_shard[shard]]
        current, total = None, 0
        for key, feature, value, n in heapq.merge(*streams, key=lambda t: t[0]):
            if current is not None and key != current[0]:
                _add(combine, accumulators, current, total)
                total = 0
            current, total = (key, feature, value), total + n
        if current is not None:
            _add(combine, accumulators, current, total)
    if delete:
        paths = [path for paths in by_shard.values() for path in paths]
        if paths:
            FileSystems.delete(paths)
    return {
        name: combine.extract_output(accumulator)
        for name, accumulator in sorted(accumulators.items())
    }


def _add(
    combine: VocabularyCombineFn,
    accumulators: dict[str, list],
    current: tuple[str, str, str],
    total: int,
) -> None:
    _, feature, value = current
    if feature not in accumulators:
        accumulators[feature] = combine.create_accumulator()
    accumulators[feature] = combine.add_input(
        accumulators[feature], (feature, value, total)
    )
