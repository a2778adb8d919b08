"""Meta-training runs: datasets, checkpoints, resume, and the model directory.

A model directory holds:

    config.json      the model's config (spec, meta config, architecture)
    backup/          BackupAndRestore checkpoints while training runs; a
                     re-run with the same directory resumes from the latest
    weights/         the final weights (`load_model` reads them)
    history.json     Keras history of the finished run
    health.json      the health check of the trained model
                     (`tf_limaml.evaluation.health_check`)
    training_args.json  task shapes and options of the run (export reads
                     max_support from it)

Under a multi-worker strategy every worker runs `train` with the same
arguments; the chief writes the model directory, the others write the same
files to a temporary directory they delete (TensorFlow's rule, as
`tf.keras.callbacks.BackupAndRestore` does for the checkpoints).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_limaml import data, distribute, evaluation
from tf_limaml.config import Architecture, MetaConfig
from tf_limaml.errors import TrainingFailedError
from tf_limaml.features import FeatureSpec
from tf_limaml.model import LiMAMLModel
from tf_limaml.optimizers import LazyAdam
from tf_limaml.saving import save_model

logger = logging.getLogger(__name__)

TRAINING_ARGS = "training_args.json"
HEALTH = "health.json"
# Global-norm gradient clipping of the outer step: a guard against one
# exploding meta-batch wrecking the weights, loose enough that ordinary steps
# are untouched.
GRADIENT_CLIPNORM = 10.0
# Task batches scored for the health check when there are no validation tasks.
HEALTH_BATCHES = 8
ON_FAILURE = ("raise", "warn")


def read_training_args(model_dir: str) -> dict[str, Any]:
    """The task shapes and options a model directory was trained with ({} if unknown)."""
    path = os.path.join(str(model_dir), TRAINING_ARGS)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


class NonFiniteLossError(TrainingFailedError):
    """Training produced a non-finite loss."""


class ModelFailedError(TrainingFailedError):
    """Training finished, but the model failed its health check.

    Attributes:
        health: The `evaluation.health_check` result ("healthy", "reasons", ...).
    """

    def __init__(self, message: str, health: Mapping[str, Any]):
        super().__init__(message)
        self.health = dict(health)


def read_health(model_dir: str) -> dict[str, Any]:
    """The health check a model directory was written with ({} if unknown)."""
    path = os.path.join(str(model_dir), HEALTH)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def _final_val_loss(
    history: Mapping[str, Sequence[float]], restored_best: bool
) -> float | None:
    """The val loss of the weights training ends with (None without validation)."""
    losses = list(history.get("val_loss", []))
    if not losses:
        return None
    if restored_best:
        finite = [v for v in losses if np.isfinite(v)]
        return min(finite) if finite else losses[-1]
    return losses[-1]


def check_trained_model(
    model: LiMAMLModel,
    batches: tf.data.Dataset,
    val_loss: float | None = None,
) -> dict[str, Any]:
    """`evaluation.health_check` of a model's adapted query scores on task batches."""
    predictions = evaluation.collect_query_predictions(model, batches, adapt=True)
    return evaluation.health_check(
        predictions["label"], predictions["score"], val_loss=val_loss, name="LiMAML"
    )


class StopOnNonFiniteLoss(tf.keras.callbacks.Callback):
    """Stops training at the first non-finite loss, naming the global step.

    The step is counted from the optimizer's `iterations` as training starts
    (after BackupAndRestore, later in the callback list, has restored it), so
    after a resume it is the step of the whole run, not of this process.

    The last good checkpoint is kept: BackupAndRestore only writes after a
    finite step, and this raises before any later write.
    """

    def __init__(self):
        super().__init__()
        self.step: int | None = None

    def on_train_begin(self, logs=None):
        self.step = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.step is None:
            # Read once, before the first step: a skipped (non-finite) step
            # does not advance `iterations` on one device, so reading it
            # after a step could not tell the two apart.
            self.step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.model.stop_training = True
            entities = getattr(self.model, "nonfinite_entities", [])
            shown = ", ".join(entities[:10]) + (" ..." if len(entities) > 10 else "")
            raise NonFiniteLossError(
                f"Non-finite loss at training step {self.step} (batch {batch} of its "
                f"epoch), entities [{shown}]; that step was not applied and the last "
                "good checkpoint is kept. Lower the learning rate or inner_lr, or check "
                "those entities' rows for extreme values."
            )


