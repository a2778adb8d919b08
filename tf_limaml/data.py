"""Task records: the one encoder that writes them and the tf.data reader.

A task is one `tf.train.SequenceExample` per entity (schema in
`record_schema`). `encode_task` is the only writer: the
Beam pipeline, the synthetic dataset, the MovieLens loader and the tests all
call it. `task_dataset` reads gzipped TFRecords of tasks and yields batches of
T tasks padded to fixed support/query sizes with masks:

    entity_id        [T]         string
    <meta feature>   [T] (numeric float32, categorical string) or [T, K] (multi-hot)
    support_<name>   [T, S] or [T, S, K]
    support_label    [T, S]      float32
    support_mask     [T, S]      float32, 1 for real rows, 0 for padding
    query_*          likewise with Q
    n_support        [T]         int32, support rows before truncation
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from tf_limaml.features import (
    CATEGORICAL,
    ENTITY_ID_KEY,
    LABEL_KEY,
    MASK_KEY,
    MULTI_HOT,
    NUMERIC,
    PARTS,
    QUERY,
    SUPPORT,
    TIME_KEY,
    Feature,
    FeatureSpec,
)

GZIP = "GZIP"


def record_schema(spec: FeatureSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tf.io parsing spec of a task record of `spec`: (context, sequence).

    A task is one `tf.train.SequenceExample` per entity:

    * context: `entity_id` (bytes) and every meta feature (numeric: one float,
      or n for a feature of shape [n];
      categorical: one bytes value; multi-hot: any number of bytes values);
    * feature lists, for part in (support, query): `part/label` (float),
      `part/time` (int64), and `part/<name>` for every request feature, one
      entry per interaction in time order.
    """
    context: dict[str, Any] = {ENTITY_ID_KEY: tf.io.FixedLenFeature([], tf.string)}
    for feature in spec.meta_features:
        if feature.type == NUMERIC:
            context[feature.name] = tf.io.FixedLenFeature(
                list(feature.shape), tf.float32
            )
        elif feature.type == CATEGORICAL:
            context[feature.name] = tf.io.FixedLenFeature([], tf.string)
        else:
            context[feature.name] = tf.io.VarLenFeature(tf.string)
    sequence: dict[str, Any] = {}
    for part in PARTS:
        sequence[spec.sequence_key(part, LABEL_KEY)] = tf.io.FixedLenSequenceFeature(
            [], tf.float32
        )
        sequence[spec.sequence_key(part, TIME_KEY)] = tf.io.FixedLenSequenceFeature(
            [], tf.int64
        )
        for feature in spec.request_features:
            key = spec.sequence_key(part, feature.name)
            if feature.type == NUMERIC:
                sequence[key] = tf.io.FixedLenSequenceFeature(
                    list(feature.shape), tf.float32
                )
            elif feature.type == CATEGORICAL:
                sequence[key] = tf.io.FixedLenSequenceFeature([], tf.string)
            else:
                sequence[key] = tf.io.VarLenFeature(tf.string)
    return context, sequence


def _value_feature(feature: Feature, value: Any) -> tf.train.Feature:
    if feature.type == NUMERIC:
        values = value if feature.shape else [value]
        return tf.train.Feature(
            float_list=tf.train.FloatList(value=[float(v) for v in values])
        )
    if feature.type == CATEGORICAL:
        return tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[str(value).encode()])
        )
    values = feature.parse_values(value)[: feature.values_per_row]
    return tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[v.encode() for v in values])
    )


def _numeric_default(feature: Feature) -> float | list[float]:
    default = feature.default or 0.0
    if isinstance(default, tuple):
        return list(default)
    return [default] * feature.size if feature.shape else default


def encode_task(
    spec: FeatureSpec,
    entity_id: str,
    meta: Mapping[str, Any],
    support: Sequence[Mapping[str, Any]],
    query: Sequence[Mapping[str, Any]],
) -> tf.train.SequenceExample:
    """Encodes one entity's task as a SequenceExample.

    Args:
        spec: The feature spec.
        entity_id: The entity id.
        meta: Meta feature values by name. A missing numeric value is 0 (or the
            feature's default); a missing categorical value is "" (out of
            vocabulary).
        support: Support rows in time order, each holding `label` (0/1),
            the time column and every request feature.
        query: Query rows, likewise.

    Returns:
        The task record. `.SerializeToString()` gives the bytes to write.
    """
    context = {
        ENTITY_ID_KEY: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[str(entity_id).encode()])
        )
    }
    for feature in spec.meta_features:
        value = meta.get(feature.name)
        if value is None:
            value = (
                _numeric_default(feature)
                if feature.type == NUMERIC
                else ("" if feature.type == CATEGORICAL else [])
            )
        context[feature.name] = _value_feature(feature, value)
    feature_lists = {}
    for part, rows in ((SUPPORT, support), (QUERY, query)):
        feature_lists[spec.sequence_key(part, LABEL_KEY)] = tf.train.FeatureList(
            feature=[
                tf.train.Feature(
                    float_list=tf.train.FloatList(value=[float(r[LABEL_KEY])])
                )
                for r in rows
            ]
        )
        feature_lists[spec.sequence_key(part, TIME_KEY)] = tf.train.FeatureList(
            feature=[
                tf.train.Feature(
                    int64_list=tf.train.Int64List(value=[int(r[spec.time])])
                )
                for r in rows
            ]
        )
        for feature in spec.request_features:
            feature_lists[spec.sequence_key(part, feature.name)] = tf.train.FeatureList(
                feature=[_value_feature(feature, r[feature.name]) for r in rows]
            )
    return tf.train.SequenceExample(
        context=tf.train.Features(feature=context),
        feature_lists=tf.train.FeatureLists(feature_list=feature_lists),
    )


