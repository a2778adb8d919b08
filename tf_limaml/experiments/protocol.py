"""The protocol of the comparison: members, task batches, support cuts, scores.

Members are split train/val/test by a stable hash (`records_from_histories`,
or `limaml make-tasks` and `records_from_dir`). The global model trains on the
train members' rows only, the meta-learned ones on the train members' tasks;
the ID embedding also on the val and test members' support rows, cut to k
(`training_rows`), since it learns their IDs from them. So every model meets
a held-out member only through the k support rows it is scored with.
Everything is scored on the test members' query rows (`query_metrics`), again
with each test member's support cut to its latest k rows (`cut_support`,
`evaluate_sweep`). `Protocol.describe()` states all of it for the report.

Task batches are dicts of NumPy arrays with the keys of
`tf_limaml.data.parse_task_batch`, one batch per split (`task_batch`,
`Splits`).

Example:

    from tf_limaml.experiments import protocol

    records = protocol.records_from_histories(histories, spec)
    splits = protocol.Splits.from_records(records, spec, protocol.Protocol())
    sweep = protocol.evaluate_sweep(lambda batch, k: score(batch), splits.test)
"""

from __future__ import annotations

import dataclasses
import glob
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_limaml import data as task_data
from tf_limaml import evaluation
from tf_limaml.errors import UserInputError
from tf_limaml.features import (
    ENTITY_ID_KEY,
    LABEL_KEY,
    MASK_KEY,
    QUERY,
    SUPPORT,
    FeatureSpec,
)
from tf_limaml.tasks import SPLITS, assign_split

Batch = dict[str, np.ndarray]
# Support sizes of the sweep; None is the member's whole support set.
SUPPORT_KS: tuple[int | None, ...] = (1, 3, 5, 10, None)