def default_model_kwargs() -> dict[str, Any]:
    """The architecture `train` builds by default, as LiMAMLModel keyword arguments."""
    return Architecture().to_dict()


def train(
    tasks: str | Sequence[str],
    spec: FeatureSpec,
    model_dir: str,
    meta_config: MetaConfig | None = None,
    epochs: int = 5,
    batch_tasks: int = 32,
    max_support: int = 32,
    max_query: int = 32,
    seed: int = 0,
    learning_rate: float = 1e-3,
    validation_tasks: str | None = None,
    tensorboard: str | None = None,
    checkpoint_every: int | None = None,
    early_stopping_patience: int | None = None,
    model_kwargs: Architecture | Mapping[str, Any] | None = None,
    verbose: int | str = "auto",
    steps_per_epoch: int | None = None,
    clipnorm: float | None = GRADIENT_CLIPNORM,
    on_failure: str = "raise",
    strategy: tf.distribute.Strategy | str | None = None,
    callbacks: Sequence[tf.keras.callbacks.Callback] | None = None,
    optimizer: Callable[[], tf.keras.optimizers.Optimizer] | None = None,
) -> tuple[LiMAMLModel, dict[str, list[float]]]:
    """Meta-trains a LiMAMLModel on task files and writes the model directory.

    Re-running with the same `model_dir` resumes from the last checkpoint.

    Args:
        tasks: File pattern(s) of training task records.
        spec: The feature spec.
        model_dir: Output (and resume) directory.
        meta_config: Inner-loop options.
        epochs: Passes over the training tasks.
        batch_tasks: T, tasks per meta-batch.
        max_support: S, support rows per task.
        max_query: Q, query rows per task.
        seed: Seeds weights and shuffling.
        learning_rate: Learning rate of the outer step (`LazyAdam`: Adam, with
            sparse updates for embedding tables of more than
            `LiMAMLModel.dense_table_limit` numbers).
        validation_tasks: Optional validation task files.
        tensorboard: Optional TensorBoard log directory.
        checkpoint_every: Checkpoint every N steps (default: every epoch).
        early_stopping_patience: Stop when val loss has not improved for N
            epochs, keeping the best weights (needs validation_tasks).
        model_kwargs: Architecture arguments of LiMAMLModel: an `Architecture`
            or its dict (default: `Architecture()`).
        verbose: Keras verbosity (progress bars by default).
        steps_per_epoch: Meta-batches per epoch (default: every task once,
            counted from the files).
        clipnorm: Global-norm clipping of the outer gradients (None: none).
        on_failure: What to do when the trained model fails its health check
            (`evaluation.health_check` on the validation tasks' adapted query
            scores, or on a few training batches without validation tasks):
            "raise" a ModelFailedError, or "warn" (log and return the model).
            Either way the model directory is written, with `health.json`.
        strategy: A `tf.distribute.Strategy` or its name ("none", "mirrored",
            "multi_worker"; see `tf_limaml.distribute.get_strategy`); None: the
            strategy in scope. `batch_tasks` is the global batch: each of the
            R replicas gets `batch_tasks / R` tasks of every batch (every
            worker reads all task files and keeps its share, auto-shard policy
            DATA), so the step is the one-device step up to rounding.
        callbacks: More Keras callbacks for `fit` (after the checkpointing one).
        optimizer: A function returning the outer optimizer, called in the
            strategy's scope (default: `LazyAdam(learning_rate,
            global_clipnorm=clipnorm)`).

    Returns:
        (model, history).

    Raises:
        ModelFailedError: The model failed its health check (on_failure="raise").
        NonFiniteLossError: A training step had a non-finite loss.
        tf_limaml.distribute.StrategyError: The strategy cannot be built, or
            `batch_tasks` is not a multiple of its replicas.
    """
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    strategy = distribute.get_strategy(strategy)
    replicas = strategy.num_replicas_in_sync
    if batch_tasks % replicas:
        raise distribute.StrategyError(
            f"batch_tasks ({batch_tasks}) must be a multiple of the strategy's "
            f"{replicas} replicas, so that every replica averages as many tasks "
            "and the step is the mean over the batch"
        )
    meta_config = meta_config or MetaConfig()
    if isinstance(model_kwargs, Architecture):
        model_kwargs = model_kwargs.to_dict()
    tf.keras.utils.set_random_seed(seed)
    tf.io.gfile.makedirs(model_dir)
    with strategy.scope():
        model = LiMAMLModel(
            spec, meta_config, **dict(model_kwargs or default_model_kwargs())
        )
        model.compile(
            optimizer=(
                optimizer()
                if optimizer
                else LazyAdam(learning_rate, global_clipnorm=clipnorm)
            )
        )
    if steps_per_epoch is None:
        # A known epoch length lets checkpoints every N steps resume mid-epoch.
        steps_per_epoch = max(math.ceil(data.count_tasks(tasks) / batch_tasks), 1)
    # Every worker reads every file in the same seeded order and keeps its
    # share of each global batch (DATA): the batch is the one-device batch.
    # Sharding by FILE would give each worker other tasks.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    train_ds = data.task_dataset(
        tasks,
        spec,
        batch_tasks,
        max_support,
        max_query,
        shuffle=True,
        seed=seed,
        repeat=True,
    ).with_options(options)
    val_ds = None
    if validation_tasks:
        val_ds = data.task_dataset(
            validation_tasks, spec, batch_tasks, max_support, max_query
        ).with_options(options)
    fit_callbacks: list[tf.keras.callbacks.Callback] = [
        StopOnNonFiniteLoss(),
        # Under MultiWorkerMirroredStrategy the chief writes backup/chief and
        # the others backup/workertemp_<i>; every worker restores from chief.
        tf.keras.callbacks.BackupAndRestore(
            os.path.join(model_dir, "backup"),
            save_freq=checkpoint_every or "epoch",
            delete_checkpoint=True,
        ),
        *(callbacks or ()),
    ]
    if tensorboard:
        fit_callbacks.append(tf.keras.callbacks.TensorBoard(tensorboard))
    if early_stopping_patience and val_ds is not None:
        fit_callbacks.append(
            tf.keras.callbacks.EarlyStopping(
                monitor="val_loss",
                patience=early_stopping_patience,
                restore_best_weights=True,
            )
        )
    # Only the chief writes the model directory (see the module docstring).
    with distribute.write_dir(model_dir, strategy) as out_dir:
        with tf.io.gfile.GFile(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(model.get_config(), f, indent=2)
        # The task shapes training used; export defaults its support limit to them.
        with tf.io.gfile.GFile(os.path.join(out_dir, TRAINING_ARGS), "w") as f:
            json.dump(
                {
                    "batch_tasks": batch_tasks,
                    "max_support": max_support,
                    "max_query": max_query,
                    "epochs": epochs,
                    "seed": seed,
                    "learning_rate": learning_rate,
                },
                f,
                indent=2,
            )
        logger.info(
            "Meta-training %s for %d epochs into %s", meta_config, epochs, model_dir
        )
        history = model.fit(
            train_ds,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_ds,
            callbacks=fit_callbacks,
            verbose=verbose,
        )
        save_model(model, out_dir)
        record = {k: [float(x) for x in v] for k, v in history.history.items()}
        with tf.io.gfile.GFile(os.path.join(out_dir, "history.json"), "w") as f:
            json.dump(record, f, indent=2)
        if val_ds is not None:
            check_batches = val_ds
        else:
            check_batches = data.task_dataset(
                tasks, spec, batch_tasks, max_support, max_query
            ).take(HEALTH_BATCHES)
        restored = bool(early_stopping_patience and val_ds is not None)
        health = check_trained_model(
            model, check_batches, _final_val_loss(record, restored)
        )
        health["checked_on"] = (
            "validation tasks"
            if val_ds is not None
            else (f"the first {HEALTH_BATCHES} training batches")
        )
        with tf.io.gfile.GFile(os.path.join(out_dir, HEALTH), "w") as f:
            json.dump(health, f, indent=2)
        if not health["healthy"]:
            message = (
                f"The trained model in {model_dir} failed its health check on "
                f"{health['checked_on']}: {'; '.join(health['reasons'])}. Lower the "
                "learning rate or inner_lr, check the features' scales (spec.json "
                "means/stds), or look at the data for a label that is constant."
            )
            if on_failure == "raise":
                raise ModelFailedError(message, health)
            logger.warning("%s", message)
        return model, record