def write_tasks(
    path: str | os.PathLike, records: Iterable[tf.train.SequenceExample | bytes]
) -> int:
    """Writes task records to one gzipped TFRecord file; returns how many."""
    count = 0
    options = tf.io.TFRecordOptions(compression_type=GZIP)
    with tf.io.TFRecordWriter(str(path), options=options) as writer:
        for record in records:
            writer.write(
                record if isinstance(record, bytes) else record.SerializeToString()
            )
            count += 1
    return count


def _pad_axis(
    tensor: tf.Tensor, axis: int, size: int, keep_last: bool = False
) -> tf.Tensor:
    """Truncates or zero/""-pads `tensor` along `axis` to exactly `size`.

    keep_last keeps the last `size` entries when truncating (support keeps its
    most recent rows); otherwise the first.
    """
    length = tf.shape(tensor)[axis]
    begin = tf.maximum(length - size, 0) if keep_last else 0
    rank = tensor.shape.rank
    starts = [0] * rank
    sizes = [-1] * rank
    starts[axis] = begin
    sizes[axis] = tf.minimum(length, size)
    tensor = tf.slice(tensor, tf.stack(starts), tf.stack(sizes))
    paddings = [[0, 0] for _ in range(rank)]
    paddings[axis] = [0, size - tf.shape(tensor)[axis]]
    constant = "" if tensor.dtype == tf.string else 0
    padded = tf.pad(tensor, paddings, constant_values=constant)
    shape = padded.shape.as_list()
    shape[axis] = size
    return tf.ensure_shape(padded, [None if d is None else d for d in shape])


def _dense_multi_hot(value: tf.SparseTensor | tf.Tensor, width: int) -> tf.Tensor:
    if isinstance(value, tf.SparseTensor):
        value = tf.sparse.to_dense(value, default_value="")
    return _pad_axis(value, value.shape.rank - 1, width)


def parse_task_batch(
    serialized: tf.Tensor,
    spec: FeatureSpec,
    max_support: int,
    max_query: int,
    parts: Sequence[str] = PARTS,
    pad_rows: bool = True,
) -> dict[str, tf.Tensor]:
    """Parses a [T] batch of serialized task records into padded tensors.

    Support keeps each task's most recent `max_support` rows and query its first
    `max_query` rows, matching the pipeline's caps.

    Args:
        serialized: `[T]` serialized task records.
        spec: The feature spec the records were written with.
        max_support: S, support rows per task after padding/truncation.
        max_query: Q, query rows per task after padding/truncation.
        parts: The parts to parse; `(SUPPORT,)` skips decoding the query lists
            (the embedding job needs only the support set), and the batch then
            has no `query_*` keys.
        pad_rows: Pad each part's row axis to exactly S (Q), for fixed shapes.
            False pads only to the batch's longest kept set (a dynamic axis of
            at most S), which saves work when shapes need not be fixed.
    """
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(
            f"`parts` must be a non-empty subset of {PARTS}, got {parts!r}"
        )
    context_spec, sequence_spec = record_schema(spec)
    prefixes = tuple(spec.sequence_key(part, "") for part in parts)
    sequence_spec = {k: v for k, v in sequence_spec.items() if k.startswith(prefixes)}
    context, sequences, lengths = tf.io.parse_sequence_example(
        serialized, context_features=context_spec, sequence_features=sequence_spec
    )
    batch: dict[str, tf.Tensor] = {ENTITY_ID_KEY: context[ENTITY_ID_KEY]}
    for feature in spec.meta_features:
        value = context[feature.name]
        if feature.type == MULTI_HOT:
            value = _dense_multi_hot(value, feature.values_per_row)
        batch[feature.name] = value
    sizes = {SUPPORT: max_support, QUERY: max_query}
    for part in PARTS:
        if part not in parts:
            continue
        size = sizes[part]
        keep_last = part == SUPPORT
        label_key = spec.sequence_key(part, LABEL_KEY)
        n_rows = tf.cast(lengths[label_key], tf.int32)
        # Rows are left-aligned by the parser; when truncating support to its
        # latest rows, each task's kept window ends at its own length.
        if keep_last:
            shift = tf.maximum(n_rows - size, 0)
        for name in [LABEL_KEY] + [f.name for f in spec.request_features]:
            value = sequences[spec.sequence_key(part, name)]
            if isinstance(value, tf.SparseTensor):
                value = tf.sparse.to_dense(value, default_value="")
            if keep_last:
                value = _roll_rows(value, shift)
            value = _pad_axis(value, 1, size) if pad_rows else value[:, :size]
            if name != LABEL_KEY and spec.feature(name).type == MULTI_HOT:
                value = _pad_axis(value, 2, spec.feature(name).values_per_row)
            batch[spec.batch_key(part, name)] = value
        kept = tf.minimum(n_rows, size)
        width = (
            size if pad_rows else tf.shape(batch[spec.batch_key(part, LABEL_KEY)])[1]
        )
        batch[spec.batch_key(part, MASK_KEY)] = tf.sequence_mask(
            kept, width, dtype=tf.float32
        )
        if part == SUPPORT:
            batch["n_support"] = n_rows
    return batch


