"""One deterministic shard writer: `DIR/NAME-SSSSS-of-NNNNN<suffix>` files from data.

Beam's own file sinks pick a record's shard, and its place in the shard, from
the runner's bundles, so two runs rarely write the same bytes. Here the files
are a function of the data alone: a record's shard is a SHA-256 of its key
(`shard_of`), a shard holds its records sorted by (key, payload), the shard
count is fixed or follows the bytes (`shard_count`), and the GZIP header holds
no time stamp. Every run, runner and running mode writes byte-identical
files. Both pipelines write through it: make-tasks' task, cold and
dead-letter files, and embed's embeddings (TFRecord and Parquet) and dead
letter.

Example:

    items = records | beam.Map(lambda r: ("train", r.entity_id, r.payload))
    items | WriteShards("out/", {"train": (".tfrecord.gz", TFRECORD)}, num_shards=4)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil
from apache_beam.pvalue import AsDict

from tf_limaml.errors import UserInputError

# Kinds of shard files. TFRecord files are GZIP-compressed; text payloads are
# UTF-8 lines; a Parquet payload is one row as a JSON object.
TFRECORD = "tfrecord"
TEXT = "text"
PARQUET = "parquet"
KINDS = (TFRECORD, TEXT, PARQUET)
# A shard file is written under this hidden name, then renamed into place.
TEMP_PREFIX = ".tmp-"
# With num_shards 0 each output gets one shard per this many bytes of records:
# a count that depends on the data only, never on the runner's bundles.
AUTO_SHARD_BYTES = 128 << 20


def shard_count(total_bytes: int, num_shards: int = 0) -> int:
    """Shards of one output: `num_shards`, or with 0 one per AUTO_SHARD_BYTES (>= 1)."""
    if num_shards:
        return num_shards
    return max(1, math.ceil(total_bytes / AUTO_SHARD_BYTES))


def shard_of(key: str, num_shards: int) -> int:
    """The shard of a record, from a SHA-256 of its key (the same in every process)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


@dataclasses.dataclass(frozen=True)
class Partition:
    """Pass `index` of `count`: the shards `s` of `num_shards` with `s % count == index`.

    Attributes:
        index: This pass, 0 <= index < count.
        count: Passes in the job.
        num_shards: Shards of every output (fixed: a pass cannot see the
            whole job's bytes to choose a count).

    A run in several passes (`beam_pipelines.passes`) gives each pass one;
    `WriteShards` then writes only that pass's shards.

    Example:

        partition = Partition(index=1, count=4, num_shards=8)
        partition.keeps("member-17")      # True when its shard % 4 == 1
    """

    index: int
    count: int
    num_shards: int

    def __post_init__(self):
        if not 0 < self.count <= self.num_shards:
            raise UserInputError(
                f"--passes ({self.count}) must be between 1 and --num-shards "
                f"({self.num_shards}): each pass writes whole shards"
            )
        if not 0 <= self.index < self.count:
            raise ValueError(f"Pass {self.index} is not one of {self.count} passes")

    def owns(self, shard: int) -> bool:
        """Whether this pass writes shard `shard`."""
        return shard % self.count == self.index

    def keeps(self, key: str) -> bool:
        """Whether the record with shard key `key` belongs to this pass."""
        return self.owns(shard_of(key, self.num_shards))


def shard_name(name: str, index: int, count: int, suffix: str) -> str:
    """`NAME-SSSSS-of-NNNNN.suffix`, the layout Beam's file sinks use."""
    return f"{name}-{index:05d}-of-{count:05d}{suffix}"


def _payload_size(item: tuple[str, str, bytes]) -> tuple[str, int]:
    return item[0], len(item[2])


def _with_shard_count(name_bytes: tuple[str, int], num_shards: int) -> tuple[str, int]:
    return name_bytes[0], shard_count(name_bytes[1], num_shards)


def _every_shard(
    name: str, count: int, partition: Partition | None = None
) -> list[tuple[tuple[str, int], None]]:
    # One marker per shard, so that an output with no records still gets its
    # (empty) files and readers never find a shard missing. A pass marks only
    # the shards it writes.
    return [
        ((name, index), None)
        for index in range(count)
        if partition is None or partition.owns(index)
    ]


def _key_by_shard(
    item: tuple[str, str, bytes],
    counts: Mapping[str, int],
    partition: Partition | None = None,
) -> tuple[tuple[str, int], tuple[str, bytes]]:
    name, key, payload = item
    shard = shard_of(key, counts[name])
    if partition is not None and not partition.owns(shard):
        # Another pass writes this shard: writing half of it here would
        # replace that pass's file with a shard missing records.
        raise ValueError(
            f"A {name!r} record with key {key!r} belongs to shard {shard}, which "
            f"pass {partition.index} of {partition.count} does not write; the "
            "pass filter and the shard key disagree"
        )
    return (name, shard), (key, payload)