def k_label(k: int | None) -> str:
    """ "all" for the whole support set, else the number: the report's key."""
    return "all" if k is None else str(k)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The evaluation protocol, as the report states it.

    Attributes:
        split_rule: How each member's history is cut (support first).
        split_seed: Seed of the member hash split.
        val_fraction: Share of members in val.
        test_fraction: Share of members in test.
        support_ks: Support sizes of the sweep (None: all).
        max_support: Support rows per task in meta-training (the latest ones).
        max_query: Query rows per task in meta-training (the earliest ones).
    """

    split_rule: str = "fraction:0.5"
    split_seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    support_ks: tuple[int | None, ...] = SUPPORT_KS
    max_support: int = 64
    max_query: int = 64

    def describe(self, spec: FeatureSpec | None = None) -> dict[str, Any]:
        """The protocol as the JSON of `report.json`.

        Args:
            spec: The data's FeatureSpec, whose time and tie-break columns
                order each history (None: described generically).
        """
        if spec is None:
            order_columns = "the spec's time column, then its tie-break column if any"
        else:
            order_columns = ", then ".join(
                filter(
                    None, (f"`{spec.time}`", spec.tie_break and f"`{spec.tie_break}`")
                )
            )
        return {
            "order": f"each entity's interactions sorted by {order_columns}; "
            "rows still tied are ordered by content",
            "split": f"{self.split_rule}: support is the earlier part, query the later",
            "members": (
                f"train/val/test {1 - self.val_fraction - self.test_fraction:.0%}/"
                f"{self.val_fraction:.0%}/{self.test_fraction:.0%} by SHA-256 of "
                f"(seed {self.split_seed}, member id)"
            ),
            "global_training_rows": "train members' support and query only: a held-out "
            "member's rows reach global, fine-tuning and LiMAML only through their "
            "adaptation to its k support rows",
            "id_embedding_training_rows": "train members' support and query, plus val "
            "and test members' latest k support rows (their IDs are learned from them)",
            "meta_training_tasks": (
                f"train members' tasks (latest {self.max_support} "
                f"support rows, first {self.max_query} query rows)"
            ),
            "scored_on": "every query row of every test member",
            "val_members": "early stopping of every model; inner lr and steps of finetune",
            "support_sweep": (
                "each test member's support cut to its latest k rows, k in "
                f"{[k_label(k) for k in self.support_ks]}; id_embedding "
                "retrained per k seeing only those k rows of each val and "
                "test member"
            ),
            "metrics": [
                "overall AUC over all test query rows (exact)",
                "log loss over all test query rows",
                "mean per-member AUC over members whose query holds both classes",
            ],
        }

    def make_tasks_args(
        self,
        input_path: str,
        spec_path: str,
        output_dir: str,
        file_format: str = "csv",
        test_fraction: float | None = None,
    ) -> list[str]:
        """The `limaml make-tasks` flags that cut and split tasks by this protocol.

        Args:
            input_path: The interactions file(s).
            spec_path: The FeatureSpec JSON.
            output_dir: make-tasks' output directory (overwritten).
            file_format: "csv" or "parquet".
            test_fraction: Instead of the protocol's (e.g. 0: no test entities).
        """
        if test_fraction is None:
            test_fraction = self.test_fraction
        return [
            "--input",
            input_path,
            "--format",
            file_format,
            "--features",
            spec_path,
            "--output",
            output_dir,
            "--split",
            self.split_rule,
            "--seed",
            str(self.split_seed),
            "--val-fraction",
            str(self.val_fraction),
            "--test-fraction",
            str(test_fraction),
            "--overwrite",
        ]


def records_from_histories(
    histories: Iterable[Any],
    spec: FeatureSpec,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, list[bytes]]:
    """Serialized task records by split, from `tasks.build_tasks` histories.

    The same split as `limaml make-tasks --seed SEED`: SHA-256 of seed and id.
    """
    out: dict[str, list[bytes]] = {split: [] for split in SPLITS}
    for history in histories:
        if history.cold:
            continue
        split = assign_split(history.entity_id, seed, val_fraction, test_fraction)
        record = task_data.encode_task(
            spec, history.entity_id, history.meta, history.support, history.query
        )
        out[split].append(record.SerializeToString())
    return out


def records_from_dir(task_dir: str | os.PathLike) -> dict[str, list[bytes]]:
    """Serialized task records by split from `limaml make-tasks` output.

    Records are sorted (by their bytes), so the order, and with it the
    shuffling of training, does not depend on how the runner sharded them.

    Raises:
        FileNotFoundError: A split has no `SPLIT-*.tfrecord.gz` file.
    """
    out = {}
    for split in SPLITS:
        pattern = os.path.join(os.fspath(task_dir), f"{split}-*.tfrecord.gz")
        files = sorted(glob.glob(pattern))
        if not files:
            raise FileNotFoundError(
                f"No {split} task files match {pattern}; run `limaml make-tasks "
                f"--output {task_dir}` first."
            )
        dataset = tf.data.TFRecordDataset(files, compression_type=task_data.GZIP)
        out[split] = sorted(bytes(r) for r in dataset.as_numpy_iterator())
    return out


def _part_lengths(records: Sequence[bytes], part: str) -> np.ndarray:
    key = FeatureSpec.sequence_key(part, LABEL_KEY)
    lengths = []
    for record in records:
        example = tf.train.SequenceExample.FromString(record)
        lists = example.feature_lists.feature_list
        lengths.append(len(lists[key].feature) if key in lists else 0)
    return np.asarray(lengths, dtype=np.int64)


def task_batch(
    records: Sequence[bytes],
    spec: FeatureSpec,
    max_support: int | None = None,
    max_query: int | None = None,
) -> Batch:
    """All records as one padded task batch of NumPy arrays.

    Args:
        records: Serialized task records.
        spec: Their FeatureSpec.
        max_support: Support rows kept per task (the latest); None keeps all.
        max_query: Query rows kept per task (the earliest); None keeps all.

    Raises:
        ValueError: No records.
    """
    if not records:
        raise UserInputError(
            "No task records to batch: the split is empty. Use more "
            "members, or larger --val-fraction/--test-fraction."
        )
    if max_support is None:
        max_support = max(1, int(_part_lengths(records, SUPPORT).max()))
    if max_query is None:
        max_query = max(1, int(_part_lengths(records, QUERY).max()))
    batch = task_data.tasks_to_batch(list(records), spec, max_support, max_query)
    return {key: value.numpy() for key, value in batch.items()}


def cut_support(batch: Batch, k: int | None) -> Batch:
    """The batch with each task's support cut to its latest k real rows.

    Support rows are left-aligned in time order (`parse_task_batch`), so the
    latest k of a task with n rows sit at positions n-k .. n-1. Only the mask
    changes; masked rows take no part in any loss.

    Args:
        batch: A task batch.
        k: Rows to keep; None keeps all.
    """
    if k is None:
        return batch
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(
            f"Support size k must be an integer >= 0 or None (all), got {k!r}"
        )
    mask = batch[f"{SUPPORT}_{MASK_KEY}"]
    n = mask.sum(axis=1, keepdims=True)
    position = np.arange(mask.shape[1])[None, :]
    keep = (position >= n - k) & (position < n)
    out = dict(batch)
    out[f"{SUPPORT}_{MASK_KEY}"] = (mask * keep).astype(mask.dtype)
    return out


def select_tasks(batch: Batch, index: np.ndarray | Sequence[int]) -> Batch:
    """The tasks at `index` (e.g. one member, for a notebook)."""
    index = np.asarray(index)
    return {key: value[index] for key, value in batch.items()}


def flatten(
    batch: Batch, spec: FeatureSpec, parts: Sequence[str]
) -> dict[str, np.ndarray]:
    """Real rows of the given parts as flat arrays, meta features repeated per row.

    Returns:
        `entity_id`, every meta feature, every request feature and `label`,
        one entry per real row, support rows before query rows.
    """
    out: dict[str, list[np.ndarray]] = {}
    for part in parts:
        mask = batch[f"{part}_{MASK_KEY}"] > 0
        per_task = mask.sum(axis=1)
        columns = {
            ENTITY_ID_KEY: np.repeat(batch[ENTITY_ID_KEY], per_task, axis=0),
            LABEL_KEY: batch[spec.batch_key(part, LABEL_KEY)][mask],
        }
        for feature in spec.meta_features:
            columns[feature.name] = np.repeat(batch[feature.name], per_task, axis=0)
        for feature in spec.request_features:
            columns[feature.name] = batch[spec.batch_key(part, feature.name)][mask]
        for key, value in columns.items():
            out.setdefault(key, []).append(value)
    if not out:
        raise ValueError("flatten needs at least one part (support or query)")
    return {key: np.concatenate(values) for key, values in out.items()}


def training_rows(
    train: Batch, val: Batch, test: Batch, spec: FeatureSpec, k: int | None = None
) -> dict[str, np.ndarray]:
    """Rows of the conventional baselines: train members' support and query,
    plus val and test members' support (cut to their latest k rows)."""
    parts = [
        flatten(train, spec, (SUPPORT, QUERY)),
        flatten(cut_support(val, k), spec, (SUPPORT,)),
        flatten(cut_support(test, k), spec, (SUPPORT,)),
    ]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def random_support_cut(
    task: Mapping[str, tf.Tensor], rate: float, seed: int
) -> dict[str, tf.Tensor]:
    """With probability `rate`, cuts one task's support to its latest k rows.

    k is log-uniform between 1 and the task's n support rows, so meta-training
    also sees the few-interaction members the support sweep scores (the full
    histories of ML-100K members have at least 10 support rows).
    """
    mask = task[f"{SUPPORT}_{MASK_KEY}"]
    n = tf.reduce_sum(mask)
    draw = tf.random.uniform([2], seed=seed)
    k = tf.floor(tf.exp(draw[0] * tf.math.log(n + 1.0)))
    k = tf.clip_by_value(k, 1.0, tf.maximum(n, 1.0))
    k = tf.where(draw[1] < rate, k, n)
    position = tf.range(tf.shape(mask)[0], dtype=mask.dtype)
    keep = tf.cast((position >= n - k) & (position < n), mask.dtype)
    out = dict(task)
    out[f"{SUPPORT}_{MASK_KEY}"] = mask * keep
    return out


