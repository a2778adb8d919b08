"""Keras layers of the meta block and the global block.

Every dense weight of these layers can be replaced per call by an explicit
tensor (a *fast weight*), so the inner loop never assigns to variables. A fast
weight may carry a leading task axis, `[T, in, out]`, in which case each task
runs with its own weights through `einsum` (`tf_limaml.maml.dense`; no Python
loop over tasks). That is the fast-weight protocol any meta block follows:
`adaptable_weights() -> dict[name, tf.Variable]` and `call(inputs, weights=None)`.

String handling (vocabulary lookup, hashing) is split from the math:
`FeatureEmbedding.encode` maps raw strings to integer ids outside any XLA
cluster, and `call` embeds those ids. That keeps the meta-train step free of
string ops so it compiles with XLA.

The layers take Keras's weight arguments, as `tf.keras.layers.Dense` does:
`kernel_initializer`, `bias_initializer` and `kernel_regularizer` for dense
weights, `embeddings_initializer` and `embeddings_regularizer` for embedding
tables. Regularization reaches the loss through `layer.losses`, so it applies
to the variables (the meta-parameters), never to the fast weights of an inner
loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from tf_limaml import maml
from tf_limaml.blocks import (
    INPUTS_WEIGHT,
    META_EMBEDDING_KEY,
    FastWeightLayer,
    GlobalBlockAdapter,
    MetaBlockAdapter,
    _fresh,
    append_residual,
    as_features,
    check_residual_dim,
    check_units,
    connect,
    residual_width,
    weight_config,
)
from tf_limaml.config import MetaConfig
from tf_limaml.features import (
    CATEGORICAL,
    LOG1P,
    MULTI_HOT,
    NUMERIC,
    Feature,
    FeatureSpec,
    check_statistics,
)

_PACKAGE = "tf_limaml"
Weights = Mapping[str, tf.Tensor]

# Key of the packed numeric columns in `encode(raw, pack_numeric=True)`. A
# feature name cannot contain "/", so it never meets a feature.
PACKED_NUMERIC_KEY = "numeric/packed"


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class FeatureEmbedding(tf.keras.layers.Layer):
    """Turns a dict of raw features into one dense vector per row.

    Numeric features pass through as clip((transform(x) - mean) / std) (raw
    with `"normalize": false`); categorical features are looked up in an
    embedding table; multi-hot features average the embeddings of their values.

    Args:
        features: Feature objects or their dicts.
        embeddings_initializer: Initializer of the embedding tables (a Keras
            name, config or instance; "random_normal" has stddev 0.05).
        embeddings_regularizer: Regularizer of the embedding tables, or None.

    Input shape: a dict name -> `[...]` (numeric, categorical), `[..., n]`
    (numeric of shape [n]) or `[..., K]` (multi-hot, "" for padding); or the
    output of `encode(raw, pack_numeric=True)`. Output shape:
    `[..., output_dim]`.

    Raises:
        FeatureSpecError: A feature still needs statistics from the data (see
            `FeatureSpec.missing_statistics`).

    Example:
        >>> layer = FeatureEmbedding(
        ...     [{"name": "x", "type": "numeric", "mean": 3.0, "std": 2.0}])
        >>> layer(layer.encode({"x": tf.constant([1.0])})).shape
        TensorShape([1, 1])
    """

    def __init__(
        self,
        features: Sequence[Feature | Mapping[str, Any]],
        embeddings_initializer: Any = "random_normal",
        embeddings_regularizer: Any = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.features = as_features(features)
        # The one place a model meets its features: refuse raw scales here.
        check_statistics(self.features)
        self.embeddings_initializer = tf.keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = tf.keras.regularizers.get(embeddings_regularizer)
        self._lookups: dict[str, tf.keras.layers.StringLookup] = {}
        for feature in self.features:
            if feature.type != NUMERIC and feature.vocabulary is not None:
                # id 0 is the OOV bucket: unknown values of an open vocabulary
                # and missing ("") values land there.
                self._lookups[feature.name] = tf.keras.layers.StringLookup(
                    vocabulary=list(feature.vocabulary),
                    num_oov_indices=1,
                    mask_token=None,
                    name=f"{feature.name}_lookup",
                )
        self._numeric = tuple(f for f in self.features if f.type == NUMERIC)

    @property
    def output_dim(self) -> int:
        return sum(f.size if f.type == NUMERIC else f.dim for f in self.features)

    def build(self, input_shape=None):
        self.tables = {}
        for feature in self.features:
            if feature.type != NUMERIC:
                self.tables[feature.name] = self.add_weight(
                    name=f"{feature.name}_embedding",
                    shape=(feature.num_ids, feature.dim),
                    initializer=_fresh(self.embeddings_initializer),
                    regularizer=self.embeddings_regularizer,
                    trainable=True,
                )
        super().build(input_shape)

    def _ids(self, feature: Feature, value: tf.Tensor) -> tf.Tensor:
        if feature.vocabulary is not None:
            ids = tf.cast(self._lookups[feature.name](value), tf.int32)
        else:
            ids = tf.cast(
                tf.strings.to_hash_bucket_fast(value, feature.hash_buckets), tf.int32
            )
        if feature.type == MULTI_HOT:
            ids = tf.where(tf.equal(value, ""), tf.constant(-1, tf.int32), ids)
        return ids

    def _standardize(self, feature: Feature, value: tf.Tensor) -> tf.Tensor:
        value = tf.cast(value, self.compute_dtype)
        if feature.transform == LOG1P:
            value = tf.sign(value) * tf.math.log1p(tf.abs(value))
        if feature.normalize:
            # A vector's per-component mean/std broadcast over its last axis.
            mean = tf.constant(feature.mean, self.compute_dtype)
            std = tf.constant(feature.std, self.compute_dtype)
            value = (value - mean) / std
        if feature.clip is not None:
            value = tf.clip_by_value(value, -feature.clip, feature.clip)
        return value

    def _column_constants(self) -> dict[str, list]:
        """Per numeric column: log1p flag, mean, std and clip bound."""
        columns = {"log1p": [], "mean": [], "std": [], "clip": []}
        for feature in self._numeric:
            n = feature.size
            mean, std = (feature.mean, feature.std) if feature.normalize else (0, 1)
            columns["log1p"] += [feature.transform == LOG1P] * n
            columns["mean"] += list(mean) if isinstance(mean, tuple) else [mean] * n
            columns["std"] += list(std) if isinstance(std, tuple) else [std] * n
            clip = float("inf") if feature.clip is None else feature.clip
            columns["clip"] += [clip] * n
        return columns

    def _pack_numeric(self, raw: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """All numeric features as one standardized `[..., n]` tensor.

        One stack and a few column-wise ops, whatever the number of
        features: per-feature ops run one by one on the host, outside XLA.
        """
        parts, scalars = [], []
        for feature in self._numeric:
            value = tf.cast(raw[feature.name], self.compute_dtype)
            if feature.shape:
                if scalars:
                    parts.append(tf.stack(scalars, axis=-1))
                    scalars = []
                parts.append(value)
            else:
                scalars.append(value)
        if scalars:
            parts.append(tf.stack(scalars, axis=-1))
        value = parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)
        columns = self._column_constants()
        dtype = self.compute_dtype
        if any(columns["log1p"]):
            log1p = tf.sign(value) * tf.math.log1p(tf.abs(value))
            value = (
                log1p
                if all(columns["log1p"])
                else tf.where(tf.constant(columns["log1p"]), log1p, value)
            )
        if any(f.normalize for f in self._numeric):
            mean = tf.constant(columns["mean"], dtype)
            std = tf.constant(columns["std"], dtype)
            value = (value - mean) / std
        if any(f.clip is not None for f in self._numeric):
            bound = tf.constant(columns["clip"], dtype)
            value = tf.clip_by_value(value, -bound, bound)
        return value

    def encode(
        self, raw: Mapping[str, tf.Tensor], pack_numeric: bool = False
    ) -> dict[str, tf.Tensor]:
        """Maps raw values to numbers: floats for numeric, int32 ids otherwise.

        Multi-hot padding ("") becomes id -1. Runs string ops, so call it
        outside XLA-compiled code.

        Args:
            raw: Raw features by name.
            pack_numeric: Return the numeric features as one standardized
                `[..., n]` tensor under `PACKED_NUMERIC_KEY` (columns in
                feature order) instead of one entry each. `call` takes either.

        Raises:
            KeyError: A feature is missing from `raw`.
        """
        missing = [f.name for f in self.features if f.name not in raw]
        if missing:
            raise KeyError(f"Missing feature {missing[0]!r}; got {sorted(raw)}")
        encoded = {}
        if pack_numeric and self._numeric:
            encoded[PACKED_NUMERIC_KEY] = self._pack_numeric(raw)
        for feature in self.features:
            value = raw[feature.name]
            if feature.type != NUMERIC:
                encoded[feature.name] = self._ids(feature, tf.convert_to_tensor(value))
            elif not pack_numeric:
                encoded[feature.name] = self._standardize(feature, value)
        return encoded

    def call(self, encoded: Mapping[str, tf.Tensor]) -> tf.Tensor:
        packed = encoded.get(PACKED_NUMERIC_KEY)
        if packed is not None:
            packed = tf.cast(packed, self.compute_dtype)
        # Columns in feature order; a (start, stop) pair is a run of numeric
        # features, one slice of the packed tensor.
        parts: list[tf.Tensor | tuple[int, int]] = []
        column = 0
        for feature in self.features:
            if feature.type == NUMERIC and packed is not None:
                start = column
                column += feature.size
                if parts and isinstance(parts[-1], tuple):
                    start = parts.pop()[0]
                parts.append((start, column))
            elif feature.type == NUMERIC:
                value = tf.cast(encoded[feature.name], self.compute_dtype)
                parts.append(value if feature.shape else value[..., None])
            elif feature.type == CATEGORICAL:
                table = self.tables[feature.name]
                parts.append(tf.gather(table, encoded[feature.name]))
            else:
                ids = encoded[feature.name]
                valid = tf.cast(ids >= 0, self.compute_dtype)
                vectors = tf.gather(self.tables[feature.name], tf.maximum(ids, 0))
                total = tf.reduce_sum(vectors * valid[..., None], axis=-2)
                count = tf.reduce_sum(valid, axis=-1, keepdims=True)
                parts.append(total / tf.maximum(count, 1.0))
        tensors = []
        for part in parts:
            if not isinstance(part, tuple):
                tensors.append(part)
            elif part == (0, column):
                tensors.append(packed)
            else:
                tensors.append(packed[..., part[0] : part[1]])
        return tensors[0] if len(tensors) == 1 else tf.concat(tensors, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "features": [f.to_dict() for f in self.features],
                **weight_config(self),
            }
        )
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class MetaBlock(FastWeightLayer):
    """Meta features -> embeddings -> MLP -> meta embedding of size d.

    With no meta features the MLP starts from a learned constant input, so the
    default embedding is learned and adaptation alone personalizes it.

    Args:
        features: The spec's meta features (Feature objects or their dicts).
        units: MLP widths; the last is d, the meta embedding size. Hidden layers
            use `activation`, the last layer is linear.
        activation: Hidden activation.
        constant_input_dim: Width of the learned input when there are no
            meta features.
        kernel_initializer: Initializer of the MLP kernels.
        bias_initializer: Initializer of the MLP biases.
        kernel_regularizer: Regularizer of the MLP kernels (e.g.
            `tf.keras.regularizers.L2(1e-4)`), added to `losses`.
        embeddings_initializer: Initializer of the meta-feature embedding
            tables.
        embeddings_regularizer: Regularizer of those tables.
        residual_dim: Append the personal residual's residual_dim + 1
            dimensions, always zero here (None: none). The global block scores
            them (`GlobalBlock(residual_dim=...)`); only the embedding fit moves
            them, so d = units[-1] + residual_dim + 1.

    Input shape: a dict of encoded meta features, each `[T]` or `[T, K]`.
    Output shape: `[T, d]`.

    Example:
        >>> block = MetaBlock(units=(8, 4), kernel_regularizer="l2")
        >>> block.build(None)
        >>> block({}, batch_size=2).shape, len(block.losses)
        (TensorShape([2, 4]), 2)
    """

    # Every adapted weight goes through maml.dense; `encode` is plain math on
    # numbers; the looked-up input rows can adapt (`adapt_embeddings`).
    fast_dense_path = True
    encode_compiles = True
    adapts_input_embeddings = True

    def __init__(
        self,
        features: Sequence[Feature | Mapping[str, Any]] = (),
        units: Sequence[int] = (64, 32),
        activation: str = "relu",
        constant_input_dim: int = 8,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        embeddings_initializer: Any = "random_normal",
        embeddings_regularizer: Any = None,
        residual_dim: int | None = None,
        **kwargs,
    ):
        super().__init__(
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            **kwargs,
        )
        self.features = as_features(features)
        self.units = check_units("units", units)
        self.residual_dim = check_residual_dim(residual_dim)
        self.activation = activation
        self._activation = tf.keras.activations.get(activation)
        if not isinstance(constant_input_dim, int) or constant_input_dim <= 0:
            raise ValueError(
                "`constant_input_dim` must be a positive integer, got "
                f"{constant_input_dim!r}"
            )
        self.constant_input_dim = constant_input_dim
        self.embeddings_initializer = tf.keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = tf.keras.regularizers.get(embeddings_regularizer)
        self.embedding = (
            FeatureEmbedding(
                self.features,
                embeddings_initializer=self.embeddings_initializer,
                embeddings_regularizer=self.embeddings_regularizer,
                name="meta_features",
            )
            if (self.features)
            else None
        )

    @property
    def output_dim(self) -> int:
        return self.units[-1] + residual_width(self.residual_dim)

    @property
    def input_dim(self) -> int:
        return self.embedding.output_dim if self.embedding else self.constant_input_dim

    def build(self, input_shape=None):
        if self.embedding is not None:
            self.embedding.build(None)
        else:
            self.constant_input = self.add_weight(
                name="constant_input",
                shape=(self.constant_input_dim,),
                initializer=tf.keras.initializers.RandomNormal(stddev=0.1),
                trainable=True,
            )
        width = self.input_dim
        for i, units in enumerate(self.units):
            self.add_fast_weight(f"dense_{i}/kernel", (width, units))
            self.add_fast_weight(f"dense_{i}/bias", (units,), bias=True)
            width = units
        super().build(input_shape)

    def encode(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Raw meta features -> `call`'s input (numeric features packed)."""
        if self.embedding is None:
            return {}
        return self.embedding.encode(raw, pack_numeric=True)

    def embed_inputs(
        self, encoded: Mapping[str, tf.Tensor], batch_size: tf.Tensor | int
    ) -> tf.Tensor:
        """The MLP's input `[T, M]`: embedded meta features or the constant."""
        if self.embedding is not None:
            return self.embedding(encoded)
        return tf.tile(self.constant_input[None, :], [batch_size, 1])

    def embedding_input_mask(self) -> tf.Tensor:
        """1.0 on input columns that are looked-up embedding rows (or the constant)."""
        if self.embedding is None:
            return tf.ones([self.constant_input_dim], self.compute_dtype)
        mask = []
        for feature in self.features:
            mask += [0.0] if feature.type == NUMERIC else [1.0] * feature.dim
        return tf.constant(mask, self.compute_dtype)

    def mlp(self, x: tf.Tensor, weights: Weights | None = None) -> tf.Tensor:
        """Runs the MLP on `[T, M]`; `weights` may override any dense weight."""
        for i in range(len(self.units)):
            x = maml.dense(
                x,
                self.fast_weight(weights, f"dense_{i}/kernel"),
                self.fast_weight(weights, f"dense_{i}/bias"),
            )
            if i < len(self.units) - 1:
                x = self._activation(x)
        return x

    def call(
        self,
        encoded: Mapping[str, tf.Tensor],
        weights: Weights | None = None,
        batch_size: tf.Tensor | int | None = None,
    ) -> tf.Tensor:
        if batch_size is None:
            batch_size = _batch_size(encoded, weights)
        if weights is not None and INPUTS_WEIGHT in weights:
            x = weights[INPUTS_WEIGHT]
        else:
            x = self.embed_inputs(encoded, batch_size)
        return append_residual(self.mlp(x, weights), self.residual_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "features": [f.to_dict() for f in self.features],
                "units": list(self.units),
                "activation": self.activation,
                "constant_input_dim": self.constant_input_dim,
                "residual_dim": self.residual_dim,
                **weight_config(self),
            }
        )
        return config


