"""Test fixture: a loopback stand-in for TF Serving, backed by the TF1 loader.

The `tensorflow_model_server` binary cannot be installed on the build machines,
so the client tests run against this instead. It loads an export the way TF
Serving does (`tf.compat.v1.saved_model.loader.load` with tag "serve", then
`session.run` on each SignatureDef's tensor names) and answers:

* gRPC: `tensorflow.serving.PredictionService/Predict` on 127.0.0.1 (an
  ephemeral port), optionally over TLS with client certificates;
* REST: `POST /v1/models/NAME[/versions/V]:predict` with the columnar
  `"inputs"` form on 127.0.0.1, optionally over HTTPS, answering
  `{"outputs": ...}` (unnamed when the signature has one output) or
  `{"error": ...}` with status 400/404, as TF Serving does.

It binds loopback addresses only. It is not shipped (tests/ is not a package).

Also here: `build_test_export`, the tiny model and export that the export,
serving and embedding tests share (built once per test session).
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import json
import os
import re
import ssl
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

LOOPBACK = "127.0.0.1"


class SessionSignatures:
    """An export loaded as TF Serving loads it: TF1 loader, tag serve, session.run.

    Args:
        export_dir: A SavedModel version directory.
    """

    def __init__(self, export_dir: str):
        self.export_dir = export_dir
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(
                self.session,
                [tf.compat.v1.saved_model.tag_constants.SERVING],
                export_dir,
            )
        self.signatures = {
            name: sig
            for name, sig in meta_graph.signature_def.items()
            if not name.startswith("__")
        }

    def input_dtypes(self, signature_name: str) -> dict[str, tf.DType]:
        return {
            k: tf.as_dtype(v.dtype)
            for k, v in self._signature(signature_name).inputs.items()
        }

    def _signature(self, name: str):
        if name not in self.signatures:
            raise KeyError(
                f'Serving signature name: "{name}" not found in signature def'
            )
        return self.signatures[name]

    def run(
        self, signature_name: str, inputs: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        """Runs one signature like TF Serving's Predict: exact names and dtypes.

        Raises:
            ValueError: Missing/unknown inputs or a wrong dtype (INVALID_ARGUMENT
                in TF Serving).
            tf.errors.InvalidArgumentError: From the graph (e.g. a failed assert).
        """
        signature = self._signature(signature_name)
        missing = sorted(set(signature.inputs) - set(inputs))
        unknown = sorted(set(inputs) - set(signature.inputs))
        if missing or unknown:
            raise ValueError(
                f"input size does not match signature: missing {missing}, "
                f"unknown {unknown}"
            )
        feed = {}
        for name, value in inputs.items():
            info = signature.inputs[name]
            expected = tf.as_dtype(info.dtype)
            array = np.asarray(value)
            got = tf.string if array.dtype.kind in "OSU" else tf.as_dtype(array.dtype)
            if got != expected:
                raise ValueError(
                    f"Expects arg {name} to be {expected.name} but "
                    f"{got.name} is provided"
                )
            feed[info.name] = array
        fetches = {name: info.name for name, info in signature.outputs.items()}
        return self.session.run(fetches, feed_dict=feed)

    def close(self) -> None:
        self.session.close()


# --------------------------------------------------------------------- gRPC
def _grpc_servicer(
    model: SessionSignatures,
    model_name: str,
    version: int,
    delay_s: float,
    required_metadata: Mapping[str, str],
):
    import grpc  # noqa: PLC0415
    from tensorflow_serving.apis import (
        predict_pb2,
        prediction_service_pb2_grpc,
    )  # noqa: PLC0415

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 - the gRPC method name
            if delay_s:
                time.sleep(delay_s)
            metadata = dict(context.invocation_metadata())
            for key, value in required_metadata.items():
                if metadata.get(key) != value:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing {key}")
            spec = request.model_spec
            if spec.name != model_name or (
                spec.HasField("version") and spec.version.value != version
            ):
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"Servable not found for request: {spec.name}",
                )
            signature_name = spec.signature_name or "serving_default"
            try:
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                outputs = model.run(signature_name, inputs)
            except (KeyError, ValueError) as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            except tf.errors.InvalidArgumentError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = model_name
            response.model_spec.version.value = version
            response.model_spec.signature_name = signature_name
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
            return response

    return Servicer()


# --------------------------------------------------------------------- REST
_PREDICT_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/([0-9]+))?:predict$")


def _from_json(value: Any, dtype: tf.DType) -> np.ndarray:
    if dtype == tf.string:

        def decode(item):
            if isinstance(item, dict):
                return base64.b64decode(item["b64"])
            if isinstance(item, list):
                return [decode(v) for v in item]
            return str(item).encode("utf-8")

        return np.array(decode(value), dtype=object)
    return np.asarray(value, dtype=dtype.as_numpy_dtype)


def _rest_handler(
    model: SessionSignatures,
    model_name: str,
    version: int,
    required_headers: Mapping[str, str],
):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _answer(self, status: int, body: dict) -> None:
            payload = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self):  # noqa: N802 - http.server's method name
            for key, value in required_headers.items():
                if self.headers.get(key) != value:
                    return self._answer(401, {"error": f"missing {key}"})
            match = _PREDICT_PATH.match(self.path)
            if (
                not match
                or match.group(1) != model_name
                or (match.group(2) is not None and int(match.group(2)) != version)
            ):
                return self._answer(404, {"error": f"Servable not found: {self.path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                signature_name = body.get("signature_name", "serving_default")
                if "inputs" not in body:
                    raise ValueError("Missing 'inputs' or 'instances' key")
                dtypes = model.input_dtypes(signature_name)
                raw = body["inputs"]
                if not isinstance(raw, dict):
                    (only,) = dtypes
                    raw = {only: raw}
                unknown = sorted(set(raw) - set(dtypes))
                if unknown:
                    raise ValueError(f"unknown input(s) {unknown}")
                inputs = {k: _from_json(v, dtypes[k]) for k, v in raw.items()}
                outputs = model.run(signature_name, inputs)
            except (KeyError, ValueError) as err:
                return self._answer(400, {"error": str(err)})
            except tf.errors.InvalidArgumentError as err:
                return self._answer(400, {"error": err.message})
            values = {k: v.tolist() for k, v in outputs.items()}
            if len(values) == 1:
                # TF Serving's columnar answer omits the name of a single output.
                return self._answer(200, {"outputs": next(iter(values.values()))})
            return self._answer(200, {"outputs": values})

    return Handler


# ------------------------------------------------------------------- server
class LoopbackServing:
    """gRPC and REST endpoints on 127.0.0.1 in front of one export.

    Args:
        export_dir: The SavedModel version directory to serve.
        model_name: The model name clients must ask for.
        version: The version number it answers as.
        tls: Optional dict with PEM bytes "key", "cert" and, for mutual TLS,
            "client_ca"; serves gRPC over TLS and REST over HTTPS.
        delay_s: Sleep this long in every gRPC call (to test client timeouts).
        required_headers: REST headers every call must carry (lower-cased
            keys become required gRPC metadata too).

    Use as a context manager; `grpc_target` and `rest_url` say where to call.
    """

    def __init__(
        self,
        export_dir: str,
        model_name: str = "limaml",
        version: int = 1,
        tls: Mapping[str, bytes] | None = None,
        delay_s: float = 0.0,
        required_headers: Mapping[str, str] | None = None,
        model: SessionSignatures | None = None,
    ):
        self.export_dir = export_dir
        self.model_name = model_name
        self.version = version
        self.tls = dict(tls) if tls else None
        self.delay_s = delay_s
        self.required_headers = dict(required_headers or {})
        self._owns_model = model is None
        self.model = model or SessionSignatures(export_dir)

    def __enter__(self) -> LoopbackServing:
        import grpc  # noqa: PLC0415
        from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: PLC0415

        self._grpc = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _grpc_servicer(
                self.model,
                self.model_name,
                self.version,
                self.delay_s,
                {k.lower(): v for k, v in self.required_headers.items()},
            ),
            self._grpc,
        )
        address = f"{LOOPBACK}:0"
        if self.tls:
            credentials = grpc.ssl_server_credentials(
                [(self.tls["key"], self.tls["cert"])],
                root_certificates=self.tls.get("client_ca"),
                require_client_auth=self.tls.get("client_ca") is not None,
            )
            port = self._grpc.add_secure_port(address, credentials)
        else:
            port = self._grpc.add_insecure_port(address)
        self._grpc.start()
        self.grpc_target = f"{LOOPBACK}:{port}"

        self._http = http.server.ThreadingHTTPServer(
            (LOOPBACK, 0),
            _rest_handler(
                self.model, self.model_name, self.version, self.required_headers
            ),
        )
        scheme = "http"
        if self.tls:
            self._tls_files = _write_temp_pems(self.tls)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self._tls_files["cert"], self._tls_files["key"])
            self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
            scheme = "https"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        self.rest_url = f"{scheme}://{LOOPBACK}:{self._http.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._grpc.stop(grace=None)
        if self._owns_model:
            self.model.close()


def _write_temp_pems(pems: Mapping[str, bytes]) -> dict[str, str]:
    import tempfile  # noqa: PLC0415

    directory = tempfile.mkdtemp(prefix="loopback-tls-")
    paths = {}
    for name in ("key", "cert"):
        paths[name] = os.path.join(directory, f"{name}.pem")
        with open(paths[name], "wb") as f:
            f.write(pems[name])
    return paths


def make_test_certificates(directory: str) -> dict[str, Any]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (PEM).

    Returns:
        Bytes "ca", "key", "cert", "client_key", "client_cert", and "ca_path"
        (the CA written to `directory`, for requests' `verify`).
    """
    import datetime  # noqa: PLC0415
    import ipaddress  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("limaml test CA"))
        .issuer_name(name("limaml test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common: str, server: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return key_pem(key), cert.public_bytes(serialization.Encoding.PEM)

    server_key, server_cert = leaf("localhost", server=True)
    client_key, client_cert = leaf("limaml test client", server=False)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca_path = os.path.join(directory, "ca.pem")
    with open(ca_path, "wb") as f:
        f.write(ca_pem)
    return {
        "ca": ca_pem,
        "key": server_key,
        "cert": server_cert,
        "client_key": client_key,
        "client_cert": client_cert,
        "ca_path": ca_path,
    }


# ------------------------------------------------------- shared test export
_EXPORT_CACHE: dict[str, Any] = {}
TEST_MAX_SUPPORT = 16
TEST_INNER_STEPS = 2


def build_test_export(tmp_path_factory, synthetic_tasks) -> dict[str, Any]:
    """A tiny LiMAMLModel and its export, built once per test session.

    The model is untrained but seeded: the tests compare the export with the
    Keras model it came from, which needs no training, and adaptation still
    moves the embedding (its gradients are not zero).

    Returns:
        {"model", "export_dir", "export_base", "spec", "tasks"}.
    """
    if "export" in _EXPORT_CACHE:
        return _EXPORT_CACHE["export"]
    from tf_limaml.export import export_model  # noqa: PLC0415
    from tf_limaml.features import FeatureSpec  # noqa: PLC0415
    from tf_limaml.model import LiMAMLModel, MetaConfig  # noqa: PLC0415

    tf.keras.utils.set_random_seed(0)
    spec = FeatureSpec.load(synthetic_tasks["spec"])
    model = LiMAMLModel(
        spec,
        MetaConfig(jit_compile=False, inner_steps=TEST_INNER_STEPS, inner_lr=0.5),
        meta_units=[16, 8],
        global_units=[32, 16],
        cross_layers=1,
    )
    base = str(tmp_path_factory.mktemp("export"))
    export_dir = export_model(model, base, max_support=TEST_MAX_SUPPORT)
    _EXPORT_CACHE["export"] = {
        "model": model,
        "export_dir": export_dir,
        "export_base": base,
        "spec": spec,
        "tasks": synthetic_tasks,
    }
    return _EXPORT_CACHE["export"]


def entity_inputs(
    batch: Mapping[str, np.ndarray], spec, index: int
) -> tuple[dict, dict, np.ndarray, dict]:
    """One entity of a parsed task batch, padding removed: (meta, support, labels, query)."""
    n_support = int(np.sum(batch["support_mask"][index]))
    n_query = int(np.sum(batch["query_mask"][index]))
    meta = {f.name: np.asarray(batch[f.name][index]) for f in spec.meta_features}
    support = {
        f.name: np.asarray(batch[f"support_{f.name}"][index][:n_support])
        for f in spec.request_features
    }
    query = {
        f.name: np.asarray(batch[f"query_{f.name}"][index][:n_query])
        for f in spec.request_features
    }
    return meta, support, np.asarray(batch["support_label"][index][:n_support]), query
