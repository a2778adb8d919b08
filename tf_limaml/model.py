"""LiMAMLModel: MAML on the meta block, as a Keras model.

A thin Keras face over the block protocol (`tf_limaml.blocks`, the blocks
built by `tf_limaml.layers.build_blocks`) and the functional inner loop
(`tf_limaml.maml`), the shape of `tfrs.Model`: `forward` is all the meta-train
math (adapt on support, score the query; `tf_limaml.adaptation`), and
`train_step` is a guarded, compiled step around it (`tf_limaml.step`).
Subclasses change the inner loop through public hooks:
`adaptable_variables`, `inner_lr` and `support_loss`.

The step details (the finite guard, dense gradients for small tables, one
compiled function per step) live in `tf_limaml.step`; `bring your own model`
in the docs shows the blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tf_limaml import adaptation, maml, step
from tf_limaml.blocks import (
    META_EMBEDDING_KEY,
    META_INPUTS,
    GlobalBlockAdapter,
    MetaBlockAdapter,
    TaskBatch,
    compile_plan,
    configured_variables,
    deserialize_block,
    encode_batch,
    serialize_block,
    split_fast_weights,
)
from tf_limaml.config import (
    AdaptOptions,
    MetaConfig,
    as_adapt_options,
    as_meta_config,
    call_options,
    deprecated_alias,
)
from tf_limaml.features import (
    FeatureSpec,
    load_spec,
)
from tf_limaml.layers import build_blocks

logger = logging.getLogger(__name__)

__all__ = ["META_EMBEDDING_KEY", "LiMAMLModel"]


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
        residual_dim: The library's blocks carry a personal residual of
            residual_dim + 1 dimensions at the end of the meta embedding, zero
            until the embedding fit moves them (see `GlobalBlock`; None: none).

    Inputs: a task batch from `tf_limaml.data.task_dataset` (raw features,
    labels and masks). `call` returns adapted query probabilities `[T, Q]`.

    Example:

        model = tf_limaml.LiMAMLModel(spec, MetaConfig(inner_steps=1))
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
        model.fit(tf_limaml.data.task_dataset("train-*.tfrecord.gz", spec))
        scores = model.predict_query(batch, AdaptOptions(inner_steps=3))
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
        residual_dim: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.spec = load_spec(spec)
        self._meta_config = as_meta_config(meta_config)
        self._adapt_options = as_adapt_options(adapt_options)
        config = self._meta_config
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or l2 < 0:
            raise ValueError(f"`l2` must be a number >= 0, got {l2!r}")
        self.l2 = float(l2)
        # Blocks passed in are serialized into the config; ours are rebuilt.
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
        meta, glob = build_blocks(
            self.spec,
            config,
            meta_units=meta_units,
            global_units=global_units,
            cross_layers=cross_layers,
            projection_dim=projection_dim,
            interaction=interaction,
            l2=self.l2,
            residual_dim=residual_dim,
            meta_block=meta_block,
            global_block=global_block,
        )
        # The adapters are plain objects: Keras tracks the layers themselves.
        self.meta_block, self._meta = meta.layer, meta
        self.global_block, self._global = glob.layer, glob
        self.meta_dim = glob.meta_dim
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
        # Meta-SGD rates and the embedding fit's learned prior (None/{}: fixed).
        self._learned_inner_lrs, self.log_embedding_prior = adaptation.add_meta_weights(
            self, meta, glob, config
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
            "residual_dim": residual_dim,
        }
        # Why the step cannot compile with XLA (None: it can), and whether
        # `encode` may run inside the compiled step (plain math on numbers).
        self.xla_blocker, self.encode_compiles = compile_plan(meta, glob, self.spec)
        self.uses_xla = config.jit_compile and self.xla_blocker is None
        if config.jit_compile and self.xla_blocker:
            logger.warning(
                "The meta-train step runs without XLA: %s. Give the block an "
                "`encode(raw) -> encoded` method that does its string work and "
                "returns numbers; it runs outside the compiled step.",
                self.xla_blocker,
            )
        # Compiled functions and the host record of non-finite steps: plain
        # objects, outside Keras tracking (see `tf_limaml.step`).
        self.compiled_functions = step.FunctionCache()
        self.nonfinite_record = step.NonfiniteRecord()

    @property
    def meta_config(self) -> MetaConfig:
        """What the model was meta-trained with; fixed (see `adapt_options`)."""
        return self._meta_config

    @property
    def adapt_options(self) -> AdaptOptions:
        """The adapt-time knobs for inference, evaluation and the export; assign
        `AdaptOptions` to deploy others than training's. Saved with the model."""
        return self._adapt_options

    @adapt_options.setter
    def adapt_options(self, options: AdaptOptions | Mapping[str, Any] | None) -> None:
        self._adapt_options = as_adapt_options(options)
        # Traced functions read the options at trace time.
        self.compiled_functions.clear()

    def get_config(self) -> dict[str, Any]:
        config = {
            "name": self.name,
            "spec": self.spec.to_dict(),
            "meta_config": self.meta_config.to_dict(),
            "adapt_options": self.adapt_options.to_dict(),
            **self._architecture,
        }
        for key, custom in self._custom_blocks.items():
            if custom:
                config[key] = serialize_block(key, getattr(self, key))
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("meta_block", "global_block"):
            if isinstance(config.get(key), Mapping):
                config[key] = deserialize_block(key, config[key], custom_objects)
        return cls(**config)

    def encode(self, batch: Mapping[str, tf.Tensor]) -> TaskBatch:
        """Raw task batch -> `TaskBatch` (string lookups here, outside XLA)."""
        return encode_batch(
            self.spec, self._meta, self._global, batch, self.compute_dtype
        )

    def adaptable_variables(self) -> dict[str, tf.Variable]:
        """The weights the inner loop adapts: the meta block's as
        "meta_block/<name>" (with `adapt="all"` also "global_block/<name>").
        Override to adapt fewer (e.g. only a last bias)."""
        return configured_variables(self._meta, self._global, self.meta_config)

    @property
    def inner_lrs(self) -> dict[str, tf.Variable]:
        """Learned inner rates (Meta-SGD) of the adapted weights; {} when not learned."""
        used = set(self.adaptable_variables()) | {META_INPUTS}
        return {k: v for k, v in self._learned_inner_lrs.items() if k in used}

    def inner_lr(
        self, name: str, config: MetaConfig | None = None
    ) -> float | tf.Tensor | tf.Variable:
        """The inner rate of adapted weight `name` (a key of
        `adaptable_variables()`, or "meta_block/inputs") under `config` (None:
        `meta_config`): its learned Meta-SGD rate, else `config.inner_lr`."""
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
        """The inner loop's loss per task `[T]` from `[T, S]` labels, logits, mask.

        sum(mask * loss) / max(sum(mask), 1), or with `config.support_prior`
        c > 0, sum(mask * loss) / (sum(mask) + c): shrunk toward no update. A
        task with no real row has loss 0, so it is not adapted.
        """
        prior = (config or self.meta_config).support_prior
        pointwise = self.pointwise_loss(labels[..., None], logits[..., None])
        if not prior:
            return step.masked_task_mean(pointwise, mask)
        return tf.reduce_sum(pointwise * mask, axis=-1) / (
            tf.reduce_sum(mask, axis=-1) + tf.cast(prior, pointwise.dtype)
        )

    @property
    def fitted_dims(self) -> tuple[int, ...]:
        """The meta-embedding dimensions the embedding fit moves."""
        return self._global.fitted_dims

    def embedding_prior(self, config: MetaConfig | None = None) -> tf.Tensor:
        """The embedding fit's prior precision per fitted dimension: the learned
        one when the model meta-learns it, else `config.embedding_prior`."""
        if self.log_embedding_prior is not None:
            return tf.exp(self.log_embedding_prior)
        config = config or self.meta_config
        return tf.fill(
            [len(self.fitted_dims)], tf.cast(config.embedding_prior, self.dtype)
        )

    def freeze_network(self) -> None:
        """Trains only what personalizes from here on: the residual's projection,
        the learned prior and rates. The unadapted model stays as it is (say, a
        trained global model it was warm-started from), so meta-training can
        only change what an entity's support moves: safety by construction."""
        self.meta_block.trainable = False
        self._global.freeze_base()

    @property
    def meta_adapter(self) -> MetaBlockAdapter:
        """The meta block behind the block protocol (`tf_limaml.blocks`)."""
        return self._meta

    @property
    def global_adapter(self) -> GlobalBlockAdapter:
        """The global block behind the block protocol (`tf_limaml.blocks`)."""
        return self._global

    def adapted_embedding(
        self, batch: TaskBatch, fast: Mapping[str, Any] | None, config: MetaConfig
    ) -> tf.Tensor:
        """Each task's meta embedding `[T, d]` under fast weights, fitted to its
        support rows (`tf_limaml.adaptation.adapted_embedding`)."""
        return adaptation.adapted_embedding(self, batch, fast, config)

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
        """(fast weights by prefixed name, pre-adaptation support loss `[T]` or
        None) after `config.inner_steps` support steps
        (`tf_limaml.adaptation.inner_loop`)."""
        return adaptation.inner_loop(self, batch, config)

    def forward(
        self,
        batch: TaskBatch,
        options: AdaptOptions | Mapping[str, Any] | None = None,
        training: bool = False,
    ) -> dict[str, tf.Tensor]:
        """Adapts on the support set and scores the query: all the math, traceable.

        `training` runs what meta-training runs (`meta_config` and its
        `first_order`); otherwise `adapt_options`, then `options`, apply and
        the inner loop is first order. Returns "query_logits" `[T, Q]` and
        "meta_embedding" `[T, d]`, and with query labels the losses
        (`tf_limaml.step.losses`).
        """
        return adaptation.forward(self, batch, options, training)

    def make_train_function(self, force=False):
        cached = self.train_function is not None and not force
        return step.dispatch(self, super().make_train_function(force), cached)

    def train_step(self, batch):
        return step.train_step(self, batch)

    def test_step(self, batch):
        encoded = self.encode(batch)
        forward = self.compiled_functions.get("forward", self.forward, self.uses_xla)
        return step.update_metrics(self, encoded, forward(encoded))

    @property
    def metrics(self):
        return list(self.loss_trackers.values()) + list(self.task.metrics)

    @property
    def nonfinite_entities(self) -> list[str]:
        """Entity ids of the last batch whose loss or gradients were not finite."""
        return self.nonfinite_record.entities

    def call(self, batch, training=False):
        return self.predict_query(batch)

    def adapt(
        self,
        tasks: Mapping[str, tf.Tensor],
        options: AdaptOptions | Mapping[str, Any] | None = None,
        **deprecated,
    ) -> dict[str, tf.Tensor]:
        """Fast weights by name, each `[T, ...]`, after the inner loop on the
        raw `tasks`' support sets, with this call's `options` on top of
        `adapt_options` (`**deprecated`: the old per-call keywords).

        These are the gradient steps only. The embedding fit
        (`embedding_steps`, `tf_limaml.newton`) acts on the meta embedding,
        not on weights: `embed` returns the fitted embedding, and
        `predict_query` and the `adapt_and_predict` signature score with it."""
        options = self.adapt_options.merged(call_options(options, deprecated))
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
        """Query click probabilities `[T, Q]` of raw `tasks` (padding included).

        Adapts with this call's `options` on top of `adapt_options` (`adapt`
        False: the meta-learned default, as for a member with no history).
        Runs in place inside your own `tf.function`, else through a compiled
        function cached per options. `**deprecated`: the old keywords.
        """
        options = call_options(options, deprecated)
        if not adapt:
            options = options.merged(AdaptOptions(inner_steps=0, embedding_steps=0))

        def probabilities(batch):
            return tf.sigmoid(self.forward(batch, options)["query_logits"])

        if tf.inside_function():
            return probabilities(self.encode(tasks))
        compiled = self.compiled_functions.get(
            ("query", options), probabilities, self.uses_xla
        )
        return compiled(self.encode(tasks))

    def embed(
        self,
        tasks: Mapping[str, tf.Tensor],
        options: AdaptOptions | Mapping[str, Any] | None = None,
        **deprecated,
    ) -> tf.Tensor:
        """Adapted meta embeddings `[T, d]` of raw `tasks` (meta features and
        support; without support, the default). Options as `predict_query`."""
        config = adaptation.inference_config(self, call_options(options, deprecated))

        def embedding(batch):
            fast, _ = self.inner_loop(batch, config)
            return self.adapted_embedding(batch, fast, config)

        if tf.inside_function():
            return embedding(self.encode(tasks))
        compiled = self.compiled_functions.get(
            ("embed", config), embedding, self.uses_xla
        )
        return compiled(self.encode(tasks))

    def score(
        self, meta_embedding: tf.Tensor, request: Mapping[str, tf.Tensor]
    ) -> tf.Tensor:
        """Online scoring: probabilities `[B]` from stored meta embeddings
        `[B, d]` and raw request features, each `[B]` (`[B, K]` multi-hot)."""
        encoded = self._global.encode(request)
        return tf.sigmoid(
            self._global.row_logits(
                tf.cast(meta_embedding, self.compute_dtype), encoded
            )
        )

    meta_embedding = deprecated_alias("meta_embedding", "embed", embed)
