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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from tf_limaml import maml
from tf_limaml.features import (
    CATEGORICAL,
    LOG1P,
    MULTI_HOT,
    NUMERIC,
    Feature,
    check_statistics,
)

_PACKAGE = "tf_limaml"
META_EMBEDDING_KEY = "meta_embedding"
Weights = Mapping[str, tf.Tensor]


def _as_features(
    features: Sequence[Feature | Mapping[str, Any]],
) -> tuple[Feature, ...]:
    return tuple(
        f if isinstance(f, Feature) else Feature.from_dict(f, "features")
        for f in features
    )


def _check_units(name: str, units: Sequence[int]) -> tuple[int, ...]:
    units = tuple(units)
    if not units or not all(isinstance(u, int) and u > 0 for u in units):
        raise ValueError(
            f"`{name}` must be a non-empty list of positive integers, "
            f"got {list(units)!r}"
        )
    return units


# The one dense implementation lives in the functional core; this name stays
# for code written against the layers.
apply_dense = maml.dense


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class FeatureEmbedding(tf.keras.layers.Layer):
    """Turns a dict of raw features into one dense vector per row.

    Numeric features pass through as clip((transform(x) - mean) / std) (raw
    with `"normalize": false`); categorical features are looked up in an
    embedding table; multi-hot features average the embeddings of their values.

    Input shape: a dict name -> `[...]` (numeric, categorical), `[..., n]`
    (numeric of shape [n]) or `[..., K]` (multi-hot, "" for padding). Output
    shape: `[..., output_dim]`.

    Raises:
        FeatureSpecError: A feature still needs statistics from the data (see
            `FeatureSpec.missing_statistics`).

    Example:
        >>> layer = FeatureEmbedding(
        ...     [{"name": "x", "type": "numeric", "mean": 3.0, "std": 2.0}])
        >>> layer(layer.encode({"x": tf.constant([1.0])})).shape
        TensorShape([1, 1])
    """

    def __init__(self, features: Sequence[Feature | Mapping[str, Any]], **kwargs):
        super().__init__(**kwargs)
        self.features = _as_features(features)
        # The one place a model meets its features: refuse raw scales here.
        check_statistics(self.features)
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
                    initializer=tf.keras.initializers.RandomNormal(stddev=0.05),
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

    def encode(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Maps raw values to numbers: floats for numeric, int32 ids otherwise.

        Multi-hot padding ("") becomes id -1. Runs string ops, so call it
        outside XLA-compiled code.
        """
        encoded = {}
        for feature in self.features:
            if feature.name not in raw:
                raise KeyError(f"Missing feature {feature.name!r}; got {sorted(raw)}")
            value = raw[feature.name]
            if feature.type == NUMERIC:
                encoded[feature.name] = self._standardize(feature, value)
            else:
                encoded[feature.name] = self._ids(feature, tf.convert_to_tensor(value))
        return encoded

    def call(self, encoded: Mapping[str, tf.Tensor]) -> tf.Tensor:
        parts = []
        for feature in self.features:
            value = encoded[feature.name]
            if feature.type == NUMERIC:
                value = tf.cast(value, self.compute_dtype)
                parts.append(value if feature.shape else value[..., None])
            elif feature.type == CATEGORICAL:
                parts.append(tf.gather(self.tables[feature.name], value))
            else:
                valid = tf.cast(value >= 0, self.compute_dtype)
                vectors = tf.gather(self.tables[feature.name], tf.maximum(value, 0))
                total = tf.reduce_sum(vectors * valid[..., None], axis=-2)
                count = tf.reduce_sum(valid, axis=-1, keepdims=True)
                parts.append(total / tf.maximum(count, 1.0))
        return tf.concat(parts, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update({"features": [f.to_dict() for f in self.features]})
        return config


class _DenseStack(tf.keras.layers.Layer):
    """Shared machinery: named dense weights that fast weights can replace."""

    def _dense_weight(self, name: str, shape: tuple[int, ...], bias: bool = False):
        initializer = "zeros" if bias else tf.keras.initializers.GlorotUniform()
        variable = self.add_weight(
            name=name, shape=shape, initializer=initializer, trainable=True
        )
        self._adaptable[name] = variable
        return variable

    def adaptable_weights(self) -> dict[str, tf.Variable]:
        """The dense weights an inner loop may adapt, by name."""
        return dict(self._adaptable)

    def _w(self, weights: Weights | None, name: str) -> tf.Tensor:
        if weights is not None and name in weights:
            return weights[name]
        return self._adaptable[name]


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class MetaBlock(_DenseStack):
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

    Input shape: a dict of encoded meta features, each `[T]` or `[T, K]`.
    Output shape: `[T, d]`.
    """

    def __init__(
        self,
        features: Sequence[Feature | Mapping[str, Any]] = (),
        units: Sequence[int] = (64, 32),
        activation: str = "relu",
        constant_input_dim: int = 8,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.features = _as_features(features)
        self.units = _check_units("units", units)
        self.activation = activation
        self._activation = tf.keras.activations.get(activation)
        if not isinstance(constant_input_dim, int) or constant_input_dim <= 0:
            raise ValueError(
                "`constant_input_dim` must be a positive integer, got "
                f"{constant_input_dim!r}"
            )
        self.constant_input_dim = constant_input_dim
        self.embedding = (
            FeatureEmbedding(self.features, name="meta_features")
            if (self.features)
            else None
        )
        self._adaptable: dict[str, tf.Variable] = {}

    @property
    def output_dim(self) -> int:
        return self.units[-1]

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
            self._dense_weight(f"dense_{i}/kernel", (width, units))
            self._dense_weight(f"dense_{i}/bias", (units,), bias=True)
            width = units
        super().build(input_shape)

    def encode(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return self.embedding.encode(raw) if self.embedding else {}

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
                self._w(weights, f"dense_{i}/kernel"),
                self._w(weights, f"dense_{i}/bias"),
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
        if weights is not None and "inputs" in weights:
            x = weights["inputs"]
        else:
            x = self.embed_inputs(encoded, batch_size)
        return self.mlp(x, weights)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "features": [f.to_dict() for f in self.features],
                "units": list(self.units),
                "activation": self.activation,
                "constant_input_dim": self.constant_input_dim,
            }
        )
        return config


def _batch_size(encoded: Mapping[str, tf.Tensor], weights: Weights | None) -> tf.Tensor:
    if weights is not None and "inputs" in weights:
        return tf.shape(weights["inputs"])[0]
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

    Input shape: x0 and x, `[..., n]`. Output shape: `[..., n]`.
    """

    def __init__(self, projection_dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if projection_dim is not None and (
            not isinstance(projection_dim, int) or projection_dim <= 0
        ):
            raise ValueError(
                "`projection_dim` must be a positive integer or None, got "
                f"{projection_dim!r}"
            )
        self.projection_dim = projection_dim

    def build(self, input_shape):
        width = int(input_shape[-1])
        init = tf.keras.initializers.GlorotUniform()
        if self.projection_dim is None:
            self.kernel = self.add_weight(
                name="kernel", shape=(width, width), initializer=init
            )
        else:
            self.kernel_u = self.add_weight(
                name="kernel_u", shape=(width, self.projection_dim), initializer=init
            )
            self.kernel_v = self.add_weight(
                name="kernel_v", shape=(self.projection_dim, width), initializer=init
            )
        self.bias = self.add_weight(name="bias", shape=(width,), initializer="zeros")
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
        config.update({"projection_dim": self.projection_dim})
        return config


INTERACTIONS = ("concat", "product")


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class GlobalBlock(_DenseStack):
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

    Input shape: meta embedding `[B, d]` or `[T, d]`; encoded request features
    `[B]` or `[T, S]` (plus a trailing K for multi-hot). Called as
    `block(meta_embedding, encoded)` or, as any global block of LiMAMLModel,
    `block({"meta_embedding": meta_embedding, **encoded})`.
    Output shape: logits `[B]` or `[T, S]`.
    """

    def __init__(
        self,
        features: Sequence[Feature | Mapping[str, Any]],
        meta_dim: int,
        interaction: str = "product",
        cross_layers: int = 2,
        projection_dim: int | None = None,
        units: Sequence[int] = (256, 128),
        activation: str = "relu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.features = _as_features(features)
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
        self.meta_dim = meta_dim
        self.interaction = interaction
        self.cross_layers = cross_layers
        self.projection_dim = projection_dim
        self.units = _check_units("units", units)
        self.activation = activation
        self._activation = tf.keras.activations.get(activation)
        self.embedding = FeatureEmbedding(self.features, name="request_features")
        self.crosses = [
            FunctionalCross(projection_dim, name=f"cross_{i}")
            for i in range(cross_layers)
        ]
        self._adaptable: dict[str, tf.Variable] = {}

    @property
    def cross_width(self) -> int:
        width = self.meta_dim + self.embedding.output_dim
        return width + (self.meta_dim if self.interaction == "product" else 0)

    def build(self, input_shape=None):
        self.embedding.build(None)
        if self.interaction == "product":
            self._dense_weight(
                "interaction/kernel", (self.embedding.output_dim, self.meta_dim)
            )
            self._dense_weight("interaction/bias", (self.meta_dim,), bias=True)
        width = self.cross_width
        for cross in self.crosses:
            cross.build((None, width))
            for key, variable in cross.weight_dict().items():
                self._adaptable[f"{cross.name}/{key}"] = variable
        for i, units in enumerate(self.units):
            self._dense_weight(f"dense_{i}/kernel", (width, units))
            self._dense_weight(f"dense_{i}/bias", (units,), bias=True)
            width = units
        self._dense_weight("logit/kernel", (width, 1))
        self._dense_weight("logit/bias", (1,), bias=True)
        super().build(input_shape)

    def encode(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return self.embedding.encode(raw)

    def call(
        self,
        meta_embedding: tf.Tensor | Mapping[str, tf.Tensor],
        encoded: Mapping[str, tf.Tensor] | None = None,
        weights: Weights | None = None,
    ) -> tf.Tensor:
        if encoded is None:
            # The global-block convention of LiMAMLModel: one dict,
            # {"meta_embedding": e, **encoded request features}.
            encoded = dict(meta_embedding)
            if META_EMBEDDING_KEY not in encoded:
                raise KeyError(
                    f"GlobalBlock called with one dict needs its "
                    f"{META_EMBEDDING_KEY!r} entry; got {sorted(encoded)}"
                )
            meta_embedding = encoded.pop(META_EMBEDDING_KEY)
        request = self.embedding(encoded)
        if meta_embedding.shape.rank < request.shape.rank:
            # One embedding per task, broadcast over its S rows.
            meta_embedding = tf.broadcast_to(
                meta_embedding[:, None, :],
                tf.concat([tf.shape(request)[:-1], [self.meta_dim]], axis=0),
            )
        parts = [meta_embedding, request]
        if self.interaction == "product":
            item_side = maml.dense(
                request,
                self._w(weights, "interaction/kernel"),
                self._w(weights, "interaction/bias"),
            )
            parts.append(meta_embedding * item_side)
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
        for i in range(len(self.units)):
            x = self._activation(
                maml.dense(
                    x,
                    self._w(weights, f"dense_{i}/kernel"),
                    self._w(weights, f"dense_{i}/bias"),
                )
            )
        logits = maml.dense(
            x, self._w(weights, "logit/kernel"), self._w(weights, "logit/bias")
        )
        return tf.squeeze(logits, axis=-1)

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
            }
        )
        return config
