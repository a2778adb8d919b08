"""The export's signatures: a `tf.Module` whose tf.functions call the model.

`LiMAMLServingModule` holds a trained `LiMAMLModel`'s variables and lookup
tables and builds the four signatures (names in `tf_limaml.signatures`):

* `serving_default`: `meta_embedding` [B, d] and the request features, each
  [B] ([B, K] multi-hot) -> `score` [B]. The online signature.
* `adapt_and_predict`: one entity's meta features, each [] ([K]),
  `support_<f>` [S] ([S, K]), `support_label` [S] and `query_<f>` [Q]
  ([Q, K]) -> `score` [Q] and `meta_embedding` [d]; the inner loop runs in-graph.
* `meta_embedding`: E entities' meta features [E] ([E, K]), `support_<f>`
  [E, S] ([E, S, K]), `support_label` and `support_mask` [E, S] ->
  `meta_embedding` [E, d]. Used by `beam_pipelines.generate_embeddings`.
* `predict_examples`: `examples` [B], serialized tf.Example with the request
  features and a float list `meta_embedding` of length d -> `score` [B].

K is a multi-hot feature's `values_per_row` (pad with ""). Numeric features are
float32 (a feature of shape [n] adds an axis of n), categorical and multi-hot
ones strings.

Rules the adaptation signatures enforce:

* Support longer than `max_support` keeps its most recent `max_support` rows
  (the last rows of `adapt_and_predict`'s support; the last real rows by mask in
  `meta_embedding`), as `tf_limaml.data.parse_task_batch` does for training.
* An empty support set (S = 0, or an all-zero mask) is not adapted: the entity
  gets the meta-learned default embedding (cold start).
* Every input must have its declared rank and fixed dimensions (d of
  `meta_embedding`, K of a multi-hot feature), checked in-graph because TF
  Serving does not compare fed shapes with the signature; every real support
  label must be 0 or 1; and every support/query input of a call must have the
  same number of rows. Otherwise the call fails with InvalidArgument naming
  the input. (Wrong dtypes are refused by TF Serving before the graph runs.)

Example:

    module = LiMAMLServingModule(model, max_support=32)
    tf.saved_model.save(module, path, signatures=module.concrete_signatures())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from tf_limaml.config import AdaptOptions
from tf_limaml.features import (
    CATEGORICAL,
    MULTI_HOT,
    NUMERIC,
    QUERY,
    SUPPORT,
    Feature,
    FeatureSpec,
)
from tf_limaml.model import LiMAMLModel
from tf_limaml.signatures import (
    ADAPT_AND_PREDICT,
    EXAMPLES_KEY,
    META_EMBEDDING,
    META_EMBEDDING_KEY,
    PREDICT_EXAMPLES,
    SCORE_KEY,
    SERVING_DEFAULT,
    SUPPORT_LABEL_KEY,
    SUPPORT_MASK_KEY,
)

# `limaml train --max-support` defaults to 32; the export follows unless told.
DEFAULT_MAX_SUPPORT = 32


# ----------------------------------------------------------------- input specs
def _row_spec(feature: Feature, lead: Sequence[int | None], name: str) -> tf.TensorSpec:
    """TensorSpec of one feature with leading axes `lead`.

    Plus K for a multi-hot feature, and n for a numeric feature of shape [n].
    """
    dtype = tf.float32 if feature.type == NUMERIC else tf.string
    shape = list(lead) + ([feature.values_per_row] if feature.type == MULTI_HOT else [])
    shape += list(feature.shape) if feature.type == NUMERIC else []
    return tf.TensorSpec(shape, dtype, name=name)


def _unique(specs: Sequence[tf.TensorSpec], signature: str) -> dict[str, tf.TensorSpec]:
    out: dict[str, tf.TensorSpec] = {}
    for spec in specs:
        if spec.name in out:
            raise ValueError(
                f"Signature {signature!r} would have two inputs named {spec.name!r}; "
                "rename the feature in the FeatureSpec (meta features, `meta_embedding` "
                "and `support_*`/`query_*` names must not collide)."
            )
        out[spec.name] = spec
    return out


def signature_input_specs(
    spec: FeatureSpec, meta_dim: int
) -> dict[str, dict[str, tf.TensorSpec]]:
    """The named inputs of every signature, by signature name.

    Args:
        spec: The model's FeatureSpec.
        meta_dim: d, the meta embedding size.

    Returns:
        {signature name: {input name: TensorSpec}}.

    Raises:
        ValueError: Two inputs of one signature would share a name.
    """
    request, meta = spec.request_features, spec.meta_features
    serving = [tf.TensorSpec([None, meta_dim], tf.float32, name=META_EMBEDDING_KEY)]
    serving += [_row_spec(f, [None], f.name) for f in request]
    adapt = [_row_spec(f, [], f.name) for f in meta]
    adapt += [_row_spec(f, [None], spec.batch_key(SUPPORT, f.name)) for f in request]
    adapt += [tf.TensorSpec([None], tf.float32, name=SUPPORT_LABEL_KEY)]
    adapt += [_row_spec(f, [None], spec.batch_key(QUERY, f.name)) for f in request]
    embed = [_row_spec(f, [None], f.name) for f in meta]
    embed += [
        _row_spec(f, [None, None], spec.batch_key(SUPPORT, f.name)) for f in request
    ]
    embed += [
        tf.TensorSpec([None, None], tf.float32, name=SUPPORT_LABEL_KEY),
        tf.TensorSpec([None, None], tf.float32, name=SUPPORT_MASK_KEY),
    ]
    examples = [tf.TensorSpec([None], tf.string, name=EXAMPLES_KEY)]
    return {
        SERVING_DEFAULT: _unique(serving, SERVING_DEFAULT),
        ADAPT_AND_PREDICT: _unique(adapt, ADAPT_AND_PREDICT),
        META_EMBEDDING: _unique(embed, META_EMBEDDING),
        PREDICT_EXAMPLES: _unique(examples, PREDICT_EXAMPLES),
    }


def example_parsing_spec(spec: FeatureSpec, meta_dim: int) -> dict[str, Any]:
    """tf.io.parse_example features of the `predict_examples` signature.

    The Example holds `meta_embedding` (float list of length d) and every
    request feature. A missing value follows the task rules: a numeric feature
    takes its `default` (required when it has none), a categorical feature with
    hash buckets or `allow_oov` becomes "" (the OOV bucket), a multi-hot
    feature may hold 0..K values; anything else is required.
    """
    features: dict[str, Any] = {
        META_EMBEDDING_KEY: tf.io.FixedLenFeature([meta_dim], tf.float32)
    }
    for feature in spec.request_features:
        if feature.type == NUMERIC:
            default = feature.default
            if default is not None and feature.shape:
                default = [default] * feature.size
            features[feature.name] = tf.io.FixedLenFeature(
                list(feature.shape), tf.float32, default_value=default
            )
        elif feature.type == CATEGORICAL:
            optional = feature.vocabulary is None or feature.allow_oov
            features[feature.name] = tf.io.FixedLenFeature(
                [], tf.string, default_value="" if optional else None
            )
        else:
            features[feature.name] = tf.io.VarLenFeature(tf.string)
    return features


# -------------------------------------------------------------- the tf.Module
def _keep_latest_rows(value: tf.Tensor, max_rows: int) -> tf.Tensor:
    """The last `max_rows` rows of axis 0 (all rows when there are fewer)."""
    rows = tf.shape(value)[0]
    return value[tf.maximum(rows - max_rows, 0) :]


def _shape_text(shape: tf.TensorShape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape.as_list()) + "]"


def _checked_inputs(
    inputs: Mapping[str, tf.Tensor], specs: Mapping[str, tf.TensorSpec]
) -> dict[str, tf.Tensor]:
    """The inputs, each made to wait for a check of its rank and fixed dimensions.

    TF Serving feeds request tensors into the graph without comparing their
    shapes with the signature, so a `[B, 3]` embedding or a multi-hot input of
    the wrong width K would fail deep inside the model, or be scored silently.
    Each check fails with InvalidArgument naming the input and both shapes.

    The rank is read from the runtime shape padded with -1 sentinels (the
    entry at index `rank` must be a sentinel, the one before it a real
    dimension): `tf.rank` or `tf.size(tf.shape(x))` would be constant-folded
    from the declared shape and never see the fed tensor's.
    """
    checks = []
    for name, spec in specs.items():
        expected = spec.shape.as_list()
        rank = len(expected)
        shape = tf.raw_ops.Shape(input=inputs[name])
        padded = tf.concat([shape, tf.fill([rank + 1], -1)], axis=0)
        ok = tf.equal(padded[rank], -1)
        if rank:
            ok = tf.logical_and(ok, tf.greater_equal(padded[rank - 1], 0))
        for axis, dim in enumerate(expected):
            if dim is not None:
                ok = tf.logical_and(ok, tf.equal(padded[axis], dim))
        checks.append(
            tf.debugging.Assert(
                ok,
                [
                    f"Input `{name}` must have shape {_shape_text(spec.shape)} ({spec.dtype.name}, "
                    "? = any length); got shape",
                    shape,
                ],
            )
        )
    with tf.control_dependencies(checks):
        return {name: tf.identity(value) for name, value in inputs.items()}


def _assert_rows(
    values: Mapping[str, tf.Tensor], expected: tf.Tensor, reference: str, axes: int
) -> list[tf.Operation]:
    """Asserts every value's leading `axes` dims equal `expected` (those of `reference`)."""
    checks = []
    for name, value in values.items():
        checks.append(
            tf.debugging.assert_equal(
                tf.shape(value)[:axes],
                expected,
                message=(
                    f"Input `{name}` must have as many rows as `{reference}` (one per "
                    "interaction); send equal-length support/query inputs"
                ),
            )
        )
    return checks


