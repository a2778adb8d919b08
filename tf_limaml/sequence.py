"""SequenceMetaBlock: a meta block that reads the entity's support sequence.

An MLP over static entity features cannot see which items a member rated,
how, or in what order. This block encodes the support interactions in time
order, each one as (request features, label, recency), with a small
transformer encoder built from Keras `MultiHeadAttention`, pools them into
one vector with a learned query, and maps [static features, pooled] through
an MLP to the meta embedding of size d. The embedding is still d floats per
entity, so export, `limaml embed` and `serving_default` are unchanged.

The inner loop adapts the weights chosen by `adapt` ("output": the last MLP
layer; "mlp": every MLP layer; "pool_query": the pooling query) with
per-task fast weights, in the same vectorized inner loop as `MetaBlock`.
With `MetaConfig(inner_steps=0)` the block is pure amortized inference: the
support changes the embedding through attention alone.

Example:

    block = tf_limaml.SequenceMetaBlock(
        spec.meta_features, spec.request_features, units=(32, 16))
    model = tf_limaml.LiMAMLModel(spec, MetaConfig(inner_steps=1),
                                  meta_block=block)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from tf_limaml import maml
from tf_limaml.blocks import (
    SUPPORT_SEQUENCE_KEY,
    FastWeightLayer,
    append_residual,
    as_features,
    check_residual_dim,
    check_units,
    residual_width,
    weight_config,
)
from tf_limaml.features import Feature
from tf_limaml.layers import FeatureEmbedding

_PACKAGE = "tf_limaml"

# What the inner loop may adapt (`SequenceMetaBlock(adapt=...)`).
SEQUENCE_ADAPT_CHOICES = ("output", "mlp", "pool_query")
REQUEST_EMBEDDINGS = ("own", "shared")

Weights = Mapping[str, tf.Tensor]


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class SequenceMetaBlock(FastWeightLayer):
    """Static meta features + support sequence -> transformer -> meta embedding.

    Each support row becomes a token: its request features, and the same
    signed by the label (+1 for 1, -1 for 0), projected to `model_dim`, plus a learned vector per label value (soft labels mix the
    two), plus a learned vector per recency rank (0 is the latest real row)
    when `recency` is on. Padding rows (mask 0) are zeroed before the encoder
    and masked out of every attention, so they never change the embedding. A
    task with no real support row pools to zeros: its embedding is the
    static part's, the cold-start default.

    Args:
        features: The spec's meta features (may be empty).
        request_features: The spec's request features (what each support row
            holds).
        units: MLP widths after pooling; the last is d.
        model_dim: Width of the tokens and of attention.
        num_heads: Attention heads (`model_dim` must divide by it).
        num_layers: Transformer encoder layers before pooling (0: pooling
            attends the projected tokens directly).
        ff_dim: Width of the encoder's feed-forward layer (default
            2 * model_dim).
        recency: Add a learned vector per recency rank.
        max_positions: Recency ranks kept apart; older rows share the last.
        request_embedding: "own" (the block embeds support rows with its own
            tables) or "shared" (LiMAMLModel hands it the rows embedded by the
            library `GlobalBlock`'s tables, which the global block also uses).
        adapt: Which weights the inner loop adapts: a subset of "output",
            "mlp" and "pool_query".
        activation: MLP hidden activation.
        kernel_initializer: Of the MLP, token projection and pooling query.
        bias_initializer: Of the MLP, token projection and pooling query.
        kernel_regularizer: Of the MLP, token projection and pooling query.
        embeddings_initializer: Of the embedding tables (meta features, and
            request features when "own").
        embeddings_regularizer: Of the embedding tables.

    Input: the dict of encoded meta features, plus under
    `SUPPORT_SEQUENCE_KEY` a dict with "features" (encoded support request
    features, `[T, S, ...]`, or "embedded" `[T, S, R]` when shared), "label"
    `[T, S]` and "mask" `[T, S]`. Output: `[T, d]`.
    """

    reads_support = True

    def __init__(
        self,
        features: Sequence[Feature | Mapping[str, Any]] = (),
        request_features: Sequence[Feature | Mapping[str, Any]] = (),
        units: Sequence[int] = (32, 16),
        model_dim: int = 32,
        num_heads: int = 2,
        num_layers: int = 1,
        ff_dim: int | None = None,
        recency: bool = True,
        max_positions: int = 64,
        request_embedding: str = "shared",
        adapt: Sequence[str] = ("output",),
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
        self.request_features = as_features(request_features)
        if not self.request_features:
            raise ValueError(
                "SequenceMetaBlock needs `request_features` (what each support "
                "row holds): pass spec.request_features"
            )
        self.units = check_units("units", units)
        self.residual_dim = check_residual_dim(residual_dim)
        for name, value, low in (
            ("model_dim", model_dim, 1),
            ("num_heads", num_heads, 1),
            ("num_layers", num_layers, 0),
            ("max_positions", max_positions, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if model_dim % num_heads:
            raise ValueError(
                f"`model_dim` ({model_dim}) must be a multiple of `num_heads` "
                f"({num_heads})"
            )
        if request_embedding not in REQUEST_EMBEDDINGS:
            raise ValueError(
                f"`request_embedding` must be one of {REQUEST_EMBEDDINGS}, got "
                f"{request_embedding!r}"
            )
        adapt = (adapt,) if isinstance(adapt, str) else tuple(adapt)
        unknown = [a for a in adapt if a not in SEQUENCE_ADAPT_CHOICES]
        if unknown or not adapt:
            raise ValueError(
                f"`adapt` must be a non-empty subset of {SEQUENCE_ADAPT_CHOICES}, "
                f"got {adapt!r}"
            )
        self.model_dim = model_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.ff_dim = ff_dim or 2 * model_dim
        self.recency = bool(recency)
        self.max_positions = max_positions
        self.request_embedding = request_embedding
        self.adapt = adapt
        self.activation = activation
        self._activation = tf.keras.activations.get(activation)
        self.embeddings_initializer = tf.keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = tf.keras.regularizers.get(embeddings_regularizer)
        table_args = {
            "embeddings_initializer": self.embeddings_initializer,
            "embeddings_regularizer": self.embeddings_regularizer,
        }
        self.embedding = (
            FeatureEmbedding(self.features, name="meta_features", **table_args)
            if self.features
            else None
        )
        # In "shared" mode the tables are the global block's: this one only
        # encodes and tells the width.
        self.row_embedding = FeatureEmbedding(
            self.request_features, name="support_rows", **table_args
        )
        self.encoder_layers = [
            {
                "attention_norm": tf.keras.layers.LayerNormalization(
                    name=f"encoder_{i}/attention_norm"
                ),
                "attention": tf.keras.layers.MultiHeadAttention(
                    num_heads,
                    model_dim // num_heads,
                    kernel_initializer=self.kernel_initializer,
                    name=f"encoder_{i}/attention",
                ),
                "ff_norm": tf.keras.layers.LayerNormalization(
                    name=f"encoder_{i}/ff_norm"
                ),
                "ff_in": tf.keras.layers.Dense(
                    self.ff_dim, activation="relu", name=f"encoder_{i}/ff_in"
                ),
                "ff_out": tf.keras.layers.Dense(model_dim, name=f"encoder_{i}/ff_out"),
            }
            for i in range(num_layers)
        ]
        self.pool_attention = tf.keras.layers.MultiHeadAttention(
            num_heads,
            model_dim // num_heads,
            kernel_initializer=self.kernel_initializer,
            name="pool_attention",
        )

    # ----------------------------------------------------------------- shape
    @property
    def output_dim(self) -> int:
        return self.units[-1] + residual_width(self.residual_dim)

    @property
    def request_dim(self) -> int:
        """Width of one embedded support row (R)."""
        return self.row_embedding.output_dim

    @property
    def static_dim(self) -> int:
        return self.embedding.output_dim if self.embedding else 0

    def build(self, input_shape=None):
        if self.embedding is not None:
            self.embedding.build(None)
        if self.request_embedding == "own":
            self.row_embedding.build(None)
        h = self.model_dim
        init = self.kernel_initializer
        self.token_kernel = self.add_weight(
            name="token/kernel", shape=(2 * self.request_dim, h), initializer=init
        )
        self.token_bias = self.add_weight(
            name="token/bias", shape=(h,), initializer="zeros"
        )
        self.label_vectors = self.add_weight(
            name="token/label",
            shape=(2, h),
            initializer=tf.keras.initializers.RandomNormal(stddev=0.1),
        )
        if self.recency:
            self.position_vectors = self.add_weight(
                name="token/recency",
                shape=(self.max_positions, h),
                initializer=tf.keras.initializers.RandomNormal(stddev=0.1),
            )
        self.track_fast_weight(
            "pool_query",
            self.add_weight(
                name="pool_query",
                shape=(h,),
                initializer=tf.keras.initializers.RandomNormal(stddev=0.1),
            ),
        )
        # Keras builds attention on its first call: do it now, so that every
        # weight exists before a checkpoint restores or a tf.function traces.
        tokens = tf.zeros([1, 1, h])
        for layer in self.encoder_layers:
            layer["attention"](tokens, tokens)
            for key in ("attention_norm", "ff_norm"):
                layer[key].build((None, None, h))
            layer["ff_in"].build((None, None, h))
            layer["ff_out"].build((None, None, self.ff_dim))
        self.pool_attention(tokens, tokens)
        width = self.static_dim + h
        for i, units in enumerate(self.units):
            self.add_fast_weight(f"dense_{i}/kernel", (width, units))
            self.add_fast_weight(f"dense_{i}/bias", (units,), bias=True)
            width = units
        super().build(input_shape)

    def adaptable_weights(self) -> dict[str, tf.Variable]:
        """The weights `adapt` names: what the inner loop adapts."""
        names = set()
        last = len(self.units) - 1
        for choice in self.adapt:
            if choice == "pool_query":
                names.add("pool_query")
            for i in range(len(self.units)):
                if choice == "mlp" or (choice == "output" and i == last):
                    names |= {f"dense_{i}/kernel", f"dense_{i}/bias"}
        return {k: v for k, v in self._adaptable.items() if k in names}

    # ---------------------------------------------------------------- encode
    def encode(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Raw meta features -> numbers (string lookups; outside XLA)."""
        if self.embedding is None:
            return {}
        return self.embedding.encode(raw, pack_numeric=True)

    def encode_support(self, raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Raw support request features `[T, S, ...]` -> numbers (own tables)."""
        return self.row_embedding.encode(raw, pack_numeric=True)

    # ------------------------------------------------------------------ call
    def _tokens(self, sequence: Mapping[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """Tokens `[T, S, h]` (zero at padding) and the mask `[T, S]`."""
        dtype = self.compute_dtype
        mask = tf.cast(sequence["mask"], dtype)
        if "embedded" in sequence:
            rows = tf.cast(sequence["embedded"], dtype)
        else:
            rows = self.row_embedding(sequence["features"])
        real = mask[..., None] > 0
        # Padding may hold anything (a label of 9, a NaN): select, never multiply.
        rows = tf.where(real, rows, tf.zeros_like(rows))
        label = tf.where(mask > 0, tf.cast(sequence["label"], dtype), 0.0)
        # The row signed by its label (+ liked, - not): a mean of these is a
        # preference direction, which even one attention layer can pool.
        signed = rows * (2.0 * label[..., None] - 1.0)
        tokens = (
            tf.einsum("tsr,rh->tsh", tf.concat([rows, signed], -1), self.token_kernel)
            + self.token_bias
        )
        tokens += label[..., None] * self.label_vectors[1]
        tokens += (1.0 - label[..., None]) * self.label_vectors[0]
        if self.recency:
            # Rank from the latest real row, counting real rows only, so a
            # support cut to its latest k (mask zeros in front) ranks the same.
            later = tf.cumsum(mask, axis=1, exclusive=True, reverse=True)
            rank = tf.minimum(tf.cast(later, tf.int32), self.max_positions - 1)
            tokens += tf.gather(self.position_vectors, rank)
        return tf.where(real, tokens, tf.zeros_like(tokens)), mask

    def _encode_sequence(self, tokens: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        pairs = mask[:, :, None] * mask[:, None, :]
        for layer in self.encoder_layers:
            x = layer["attention_norm"](tokens)
            tokens += layer["attention"](x, x, attention_mask=pairs > 0)
            x = layer["ff_norm"](tokens)
            tokens += layer["ff_out"](layer["ff_in"](x))
        return tokens

    def pool(
        self,
        sequence: Mapping[str, tf.Tensor] | None,
        weights: Weights | None,
        batch_size: tf.Tensor | int,
    ) -> tf.Tensor:
        """The support pooled to `[T, model_dim]` (zeros with no real row)."""
        if sequence is None:
            return tf.zeros([batch_size, self.model_dim], self.compute_dtype)
        tokens, mask = self._tokens(sequence)
        tokens = self._encode_sequence(tokens, mask)
        query = tf.convert_to_tensor(self.fast_weight(weights, "pool_query"))
        if query.shape.rank == 1:
            query = tf.broadcast_to(query, [tf.shape(tokens)[0], self.model_dim])
        pooled = self.pool_attention(
            query[:, None, :], tokens, attention_mask=mask[:, None, :] > 0
        )[:, 0, :]
        has_support = tf.reduce_sum(mask, axis=1, keepdims=True) > 0
        return tf.where(has_support, pooled, tf.zeros_like(pooled))

    def call(
        self,
        inputs: Mapping[str, tf.Tensor],
        weights: Weights | None = None,
        batch_size: tf.Tensor | int | None = None,
    ) -> tf.Tensor:
        inputs = dict(inputs)
        sequence = inputs.pop(SUPPORT_SEQUENCE_KEY, None)
        if batch_size is None:
            batch_size = _batch_size(inputs, sequence, weights)
        pooled = self.pool(sequence, weights, batch_size)
        if self.embedding is not None:
            x = tf.concat([self.embedding(inputs), pooled], axis=-1)
        else:
            x = pooled
        for i in range(len(self.units)):
            x = maml.dense(
                x,
                self.fast_weight(weights, f"dense_{i}/kernel"),
                self.fast_weight(weights, f"dense_{i}/bias"),
            )
            if i < len(self.units) - 1:
                x = self._activation(x)
        return append_residual(x, self.residual_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "features": [f.to_dict() for f in self.features],
                "request_features": [f.to_dict() for f in self.request_features],
                "units": list(self.units),
                "model_dim": self.model_dim,
                "num_heads": self.num_heads,
                "num_layers": self.num_layers,
                "ff_dim": self.ff_dim,
                "recency": self.recency,
                "max_positions": self.max_positions,
                "request_embedding": self.request_embedding,
                "adapt": list(self.adapt),
                "activation": self.activation,
                "residual_dim": self.residual_dim,
                **weight_config(self),
            }
        )
        return config


def _batch_size(
    inputs: Mapping[str, tf.Tensor],
    sequence: Mapping[str, tf.Tensor] | None,
    weights: Weights | None,
) -> tf.Tensor:
    if sequence is not None:
        return tf.shape(sequence["mask"])[0]
    for value in inputs.values():
        return tf.shape(value)[0]
    for value in (weights or {}).values():
        if value.shape.rank and value.shape.rank > 1:
            return tf.shape(value)[0]
    raise ValueError(
        "SequenceMetaBlock needs `batch_size` when it gets neither meta features "
        "nor a support sequence"
    )
