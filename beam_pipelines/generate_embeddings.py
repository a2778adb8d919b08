"""Beam pipeline: every entity's adapted meta embedding, for online serving.

This is the offline half of LiMAML's deployment: for each entity (member) it
adapts the meta block on the entity's latest interactions (the support set of
its task record) and stores the resulting meta embedding. Online, TF Serving's
`serving_default` signature scores requests from that stored vector.

The job reads task records (`tf_limaml.data` SequenceExamples, e.g. the output
of `limaml make-tasks`), batches entities with `beam.BatchElements`, and calls
the export's batched `meta_embedding` signature; each worker process loads
the SavedModel once, in `DoFn.setup`, and its DoFn instances share it
(`apache_beam.utils.shared`). Support longer than the export's
`max_support` keeps its latest rows. Entities without support rows get the
meta-learned default (cold-start) embedding.

Outputs in DIR:

* `embeddings-SSSSS-of-NNNNN.tfrecord.gz`: one tf.Example per entity with
  `entity_id` (bytes), `embedding` (float list of length d), `model_version`
  (int64: the export's version directory), `n_support` (int64: the support rows
  the embedding was adapted on, after the cap) and `generated_at` (int64: Unix
  seconds, UTC, one value per run);
* `parquet/embeddings-SSSSS-of-NNNNN.parquet` with the same columns (--parquet);
* `rejected-SSSSS-of-NNNNN.jsonl`: the dead letter, task records that could
  not be embedded (unparsable, or labels other than 0/1), one JSON object each
  with `reason`, `detail`, `source` and the record under `row.record_b64`;
* `summary.json`: the counts, carried through the job as elements (not read
  from the runner's metrics, which not every runner reports) and written by
  it; entities_in must equal entities_out + records_rejected, and the job
  fails otherwise. The balance counts what the writer wrote, too: after the
  shards are written the job reads each one back and counts its records
  (`embeddings_written`, `rejected_written`, and `parquet_written` with
  --parquet), and entities_in must also equal embeddings_written +
  rejected_written (with parquet_written = embeddings_written). It also fails, after writing all of the above, when more
  than --max-rejected-fraction of the records (default: any) were rejected.

The files are written by the same deterministic shard writer as make-tasks'
(`beam_pipelines.shards`): one shard per ~128 MiB, records sorted by entity id,
so the same records, export and time stamp give byte-identical files.

Locally:

    limaml embed --export exports/limaml/3 --tasks 'tasks/*.tfrecord.gz' \\
        --output embeddings/v3 --parquet

With `--passes P` (and `--num-shards`, default P) the job runs as P pipelines,
each embedding the entities of 1/P of the output shards
(`beam_pipelines.passes`), so the DirectRunner holds 1/P of the outputs. The
entities, their order and the dead letter are the same as in one pass; an
embedding can differ in its last float bits, since its batch differs.

On Dataflow, add `--runner DataflowRunner --project P --region R
--temp_location gs://B/tmp --setup_file ./setup.py` and gs:// paths.

In code, `GenerateEmbeddings` turns a PCollection of serialized task records
into embedding rows:

    with beam.Pipeline() as p:
        out = p | beam.Create(records) | GenerateEmbeddings("exports/limaml/3")
        out["embeddings"]   # dicts: entity_id, embedding, model_version, ...
        out["counts"]       # one dict: entities_in, entities_out, ...
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue

from beam_pipelines import data_guard
from beam_pipelines.counting import STATS, CountingDoFn, SumStats
from beam_pipelines.dead_letter import REJECTED, dead_letter, dead_letter_line
from beam_pipelines.options import embed_arguments
from beam_pipelines.outputs import prepare_output
from beam_pipelines.passes import (
    PARTIAL_PATTERN,
    WritePartial,
    check_passes,
    read_partials,
    run_passes,
    write_text,
)
from beam_pipelines.shards import (
    PARQUET,
    TEMP_PREFIX,
    TEXT,
    TFRECORD,
    Partition,
    WriteShards,
)
from tf_limaml.errors import LimamlError, UserInputError
from tf_limaml.features import ENTITY_ID_KEY
from tf_limaml.signatures import META_EMBEDDING, META_EMBEDDING_KEY
from tf_limaml.tracing import quiet_planned_retracing

logger = logging.getLogger(__name__)

NAMESPACE = "limaml.embed"
ENTITIES_IN = "entities_in"
ENTITIES_OUT = "entities_out"
ENTITIES_COLD = "entities_cold_start"
ENTITIES_TRUNCATED = "entities_support_truncated"
RECORDS_REJECTED = "records_rejected"
BATCHES = "batches"
COUNTERS = (
    ENTITIES_IN,
    ENTITIES_OUT,
    ENTITIES_COLD,
    ENTITIES_TRUNCATED,
    RECORDS_REJECTED,
    BATCHES,
)
EMBEDDINGS = "embeddings"
COUNTS = "counts"
# Records read back from the files the shard writer wrote.
EMBEDDINGS_WRITTEN = "embeddings_written"
PARQUET_WRITTEN = "parquet_written"
REJECTED_WRITTEN = "rejected_written"
WRITTEN = (EMBEDDINGS_WRITTEN, PARQUET_WRITTEN, REJECTED_WRITTEN)
EMBEDDINGS_PREFIX = "embeddings"
PARQUET_PREFIX = "parquet/embeddings"
TFRECORD_SUFFIX = ".tfrecord.gz"
PARQUET_SUFFIX = ".parquet"
REJECTED_SUFFIX = ".jsonl"
# Where rejected records come from, in the dead letter.
SOURCE_TASK_RECORDS = "task_records"
REASON_BAD_TASK_RECORD = "bad_task_record"
OUTPUT_PATTERNS = (
    "embeddings-*",
    "parquet/embeddings-*",
    "rejected-*",
    "summary.json",
    f"{TEMP_PREFIX}*",
    f"parquet/{TEMP_PREFIX}*",
    PARTIAL_PATTERN,
)


class TooManyRejectedError(UserInputError):
    """More task records were rejected than --max-rejected-fraction allows."""


class EntitiesLostError(LimamlError, ValueError):
    """Entities in != entities out + rejected: the job lost an entity on the way."""


# One export per pipeline and process: a process that runs the job several
# times (the demo embeds at five support sizes) traces its functions anew each
# time, as planned.
quiet_planned_retracing("LoadedExport.__init__.<locals>")


class LoadedExport:
    """The export loaded, and its two compiled functions: what every
    `EmbedTasksFn` instance of one worker process shares.

    A Dataflow worker runs a DoFn instance per harness thread; through
    `apache_beam.utils.shared` they hold one copy of the model and trace each
    function once, not once per instance.

    Args:
        export_dir: The SavedModel version directory (or its base: the latest).
        max_support: Support rows per entity (default: the export's maximum).
    """

    def __init__(self, export_dir: str, max_support: int | None):
        import tensorflow as tf  # noqa: PLC0415 - loaded on the worker

        from tf_limaml import data, export  # noqa: PLC0415
        from tf_limaml.features import LABEL_KEY, MASK_KEY, SUPPORT  # noqa: PLC0415

        metadata = export.read_metadata(export_dir)
        spec = metadata["spec"]
        max_support = max_support or metadata["max_support"]
        self.max_support = max_support
        self.model_version = int(metadata["model_version"])
        self.loaded = tf.saved_model.load(metadata["export_dir"])
        signature = self.loaded.signatures[META_EMBEDDING]
        input_specs = signature.structured_input_signature[1]
        support_keys = {
            spec.batch_key(SUPPORT, name)
            for name in (
                [f.name for f in spec.request_features] + [LABEL_KEY, MASK_KEY]
            )
        }
        mask_key = spec.batch_key(SUPPORT, MASK_KEY)

        # Two compiled functions keep per-entity work out of Python and eager
        # ops (measured at nearly the signature's own cost per entity when the
        # sorting and slicing ran eagerly). Neither has tensor-dependent Python control flow, so
        # autograph (seconds of source conversion per worker) is off.
        @tf.function(
            input_signature=[tf.TensorSpec([None], tf.string)], autograph=False
        )
        def parse_sorted(serialized):
            # Only the support lists are decoded (query rows play no part in
            # the embedding), padded only to the batch's longest. Entities come
            # back sorted by support length, so consecutive calls pad little.
            batch = data.parse_task_batch(
                serialized, spec, max_support, 1, parts=(SUPPORT,), pad_rows=False
            )
            kept = tf.cast(tf.reduce_sum(batch[mask_key], axis=1), tf.int32)
            order = tf.argsort(kept, stable=True)
            sorted_batch = {k: tf.gather(v, order) for k, v in batch.items()}
            return sorted_batch, tf.gather(kept, order)

        @tf.function(
            input_signature=[
                input_specs,
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
            ],
            autograph=False,
        )
        def embed_range(inputs, start, stop, width):
            # Masked rows change the cost, never the result: each call keeps
            # only the support columns its entities use.
            sliced = {
                name: (
                    value[start:stop, :width]
                    if name in support_keys
                    else value[start:stop]
                )
                for name, value in inputs.items()
            }
            return signature(**sliced)[META_EMBEDDING_KEY]

        self.parse_sorted = parse_sorted
        self.embed_range = embed_range
        self.input_names = list(input_specs)


class EmbedTasksFn(CountingDoFn):
    """Batches of serialized task records -> one embedding row per entity.

    Loads the SavedModel once per worker process (in `setup`, shared by the
    process's instances: `LoadedExport`) and calls its batched
    `meta_embedding` signature. TensorFlow works on a batch on a helper thread
    while Beam reads the next, so a batch's rows are emitted when the next
    batch arrives, or at the end of the bundle. A batch that fails (a
    malformed record, a label other than 0/1) is retried record by record, and
    the failing records go to the `rejected` output as dead-letter records.
    Its counts (COUNTERS) go to the `stats` output once per bundle.

    Args:
        export_dir: The SavedModel version directory (or its base: the latest).
        max_support: Support rows per entity (default: the export's maximum).
        generated_at: Unix seconds stamped on every row.
        call_size: Most entities per signature call; a larger input batch is
            sorted by support length and split into calls of this size.
    """

    namespace = NAMESPACE

    def __init__(
        self,
        export_dir: str,
        max_support: int | None,
        generated_at: int,
        call_size: int = 256,
    ):
        super().__init__()
        self.export_dir = export_dir
        self.max_support = max_support
        self.generated_at = generated_at
        self.call_size = call_size
        # Made at construction, so every copy of this DoFn on a worker holds
        # the same handle (apache_beam.utils.shared).
        self._shared_export = shared.Shared()

    def setup(self):
        import tensorflow as tf  # noqa: PLC0415 - loaded on the worker

        # A strong reference: the shared map keeps only weak ones.
        self._export = self._shared_export.acquire(
            lambda: LoadedExport(self.export_dir, self.max_support),
            tag=(self.export_dir, self.max_support),
        )
        self._max_support = self._export.max_support
        self._model_version = self._export.model_version
        self._parse_sorted = self._export.parse_sorted
        self._embed_range = self._export.embed_range
        self._input_names = self._export.input_names
        self._errors = (tf.errors.InvalidArgumentError,)
        self._tf = tf
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="limaml-embed"
        )
        self._pending = None

    @data_guard.guarded
    def _compute(
        self, records: Sequence[bytes]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """TensorFlow's part: (entity ids, support lengths, embeddings), sorted."""
        tf = self._tf
        batch, kept = self._parse_sorted(tf.constant(list(records), dtype=tf.string))
        kept = kept.numpy()
        inputs = {name: batch[name] for name in self._input_names}
        pieces = []
        for start in range(0, len(kept), self.call_size):
            stop = min(start + self.call_size, len(kept))
            # Sorted: the chunk's widest support set is its last.
            width = int(kept[stop - 1])
            pieces.append(
                self._embed_range(
                    inputs,
                    tf.constant(start, tf.int32),
                    tf.constant(stop, tf.int32),
                    tf.constant(width, tf.int32),
                ).numpy()
            )
        embeddings = np.concatenate(pieces) if pieces else np.zeros((0, 0))
        return batch["entity_id"].numpy(), batch["n_support"].numpy(), embeddings

    def _rows(self, computed) -> list[dict[str, Any]]:
        """Output rows of `_compute`'s result; counts cold and cut support sets."""
        entity_ids, n_support, embeddings = computed
        rows = [
            {
                "entity_id": entity_id.decode("utf-8"),
                "embedding": embedding,
                "model_version": self._model_version,
                "n_support": min(int(n), self._max_support),
                "generated_at": self.generated_at,
            }
            for entity_id, n, embedding in zip(
                entity_ids, n_support, embeddings.tolist(), strict=True
            )
        ]
        cold = int(np.count_nonzero(n_support == 0))
        truncated = int(np.count_nonzero(n_support > self._max_support))
        if cold:
            self.count(ENTITIES_COLD, n=cold)
        if truncated:
            self.count(ENTITIES_TRUNCATED, n=truncated)
        return rows

    def start_bundle(self):
        super().start_bundle()
        self._pending = None

    def process(
        self,
        records: Sequence[bytes],
        window=beam.DoFn.WindowParam,
        timestamp=beam.DoFn.TimestampParam,
    ) -> Iterable[Any]:
        # TensorFlow runs this batch on the helper thread (it releases the
        # GIL) while Beam reads and batches the next records on this one; the
        # previous batch's rows go out now, and the last batch's at the end
        # of the bundle. Counts are only touched on this thread.
        self.count(BATCHES)
        self.count(ENTITIES_IN, n=len(records))
        future = self._executor.submit(self._compute, list(records))
        previous, self._pending = self._pending, (records, future, window, timestamp)
        if previous is not None:
            yield from self._complete(*previous)

    def finish_bundle(self):
        previous, self._pending = self._pending, None
        if previous is not None:
            yield from self._complete(*previous)
        yield from super().finish_bundle()

    def _complete(self, records, future, window, timestamp) -> Iterable[Any]:
        """Windowed outputs of one batch: its rows, or its dead letter on failure."""

        def windowed(value):
            return WindowedValue(value, timestamp, [window])

        try:
            rows = self._rows(future.result())
        except self._errors:
            rows = None
        if rows is not None:
            self.count(ENTITIES_OUT, n=len(rows))
            yield from map(windowed, rows)
            return
        logger.warning(
            "A batch of %d task records failed; retrying one by one", len(records)
        )
        for record in records:
            try:
                rows = self._rows(self._compute([record]))
            except self._errors as err:
                self.count(RECORDS_REJECTED)
                record_b64 = base64.b64encode(record).decode("ascii")
                yield beam.pvalue.TaggedOutput(
                    REJECTED,
                    windowed(
                        dead_letter(
                            {"record_b64": record_b64},
                            REASON_BAD_TASK_RECORD,
                            err.message.strip().splitlines()[0][:500],
                            SOURCE_TASK_RECORDS,
                        )
                    ),
                )
                continue
            self.count(ENTITIES_OUT, n=len(rows))
            yield from map(windowed, rows)

    def teardown(self):
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)


def named_counts(counts: Mapping[tuple, int]) -> dict[str, int]:
    """The summed {key tuple: count} of EmbedTasksFn as {counter: n}, all COUNTERS."""
    return {name: int(counts.get((name,), 0)) for name in COUNTERS}


class GenerateEmbeddings(beam.PTransform):
    """Serialized task records -> embedding rows, dead letter and counts.

    Args:
        export_dir: The SavedModel version directory (or its base: the latest).
        batch_size: Most entities per signature call.
        max_support: Support rows per entity (default: the export's maximum).
        generated_at: Unix seconds stamped on every row (default: now).
        sort_window: Calls' worth of entities batched together and sorted by
            support length before they are split into calls, so that each
            call pads its support sets less (1: no sorting).

    Returns (from `expand`): a dict with "embeddings", a PCollection of dicts
    (entity_id, embedding, model_version, n_support, generated_at);
    "rejected", dead-letter dicts (`beam_pipelines.dead_letter`) of the
    records that could not be embedded; and "counts", one dict
    {counter: n} of every name in COUNTERS, summed from the elements the
    DoFn emits (no runner metrics needed).
    """

    def __init__(
        self,
        export_dir: str,
        batch_size: int = 256,
        max_support: int | None = None,
        generated_at: int | None = None,
        sort_window: int = 8,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("sort_window", sort_window)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        self.sort_window = sort_window
        self.export_dir = export_dir
        self.batch_size = batch_size
        self.max_support = max_support
        self.generated_at = (
            int(time.time()) if generated_at is None else int(generated_at)
        )

    def expand(self, records):
        embedded = (
            records
            | "BatchEntities"
            >> beam.BatchElements(
                min_batch_size=self.batch_size * self.sort_window,
                max_batch_size=self.batch_size * self.sort_window,
            )
            | "EmbedBatches"
            >> beam.ParDo(
                EmbedTasksFn(
                    self.export_dir,
                    self.max_support,
                    self.generated_at,
                    call_size=self.batch_size,
                )
            ).with_outputs(REJECTED, STATS, main=EMBEDDINGS)
        )
        counts = (
            embedded[STATS]
            | "SumStats" >> SumStats()
            | "NameCounts" >> beam.Map(named_counts)
        )
        return {
            EMBEDDINGS: embedded[EMBEDDINGS],
            REJECTED: embedded[REJECTED],
            COUNTS: counts,
        }


def to_example(row: dict[str, Any]) -> bytes:
    """One embedding row as a serialized tf.Example."""
    from tensorflow.core.example import example_pb2  # noqa: PLC0415

    # Filled in place: cheaper than building Feature messages and copying them,
    # which matters at one call per entity.
    example = example_pb2.Example()
    feature = example.features.feature
    feature["entity_id"].bytes_list.value.append(row["entity_id"].encode("utf-8"))
    feature["embedding"].float_list.value.extend(row["embedding"])
    for key in ("model_version", "n_support", "generated_at"):
        feature[key].int64_list.value.append(int(row[key]))
    return example.SerializeToString()


def parquet_schema():
    import pyarrow as pa  # noqa: PLC0415 - only --parquet runs need it

    return pa.schema(
        [
            ("entity_id", pa.string()),
            ("embedding", pa.list_(pa.float32())),
            ("model_version", pa.int64()),
            ("n_support", pa.int64()),
            ("generated_at", pa.int64()),
        ]
    )


def _embedding_item(row: dict[str, Any]) -> tuple[str, str, bytes]:
    return EMBEDDINGS_PREFIX, row["entity_id"], to_example(row)


def _parquet_item(row: dict[str, Any]) -> tuple[str, str, bytes]:
    return PARQUET_PREFIX, row["entity_id"], json.dumps(row, sort_keys=True).encode()


def record_key(record: bytes) -> str:
    """The shard key of a task record: its entity id, or its bytes in base64.

    Embeddings are sharded by entity id, and a rejected record by the same key
    (recovered from its dead-letter copy), so a pass of a run in several
    passes can keep a record's every output from the record alone.
    """
    from tensorflow.core.example import example_pb2  # noqa: PLC0415

    try:
        context = example_pb2.SequenceExample.FromString(record).context.feature
        values = context[ENTITY_ID_KEY].bytes_list.value
        if len(values) == 1:
            return values[0].decode("utf-8")
    except Exception:  # noqa: BLE001, S110 - any unreadable record keys by its bytes
        pass
    return base64.b64encode(record).decode("ascii")


def _rejected_item(record: Mapping[str, Any]) -> tuple[str, str, bytes]:
    line = dead_letter_line(record)
    key = record_key(base64.b64decode(record["row"]["record_b64"]))
    return REJECTED, key, line.encode("utf-8", "backslashreplace")


def embed_summary(
    counts: Mapping[str, int], run_info: Mapping[str, Any]
) -> dict[str, Any]:
    """summary.json: the run's fields, the counts, and whether they balance.

    Balanced: entities_in = entities_out + records_rejected (the DoFn's
    counts) = embeddings_written + rejected_written (the records read back
    from the files written), and with Parquet parquet_written =
    embeddings_written.
    """
    n_in = counts[ENTITIES_IN]
    balanced = n_in == counts[ENTITIES_OUT] + counts[RECORDS_REJECTED]
    if EMBEDDINGS_WRITTEN in counts:
        balanced = balanced and n_in == (
            counts[EMBEDDINGS_WRITTEN] + counts[REJECTED_WRITTEN]
        )
    if counts.get(PARQUET_WRITTEN) is not None:
        balanced = balanced and counts[PARQUET_WRITTEN] == counts[EMBEDDINGS_WRITTEN]
    return {**run_info, **counts, "balanced": balanced}


def count_written(path: str, output_dir: str) -> tuple[str, int]:
    """(WRITTEN name, records) of one shard the writer wrote, read back from it.

    TFRecord shards are read record by record (length and CRC checked), the
    dead letter counted by lines, a Parquet shard by its footer's row count.
    """
    from apache_beam.io.tfrecordio import _TFRecordUtil  # noqa: PLC0415

    name = path[len(output_dir) :].lstrip("/")
    if name.startswith(PARQUET_PREFIX):
        import pyarrow.parquet as pq  # noqa: PLC0415

        with FileSystems.open(
            path, compression_type=CompressionTypes.UNCOMPRESSED
        ) as f:
            return PARQUET_WRITTEN, int(pq.ParquetFile(f).metadata.num_rows)
    if name.startswith(EMBEDDINGS_PREFIX):
        n = 0
        with FileSystems.open(path, compression_type=CompressionTypes.GZIP) as f:
            while _TFRecordUtil.read_record(f) is not None:
                n += 1
        return EMBEDDINGS_WRITTEN, n
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return REJECTED_WRITTEN, sum(1 for line in f if line.strip())


def _with_written(
    counts: Mapping[str, int], written: Mapping[str, int], parquet: bool
) -> dict[str, int]:
    names = WRITTEN if parquet else (EMBEDDINGS_WRITTEN, REJECTED_WRITTEN)
    return {**counts, **{name: int(written.get(name, 0)) for name in names}}


class WriteEmbeddings(beam.PTransform):
    """Writes `GenerateEmbeddings` outputs to DIR (see the module doc).

    Embeddings (TFRecord, and Parquet with `parquet`) and the dead letter go
    through the deterministic shard writer (`beam_pipelines.shards`);
    summary.json is `embed_summary` of the "counts" output.

    Args:
        output_dir: Directory (any Beam filesystem).
        parquet: Also write `parquet/embeddings-*.parquet`.
        run_info: Fields of summary.json besides the counts (export, model
            version, time stamp, ...).
        num_shards: Shards per output (0: one per ~128 MiB).
        partition: In a run of several passes (`beam_pipelines.passes`), this
            pass: only its shards are written, and its counts go to its
            partial file (`finish_passes` writes summary.json).
    """

    def __init__(
        self,
        output_dir: str,
        parquet: bool = False,
        run_info: Mapping[str, Any] | None = None,
        num_shards: int = 0,
        partition: Partition | None = None,
    ):
        super().__init__()
        self.output_dir = output_dir
        self.parquet = parquet
        self.run_info = dict(run_info or {})
        self.num_shards = num_shards
        self.partition = partition

    def expand(self, outputs):
        formats = {
            EMBEDDINGS_PREFIX: (TFRECORD_SUFFIX, TFRECORD),
            REJECTED: (REJECTED_SUFFIX, TEXT),
        }
        items = [
            outputs[EMBEDDINGS] | "EmbeddingItems" >> beam.Map(_embedding_item),
            outputs[REJECTED] | "RejectedItems" >> beam.Map(_rejected_item),
        ]
        schemas = {}
        if self.parquet:
            formats[PARQUET_PREFIX] = (PARQUET_SUFFIX, PARQUET)
            schemas[PARQUET_PREFIX] = parquet_schema()
            items.append(
                outputs[EMBEDDINGS] | "ParquetItems" >> beam.Map(_parquet_item)
            )
        paths = (
            tuple(items)
            | "FlattenOutputs" >> beam.Flatten()
            | "WriteShards"
            >> WriteShards(
                self.output_dir, formats, self.num_shards, schemas, self.partition
            )
        )
        # What the writer wrote, read back from its files, joins the counts.
        written = (
            paths
            | "CountWritten" >> beam.Map(count_written, self.output_dir)
            | "SumWritten" >> beam.CombinePerKey(sum)
        )
        counts = outputs[COUNTS] | "AddWritten" >> beam.Map(
            _with_written, beam.pvalue.AsDict(written), self.parquet
        )
        if self.partition is not None:
            _ = counts | "WritePartial" >> WritePartial(self.output_dir, self.partition)
            return outputs
        (
            counts
            | "Summary" >> beam.Map(embed_summary, self.run_info)
            | "SummaryToJson" >> beam.Map(json.dumps, indent=2)
            | "WriteSummary"
            >> beam.io.WriteToText(
                FileSystems.join(self.output_dir, "summary"),
                file_name_suffix=".json",
                num_shards=1,
                shard_name_template="",
            )
        )
        return outputs


def finish_passes(
    output_dir: str, passes: int, run_info: Mapping[str, Any]
) -> dict[str, Any]:
    """Adds up every pass's counts into DIR/summary.json; deletes the partials.

    Returns:
        The summary.
    """
    totals: dict[str, Any] = {name: 0 for name in COUNTERS}
    for counts in read_partials(output_dir, passes):
        for name in COUNTERS + WRITTEN:
            if name in counts:
                totals[name] = totals.get(name, 0) + int(counts[name])
    summary = embed_summary(totals, run_info)
    write_text(output_dir, "summary.json", json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------ command line
def counters(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    """This job's Beam metrics from a finished PipelineResult (0 when never incremented).

    For the runner's UI and tests; `run` writes summary.json from the counts the
    job carries as elements, which every runner delivers.
    """
    found = {name: 0 for name in COUNTERS}
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for counter in query["counters"]:
        value = (
            counter.committed if counter.committed is not None else counter.attempted
        )
        found[counter.key.metric.name] += int(value or 0)
    return found


def run(
    argv: Sequence[str] | None = None,
    save_main_session: bool = True,
    on_pass: Callable[[int, int], None] | None = None,
) -> beam.runners.runner.PipelineResult:
    """Runs the job: `limaml embed ...` or `python -m beam_pipelines.generate_embeddings`.

    Args:
        argv: Flags (see `beam_pipelines.options.embed_arguments`, plus
            `--overwrite`); flags this parser does not know go to Beam's
            PipelineOptions. None: no flags.
        save_main_session: Pickle the main module's globals for the workers.
        on_pass: With --passes, called as on_pass(index, passes) before each.

    Returns:
        The finished PipelineResult (of the last pass with --passes).

    Raises:
        FileNotFoundError: No export or no task files.
        ValueError: --output holds an earlier run (without --overwrite).
        TooManyRejectedError: More than --max-rejected-fraction of the records
            were rejected; every output, the dead letter included, is written.
        EntitiesLostError: Entities in != entities out + rejected.
    """
    from tf_limaml import export  # noqa: PLC0415 - imports TensorFlow

    parser = argparse.ArgumentParser(
        prog="generate_embeddings",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
    )
    embed_arguments(parser)
    known, pipeline_args = parser.parse_known_args(list(argv or []))
    metadata = export.read_metadata(known.export)
    if not FileSystems.match([known.tasks])[0].metadata_list:
        raise FileNotFoundError(
            f"--tasks {known.tasks!r} matches no file; check the path " "or the glob"
        )
    num_shards = check_passes(known.passes, known.num_shards)
    prepare_output(known.output, OUTPUT_PATTERNS, known.overwrite)
    if not FileSystems.exists(known.output):
        FileSystems.mkdirs(known.output)
    generated_at = int(time.time())
    max_support = known.max_support or metadata["max_support"]
    logger.info(
        "Embedding %s with model version %s (max_support %s)",
        known.tasks,
        metadata["model_version"],
        max_support,
    )
    run_info = {
        "export_dir": metadata["export_dir"],
        "model_version": metadata["model_version"],
        "tasks": known.tasks,
        "max_support": max_support,
        "generated_at": generated_at,
        "generated_at_utc": datetime.datetime.fromtimestamp(
            generated_at, datetime.timezone.utc
        ).isoformat(),
    }

    options = PipelineOptions(pipeline_args)
    options.view_as(SetupOptions).save_main_session = save_main_session

    def build(pipeline: beam.Pipeline, partition: Partition | None) -> None:
        records = pipeline | "ReadTasks" >> beam.io.ReadFromTFRecord(
            known.tasks, compression_type=CompressionTypes.AUTO
        )
        if partition is not None:
            records = records | "KeepPass" >> beam.Filter(
                lambda record: partition.keeps(record_key(record))
            )
        _ = (
            records
            | "GenerateEmbeddings"
            >> GenerateEmbeddings(
                metadata["export_dir"],
                known.batch_size,
                known.max_support,
                generated_at,
            )
            | "WriteEmbeddings"
            >> WriteEmbeddings(
                known.output, known.parquet, run_info, num_shards, partition
            )
        )

    results = run_passes(
        build,
        lambda: beam.Pipeline(options=options),
        known.passes,
        num_shards,
        "embed",
        on_pass,
    )
    if known.passes > 1:
        finish_passes(known.output, known.passes, run_info)
    result = results[-1]
    summary_path = FileSystems.join(known.output, "summary.json")
    with FileSystems.open(summary_path) as f:
        summary = json.loads(f.read().decode("utf-8"))
    counts = {name: summary[name] for name in COUNTERS}
    logger.info(
        "embed: %d entities in, %d out (%d cold start, %d with support cut to %s), "
        "%d records rejected",
        counts[ENTITIES_IN],
        counts[ENTITIES_OUT],
        counts[ENTITIES_COLD],
        counts[ENTITIES_TRUNCATED],
        summary["max_support"],
        counts[RECORDS_REJECTED],
    )
    if not summary["balanced"]:
        if counts[ENTITIES_IN] != counts[ENTITIES_OUT] + counts[RECORDS_REJECTED]:
            raise EntitiesLostError(
                f"Entities in ({counts[ENTITIES_IN]}) != entities out "
                f"({counts[ENTITIES_OUT]}) + rejected ({counts[RECORDS_REJECTED]}); "
                f"see {summary_path}"
            )
        written = ", ".join(f"{name} {summary.get(name)}" for name in WRITTEN)
        raise EntitiesLostError(
            f"Entities in ({counts[ENTITIES_IN]}) != the records the writer wrote "
            f"({written}); see {summary_path}"
        )
    rejected, entities_in = counts[RECORDS_REJECTED], counts[ENTITIES_IN]
    if rejected > known.max_rejected_fraction * entities_in:
        hint = (
            "none could be embedded: do they match the export's feature spec?"
            if counts[ENTITIES_OUT] == 0
            else "raise --max-rejected-fraction to accept them"
        )
        raise TooManyRejectedError(
            f"{rejected} of {entities_in} task records were rejected (more than "
            f"--max-rejected-fraction {known.max_rejected_fraction:g}); the reasons "
            f"are in {known.output}/rejected-*.jsonl, and {hint}"
        )
    return result


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    run(sys.argv[1:])
