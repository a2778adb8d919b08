"""SavedModel export for TF Serving: four signatures in `EXPORT/<version>/`.

`export_model` wraps a trained `LiMAMLModel` in a `tf.Module` whose
tf.functions call the model's traceable methods, and writes a SavedModel that
TF Serving, `saved_model_cli` and the TF1 loader read. The signatures (named
inputs and outputs, `None` batch axes, standard TensorFlow ops only):

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
float32, categorical and multi-hot ones strings.

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

The directory is written under a hidden temporary name in the export base and
renamed to `<version>` when complete, so TF Serving, which polls the base for
numeric directories, never sees a partial version (on POSIX file systems,
where a rename is atomic). An export killed midway leaves only its temporary
directory, which the next export removes (`remove_abandoned_exports`). `assets.extra/` holds TF Serving's warmup requests
and `limaml.json` (spec, meta_dim, max_support, inner_steps, version).

Example:

    model = tf_limaml.load_model("runs/model")
    path = tf_limaml.export.export_model(model, "exports/limaml", max_support=32)
    # tensorflow_model_server --model_base_path=$PWD/exports/limaml ...
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_limaml import data
from tf_limaml.features import (
    CATEGORICAL,
    LABEL_KEY,
    MASK_KEY,
    MULTI_HOT,
    NUMERIC,
    QUERY,
    SUPPORT,
    Feature,
    FeatureSpec,
)
from tf_limaml.model import LiMAMLModel, load_model

logger = logging.getLogger(__name__)

SERVING_DEFAULT = "serving_default"
ADAPT_AND_PREDICT = "adapt_and_predict"
META_EMBEDDING = "meta_embedding"
PREDICT_EXAMPLES = "predict_examples"
SIGNATURE_NAMES = (SERVING_DEFAULT, ADAPT_AND_PREDICT, META_EMBEDDING, PREDICT_EXAMPLES)

SCORE_KEY = "score"
EMBEDDING_KEY = "meta_embedding"
EXAMPLES_KEY = "examples"
SUPPORT_LABEL_KEY = FeatureSpec.batch_key(SUPPORT, LABEL_KEY)
SUPPORT_MASK_KEY = FeatureSpec.batch_key(SUPPORT, MASK_KEY)

ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "limaml.json"
METADATA_FORMAT = 1
# `limaml train --max-support` defaults to 32; the export follows unless told.
DEFAULT_MAX_SUPPORT = 32
DEFAULT_WARMUP_BATCH_SIZES = (1, 10, 100)
_TEMP_PREFIX = ".tmp-export-"
_VERSION_PATTERN = re.compile(r"^[0-9]+$")
# .tmp-export-<version>-<host>-<pid>-<uuid hex>: who wrote it, so that a later
# export can tell an abandoned one (its process is gone) from a running one.
_TEMP_PATTERN = re.compile(
    rf"^{re.escape(_TEMP_PREFIX)}([0-9]+)-([A-Za-z0-9._]+)-([0-9]+)-([0-9a-f]{{32}})$"
)
# A temporary export of another host (or an unrecognized name) is only
# removed once it is this old: its writer cannot be asked whether it still runs.
ABANDONED_AFTER_S = 24 * 3600


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
    serving = [tf.TensorSpec([None, meta_dim], tf.float32, name=EMBEDDING_KEY)]
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
        EMBEDDING_KEY: tf.io.FixedLenFeature([meta_dim], tf.float32)
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
            model.meta_config.inner_steps if inner_steps is None else (inner_steps)
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
        embedding = inputs[EMBEDDING_KEY]
        request = {f.name: inputs[f.name] for f in spec.request_features}
        checks = _assert_rows(request, tf.shape(embedding)[:1], EMBEDDING_KEY, 1)
        checks += _assert_finite({EMBEDDING_KEY: embedding, **request})
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
            logits, embedding = self.model.compute_query_logits(tasks, self.inner_steps)
        return {
            SCORE_KEY: tf.cast(tf.sigmoid(logits[0]), tf.float32),
            EMBEDDING_KEY: tf.cast(embedding[0], tf.float32),
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
            embedding = self.model.compute_meta_embedding(tasks, self.inner_steps)
        return {EMBEDDING_KEY: tf.cast(embedding, tf.float32)}

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
        checks = _assert_finite({EMBEDDING_KEY: parsed[EMBEDDING_KEY], **request})
        with tf.control_dependencies(checks):
            score = self.model.score(parsed[EMBEDDING_KEY], request)
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


# --------------------------------------------------------- warmup requests
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def prediction_log_bytes(
    inputs: Mapping[str, np.ndarray], signature_name: str, model_name: str = "limaml"
) -> bytes:
    """Serializes a tensorflow.serving.PredictionLog holding one PredictRequest.

    Written by hand from the proto field numbers (PredictionLog.predict_log = 6,
    PredictLog.request = 1, PredictRequest.model_spec = 1 / inputs = 2,
    ModelSpec.name = 1 / signature_name = 3) so that exporting does not need
    the tensorflow-serving-api package; the tests parse it with that package.
    """
    model_spec = _field(1, model_name.encode()) + _field(3, signature_name.encode())
    request = _field(1, model_spec)
    for key in sorted(inputs):
        tensor = tf.make_tensor_proto(inputs[key]).SerializeToString()
        request += _field(2, _field(1, key.encode()) + _field(2, tensor))
    return _field(6, _field(1, request))


def warmup_inputs(
    spec: FeatureSpec, meta_dim: int, batch_size: int
) -> dict[str, np.ndarray]:
    """A representative `serving_default` request of `batch_size` rows."""
    inputs: dict[str, np.ndarray] = {
        EMBEDDING_KEY: np.zeros([batch_size, meta_dim], np.float32)
    }
    for feature in spec.request_features:
        if feature.type == NUMERIC:
            # A typical value: the mean where the spec knows it (broadcast over
            # a vector's components), else 0.
            typical = feature.mean if feature.normalize else 0.0
            inputs[feature.name] = np.broadcast_to(
                np.asarray(typical, np.float32), [batch_size, *feature.shape]
            ).copy()
            continue
        value = feature.vocabulary[0] if feature.vocabulary else "warmup"
        if feature.type == CATEGORICAL:
            inputs[feature.name] = np.array([value.encode()] * batch_size, dtype=object)
        else:
            row = [value.encode()] + [b""] * (feature.values_per_row - 1)
            inputs[feature.name] = np.array([row] * batch_size, dtype=object)
    return inputs


# ------------------------------------------------------------------ versions
def list_versions(export_base: str | os.PathLike) -> list[int]:
    """Numeric version directories under an export base, ascending."""
    export_base = str(export_base)
    if not tf.io.gfile.isdir(export_base):
        return []
    versions = []
    for name in tf.io.gfile.listdir(export_base):
        name = name.rstrip("/")
        if _VERSION_PATTERN.match(name) and tf.io.gfile.isdir(
            os.path.join(export_base, name)
        ):
            versions.append(int(name))
    return sorted(versions)


def resolve_version_dir(path: str | os.PathLike) -> str:
    """A SavedModel version directory from itself or from its export base.

    Args:
        path: `EXPORT/<version>` or `EXPORT` (then the latest version).

    Raises:
        FileNotFoundError: Neither a SavedModel nor a base with versions.
    """
    path = str(path).rstrip("/")
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = list_versions(path)
    if not versions:
        raise FileNotFoundError(
            f"No SavedModel at {path}: expected EXPORT/<version>/saved_model.pb. Write "
            "one with `limaml export --model-dir MODEL --export-base EXPORT`."
        )
    latest = os.path.join(path, str(versions[-1]))
    logger.info("Using the latest version of %s: %s", path, latest)
    return latest


def read_metadata(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The `assets.extra/limaml.json` of an export (a version dir or its base).

    Returns:
        The metadata dict, with `spec` as a FeatureSpec and `export_dir` and
        `model_version` (the version directory's number) filled in.
    """
    export_dir = resolve_version_dir(export_dir)
    path = os.path.join(export_dir, ASSETS_EXTRA, METADATA_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: {export_dir} was not written by tf_limaml.export; "
            "re-export it with `limaml export`."
        )
    with tf.io.gfile.GFile(path) as f:
        metadata = json.load(f)
    metadata["spec"] = FeatureSpec.from_dict(metadata["spec"])
    metadata["export_dir"] = export_dir
    name = os.path.basename(export_dir)
    if _VERSION_PATTERN.match(name):
        metadata["model_version"] = int(name)
    return metadata


