"""Beam pipeline: every entity's adapted meta embedding, for online serving.

This is the offline half of LiMAML's deployment: for each entity (member) it
adapts the meta block on the entity's latest interactions (the support set of
its task record) and stores the resulting meta embedding. Online, TF Serving's
`serving_default` signature scores requests from that stored vector.

The job reads task records (`tf_limaml.data` SequenceExamples, e.g. the output
of `limaml make-tasks`), batches entities with `beam.BatchElements`, and calls
the export's batched `meta_embedding` signature; each worker loads the
SavedModel once, in `DoFn.setup`. Support longer than the export's
`max_support` keeps its latest rows. Entities without support rows get the
meta-learned default (cold-start) embedding.

Outputs in DIR:

* `embeddings-SSSSS-of-NNNNN.tfrecord.gz`: one tf.Example per entity with
  `entity_id` (bytes), `embedding` (float list of length d), `model_version`
  (int64: the export's version directory), `n_support` (int64: the support rows
  the embedding was adapted on, after the cap) and `generated_at` (int64: Unix
  seconds, UTC, one value per run);
* `parquet/embeddings-SSSSS-of-NNNNN.parquet` with the same columns (--parquet);
* `rejected-SSSSS-of-NNNNN.jsonl`: task records that could not be embedded
  (unparsable, or labels other than 0/1), with the reason;
* `summary.json`: the counters, written after the run; entities_in must equal
  entities_out + records_rejected, and the job fails otherwise. It also fails,
  after writing all of the above, when more than --max-rejected-fraction of the
  records (default: any) were rejected.

Locally:

    limaml embed --export exports/limaml/3 --tasks 'tasks/*.tfrecord.gz' \\
        --output embeddings/v3 --parquet

On Dataflow, add `--runner DataflowRunner --project P --region R
--temp_location gs://B/tmp --setup_file ./setup.py` and gs:// paths.

In code, `GenerateEmbeddings` turns a PCollection of serialized task records
into embedding rows:

    with beam.Pipeline() as p:
        out = p | beam.Create(records) | GenerateEmbeddings("exports/limaml/3")
        out["embeddings"]   # dicts: entity_id, embedding, model_version, ...
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime
import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.utils.windowed_value import WindowedValue

from beam_pipelines.options import embed_arguments
from beam_pipelines.outputs import prepare_output

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
REJECTED = "rejected"
EMBEDDINGS = "embeddings"
EMBEDDINGS_PREFIX = "embeddings"
TFRECORD_SUFFIX = ".tfrecord.gz"
OUTPUT_PATTERNS = ("embeddings-*", "parquet/embeddings-*", "rejected-*", "summary.json")


class TooManyRejectedError(ValueError):
    """More task records were rejected than --max-rejected-fraction allows."""


def _counter(name: str):
    return Metrics.counter(NAMESPACE, name)


class EmbedTasksFn(beam.DoFn):
    """Batches of serialized task records -> one embedding row per entity.

    Loads the SavedModel once per worker (in `setup`) and calls its batched
    `meta_embedding` signature. TensorFlow works on a batch on a helper thread
    while Beam reads the next, so a batch's rows are emitted when the next
    batch arrives, or at the end of the bundle. A batch that fails (a
    malformed record, a label other than 0/1) is retried record by record, and
    the failing records go to the `rejected` output with the reason.

    Args:
        export_dir: The SavedModel version directory (or its base: the latest).
        max_support: Support rows per entity (default: the export's maximum).
        generated_at: Unix seconds stamped on every row.
        call_size: Most entities per signature call; a larger input batch is
            sorted by support length and split into calls of this size.
    """

    def __init__(
        self,
        export_dir: str,
        max_support: int | None,
        generated_at: int,
        call_size: int = 256,
    ):
        self.export_dir = export_dir
        self.max_support = max_support
        self.generated_at = generated_at
        self.call_size = call_size

    def setup(self):
        import tensorflow as tf  # noqa: PLC0415 - loaded on the worker

        from tf_limaml import data, export  # noqa: PLC0415
        from tf_limaml.features import LABEL_KEY, MASK_KEY, SUPPORT  # noqa: PLC0415

        metadata = export.read_metadata(self.export_dir)
        spec = metadata["spec"]
        max_support = self.max_support or metadata["max_support"]
        self._max_support = max_support
        self._model_version = int(metadata["model_version"])
        self._loaded = tf.saved_model.load(metadata["export_dir"])
        signature = self._loaded.signatures[export.META_EMBEDDING]
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
            return signature(**sliced)["meta_embedding"]

        self._parse_sorted = parse_sorted
        self._embed_range = embed_range
        self._input_names = list(input_specs)
        self._errors = (tf.errors.InvalidArgumentError,)
        self._tf = tf
        self._cold = _counter(ENTITIES_COLD)
        self._truncated = _counter(ENTITIES_TRUNCATED)
        self._rejected = _counter(RECORDS_REJECTED)
        self._batches = _counter(BATCHES)
        self._entities_in = _counter(ENTITIES_IN)
        self._entities_out = _counter(ENTITIES_OUT)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="limaml-embed"
        )
        self._pending = None

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
            self._cold.inc(cold)
        if truncated:
            self._truncated.inc(truncated)
        return rows

    def start_bundle(self):
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
        # of the bundle. Counters are only touched on this thread.
        self._batches.inc()
        self._entities_in.inc(len(records))
        future = self._executor.submit(self._compute, list(records))
        previous, self._pending = self._pending, (records, future, window, timestamp)
        if previous is not None:
            yield from self._complete(*previous)

    def finish_bundle(self):
        previous, self._pending = self._pending, None
        if previous is not None:
            yield from self._complete(*previous)

    def _complete(self, records, future, window, timestamp) -> Iterable[Any]:
        """Windowed outputs of one batch: its rows, or its dead letter on failure."""

        def windowed(value):
            return WindowedValue(value, timestamp, [window])

        try:
            rows = self._rows(future.result())
        except self._errors:
            rows = None
        if rows is not None:
            self._entities_out.inc(len(rows))
            yield from map(windowed, rows)
            return
        logger.warning(
            "A batch of %d task records failed; retrying one by one", len(records)
        )
        for record in records:
            try:
                rows = self._rows(self._compute([record]))
            except self._errors as err:
                self._rejected.inc()
                yield beam.pvalue.TaggedOutput(
                    REJECTED,
                    windowed(
                        {
                            "reason": "bad_task_record",
                            "detail": err.message.strip().splitlines()[0][:500],
                            "record_b64": base64.b64encode(record).decode("ascii"),
                        }
                    ),
                )
                continue
            self._entities_out.inc(len(rows))
            yield from map(windowed, rows)

    def teardown(self):
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)


class GenerateEmbeddings(beam.PTransform):
    """Serialized task records -> {"embeddings": rows, "rejected": dead letter}.

    Args:
        export_dir: The SavedModel version directory (or its base: the latest).
        batch_size: Most entities per signature call.
        max_support: Support rows per entity (default: the export's maximum).
        generated_at: Unix seconds stamped on every row (default: now).
        sort_window: Calls' worth of entities batched together and sorted by
            support length before they are split into calls, so that each
            call pads its support sets less (1: no sorting).

    Returns (from `expand`): a dict with "embeddings", a PCollection of dicts
    (entity_id, embedding, model_version, n_support, generated_at), and
    "rejected", the records that could not be embedded, with the reason.
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
            ).with_outputs(REJECTED, main=EMBEDDINGS)
        )
        return {EMBEDDINGS: embedded[EMBEDDINGS], REJECTED: embedded[REJECTED]}


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


