"""gRPC and REST clients of a tf-limaml model on TF Serving.

Both clients speak TF Serving's Predict API and know the export's signatures:

* `score(meta_embedding, request)` calls `serving_default`: stored meta
  embeddings `[B, d]` plus request features `[B]` (`[B, K]` multi-hot) give
  click probabilities `[B]`. This is the online path.
* `adapt_and_predict(meta, support, support_label, query)` adapts one entity
  in-graph on its support rows and scores its query rows, returning
  `(score [Q], meta_embedding [d])`.
* `predict(inputs, signature_name)` calls any signature with named inputs.

Inputs are array-likes. Numbers are sent as float32 (every numeric input of the
export is float32) and text as strings. Multi-hot features must be
rectangular `[..., K]`, padded with "" (see `pad_multi_hot`).

Every call has a timeout. gRPC can use TLS (server CA, optional client
certificate for mutual TLS) and per-call metadata such as an authorization
header; REST can use HTTPS (`verify`, `cert`) and custom headers.

Example:

    from serving.client import GrpcClient, RestClient

    with GrpcClient("localhost:8500", model_name="limaml", timeout_s=2.0) as client:
        scores = client.score(embeddings, {"item_id": ["12", "7"], ...})
    rest = RestClient("http://localhost:8501", model_name="limaml")
    scores, embedding = rest.adapt_and_predict(meta, support, labels, query)
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tf_limaml.features import (
    MULTI_HOT,
    NUMERIC,
    QUERY,
    SUPPORT,
    FeatureSpec,
)
from tf_limaml.signatures import (
    ADAPT_AND_PREDICT,
    META_EMBEDDING,
    OUTPUT_NAMES,
    PREDICT_EXAMPLES,
    SERVING_DEFAULT,
    SUPPORT_LABEL_KEY,
    query_key,
    support_key,
)
from tf_limaml.signatures import META_EMBEDDING_KEY as EMBEDDING
from tf_limaml.signatures import SCORE_KEY as SCORE

__all__ = [
    "ADAPT_AND_PREDICT",
    "DEFAULT_TIMEOUT_S",
    "EMBEDDING",
    "META_EMBEDDING",
    "OUTPUT_NAMES",
    "PREDICT_EXAMPLES",
    "SCORE",
    "SERVING_DEFAULT",
    "GrpcClient",
    "RestClient",
    "adapt_and_predict_inputs",
    "as_array",
    "pad_multi_hot",
    "score_inputs",
    "typed_inputs",
]

DEFAULT_TIMEOUT_S = 10.0


# ------------------------------------------------------------------ inputs
def pad_multi_hot(rows: Sequence[Sequence[str]], width: int) -> list[list[str]]:
    """Pads (or cuts) each row of values to exactly `width`, padding with "".

    Args:
        rows: One list of values per interaction, e.g. [["news"], ["film", "tech"]].
        width: K, the feature's `values_per_row` in the FeatureSpec.

    Returns:
        A rectangular `[N, width]` list of lists.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise ValueError(f"`width` must be a positive integer, got {width!r}")
    return [list(row)[:width] + [""] * max(width - len(row), 0) for row in rows]


def score_inputs(meta_embedding: Any, request: Mapping[str, Any]) -> dict[str, Any]:
    """Named inputs of `serving_default`."""
    if EMBEDDING in request:
        raise ValueError(
            f"`request` must hold request features only; it has {EMBEDDING!r}, "
            "which is passed as `meta_embedding`"
        )
    return {EMBEDDING: meta_embedding, **request}


