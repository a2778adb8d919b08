"""LiMAMLModel: MAML on the meta block, as a Keras model.

`fit` runs the meta-train step: for a batch of T tasks, the inner loop takes k
gradient steps on each task's support loss with respect to the meta block only
(vectorized: the shared weights are tiled to `[T, in, out]` once and every
task's gradient comes out of one `tape.gradient` call on the summed loss), then
the outer step updates all variables from the query loss of the adapted model.
The inner loop is `tf_limaml.maml` (`tile`, `adapt`, `dense`); subclasses
change it through public hooks (`adaptable_variables`, `inner_lr`,
`support_loss`), and either block can be your own Keras layer (see
`LiMAMLModel`). With the library's blocks and scalar inner rates it runs as
`maml.adapt_dense`, which never forms a per-task copy of a kernel.

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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tf_limaml import maml
from tf_limaml.config import ADAPT_CHOICES, MetaConfig, as_meta_config  # noqa: F401
from tf_limaml.features import (
    LABEL_KEY,
    MASK_KEY,
    MULTI_HOT,
    NUMERIC,
    PARTS,
    QUERY,
    SUPPORT,
    Feature,
    FeatureSpec,
    load_spec,
)
from tf_limaml.layers import GlobalBlock, MetaBlock
from tf_limaml.optimizers import LazyAdam
from tf_limaml.sequence import SUPPORT_SEQUENCE_KEY

logger = logging.getLogger(__name__)

META_PREFIX = "meta_block/"
GLOBAL_PREFIX = "global_block/"
META_INPUTS = META_PREFIX + "inputs"
META_EMBEDDING_KEY = "meta_embedding"


class _IteratorDispatch:
    """Calls a tf.function through its concrete function for the iterator it
    was last given.

    A tf.function finds its concrete function by hashing the type spec of its
    arguments on every call, and an iterator's spec has one entry per tensor
    of the batch: with tens of features that lookup, in Python, costs as much
    as a small meta-train step. `fit` passes the same iterator for a whole
    epoch, so the lookup is done once per epoch instead.
    """

    def __init__(self, function):
        self.function = function
        self._iterator = None
        self._concrete = None

    def __call__(self, iterator):
        if self._iterator is None or self._iterator() is not iterator:
            self._concrete = self.function.get_concrete_function(iterator)
            self._iterator = weakref.ref(iterator)
        return self._concrete(iterator)


def _where_finite(finite: tf.Tensor, grad):
    """The gradient if the step is finite, else zeros of its shape."""
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(
            tf.where(finite, grad.values, tf.zeros_like(grad.values)),
            grad.indices,
            grad.dense_shape,
        )
    return tf.where(finite, grad, tf.zeros_like(grad))


def replica_mean(loss: tf.Tensor) -> tf.Tensor:
    """A replica's loss scaled so that the gradients the strategy sums across
    replicas are the mean over every task of the global batch."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss / tf.cast(replicas, loss.dtype)