def _batch_size(encoded: Mapping[str, tf.Tensor], weights: Weights | None) -> tf.Tensor:
    if weights is not None and INPUTS_WEIGHT in weights:
        return tf.shape(weights[INPUTS_WEIGHT])[0]
    for value in encoded.values():
        return tf.shape(value)[0]
    raise ValueError(
        "Cannot infer the batch size: pass `batch_size` when the block has "
        "no meta features"
    )


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class FunctionalCross(tf.keras.layers.Layer):
    """DCN-v2 cross layer, x0 * (W x + b) + x, whose weights can be passed in.

    Same math as `tfrs.layers.dcn.Cross` (full rank, or low rank W = U V when
    `projection_dim` is set), but `call` accepts explicit, optionally per-task,
    weights so full-network MAML can adapt it.

    Args:
        projection_dim: Rank of the low-rank kernel; None for full rank.
        kernel_initializer: Initializer of W (or U and V).
        bias_initializer: Initializer of b.
        kernel_regularizer: Regularizer of W (or U and V), added to `losses`.

    Input shape: x0 and x, `[..., n]`. Output shape: `[..., n]`.
    """

    def __init__(
        self,
        projection_dim: int | None = None,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if projection_dim is not None and (
            not isinstance(projection_dim, int) or projection_dim <= 0
        ):
            raise ValueError(
                "`projection_dim` must be a positive integer or None, got "
                f"{projection_dim!r}"
            )
        self.projection_dim = projection_dim
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.bias_initializer = tf.keras.initializers.get(bias_initializer)
        self.kernel_regularizer = tf.keras.regularizers.get(kernel_regularizer)

    def build(self, input_shape):
        width = int(input_shape[-1])
        shapes = (
            {"kernel": (width, width)}
            if self.projection_dim is None
            else {
                "kernel_u": (width, self.projection_dim),
                "kernel_v": (self.projection_dim, width),
            }
        )
        for name, shape in shapes.items():
            kernel = self.add_weight(
                name=name,
                shape=shape,
                initializer=_fresh(self.kernel_initializer),
                regularizer=self.kernel_regularizer,
            )
            setattr(self, name, kernel)
        self.bias = self.add_weight(
            name="bias", shape=(width,), initializer=_fresh(self.bias_initializer)
        )
        super().build(input_shape)

    def weight_dict(self) -> dict[str, tf.Variable]:
        if self.projection_dim is None:
            return {"kernel": self.kernel, "bias": self.bias}
        return {"kernel_u": self.kernel_u, "kernel_v": self.kernel_v, "bias": self.bias}

    def call(
        self, x0: tf.Tensor, x: tf.Tensor | None = None, weights: Weights | None = None
    ) -> tf.Tensor:
        if x is None:
            x = x0
        w = dict(self.weight_dict())
        w.update(weights or {})
        if self.projection_dim is None:
            projected = maml.dense(x, w["kernel"], w["bias"])
        else:
            projected = maml.dense(
                maml.dense(x, w["kernel_u"]), w["kernel_v"], w["bias"]
            )
        return x0 * projected + x

    def get_config(self):
        config = super().get_config()
        config.update({"projection_dim": self.projection_dim, **weight_config(self)})
        return config


INTERACTIONS = ("concat", "product")


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class GlobalBlock(FastWeightLayer):
    """Meta embedding + request features -> cross layers -> MLP -> logit.

    Args:
        features: The spec's request features.
        meta_dim: d, the meta embedding size.
        interaction: How the meta embedding meets the request side. "concat"
            only concatenates it (it then acts mostly as a per-member logit
            shift); "product" also adds e * (r P), the elementwise product of the
            embedding with a learned projection of the request features, so the
            member's vector changes how each item is scored.
        cross_layers: Number of DCN-v2 cross layers.
        projection_dim: Low-rank dimension of the cross layers (None: full rank).
        units: MLP widths before the logit.
        activation: MLP activation.
        kernel_initializer: Initializer of every dense and cross kernel.
        bias_initializer: Initializer of every bias.
        kernel_regularizer: Regularizer of every dense and cross kernel (e.g.
            `tf.keras.regularizers.L2(1e-4)`), added to `losses`.
        embeddings_initializer: Initializer of the request-feature embedding
            tables.
        embeddings_regularizer: Regularizer of those tables.
        residual_dim: The personal residual (None: none). The meta embedding's
            last residual_dim + 1 dimensions are not features of the network:
            a vector r, scored as r . (request P) with a learned projection P,
            and a logit offset, both added to the network's logit. A meta block
            leaves them zero (see `MetaBlock(residual_dim=...)`), so an entity
            scores as the network until the embedding fit of `tf_limaml.newton`
            moves them; 0 keeps the offset only.

    Input shape: meta embedding `[B, d]` or `[T, d]`; encoded request features
    `[B]` or `[T, S]` (plus a trailing K for multi-hot). Called as
    `block(meta_embedding, encoded)` or, as any global block of LiMAMLModel,
    `block({"meta_embedding": meta_embedding, **encoded})`.
    Output shape: logits `[B]` or `[T, S]`.
    """

    # Scores [T, d] embeddings against [T, S, ...] rows itself, every adapted
    # weight goes through maml.dense, and `encode` is plain math on numbers.
    accepts_task_axis = True
    fast_dense_path = True
    encode_compiles = True

    def __init__(
        self,
        features: Sequence[Feature | Mapping[str, Any]],
        meta_dim: int,
        interaction: str = "product",
        cross_layers: int = 2,
        projection_dim: int | None = None,
        units: Sequence[int] = (256, 128),
        activation: str = "relu",
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        embeddings_initializer: Any = "random_normal",
        embeddings_regularizer: Any = None,
        residual_dim: int | None = None,
        **kwargs,
    ):
        super().__init__(
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            **kwargs,
        )
        self.features = as_features(features)
        if not self.features:
            raise ValueError("`features` must hold at least one request feature")
        if not isinstance(meta_dim, int) or meta_dim <= 0:
            raise ValueError(f"`meta_dim` must be a positive integer, got {meta_dim!r}")
        if interaction not in INTERACTIONS:
            raise ValueError(
                f"`interaction` must be one of {INTERACTIONS}, got " f"{interaction!r}"
            )
        if not isinstance(cross_layers, int) or cross_layers < 0:
            raise ValueError(
                f"`cross_layers` must be an integer >= 0, got {cross_layers!r}"
            )
        self.residual_dim = check_residual_dim(residual_dim)
        width = residual_width(residual_dim)
        if meta_dim <= width:
            raise ValueError(
                f"`meta_dim` ({meta_dim}) must exceed the residual's {width} "
                "dimensions"
            )
        self.meta_dim = meta_dim
        # The embedding dimensions the network reads as features; the rest is
        # the residual, which only the embedding fit moves.
        self.feature_dim = meta_dim - width
        # The embedding fit moves the residual only (None: every dimension).
        self.fitted_dims = (
            None if residual_dim is None else tuple(range(self.feature_dim, meta_dim))
        )
        # False: only the residual's projection trains (the network is frozen,
        # so the unadapted model stays what it was; see `trainable_weights`).
        self.train_base = True
        self.interaction = interaction
        self.cross_layers = cross_layers
        self.projection_dim = projection_dim
        self.units = check_units("units", units)
        self.activation = activation
        self._activation = tf.keras.activations.get(activation)
        self.embeddings_initializer = tf.keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = tf.keras.regularizers.get(embeddings_regularizer)
        self.embedding = FeatureEmbedding(
            self.features,
            embeddings_initializer=self.embeddings_initializer,
            embeddings_regularizer=self.embeddings_regularizer,
            name="request_features",
        )
        self.crosses = [
            FunctionalCross(
                projection_dim,
                kernel_initializer=self.kernel_initializer,
                bias_initializer=self.bias_initializer,
                kernel_regularizer=self.kernel_regularizer,
                name=f"cross_{i}",
            )
            for i in range(cross_layers)
        ]

    @property
    def request_feature_embedding(self) -> FeatureEmbedding:
        """The request-feature tables (a sequence meta block may share them)."""
        return self.embedding

    @property
    def cross_width(self) -> int:
        width = self.feature_dim + self.embedding.output_dim
        return width + (self.feature_dim if self.interaction == "product" else 0)

    def build(self, input_shape=None):
        self.embedding.build(None)
        if self.interaction == "product":
            self.add_fast_weight(
                "interaction/kernel", (self.embedding.output_dim, self.feature_dim)
            )
            self.add_fast_weight("interaction/bias", (self.feature_dim,), bias=True)
        width = self.cross_width
        for cross in self.crosses:
            cross.build((None, width))
            for key, variable in cross.weight_dict().items():
                self.track_fast_weight(f"{cross.name}/{key}", variable)
        for i, units in enumerate(self.units):
            self.add_fast_weight(f"dense_{i}/kernel", (width, units))
            self.add_fast_weight(f"dense_{i}/bias", (units,), bias=True)
            width = units
        self.add_fast_weight("logit/kernel", (width, 1))
        self.add_fast_weight("logit/bias", (1,), bias=True)
        self.residual_kernel = None
        if self.residual_dim:
            self.residual_kernel = self.add_fast_weight(
                "residual/kernel", (self.embedding.output_dim, self.residual_dim)
            )
        super().build(input_shape)

    @property
    def trainable_weights(self):
        weights = super().trainable_weights
        if self.train_base:
            return weights
        head = {id(self.residual_kernel)}
        return [w for w in weights if id(w) in head]

    @property
    def non_trainable_weights(self):
        if self.train_base:
            return super().non_trainable_weights
        trainable = {id(w) for w in self.trainable_weights}
        every = super().trainable_weights + super().non_trainable_weights
        return [w for w in every if id(w) not in trainable]

    def encode(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Raw request features -> `call`'s input (numeric features packed)."""
        return self.embedding.encode(raw, pack_numeric=True)

    def call(
        self,
        meta_embedding: tf.Tensor | Mapping[str, tf.Tensor],
        encoded: Mapping[str, tf.Tensor] | None = None,
        weights: Weights | None = None,
    ) -> tf.Tensor:
        meta_embedding, encoded = _split_inputs(meta_embedding, encoded)
        request = self.embedding(encoded)
        per_task = meta_embedding.shape.rank < request.shape.rank
        if self.residual_dim is None:
            return self._network_logits(meta_embedding, request, weights, per_task)
        residual = meta_embedding[..., self.feature_dim :]
        logits = self._network_logits(
            meta_embedding[..., : self.feature_dim], request, weights, per_task
        )
        return logits + self._residual_logits(residual, request, weights, per_task)

    def fitted_logit_terms(
        self,
        meta_embedding: tf.Tensor | Mapping[str, tf.Tensor],
        encoded: Mapping[str, tf.Tensor] | None = None,
        weights: Weights | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor] | None:
        """The logit as an affine function of the fitted dimensions, from one
        pass: (logits with the residual at zero, d logits / d residual
        `[..., residual_dim + 1]`), or None without a residual.

        The residual's share, offset + r . (request P), is linear in the
        residual, so `tf_limaml.newton.fit_affine` runs the embedding fit on
        these without another pass of the network. Inputs as `call`.
        """
        if self.residual_dim is None:
            return None
        meta_embedding, encoded = _split_inputs(meta_embedding, encoded)
        request = self.embedding(encoded)
        per_task = meta_embedding.shape.rank < request.shape.rank
        logits = self._network_logits(
            meta_embedding[..., : self.feature_dim], request, weights, per_task
        )
        columns = [tf.ones_like(logits)[..., None]]  # d logit / d offset
        if self.residual_dim:
            projected = maml.dense(
                request, self.fast_weight(weights, "residual/kernel")
            )
            columns.insert(0, tf.cast(projected, logits.dtype))
        return logits, tf.concat(columns, axis=-1)

    def _network_logits(self, meta_embedding, request, weights, per_task):
        """The network's logit from the embedding's feature dimensions."""
        if self.crosses:
            x = self._cross(meta_embedding, request, weights, per_task)
            hidden = range(len(self.units))
        else:
            x = self._activation(
                self._first_dense(meta_embedding, request, weights, per_task)
            )
            hidden = range(1, len(self.units))
        for i in hidden:
            x = self._activation(
                maml.dense(
                    x,
                    self.fast_weight(weights, f"dense_{i}/kernel"),
                    self.fast_weight(weights, f"dense_{i}/bias"),
                )
            )
        return tf.squeeze(
            maml.dense(
                x,
                self.fast_weight(weights, "logit/kernel"),
                self.fast_weight(weights, "logit/bias"),
            ),
            axis=-1,
        )

    def _residual_logits(self, residual, request, weights, per_task) -> tf.Tensor:
        """offset + r . (request P): the personal residual's share of the logit."""
        offset, vector = residual[..., -1], residual[..., :-1]
        if per_task:
            offset, vector = offset[:, None], vector[:, None, :]
        if not self.residual_dim:
            return offset
        projected = maml.dense(request, self.fast_weight(weights, "residual/kernel"))
        return offset + tf.reduce_sum(vector * projected, axis=-1)

    def _rows(self, meta_embedding: tf.Tensor, request: tf.Tensor) -> tf.Tensor:
        """One embedding per task `[T, d]`, broadcast over its S rows."""
        return tf.broadcast_to(
            meta_embedding[:, None, :],
            tf.concat([tf.shape(request)[:-1], tf.shape(meta_embedding)[-1:]], axis=0),
        )

    def _product(self, embedding_rows, request, weights) -> tf.Tensor:
        item_side = maml.dense(
            request,
            self.fast_weight(weights, "interaction/kernel"),
            self.fast_weight(weights, "interaction/bias"),
        )
        return embedding_rows * item_side

    def _cross(self, meta_embedding, request, weights, per_task) -> tf.Tensor:
        """x0 = [e, r(, e * r P)] through the cross layers."""
        if per_task:
            meta_embedding = self._rows(meta_embedding, request)
        parts = [meta_embedding, request]
        if self.interaction == "product":
            parts.append(self._product(meta_embedding, request, weights))
        x0 = tf.concat(parts, axis=-1)
        x = x0
        for cross in self.crosses:
            prefix = f"{cross.name}/"
            cross_weights = {
                k[len(prefix) :]: v
                for k, v in (weights or {}).items()
                if k.startswith(prefix)
            }
            x = cross(x0, x, weights=cross_weights)
        return x

    def _first_dense(self, meta_embedding, request, weights, per_task) -> tf.Tensor:
        """The first dense layer on x0 = [e, r(, e * r P)], without crosses.

        It runs on each part with that part's rows of the kernel, so the meta
        embedding's share (and its gradient) is computed once per task rather
        than once per row.
        """
        kernel = self.fast_weight(weights, "dense_0/kernel")
        d, n = self.feature_dim, self.embedding.output_dim
        y = maml.dense(request, kernel[..., d : d + n, :])
        if self.interaction == "product":
            rows = self._rows(meta_embedding, request) if per_task else meta_embedding
            product = self._product(rows, request, weights)
            y += maml.dense(product, kernel[..., d + n :, :])
        shared = maml.dense(
            meta_embedding,
            kernel[..., :d, :],
            self.fast_weight(weights, "dense_0/bias"),
        )
        return y + (shared[:, None, :] if per_task else shared)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "features": [f.to_dict() for f in self.features],
                "meta_dim": self.meta_dim,
                "interaction": self.interaction,
                "cross_layers": self.cross_layers,
                "projection_dim": self.projection_dim,
                "units": list(self.units),
                "activation": self.activation,
                "residual_dim": self.residual_dim,
                **weight_config(self),
            }
        )
        return config


