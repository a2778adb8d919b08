"""LiMAMLModel: MAML on the meta block, as a Keras model.

A thin Keras face over the block protocol (`tf_limaml.blocks`) and the
functional inner loop (`tf_limaml.maml`), the shape of `tfrs.Model`:
`forward` is all the meta-train math (adapt on support, score the query),
and `train_step` is a guarded, compiled step around it (`tf_limaml.step`).
Subclasses change the inner loop through public hooks:
`adaptable_variables`, `inner_lr` and `support_loss`.

On one device the whole train step (gradients, the optimizer's update and
the metrics, and the encoding too when no feature is a string) is one
compiled function, so small networks do not pay for hundreds of separately
run ops around their math.

Example:

    spec = tf_limaml.FeatureSpec.load("spec.json")
    model = tf_limaml.LiMAMLModel(spec, tf_limaml.MetaConfig(inner_steps=1))
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    model.fit(tf_limaml.data.task_dataset("train-*.tfrecord.gz", spec), epochs=5)
    scores = model.predict_query(batch)          # [T, Q], adapted on support
    embeddings = model.embed(batch, tf_limaml.AdaptOptions(inner_steps=3))
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tf_limaml import maml, step
from tf_limaml.blocks import (
    GLOBAL_PREFIX,
    META_EMBEDDING_KEY,
    META_INPUTS,
    META_PREFIX,
    GlobalBlockAdapter,
    MetaBlockAdapter,
    TaskBatch,
    prefixed,
    split_fast_weights,
)
from tf_limaml.config import (
    AdaptOptions,
    MetaConfig,
    as_adapt_options,
    as_meta_config,
)
from tf_limaml.features import (
    LABEL_KEY,
    MASK_KEY,
    NUMERIC,
    PARTS,
    QUERY,
    SUPPORT,
    FeatureSpec,
    load_spec,
)
from tf_limaml.layers import GlobalBlock, MetaBlock

logger = logging.getLogger(__name__)

__all__ = [
    "META_EMBEDDING_KEY",
    "LiMAMLModel",
    "load_model",
    "save_model",
]

# What a call may set apart from the model's options (the deprecated keywords
# of the per-call methods map onto these fields).
_LEGACY_KEYWORDS = {
    "steps": "inner_steps",
    "inner_lr": "inner_lr",
    "support_prior": "support_prior",
    "first_order": "first_order",
}


def _call_options(
    options: AdaptOptions | Mapping[str, Any] | None, legacy: Mapping[str, Any]
) -> AdaptOptions:
    """One call's AdaptOptions, from `options` and the deprecated keywords."""
    options = as_adapt_options(options)
    unknown = sorted(set(legacy) - set(_LEGACY_KEYWORDS))
    if unknown:
        raise TypeError(f"Unexpected keyword argument(s) {unknown}")
    given = {_LEGACY_KEYWORDS[k]: v for k, v in legacy.items() if v is not None}
    if given:
        warnings.warn(
            f"Per-call keywords {sorted(legacy)} are deprecated; pass "
            f"options=tf_limaml.AdaptOptions({', '.join(sorted(given))}=...)",
            DeprecationWarning,
            stacklevel=3,
        )
        options = options.merged(AdaptOptions(**given))
    return options


def _configured_variables(
    meta: MetaBlockAdapter, glob: GlobalBlockAdapter, config: MetaConfig
) -> dict[str, tf.Variable]:
    """Every weight `config.adapt` can adapt, by prefixed name."""
    params = prefixed(meta.adaptable_weights(), META_PREFIX)
    if config.adapt == "all":
        params.update(prefixed(glob.adaptable_weights(), GLOBAL_PREFIX))
    return params


def _per_task_loss(pointwise_loss, labels, logits, mask) -> tf.Tensor:
    """The plain masked mean per task (the query loss)."""
    return step.masked_task_mean(
        pointwise_loss(labels[..., None], logits[..., None]), mask
    )


