"""The SavedModel export: signatures, TF1-loader parity with Keras, layout, warmup."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
from serving_fixture import (
    TEST_MAX_SUPPORT,
    entity_inputs,
)

from tf_limaml import data, export
from tf_limaml.export import saved_model

TOL = 1e-5
VENV_BIN = os.path.dirname(sys.executable)


def _batch(exported, max_support, max_query=32):
    ds = data.task_dataset(
        exported["tasks"]["test"],
        exported["spec"],
        batch_tasks=1000,
        max_support=max_support,
        max_query=max_query,
    )
    return {k: v.numpy() for k, v in next(iter(ds)).items()}


@pytest.fixture(scope="module")
def full_batch(exported):
    """Test tasks with all their support rows (longer than the export's cap)."""
    return _batch(exported, max_support=64)


@pytest.fixture(scope="module")
def capped_batch(exported):
    """The same tasks parsed with the export's max_support (the latest rows)."""
    return _batch(exported, max_support=TEST_MAX_SUPPORT)


def _adapt_inputs(meta, support, labels, query):
    inputs = dict(meta)
    inputs.update({f"support_{k}": v for k, v in support.items()})
    inputs.update({f"query_{k}": v for k, v in query.items()})
    inputs["support_label"] = labels.astype(np.float32)
    return inputs


def test_saved_model_cli_lists_every_signature(exported):
    result = subprocess.run(
        [
            os.path.join(VENV_BIN, "saved_model_cli"),
            "show",
            "--dir",
            exported["export_dir"],
            "--all",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    for name in export.SIGNATURE_NAMES:
        assert f"signature_def['{name}']" in result.stdout
    for name in (
        "support_label",
        "support_mask",
        "query_item_id",
        "examples",
        "segment",
    ):
        assert f"inputs['{name}']" in result.stdout
    assert (
        "outputs['score']" in result.stdout
        and "outputs['meta_embedding']" in result.stdout
    )
    assert "output_0" not in result.stdout and "output_1" not in result.stdout


def test_signature_shapes_have_none_batch_axes(session):
    sigs = session.signatures
    dims = lambda info: [d.size for d in info.tensor_shape.dim]  # noqa: E731
    assert dims(sigs["serving_default"].inputs["meta_embedding"]) == [-1, 8]
    assert dims(sigs["serving_default"].inputs["topics"]) == [-1, 2]
    assert dims(sigs["serving_default"].outputs["score"]) == [-1]
    assert dims(sigs["adapt_and_predict"].inputs["segment"]) == []
    assert dims(sigs["adapt_and_predict"].inputs["support_topics"]) == [-1, 2]
    assert dims(sigs["adapt_and_predict"].outputs["meta_embedding"]) == [8]
    assert dims(sigs["meta_embedding"].inputs["support_topics"]) == [-1, -1, 2]
    assert dims(sigs["meta_embedding"].outputs["meta_embedding"]) == [-1, 8]
    assert dims(sigs["predict_examples"].inputs["examples"]) == [-1]


def _query_rows(batch, spec, embeddings):
    """Every real query row of the batch as a serving request, with its entity's embedding."""
    mask = batch["query_mask"] > 0
    request = {f.name: batch[f"query_{f.name}"][mask] for f in spec.request_features}
    rows_embedding = np.repeat(embeddings, mask.sum(axis=1), axis=0)
    return rows_embedding.astype(np.float32), request


def test_serving_default_matches_keras(exported, session, capped_batch):
    model, spec = exported["model"], exported["spec"]
    embeddings = model.meta_embedding(capped_batch).numpy()
    embedding, request = _query_rows(capped_batch, spec, embeddings)
    got = session.run("serving_default", {"meta_embedding": embedding, **request})[
        "score"
    ]
    expected = model.score(tf.constant(embedding), request).numpy()
    assert got.shape == (len(embedding),) and len(embedding) > 100
    np.testing.assert_allclose(got, expected, atol=TOL)


def test_adapt_and_predict_matches_keras_for_every_test_entity(
    exported, session, full_batch, capped_batch
):
    model, spec = exported["model"], exported["spec"]
    # Keras adapts on the latest TEST_MAX_SUPPORT rows (the data pipeline's cap);
    # the signature gets every row and must apply the same cap itself.
    expected_scores = model.predict_query(capped_batch).numpy()
    expected_embeddings = model.meta_embedding(capped_batch).numpy()
    longer = 0
    for i in range(len(full_batch["entity_id"])):
        assert full_batch["entity_id"][i] == capped_batch["entity_id"][i]
        meta, support, labels, query = entity_inputs(full_batch, spec, i)
        longer += len(labels) > TEST_MAX_SUPPORT
        out = session.run(
            "adapt_and_predict", _adapt_inputs(meta, support, labels, query)
        )
        n_query = len(out["score"])
        assert n_query == int(capped_batch["query_mask"][i].sum())
        np.testing.assert_allclose(out["score"], expected_scores[i, :n_query], atol=TOL)
        np.testing.assert_allclose(
            out["meta_embedding"], expected_embeddings[i], atol=TOL
        )
    assert longer > 0, "no test entity has more support rows than max_support"


def test_meta_embedding_signature_matches_keras_and_caps_support(
    exported, session, full_batch, capped_batch
):
    model, spec = exported["model"], exported["spec"]
    inputs = {f.name: full_batch[f.name] for f in spec.meta_features}
    for key in ["support_label", "support_mask"] + [
        f"support_{f.name}" for f in spec.request_features
    ]:
        inputs[key] = full_batch[key]
    got = session.run("meta_embedding", inputs)["meta_embedding"]
    expected = model.meta_embedding(capped_batch).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOL)


def _example(embedding, row):
    feature = {
        "meta_embedding": tf.train.Feature(
            float_list=tf.train.FloatList(value=embedding.tolist())
        )
    }
    for name, value in row.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            feature[name] = tf.train.Feature(
                float_list=tf.train.FloatList(value=[float(value)])
            )
        else:
            values = [v for v in np.atleast_1d(value).tolist() if v]
            feature[name] = tf.train.Feature(
                bytes_list=tf.train.BytesList(value=values)
            )
    return tf.train.Example(
        features=tf.train.Features(feature=feature)
    ).SerializeToString()


def test_predict_examples_matches_keras(exported, session, capped_batch):
    model, spec = exported["model"], exported["spec"]
    embeddings = model.meta_embedding(capped_batch).numpy()
    embedding, request = _query_rows(capped_batch, spec, embeddings)
    examples = [
        _example(embedding[i], {k: v[i] for k, v in request.items()})
        for i in range(len(embedding))
    ]
    got = session.run(
        "predict_examples", {"examples": np.array(examples, dtype=object)}
    )["score"]
    expected = model.score(tf.constant(embedding), request).numpy()
    np.testing.assert_allclose(got, expected, atol=TOL)


def test_empty_support_is_cold_start(exported, session, capped_batch):
    model, spec = exported["model"], exported["spec"]
    meta, support, _, query = entity_inputs(capped_batch, spec, 0)
    empty = {k: v[:0] for k, v in support.items()}
    out = session.run(
        "adapt_and_predict",
        _adapt_inputs(meta, empty, np.zeros([0], np.float32), query),
    )
    default = model.meta_embedding(capped_batch, steps=0).numpy()[0]
    unadapted = model.predict_query(capped_batch, adapt=False).numpy()[0]
    assert np.all(np.isfinite(out["meta_embedding"]))
    np.testing.assert_allclose(out["meta_embedding"], default, atol=TOL)
    np.testing.assert_allclose(out["score"], unadapted[: len(out["score"])], atol=TOL)
    # Adaptation moves the embedding, so the comparison above means something.
    adapted = model.meta_embedding(capped_batch).numpy()[0]
    assert np.max(np.abs(adapted - default)) > 1e-3

    inputs = {f.name: capped_batch[f.name][:2] for f in spec.meta_features}
    for key in ["support_label"] + [f"support_{f.name}" for f in spec.request_features]:
        inputs[key] = capped_batch[key][:2]
    inputs["support_mask"] = np.zeros_like(capped_batch["support_mask"][:2])
    cold = session.run("meta_embedding", inputs)["meta_embedding"]
    np.testing.assert_allclose(
        cold, model.meta_embedding(capped_batch, steps=0).numpy()[:2], atol=TOL
    )


def test_support_beyond_max_support_keeps_the_latest_rows(
    exported, session, full_batch
):
    spec = exported["spec"]
    lengths = full_batch["support_mask"].sum(axis=1)
    i = int(np.argmax(lengths))
    meta, support, labels, query = entity_inputs(full_batch, spec, i)
    assert len(labels) > TEST_MAX_SUPPORT
    everything = session.run(
        "adapt_and_predict", _adapt_inputs(meta, support, labels, query)
    )
    latest = {k: v[-TEST_MAX_SUPPORT:] for k, v in support.items()}
    capped = session.run(
        "adapt_and_predict",
        _adapt_inputs(meta, latest, labels[-TEST_MAX_SUPPORT:], query),
    )
    oldest = {k: v[:TEST_MAX_SUPPORT] for k, v in support.items()}
    other = session.run(
        "adapt_and_predict",
        _adapt_inputs(meta, oldest, labels[:TEST_MAX_SUPPORT], query),
    )
    np.testing.assert_allclose(everything["score"], capped["score"], atol=TOL)
    assert np.max(np.abs(other["meta_embedding"] - capped["meta_embedding"])) > 1e-6


def test_bad_inputs_fail_with_invalid_argument(exported, session, capped_batch):
    spec = exported["spec"]
    meta, support, labels, query = entity_inputs(capped_batch, spec, 0)
    bad = labels.copy()
    bad[0] = 4.0  # e.g. a raw 1-5 rating that was never binarized
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="support_label` must be 0 or 1"
    ):
        session.run("adapt_and_predict", _adapt_inputs(meta, support, bad, query))
    short = dict(support, item_id=support["item_id"][:-1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="support_item_id"):
        session.run("adapt_and_predict", _adapt_inputs(meta, short, labels, query))
    # Padding rows (mask 0) may hold anything; real rows may not.
    inputs = {f.name: capped_batch[f.name][:1] for f in spec.meta_features}
    for key in ["support_label", "support_mask"] + [
        f"support_{f.name}" for f in spec.request_features
    ]:
        inputs[key] = capped_batch[key][:1].copy()
    padded = np.flatnonzero(inputs["support_mask"][0] == 0)
    assert len(padded)
    clean = session.run("meta_embedding", inputs)["meta_embedding"]
    inputs["support_label"][0, padded] = 7.0
    # Exactly what clean padding gives: a label that leaked into adaptation
    # would move the embedding (finite or not).
    np.testing.assert_array_equal(
        session.run("meta_embedding", inputs)["meta_embedding"], clean
    )
    flipped = dict(inputs, support_label=inputs["support_label"].copy())
    flipped["support_label"][0, 0] = 1.0 - flipped["support_label"][0, 0]
    moved = session.run("meta_embedding", flipped)["meta_embedding"]
    assert np.max(np.abs(moved - clean)) > 1e-6  # a real row's label does count
    inputs["support_label"][0, 0] = -1.0
    with pytest.raises(tf.errors.InvalidArgumentError, match="support_label"):
        session.run("meta_embedding", inputs)


def test_warmup_requests_parse_and_run(exported, session):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(
        exported["export_dir"], "assets.extra", "tf_serving_warmup_requests"
    )
    logs = [
        prediction_log_pb2.PredictionLog.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(path)
    ]
    assert [
        len(tf.make_ndarray(log.predict_log.request.inputs["meta_embedding"]))
        for log in logs
    ] == list(export.DEFAULT_WARMUP_BATCH_SIZES)
    for log in logs:
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        assert set(request.inputs) == set(session.signatures["serving_default"].inputs)
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        scores = session.run("serving_default", inputs)["score"]
        assert scores.shape == (len(inputs["meta_embedding"]),)
        assert np.all((scores > 0) & (scores < 1))


def test_metadata_records_spec_and_sizes(exported):
    metadata = export.read_metadata(exported["export_base"])
    assert metadata["export_dir"] == exported["export_dir"]
    assert metadata["model_version"] == 1
    assert metadata["meta_dim"] == 8
    assert metadata["max_support"] == TEST_MAX_SUPPORT
    assert metadata["inner_steps"] == 2
    assert metadata["spec"] == exported["spec"]
    assert set(metadata["signatures"]) == set(export.SIGNATURE_NAMES)


def test_export_is_atomic_and_versioned(exported, tmp_path, monkeypatch):
    base = tmp_path / "exports"
    (base / "1").mkdir(parents=True)
    model = exported["model"]
    with pytest.raises(FileExistsError, match="--version"):
        export.export_model(model, str(base), version=1)

    # A watcher polls the base as TF Serving does: any numeric directory it
    # sees must already be complete.
    seen, incomplete, done = set(), [], threading.Event()

    def watch():
        while True:
            finished = done.is_set()
            for name in os.listdir(base):
                if name.isdigit() and name != "1":
                    seen.add(name)
                    complete = all(
                        os.path.exists(base / name / p)
                        for p in (
                            "saved_model.pb",
                            "variables/variables.index",
                            "assets.extra/limaml.json",
                            "assets.extra/tf_serving_warmup_requests",
                        )
                    )
                    if not complete:
                        incomplete.append(name)
            if finished:
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        path = export.export_model(model, str(base))
    finally:
        done.set()
        watcher.join()
    assert path == str(base / "2") and seen == {"2"} and not incomplete
    assert sorted(os.listdir(base)) == ["1", "2"]

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(saved_model, "_write_warmup", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_model(model, str(base))
    assert sorted(os.listdir(base)) == ["1", "2"], "a failed export left files behind"


def test_cli_export_and_serve_command(exported, tmp_path, capsys):
    from tf_limaml import cli
    from tf_limaml.saving import save_model

    model_dir = str(tmp_path / "model")
    save_model(exported["model"], model_dir)
    base = str(tmp_path / "exports")
    assert (
        cli.main(
            [
                "export",
                "--model-dir",
                model_dir,
                "--export-base",
                base,
                "--max-support",
                "8",
            ]
        )
        == 0
    )
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert path == os.path.join(base, "1")
    assert export.read_metadata(path)["max_support"] == 8

    # serve-command must not import TensorFlow.
    code = (
        "import sys; from tf_limaml import cli; rc = cli.main(['serve-command', "
        f"{base!r}, '--model-name', 'recs']); "
        "assert 'tensorflow' not in sys.modules, 'serve-command imported TensorFlow'; "
        "sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert result.returncode == 0, result.stderr
    assert (
        f"tensorflow_model_server --port=8500 --rest_api_port=8501 --model_name=recs "
        f"--model_base_path={base}"
    ) in result.stdout
    assert (
        f"docker run --rm -p 8500:8500 -p 8501:8501 --mount type=bind,source={base},"
        "target=/models/recs -e MODEL_NAME=recs"
    ) in result.stdout


def test_spec_without_meta_features_exports_and_adapts(tmp_path):
    """No meta features: the meta block starts from a learned constant; E, S come from support."""
    from tf_limaml.features import FeatureSpec
    from tf_limaml.model import LiMAMLModel, MetaConfig

    spec = FeatureSpec.from_dict(
        {
            "entity": "u",
            "time": "t",
            "label": "y",
            "request_features": [
                {"name": "item", "type": "categorical", "hash_buckets": 50, "dim": 4},
                {"name": "x", "type": "numeric", "normalize": False},
            ],
        }
    )
    tf.keras.utils.set_random_seed(1)
    model = LiMAMLModel(
        spec,
        MetaConfig(jit_compile=False, inner_lr=0.5),
        meta_units=[8, 4],
        global_units=[8],
        cross_layers=0,
    )
    loaded = tf.saved_model.load(export.export_model(model, str(tmp_path)))
    tasks = {
        "support_item": tf.constant([["a", "b", "c"]]),
        "support_x": tf.constant([[1.0, 2.0, -1.0]]),
        "support_label": tf.constant([[1.0, 0.0, 1.0]]),
        "query_item": tf.constant([["c", "d"]]),
        "query_x": tf.constant([[0.5, 3.0]]),
    }
    out = loaded.signatures["adapt_and_predict"](**{k: v[0] for k, v in tasks.items()})
    np.testing.assert_allclose(
        out["score"], model.predict_query(tasks).numpy()[0], atol=TOL
    )
    embedding = model.meta_embedding(tasks).numpy()
    np.testing.assert_allclose(out["meta_embedding"], embedding[0], atol=TOL)
    batched = loaded.signatures["meta_embedding"](
        support_item=tasks["support_item"],
        support_x=tasks["support_x"],
        support_label=tasks["support_label"],
        support_mask=tf.ones([1, 3]),
    )
    np.testing.assert_allclose(batched["meta_embedding"], embedding, atol=TOL)
