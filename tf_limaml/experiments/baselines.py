"""Baselines beside LiMAML, with the same network, features and protocol.

Every model here is built from the blocks of `LiMAMLModel` (the same meta
block and global block), so a difference in the numbers comes from how the
network is trained and personalized, not from its size:

| name | how it is trained | what it knows of a test member |
| --- | --- | --- |
| `global` | conventionally, on rows | meta features only |
| `id_embedding` | conventionally, plus a member-ID embedding and bias (wide & deep) | its ID, learned from its support rows |
| `finetune` | = `global`, then SGD on the meta block per member | its support set (lr and steps chosen on val members) |
| `maml` | MAML on every dense weight (`MetaConfig(adapt="all")`) | its support set |
| `limaml` | MAML on the meta block only | its support set |

The protocol (`Protocol`): members are split train/val/test by a stable hash;
the conventional models train on the train members' rows and the val and test
members' support rows; the meta-learned ones on the train members' tasks;
everything is scored on the test members' query rows, again with each test
member's support cut to its latest k rows (`cut_support`).

Task batches are dicts of NumPy arrays with the keys of
`tf_limaml.data.parse_task_batch`, one batch per split (`task_batch`).

Example:

    records = baselines.records_from_histories(histories, spec)
    test = baselines.task_batch(records["test"], spec)
    base = baselines.new_model(spec, seed=0)
    model = baselines.PointwiseModel(base)
    baselines.fit_pointwise(model, baselines.training_rows(train, val, test, spec), ...)
    probs = baselines.query_probabilities(base, test, steps=0)
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_limaml import data as task_data
from tf_limaml import evaluation
from tf_limaml.features import (
    ENTITY_ID_KEY,
    LABEL_KEY,
    MASK_KEY,
    QUERY,
    SUPPORT,
    FeatureSpec,
)
from tf_limaml.model import LiMAMLModel, MetaConfig
from tf_limaml.tasks import SPLITS, assign_split
from tf_limaml.training import GRADIENT_CLIPNORM

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
MODEL_NAMES = ("global", "id_embedding", "finetune", "maml", "limaml", "limaml_offline")
# Support sizes of the sweep; None is the member's whole support set.
SUPPORT_KS: tuple[int | None, ...] = (1, 3, 5, 10, None)
# Grid of the fine-tuning baseline's inner learning rate and steps (chosen on val).
FINETUNE_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
FINETUNE_STEPS = (1, 3, 5, 10)
# Starting points of the meta-learners (`Recipe.warm_start`).
WARM_STARTS = ("pretrain", "global")


def k_label(k: int | None) -> str:
    """ "all" for the whole support set, else the number: the report's key."""
    return "all" if k is None else str(k)


