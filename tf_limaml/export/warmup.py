"""TF Serving warmup requests: the `assets.extra/tf_serving_warmup_requests` file.

TF Serving replays these PredictionLog records when it loads a version, so the
first real request does not pay for tracing and memory allocation. They are
`serving_default` requests of a few batch sizes with typical feature values.

The records are serialized by hand from the proto field numbers, so exporting
does not need the tensorflow-serving-api package.

Example:

    write_warmup_requests(path, spec, meta_dim=8, batch_sizes=(1, 10, 100))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from tf_limaml.features import CATEGORICAL, NUMERIC, FeatureSpec
from tf_limaml.signatures import META_EMBEDDING_KEY, SERVING_DEFAULT

ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
DEFAULT_WARMUP_BATCH_SIZES = (1, 10, 100)


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
        META_EMBEDDING_KEY: np.zeros([batch_size, meta_dim], np.float32)
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


def write_warmup_requests(
    path: str,
    spec: FeatureSpec,
    meta_dim: int,
    batch_sizes: Sequence[int] = DEFAULT_WARMUP_BATCH_SIZES,
    model_name: str = "limaml",
) -> None:
    """Writes one `serving_default` warmup request per batch size to a TFRecord.

    Args:
        path: The file, normally `EXPORT/<version>/assets.extra/tf_serving_warmup_requests`.
        spec: The model's FeatureSpec.
        meta_dim: d, the meta embedding size.
        batch_sizes: Rows of each request.
        model_name: The model name in each request's ModelSpec.
    """
    with tf.io.TFRecordWriter(path) as writer:
        for size in batch_sizes:
            writer.write(
                prediction_log_bytes(
                    warmup_inputs(spec, meta_dim, size), SERVING_DEFAULT, model_name
                )
            )