def _split_inputs(
    meta_embedding: tf.Tensor | Mapping[str, tf.Tensor],
    encoded: Mapping[str, tf.Tensor] | None,
) -> tuple[tf.Tensor, Mapping[str, tf.Tensor]]:
    """(meta embedding, encoded request) of a global block's call, written
    either way: `block(e, encoded)`, or LiMAMLModel's one dict
    `{"meta_embedding": e, **encoded}`."""
    if encoded is not None:
        return meta_embedding, encoded
    encoded = dict(meta_embedding)
    if META_EMBEDDING_KEY not in encoded:
        raise KeyError(
            f"GlobalBlock called with one dict needs its "
            f"{META_EMBEDDING_KEY!r} entry; got {sorted(encoded)}"
        )
    return encoded.pop(META_EMBEDDING_KEY), encoded


def build_blocks(
    spec: FeatureSpec,
    config: MetaConfig,
    *,
    meta_units: Sequence[int],
    global_units: Sequence[int],
    cross_layers: int,
    projection_dim: int | None,
    interaction: str,
    l2: float,
    residual_dim: int | None,
    meta_block: tf.keras.layers.Layer | None = None,
    global_block: tf.keras.layers.Layer | None = None,
) -> tuple[MetaBlockAdapter, GlobalBlockAdapter]:
    """The model's two blocks, built and connected: `MetaBlock` and `GlobalBlock`
    with the architecture given, or the blocks passed in, behind the block
    protocol (`tf_limaml.blocks`).

    Args:
        spec: The feature spec.
        config: What the model is meta-trained with (checked against the blocks).
        meta_units: Meta block MLP widths; the last is d (as `LiMAMLModel`).
        global_units: Global block MLP widths before the logit.
        cross_layers: DCN-v2 cross layers in the global block.
        projection_dim: Low-rank cross layers (None: full rank).
        interaction: How the meta embedding enters the global block
            ("product" or "concat").
        l2: L2 penalty on the library blocks' kernels (0: none).
        residual_dim: Size of the library blocks' personal residual (None: none).
        meta_block: Your own meta block, or None.
        global_block: Your own global block, or None.

    Returns:
        (meta block adapter, global block adapter); `.layer` is each block.

    Raises:
        ValueError: The blocks cannot run `config` (`tf_limaml.blocks.connect`).
    """
    regularizer = tf.keras.regularizers.L2(l2) if l2 else None
    if meta_block is None:
        meta_block = MetaBlock(
            spec.meta_features,
            units=meta_units,
            kernel_regularizer=regularizer,
            residual_dim=residual_dim,
            name="meta_block",
        )
        meta_block.build(None)
    meta = MetaBlockAdapter(meta_block, spec.meta_features)
    meta_dim = meta.output_dim()
    if global_block is None:
        global_block = GlobalBlock(
            spec.request_features,
            meta_dim=meta_dim,
            interaction=interaction,
            cross_layers=cross_layers,
            projection_dim=projection_dim,
            units=global_units,
            kernel_regularizer=regularizer,
            residual_dim=residual_dim,
            name="global_block",
        )
        global_block.build(None)
    glob = GlobalBlockAdapter(global_block, spec.request_features, meta_dim)
    glob.build()
    connect(meta, glob, config)
    return meta, glob