def adapt_and_predict_inputs(
    meta: Mapping[str, Any],
    support: Mapping[str, Any],
    support_label: Any,
    query: Mapping[str, Any],
) -> dict[str, Any]:
    """Named inputs of `adapt_and_predict` for one entity.

    Args:
        meta: Meta feature values by name (scalars; `[K]` for multi-hot).
        support: Request features of the support rows by name, each `[S]`
            (`[S, K]`); rows in time order, the most recent last.
        support_label: `[S]` labels, 0 or 1.
        query: Request features of the rows to score by name, each `[Q]`.

    Returns:
        {input name: value}, with `support_` / `query_` prefixes.
    """
    if set(support) != set(query):
        raise ValueError(
            f"`support` and `query` must name the same request features; got "
            f"{sorted(support)} and {sorted(query)}"
        )
    inputs = dict(meta)
    inputs.update({support_key(k): v for k, v in support.items()})
    inputs.update({query_key(k): v for k, v in query.items()})
    inputs[SUPPORT_LABEL_KEY] = support_label
    return inputs


def as_array(value: Any) -> np.ndarray:
    """float32 for numbers, an object array of bytes for text."""
    array = np.asarray(value)
    if array.dtype.kind in "biuf":
        return array.astype(np.float32)
    if array.dtype.kind in "SUO":
        if array.size and not all(isinstance(v, (str, bytes)) for v in array.flat):
            raise ValueError(
                f"Expected numbers or strings, got {value!r}; multi-hot "
                "features must be rectangular (use pad_multi_hot)"
            )
        flat = [v.encode("utf-8") if isinstance(v, str) else v for v in array.flat]
        return np.array(flat, dtype=object).reshape(array.shape)
    raise ValueError(
        f"Cannot send {value!r} (dtype {array.dtype}): expected numbers or " "strings"
    )