# ------------------------------------------------------- temporary exports
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def _temp_name(version: int) -> str:
    return f"{_TEMP_PREFIX}{version}-{_host()}-{os.getpid()}-{uuid.uuid4().hex}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _is_abandoned(name: str, path: str, now: float) -> bool:
    match = _TEMP_PATTERN.match(name)
    if match and match.group(2) == _host():
        return not _process_exists(int(match.group(3)))
    try:
        modified = tf.io.gfile.stat(path).mtime_nsec / 1e9
    except tf.errors.OpError:  # e.g. an object store without directory entries
        return False
    return now - modified > ABANDONED_AFTER_S


def remove_abandoned_exports(export_base: str | os.PathLike) -> list[str]:
    """Deletes the temporary directories of exports that were killed midway.

    An export writes `.tmp-export-<version>-<host>-<pid>-<id>/` and renames it
    to `<version>/` when complete; a killed export leaves the temporary
    directory behind. TF Serving never loads it (the name is not a number),
    and `export_model` calls this first, so it is removed by the next export:
    at once when its process (on this host) no longer exists, otherwise once
    it is `ABANDONED_AFTER_S` old. A running export's directory is left alone.

    Args:
        export_base: The export base directory.

    Returns:
        The directories removed.
    """
    export_base = str(export_base)
    if not tf.io.gfile.isdir(export_base):
        return []
    now = time.time()
    removed = []
    for name in tf.io.gfile.listdir(export_base):
        name = name.rstrip("/")
        path = os.path.join(export_base, name)
        if not name.startswith(_TEMP_PREFIX) or not _is_abandoned(name, path, now):
            continue
        try:
            tf.io.gfile.rmtree(path)
        except tf.errors.OpError as err:  # cleaning up must never fail an export
            logger.warning("Could not remove the abandoned export %s: %s", path, err)
            continue
        logger.info("Removed the abandoned (killed midway) export %s", path)
        removed.append(path)
    return removed


