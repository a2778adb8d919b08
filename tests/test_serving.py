"""serving.client against the loopback PredictionService / REST fixture.

The fixture runs the export through the TF1 loader, as TF Serving does; the
clients' answers must equal a direct session.run on the same signature.
"""

import grpc
import numpy as np
import pytest
import requests
from serving_fixture import (
    LoopbackServing,
    entity_inputs,
    make_test_certificates,
)

from serving import client as serving_client
from tf_limaml import data

TOL = 1e-5
TOKEN = "Bearer test-token"


@pytest.fixture(scope="module")
def server(exported, session):
    with LoopbackServing(
        exported["export_dir"],
        model_name="limaml",
        model=session,
        required_headers={"Authorization": TOKEN},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def batch(exported):
    ds = data.task_dataset(
        exported["tasks"]["test"],
        exported["spec"],
        batch_tasks=8,
        max_support=64,
        max_query=32,
    )
    return {k: v.numpy() for k, v in next(iter(ds)).items()}


def _grpc(server, **kwargs):
    return serving_client.GrpcClient(
        server.grpc_target,
        "limaml",
        timeout_s=10.0,
        metadata=[("authorization", TOKEN)],
        **kwargs,
    )


def _rest(server, **kwargs):
    return serving_client.RestClient(
        server.rest_url,
        "limaml",
        timeout_s=10.0,
        headers={"Authorization": TOKEN},
        **kwargs,
    )


def _serving_request(exported, batch, rows=20):
    spec = exported["spec"]
    mask = batch["query_mask"] > 0
    request = {
        f.name: batch[f"query_{f.name}"][mask][:rows] for f in spec.request_features
    }
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(len(request["item_id"]), 8)).astype(np.float32)
    return embedding, request


@pytest.mark.parametrize("make_client", [_grpc, _rest], ids=["grpc", "rest"])
def test_score_matches_session(make_client, server, session, exported, batch):
    embedding, request = _serving_request(exported, batch)
    expected = session.run("serving_default", {"meta_embedding": embedding, **request})[
        "score"
    ]
    with make_client(server) as client:
        # Plain Python values, as an application would send them.
        scores = client.score(
            embedding.tolist(), {k: v.tolist() for k, v in request.items()}
        )
    assert scores.shape == (20,)
    np.testing.assert_allclose(scores, expected, atol=TOL)


@pytest.mark.parametrize("make_client", [_grpc, _rest], ids=["grpc", "rest"])
def test_adapt_and_predict_matches_session(
    make_client, server, session, exported, batch
):
    spec = exported["spec"]
    with make_client(server) as client:
        for i in range(3):
            meta, support, labels, query = entity_inputs(batch, spec, i)
            scores, embedding = client.adapt_and_predict(meta, support, labels, query)
            inputs = serving_client.adapt_and_predict_inputs(
                meta, support, labels, query
            )
            expected = session.run(
                "adapt_and_predict",
                {k: serving_client.as_array(v) for k, v in inputs.items()},
            )
            assert scores.shape == (len(query["item_id"]),) and embedding.shape == (8,)
            np.testing.assert_allclose(scores, expected["score"], atol=TOL)
            np.testing.assert_allclose(embedding, expected["meta_embedding"], atol=TOL)


def test_cold_start_over_grpc_with_spec_typing(server, session, exported, batch):
    spec = exported["spec"]
    meta, _, _, query = entity_inputs(batch, spec, 0)
    # Python lists, ragged multi-hot rows, and an empty support set: the spec
    # types and pads them as the signature declares.
    query = {k: v.tolist() for k, v in query.items()}
    query["topics"] = [[t for t in row if t] for row in query["topics"]]
    empty = {f.name: [] for f in spec.request_features}
    with _grpc(server, spec=spec) as client:
        scores, embedding = client.adapt_and_predict(meta, empty, [], query)
    inputs = serving_client.typed_inputs(
        serving_client.adapt_and_predict_inputs(meta, empty, [], query), spec
    )
    assert (
        inputs["support_topics"].shape == (0, 2)
        and inputs["query_topics"].shape[1] == 2
    )
    expected = session.run("adapt_and_predict", inputs)
    np.testing.assert_allclose(scores, expected["score"], atol=TOL)
    np.testing.assert_allclose(embedding, expected["meta_embedding"], atol=TOL)