def _deprecated(name: str, replacement: str, fn):
    """A thin alias of `fn` that warns once per call site."""

    @functools.wraps(fn)
    def alias(*args, **kwargs):
        warnings.warn(
            f"LiMAMLModel.{name} is deprecated; use {replacement}",
            DeprecationWarning,
            stacklevel=2,
        )
        return fn(*args, **kwargs)

    alias.__name__ = name
    alias.__doc__ = f"Deprecated: use `{replacement}`."
    return alias


@tf.keras.utils.register_keras_serializable(package="tf_limaml")
class LiMAMLModel(tf.keras.Model):
    """Meta block + global block, meta-trained with MAML on the meta block.

    Args:
        spec: FeatureSpec (or its dict, or a path to its JSON).
        meta_config: What the model is meta-trained with (MetaConfig or its
            dict); saved with it and fixed after construction.
        meta_units: Meta block MLP widths; the last is d.
        global_units: Global block MLP widths before the logit.
        cross_layers: DCN-v2 cross layers in the global block.
        projection_dim: Low-rank cross layers (None: full rank).
        interaction: How the meta embedding enters the global block: "product"
            (concatenation plus an elementwise product with the projected
            request features) or "concat".
        l2: L2 penalty on the dense and cross kernels of the library's blocks
            (`kernel_regularizer=tf.keras.regularizers.L2(l2)`). A block you
            pass brings its own regularizers. The meta-train loss adds every
            regularization loss of the model (`model.losses`).
        meta_block: Your own meta block instead of `MetaBlock(meta_units)`.
        global_block: Your own global block instead of `GlobalBlock(...)`; any
            Keras layer mapping `{"meta_embedding": [N, d], **request}` to
            logits `[N]` or `[N, 1]` (see `tf_limaml.blocks`).
        adapt_options: The adapt-time knobs (`AdaptOptions`) that inference,
            evaluation and the export use in place of `meta_config`'s; saved
            beside it.

    Inputs: a task batch from `tf_limaml.data.task_dataset` (raw features,
    labels and masks). `call` returns adapted query probabilities `[T, Q]`.

    Example (a global block written as an ordinary Keras model):

        class Ranker(tf.keras.Model):
            def __init__(self, items):
                super().__init__()
                self.lookup = tf.keras.layers.StringLookup(vocabulary=items)
                self.item = tf.keras.layers.Embedding(len(items) + 1, 8)
                self.tower = tf.keras.layers.Dense(1)

            def call(self, features):
                item = self.item(self.lookup(features["item_id"]))
                return self.tower(
                    tf.concat([features["meta_embedding"], item], axis=-1))

        model = tf_limaml.LiMAMLModel(spec, global_block=Ranker(items))
    """

    # Embedding tables of at most this many numbers (rows x dim) have their
    # sparse gradient applied dense (`tf_limaml.step.dense_table_gradient`).
    dense_table_limit: int = 1 << 22

    def __init__(
        self,
        spec: FeatureSpec | Mapping[str, Any] | str,
        meta_config: MetaConfig | Mapping[str, Any] | None = None,
        meta_units: Sequence[int] = (64, 32),
        global_units: Sequence[int] = (256, 128),
        cross_layers: int = 2,
        projection_dim: int | None = None,
        interaction: str = "product",
        l2: float = 0.0,
        meta_block: tf.keras.layers.Layer | None = None,
        global_block: tf.keras.layers.Layer | None = None,
        adapt_options: AdaptOptions | Mapping[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.spec = load_spec(spec)
        self._meta_config = as_meta_config(meta_config)
        self._adapt_options = as_adapt_options(adapt_options)
        config = self._meta_config
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or l2 < 0:
            raise ValueError(f"`l2` must be a number >= 0, got {l2!r}")
        self.l2 = float(l2)
        # Blocks passed in are serialized into the config; ours are rebuilt
        # from the architecture arguments.
        self._custom_blocks = {
            "meta_block": meta_block is not None,
            "global_block": global_block is not None,
        }
        if self.l2 and any(self._custom_blocks.values()):
            logger.warning(
                "`l2` regularizes the library's blocks only; give your own "
                "block's weights a regularizer (add_weight(regularizer=...) or "
                "kernel_regularizer=...), which the loss picks up from "
                "`model.losses`."
            )
        regularizer = tf.keras.regularizers.L2(self.l2) if self.l2 else None
        if meta_block is None:
            meta_block = MetaBlock(
                self.spec.meta_features,
                units=meta_units,
                kernel_regularizer=regularizer,
                name="meta_block",
            )
            meta_block.build(None)
        # The adapters are plain objects: Keras tracks the layers themselves.
        meta = MetaBlockAdapter(meta_block, self.spec.meta_features)
        self.meta_block = meta_block
        self._meta = meta
        if config.adapt_embeddings and not meta.adapts_input_embeddings:
            raise ValueError(
                "MetaConfig(adapt_embeddings=True) needs a meta block that adapts "
                "its input embeddings (the library's MetaBlock); got "
                f"{type(meta_block).__name__}"
            )
        self.meta_dim = meta.output_dim()
        if global_block is None:
            global_block = GlobalBlock(
                self.spec.request_features,
                meta_dim=self.meta_dim,
                interaction=interaction,
                cross_layers=cross_layers,
                projection_dim=projection_dim,
                units=global_units,
                kernel_regularizer=regularizer,
                name="global_block",
            )
            global_block.build(None)
        glob = GlobalBlockAdapter(
            global_block, self.spec.request_features, self.meta_dim
        )
        self.global_block = global_block
        self._global = glob
        glob.build()
        if meta.shares_request_embedding:
            width = getattr(meta_block, "request_dim", None)
            shared = glob.request_embedding
            if shared is None or (width is not None and shared.output_dim != width):
                raise ValueError(
                    f"The meta block {meta_block.name!r} shares the global "
                    "block's request embeddings (request_embedding='shared'), "
                    "which needs the library GlobalBlock over the same request "
                    "features; use request_embedding='own' with your own "
                    "global block"
                )
            meta.request_embedding = shared
        if config.adapt == "all" and not glob.has_fast_weights:
            raise ValueError(
                f"MetaConfig(adapt='all') adapts the global block, but "
                f"{global_block.name!r} has no fast weights "
                "(`adaptable_weights()` and `call(inputs, weights=None)`); use "
                "adapt='meta_block'"
            )
        # Every weight exists now, so checkpoints restore and BackupAndRestore
        # works before the first batch.
        self.built = True
        # One pointwise loss: the inner loop reduces it per task, and the TFRS
        # ranking task uses it for the reported query loss and AUC.
        self.pointwise_loss = tf.keras.losses.BinaryCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE
        )
        self.task = tfrs.tasks.Ranking(
            loss=self.pointwise_loss,
            metrics=[tf.keras.metrics.AUC(from_logits=True, name="auc")],
        )
        # Learned rates (Meta-SGD) for every weight `adapt` can adapt, created
        # now so that checkpoints restore before the first batch.
        self._learned_inner_lrs: dict[str, tf.Variable] = {}
        if config.learn_inner_lr:
            rates = {
                name: variable.shape
                for name, variable in _configured_variables(meta, glob, config).items()
            }
            if config.adapt_embeddings:
                rates[META_INPUTS] = (meta_block.input_dim,)
            for name, shape in rates.items():
                self._learned_inner_lrs[name] = self.add_weight(
                    name=(
                        "inner_lr/meta_inputs"
                        if name == META_INPUTS
                        else f"inner_lr/{name}"
                    ),
                    shape=shape,
                    trainable=True,
                    initializer=tf.keras.initializers.Constant(config.inner_lr),
                )
        self.loss_trackers = {
            name: tf.keras.metrics.Mean(name=name) for name in step.LOSS_NAMES
        }
        self._architecture = {
            "meta_units": list(meta_units),
            "global_units": list(global_units),
            "cross_layers": cross_layers,
            "projection_dim": projection_dim,
            "interaction": interaction,
            "l2": self.l2,
        }
        self.xla_blocker = meta.xla_blocker() or glob.xla_blocker()
        # Whether the step compiles with XLA (asked for and possible).
        self.uses_xla = config.jit_compile and self.xla_blocker is None
        # Whether `encode` is plain math (blocks that say so, no string
        # feature), so the compiled train step can start from the raw batch.
        self.encode_compiles = (
            meta.encode_compiles
            and glob.encode_compiles
            and all(f.type == NUMERIC for f in self.spec.features)
        )
        if config.jit_compile and self.xla_blocker:
            logger.warning(
                "The meta-train step runs without XLA: %s. Give the block an "
                "`encode(raw) -> encoded` method that does its string work and "
                "returns numbers; it runs outside the compiled step.",
                self.xla_blocker,
            )
        self._functions = step.FunctionCache()
        self._nonfinite = step.NonfiniteRecord()

    # ------------------------------------------------------------- options
    @property
    def meta_config(self) -> MetaConfig:
        """What the model was meta-trained with; fixed (see `adapt_options`)."""
        return self._meta_config

    @property
    def adapt_options(self) -> AdaptOptions:
        """The adapt-time knobs in force for inference, evaluation and export.

        Assign new `AdaptOptions` (or their dict) to deploy other knobs
        (steps, rate, prior) than the model was trained with; they are saved
        beside `meta_config`.
        """
        return self._adapt_options

    @adapt_options.setter
    def adapt_options(self, options: AdaptOptions | Mapping[str, Any] | None) -> None:
        self._adapt_options = as_adapt_options(options)
        # Traced functions read the options at trace time.
        self._functions.clear()

    def get_config(self) -> dict[str, Any]:
        config = {
            "name": self.name,
            "spec": self.spec.to_dict(),
            "meta_config": self.meta_config.to_dict(),
            "adapt_options": self.adapt_options.to_dict(),
            **self._architecture,
        }
        for key, custom in self._custom_blocks.items():
            if not custom:
                continue
            block = getattr(self, key)
            try:
                config[key] = tf.keras.utils.serialize_keras_object(block)
            except NotImplementedError as err:
                raise NotImplementedError(
                    f"The custom {key} {block.name!r} cannot give its config "
                    f"({err}). Implement its `get_config` (and register its "
                    "class with tf.keras.utils.register_keras_serializable), or "
                    "rebuild the model in code and restore its weights with "
                    "tf.train.Checkpoint."
                ) from None
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("meta_block", "global_block"):
            if isinstance(config.get(key), Mapping):
                block = tf.keras.layers.deserialize(
                    config[key], custom_objects=custom_objects
                )
                if not isinstance(block, tf.keras.layers.Layer):
                    raise ValueError(
                        f"Cannot rebuild the custom {key} "
                        f"{config[key].get('class_name')!r} from its config: "
                        "register its class with "
                        "tf.keras.utils.register_keras_serializable (or pass it in "
                        "`custom_objects`) before loading"
                    )
                config[key] = block
        return cls(**config)

    # -------------------------------------------------------------- inputs
    def encode(self, batch: Mapping[str, tf.Tensor]) -> TaskBatch:
        """Raw task batch -> `TaskBatch` (string lookups happen here, outside XLA).

        Parts (support, query) whose features are absent from the batch are
        None; a missing mask means every row is real.
        """
        spec = self.spec
        missing = [f.name for f in spec.meta_features if f.name not in batch]
        if missing:
            raise KeyError(
                f"Task batch lacks meta feature(s) {missing}; it has {sorted(batch)}"
            )
        fields: dict[str, Any] = {
            "meta": self._meta.encode(
                {f.name: batch[f.name] for f in spec.meta_features}
            )
        }
        dtype = self.compute_dtype
        for part in PARTS:
            keys = {f.name: spec.batch_key(part, f.name) for f in spec.request_features}
            if not any(k in batch for k in keys.values()):
                continue
            absent = [k for k in keys.values() if k not in batch]
            if absent:
                raise KeyError(f"Task batch lacks {absent}; it has {sorted(batch)}")
            fields[part] = self._global.encode({n: batch[k] for n, k in keys.items()})
            first = batch[keys[spec.request_features[0].name]]
            rows_shape = tf.shape(first)[:2]
            mask_key = spec.batch_key(part, MASK_KEY)
            mask = batch[mask_key] if mask_key in batch else tf.ones(rows_shape, dtype)
            fields[f"{part}_mask"] = tf.cast(mask, dtype)
            label_key = spec.batch_key(part, LABEL_KEY)
            if label_key in batch:
                fields[f"{part}_label"] = tf.cast(batch[label_key], dtype)
            fields["batch_size"] = rows_shape[0]
            if part == SUPPORT:
                # The block's own tables read the support rows in its encoding.
                fields["support_sequence"] = self._meta.encode_support(
                    {n: batch[k] for n, k in keys.items()}
                )
        if "batch_size" not in fields:
            first = (
                batch[spec.meta_features[0].name]
                if spec.meta_features
                else batch["entity_id"]
            )
            fields["batch_size"] = tf.shape(first)[0]
        return TaskBatch(**fields)

    # --------------------------------------------------------------- hooks
    def adaptable_variables(self) -> dict[str, tf.Variable]:
        """The weights the inner loop adapts, by name.

        The meta block's `adaptable_weights()` as "meta_block/<name>"; with
        `MetaConfig(adapt="all")` also the global block's as
        "global_block/<name>". Override to adapt fewer (e.g. only a last bias).
        """
        return _configured_variables(self._meta, self._global, self.meta_config)

    @property
    def inner_lrs(self) -> dict[str, tf.Variable]:
        """Learned inner rates (Meta-SGD) of the adapted weights; {} when not learned."""
        used = set(self.adaptable_variables()) | {META_INPUTS}
        return {k: v for k, v in self._learned_inner_lrs.items() if k in used}

    def inner_lr(
        self, name: str, config: MetaConfig | None = None
    ) -> float | tf.Tensor | tf.Variable:
        """The inner learning rate of adapted weight `name`.

        Args:
            name: A key of `adaptable_variables()`, or "meta_block/inputs" for
                the adapted meta-feature embeddings.
            config: The MetaConfig in force for this call (adapt-time options
                applied); None for `meta_config`.

        Returns:
            Its learned rate (Meta-SGD, the weight's shape) when the model
            learns rates, else `config.inner_lr`.
        """
        config = config or self.meta_config
        learned = self._learned_inner_lrs.get(name)
        return config.inner_lr if learned is None else learned

    def support_loss(
        self,
        labels: tf.Tensor,
        logits: tf.Tensor,
        mask: tf.Tensor,
        config: MetaConfig | None = None,
    ) -> tf.Tensor:
        """The inner loop's loss per task, `[T]`, from `[T, S]` support rows.

        sum(mask * loss) / max(sum(mask), 1), or with `config.support_prior`
        c > 0, sum(mask * loss) / (sum(mask) + c): shrunk toward no update.
        A task with no real row has loss 0, so it is not adapted.

        Args:
            labels: `[T, S]`.
            logits: `[T, S]`.
            mask: `[T, S]`, 1 for real rows.
            config: The MetaConfig in force for this call; None for `meta_config`.
        """
        prior = (config or self.meta_config).support_prior
        if not prior:
            return _per_task_loss(self.pointwise_loss, labels, logits, mask)
        pointwise = self.pointwise_loss(labels[..., None], logits[..., None])
        return tf.reduce_sum(pointwise * mask, axis=-1) / (
            tf.reduce_sum(mask, axis=-1) + tf.cast(prior, pointwise.dtype)
        )

    # ---------------------------------------------------------- the math
    def logits(
        self, batch: TaskBatch, part: str, fast: Mapping[str, Any] | None = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """(logits `[T, S]` of a part's rows, meta embedding `[T, d]`) under
        fast weights (prefixed names, as `adapt` returns them; None: none)."""
        meta_weights, global_weights = split_fast_weights(fast)
        embedding = self._meta.embed(batch, meta_weights)
        rows = getattr(batch, part)
        return self._global.task_logits(embedding, rows, global_weights), embedding

    def inner_loop(
        self, batch: TaskBatch, config: MetaConfig
    ) -> tuple[dict[str, Any], tf.Tensor | None]:
        """`config.inner_steps` support steps with `tf_limaml.maml`.

        Returns:
            (fast weights by prefixed name, the pre-adaptation support loss
            `[T]` or None). With the library's blocks and scalar rates the
            kernels stay factored (`maml.adapt_dense`); `adapt` materializes them.
        """

        def task_loss(fast):
            logits, _ = self.logits(batch, SUPPORT, fast)
            return self.support_loss(
                batch.support_label, logits, batch.support_mask, config
            )

        params = self.adaptable_variables()
        rates = {name: self.inner_lr(name, config) for name in params}
        dense_only = (
            not config.adapt_embeddings
            and self._meta.fast_dense_path
            and (config.adapt != "all" or self._global.fast_dense_path)
            and set(params)
            <= set(_configured_variables(self._meta, self._global, config))
            and all(
                isinstance(rate, (int, float))
                or tf.convert_to_tensor(rate).shape.rank == 0
                for rate in rates.values()
            )
        )
        if dense_only:
            # No per-task copy of any weight (see `maml.adapt_dense`).
            return maml.adapt_dense(
                task_loss, params, config.inner_steps, rates, config.first_order
            )
        fast = maml.tile(params, batch.batch_size)
        if config.adapt_embeddings:
            fast[META_INPUTS] = self.meta_block.embed_inputs(
                batch.meta, batch.batch_size
            )
        if not config.inner_steps:
            return fast, None
        if META_INPUTS in rates:
            # Only looked-up embedding rows adapt, not numeric inputs.
            inputs_mask = self.meta_block.embedding_input_mask()
            rates[META_INPUTS] = (
                tf.cast(rates[META_INPUTS], inputs_mask.dtype) * inputs_mask
            )
        return maml.adapt(
            task_loss, fast, config.inner_steps, rates, config.first_order
        )

    def forward(
        self,
        batch: TaskBatch,
        options: AdaptOptions | Mapping[str, Any] | None = None,
        training: bool = False,
    ) -> dict[str, tf.Tensor]:
        """Adapts on the support set and scores the query: all the math, traceable.

        Args:
            batch: An encoded batch (`encode`).
            options: This call's adapt-time knobs, on top of `adapt_options`.
            training: Run what meta-training runs: `meta_config` alone, with
                its `first_order`. Otherwise `adapt_options` apply and the
                inner loop is first order (nothing differentiates through it).

        Returns:
            "query_logits" `[T, Q]` and "meta_embedding" `[T, d]`; with query
            labels also "loss", "query_loss", "support_loss" and
            "regularization_loss".
        """
        if training:
            config = as_adapt_options(options).resolve(self.meta_config)
        else:
            config = (
                self.adapt_options.merged(AdaptOptions(first_order=True))
                .merged(as_adapt_options(options))
                .resolve(self.meta_config)
            )
        fast, support_loss = self.inner_loop(batch, config)
        logits, embedding = self.logits(batch, QUERY, fast)
        out = {"query_logits": logits, "meta_embedding": embedding}
        if batch.query_label is None:
            return out
        per_task = _per_task_loss(
            self.pointwise_loss, batch.query_label, logits, batch.query_mask
        )
        has_query = tf.cast(tf.reduce_sum(batch.query_mask, -1) > 0, per_task.dtype)
        out["query_loss"] = tf.reduce_sum(per_task * has_query) / tf.maximum(
            tf.reduce_sum(has_query), 1.0
        )
        if support_loss is None:
            support_loss = _per_task_loss(
                self.pointwise_loss,
                batch.support_label,
                self.logits(batch, SUPPORT, fast)[0],
                batch.support_mask,
            )
        out["support_loss"] = tf.reduce_mean(support_loss)
        # On the variables: fast weights are tensors and carry no penalty.
        losses = [tf.cast(loss, logits.dtype) for loss in self.losses]
        out["regularization_loss"] = (
            tf.add_n(losses) if losses else tf.constant(0.0, logits.dtype)
        )
        out["loss"] = out["query_loss"] + out["regularization_loss"]
        return out

    # ----------------------------------------------------------- Keras API
    def make_train_function(self, force=False):
        cached = self.train_function is not None and not force
        train_function = super().make_train_function(force)
        if (
            cached
            or self._cluster_coordinator
            or self.distribute_strategy.num_replicas_in_sync != 1
            or not hasattr(train_function, "get_concrete_function")
        ):
            return train_function
        self.train_function = step.IteratorDispatch(train_function)
        return self.train_function

    def train_step(self, batch):
        if not tf.distribute.has_strategy():
            # One compiled function for the whole step (gradients, update and
            # metrics): on small networks the ops around the step, each run
            # on its own by the executor, cost as much as the step's math.
            # Not under a strategy, even of one replica: its apply_gradients
            # synchronizes (merge_call), which a nested function cannot.
            if self.encode_compiles:
                # No string to look up: encoding joins the compiled step too.
                batch = {k: tf.convert_to_tensor(v) for k, v in batch.items()}
                numbers = {k: v for k, v in batch.items() if v.dtype != tf.string}
                compiled = self._functions.get(
                    "train_step_raw",
                    lambda raw: step.apply_step(self, self.encode(raw)),
                    self.uses_xla,
                )
                logs, finite = compiled(numbers)
            else:
                compiled = self._functions.get(
                    "train_step", lambda b: step.apply_step(self, b), self.uses_xla
                )
                logs, finite = compiled(self.encode(batch))
        else:
            # The all-reduce of the update stays outside the compiled part.
            encoded = self.encode(batch)
            compiled = self._functions.get(
                "meta_gradients",
                lambda b: step.meta_gradients(self, b),
                self.uses_xla,
            )
            grads, out = compiled(encoded)
            finite = out["finite"]
            step.apply_gradients(self, step.densify_small_tables(self, grads), finite)
            logs = step.update_metrics(self, encoded, out)
        self._nonfinite.watch(finite, self.optimizer.iterations, batch)
        return logs

    def test_step(self, batch):
        encoded = self.encode(batch)
        forward = self._functions.get("forward", self.forward, self.uses_xla)
        return step.update_metrics(self, encoded, forward(encoded))

    @property
    def metrics(self):
        return list(self.loss_trackers.values()) + list(self.task.metrics)

    @property
    def nonfinite_entities(self) -> list[str]:
        """Entity ids of the last batch whose loss or gradients were not finite."""
        return self._nonfinite.entities

    def call(self, batch, training=False):
        return self.predict_query(batch)

    # ------------------------------------------------------------ inference
    def adapt(
        self,
        tasks: Mapping[str, tf.Tensor],
        options: AdaptOptions | Mapping[str, Any] | None = None,
        **deprecated,
    ) -> dict[str, tf.Tensor]:
        """Runs the inner loop on the tasks' support sets.

        Args:
            tasks: A raw task batch (support features, labels and mask).
            options: This call's `AdaptOptions` (on top of `adapt_options`).
                `first_order` defaults to `meta_config.first_order` here.
            **deprecated: `steps`, `inner_lr`, `support_prior`, `first_order`.

        Returns:
            Fast weights by name, each with a leading task axis `[T, ...]`.
        """
        options = self.adapt_options.merged(_call_options(options, deprecated))
        config = options.resolve(self.meta_config)
        batch = self.encode(tasks)
        fast, _ = self.inner_loop(batch, config)
        # The dense-only inner loop keeps kernels factored and leaves what it
        # did not adapt shared: give every weight its task axis.
        return maml.materialize(fast, self.adaptable_variables(), batch.batch_size)

    def predict_query(
        self,
        tasks: Mapping[str, tf.Tensor],
        options: AdaptOptions | Mapping[str, Any] | None = None,
        adapt: bool = True,
        **deprecated,
    ) -> tf.Tensor:
        """Query click probabilities `[T, Q]` (padding rows included; see the mask).

        Traceable: inside your own `tf.function` it runs in place; outside,
        through a compiled function cached per options.

        Args:
            tasks: A raw task batch.
            options: This call's `AdaptOptions` (on top of `adapt_options`).
            adapt: Adapt on the support set first (False: the meta-learned
                default, as for a member with no history).
            **deprecated: `steps`, `inner_lr`, `support_prior`.
        """
        options = _call_options(options, deprecated)
        if not adapt:
            options = options.merged(AdaptOptions(inner_steps=0))

        def probabilities(batch):
            return tf.sigmoid(self.forward(batch, options)["query_logits"])

        if tf.inside_function():
            return probabilities(self.encode(tasks))
        compiled = self._functions.get(("query", options), probabilities, self.uses_xla)
        return compiled(self.encode(tasks))

    def embed(
        self,
        tasks: Mapping[str, tf.Tensor],
        options: AdaptOptions | Mapping[str, Any] | None = None,
        **deprecated,
    ) -> tf.Tensor:
        """Adapted meta embeddings `[T, d]`; tasks without support get the default.

        Traceable, as `predict_query`. The query part, if any, is not read.

        Args:
            tasks: A raw task batch (meta features and support).
            options: This call's `AdaptOptions` (on top of `adapt_options`).
            **deprecated: `steps`, `inner_lr`, `support_prior`.
        """
        options = self.adapt_options.merged(AdaptOptions(first_order=True)).merged(
            _call_options(options, deprecated)
        )
        config = options.resolve(self.meta_config)

        def embedding(batch):
            fast, _ = self.inner_loop(batch, config)
            return self._meta.embed(batch, split_fast_weights(fast)[0])

        if tf.inside_function():
            return embedding(self.encode(tasks))
        compiled = self._functions.get(("embed", config), embedding, self.uses_xla)
        return compiled(self.encode(tasks))

    def score(
        self, meta_embedding: tf.Tensor, request: Mapping[str, tf.Tensor]
    ) -> tf.Tensor:
        """Online scoring: probabilities `[B]` from stored meta embeddings `[B, d]`.

        Args:
            meta_embedding: `[B, d]`, one row per request.
            request: Raw request features by name, each `[B]` (`[B, K]` multi-hot).
        """
        encoded = self._global.encode(request)
        return tf.sigmoid(
            self._global.row_logits(
                tf.cast(meta_embedding, self.compute_dtype), encoded
            )
        )

    meta_embedding = _deprecated("meta_embedding", "embed", embed)


def save_model(model: LiMAMLModel, model_dir: str | os.PathLike) -> str:
    """Writes `config.json` and a weights checkpoint; returns the checkpoint path."""
    model_dir = str(model_dir)
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(model.get_config(), f, indent=2)
    checkpoint = tf.train.Checkpoint(model=model)
    return checkpoint.write(os.path.join(model_dir, "weights", "model"))


def load_model(model_dir: str | os.PathLike) -> LiMAMLModel:
    """Loads a model written by `save_model` or `limaml train`.

    Restores the final weights (`weights/`) or, for a run that has not
    finished (stopped or killed), its latest training checkpoint (`backup/`).

    Raises:
        FileNotFoundError: No config or no weights in the directory.
    """
    model_dir = str(model_dir)
    config_path = os.path.join(model_dir, "config.json")
    if not tf.io.gfile.exists(config_path):
        raise FileNotFoundError(f"No model in {model_dir}: {config_path} is missing")
    with tf.io.gfile.GFile(config_path) as f:
        model = LiMAMLModel.from_config(json.load(f))
    path = os.path.join(model_dir, "weights", "model")
    if not tf.io.gfile.exists(path + ".index"):
        path = tf.train.latest_checkpoint(os.path.join(model_dir, "backup", "chief"))
        if path is None:
            raise FileNotFoundError(f"No weights in {model_dir} (weights/ or backup/)")
        logger.warning(
            "%s has no final weights; loading the training checkpoint %s",
            model_dir,
            path,
        )
    tf.train.Checkpoint(model=model).read(path).expect_partial()
    return model
