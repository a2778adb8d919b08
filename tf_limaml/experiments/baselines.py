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

The protocol they are compared under is in `protocol` (`Protocol`, `Splits`,
the support-size sweep); the training choices in `recipes` (`Recipe`).

Example:

    from tf_limaml.experiments import baselines
    from tf_limaml.experiments.protocol import Protocol, Splits
    from tf_limaml.experiments.recipes import Recipe

    splits = Splits.from_records(records, spec, Protocol())
    recipe = Recipe.fast()
    base, _ = baselines.train_global(spec, splits, recipe, seed=0)
    limaml, _ = baselines.train_meta_learner(spec, splits, recipe, seed=0, init=base)
    probs = baselines.query_probabilities(limaml, splits.test)
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_limaml.config import AdaptOptions, MetaConfig
from tf_limaml.experiments.protocol import (
    SUPPORT_KS,
    Batch,
    Splits,
    cut_support,
    flatten,
    k_label,
    metrics_entry,
    query_metrics,
    random_support_cut,
    training_rows,
    without_buckets,
)
from tf_limaml.experiments.recipes import Architecture, Recipe
from tf_limaml.features import ENTITY_ID_KEY, LABEL_KEY, QUERY, SUPPORT, FeatureSpec
from tf_limaml.model import LiMAMLModel
from tf_limaml.sequence import SequenceMetaBlock
from tf_limaml.tracing import quiet_planned_retracing
from tf_limaml.training import GRADIENT_CLIPNORM

logger = logging.getLogger(__name__)

# Grid of the fine-tuning baseline's inner learning rate and steps (chosen on val).
FINETUNE_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
FINETUNE_STEPS = (1, 3, 5, 10)


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


def warm_start(
    model: LiMAMLModel,
    source: LiMAMLModel,
    blocks: Sequence[str] = ("meta_block", "global_block"),
) -> None:
    """Copies the named blocks' weights of `source` (same architecture)."""
    for name in blocks:
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


# Per model, dropped with it (an id() could be reused by a successor model).
_QUERY_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# Each knob setting is its own tf.function by design (tune and the fine-tuning
# search score dozens), each traced once.
quiet_planned_retracing("_query_function.<locals>")


def _relaxed_signature(batch: Mapping[str, Any]) -> dict[str, tf.TensorSpec]:
    """Every column of a task batch with its rank and dtype, any size: one trace
    serves every support size and chunk."""

    def spec(value: Any) -> tf.TensorSpec:
        array = np.asarray(value)
        dtype = tf.string if array.dtype.kind in "OSU" else tf.as_dtype(array.dtype)
        return tf.TensorSpec([None] * array.ndim, dtype)

    return {name: spec(value) for name, value in batch.items()}


def _query_function(
    model: LiMAMLModel,
    signature: Mapping[str, tf.TensorSpec],
    steps: int,
    inner_lr: float | None,
    support_prior: float | None = None,
    options: AdaptOptions | None = None,
) -> Callable:
    """A cached tf.function scoring query rows after `steps` inner steps.

    Keyed by the model's config too (its values are read while tracing) and
    by the batch's signature (`_relaxed_signature`). No XLA: the encode step
    has string ops. No autograph: the model's inner loop is plain Python over
    a static step count, and converting it would re-read the model's source
    from disk.
    """
    cache = _QUERY_FUNCTIONS.setdefault(model, {})
    knobs = AdaptOptions(
        inner_steps=steps, inner_lr=inner_lr, support_prior=support_prior
    )
    if options is not None:
        knobs = options.merged(knobs)
    structure = tuple(sorted((name, str(spec)) for name, spec in signature.items()))
    key = (model.meta_config, model.adapt_options, knobs, structure)
    if key not in cache:

        def probabilities(batch):
            return tf.sigmoid(model.forward(model.encode(batch), knobs)["query_logits"])

        cache[key] = tf.function(
            probabilities, input_signature=[dict(signature)], autograph=False
        )
    return cache[key]