class WriteEmbeddings(beam.PTransform):
    """Writes `GenerateEmbeddings` outputs to DIR (see the module doc)."""

    def __init__(self, output_dir: str, parquet: bool = False):
        super().__init__()
        self.output_dir = output_dir
        self.parquet = parquet

    def expand(self, outputs):
        path = lambda name: FileSystems.join(self.output_dir, name)  # noqa: E731
        (
            outputs[EMBEDDINGS]
            | "ToTFExample" >> beam.Map(to_example)
            | "WriteTFRecords"
            >> beam.io.WriteToTFRecord(
                path(EMBEDDINGS_PREFIX),
                file_name_suffix=TFRECORD_SUFFIX,
                compression_type=CompressionTypes.GZIP,
            )
        )
        if self.parquet:
            outputs[EMBEDDINGS] | "WriteParquet" >> beam.io.WriteToParquet(
                FileSystems.join(path("parquet"), EMBEDDINGS_PREFIX),
                parquet_schema(),
                file_name_suffix=".parquet",
            )
        (
            outputs[REJECTED]
            | "RejectedToJson" >> beam.Map(json.dumps)
            | "WriteRejected"
            >> beam.io.WriteToText(path("rejected"), file_name_suffix=".jsonl")
        )
        return outputs


# ------------------------------------------------------------ command line
def counters(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    """This job's counters from a finished PipelineResult (0 when never incremented)."""
    found = {name: 0 for name in COUNTERS}
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for counter in query["counters"]:
        value = (
            counter.committed if counter.committed is not None else counter.attempted
        )
        found[counter.key.metric.name] += int(value or 0)
    return found


def run(
    argv: Sequence[str] | None = None, save_main_session: bool = True
) -> beam.runners.runner.PipelineResult:
    """Runs the job: `limaml embed ...` or `python -m beam_pipelines.generate_embeddings`.

    Args:
        argv: Flags (see `beam_pipelines.options.embed_arguments`, plus
            `--overwrite`); flags this parser does not know go to Beam's
            PipelineOptions. None: no flags.
        save_main_session: Pickle the main module's globals for the workers.

    Returns:
        The finished PipelineResult.

    Raises:
        FileNotFoundError: No export or no task files.
        ValueError: --output holds an earlier run (without --overwrite).
        TooManyRejectedError: More than --max-rejected-fraction of the records
            were rejected; every output, the dead letter included, is written.
        RuntimeError: Entities in != entities out + rejected.
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
    prepare_output(known.output, OUTPUT_PATTERNS, known.overwrite)
    if not FileSystems.exists(known.output):
        FileSystems.mkdirs(known.output)
    generated_at = int(time.time())
    logger.info(
        "Embedding %s with model version %s (max_support %s)",
        known.tasks,
        metadata["model_version"],
        known.max_support or metadata["max_support"],
    )

    options = PipelineOptions(pipeline_args)
    options.view_as(SetupOptions).save_main_session = save_main_session
    pipeline = beam.Pipeline(options=options)
    _ = (
        pipeline
        | "ReadTasks"
        >> beam.io.ReadFromTFRecord(known.tasks, compression_type=CompressionTypes.AUTO)
        | "GenerateEmbeddings"
        >> GenerateEmbeddings(
            metadata["export_dir"], known.batch_size, known.max_support, generated_at
        )
        | "WriteEmbeddings" >> WriteEmbeddings(known.output, known.parquet)
    )
    result = pipeline.run()
    result.wait_until_finish()
    counts = counters(result)
    summary = {
        "export_dir": metadata["export_dir"],
        "model_version": metadata["model_version"],
        "tasks": known.tasks,
        "max_support": known.max_support or metadata["max_support"],
        "generated_at": generated_at,
        "generated_at_utc": datetime.datetime.fromtimestamp(
            generated_at, datetime.timezone.utc
        ).isoformat(),
        **counts,
        "balanced": counts[ENTITIES_IN]
        == counts[ENTITIES_OUT] + counts[RECORDS_REJECTED],
    }
    with FileSystems.create(FileSystems.join(known.output, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode("utf-8"))
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
        raise RuntimeError(
            f"Entities in ({counts[ENTITIES_IN]}) != entities out ({counts[ENTITIES_OUT]}) "
            f"+ rejected ({counts[RECORDS_REJECTED]}); see {known.output}/summary.json"
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