def _assert_finite(values: Mapping[str, tf.Tensor]) -> list[tf.Operation]:
    """Asserts every float input holds no NaN or Inf, naming the first bad one.

    A NaN numeric feature would otherwise come back as a NaN score (or poison
    an adapted embedding) without an error.
    """
    return [
        tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(value)),
            [f"Input `{name}` must be finite (no NaN or Inf); got", value],
            summarize=16,
        )
        for name, value in values.items()
        if value.dtype.is_floating
    ]


def _assert_binary_labels(
    label: tf.Tensor, mask: tf.Tensor | None = None
) -> tf.Operation:
    ok = tf.logical_or(tf.equal(label, 0.0), tf.equal(label, 1.0))
    if mask is not None:
        ok = tf.logical_or(ok, tf.equal(mask, 0.0))
    return tf.debugging.Assert(
        tf.reduce_all(ok),
        [
            f"`{SUPPORT_LABEL_KEY}` must be 0 or 1 on every real support row "
            "(binarize labels as the task records do); got",
            label,
        ],
        summarize=32,
    )


class _Untracked:
    """Holds an object without making it a dependency of the SavedModel."""

    def __init__(self, value: Any):
        self.value = value


class LiMAMLServingModule(tf.Module):
    """The exported object: the model's weights and tables, and the signatures.

    The Keras model itself is not a tracked attribute: tf-keras would then
    also run its own SavedModel serialization of the subclassed model, which
    traces `call` (or fails when it cannot). The module tracks exactly what the
    signatures capture instead: the model's variables and its vocabulary
    lookup tables.

    Args:
        model: A trained LiMAMLModel.
        max_support: Most support rows the adaptation signatures use per entity.
        inner_steps: Inner-loop steps run in-graph (default: the model's).
    """

    def __init__(
        self,
        model: LiMAMLModel,
        max_support: int = DEFAULT_MAX_SUPPORT,
        inner_steps: int | None = None,
    ):
        super().__init__(name="limaml_serving")
        if (
            isinstance(max_support, bool)
            or not isinstance(max_support, int)
            or (max_support <= 0)
        ):
            raise ValueError(
                f"`max_support` must be a positive integer, got {max_support!r}"
            )
        self._model = _Untracked(model)
        self.model_variables = list(model.variables)
        self.lookup_tables = [
            obj
            for obj in tf.train.TrackableView(model).descendants()
            if isinstance(obj, tf.saved_model.experimental.TrackableResource)
        ]
        self.max_support = max_support
        self.inner_steps = (
            model.adapt_options.resolve(model.meta_config).inner_steps
            if inner_steps is None
            else inner_steps
        )
        if (
            isinstance(self.inner_steps, bool)
            or not isinstance(self.inner_steps, int)
            or (self.inner_steps < 0)
        ):
            raise ValueError(
                f"`inner_steps` must be an integer >= 0, got {inner_steps!r}"
            )
        self.input_specs = signature_input_specs(model.spec, model.meta_dim)

    @property
    def model(self) -> LiMAMLModel:
        return self._model.value

    # The four signature bodies. Each takes one dict of named tensors.
    def serve(self, inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs = _checked_inputs(inputs, self.input_specs[SERVING_DEFAULT])
        spec = self.model.spec
        embedding = inputs[META_EMBEDDING_KEY]
        request = {f.name: inputs[f.name] for f in spec.request_features}
        checks = _assert_rows(request, tf.shape(embedding)[:1], META_EMBEDDING_KEY, 1)
        checks += _assert_finite({META_EMBEDDING_KEY: embedding, **request})
        with tf.control_dependencies(checks):
            score = self.model.score(embedding, request)
        return {SCORE_KEY: tf.cast(score, tf.float32)}

    def adapt_and_predict(
        self, inputs: Mapping[str, tf.Tensor]
    ) -> dict[str, tf.Tensor]:
        inputs = _checked_inputs(inputs, self.input_specs[ADAPT_AND_PREDICT])
        spec = self.model.spec
        label = inputs[SUPPORT_LABEL_KEY]
        support = {
            spec.batch_key(SUPPORT, f.name): inputs[spec.batch_key(SUPPORT, f.name)]
            for f in spec.request_features
        }
        query = {
            spec.batch_key(QUERY, f.name): inputs[spec.batch_key(QUERY, f.name)]
            for f in spec.request_features
        }
        first_query = next(iter(query))
        checks = _assert_rows(support, tf.shape(label)[:1], SUPPORT_LABEL_KEY, 1)
        checks += _assert_rows(query, tf.shape(query[first_query])[:1], first_query, 1)
        checks.append(_assert_binary_labels(label))
        checks += _assert_finite(
            {
                **{f.name: inputs[f.name] for f in spec.meta_features},
                **support,
                **query,
            }
        )
        with tf.control_dependencies(checks):
            # One task: a leading axis of 1 on everything.
            tasks = {f.name: inputs[f.name][None] for f in spec.meta_features}
            for key, value in support.items():
                tasks[key] = _keep_latest_rows(value, self.max_support)[None]
            tasks[SUPPORT_LABEL_KEY] = _keep_latest_rows(label, self.max_support)[None]
            tasks[SUPPORT_MASK_KEY] = tf.ones_like(tasks[SUPPORT_LABEL_KEY])
            tasks.update({key: value[None] for key, value in query.items()})
            out = self.model.forward(
                self.model.encode(tasks), AdaptOptions(inner_steps=self.inner_steps)
            )
            logits, embedding = out["query_logits"], out["meta_embedding"]
        return {
            SCORE_KEY: tf.cast(tf.sigmoid(logits[0]), tf.float32),
            META_EMBEDDING_KEY: tf.cast(embedding[0], tf.float32),
        }

    def meta_embedding(self, inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs = _checked_inputs(inputs, self.input_specs[META_EMBEDDING])
        spec = self.model.spec
        label, mask = inputs[SUPPORT_LABEL_KEY], inputs[SUPPORT_MASK_KEY]
        support = {
            spec.batch_key(SUPPORT, f.name): inputs[spec.batch_key(SUPPORT, f.name)]
            for f in spec.request_features
        }
        meta = {f.name: inputs[f.name] for f in spec.meta_features}
        checks = _assert_rows(
            {**support, SUPPORT_MASK_KEY: mask},
            tf.shape(label)[:2],
            SUPPORT_LABEL_KEY,
            2,
        )
        checks += _assert_rows(meta, tf.shape(label)[:1], SUPPORT_LABEL_KEY, 1)
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all(tf.logical_or(tf.equal(mask, 0.0), tf.equal(mask, 1.0))),
                [
                    f"`{SUPPORT_MASK_KEY}` must be 1 for real rows and 0 for padding; got",
                    mask,
                ],
                summarize=32,
            )
        )
        checks.append(_assert_binary_labels(label, mask))
        checks += _assert_finite({**meta, **support})
        with tf.control_dependencies(checks):
            # Keep each entity's latest `max_support` real rows: count real rows
            # from the end and drop those beyond the cap.
            from_end = tf.cumsum(mask, axis=1, reverse=True)
            kept = mask * tf.cast(from_end <= float(self.max_support), mask.dtype)
            tasks = {
                **meta,
                **support,
                SUPPORT_LABEL_KEY: label,
                SUPPORT_MASK_KEY: kept,
            }
            embedding = self.model.embed(
                tasks, AdaptOptions(inner_steps=self.inner_steps)
            )
        return {META_EMBEDDING_KEY: tf.cast(embedding, tf.float32)}

    def predict_examples(self, inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs = _checked_inputs(inputs, self.input_specs[PREDICT_EXAMPLES])
        spec = self.model.spec
        parsed = tf.io.parse_example(
            inputs[EXAMPLES_KEY], example_parsing_spec(spec, self.model.meta_dim)
        )
        request = {}
        for feature in spec.request_features:
            value = parsed[feature.name]
            if feature.type == MULTI_HOT:
                value = tf.sparse.to_dense(value, default_value="")
                width = feature.values_per_row
                value = value[:, :width]
                value = tf.pad(
                    value, [[0, 0], [0, width - tf.shape(value)[1]]], constant_values=""
                )
            request[feature.name] = value
        checks = _assert_finite(
            {META_EMBEDDING_KEY: parsed[META_EMBEDDING_KEY], **request}
        )
        with tf.control_dependencies(checks):
            score = self.model.score(parsed[META_EMBEDDING_KEY], request)
        return {SCORE_KEY: tf.cast(score, tf.float32)}

    def concrete_signatures(self) -> dict[str, Any]:
        """{signature name: concrete function}, ready for tf.saved_model.save."""
        bodies: dict[str, Callable] = {
            SERVING_DEFAULT: self.serve,
            ADAPT_AND_PREDICT: self.adapt_and_predict,
            META_EMBEDDING: self.meta_embedding,
            PREDICT_EXAMPLES: self.predict_examples,
        }
        return {
            name: tf.function(body).get_concrete_function(self.input_specs[name])
            for name, body in bodies.items()
        }