@dataclasses.dataclass
class Splits:
    """The task batches of one run.

    Attributes:
        train: Train members, every support and query row.
        val: Val members, every row.
        test: Test members, every row.
        train_meta: Train members capped for meta-training (latest
            `max_support` support rows, first `max_query` query rows).
        val_meta: Val members, capped the same way (early stopping).
    """

    train: Batch
    val: Batch
    test: Batch
    train_meta: Batch
    val_meta: Batch

    @classmethod
    def from_records(
        cls,
        records: Mapping[str, Sequence[bytes]],
        spec: FeatureSpec,
        protocol: Protocol,
    ) -> Splits:
        return cls(
            train=task_batch(records["train"], spec),
            val=task_batch(records["val"], spec),
            test=task_batch(records["test"], spec),
            train_meta=task_batch(
                records["train"], spec, protocol.max_support, protocol.max_query
            ),
            val_meta=task_batch(
                records["val"], spec, protocol.max_support, protocol.max_query
            ),
        )

    def members(self, *splits: str) -> list[str]:
        """Sorted member ids of the named splits."""
        ids = np.concatenate([getattr(self, s)[ENTITY_ID_KEY] for s in splits])
        return sorted({i.decode() if isinstance(i, bytes) else str(i) for i in ids})


# ----------------------------------------------------------------- buckets
# A batch key holding one bucket label per query row, `[T, Q]` strings:
# `query_metrics` then also reports every bucket.
BUCKET_PREFIX = "bucket/"
MEMBER_HISTORY = "member_history"
ITEM_POPULARITY = "item_popularity"
# Training ratings of a query row's item: "rare" to "popular", log-spaced.
ITEM_COUNT_EDGES = (0, 5, 20, 100)