# ----------------------------------------------------------------- protocol
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

    def describe(self) -> dict[str, Any]:
        """The protocol as the JSON of `report.json`."""
        return {
            "order": "each member's interactions sorted by (timestamp, item id), stable; "
            "rows still tied are ordered by content",
            "split": f"{self.split_rule}: support is the earlier part, query the later",
            "members": (
                f"train/val/test {1 - self.val_fraction - self.test_fraction:.0%}/"
                f"{self.val_fraction:.0%}/{self.test_fraction:.0%} by SHA-256 of "
                f"(seed {self.split_seed}, member id)"
            ),
            "conventional_training_rows": "train members' support and query, plus val "
            "and test members' support",
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


# ------------------------------------------------------------ task records
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
        raise ValueError(
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


# ------------------------------------------------------------------ models
@dataclasses.dataclass(frozen=True)
class Architecture:
    """The network every model shares (the arguments of LiMAMLModel)."""

    meta_units: tuple[int, ...] = (32, 16)
    global_units: tuple[int, ...] = (64, 32)
    cross_layers: int = 1
    projection_dim: int | None = None
    interaction: str = "product"
    l2: float = 0.0

    def kwargs(self) -> dict[str, Any]:
        return {
            "meta_units": list(self.meta_units),
            "global_units": list(self.global_units),
            "cross_layers": self.cross_layers,
            "projection_dim": self.projection_dim,
            "interaction": self.interaction,
            "l2": self.l2,
        }


def new_model(
    spec: FeatureSpec,
    meta_config: MetaConfig | None = None,
    architecture: Architecture | None = None,
    seed: int = 0,
    model_class: type[LiMAMLModel] = LiMAMLModel,
    **extra,
) -> LiMAMLModel:
    """A freshly initialized LiMAMLModel, its weights seeded by `seed`."""
    tf.keras.utils.set_random_seed(seed)
    architecture = architecture or Architecture()
    meta_config = meta_config or MetaConfig(inner_steps=0, jit_compile=True)
    return model_class(spec, meta_config, **architecture.kwargs(), **extra)


@tf.keras.utils.register_keras_serializable(package="tf_limaml")
class FineTuneModel(LiMAMLModel):
    """A LiMAMLModel whose scalar inner learning rate is a variable.

    The fine-tuning baseline searches the inner lr on val members; as a
    (non-trainable) variable it changes without retracing the inner loop.
    Training ignores it: conventional training runs no inner loop. Set it with
    `finetune_lr.assign(lr)`; the `inner_lr` hook gives it to every adapted
    weight (plain SGD).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.meta_config.learn_inner_lr:
            raise ValueError(
                "FineTuneModel has one scalar inner lr; build it with "
                "MetaConfig(learn_inner_lr=False)"
            )
        self.finetune_lr = self.add_weight(
            name="finetune_lr",
            shape=(),
            trainable=False,
            initializer=tf.keras.initializers.Constant(self.meta_config.inner_lr),
        )

    def inner_lr(self, name: str, config: MetaConfig | None = None) -> tf.Variable:
        return self.finetune_lr


class PointwiseModel(tf.keras.Model):
    """A LiMAMLModel's network trained conventionally, one row at a time.

    Without `members` it is the **global** baseline: the meta block sees only
    the meta features, and there is no inner loop. With `members` it is the
    **ID-embedding** (wide & deep) baseline: a learned per-member vector is
    added to the meta embedding (so it meets the item side exactly where the
    adapted meta embedding of LiMAML does) and a per-member bias to the logit.
    Both start at zero, so an unseen member scores like the global model.

    Args:
        base: The LiMAMLModel whose meta and global blocks are trained.
        members: Member ids that get an embedding (None: none).
        id_l2: L2 penalty on the member vectors and biases.

    Inputs: rows encoded by `encode_rows`. Output: logits `[B]`.
    """

    def __init__(
        self,
        base: LiMAMLModel,
        members: Sequence[str] | None = None,
        id_l2: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.base = base
        self.members = tuple(members) if members is not None else ()
        if not isinstance(id_l2, (int, float)) or id_l2 < 0:
            raise ValueError(f"`id_l2` must be a number >= 0, got {id_l2!r}")
        self.id_l2 = float(id_l2)
        self.member_lookup = None
        if self.members:
            self.member_lookup = tf.keras.layers.StringLookup(
                vocabulary=list(self.members),
                num_oov_indices=1,
                mask_token=None,
                name="member_lookup",
            )
            regularizer = tf.keras.regularizers.l2(self.id_l2) if self.id_l2 else None
            self.member_embedding = tf.keras.layers.Embedding(
                len(self.members) + 1,
                base.meta_dim,
                embeddings_initializer="zeros",
                embeddings_regularizer=regularizer,
                name="member_embedding",
            )
            self.member_bias = tf.keras.layers.Embedding(
                len(self.members) + 1,
                1,
                embeddings_initializer="zeros",
                embeddings_regularizer=regularizer,
                name="member_bias",
            )
            self.member_embedding.build((None,))
            self.member_bias.build((None,))

    @property
    def metrics(self):
        # Only the compiled loss and metrics: the base model's own trackers
        # (loss, query_loss, ...) are never updated here and would shadow
        # the compiled `loss` in the logs and in early stopping.
        metrics = []
        if self._is_compiled:
            if self.compiled_loss is not None:
                metrics += self.compiled_loss.metrics
            if self.compiled_metrics is not None:
                metrics += self.compiled_metrics.metrics
        return metrics

    def encode_rows(self, rows: Mapping[str, Any]) -> dict[str, tf.Tensor]:
        """Raw rows (or tasks) -> numeric inputs; runs the string ops once, eagerly."""
        spec = self.base.spec
        encoded = {
            "meta": self.base.meta_block.encode(
                {f.name: rows[f.name] for f in spec.meta_features}
            ),
            "request": self.base.global_block.encode(
                {f.name: rows[f.name] for f in spec.request_features}
            ),
        }
        if self.member_lookup is not None:
            encoded["member"] = tf.cast(
                self.member_lookup(rows[ENTITY_ID_KEY]), tf.int32
            )
        return encoded

    def call(self, encoded: Mapping[str, Any], training: bool = False) -> tf.Tensor:
        # Rows [B] or tasks [T, Q]: the leading axis is the meta block's batch.
        first = next(iter(encoded["request"].values()))
        embedding = self.base.meta_block.call(
            encoded["meta"], batch_size=tf.shape(first)[0]
        )
        bias = None
        if self.member_lookup is not None:
            embedding = embedding + self.member_embedding(encoded["member"])
            bias = self.member_bias(encoded["member"])[:, 0]
        logits = self.base.global_block.call(embedding, encoded["request"])
        if bias is not None:
            logits = logits + (bias[:, None] if logits.shape.rank == 2 else bias)
        return logits

    def task_probabilities(self, batch: Mapping[str, Any]) -> np.ndarray:
        """Query probabilities `[T, Q]` of a task batch (support is not used)."""
        spec = self.base.spec
        rows = {ENTITY_ID_KEY: batch[ENTITY_ID_KEY]}
        rows.update({f.name: batch[f.name] for f in spec.meta_features})
        rows.update(
            {
                f.name: batch[spec.batch_key(QUERY, f.name)]
                for f in spec.request_features
            }
        )
        return tf.sigmoid(self(self.encode_rows(rows))).numpy()


def _row_dataset(
    model: PointwiseModel,
    rows: Mapping[str, np.ndarray],
    batch_size: int,
    shuffle: bool,
    seed: int,
) -> tf.data.Dataset:
    encoded = model.encode_rows(rows)
    labels = tf.constant(rows[LABEL_KEY], tf.float32)
    dataset = tf.data.Dataset.from_tensor_slices((encoded, labels))
    if shuffle:
        dataset = dataset.shuffle(
            int(labels.shape[0]), seed=seed, reshuffle_each_iteration=True
        )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def fit_pointwise(
    model: PointwiseModel,
    train_rows: Mapping[str, np.ndarray],
    val_rows: Mapping[str, np.ndarray] | None = None,
    epochs: int = 10,
    batch_size: int = 512,
    learning_rate: float = 1e-3,
    patience: int = 2,
    seed: int = 0,
    verbose: int | str = 0,
) -> dict[str, list[float]]:
    """Trains a PointwiseModel with binary cross-entropy, early stopping on val loss.

    Returns:
        The Keras history.
    """
    tf.keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(
            learning_rate, global_clipnorm=GRADIENT_CLIPNORM
        ),
        loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
        # Measured: for this small network XLA's compile time costs
        # more than it saves (2x the CPU time over a 3-epoch fit).
        jit_compile=False,
    )
    train_ds = _row_dataset(model, train_rows, batch_size, True, seed)
    val_ds = (
        None if val_rows is None else _row_dataset(model, val_rows, 4096, False, seed)
    )
    return _fit(model, train_ds, val_ds, epochs, patience, [], verbose)


def _fit(
    model: tf.keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset | None,
    epochs: int,
    patience: int,
    callbacks: Sequence[tf.keras.callbacks.Callback],
    verbose: int | str,
) -> dict[str, list[float]]:
    """`model.fit`, early-stopped on validation loss when there is a validation set."""
    callbacks = list(callbacks)
    if val_ds is not None:
        callbacks.append(
            tf.keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=patience, restore_best_weights=True
            )
        )
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        callbacks=callbacks,
        verbose=verbose,
    )
    return {k: [float(x) for x in v] for k, v in history.history.items()}


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


def _task_dataset(
    batch: Batch,
    batch_tasks: int,
    shuffle: bool,
    seed: int,
    drop_remainder: bool,
    support_cut: float = 0.0,
) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensor_slices(dict(batch))
    if shuffle:
        dataset = dataset.shuffle(
            len(batch[ENTITY_ID_KEY]), seed=seed, reshuffle_each_iteration=True
        )
    if support_cut:
        dataset = dataset.map(lambda t: random_support_cut(t, support_cut, seed))
    return dataset.batch(batch_tasks, drop_remainder=drop_remainder).prefetch(
        tf.data.AUTOTUNE
    )


def warm_start(model: LiMAMLModel, source: LiMAMLModel) -> None:
    """Copies the meta and global blocks' weights of `source` (same architecture)."""
    for name in ("meta_block", "global_block"):
        target, origin = getattr(model, name), getattr(source, name)
        shapes = [w.shape for w in target.get_weights()]
        if shapes != [w.shape for w in origin.get_weights()]:
            raise ValueError(
                f"Cannot warm-start: the {name} of the two models differ "
                f"({shapes} vs {[w.shape for w in origin.get_weights()]}); "
                "build both with the same Architecture and spec."
            )
        target.set_weights(origin.get_weights())


def meta_train(
    model: LiMAMLModel,
    train: Batch,
    val: Batch | None = None,
    epochs: int = 20,
    batch_tasks: int = 32,
    learning_rate: float = 1e-3,
    patience: int = 3,
    seed: int = 0,
    verbose: int | str = 0,
    support_cut: float = 0.0,
    callbacks: Sequence[tf.keras.callbacks.Callback] = (),
) -> dict[str, list[float]]:
    """Meta-trains a LiMAMLModel on in-memory task batches (`Model.fit`).

    Meta-batches have a fixed size (the last partial one is dropped) so the
    XLA-compiled step compiles once. With `val`, training stops when the
    adapted val query loss has not improved for `patience` epochs, keeping
    the best weights.

    Args:
        model: The LiMAMLModel (fresh, or warm-started with `warm_start`).
        train: Training task batch.
        val: Val task batch, for early stopping (None: no early stopping).
        epochs: Most passes over the training tasks.
        batch_tasks: Tasks per meta-batch.
        learning_rate: Adam learning rate of the outer step.
        patience: Epochs without a better val loss before stopping.
        seed: Seeds shuffling and support cuts.
        verbose: Keras verbosity (1: progress bars).
        support_cut: Share of training tasks whose support is cut to a random
            latest-k window each time they are drawn (`random_support_cut`).
        callbacks: More Keras callbacks.

    Returns:
        The Keras history.
    """
    tf.keras.utils.set_random_seed(seed)
    batch_tasks = min(batch_tasks, len(train[ENTITY_ID_KEY]))
    model.compile(
        optimizer=tf.keras.optimizers.Adam(
            learning_rate, global_clipnorm=GRADIENT_CLIPNORM
        )
    )
    train_ds = _task_dataset(
        train, batch_tasks, True, seed, drop_remainder=True, support_cut=support_cut
    )
    val_ds = (
        None
        if val is None
        else _task_dataset(val, len(val[ENTITY_ID_KEY]), False, seed, False)
    )
    return _fit(model, train_ds, val_ds, epochs, patience, callbacks, verbose)


# -------------------------------------------------------------- inference
# Per model, dropped with it (an id() could be reused by a successor model).
_QUERY_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _query_function(
    model: LiMAMLModel,
    steps: int,
    inner_lr: float | None,
    support_prior: float | None = None,
) -> Callable:
    """A cached tf.function scoring query rows after `steps` inner steps.

    Keyed by the model's config too (its values are read while tracing). No
    XLA: the encode step has string ops. No autograph: the model's inner loop
    is plain Python over a static step count, and converting it would re-read
    the model's source from disk.
    """
    cache = _QUERY_FUNCTIONS.setdefault(model, {})
    key = (model.meta_config, steps, inner_lr, support_prior)
    if key not in cache:

        def probabilities(batch):
            logits, _ = model.compute_query_logits(
                batch, steps, inner_lr=inner_lr, support_prior=support_prior
            )
            return tf.sigmoid(logits)

        cache[key] = tf.function(probabilities, reduce_retracing=True, autograph=False)
    return cache[key]


def query_probabilities(
    model: LiMAMLModel,
    batch: Mapping[str, Any],
    steps: int | None = None,
    inner_lr: float | None = None,
    chunk: int = 128,
    support_prior: float | None = None,
) -> np.ndarray:
    """Query probabilities `[T, Q]`, adapted on each task's (masked) support.

    Args:
        model: A LiMAMLModel.
        batch: A task batch (cut its support with `cut_support`).
        steps: Inner steps (default the model's; 0: no adaptation).
        inner_lr: Scalar inner learning rate instead of the model's (for the
            fine-tuning baseline; learned rates, when the model has them, win).
        chunk: Tasks per call, to bound memory.
        support_prior: `MetaConfig.support_prior` instead of the model's (the
            test-time knobs of `limaml tune`).
    """
    steps = model.meta_config.inner_steps if steps is None else steps
    if inner_lr is not None and isinstance(model, FineTuneModel):
        model.finetune_lr.assign(float(inner_lr))
        inner_lr = None
    inner_lr = None if inner_lr is None else float(inner_lr)
    support_prior = None if support_prior is None else float(support_prior)
    fn = _query_function(model, steps, inner_lr, support_prior)
    n = len(batch[ENTITY_ID_KEY])
    out = []
    for start in range(0, n, chunk):
        part = {k: v[start : start + chunk] for k, v in batch.items()}
        out.append(fn(part).numpy())
    return np.concatenate(out)


def query_metrics(
    batch: Mapping[str, Any], probabilities: np.ndarray
) -> dict[str, Any]:
    """Overall AUC, log loss and mean per-member AUC on a batch's real query rows."""
    mask = np.asarray(batch[f"{QUERY}_{MASK_KEY}"]) > 0
    labels = np.asarray(batch[f"{QUERY}_{LABEL_KEY}"])[mask]
    scores = np.asarray(probabilities)[mask]
    ids = np.repeat(np.asarray(batch[ENTITY_ID_KEY]), mask.sum(axis=1))
    return evaluation.summarize(ids, labels, scores)


def choose_finetune(
    model: LiMAMLModel,
    val: Batch,
    lrs: Sequence[float] = FINETUNE_LRS,
    steps: Sequence[int] = FINETUNE_STEPS,
) -> tuple[dict[str, Any], list]:
    """Picks the fine-tuning baseline's inner lr and steps by val overall AUC.

    Steps 0 (no fine-tuning, i.e. the global model) is always a candidate, so
    where every lr hurts on val, fine-tuning falls back to not adapting.

    Args:
        model: The trained global model (a FineTuneModel searches fastest).
        val: Val task batch, its support cut as the test support will be.
        lrs: Inner learning rates to try.
        steps: Inner steps to try.

    Returns:
        (best {"inner_lr", "steps", "auc", "loss"}, every grid point measured).
    """
    grid = []
    plain = query_metrics(val, query_probabilities(model, val, 0))
    grid.append(
        {"inner_lr": 0.0, "steps": 0, "auc": plain["auc"], "loss": plain["loss"]}
    )
    for step in steps:
        for lr in lrs:
            metrics = query_metrics(val, query_probabilities(model, val, step, lr))
            grid.append(
                {
                    "inner_lr": lr,
                    "steps": step,
                    "auc": metrics["auc"],
                    "loss": metrics["loss"],
                }
            )
    best = max(grid, key=lambda g: (g["auc"], -g["loss"]))
    logger.info(
        "Fine-tuning: inner_lr=%s, steps=%d chosen on val (AUC %.4f)",
        best["inner_lr"],
        best["steps"],
        best["auc"],
    )
    return best, grid


class Timer:
    """Wall seconds of a block: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> bool:
        self.seconds = time.perf_counter() - self.start
        return False


# ---------------------------------------------------------------- recipes
@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every training choice of the comparison (tuned on ML-100K's val members).

    Attributes:
        architecture: The network all models share.
        epochs: Most epochs of conventional training (early stopping on val).
        batch_size: Rows per step of conventional training.
        learning_rate: Adam learning rate of conventional training.
        patience: Early-stopping patience (epochs) of conventional training.
        id_l2: L2 penalty on member vectors and biases (ID-embedding baseline).
        pretrain_epochs: Epochs of the meta-learners' pretraining: the network
            with a member-ID embedding, on the train members' rows only (then
            the IDs are dropped). 0 starts meta-training from scratch.
        inner_steps: Inner steps of LiMAML and MAML.
        inner_lr: Inner learning rate (the initial one if learned).
        learn_inner_lr: Meta-SGD per-parameter inner learning rates.
        first_order: First-order MAML.
        support_prior: c of `experimental.prototypes.ShrunkSupportModel` (0:
            the library's LiMAMLModel, unchanged).
        support_half_life: Recency weighting of the inner-loop support loss
            (`experimental.prototypes.ShrunkSupportModel`): a row's weight
            halves every this many rows back in time. None weights rows equally.
        support_cut: Share of meta-training tasks whose support is cut to a
            random latest-k window.
        freeze_request_embeddings: Keep the pretrained item/genre embedding
            tables fixed while meta-training.
        freeze_global_block: Keep the whole pretrained global block fixed
            while meta-training (only the meta block and inner rates learn).
        meta_epochs: Most meta-training epochs (early stopping on val).
        meta_batch_tasks: Tasks per meta-batch.
        meta_learning_rate: Adam learning rate of the outer step.
        meta_patience: Early-stopping patience of meta-training.
        finetune_lrs: Inner learning rates the fine-tuning baseline tries.
        finetune_steps: Inner steps the fine-tuning baseline tries.
        warm_start: What the meta-learners start from: "pretrain" (the
            member-ID pretraining, `pretrain`) or "global" (the trained global
            baseline of the same seed). With "global", meta_epochs=0 and
            inner_steps=0, LiMAML scores exactly as the global model does:
            the fallback `limaml tune` always keeps.
        adapt_inner_steps: Inner steps when scoring and exporting, if not
            `inner_steps` (test-time knobs chosen on val by `limaml tune`).
        adapt_inner_lr: Inner learning rate when scoring and exporting, if
            not `inner_lr`.
        adapt_support_prior: Support prior when scoring and exporting, if
            not `support_prior`.
    """

    architecture: Architecture = Architecture()
    epochs: int = 15
    batch_size: int = 1024
    learning_rate: float = 1e-3
    patience: int = 2
    id_l2: float = 0.0
    pretrain_epochs: int = 8
    inner_steps: int = 1
    inner_lr: float = 0.2
    learn_inner_lr: bool = False
    first_order: bool = True
    support_prior: float = 10.0
    support_half_life: float | None = None
    support_cut: float = 0.5
    freeze_request_embeddings: bool = True
    freeze_global_block: bool = False
    meta_epochs: int = 20
    meta_batch_tasks: int = 32
    meta_learning_rate: float = 1e-3
    meta_patience: int = 3
    finetune_lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)
    finetune_steps: tuple[int, ...] = (1, 3, 10)
    warm_start: str = "pretrain"
    adapt_inner_steps: int | None = None
    adapt_inner_lr: float | None = None
    adapt_support_prior: float | None = None

    def __post_init__(self):
        if self.warm_start not in WARM_STARTS:
            raise ValueError(
                f"Recipe.warm_start must be one of {WARM_STARTS}, got "
                f"{self.warm_start!r}"
            )
        for name in ("meta_epochs", "pretrain_epochs", "inner_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"Recipe.{name} must be an integer >= 0, got {value!r}"
                )

    def meta_config(self, adapt: str = "meta_block") -> MetaConfig:
        return MetaConfig(
            inner_steps=self.inner_steps,
            inner_lr=self.inner_lr,
            learn_inner_lr=self.learn_inner_lr,
            first_order=self.first_order,
            adapt=adapt,
            jit_compile=True,
        )

    def adaptation(self) -> dict[str, Any]:
        """The MetaConfig changes that turn the trained model into the scored
        (and exported) one: the test-time knobs, where set."""
        changes = {
            "inner_steps": self.adapt_inner_steps,
            "inner_lr": self.adapt_inner_lr,
            "support_prior": self.adapt_support_prior,
        }
        return {k: v for k, v in changes.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["architecture"] = dataclasses.asdict(self.architecture)
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Recipe:
        """The inverse of `to_dict` (lists become tuples).

        Raises:
            ValueError: A key that is not a Recipe field.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - fields)
        if unknown:
            raise ValueError(
                f"Unknown recipe field(s) {unknown}; expected some of {sorted(fields)}"
            )
        values = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in obj.items()
            if k != "architecture"
        }
        if "architecture" in obj:
            values["architecture"] = Architecture(
                **{
                    k: tuple(v) if isinstance(v, list) else v
                    for k, v in obj["architecture"].items()
                }
            )
        return cls(**values)

    @classmethod
    def fast(cls) -> Recipe:
        """A quicker recipe (`limaml demo --fast`, tests): fewer epochs, smaller grid."""
        return cls(
            epochs=6,
            pretrain_epochs=4,
            meta_epochs=6,
            finetune_lrs=(0.01, 0.1),
            finetune_steps=(1, 3),
        )


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


def metrics_entry(metrics: Mapping[str, Any]) -> dict[str, float]:
    """`evaluation.summarize` output under the report's names."""
    return {
        "overall_auc": float(metrics["auc"]),
        "logloss": float(metrics["loss"]),
        "mean_member_auc": float(metrics["mean_member_auc"]),
    }


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
        out[k_label(k)] = metrics_entry(query_metrics(cut, score(cut, k)))
    return out


def measurement(
    sweep: Mapping[str, Mapping[str, float]],
    wall_s: float,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A model's per-seed entry of the report: full-support metrics, the sweep, time."""
    full = sweep["all"]
    out = {
        **full,
        "support_k": {k: dict(v) for k, v in sweep.items()},
        "wall_s": wall_s,
    }
    if details:
        out["details"] = dict(details)
    return out


def train_global(
    spec: FeatureSpec, splits: Splits, recipe: Recipe, seed: int, verbose: int | str = 0
) -> tuple[FineTuneModel, dict[str, list[float]]]:
    """The global baseline: rows of train members plus val/test members' support.

    Returns:
        (the trained LiMAMLModel-shaped network, the Keras history). It is a
        FineTuneModel, so the fine-tuning baseline adapts it directly.
    """
    base = new_model(
        spec,
        MetaConfig(inner_steps=0, inner_lr=0.0, jit_compile=False),
        recipe.architecture,
        seed=seed,
        model_class=FineTuneModel,
    )
    model = PointwiseModel(base)
    history = fit_pointwise(
        model,
        training_rows(splits.train, splits.val, splits.test, spec),
        flatten(splits.val, spec, (QUERY,)),
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        patience=recipe.patience,
        seed=seed,
        verbose=verbose,
    )
    return base, history


def train_id_embedding(
    spec: FeatureSpec,
    splits: Splits,
    recipe: Recipe,
    seed: int,
    k: int | None = None,
    verbose: int | str = 0,
) -> tuple[PointwiseModel, dict[str, list[float]]]:
    """The ID-embedding baseline, trained seeing the latest k support rows of
    each val and test member (all rows of train members).

    Early stopping reads the val members' query loss, their IDs learned from
    their k support rows, as the test members' are.
    """
    base = new_model(
        spec,
        MetaConfig(inner_steps=0, inner_lr=0.0, jit_compile=False),
        recipe.architecture,
        seed=seed,
    )
    model = PointwiseModel(
        base, members=splits.members("train", "val", "test"), id_l2=recipe.id_l2
    )
    history = fit_pointwise(
        model,
        training_rows(splits.train, splits.val, splits.test, spec, k),
        flatten(splits.val, spec, (QUERY,)),
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        patience=recipe.patience,
        seed=seed,
        verbose=verbose,
    )
    return model, history


def pretrain(
    spec: FeatureSpec, splits: Splits, recipe: Recipe, seed: int, verbose: int | str = 0
) -> LiMAMLModel:
    """The meta-learners' starting point: the network trained on the train
    members' rows with their member-ID embeddings, for a fixed number of epochs.

    The IDs soak up each member's rating bias, so the shared item and meta
    parts learn item quality rather than who rated the item; the IDs are then
    dropped. Only train members are seen: val and test members stay new.
    """
    base = new_model(
        spec,
        MetaConfig(inner_steps=0, inner_lr=0.0, jit_compile=False),
        recipe.architecture,
        seed=seed,
    )
    model = PointwiseModel(base, members=splits.members("train"), id_l2=recipe.id_l2)
    fit_pointwise(
        model,
        flatten(splits.train, spec, (SUPPORT, QUERY)),
        None,
        epochs=recipe.pretrain_epochs,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        seed=seed,
        verbose=verbose,
    )
    return base


def new_meta_learner(
    spec: FeatureSpec, recipe: Recipe, seed: int, adapt: str = "meta_block"
) -> LiMAMLModel:
    """LiMAML (adapt="meta_block") or full MAML (adapt="all") with the recipe's options."""
    config = recipe.meta_config(adapt)
    if recipe.support_half_life is not None:
        # Recency weighting is still a prototype (tf_limaml.experimental).
        from tf_limaml.experimental import prototypes  # noqa: PLC0415

        return new_model(
            spec,
            config,
            recipe.architecture,
            seed=seed,
            model_class=prototypes.ShrunkSupportModel,
            support_prior=recipe.support_prior,
            support_half_life=recipe.support_half_life,
        )
    config = dataclasses.replace(config, support_prior=float(recipe.support_prior))
    return new_model(spec, config, recipe.architecture, seed=seed)


def train_meta_learner(
    spec: FeatureSpec,
    splits: Splits,
    recipe: Recipe,
    seed: int,
    adapt: str = "meta_block",
    init: LiMAMLModel | None = None,
    verbose: int | str = 0,
    callbacks: Sequence[tf.keras.callbacks.Callback] = (),
) -> tuple[LiMAMLModel, dict[str, list[float]]]:
    """Meta-trains LiMAML or MAML on the train members' tasks.

    Args:
        spec: The feature spec.
        splits: The task batches.
        recipe: Training choices.
        seed: Weights, shuffling and support cuts.
        adapt: "meta_block" (LiMAML) or "all" (full-network MAML).
        init: A network to start from (`pretrain`, or the global model when
            `recipe.warm_start` is "global"), or None.
        verbose: Keras verbosity.
        callbacks: More Keras callbacks.

    Returns:
        (model, Keras history).
    """
    model = new_meta_learner(spec, recipe, seed, adapt)
    if init is not None:
        warm_start(model, init)
    if recipe.freeze_global_block:
        model.global_block.trainable = False
    elif recipe.freeze_request_embeddings:
        model.global_block.embedding.trainable = False
    history = {}
    if recipe.meta_epochs > 0:
        history = meta_train(
            model,
            splits.train_meta,
            splits.val_meta,
            epochs=recipe.meta_epochs,
            batch_tasks=recipe.meta_batch_tasks,
            learning_rate=recipe.meta_learning_rate,
            patience=recipe.meta_patience,
            seed=seed,
            verbose=verbose,
            support_cut=recipe.support_cut,
            callbacks=callbacks,
        )
    if recipe.adaptation():
        # The test-time knobs: scoring and the export read the model's config.
        model.meta_config = model.with_meta_config(**recipe.adaptation())
    return model, history


def finetune_sweep(
    model: FineTuneModel,
    splits: Splits,
    recipe: Recipe,
    ks: Sequence[int | None] = SUPPORT_KS,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """The fine-tuning baseline at every k, lr and steps chosen on val per k.

    Val members' support is cut to k as the test members' is, so each
    support size gets the inner lr and steps that suit it.

    Returns:
        (sweep {k: metrics}, chosen {k: {"inner_lr", "steps", "val_auc"}}).
    """
    sweep, chosen = {}, {}
    for k in ks:
        best, _ = choose_finetune(
            model,
            cut_support(splits.val, k),
            recipe.finetune_lrs,
            recipe.finetune_steps,
        )
        cut = cut_support(splits.test, k)
        probabilities = query_probabilities(model, cut, best["steps"], best["inner_lr"])
        sweep[k_label(k)] = metrics_entry(query_metrics(cut, probabilities))
        chosen[k_label(k)] = {
            "inner_lr": best["inner_lr"],
            "steps": best["steps"],
            "val_auc": round(best["auc"], 4),
        }
    return sweep, chosen
