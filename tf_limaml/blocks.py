"""The block protocol: what LiMAMLModel asks of its meta block and global block.

A **meta block** turns the entity-level features (and, if it says so, the
support sequence) into the meta embedding `[T, d]`; a **global block** scores
request rows given that embedding. The inner loop adapts a block's *fast
weights*: tensors that replace its variables for one call, possibly with a
leading task axis (`[T, *shape]`: task t runs with slice t).

The library's blocks (`MetaBlock`, `GlobalBlock`, `SequenceMetaBlock`) derive
from `FastWeightLayer`, the public base to extend, and implement the protocol
in full. Any Keras layer that maps `{"meta_embedding": e, **request}` to
logits is a global block; a layer with `adaptable_weights()` and
`call(inputs, weights=None)` is a meta block. `MetaBlockAdapter` and
`GlobalBlockAdapter` give such layers the parts of the protocol they leave
out (an `encode` step, the capability attributes), so the model runs one code
path whatever the blocks are.

Capabilities are attributes, never type checks:

* `reads_support`: the meta block reads the support sequence, under
  `SUPPORT_SEQUENCE_KEY` of its inputs.
* `fast_dense_path`: every adapted weight is used only through
  `tf_limaml.maml.dense`, so the inner loop may run as `maml.adapt_dense`
  (no per-task copy of a kernel).
* `encode_compiles`: `encode` is plain math when every feature is numeric, so
  the compiled step may start from the raw batch.
* `adapts_input_embeddings`: the meta block can adapt its looked-up input
  rows (`embed_inputs`, `embedding_input_mask`; `MetaConfig.adapt_embeddings`).
* `accepts_task_axis`: the global block scores `[T, d]` embeddings against
  `[T, S, ...]` rows itself (otherwise the adapter flattens the task axis).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import tensorflow as tf

from tf_limaml import newton
from tf_limaml.config import MetaConfig
from tf_limaml.features import (
    LABEL_KEY,
    MASK_KEY,
    MULTI_HOT,
    NUMERIC,
    PARTS,
    SUPPORT,
    Feature,
    FeatureSpec,
)
from tf_limaml.signatures import META_EMBEDDING_KEY

logger = logging.getLogger(__name__)

Weights = Mapping[str, Any]

# The meta block's input key holding the support sequence.
SUPPORT_SEQUENCE_KEY = "support_sequence"
# Fast weights of both blocks live in one flat dict, each name prefixed by its
# block, so that `tf_limaml.maml` adapts them together.
META_PREFIX = "meta_block/"
GLOBAL_PREFIX = "global_block/"
# The meta block's looked-up input rows, when they adapt (`adapt_embeddings`).
INPUTS_WEIGHT = "inputs"
META_INPUTS = META_PREFIX + INPUTS_WEIGHT


class TaskBatch(NamedTuple):
    """A task batch encoded for the blocks (see `LiMAMLModel.encode`).

    A part (support, query) absent from the raw batch is None here, and so are
    its labels and mask. A NamedTuple, so that it crosses `tf.function` and
    `tf.nest` as it is.

    Attributes:
        meta: The meta block's encoded meta features.
        batch_size: T, the number of tasks (a scalar tensor).
        support: The global block's encoded support rows, each `[T, S, ...]`.
        support_label: `[T, S]`, or None.
        support_mask: `[T, S]`, 1 for real rows.
        support_sequence: The support rows in the meta block's own encoding
            (`encode_support`), for a block that reads them with its own tables.
        query: Encoded query rows, each `[T, Q, ...]`.
        query_label: `[T, Q]`, or None.
        query_mask: `[T, Q]`.
    """

    meta: dict[str, tf.Tensor]
    batch_size: tf.Tensor
    support: dict[str, tf.Tensor] | None = None
    support_label: tf.Tensor | None = None
    support_mask: tf.Tensor | None = None
    support_sequence: dict[str, tf.Tensor] | None = None
    query: dict[str, tf.Tensor] | None = None
    query_label: tf.Tensor | None = None
    query_mask: tf.Tensor | None = None

    def part(self, name: str) -> tuple[dict[str, tf.Tensor], tf.Tensor, tf.Tensor]:
        """(rows, labels, mask) of "support" or "query"."""
        return (
            getattr(self, name),
            getattr(self, f"{name}_label"),
            getattr(self, f"{name}_mask"),
        )


@runtime_checkable
class MetaBlockProtocol(Protocol):
    """What LiMAMLModel calls on a meta block.

    `call(inputs, weights=None, batch_size=None) -> [T, d]`: `inputs` is the
    output of `encode` (plus the support sequence under `SUPPORT_SEQUENCE_KEY`
    when `reads_support`); `weights` maps names of `adaptable_weights()` to
    tensors that replace those variables.
    """

    reads_support: bool
    fast_dense_path: bool
    encode_compiles: bool

    def encode(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]: ...

    def adaptable_weights(self) -> dict[str, tf.Variable]: ...


@runtime_checkable
class GlobalBlockProtocol(Protocol):
    """What LiMAMLModel calls on a global block.

    `call({"meta_embedding": e, **request}, weights=None) -> logits`: rows
    (`e` `[N, d]`, features `[N, ...]`, logits `[N]`) or, when
    `accepts_task_axis`, tasks (`e` `[T, d]`, features `[T, S, ...]`, logits
    `[T, S]`).
    """

    accepts_task_axis: bool
    fast_dense_path: bool
    encode_compiles: bool

    def encode(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]: ...

    def adaptable_weights(self) -> dict[str, tf.Variable]: ...


def _fresh(initializer: tf.keras.initializers.Initializer):
    """A new instance with the same config: an unseeded Keras initializer
    instance returns the same values every time it is called, so each weight
    gets its own (a seeded one still repeats, as in Keras)."""
    return initializer.__class__.from_config(initializer.get_config())


def weight_config(layer: tf.keras.layers.Layer) -> dict[str, Any]:
    """The Keras weight arguments of `layer`, serialized for `get_config`."""
    config = {}
    for name in ("kernel_initializer", "bias_initializer", "embeddings_initializer"):
        if hasattr(layer, name):
            config[name] = tf.keras.initializers.serialize(getattr(layer, name))
    for name in ("kernel_regularizer", "embeddings_regularizer"):
        if hasattr(layer, name):
            config[name] = tf.keras.regularizers.serialize(getattr(layer, name))
    return config


def check_units(name: str, units: Sequence[int]) -> tuple[int, ...]:
    """`units` as a tuple of positive integers, or a ValueError naming `name`."""
    units = tuple(units)
    if not units or not all(isinstance(u, int) and u > 0 for u in units):
        raise ValueError(
            f"`{name}` must be a non-empty list of positive integers, "
            f"got {list(units)!r}"
        )
    return units


def as_features(
    features: Sequence[Feature | Mapping[str, Any]],
) -> tuple[Feature, ...]:
    """Feature objects from Features or their dicts."""
    return tuple(
        f if isinstance(f, Feature) else Feature.from_dict(f, "features")
        for f in features
    )


class FastWeightLayer(tf.keras.layers.Layer):
    """Base of every layer whose weights an inner loop can replace per call.

    Subclasses create their adaptable weights with `add_fast_weight` in
    `build`, read them in `call` through `fast_weight(weights, name)` (which
    returns the fast weight when one is given, else the variable), and use
    kernels through `tf_limaml.maml.dense` so a leading task axis works.
    The capability attributes (see `tf_limaml.blocks`) default to the
    conservative answer; a subclass sets those it earns.

    Args:
        kernel_initializer: Initializer of the kernels.
        bias_initializer: Initializer of the biases.
        kernel_regularizer: Regularizer of the kernels, added to `losses`
            (applied to the variables, never to fast weights).
        **kwargs: As `tf.keras.layers.Layer`.

    Example:

        class Scale(tf_limaml.blocks.FastWeightLayer):
            def build(self, input_shape=None):
                self.add_fast_weight("kernel", (4, 2))
                self.add_fast_weight("bias", (2,), bias=True)
                super().build(input_shape)

            def call(self, inputs, weights=None, batch_size=None):
                return tf_limaml.maml.dense(
                    inputs["x"],
                    self.fast_weight(weights, "kernel"),
                    self.fast_weight(weights, "bias"),
                )
    """

    reads_support = False
    fast_dense_path = False
    encode_compiles = False
    adapts_input_embeddings = False
    accepts_task_axis = False

    def __init__(
        self,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.bias_initializer = tf.keras.initializers.get(bias_initializer)
        self.kernel_regularizer = tf.keras.regularizers.get(kernel_regularizer)
        self._adaptable: dict[str, tf.Variable] = {}

    def add_fast_weight(
        self, name: str, shape: tuple[int, ...], bias: bool = False
    ) -> tf.Variable:
        """Creates an adaptable weight with the layer's initializer and regularizer.

        Args:
            name: Its name in `adaptable_weights()` and in fast-weight dicts.
            shape: Its shape.
            bias: Use the bias initializer and no regularizer.
        """
        variable = self.add_weight(
            name=name,
            shape=shape,
            initializer=_fresh(
                self.bias_initializer if bias else self.kernel_initializer
            ),
            regularizer=None if bias else self.kernel_regularizer,
            trainable=True,
        )
        self._adaptable[name] = variable
        return variable

    def track_fast_weight(self, name: str, variable: tf.Variable) -> None:
        """Makes a variable created elsewhere (a sublayer's) adaptable as `name`."""
        self._adaptable[name] = variable

    def adaptable_weights(self) -> dict[str, tf.Variable]:
        """The weights an inner loop may adapt, by name."""
        return dict(self._adaptable)

    def fast_weight(self, weights: Weights | None, name: str) -> Any:
        """The fast weight `name` from `weights` if given, else the variable."""
        if weights is not None and name in weights:
            return weights[name]
        return self._adaptable[name]

    def encode(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Raw features -> `call`'s input; the identity unless overridden."""
        return dict(raw)


def check_residual_dim(value: Any) -> int | None:
    """`residual_dim` of a block: None or an integer >= 0.

    Raises:
        ValueError: Anything else.
    """
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < 0
    ):
        raise ValueError(
            f"`residual_dim` must be an integer >= 0 or None, got {value!r}"
        )
    return value


def residual_width(residual_dim: int | None) -> int:
    """Embedding dimensions of the personal residual: residual_dim + 1 (a
    vector and a logit offset), or 0 without one."""
    return 0 if residual_dim is None else residual_dim + 1


def append_residual(embedding: tf.Tensor, residual_dim: int | None) -> tf.Tensor:
    """A meta block's output `[T, m]` with the personal residual's zeros
    appended, `[T, m + residual_width]`: zero by default, so only the
    embedding fit (`tf_limaml.newton`) moves them."""
    width = residual_width(residual_dim)
    if not width:
        return embedding
    zeros = tf.zeros(tf.stack([tf.shape(embedding)[0], width]), embedding.dtype)
    return tf.concat([embedding, zeros], axis=-1)


def prefixed(weights: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """`weights` with every name prefixed (`prefix + name`)."""
    return {prefix + name: value for name, value in weights.items()}


def split_fast_weights(
    fast: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta block's, global block's) fast weights, their prefixes removed."""
    meta, glob = {}, {}
    for name, value in (fast or {}).items():
        if name.startswith(META_PREFIX):
            meta[name[len(META_PREFIX) :]] = value
        elif name.startswith(GLOBAL_PREFIX):
            glob[name[len(GLOBAL_PREFIX) :]] = value
    return meta, glob


def example_features(
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


def _select(
    raw: Mapping[str, tf.Tensor], features: Sequence[Feature]
) -> dict[str, tf.Tensor]:
    missing = [f.name for f in features if f.name not in raw]
    if missing:
        raise KeyError(f"Missing feature(s) {missing}; got {sorted(raw)}")
    return {f.name: raw[f.name] for f in features}


def _merge_task_axis(value: tf.Tensor) -> tf.Tensor:
    """[T, S, ...] -> [T * S, ...], keeping the static trailing shape."""
    trailing = value.shape[2:]
    if trailing.is_fully_defined():
        return tf.reshape(value, [-1, *trailing.as_list()])
    return tf.reshape(value, tf.concat([[-1], tf.shape(value)[2:]], axis=0))


class _BlockAdapter:
    """What both adapters share: the layer, its features, and its encode step."""

    role = "block"

    def __init__(self, layer: tf.keras.layers.Layer, features: Sequence[Feature]):
        if not isinstance(layer, tf.keras.layers.Layer):
            raise ValueError(
                f"`{self.role}` must be a Keras layer or model, got {layer!r}"
            )
        self.layer = layer
        self.features = tuple(features)
        self._encode = getattr(layer, "encode", None)
        self.has_encode = callable(self._encode)
        self.fast_dense_path = bool(getattr(layer, "fast_dense_path", False))
        self.encode_compiles = bool(getattr(layer, "encode_compiles", False))
        adaptable = getattr(layer, "adaptable_weights", None)
        self.has_fast_weights = callable(adaptable)

    def encode(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """The layer's `encode`, or the features it reads, by name."""
        if self.has_encode:
            return self._encode(raw)
        return _select(raw, self.features)

    def adaptable_weights(self) -> dict[str, tf.Variable]:
        return self.layer.adaptable_weights() if self.has_fast_weights else {}

    def xla_blocker(self) -> str | None:
        """Why a compiled step cannot take this block's input, or None."""
        name = self.layer.name
        if self.has_encode:
            encoded = self.encode(example_features(self.features))
            strings = sorted(
                k for k, v in encoded.items() if tf.as_dtype(v.dtype) == tf.string
            )
            if strings:
                return (
                    f"{self.role} {name!r}'s `encode` step returns the string "
                    f"features {strings}"
                )
            return None
        strings = [f.name for f in self.features if f.type != NUMERIC]
        if strings:
            return (
                f"{self.role} {name!r} has no `encode` step and reads the "
                f"string features {strings}"
            )
        return None


class MetaBlockAdapter(_BlockAdapter):
    """A meta block as the model runs it: the protocol over any fast-weight layer.

    Args:
        layer: A layer with `adaptable_weights()` and
            `call(inputs, weights=None[, batch_size=None])`.
        features: The spec's meta features.

    Raises:
        ValueError: The layer has no fast weights.
    """

    role = "meta_block"

    def __init__(self, layer: tf.keras.layers.Layer, features: Sequence[Feature]):
        super().__init__(layer, features)
        if not self.has_fast_weights:
            raise ValueError(
                f"`meta_block` {layer.name!r} has no fast weights: it needs "
                "`adaptable_weights() -> dict[name, tf.Variable]` and "
                "`call(inputs, weights=None)` (see tf_limaml.blocks)"
            )
        self.reads_support = bool(getattr(layer, "reads_support", False))
        self.adapts_input_embeddings = bool(
            getattr(layer, "adapts_input_embeddings", False)
        )
        self.shares_request_embedding = self.reads_support and (
            getattr(layer, "request_embedding", None) == "shared"
        )
        self._encode_support = getattr(layer, "encode_support", None)
        try:
            parameters = inspect.signature(layer.call).parameters
        except (TypeError, ValueError):
            parameters = {}
        self._takes_batch_size = "batch_size" in parameters
        # Set by the model once the global block exists (shared request tables).
        self.request_embedding: tf.keras.layers.Layer | None = None

    def input_embeddings(self, batch: TaskBatch) -> tf.Tensor:
        """Each task's looked-up input embeddings, the fast weights that
        `MetaConfig.adapt_embeddings` adapts (`embed_inputs`)."""
        return self.layer.embed_inputs(batch.meta, batch.batch_size)

    def input_rates(self, rate: tf.Tensor | float) -> tf.Tensor:
        """The inner rate of the input embeddings, zero on numeric inputs:
        only looked-up embedding rows adapt (`embedding_input_mask`)."""
        mask = self.layer.embedding_input_mask()
        return tf.cast(rate, mask.dtype) * mask

    def encode_support(
        self, raw: Mapping[str, tf.Tensor]
    ) -> dict[str, tf.Tensor] | None:
        """Support rows in the block's own encoding, when it reads them so."""
        if (
            not self.reads_support
            or self.shares_request_embedding
            or not callable(self._encode_support)
        ):
            return None
        return self._encode_support(raw)

    def inputs(self, batch: TaskBatch) -> dict[str, Any]:
        """The block's input: the meta features and, for a block that reads
        the support sequence, that sequence under SUPPORT_SEQUENCE_KEY."""
        inputs = dict(batch.meta)
        if not self.reads_support or batch.support is None:
            return inputs
        if batch.support_label is None:
            raise KeyError(
                f"The meta block {self.layer.name!r} reads the support "
                "sequence, which needs the support labels"
            )
        sequence = {
            "features": (
                batch.support
                if batch.support_sequence is None
                else batch.support_sequence
            ),
            "label": batch.support_label,
            "mask": batch.support_mask,
        }
        if self.request_embedding is not None:
            # Inside the differentiated step, so the shared tables learn here too.
            sequence["embedded"] = self.request_embedding(batch.support)
        inputs[SUPPORT_SEQUENCE_KEY] = sequence
        return inputs

    def embed(self, batch: TaskBatch, weights: Weights | None = None) -> tf.Tensor:
        """Meta embedding `[T, d]` under fast weights (names without prefix)."""
        return self.call(self.inputs(batch), weights, batch.batch_size)

    def call(
        self,
        inputs: Mapping[str, Any],
        weights: Weights | None,
        batch_size: tf.Tensor | int,
    ) -> tf.Tensor:
        if self._takes_batch_size:
            return self.layer(inputs, weights=weights, batch_size=batch_size)
        return self.layer(inputs, weights=weights)

    def output_dim(self) -> int:
        """d, from one call on an example row (this also builds the layer)."""
        encoded = self.encode(example_features(self.features))
        embedding = self.call(encoded, None, 1)
        if embedding.shape.rank != 2 or embedding.shape[-1] is None:
            raise ValueError(
                f"`meta_block` must return a meta embedding [T, d]; "
                f"{self.layer.name!r} returned shape {embedding.shape}"
            )
        return int(embedding.shape[-1])


class GlobalBlockAdapter(_BlockAdapter):
    """A global block as the model runs it: any Keras layer that maps
    `{"meta_embedding": e, **request}` to logits `[N]` or `[N, 1]`.

    Args:
        layer: The global block.
        features: The spec's request features.
        meta_dim: d.
    """

    role = "global_block"

    def __init__(
        self,
        layer: tf.keras.layers.Layer,
        features: Sequence[Feature],
        meta_dim: int,
    ):
        super().__init__(layer, features)
        self.meta_dim = meta_dim
        self.accepts_task_axis = bool(getattr(layer, "accepts_task_axis", False))
        self.fitted_dims = _fitted_dims(layer, meta_dim)
        # The request-feature tables a sequence meta block may share.
        self.request_embedding = getattr(layer, "request_feature_embedding", None)

    def freeze_base(self) -> None:
        """Stops training the network: a block with a personal residual
        (`train_base`) keeps training the residual's projection only."""
        if hasattr(self.layer, "train_base"):
            self.layer.train_base = False
        else:
            self.layer.trainable = False

    def build(self) -> None:
        """Creates the layer's weights now (one call on an example row)."""
        request = self.encode(example_features(self.features))
        self.row_logits(tf.zeros([1, self.meta_dim]), request)

    def row_logits(
        self, embedding: tf.Tensor, request: Mapping[str, tf.Tensor]
    ) -> tf.Tensor:
        """Logits `[N]` of rows: embeddings `[N, d]`, encoded request `[N, ...]`."""
        logits = self.layer({META_EMBEDDING_KEY: embedding, **request})
        if logits.shape.rank == 2 and logits.shape[-1] == 1:
            logits = tf.squeeze(logits, axis=-1)
        if logits.shape.rank != 1:
            raise ValueError(
                f"`global_block` must return logits [N] or [N, 1]; "
                f"{self.layer.name!r} returned shape {logits.shape}"
            )
        return tf.cast(logits, embedding.dtype)

    def task_logits(
        self,
        embedding: tf.Tensor,
        request: Mapping[str, tf.Tensor],
        weights: Weights | None = None,
    ) -> tf.Tensor:
        """Logits `[T, S]`: embeddings `[T, d]`, request rows `[T, S, ...]`."""
        if self.accepts_task_axis or (self.has_fast_weights and weights):
            return self.layer(
                {META_EMBEDDING_KEY: embedding, **request}, weights=weights
            )
        rows_shape = tf.shape(next(iter(request.values())))[:2]
        rows = {k: _merge_task_axis(v) for k, v in request.items()}
        per_row = tf.reshape(
            tf.broadcast_to(
                embedding[:, None, :],
                tf.concat([rows_shape, tf.shape(embedding)[-1:]], axis=0),
            ),
            [-1, self.meta_dim],
        )
        return tf.reshape(self.row_logits(per_row, rows), rows_shape)

    def fitted_logit_terms(
        self,
        embedding: tf.Tensor,
        request: Mapping[str, tf.Tensor],
        weights: Weights | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor] | None:
        """(logits `[T, S]` with the fitted dimensions at zero, their Jacobian
        `[T, S, f]`) when the layer's logit is affine in its `fitted_dims`,
        from the layer's public `fitted_logit_terms(inputs, weights=...)`
        hook; None when it has none (the fit then differentiates the block).

        Raises:
            ValueError: The hook's Jacobian is not `[T, S, len(fitted_dims)]`.
        """
        hook = getattr(self.layer, "fitted_logit_terms", None)
        if not (callable(hook) and self.accepts_task_axis):
            return None
        terms = hook({META_EMBEDDING_KEY: embedding, **request}, weights=weights)
        if terms is None:
            return None
        logits, jacobian = terms
        if jacobian.shape.rank != 3 or jacobian.shape[-1] != len(self.fitted_dims):
            raise ValueError(
                f"`{self.layer.name}.fitted_logit_terms` must return a Jacobian "
                f"[T, S, {len(self.fitted_dims)}] (one column per fitted "
                f"dimension), got {jacobian.shape}"
            )
        return tf.cast(logits, embedding.dtype), tf.cast(jacobian, embedding.dtype)

    def fit_embedding(
        self,
        embedding: tf.Tensor,
        request: Mapping[str, tf.Tensor],
        labels: tf.Tensor,
        mask: tf.Tensor,
        prior: tf.Tensor,
        steps: int,
        weights: Weights | None = None,
        differentiate: bool = False,
    ) -> tf.Tensor:
        """Embeddings `[T, d]` with their `fitted_dims` fitted to the support
        rows `request` by `steps` Newton steps (`tf_limaml.newton`); the
        dimensions before stay as they are.

        In one pass where the layer hands over its affine form
        (`fitted_logit_terms`), else differentiating the block in forward mode.

        Args:
            embedding: The default embeddings `[T, d]`.
            request: Encoded support rows `[T, S, ...]`.
            labels: Support labels `[T, S]`.
            mask: Support mask `[T, S]`.
            prior: Prior precision per fitted dimension.
            steps: Newton steps.
            weights: The block's fast weights, if any.
            differentiate: Outer gradients through the fit's Jacobian (second
                order in the fit); needs the affine form.

        Raises:
            ValueError: `differentiate` without the layer's affine form.
        """
        start = self.fitted_dims[0]
        fixed, default = embedding[..., :start], embedding[..., start:]
        terms = self.fitted_logit_terms(embedding, request, weights)
        if terms is not None:
            fitted = newton.fit_affine(
                *terms, default, labels, mask, prior, steps, not differentiate
            )
        elif differentiate:
            raise ValueError(
                "MetaConfig.differentiate_fit needs a global block that hands "
                "over its logit's affine form in the fitted dimensions "
                f"(`fitted_logit_terms`); {self.layer.name!r} has none"
            )
        else:
            # First order: the outer gradient reaches the default and the
            # prior, not the Jacobian (forward-mode ops have no second
            # derivative inside XLA).
            fitted = newton.fit_embedding(
                lambda part: self.task_logits(
                    tf.concat([fixed, part], axis=-1), request, weights
                ),
                default,
                labels,
                mask,
                prior,
                steps,
            )
        return tf.concat([fixed, fitted], axis=-1)


def _fitted_dims(layer: tf.keras.layers.Layer, meta_dim: int) -> tuple[int, ...]:
    """The meta-embedding dimensions the embedding fit moves: the global block's
    `fitted_dims` (a trailing range), or every dimension.

    Raises:
        ValueError: `fitted_dims` is not a non-empty trailing range of [0, d).
    """
    dims = getattr(layer, "fitted_dims", None)
    if dims is None:
        return tuple(range(meta_dim))
    dims = tuple(int(i) for i in dims)
    if not dims or dims != tuple(range(dims[0], meta_dim)):
        raise ValueError(
            f"`{layer.name}.fitted_dims` must be a trailing range of the "
            f"{meta_dim} embedding dimensions, got {dims}"
        )
    return dims


def encode_batch(
    spec: FeatureSpec,
    meta: MetaBlockAdapter,
    glob: GlobalBlockAdapter,
    batch: Mapping[str, tf.Tensor],
    dtype: tf.DType | str = tf.float32,
) -> TaskBatch:
    """A raw task batch (`tf_limaml.data.task_dataset`) encoded for the blocks.

    Parts (support, query) whose features are absent from the batch are None;
    a missing mask means every row is real.

    Raises:
        KeyError: A meta feature, or some of a part's request features, is
            missing from the batch.
    """
    missing = [f.name for f in spec.meta_features if f.name not in batch]
    if missing:
        raise KeyError(
            f"Task batch lacks meta feature(s) {missing}; it has {sorted(batch)}"
        )
    fields: dict[str, Any] = {
        "meta": meta.encode({f.name: batch[f.name] for f in spec.meta_features})
    }
    for part in PARTS:
        keys = {f.name: spec.batch_key(part, f.name) for f in spec.request_features}
        if not any(k in batch for k in keys.values()):
            continue
        absent = [k for k in keys.values() if k not in batch]
        if absent:
            raise KeyError(f"Task batch lacks {absent}; it has {sorted(batch)}")
        raw = {name: batch[key] for name, key in keys.items()}
        fields[part] = glob.encode(raw)
        rows_shape = tf.shape(batch[keys[spec.request_features[0].name]])[:2]
        mask_key = spec.batch_key(part, MASK_KEY)
        mask = batch[mask_key] if mask_key in batch else tf.ones(rows_shape, dtype)
        fields[f"{part}_mask"] = tf.cast(mask, dtype)
        label_key = spec.batch_key(part, LABEL_KEY)
        if label_key in batch:
            fields[f"{part}_label"] = tf.cast(batch[label_key], dtype)
        fields["batch_size"] = rows_shape[0]
        if part == SUPPORT:
            # A block with its own tables reads the support rows in its encoding.
            fields["support_sequence"] = meta.encode_support(raw)
    if "batch_size" not in fields:
        first = (
            batch[spec.meta_features[0].name]
            if spec.meta_features
            else batch["entity_id"]
        )
        fields["batch_size"] = tf.shape(first)[0]
    return TaskBatch(**fields)


def configured_variables(
    meta: MetaBlockAdapter, glob: GlobalBlockAdapter, config: MetaConfig
) -> dict[str, tf.Variable]:
    """Every weight `config.adapt` can adapt, by prefixed name."""
    params = prefixed(meta.adaptable_weights(), META_PREFIX)
    if config.adapt == "all":
        params.update(prefixed(glob.adaptable_weights(), GLOBAL_PREFIX))
    return params


def connect(
    meta: MetaBlockAdapter, glob: GlobalBlockAdapter, config: MetaConfig
) -> None:
    """Checks that the blocks can run `config`, and shares the request tables
    with a sequence meta block that asks for them.

    Raises:
        ValueError: What the blocks cannot do, and what to use instead.
    """
    if config.adapt_embeddings and not meta.adapts_input_embeddings:
        raise ValueError(
            "MetaConfig(adapt_embeddings=True) needs a meta block that adapts "
            "its input embeddings (the library's MetaBlock); got "
            f"{type(meta.layer).__name__}"
        )
    if meta.shares_request_embedding:
        width = getattr(meta.layer, "request_dim", None)
        shared = glob.request_embedding
        if shared is None or (width is not None and shared.output_dim != width):
            raise ValueError(
                f"The meta block {meta.layer.name!r} shares the global "
                "block's request embeddings (request_embedding='shared'), "
                "which needs the library GlobalBlock over the same request "
                "features; use request_embedding='own' with your own "
                "global block"
            )
        meta.request_embedding = shared
    if config.adapt == "all" and not glob.has_fast_weights:
        raise ValueError(
            f"MetaConfig(adapt='all') adapts the global block, but "
            f"{glob.layer.name!r} has no fast weights "
            "(`adaptable_weights()` and `call(inputs, weights=None)`); use "
            "adapt='meta_block'"
        )


def learned_rate_shapes(
    meta: MetaBlockAdapter, glob: GlobalBlockAdapter, config: MetaConfig
) -> dict[str, tuple[int, ...]]:
    """Shapes of the Meta-SGD rates (`learn_inner_lr`): one per adaptable weight,
    and the meta block's input width when its embeddings adapt."""
    shapes = {
        name: tuple(variable.shape)
        for name, variable in configured_variables(meta, glob, config).items()
    }
    if config.adapt_embeddings:
        shapes[META_INPUTS] = (meta.layer.input_dim,)
    return shapes


def runs_dense_path(
    meta: MetaBlockAdapter,
    glob: GlobalBlockAdapter,
    config: MetaConfig,
    params: Mapping[str, tf.Variable],
    rates: Mapping[str, Any],
) -> bool:
    """Whether the inner loop can run as `maml.adapt_dense`: the blocks use
    every adapted weight only through `maml.dense`, and the rates are scalars
    (not Meta-SGD's per-weight rates)."""
    if config.adapt_embeddings or not meta.fast_dense_path:
        return False
    if config.adapt == "all" and not glob.fast_dense_path:
        return False
    if not set(params) <= set(configured_variables(meta, glob, config)):
        return False
    return all(
        isinstance(rate, (int, float)) or tf.convert_to_tensor(rate).shape.rank == 0
        for rate in rates.values()
    )


def compile_plan(
    meta: MetaBlockAdapter, glob: GlobalBlockAdapter, spec: FeatureSpec
) -> tuple[str | None, bool]:
    """(why the step cannot compile with XLA or None, whether `encode` may
    run inside the compiled step: blocks that say so and no string feature)."""
    blocker = meta.xla_blocker() or glob.xla_blocker()
    encode_compiles = (
        meta.encode_compiles
        and glob.encode_compiles
        and all(f.type == NUMERIC for f in spec.features)
    )
    return blocker, encode_compiles


def serialize_block(key: str, block: tf.keras.layers.Layer) -> dict[str, Any]:
    """A user block's Keras config, or a NotImplementedError that says what to do."""
    try:
        return tf.keras.utils.serialize_keras_object(block)
    except NotImplementedError as err:
        raise NotImplementedError(
            f"The custom {key} {block.name!r} cannot give its config "
            f"({err}). Implement its `get_config` (and register its "
            "class with tf.keras.utils.register_keras_serializable), or "
            "rebuild the model in code and restore its weights with "
            "tf.train.Checkpoint."
        ) from None


def deserialize_block(
    key: str, config: Mapping[str, Any], custom_objects=None
) -> tf.keras.layers.Layer:
    """A user block rebuilt from `serialize_block`'s config."""
    block = tf.keras.layers.deserialize(dict(config), custom_objects=custom_objects)
    if not isinstance(block, tf.keras.layers.Layer):
        raise ValueError(
            f"Cannot rebuild the custom {key} {config.get('class_name')!r} from "
            "its config: register its class with "
            "tf.keras.utils.register_keras_serializable (or pass it in "
            "`custom_objects`) before loading"
        )
    return block