# -------------------------------------------------------------------- export
def export_model(
    model: LiMAMLModel,
    export_base: str | os.PathLike,
    version: int | None = None,
    max_support: int | None = None,
    inner_steps: int | None = None,
    warmup_batch_sizes: Sequence[int] = DEFAULT_WARMUP_BATCH_SIZES,
) -> str:
    """Writes a SavedModel for TF Serving at `export_base/<version>/`.

    Args:
        model: A trained LiMAMLModel.
        export_base: The directory TF Serving's `--model_base_path` points at.
        version: Version number; default one more than the latest there (1 if none).
        max_support: Most support rows the adaptation signatures use per entity
            (the latest ones); default 32, the training default. Use the
            `--max-support` the model was trained with.
        inner_steps: In-graph inner steps; default the model's `inner_steps`.
        warmup_batch_sizes: Batch sizes of the serving_default warmup requests.

    Returns:
        The version directory written.

    Raises:
        FileExistsError: The version directory exists already.
        ValueError: A bad argument, or clashing input names.
    """
    export_base = str(export_base)
    max_support = DEFAULT_MAX_SUPPORT if max_support is None else max_support
    if version is None:
        existing = list_versions(export_base)
        version = existing[-1] + 1 if existing else 1
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise ValueError(f"`version` must be a positive integer, got {version!r}")
    for size in warmup_batch_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(
                f"`warmup_batch_sizes` must hold positive integers, got "
                f"{list(warmup_batch_sizes)!r}"
            )
    final = os.path.join(export_base, str(version))
    if tf.io.gfile.exists(final):
        raise FileExistsError(
            f"Export version {final} exists already; pass another --version or omit "
            "it to write the next one."
        )
    module = LiMAMLServingModule(
        model, max_support=max_support, inner_steps=inner_steps
    )
    if model.meta_config.adapt == "all":
        logger.warning(
            "The model adapts the global block too (adapt='all'): serving_default and "
            "predict_examples score with the shared global block, so they reproduce "
            "adapt_and_predict only for the meta-block part of the adaptation."
        )
    if module.inner_steps == 0:
        logger.warning(
            "inner_steps is 0: the adaptation signatures return the "
            "unadapted (cold-start) embedding for every entity."
        )
    tf.io.gfile.makedirs(export_base)
    remove_abandoned_exports(export_base)
    # Hidden and non-numeric, so TF Serving's version poller ignores it.
    temp = os.path.join(export_base, _temp_name(version))
    try:
        tf.saved_model.save(module, temp, signatures=module.concrete_signatures())
        extra = os.path.join(temp, ASSETS_EXTRA)
        tf.io.gfile.makedirs(extra)
        _write_warmup(os.path.join(extra, WARMUP_FILE), model, warmup_batch_sizes)
        metadata = {
            "format_version": METADATA_FORMAT,
            "model_version": version,
            "meta_dim": model.meta_dim,
            "max_support": max_support,
            "inner_steps": module.inner_steps,
            "adapt": model.meta_config.adapt,
            "signatures": {
                name: {
                    key: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
                    for key, spec in specs.items()
                }
                for name, specs in module.input_specs.items()
            },
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "spec": model.spec.to_dict(),
        }
        with tf.io.gfile.GFile(os.path.join(extra, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        if tf.io.gfile.exists(final):
            raise FileExistsError(
                f"Export version {final} appeared while exporting "
                "(another export?); pass another --version."
            )
        tf.io.gfile.rename(temp, final, overwrite=False)
    except BaseException:
        if tf.io.gfile.exists(temp):
            tf.io.gfile.rmtree(temp)
        raise
    logger.info(
        "Exported version %d (max_support=%d, inner_steps=%d) to %s",
        version,
        max_support,
        module.inner_steps,
        final,
    )
    return final


def _write_warmup(path: str, model: LiMAMLModel, batch_sizes: Sequence[int]) -> None:
    with tf.io.TFRecordWriter(path) as writer:
        for size in batch_sizes:
            writer.write(
                prediction_log_bytes(
                    warmup_inputs(model.spec, model.meta_dim, size), SERVING_DEFAULT
                )
            )


def export_from_model_dir(
    model_dir: str | os.PathLike,
    export_base: str | os.PathLike,
    version: int | None = None,
    max_support: int | None = None,
) -> str:
    """`limaml export`: loads a model directory and exports it (see `export_model`).

    `max_support` defaults to the value the model was trained with.
    """
    from tf_limaml.training import read_training_args  # noqa: PLC0415

    if max_support is None:
        max_support = read_training_args(str(model_dir)).get("max_support")
    return export_model(
        load_model(model_dir), export_base, version=version, max_support=max_support
    )


def check_serving_consistency(
    export_dir: str | os.PathLike,
    tasks: str | Sequence[str],
    embeddings: str | Sequence[str],
    max_query: int = 64,
    tolerance: float = 1e-5,
) -> dict[str, Any]:
    """Checks that stored embeddings reproduce in-graph adaptation, entity by entity.

    For every entity in both the task records and the embedding files (the
    output of `limaml embed`), scores its query rows twice: `serving_default`
    fed the stored embedding (the online path) and `adapt_and_predict` on its
    support rows (the in-graph path). They must agree to `tolerance`.

    Args:
        export_dir: The export (version directory or base).
        tasks: File pattern(s) of the task records that were embedded.
        embeddings: File pattern(s) of `embeddings-*.tfrecord.gz`.
        max_query: Query rows scored per entity.
        tolerance: Largest absolute score difference that passes.

    Returns:
        {"entities", "max_abs_score_diff", "max_abs_embedding_diff", "tolerance",
        "consistent"}.
    """
    metadata = read_metadata(export_dir)
    spec: FeatureSpec = metadata["spec"]
    loaded = tf.saved_model.load(metadata["export_dir"])
    serve = loaded.signatures[SERVING_DEFAULT]
    adapt = loaded.signatures[ADAPT_AND_PREDICT]
    patterns = (
        [embeddings] if isinstance(embeddings, (str, os.PathLike)) else embeddings
    )
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(str(p))})
    if not files:
        raise FileNotFoundError(f"No embedding files match {embeddings!r}")
    stored = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        stored[feature["entity_id"].bytes_list.value[0]] = np.array(
            feature["embedding"].float_list.value, np.float32
        )
    score_diff = embedding_diff = 0.0
    checked = 0
    for batch in data.task_dataset(
        tasks,
        spec,
        batch_tasks=64,
        max_support=metadata["max_support"],
        max_query=max_query,
    ):
        batch = {k: v.numpy() for k, v in batch.items()}
        for i, entity_id in enumerate(batch["entity_id"]):
            if entity_id not in stored:
                continue
            n_support = int(batch["support_mask"][i].sum())
            n_query = int(batch["query_mask"][i].sum())
            inputs = {f.name: batch[f.name][i] for f in spec.meta_features}
            inputs[SUPPORT_LABEL_KEY] = batch[SUPPORT_LABEL_KEY][i, :n_support]
            request = {}
            for f in spec.request_features:
                support_key = spec.batch_key(SUPPORT, f.name)
                inputs[support_key] = batch[support_key][i, :n_support]
                request[f.name] = batch[spec.batch_key(QUERY, f.name)][i, :n_query]
                inputs[spec.batch_key(QUERY, f.name)] = request[f.name]
            adapted = adapt(**inputs)
            online = serve(
                **request,
                meta_embedding=np.repeat(stored[entity_id][None], n_query, axis=0),
            )[SCORE_KEY].numpy()
            score_diff = max(
                score_diff,
                float(np.max(np.abs(online - adapted[SCORE_KEY].numpy()), initial=0.0)),
            )
            embedding_diff = max(
                embedding_diff,
                float(
                    np.max(np.abs(stored[entity_id] - adapted[EMBEDDING_KEY].numpy()))
                ),
            )
            checked += 1
    result = {
        "entities": checked,
        "max_abs_score_diff": score_diff,
        "max_abs_embedding_diff": embedding_diff,
        "tolerance": tolerance,
        "consistent": checked > 0 and score_diff <= tolerance,
    }
    logger.info(
        "Serving consistency over %d entities: max |score diff| %.3g (tolerance "
        "%.0e)",
        checked,
        score_diff,
        tolerance,
    )
    return result