def _roll_rows(value: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """Shifts each task's rows left by shift[t] so its latest rows come first."""
    size = tf.shape(value)[1]
    index = tf.range(size)[None, :] + shift[:, None]
    index = tf.minimum(index, size - 1)
    return tf.gather(value, index, batch_dims=1)


def match_files(file_pattern: str | Sequence[str]) -> list[str]:
    """Sorted files matching a glob or a list of globs.

    Raises:
        FileNotFoundError: Nothing matches.
    """
    patterns = (
        [file_pattern]
        if isinstance(file_pattern, (str, os.PathLike))
        else list(file_pattern)
    )
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(str(p))})
    if not files:
        raise FileNotFoundError(f"No task files match {file_pattern!r}")
    return files


def task_dataset(
    file_pattern: str | Sequence[str],
    spec: FeatureSpec,
    batch_tasks: int = 32,
    max_support: int = 32,
    max_query: int = 32,
    shuffle: bool = False,
    seed: int | None = None,
    repeat: bool = False,
    drop_remainder: bool = False,
    shuffle_buffer: int = 10_000,
) -> tf.data.Dataset:
    """Batches of T tasks from gzipped SequenceExample TFRecords.

    Args:
        file_pattern: Glob (or list of globs) of `.tfrecord.gz` task files.
        spec: The feature spec the records were written with.
        batch_tasks: T, tasks per batch.
        max_support: S, support rows per task after padding/truncation.
        max_query: Q, query rows per task after padding/truncation.
        shuffle: Shuffle files and tasks (training).
        seed: Shuffle seed, for repeatable runs.
        repeat: Repeat forever.
        drop_remainder: Drop the last partial batch (fixed shapes for XLA).
        shuffle_buffer: Tasks held by the shuffle buffer.

    Returns:
        A dataset of dicts of tensors (see the module docstring).

    Raises:
        FileNotFoundError: No file matches the pattern.
    """
    files = match_files(file_pattern)
    for name, value in (
        ("batch_tasks", batch_tasks),
        ("max_support", max_support),
        ("max_query", max_query),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=GZIP),
        cycle_length=min(len(files), 4),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_tasks, drop_remainder=drop_remainder)
    ds = ds.map(
        lambda s: parse_task_batch(s, spec, max_support, max_query),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.prefetch(tf.data.AUTOTUNE)


def count_tasks(file_pattern: str | Sequence[str]) -> int:
    """Number of task records in the matching gzipped TFRecord files."""
    records = tf.data.TFRecordDataset(match_files(file_pattern), compression_type=GZIP)
    return int(records.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def tasks_from_histories(
    spec: FeatureSpec, histories: Iterable[Any]
) -> list[tf.train.SequenceExample]:
    """Encodes non-cold `tasks.EntityHistory` objects."""
    return [
        encode_task(spec, h.entity_id, h.meta, h.support, h.query)
        for h in histories
        if not h.cold
    ]


def tasks_to_batch(
    records: Sequence[tf.train.SequenceExample | bytes],
    spec: FeatureSpec,
    max_support: int,
    max_query: int,
) -> dict[str, tf.Tensor]:
    """Parses in-memory task records into one padded batch (notebooks, tests)."""
    serialized = tf.constant(
        [r if isinstance(r, bytes) else r.SerializeToString() for r in records]
    )
    return parse_task_batch(serialized, spec, max_support, max_query)


def batch_keys(spec: FeatureSpec) -> list[str]:
    """Every key of a task batch, in a stable order."""
    keys = [ENTITY_ID_KEY] + [f.name for f in spec.meta_features]
    for part in PARTS:
        keys += [spec.batch_key(part, f.name) for f in spec.request_features]
        keys += [spec.batch_key(part, LABEL_KEY), spec.batch_key(part, MASK_KEY)]
    return keys + ["n_support"]