def test_errors_reach_the_caller(server, exported, batch):
    spec = exported["spec"]
    meta, support, labels, query = entity_inputs(batch, spec, 0)
    bad = labels.copy()
    bad[0] = 5.0
    with _grpc(server) as client, pytest.raises(grpc.RpcError) as info:
        client.adapt_and_predict(meta, support, bad, query)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "support_label" in info.value.details()
    with (
        _rest(server) as client,
        pytest.raises(requests.HTTPError, match="support_label"),
    ):
        client.adapt_and_predict(meta, support, bad, query)
    embedding, request = _serving_request(exported, batch)
    with (
        serving_client.RestClient(server.rest_url, "limaml") as client,
        pytest.raises(requests.HTTPError, match="401"),
    ):
        client.score(embedding, request)
    with _rest(server) as client, pytest.raises(requests.HTTPError, match="404"):
        client.model_name = "other"
        client.score(embedding, request)


def test_grpc_deadline(exported, session, batch):
    embedding, request = _serving_request(exported, batch)
    with LoopbackServing(exported["export_dir"], model=session, delay_s=1.0) as slow:
        client = serving_client.GrpcClient(slow.grpc_target, "limaml", timeout_s=0.2)
        with client, pytest.raises(grpc.RpcError) as info:
            client.score(embedding, request)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_tls_grpc_with_client_certificate_and_https(exported, session, batch, tmp_path):
    pytest.importorskip("cryptography")
    pems = make_test_certificates(str(tmp_path))
    embedding, request = _serving_request(exported, batch)
    expected = session.run("serving_default", {"meta_embedding": embedding, **request})[
        "score"
    ]
    tls = {"key": pems["key"], "cert": pems["cert"], "client_ca": pems["ca"]}
    with LoopbackServing(exported["export_dir"], model=session, tls=tls) as secure:
        with serving_client.GrpcClient(
            secure.grpc_target,
            "limaml",
            timeout_s=10.0,
            root_certificates=pems["ca"],
            private_key=pems["client_key"],
            certificate_chain=pems["client_cert"],
        ) as client:
            np.testing.assert_allclose(
                client.score(embedding, request), expected, atol=TOL
            )
        # Without the client certificate the server refuses the handshake.
        with serving_client.GrpcClient(
            secure.grpc_target, "limaml", timeout_s=5.0, root_certificates=pems["ca"]
        ) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.score(embedding, request)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with serving_client.RestClient(
            secure.rest_url, "limaml", timeout_s=10.0, verify=pems["ca_path"]
        ) as client:
            assert client.url.startswith("https://127.0.0.1:")
            np.testing.assert_allclose(
                client.score(embedding, request), expected, atol=TOL
            )


def test_rest_body_is_columnar(server, exported, batch):
    """The request body TF Serving gets: signature_name plus columnar inputs."""
    sent = []

    class Recording(requests.Session):
        def post(self, url, **kwargs):
            sent.append((url, kwargs))
            return super().post(url, **kwargs)

    meta, support, labels, query = entity_inputs(batch, exported["spec"], 1)
    with _rest(server, session=Recording(), version=1) as client:
        client.adapt_and_predict(meta, support, labels, query)
    url, kwargs = sent[0]
    assert url.endswith("/v1/models/limaml/versions/1:predict")
    body = kwargs["json"]
    assert body["signature_name"] == "adapt_and_predict" and kwargs["timeout"] == 10.0
    assert len(body["inputs"]["support_label"]) == len(labels)
    assert len(body["inputs"]["query_item_id"]) == len(query["item_id"])
    assert isinstance(body["inputs"]["segment"], str)


def test_client_argument_errors():
    with pytest.raises(ValueError, match="timeout_s"):
        serving_client.RestClient("http://127.0.0.1:1", timeout_s=0)
    with pytest.raises(ValueError, match="http"):
        serving_client.RestClient("127.0.0.1:8501")
    with pytest.raises(ValueError, match="private_key"):
        serving_client.GrpcClient("127.0.0.1:1", private_key=b"key")
    with pytest.raises(ValueError, match="same request features"):
        serving_client.adapt_and_predict_inputs({}, {"a": [1]}, [1], {"b": [1]})
    assert serving_client.pad_multi_hot([["a"], ["b", "c", "d"]], 2) == [
        ["a", ""],
        ["b", "c"],
    ]