def masked_task_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Per-task mean over real rows: sum(mask * v) / max(sum(mask), 1); [T, N] -> [T]."""
    return tf.reduce_sum(values * mask, axis=-1) / tf.maximum(
        tf.reduce_sum(mask, axis=-1), 1.0
    )


def _has_fast_weights(block: Any) -> bool:
    return callable(getattr(block, "adaptable_weights", None))


def _select(
    raw: Mapping[str, tf.Tensor], features: Sequence[Feature]
) -> dict[str, tf.Tensor]:
    missing = [f.name for f in features if f.name not in raw]
    if missing:
        raise KeyError(f"Missing feature(s) {missing}; got {sorted(raw)}")
    return {f.name: raw[f.name] for f in features}


def _example_features(
    features: Sequence[Feature], rows: int = 1
) -> dict[str, tf.Tensor]:
    """Raw feature tensors of `rows` rows, as a batch carries them (zeros and "")."""
    out = {}
    for feature in features:
        if feature.type == NUMERIC:
            out[feature.name] = tf.zeros([rows, *feature.shape], tf.float32)
        elif feature.type == MULTI_HOT:
            out[feature.name] = tf.fill([rows, feature.values_per_row], "")
        else:
            out[feature.name] = tf.fill([rows], "")
    return out


def _merge_task_axis(value: tf.Tensor) -> tf.Tensor:
    """[T, S, ...] -> [T * S, ...], keeping the static trailing shape."""
    trailing = value.shape[2:]
    if trailing.is_fully_defined():
        return tf.reshape(value, [-1, *trailing.as_list()])
    return tf.reshape(value, tf.concat([[-1], tf.shape(value)[2:]], axis=0))


@tf.keras.utils.register_keras_serializable(package="tf_limaml")
class LiMAMLModel(tf.keras.Model):
    """Meta block + global block, meta-trained with MAML on the meta block.

    The inner loop is `tf_limaml.maml` (tile, adapt, dense); this class is its
    Keras face: encoding, the meta-train step, metrics, and the public hooks a
    subclass overrides to change the inner loop:

    * `adaptable_variables()`: the weights the inner loop adapts, by name;
    * `inner_lr(name, config)`: the inner learning rate of one of them;
    * `support_loss(labels, logits, mask, config)`: the inner loop's loss.

    Args:
        spec: FeatureSpec (or its dict, or a path to its JSON).
        meta_config: MetaConfig (or its dict).
        meta_units: Meta block MLP widths; the last is d.
        global_units: Global block MLP widths before the logit.
        cross_layers: DCN-v2 cross layers in the global block.
        projection_dim: Low-rank cross layers (None: full rank).
        interaction: How the meta embedding enters the global block: "product"
            (concatenation plus an elementwise product with the projected
            request features) or "concat".
        l2: L2 penalty on the dense and cross kernels of the library's blocks:
            their `kernel_regularizer` is `tf.keras.regularizers.L2(l2)`. A block
            you pass brings its own regularizers instead. The meta-train loss
            adds every regularization loss of the model (`model.losses`), and
            reports their sum as `regularization_loss`.
        meta_block: Your own meta block instead of `MetaBlock(meta_units)`
            (see "Custom blocks").
        global_block: Your own global block instead of `GlobalBlock(...)`
            (see "Custom blocks"). `meta_units` and the global-block arguments
            are ignored for a block you pass.

    Inputs: a task batch from `tf_limaml.data.task_dataset` (raw features,
    labels and masks). `call` returns adapted query probabilities `[T, Q]`.

    Custom blocks:

    * **Global block**: any Keras layer or model that maps one dict, the meta
      embedding under `"meta_embedding"` (`[N, d]`) beside the request
      features by name (`[N]`, `[N, K]` multi-hot, `[N, n]` vectors), to logits
      `[N]` or `[N, 1]`:
      `logits = global_block({"meta_embedding": e, **request_features})`.
      That dict is exactly the input of the export's `serving_default`. The
      model flattens the task axis for it (`N = T * S`) and restores it after.
      With `adapt="all"` the global block must also have fast weights (below),
      and then gets task-shaped inputs (`[T, d]`, `[T, S, ...]`) as ours does.
    * **Meta block**: any layer with fast weights: `adaptable_weights() ->
      dict[name, tf.Variable]` and `call(inputs, weights=None) -> [T, d]`,
      where `inputs` is the dict of meta features and `weights` (name ->
      tensor) replaces those variables, possibly with a leading task axis
      (`[T, *shape]`: task t runs with slice t; `tf_limaml.maml.dense` does
      the per-task matmul).
    * **Strings and XLA**: the meta-train step is XLA-compiled, and string ops
      (StringLookup, hashing) cannot be. A block with `encode(raw) -> encoded`
      has it run outside the compiled step, on the raw features, and gets its
      output instead; a block without it gets the raw features, and if any of
      them is a string the step runs without XLA (logged once).

    Example (a global block written as an ordinary Keras model):

        class Ranker(tf.keras.Model):
            def __init__(self, items):
                super().__init__()
                self.lookup = tf.keras.layers.StringLookup(vocabulary=items)
                self.item = tf.keras.layers.Embedding(len(items) + 1, 8)
                self.tower = tf.keras.Sequential(
                    [tf.keras.layers.Dense(32, "relu"), tf.keras.layers.Dense(1)]
                )

            def call(self, features):
                item = self.item(self.lookup(features["item_id"]))
                return self.tower(
                    tf.concat([features["meta_embedding"], item], axis=-1)
                )

        model = tf_limaml.LiMAMLModel(spec, global_block=Ranker(items))
    """

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        # tf.functions kept outside Keras attribute tracking (they are caches).
        object.__setattr__(self, "_function_cache", {})
        self.spec = load_spec(spec)
        self.meta_config = as_meta_config(meta_config)
        if not isinstance(l2, (int, float)) or l2 < 0:
            raise ValueError(f"`l2` must be a number >= 0, got {l2!r}")
        self.l2 = float(l2)
        for key, block in (("meta_block", meta_block), ("global_block", global_block)):
            if block is not None and not isinstance(block, tf.keras.layers.Layer):
                raise ValueError(
                    f"`{key}` must be a Keras layer or model, got {block!r}"
                )
        # Blocks passed in are serialized into the config; ours are rebuilt
        # from the architecture arguments.
        self._custom_meta_block = meta_block is not None
        self._custom_global_block = global_block is not None
        if self.l2 and (self._custom_meta_block or self._custom_global_block):
            logger.warning(
                "`l2` regularizes the library's blocks only; give your own "
                "block's weights a regularizer (add_weight(regularizer=...) or "
                "kernel_regularizer=...), which the loss picks up from "
                "`model.losses`."
            )
        kernel_regularizer = tf.keras.regularizers.L2(self.l2) if self.l2 else None
        if meta_block is None:
            meta_block = MetaBlock(
                self.spec.meta_features,
                units=meta_units,
                kernel_regularizer=kernel_regularizer,
                name="meta_block",
            )
            meta_block.build(None)
        self.meta_block = meta_block
        self._check_meta_block()
        self._meta_dim = self._build_meta_block()
        if global_block is None:
            global_block = GlobalBlock(
                self.spec.request_features,
                meta_dim=self._meta_dim,
                interaction=interaction,
                cross_layers=cross_layers,
                projection_dim=projection_dim,
                units=global_units,
                kernel_regularizer=kernel_regularizer,
                name="global_block",
            )
            global_block.build(None)
        self.global_block = global_block
        self._build_global_block()
        self._check_global_block()
        # Every weight exists now (no input-shape inference is needed), so
        # checkpoints restore and BackupAndRestore works before the first batch.
        self.built = True
        # One pointwise loss object: the inner loop reduces it per task, and the
        # TFRS ranking task uses it for the reported query loss and AUC.
        self.pointwise_loss = tf.keras.losses.BinaryCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE
        )
        self.task = tfrs.tasks.Ranking(
            loss=self.pointwise_loss,
            metrics=[tf.keras.metrics.AUC(from_logits=True, name="auc")],
        )
        # Learned rates (Meta-SGD) for every weight the configured `adapt`
        # can adapt, created here so that checkpoints restore before the first
        # batch. A subclass that narrows `adaptable_variables()` leaves the
        # other rates unused (`inner_lrs` lists the used ones).
        self._learned_inner_lrs: dict[str, tf.Variable] = {}
        if self.meta_config.learn_inner_lr:
            for name, variable in self._configured_adaptable_variables().items():
                self._learned_inner_lrs[name] = self.add_weight(
                    name=f"inner_lr/{name}",
                    shape=variable.shape,
                    trainable=True,
                    initializer=tf.keras.initializers.Constant(
                        self.meta_config.inner_lr
                    ),
                )
            if self.meta_config.adapt_embeddings:
                self._learned_inner_lrs[META_INPUTS] = self.add_weight(
                    name="inner_lr/meta_inputs",
                    shape=(self.meta_block.input_dim,),
                    trainable=True,
                    initializer=tf.keras.initializers.Constant(
                        self.meta_config.inner_lr
                    ),
                )
        self._trackers = {
            name: tf.keras.metrics.Mean(name=name)
            for name in ("loss", "support_loss", "query_loss", "regularization_loss")
        }
        self.loss_tracker = self._trackers["loss"]
        self.support_loss_tracker = self._trackers["support_loss"]
        self.query_loss_tracker = self._trackers["query_loss"]
        self.regularization_loss_tracker = self._trackers["regularization_loss"]
        self._config = {
            "meta_units": list(meta_units),
            "global_units": list(global_units),
            "cross_layers": cross_layers,
            "projection_dim": projection_dim,
            "interaction": interaction,
            "l2": self.l2,
        }
        self._xla_blocker = self._find_xla_blocker()
        # Whether `encode` is plain math (the library's blocks and no string
        # feature), so the compiled train step can start from the raw batch.
        self._encode_compiles = (
            isinstance(self.meta_block, MetaBlock)
            and isinstance(self.global_block, GlobalBlock)
            and all(f.type == NUMERIC for f in self.spec.features)
        )
        if self.meta_config.jit_compile and self._xla_blocker:
            logger.warning(
                "The meta-train step runs without XLA: %s. Give the block an "
                "`encode(raw) -> encoded` method that does its string work and "
                "returns numbers; it runs outside the compiled step.",
                self._xla_blocker,
            )
        # Entity ids of the last non-finite step, kept on the host: a string
        # variable cannot exist under MultiWorkerMirroredStrategy, which
        # broadcasts every variable's initial value (strings cannot be).
        object.__setattr__(self, "_nonfinite_record", {"step": -1, "ids": []})

    # --------------------------------------------------------------- blocks
    def _build_meta_block(self) -> int:
        """Creates a custom meta block's weights now; returns d."""
        if isinstance(self.meta_block, MetaBlock):
            return self.meta_block.output_dim
        meta = self._encode_meta(_example_features(self.spec.meta_features))
        if self._reads_support:
            embedding = self.meta_block(meta, weights=None, batch_size=1)
        else:
            embedding = self.meta_block(meta, weights=None)
        if embedding.shape.rank != 2 or embedding.shape[-1] is None:
            raise ValueError(
                f"`meta_block` must return a meta embedding [T, d]; "
                f"{self.meta_block.name!r} returned shape {embedding.shape}"
            )
        return int(embedding.shape[-1])

    def _build_global_block(self) -> None:
        """Creates a custom global block's weights now (one call on a dummy row)."""
        if isinstance(self.global_block, GlobalBlock):
            return
        request = self._encode_request(_example_features(self.spec.request_features))
        embedding = tf.zeros([1, self._meta_dim], self.compute_dtype)
        self._row_logits(embedding, request)

    def _check_meta_block(self) -> None:
        if not _has_fast_weights(self.meta_block):
            raise ValueError(
                f"`meta_block` {self.meta_block.name!r} has no fast weights: it needs "
                "`adaptable_weights() -> dict[name, tf.Variable]` and "
                "`call(inputs, weights=None)` (see LiMAMLModel's docstring)"
            )
        if self.meta_config.adapt_embeddings and not isinstance(
            self.meta_block, MetaBlock
        ):
            raise ValueError(
                "MetaConfig(adapt_embeddings=True) needs the library's MetaBlock; "
                f"got {type(self.meta_block).__name__}"
            )

    @property
    def _reads_support(self) -> bool:
        """Whether the meta block reads the support sequence (`reads_support`)."""
        return bool(getattr(self.meta_block, "reads_support", False))

    @property
    def _shares_request_embedding(self) -> bool:
        return self._reads_support and (
            getattr(self.meta_block, "request_embedding", None) == "shared"
        )

    def _check_global_block(self) -> None:
        if self._shares_request_embedding:
            block = self.global_block
            width = getattr(self.meta_block, "request_dim", None)
            if not isinstance(block, GlobalBlock) or (
                width is not None and block.embedding.output_dim != width
            ):
                raise ValueError(
                    f"The meta block {self.meta_block.name!r} shares the global "
                    "block's request embeddings (request_embedding='shared'), "
                    "which needs the library GlobalBlock over the same request "
                    "features; use request_embedding='own' with your own "
                    "global block"
                )
        if self.meta_config.adapt == "all" and not _has_fast_weights(self.global_block):
            raise ValueError(
                f"MetaConfig(adapt='all') adapts the global block, but "
                f"{self.global_block.name!r} has no fast weights "
                "(`adaptable_weights()` and `call(inputs, weights=None)`); use "
                "adapt='meta_block'"
            )

    def _find_xla_blocker(self) -> str | None:
        """Why the step cannot compile with XLA (a block gets raw strings), or None."""
        for role, block, features in (
            ("meta_block", self.meta_block, self.spec.meta_features),
            ("global_block", self.global_block, self.spec.request_features),
        ):
            if isinstance(block, (MetaBlock, GlobalBlock)):
                continue  # their `encode` returns numbers
            if hasattr(block, "encode"):
                encoded = block.encode(_example_features(features))
                strings = sorted(
                    k for k, v in encoded.items() if tf.as_dtype(v.dtype) == tf.string
                )
                if strings:
                    return (
                        f"{role} {block.name!r}'s `encode` step returns the string "
                        f"features {strings}"
                    )
                continue
            strings = [f.name for f in features if f.type != NUMERIC]
            if strings:
                return (
                    f"{role} {block.name!r} has no `encode` step and reads the "
                    f"string features {strings}"
                )
        return None

    @property
    def _xla(self) -> bool:
        """Whether the step compiles with XLA (asked for and possible)."""
        return self.meta_config.jit_compile and self._xla_blocker is None

    def _encode_meta(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        if hasattr(self.meta_block, "encode"):
            return self.meta_block.encode(raw)
        return _select(raw, self.spec.meta_features)

    def _encode_request(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        if hasattr(self.global_block, "encode"):
            return self.global_block.encode(raw)
        return _select(raw, self.spec.request_features)

    def _embed(
        self,
        encoded: Mapping[str, Any],
        weights: Mapping[str, tf.Tensor] | None,
    ) -> tf.Tensor:
        """Meta embedding [T, d] from an encoded batch and fast weights."""
        meta, batch_size = encoded["meta"], encoded["batch_size"]
        if isinstance(self.meta_block, MetaBlock):
            return self.meta_block.call(meta, weights=weights, batch_size=batch_size)
        if self._reads_support:
            return self.meta_block(
                self._meta_inputs(encoded), weights=weights, batch_size=batch_size
            )
        return self.meta_block(meta, weights=weights)

    def _meta_inputs(self, encoded: Mapping[str, Any]) -> dict[str, Any]:
        """A support-reading meta block's input: the meta features and, when
        the batch has a support part, the sequence under SUPPORT_SEQUENCE_KEY."""
        inputs = dict(encoded["meta"])
        if SUPPORT not in encoded:
            return inputs
        if "support_label" not in encoded:
            raise KeyError(
                f"The meta block {self.meta_block.name!r} reads the support "
                "sequence, which needs the support labels"
            )
        sequence = {
            "features": encoded.get("support_sequence", encoded[SUPPORT]),
            "label": encoded["support_label"],
            "mask": encoded["support_mask"],
        }
        if self._shares_request_embedding:
            # Inside the differentiated step, so the shared tables learn here too.
            sequence["embedded"] = self.global_block.embedding(encoded[SUPPORT])
        inputs[SUPPORT_SEQUENCE_KEY] = sequence
        return inputs

    def _row_logits(
        self, embedding: tf.Tensor, request: Mapping[str, tf.Tensor]
    ) -> tf.Tensor:
        """Logits [N] of rows: the global block on {"meta_embedding": [N, d], ...}."""
        if isinstance(self.global_block, GlobalBlock):
            return self.global_block.call(embedding, request)
        logits = self.global_block({META_EMBEDDING_KEY: embedding, **request})
        if logits.shape.rank == 2 and logits.shape[-1] == 1:
            logits = tf.squeeze(logits, axis=-1)
        if logits.shape.rank != 1:
            raise ValueError(
                f"`global_block` must return logits [N] or [N, 1]; "
                f"{self.global_block.name!r} returned shape {logits.shape}"
            )
        return tf.cast(logits, embedding.dtype)

    def _task_logits(
        self,
        embedding: tf.Tensor,
        request: Mapping[str, tf.Tensor],
        weights: Mapping[str, tf.Tensor] | None,
    ) -> tf.Tensor:
        """Logits [T, S] from embeddings [T, d] and request features [T, S, ...]."""
        block = self.global_block
        if isinstance(block, GlobalBlock):
            return block.call(embedding, request, weights=weights)
        if _has_fast_weights(block) and weights:
            return block({META_EMBEDDING_KEY: embedding, **request}, weights=weights)
        rows_shape = tf.shape(next(iter(request.values())))[:2]
        rows = {k: _merge_task_axis(v) for k, v in request.items()}
        per_row = tf.reshape(
            tf.broadcast_to(
                embedding[:, None, :],
                tf.concat([rows_shape, tf.shape(embedding)[-1:]], axis=0),
            ),
            [-1, self._meta_dim],
        )
        return tf.reshape(self._row_logits(per_row, rows), rows_shape)

    # --------------------------------------------------------------- config
    @property
    def meta_dim(self) -> int:
        return self._meta_dim

    @property
    def meta_config(self) -> MetaConfig:
        """The inner-loop options. Assign a new one to change the test-time
        knobs (steps, rates, prior); what shapes the weights (`adapt`,
        `learn_inner_lr`, `adapt_embeddings`) is fixed at construction."""
        return self._meta_config

    @meta_config.setter
    def meta_config(self, config: MetaConfig | Mapping[str, Any]) -> None:
        config = as_meta_config(config)
        current = self.__dict__.get("_meta_config")
        if current is not None:
            fixed = [
                name
                for name in ("adapt", "learn_inner_lr", "adapt_embeddings")
                if getattr(config, name) != getattr(current, name)
            ]
            if fixed:
                raise ValueError(
                    f"MetaConfig fields {fixed} shape the model's weights and cannot "
                    f"change after construction (from {current!r} to {config!r}); "
                    "build a new model"
                )
            # Traced functions read the config at trace time.
            self._function_cache.clear()
        self._meta_config = config

    def get_config(self) -> dict[str, Any]:
        config = {
            "name": self.name,
            "spec": self.spec.to_dict(),
            "meta_config": self.meta_config.to_dict(),
            **self._config,
        }
        for key, custom in (
            ("meta_block", self._custom_meta_block),
            ("global_block", self._custom_global_block),
        ):
            if custom:
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

    def with_meta_config(self, **changes) -> MetaConfig:
        return dataclasses.replace(self.meta_config, **changes)

    # --------------------------------------------------------------- inputs
    def encode(self, batch: Mapping[str, tf.Tensor]) -> dict[str, Any]:
        """Raw task batch -> numeric tensors (string lookups happen here, outside XLA).

        Parts (support, query) whose features are absent from the batch are
        left out; a missing mask means every row is real.
        """
        spec = self.spec
        missing = [f.name for f in spec.meta_features if f.name not in batch]
        if missing:
            raise KeyError(
                f"Task batch lacks meta feature(s) {missing}; it has "
                f"{sorted(batch)}"
            )
        encoded: dict[str, Any] = {
            "meta": self._encode_meta(
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
            encoded[part] = self._encode_request({n: batch[k] for n, k in keys.items()})
            first = batch[keys[spec.request_features[0].name]]
            rows_shape = tf.shape(first)[:2]
            mask_key = spec.batch_key(part, MASK_KEY)
            mask = batch[mask_key] if mask_key in batch else tf.ones(rows_shape, dtype)
            encoded[f"{part}_mask"] = tf.cast(mask, dtype)
            label_key = spec.batch_key(part, LABEL_KEY)
            if label_key in batch:
                encoded[f"{part}_label"] = tf.cast(batch[label_key], dtype)
            encoded["batch_size"] = rows_shape[0]
        if (
            SUPPORT in encoded
            and self._reads_support
            and not self._shares_request_embedding
            and hasattr(self.meta_block, "encode_support")
        ):
            # The block's own tables read the support rows in its own encoding.
            encoded["support_sequence"] = self.meta_block.encode_support(
                {
                    f.name: batch[spec.batch_key(SUPPORT, f.name)]
                    for f in spec.request_features
                }
            )
        if "batch_size" not in encoded:
            if spec.meta_features:
                encoded["batch_size"] = tf.shape(batch[spec.meta_features[0].name])[0]
            else:
                encoded["batch_size"] = tf.shape(batch["entity_id"])[0]
        return encoded

    # ---------------------------------------------------------------- hooks
    def adaptable_variables(self) -> dict[str, tf.Variable]:
        """The weights the inner loop adapts, by name.

        The meta block's `adaptable_weights()` as "meta_block/<name>"; with
        `MetaConfig(adapt="all")` also the global block's as
        "global_block/<name>". Override to adapt fewer (e.g. only a last bias).
        """
        return self._configured_adaptable_variables()

    def _configured_adaptable_variables(self) -> dict[str, tf.Variable]:
        params = {
            META_PREFIX + k: v for k, v in self.meta_block.adaptable_weights().items()
        }
        if self.meta_config.adapt == "all":
            params.update(
                {
                    GLOBAL_PREFIX + k: v
                    for k, v in self.global_block.adaptable_weights().items()
                }
            )
        return params

    @property
    def inner_lrs(self) -> dict[str, tf.Variable]:
        """Learned inner rates (Meta-SGD) of the adapted weights; {} when not learned."""
        used = set(self.adaptable_variables()) | {META_INPUTS}
        return {k: v for k, v in self._learned_inner_lrs.items() if k in used}

    def inner_lr(
        self, name: str, config: MetaConfig | None = None
    ) -> float | tf.Tensor | tf.Variable:
        """The inner learning rate of adapted weight `name` (a key of
        `adaptable_variables()`, or "meta_block/inputs" for the adapted
        meta-feature embeddings).

        Args:
            name: The weight's name.
            config: The MetaConfig in force for this call (per-call overrides
                included); None for `meta_config`.

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
            return self._per_task_loss(labels, logits, mask)
        pointwise = self.pointwise_loss(labels[..., None], logits[..., None])
        return tf.reduce_sum(pointwise * mask, axis=-1) / (
            tf.reduce_sum(mask, axis=-1) + tf.cast(prior, pointwise.dtype)
        )

    # ---------------------------------------------------------- inner loop
    def _initial_fast_weights(
        self, encoded: Mapping[str, Any], config: MetaConfig | None = None
    ) -> dict[str, tf.Tensor]:
        tasks = encoded["batch_size"]
        fast = maml.tile(self.adaptable_variables(), tasks)
        if (config or self.meta_config).adapt_embeddings:
            fast[META_INPUTS] = self.meta_block.embed_inputs(encoded["meta"], tasks)
        return fast

    def _logits(
        self,
        encoded: Mapping[str, Any],
        part: str,
        fast: Mapping[str, tf.Tensor] | None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        fast = fast or {}
        meta_w = {
            k[len(META_PREFIX) :]: v
            for k, v in fast.items()
            if k.startswith(META_PREFIX)
        }
        global_w = {
            k[len(GLOBAL_PREFIX) :]: v
            for k, v in fast.items()
            if k.startswith(GLOBAL_PREFIX)
        }
        embedding = self._embed(encoded, meta_w)
        logits = self._task_logits(embedding, encoded[part], global_w)
        return logits, embedding

    def _per_task_loss(
        self, labels: tf.Tensor, logits: tf.Tensor, mask: tf.Tensor
    ) -> tf.Tensor:
        """The plain masked mean per task (the query loss)."""
        pointwise = self.pointwise_loss(labels[..., None], logits[..., None])
        return masked_task_mean(pointwise, mask)

    def _inner_loop(
        self,
        encoded: Mapping[str, Any],
        steps: int,
        first_order: bool,
        config: MetaConfig | None = None,
    ) -> tuple[dict[str, tf.Tensor], tf.Tensor | None]:
        """k support steps; returns fast weights and the pre-adaptation support loss [T]."""
        config = config or self.meta_config

        def task_loss(fast):
            logits, _ = self._logits(encoded, SUPPORT, fast)
            return self.support_loss(
                encoded["support_label"], logits, encoded["support_mask"], config
            )

        params = self.adaptable_variables()
        rates = {name: self.inner_lr(name, config) for name in params}
        if self._adapts_dense_only(config, params, rates):
            # No per-task copy of any weight (see `maml.adapt_dense`).
            return maml.adapt_dense(task_loss, params, steps, rates, first_order)
        fast = self._initial_fast_weights(encoded, config)
        if not steps:
            return fast, None
        if META_INPUTS in rates:
            # Only looked-up embedding rows adapt, not numeric inputs.
            inputs_mask = self.meta_block.embedding_input_mask()
            rates[META_INPUTS] = (
                tf.cast(rates[META_INPUTS], inputs_mask.dtype) * inputs_mask
            )
        return maml.adapt(task_loss, fast, steps, rates, first_order)

    def _adapts_dense_only(
        self,
        config: MetaConfig,
        params: Mapping[str, tf.Variable],
        rates: Mapping[str, Any],
    ) -> bool:
        """Whether the inner loop can run as `maml.adapt_dense`: the library's
        blocks use every adapted weight only through `maml.dense`, and the
        rates are scalars (not Meta-SGD's per-weight rates)."""
        if config.adapt_embeddings or not isinstance(self.meta_block, MetaBlock):
            return False
        if config.adapt == "all" and not isinstance(self.global_block, GlobalBlock):
            return False
        if not set(params) <= set(self._configured_adaptable_variables()):
            return False
        return all(
            isinstance(rate, (int, float)) or tf.convert_to_tensor(rate).shape.rank == 0
            for rate in rates.values()
        )

    def _forward(
        self,
        encoded: Mapping[str, Any],
        steps: int,
        first_order: bool,
        config: MetaConfig | None = None,
    ) -> dict[str, tf.Tensor]:
        """Adapt on support, score query; all the meta-train math, no metrics."""
        fast, support_loss = self._inner_loop(encoded, steps, first_order, config)
        logits, embedding = self._logits(encoded, QUERY, fast)
        out = {"query_logits": logits, "meta_embedding": embedding}
        if "query_label" in encoded:
            per_task = self._per_task_loss(
                encoded["query_label"], logits, encoded["query_mask"]
            )
            has_query = tf.cast(
                tf.reduce_sum(encoded["query_mask"], -1) > 0, per_task.dtype
            )
            out["query_loss"] = tf.reduce_sum(per_task * has_query) / tf.maximum(
                tf.reduce_sum(has_query), 1.0
            )
            if support_loss is None:
                support_loss = self._per_task_loss(
                    encoded["support_label"],
                    self._logits(encoded, SUPPORT, fast)[0],
                    encoded["support_mask"],
                )
            out["support_loss"] = tf.reduce_mean(support_loss)
            out["regularization_loss"] = self._regularization_loss(logits.dtype)
            out["loss"] = out["query_loss"] + out["regularization_loss"]
        return out

    def _regularization_loss(self, dtype) -> tf.Tensor:
        """Sum of the model's regularization losses (`self.losses`), on the
        variables: fast weights are tensors and carry none."""
        losses = [tf.cast(loss, dtype) for loss in self.losses]
        return tf.add_n(losses) if losses else tf.constant(0.0, dtype)

    def _meta_gradients(self, encoded: Mapping[str, Any]):
        cfg = self.meta_config
        with tf.GradientTape() as tape:
            out = self._forward(encoded, cfg.inner_steps, cfg.first_order)
            scaled = replica_mean(out["loss"])
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        grads = [
            tf.zeros_like(v) if g is None else g
            for g, v in zip(grads, variables, strict=True)
        ]
        # Checked here so that XLA fuses the checks into the step.
        finite = tf.math.is_finite(out["loss"])
        for grad in grads:
            values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(values)))
        out["finite"] = finite
        return grads, out

    def _function(self, key: str, fn: Callable, jit: bool) -> Callable:
        cache = self._function_cache
        if key not in cache:
            cache[key] = tf.function(fn, jit_compile=jit, reduce_retracing=True)
        return cache[key]

    # ------------------------------------------------------------- Keras API
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
        self.train_function = _IteratorDispatch(train_function)
        return self.train_function

    def train_step(self, batch):
        if not tf.distribute.has_strategy():
            # One compiled function for the whole step (gradients, update and
            # metrics): on small networks the ops around the step, each run
            # on its own by the executor, cost as much as the step's math.
            # Not under a strategy, even of one replica: its apply_gradients
            # synchronizes (merge_call), which a nested function cannot.
            if self._encode_compiles:
                # No string to look up: encoding joins the compiled step too.
                batch = {k: tf.convert_to_tensor(v) for k, v in batch.items()}
                numbers = {k: v for k, v in batch.items() if v.dtype != tf.string}
                step = self._function(
                    "train_step_raw",
                    lambda raw: self._apply_step(self.encode(raw)),
                    self._xla,
                )
                logs, finite = step(numbers)
            else:
                step = self._function("train_step", self._apply_step, self._xla)
                logs, finite = step(self.encode(batch))
        else:
            # The all-reduce of the update stays outside the compiled part.
            encoded = self.encode(batch)
            step = self._function("meta_gradients", self._meta_gradients, self._xla)
            grads, out = step(encoded)
            finite = out["finite"]
            grads = [self._dense_table_gradient(g) for g in grads]
            self._apply_gradients(grads, finite)
            logs = self._update_metrics(encoded, out)
        if "entity_id" in batch:
            entity_ids = batch["entity_id"]
            if entity_ids.dtype != tf.string:
                entity_ids = tf.strings.as_string(entity_ids)
            tf.cond(
                finite,
                lambda: tf.constant(True),
                lambda: self._record_nonfinite(entity_ids),
            )
        return logs

    # Embedding tables of at most this many numbers (rows x dim) have their
    # sparse gradient applied dense; larger ones are applied sparse (see
    # `_dense_table_gradient`). Set it on a model before its first step.
    dense_table_limit: int = 1 << 22

    def _apply_step(self, encoded: Mapping[str, Any]):
        grads, out = self._meta_gradients(encoded)
        grads = [self._dense_table_gradient(g) for g in grads]
        self._apply_gradients(grads, out["finite"])
        return self._update_metrics(encoded, out), out["finite"]

    def _dense_table_gradient(self, grad):
        """An embedding table's sparse gradient as a dense one, for small tables.

        Keras's optimizers update every row of a table either way (Adam's
        moments decay on all rows; for the others an unused row's update is
        zero), but their sparse path first merges duplicate ids with
        `tf.unique`, which XLA compiles to sorts: 1.6 ms of a 13 ms reference
        step for six tables. Done on every path (compiled or not, distributed
        or not), so that `LazyAdam` is Adam for these tables wherever the
        step runs. Kept sparse for other optimizers (a lazy one skips unused
        rows) and for tables of more than `dense_table_limit` numbers: there
        the dense work is the table's size (128 MB a pass for 1M x 32), and
        `LazyAdam` updates only the looked-up rows.
        """
        if (
            not isinstance(grad, tf.IndexedSlices)
            or not (
                isinstance(self.optimizer, LazyAdam)
                or type(self.optimizer).__module__.startswith("tf_keras.")
            )
            or grad.dense_shape is None
        ):
            return grad
        shape = tf.get_static_value(grad.dense_shape)
        if shape is None or int(np.prod(shape)) > self.dense_table_limit:
            return grad
        return tf.convert_to_tensor(grad)

    def _apply_gradients(self, grads, finite: tf.Tensor) -> None:
        # A non-finite step must not poison the weights. Zeroed gradients are
        # not enough on their own: Adam's moments would still move every
        # weight. On one device the update is skipped; under a distribution
        # strategy (even of one replica) the all-reduce must stay
        # unconditional, so zeroing it is.
        grads = [_where_finite(finite, g) for g in grads]
        pairs = list(zip(grads, self.trainable_variables, strict=True))
        if tf.distribute.has_strategy():
            self.optimizer.apply_gradients(pairs)
            return

        def apply():
            self.optimizer.apply_gradients(pairs)
            return tf.constant(True)

        tf.cond(finite, apply, lambda: tf.constant(False))

    def _record_nonfinite(self, entity_ids: tf.Tensor) -> tf.Tensor:
        def record(step, ids):
            # Each replica reports its share of the step's batch.
            if self._nonfinite_record["step"] != step:
                self._nonfinite_record.update(step=step, ids=[])
            self._nonfinite_record["ids"].extend(ids.tolist())
            return False

        flag = tf.numpy_function(
            record, [self.optimizer.iterations, entity_ids], tf.bool, stateful=True
        )
        return tf.ensure_shape(flag, [])

    @property
    def nonfinite_entities(self) -> list[str]:
        """Entity ids of the last batch whose loss or gradients were not finite."""
        return [e.decode("utf-8", "replace") for e in self._nonfinite_record["ids"]]

    def test_step(self, batch):
        encoded = self.encode(batch)
        cfg = self.meta_config
        forward = self._function(
            f"forward_{cfg.inner_steps}_{cfg.first_order}",
            lambda e: self._forward(e, cfg.inner_steps, True),
            self._xla,
        )
        return self._update_metrics(encoded, forward(encoded))

    def _update_metrics(self, encoded, out) -> dict[str, tf.Tensor]:
        for name, tracker in self._trackers.items():
            tracker.update_state(out[name])
        mask = tf.reshape(encoded["query_mask"], [-1])
        self.task(
            labels=tf.reshape(encoded["query_label"], [-1, 1]),
            predictions=tf.reshape(out["query_logits"], [-1, 1]),
            sample_weight=mask,
            compute_metrics=True,
        )
        return {m.name: m.result() for m in self.metrics}

    @property
    def metrics(self):
        return list(self._trackers.values()) + list(self.task.metrics)

    def call(self, batch, training=False):
        return self.predict_query(batch)

    # ------------------------------------------------------------ public API
    def _steps(self, steps: int | None) -> int:
        steps = self.meta_config.inner_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"`steps` must be an integer >= 0, got {steps!r}")
        return steps

    def _call_config(
        self, inner_lr: float | None = None, support_prior: float | None = None
    ) -> MetaConfig:
        """`meta_config` with this call's overrides (validated by MetaConfig)."""
        changes = {"inner_lr": inner_lr, "support_prior": support_prior}
        changes = {k: v for k, v in changes.items() if v is not None}
        return self.with_meta_config(**changes) if changes else self.meta_config

    def adapt(
        self,
        tasks: Mapping[str, tf.Tensor],
        steps: int | None = None,
        first_order: bool | None = None,
        inner_lr: float | None = None,
        support_prior: float | None = None,
    ) -> dict[str, tf.Tensor]:
        """Runs the inner loop on the tasks' support sets.

        Args:
            tasks: A task batch (support features, labels and mask).
            steps: Inner steps; defaults to `meta_config.inner_steps`.
            first_order: Defaults to `meta_config.first_order`.
            inner_lr: Scalar inner learning rate for this call (learned rates,
                when the model has them, win); defaults to `meta_config.inner_lr`.
            support_prior: `MetaConfig.support_prior` for this call.

        Returns:
            Fast weights by name, each with a leading task axis `[T, ...]`.
        """
        first_order = (
            self.meta_config.first_order if first_order is None else first_order
        )
        config = self._call_config(inner_lr, support_prior)
        encoded = self.encode(tasks)
        fast, _ = self._inner_loop(encoded, self._steps(steps), first_order, config)
        # The dense-only inner loop keeps kernels factored and leaves what it
        # did not adapt shared: give every weight its task axis.
        return maml.materialize(fast, self.adaptable_variables(), encoded["batch_size"])

    def meta_embedding(
        self,
        tasks: Mapping[str, tf.Tensor],
        steps: int | None = None,
        inner_lr: float | None = None,
        support_prior: float | None = None,
    ) -> tf.Tensor:
        """Adapted meta embeddings `[T, d]`; tasks without support get the default.

        Args:
            tasks: A task batch.
            steps: Inner steps; defaults to `meta_config.inner_steps`.
            inner_lr: Scalar inner learning rate for this call.
            support_prior: `MetaConfig.support_prior` for this call.
        """
        steps = self._steps(steps)
        config = self._call_config(inner_lr, support_prior)
        fn = self._function(
            f"embedding_{steps}_{inner_lr}_{support_prior}",
            lambda e: self._embedding(e, steps, config),
            self._xla,
        )
        return fn(self.encode(tasks))

    def _embedding(self, encoded, steps, config: MetaConfig | None = None):
        fast, _ = self._inner_loop(encoded, steps, True, config)
        meta_w = {
            k[len(META_PREFIX) :]: v
            for k, v in fast.items()
            if k.startswith(META_PREFIX)
        }
        return self._embed(encoded, meta_w)

    def predict_query(
        self,
        tasks: Mapping[str, tf.Tensor],
        adapt: bool = True,
        steps: int | None = None,
        inner_lr: float | None = None,
        support_prior: float | None = None,
    ) -> tf.Tensor:
        """Query click probabilities `[T, Q]` (padding rows included; see the mask).

        Args:
            tasks: A task batch.
            adapt: Adapt on the support set first (False: the meta-learned
                default, as for a member with no history).
            steps: Inner steps; defaults to `meta_config.inner_steps`.
            inner_lr: Scalar inner learning rate for this call (learned rates,
                when the model has them, win).
            support_prior: `MetaConfig.support_prior` for this call.
        """
        steps = self._steps(steps) if adapt else 0
        config = self._call_config(inner_lr, support_prior)
        fn = self._function(
            f"query_{steps}_{inner_lr}_{support_prior}",
            lambda e: tf.sigmoid(self._forward(e, steps, True, config)["query_logits"]),
            self._xla,
        )
        return fn(self.encode(tasks))

    # Traceable forms (no caching): for use inside the caller's own tf.function,
    # e.g. the export signatures.
    def compute_query_logits(
        self,
        tasks: Mapping[str, tf.Tensor],
        steps: int | None = None,
        inner_lr: float | None = None,
        support_prior: float | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """(query logits [T, Q], adapted meta embedding [T, d]), traceable.

        `inner_lr` and `support_prior` override `meta_config` for this call.
        """
        config = self._call_config(inner_lr, support_prior)
        out = self._forward(self.encode(tasks), self._steps(steps), True, config)
        return out["query_logits"], out["meta_embedding"]

    def compute_meta_embedding(
        self,
        tasks: Mapping[str, tf.Tensor],
        steps: int | None = None,
        inner_lr: float | None = None,
        support_prior: float | None = None,
    ) -> tf.Tensor:
        """Adapted meta embedding [T, d] from meta features and support, traceable.

        `inner_lr` and `support_prior` override `meta_config` for this call.
        """
        config = self._call_config(inner_lr, support_prior)
        return self._embedding(self.encode(tasks), self._steps(steps), config)

    def score(
        self, meta_embedding: tf.Tensor, request: Mapping[str, tf.Tensor]
    ) -> tf.Tensor:
        """Online scoring: probabilities `[B]` from stored meta embeddings `[B, d]`.

        Args:
            meta_embedding: `[B, d]`, one row per request.
            request: Raw request features by name, each `[B]` (`[B, K]` multi-hot).
        """
        encoded = self._encode_request(request)
        return tf.sigmoid(
            self._row_logits(tf.cast(meta_embedding, self.compute_dtype), encoded)
        )


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