def typed_inputs(inputs: Mapping[str, Any], spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Converts inputs by the FeatureSpec's types, as the export declares them.

    Unlike `as_array`, this types empty inputs right (an empty support set of a
    string feature stays a string tensor) and pads ragged multi-hot rows to K.

    Args:
        inputs: Named inputs of any signature (feature names, optionally with
            a `support_` / `query_` prefix, `support_label`, `meta_embedding`).
        spec: The FeatureSpec the model was exported with.
    """
    features = {f.name: f for f in spec.features}
    out = {}
    for name, value in inputs.items():
        base = name
        for part in (SUPPORT, QUERY):
            prefix = FeatureSpec.batch_key(part, "")
            if name.startswith(prefix) and name[len(prefix) :] in features:
                base = name[len(prefix) :]
        feature = features.get(base)
        if feature is None or feature.type == NUMERIC:
            array = np.asarray(value, dtype=np.float32)
            if feature is not None and feature.shape and array.size == 0:
                # No rows of a vector feature: still n columns wide.
                array = array.reshape(*array.shape[:-1], 0, feature.size)
            out[name] = array
            continue
        if feature.type == MULTI_HOT:
            rows = value.tolist() if isinstance(value, np.ndarray) else value
            if rows and isinstance(rows[0], (str, bytes)):
                # One entity's meta feature: a single row of values.
                value = pad_multi_hot([rows], feature.values_per_row)[0]
            elif len(rows) == 0 and base == name and feature in spec.meta_features:
                # One entity with no values for a multi-hot meta feature.
                value = [""] * feature.values_per_row
            elif len(rows) == 0:
                value = np.empty((0, feature.values_per_row), dtype=object)
            else:
                value = pad_multi_hot(rows, feature.values_per_row)
        array = np.asarray(value, dtype=object)
        flat = [v.encode("utf-8") if isinstance(v, str) else v for v in array.flat]
        out[name] = np.array(flat, dtype=object).reshape(array.shape)
    return out


def _convert(
    inputs: Mapping[str, Any], spec: FeatureSpec | None
) -> dict[str, np.ndarray]:
    if spec is not None:
        return typed_inputs(inputs, spec)
    return {name: as_array(value) for name, value in inputs.items()}


def _read_pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _name_outputs(
    outputs: Any, signature_name: str, output_names: Sequence[str] | None
) -> dict[str, Any]:
    if isinstance(outputs, Mapping):
        return dict(outputs)
    names = tuple(output_names or OUTPUT_NAMES.get(signature_name, ()))
    if len(names) != 1:
        raise ValueError(
            f"Signature {signature_name!r} answered one unnamed output; pass "
            "`output_names=[name]` to say which it is"
        )
    return {names[0]: outputs}


# -------------------------------------------------------------------- gRPC
class _SignatureCalls:
    """`score` and `adapt_and_predict` on top of a client's `predict`."""

    def score(
        self,
        meta_embedding: Any,
        request: Mapping[str, Any],
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """`serving_default`: probabilities `[B]` from embeddings `[B, d]` and requests."""
        return self.predict(
            score_inputs(meta_embedding, request), SERVING_DEFAULT, timeout_s
        )[SCORE]

    def adapt_and_predict(
        self,
        meta: Mapping[str, Any],
        support: Mapping[str, Any],
        support_label: Any,
        query: Mapping[str, Any],
        timeout_s: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`adapt_and_predict` for one entity: (score [Q], meta_embedding [d])."""
        outputs = self.predict(
            adapt_and_predict_inputs(meta, support, support_label, query),
            ADAPT_AND_PREDICT,
            timeout_s,
        )
        return outputs[SCORE], outputs[EMBEDDING]


class GrpcClient(_SignatureCalls):
    """Calls TF Serving's gRPC PredictionService.

    Args:
        target: "host:port" of TF Serving's gRPC port (8500 by default).
        model_name: The served model's name (`--model_name`).
        timeout_s: Deadline of every call, in seconds.
        version: Serve this version instead of the latest.
        tls: Use TLS. Implied by any of the certificate arguments; with none
            of them, the system's root certificates verify the server.
        root_certificates: PEM CA bundle (bytes or a file path) that signed
            the server's certificate.
        private_key: PEM client key, for mutual TLS (with `certificate_chain`).
        certificate_chain: PEM client certificate chain, for mutual TLS.
        metadata: Extra (key, value) call metadata, e.g.
            [("authorization", "Bearer ...")]; keys must be lower case.
        channel_options: gRPC channel options, e.g.
            [("grpc.max_receive_message_length", 64 << 20)].
        spec: The export's FeatureSpec (optional). With it, inputs are typed
            by feature (empty string inputs stay strings, so cold-start calls
            with S = 0 work) and ragged multi-hot rows are padded to K.

    Raises:
        grpc.RpcError: From calls, with TF Serving's status and message
        (`DEADLINE_EXCEEDED` when the timeout passes).
    """

    def __init__(
        self,
        target: str = "localhost:8500",
        model_name: str = "limaml",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        version: int | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike | None = None,
        private_key: bytes | str | os.PathLike | None = None,
        certificate_chain: bytes | str | os.PathLike | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
        spec: FeatureSpec | None = None,
    ):
        import grpc  # noqa: PLC0415 - only the gRPC client needs it
        from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: PLC0415

        if not timeout_s or timeout_s <= 0:
            raise ValueError(
                f"`timeout_s` must be > 0 (every call needs a deadline), got "
                f"{timeout_s!r}"
            )
        if (private_key is None) != (certificate_chain is None):
            raise ValueError(
                "Mutual TLS needs both `private_key` and `certificate_chain`; "
                "pass both or neither"
            )
        self.target = target
        self.model_name = model_name
        self.timeout_s = float(timeout_s)
        self.version = version
        self.metadata = tuple(metadata)
        self.spec = spec
        options = list(channel_options)
        if tls or root_certificates is not None or private_key is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(root_certificates),
                private_key=_read_pem(private_key),
                certificate_chain=_read_pem(certificate_chain),
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def predict(
        self,
        inputs: Mapping[str, Any],
        signature_name: str = SERVING_DEFAULT,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Calls one signature; returns its outputs by name as numpy arrays."""
        import tensorflow as tf  # noqa: PLC0415 - tensor protos
        from tensorflow_serving.apis import predict_pb2  # noqa: PLC0415

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature_name
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        for name, value in _convert(inputs, self.spec).items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        response = self._stub.Predict(
            request,
            timeout=self.timeout_s if timeout_s is None else timeout_s,
            metadata=self.metadata or None,
        )
        return {
            name: tf.make_ndarray(proto) for name, proto in response.outputs.items()
        }

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -------------------------------------------------------------------- REST
def _json_value(value: Any) -> Any:
    """numpy -> JSON: floats as numbers, text as strings, non-UTF-8 bytes as b64."""
    array = as_array(value)
    if array.dtype != object:
        return array.tolist()

    def encode(item: bytes) -> Any:
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(item).decode("ascii")}

    if array.ndim == 0:
        return encode(array.item())
    return np.vectorize(encode, otypes=[object])(array).tolist()


class RestClient(_SignatureCalls):
    """Calls TF Serving's REST API (`POST /v1/models/NAME[:versions/V]:predict`).

    Sends the columnar form, `{"signature_name": ..., "inputs": {name: value}}`,
    which lets support and query inputs have different lengths.

    Args:
        base_url: "http://host:8501" or "https://..." (TF Serving's REST port).
        model_name: The served model's name.
        timeout_s: Connect and read timeout of every call, in seconds.
        version: Serve this version instead of the latest.
        headers: Extra headers on every call, e.g. {"Authorization": "Bearer ..."}.
        verify: HTTPS: True (system CAs), False, or a CA bundle path.
        cert: HTTPS client certificate: a PEM path or (cert, key) paths.
        session: A `requests.Session` to reuse (connection pooling, retries).
        spec: The export's FeatureSpec (optional): inputs are typed by
            feature and ragged multi-hot rows padded to K (see GrpcClient).

    Raises:
        requests.HTTPError: From calls, with TF Serving's `error` message.
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8501",
        model_name: str = "limaml",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        version: int | None = None,
        headers: Mapping[str, str] | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        session: Any = None,
        spec: FeatureSpec | None = None,
    ):
        import requests  # noqa: PLC0415 - only the REST client needs it

        if not timeout_s or timeout_s <= 0:
            raise ValueError(
                f"`timeout_s` must be > 0 (every call needs a timeout), got "
                f"{timeout_s!r}"
            )
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"`base_url` must start with http:// or https://, got " f"{base_url!r}"
            )
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.timeout_s = float(timeout_s)
        self.version = version
        self.spec = spec
        self._session = session or requests.Session()
        self._owns_session = session is None
        self._session.headers.update(dict(headers or {}))
        # Passed on every call rather than set on the session: requests lets
        # REQUESTS_CA_BUNDLE override a session's `verify`, not a call's.
        self.verify = verify
        self.cert = cert

    @property
    def url(self) -> str:
        """The predict URL."""
        version = f"/versions/{int(self.version)}" if self.version is not None else ""
        return f"{self.base_url}/v1/models/{self.model_name}{version}:predict"

    def predict(
        self,
        inputs: Mapping[str, Any],
        signature_name: str = SERVING_DEFAULT,
        timeout_s: float | None = None,
        output_names: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Calls one signature; returns its outputs by name as numpy arrays.

        Args:
            inputs: Named inputs.
            signature_name: The signature to call.
            timeout_s: This call's timeout (default: the client's).
            output_names: Names of the outputs, for signatures this module does
                not know that answer a single, unnamed output.
        """
        import requests  # noqa: PLC0415

        body = {
            "signature_name": signature_name,
            "inputs": {
                name: _json_value(value)
                for name, value in _convert(inputs, self.spec).items()
            },
        }
        response = self._session.post(
            self.url,
            json=body,
            timeout=self.timeout_s if timeout_s is None else timeout_s,
            verify=self.verify,
            cert=self.cert,
        )
        try:
            response.raise_for_status()
        except requests.HTTPError as err:
            try:
                detail = response.json().get("error", response.text)
            except ValueError:
                detail = response.text
            raise requests.HTTPError(f"{err}: {detail}", response=response) from None
        outputs = _name_outputs(
            response.json()["outputs"], signature_name, output_names
        )
        return {
            name: np.asarray(value, dtype=np.float32) for name, value in outputs.items()
        }

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