def query_probabilities(
    model: LiMAMLModel,
    batch: Mapping[str, Any],
    steps: int | None = None,
    inner_lr: float | None = None,
    chunk: int = 128,
    support_prior: float | None = None,
    options: AdaptOptions | None = None,
) -> np.ndarray:
    """Query probabilities `[T, Q]`, adapted on each task's (masked) support.

    Args:
        model: A LiMAMLModel.
        batch: A task batch (cut its support with `cut_support`).
        steps: Inner steps (default the model's deployed ones: its
            `adapt_options` over its `meta_config`, as the export and
            `limaml embed` adapt; 0: no adaptation, and no embedding fit
            unless `options` asks for one).
        inner_lr: Scalar inner learning rate instead of the model's (for the
            fine-tuning baseline; learned rates, when the model has them, win).
        chunk: Tasks per call, to bound memory.
        support_prior: `MetaConfig.support_prior` instead of the model's (the
            test-time knobs of `limaml tune`).
        options: More test-time knobs (e.g. the embedding fit's), under the
            ones above.
    """
    if steps == 0 and (options is None or options.embedding_steps is None):
        # No adaptation asked: no embedding fit either (the default).
        options = (options or AdaptOptions()).merged(AdaptOptions(embedding_steps=0))
    if steps is None:
        # The adapt-time knobs a recipe sets (`Recipe.adaptation`) are what the
        # model is deployed with: score as the export will serve.
        steps = model.adapt_options.resolve(model.meta_config).inner_steps
    if inner_lr is not None and isinstance(model, FineTuneModel):
        model.finetune_lr.assign(float(inner_lr))
        inner_lr = None
    inner_lr = None if inner_lr is None else float(inner_lr)
    support_prior = None if support_prior is None else float(support_prior)
    batch = without_buckets(batch)
    fn = _query_function(
        model, _relaxed_signature(batch), steps, inner_lr, support_prior, options
    )
    n = len(batch[ENTITY_ID_KEY])
    out = []
    for start in range(0, n, chunk):
        part = {k: v[start : start + chunk] for k, v in batch.items()}
        out.append(fn(part).numpy())
    return np.concatenate(out)


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


def train_global(
    spec: FeatureSpec, splits: Splits, recipe: Recipe, seed: int, verbose: int | str = 0
) -> tuple[FineTuneModel, dict[str, list[float]]]:
    """The global baseline: the train members' rows only.

    No row of a val or test member reaches it: global, and fine-tuning and
    LiMAML warm-started from it, then meet a held-out member only through its
    k support rows, as the ID embedding does. Trained on their full support,
    the network would know every held-out member at k = 1 already (member
    features nearly identify a member), and every small-k score built on it
    would be inflated.

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
        flatten(splits.train, spec, (SUPPORT, QUERY)),
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


def new_sequence_learner(
    spec: FeatureSpec, recipe: Recipe, seed: int, inner_steps: int | None = None
) -> LiMAMLModel:
    """LiMAML with `SequenceMetaBlock` (`recipe.sequence`) as its meta block."""
    options = recipe.sequence
    steps = options.inner_steps if inner_steps is None else inner_steps
    config = dataclasses.replace(
        recipe.meta_config("meta_block"),
        inner_steps=steps,
        support_prior=float(recipe.support_prior),
    )
    tf.keras.utils.set_random_seed(seed)
    block = SequenceMetaBlock(
        spec.meta_features,
        spec.request_features,
        units=recipe.architecture.meta_units,
        residual_dim=recipe.architecture.residual_dim,
        name="meta_block",
        **options.block_kwargs(),
    )
    return new_model(spec, config, recipe.architecture, seed=seed, meta_block=block)


def train_meta_learner(
    spec: FeatureSpec,
    splits: Splits,
    recipe: Recipe,
    seed: int,
    adapt: str = "meta_block",
    init: LiMAMLModel | None = None,
    verbose: int | str = 0,
    callbacks: Sequence[tf.keras.callbacks.Callback] = (),
    sequence: bool | None = None,
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
        sequence: The meta block is `SequenceMetaBlock` (`recipe.sequence`;
            only the global block is warm-started); None: as
            `recipe.meta_block` says.

    Returns:
        (model, Keras history).
    """
    if sequence is None:
        sequence = recipe.meta_block == "sequence"
    if sequence:
        model = new_sequence_learner(spec, recipe, seed)
    else:
        model = new_meta_learner(spec, recipe, seed, adapt)
    if init is not None:
        warm_start(
            model,
            init,
            ("global_block",) if sequence else ("meta_block", "global_block"),
        )
    if recipe.freeze_network:
        model.freeze_network()
    elif recipe.freeze_global_block:
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
            support_cut=(
                recipe.sequence.support_cut
                if sequence and recipe.sequence.support_cut is not None
                else recipe.support_cut
            ),
            callbacks=callbacks,
        )
    if recipe.adaptation():
        # The test-time knobs, saved as such: scoring and the export read them.
        model.adapt_options = AdaptOptions(**recipe.adaptation())
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