def _shard_paths(
    output_dir: str, name: str, index: int, count: int, suffix: str
) -> tuple[str, str]:
    """(final path, hidden temporary path) of one shard.

    A name may hold a sub-directory ("parquet/embeddings"); the temporary file
    sits beside the final one, so the rename never crosses directories.
    """
    *parts, base = name.split("/")
    directory = FileSystems.join(output_dir, *parts) if parts else output_dir
    file_name = shard_name(base, index, count, suffix)
    temp_name = f"{TEMP_PREFIX}{file_name}-{uuid.uuid4().hex}"
    return FileSystems.join(directory, file_name), FileSystems.join(
        directory, temp_name
    )


def _write_parquet(f: Any, payloads: list[bytes], schema: Any) -> None:
    import pyarrow as pa  # noqa: PLC0415 - only Parquet outputs need it
    import pyarrow.parquet as pq  # noqa: PLC0415

    rows = [json.loads(payload) for payload in payloads]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)


def _write_shard(
    element: tuple[tuple[str, int], Any],
    output_dir: str,
    formats: Mapping[str, tuple[str, str]],
    counts: Mapping[str, int],
    schemas: Mapping[str, Any],
) -> str:
    """Writes one shard, its records sorted by (key, payload), and returns its path.

    The file is written under a hidden temporary name and renamed into place,
    so a reader never sees half a shard; a retried bundle writes the same bytes
    again.
    """
    (name, index), items = element
    suffix, kind = formats[name]
    records = sorted(item for item in items if item is not None)
    path, temp = _shard_paths(output_dir, name, index, counts[name], suffix)
    compression = (
        CompressionTypes.GZIP if kind == TFRECORD else (CompressionTypes.UNCOMPRESSED)
    )
    try:
        with FileSystems.create(temp, compression_type=compression) as f:
            if kind == PARQUET:
                _write_parquet(f, [payload for _, payload in records], schemas[name])
            elif kind == TFRECORD:
                for _, payload in records:
                    # The framing (length, masked CRC32C) Beam's TFRecord sink writes.
                    _TFRecordUtil.write_record(f, payload)
            else:
                for _, payload in records:
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
        formats: {name: (suffix, kind)}, kind one of KINDS. TFRecord files are
            GZIP-compressed; text payloads are UTF-8 lines; a Parquet payload
            is one row as JSON (UTF-8 bytes). A name may hold a sub-directory,
            e.g. "parquet/embeddings".
        num_shards: Shards per name (0: from the bytes, see `shard_count`).
        schemas: {name: pyarrow.Schema} of every Parquet output.
        partition: In a run of several passes (`beam_pipelines.passes`), this
            pass: only its shards are written, and a record of another pass's
            shard is an error. Needs a fixed `num_shards` equal to the
            partition's.

    Returns (from `expand`): the paths written.
    """

    def __init__(
        self,
        output_dir: str,
        formats: Mapping[str, tuple[str, str]],
        num_shards: int = 0,
        schemas: Mapping[str, Any] | None = None,
        partition: Partition | None = None,
    ):
        super().__init__()
        self.output_dir = output_dir
        self.formats = dict(formats)
        self.num_shards = num_shards
        self.schemas = dict(schemas or {})
        self.partition = partition
        if partition is not None and num_shards != partition.num_shards:
            raise ValueError(
                f"A pass writes a fixed number of shards: num_shards is {num_shards}, "
                f"the partition's {partition.num_shards}"
            )
        for name, (_, kind) in self.formats.items():
            if kind not in KINDS:
                raise ValueError(
                    f"The format of {name!r} must be one of {KINDS}, got {kind!r}"
                )
            if kind == PARQUET and name not in self.schemas:
                raise ValueError(
                    f"{name!r} is written as Parquet; pass its pyarrow schema in "
                    "`schemas`"
                )

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
        keyed = items | "KeyByShard" >> beam.Map(
            _key_by_shard, AsDict(counts), self.partition
        )
        markers = counts | "EveryShard" >> beam.FlatMapTuple(
            _every_shard, self.partition
        )
        return (
            (keyed, markers)
            | "FlattenShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard"
            >> beam.Map(
                _write_shard,
                self.output_dir,
                self.formats,
                AsDict(counts),
                self.schemas,
            )
        )