def _range_label(low: int, high: int | None) -> str:
    if high is None:
        return f"{low}+"
    return str(low) if high - low == 1 else f"{low}-{high - 1}"


def _bucketize(values: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """Label per value of the range [edges[i], edges[i+1]) it falls in."""
    values = np.asarray(values)
    names = np.empty(values.shape, dtype=object)
    bounds = list(edges) + [None]
    for low, high in zip(bounds[:-1], bounds[1:], strict=True):
        inside = values >= low if high is None else (values >= low) & (values < high)
        names[inside] = _range_label(int(low), None if high is None else int(high))
    return names


def history_edges(lengths: np.ndarray, buckets: int = 4) -> tuple[int, ...]:
    """Bucket edges of member history lengths: quantiles, so buckets hold
    about as many members each whatever the data (duplicates merged)."""
    lengths = np.asarray(lengths)
    qs = np.quantile(lengths, np.linspace(0, 1, buckets + 1)[1:-1])
    edges = [int(lengths.min())] + [int(np.ceil(q)) for q in qs]
    return tuple(sorted(set(edges)))


def member_history_buckets(
    batch: Mapping[str, Any], edges: Sequence[int] | None = None
) -> np.ndarray:
    """Per query row `[T, Q]`: its member's bucket of training-history length
    (real support rows: the history before the query)."""
    lengths = np.asarray(batch[f"{SUPPORT}_{MASK_KEY}"]).sum(axis=1).astype(int)
    edges = history_edges(lengths) if edges is None else edges
    labels = _bucketize(lengths, edges)
    rows = np.asarray(batch[f"{QUERY}_{MASK_KEY}"]).shape[1]
    return np.repeat(labels[:, None], rows, axis=1)


def item_counts(
    batches: Iterable[Mapping[str, Any]], spec: FeatureSpec, item_feature: str
) -> dict[str, int]:
    """Real rows (support and query) per value of `item_feature`: how often
    each item was rated in these batches (pass the training members')."""
    counts: dict[str, int] = {}
    for batch in batches:
        for part in (SUPPORT, QUERY):
            mask = np.asarray(batch[f"{part}_{MASK_KEY}"]) > 0
            values = np.asarray(batch[spec.batch_key(part, item_feature)])[mask]
            ids, n = np.unique(values, return_counts=True)
            for value, count in zip(ids, n, strict=True):
                key = value.decode() if isinstance(value, bytes) else str(value)
                counts[key] = counts.get(key, 0) + int(count)
    return counts


def item_popularity_buckets(
    batch: Mapping[str, Any],
    spec: FeatureSpec,
    item_feature: str,
    counts: Mapping[str, int],
    edges: Sequence[int] = ITEM_COUNT_EDGES,
) -> np.ndarray:
    """Per query row `[T, Q]`: the bucket of its item's training-rating count."""
    values = np.asarray(batch[spec.batch_key(QUERY, item_feature)])
    flat = [
        counts.get(v.decode() if isinstance(v, bytes) else str(v), 0)
        for v in values.ravel()
    ]
    return _bucketize(np.asarray(flat).reshape(values.shape), edges)


def with_buckets(batch: Batch, buckets: Mapping[str, np.ndarray]) -> Batch:
    """The batch plus bucket labels `[T, Q]` by name (see `query_metrics`)."""
    out = dict(batch)
    for name, labels in buckets.items():
        out[BUCKET_PREFIX + name] = np.asarray(labels).astype(str)
    return out


def without_buckets(batch: Mapping[str, Any]) -> Batch:
    """The batch a model sees: no bucket labels."""
    return {k: v for k, v in batch.items() if not k.startswith(BUCKET_PREFIX)}


def bucket_order(labels: Iterable[str]) -> list[str]:
    """Bucket labels by their lower bound ("0", "1-4", "5-19", ..., "100+")."""

    def low(label: str) -> tuple[int, float, str]:
        head = str(label).split("-")[0].rstrip("+")
        return (0, float(head), "") if head.isdigit() else (1, 0.0, str(label))

    return sorted(set(labels), key=low)


@dataclasses.dataclass(frozen=True, repr=False)
class QueryRows:
    """The scored real query rows behind a metric: what the report's bootstrap
    over test entities resamples (`tf_limaml.intervals`).

    Attributes:
        entity_id: Each row's entity, [N].
        label: Each row's 0/1 label, [N].
        score: Each row's score, [N].
    """

    entity_id: np.ndarray
    label: np.ndarray
    score: np.ndarray

    def __repr__(self) -> str:
        # Short on purpose: sweeps holding these are printed and logged.
        entities = len(np.unique(self.entity_id))
        return f"QueryRows({self.score.size} rows, {entities} entities)"

    def same_rows(self, other: QueryRows) -> bool:
        """Whether `other` scores the same rows, in the same order."""
        return np.array_equal(self.entity_id, other.entity_id) and np.array_equal(
            self.label, other.label
        )


def query_metrics(
    batch: Mapping[str, Any], probabilities: np.ndarray
) -> dict[str, Any]:
    """Overall AUC, log loss and mean per-member AUC on a batch's real query rows.

    Also "rows": the `QueryRows` scored. With bucket labels in the batch
    (`with_buckets`), also "buckets": {name: {label: overall AUC, log loss,
    mean member AUC, rows, members}}.
    """
    mask = np.asarray(batch[f"{QUERY}_{MASK_KEY}"]) > 0
    labels = np.asarray(batch[f"{QUERY}_{LABEL_KEY}"])[mask]
    scores = np.asarray(probabilities)[mask]
    ids = np.repeat(np.asarray(batch[ENTITY_ID_KEY]), mask.sum(axis=1))
    out = evaluation.summarize(ids, labels, scores)
    out["rows"] = QueryRows(ids, labels, scores)
    buckets = {}
    for key in batch:
        if not key.startswith(BUCKET_PREFIX):
            continue
        names = np.asarray(batch[key])[mask]
        per_bucket = {}
        for name in bucket_order(names):
            rows = names == name
            per_bucket[name] = {
                **evaluation.summarize(ids[rows], labels[rows], scores[rows]),
                "members": int(len(np.unique(ids[rows]))),
            }
        buckets[key[len(BUCKET_PREFIX) :]] = per_bucket
    if buckets:
        out["buckets"] = buckets
    return out


def metrics_entry(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`evaluation.summarize` output under the report's names (and its buckets
    and its `QueryRows`, when `query_metrics` kept them)."""
    out: dict[str, Any] = {
        "overall_auc": float(metrics["auc"]),
        "logloss": float(metrics["loss"]),
        "mean_member_auc": float(metrics["mean_member_auc"]),
    }
    if "rows" in metrics:
        out["rows"] = metrics["rows"]
    if "buckets" in metrics:
        out["buckets"] = {
            name: {
                label: {
                    **metrics_entry(cell),
                    "rows": cell["n_rows"],
                    "members": cell["members"],
                }
                for label, cell in per_bucket.items()
            }
            for name, per_bucket in metrics["buckets"].items()
        }
    return out


def evaluate_sweep(
    score: Callable[[Batch, int | None], np.ndarray],
    test: Batch,
    ks: Sequence[int | None] = SUPPORT_KS,
) -> dict[str, dict[str, float]]:
    """Scores the test members once per support size k.

    Args:
        score: (test batch with support cut to k, k) -> query probabilities [T, Q].
        test: The test task batch (whole support).
        ks: Support sizes; None is all.

    Returns:
        {k label: {"overall_auc", "logloss", "mean_member_auc"}}.
    """
    out = {}
    for k in ks:
        cut = cut_support(test, k)
        out[k_label(k)] = metrics_entry(
            query_metrics(cut, score(without_buckets(cut), k))
        )
    return out


def measurement(
    sweep: Mapping[str, Mapping[str, float]],
    wall_s: float,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A model's per-seed entry of the report: full-support metrics, the sweep, time.

    Each k of the sweep keeps its `QueryRows` ("rows"), for the report's
    intervals; the report does not write them.
    """
    full = {m: x for m, x in sweep["all"].items() if m != "rows"}
    out = {
        **full,
        # Buckets are reported at full support only (the entry's own).
        "support_k": {
            k: {m: x for m, x in v.items() if m != "buckets"} for k, v in sweep.items()
        },
        "wall_s": wall_s,
    }
    if details:
        out["details"] = dict(details)
    return out


class Timer:
    """Wall seconds of a block: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> bool:
        self.seconds = time.perf_counter() - self.start
        return False
