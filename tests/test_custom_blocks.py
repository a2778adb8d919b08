"""Bring your own blocks: a user's Keras ranking model as the global block, a
Sequential, and a meta block with fast weights; trained, exported and served."""

import glob
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from serving_fixture import SessionSignatures, entity_inputs

import tf_limaml
from tf_limaml import data, export, maml, step
from tf_limaml.config import AdaptOptions
from tf_limaml.model import LiMAMLModel, MetaConfig

TOL = 1e-5
MAX_SUPPORT = 16
ITEMS = [str(i) for i in range(200)]  # the synthetic item ids


class Ranker(tf.keras.Model):
    """A TFRS-style ranking model by someone who never saw tf_limaml's layers.

    It reads one dict of features (the meta embedding among them) and returns
    a logit per row.
    """

    def __init__(self, items, **kwargs):
        super().__init__(**kwargs)
        self.item_lookup = tf.keras.layers.StringLookup(vocabulary=items)
        self.item_embedding = tf.keras.layers.Embedding(len(items) + 1, 8)
        self.tower = tf.keras.Sequential(
            [
                tf.keras.layers.Dense(32, activation="relu"),
                tf.keras.layers.Dense(16, activation="relu"),
                tf.keras.layers.Dense(1),
            ]
        )

    def call(self, features):
        item = self.item_embedding(self.item_lookup(features["item_id"]))
        numeric = tf.stack([features[f"f{k}"] for k in range(4)], axis=-1)
        return self.tower(
            tf.concat([features["meta_embedding"], item, numeric], axis=-1)
        )


def _batch(paths, spec, split="test", max_support=MAX_SUPPORT, tasks=1000):
    ds = data.task_dataset(paths[split], spec, tasks, max_support, 32)
    return {k: v.numpy() for k, v in next(iter(ds)).items()}


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING]


# ------------------------------------------------- a user's ranking model
@pytest.fixture(scope="module")
def ranker_export(synthetic_tasks, synthetic_spec, tmp_path_factory):
    tf.keras.utils.set_random_seed(0)
    model = LiMAMLModel(
        synthetic_spec,
        MetaConfig(inner_steps=2, inner_lr=0.5),
        meta_units=[16, 8],
        global_block=Ranker(ITEMS, name="ranker"),
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3))
    train = data.task_dataset(synthetic_tasks["train"], synthetic_spec, 32, 32, 32)
    history = model.fit(train, epochs=2, verbose=0)
    base = str(tmp_path_factory.mktemp("ranker_export"))
    export_dir = export.export_model(model, base, max_support=MAX_SUPPORT)
    session = SessionSignatures(export_dir)
    yield {
        "model": model,
        "history": history.history,
        "export_base": base,
        "export_dir": export_dir,
        "session": session,
    }
    session.close()


def test_a_string_lookup_block_runs_without_xla_and_says_why(synthetic_spec, caplog):
    with caplog.at_level(logging.WARNING, logger="tf_limaml.model"):
        model = LiMAMLModel(synthetic_spec, global_block=Ranker(ITEMS))
    (record,) = _warnings(caplog)
    assert "without XLA" in record.getMessage()
    assert "item_id" in record.getMessage() and "encode" in record.getMessage()
    assert not model.uses_xla
    # Asking for no XLA is not worth a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tf_limaml.model"):
        LiMAMLModel(
            synthetic_spec, MetaConfig(jit_compile=False), global_block=Ranker(ITEMS)
        )
    assert not _warnings(caplog)


def test_ranker_meta_trains(ranker_export, synthetic_tasks, synthetic_spec):
    model, history = ranker_export["model"], ranker_export["history"]
    assert np.all(np.isfinite(history["loss"]))
    assert history["loss"][-1] < history["loss"][0]
    # Its weights are the model's: created at construction, trained by fit.
    names = {v.name for v in model.trainable_variables}
    assert any("ranker" in n and "embedding" in n for n in names), names
    batch = _batch(synthetic_tasks, synthetic_spec)
    adapted = model.meta_embedding(batch).numpy()
    default = model.meta_embedding(batch, steps=0).numpy()
    assert adapted.shape == (len(batch["entity_id"]), 8)
    assert np.abs(adapted - default).max() > 1e-4


def test_ranker_export_serves_every_signature_like_keras(
    ranker_export, synthetic_tasks, synthetic_spec
):
    model, session = ranker_export["model"], ranker_export["session"]
    spec = synthetic_spec
    capped = _batch(synthetic_tasks, spec)
    full = _batch(synthetic_tasks, spec, max_support=64)
    embeddings = model.meta_embedding(capped).numpy()
    scores = model.predict_query(capped).numpy()

    # meta_embedding: every entity, all its support (the signature caps it).
    inputs = {f.name: full[f.name] for f in spec.meta_features}
    for key in ["support_label", "support_mask"] + [
        f"support_{f.name}" for f in spec.request_features
    ]:
        inputs[key] = full[key]
    got = session.run("meta_embedding", inputs)["meta_embedding"]
    np.testing.assert_allclose(got, embeddings, atol=TOL)

    # serving_default and predict_examples: every real query row.
    mask = capped["query_mask"] > 0
    request = {f.name: capped[f"query_{f.name}"][mask] for f in spec.request_features}
    rows_embedding = np.repeat(embeddings, mask.sum(axis=1), axis=0)
    expected = model.score(tf.constant(rows_embedding), request).numpy()
    np.testing.assert_allclose(expected, scores[mask], atol=TOL)
    got = session.run("serving_default", {"meta_embedding": rows_embedding, **request})[
        "score"
    ]
    assert len(got) > 100
    np.testing.assert_allclose(got, expected, atol=TOL)
    examples = []
    for i in range(len(rows_embedding)):
        feature = {
            "meta_embedding": tf.train.Feature(
                float_list=tf.train.FloatList(value=rows_embedding[i])
            ),
            "item_id": tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[request["item_id"][i]])
            ),
            "topics": tf.train.Feature(
                bytes_list=tf.train.BytesList(
                    value=[t for t in request["topics"][i] if t]
                )
            ),
        }
        for k in range(4):
            feature[f"f{k}"] = tf.train.Feature(
                float_list=tf.train.FloatList(value=[request[f"f{k}"][i]])
            )
        examples.append(
            tf.train.Example(
                features=tf.train.Features(feature=feature)
            ).SerializeToString()
        )
    got = session.run("predict_examples", {"examples": np.array(examples)})["score"]
    np.testing.assert_allclose(got, expected, atol=TOL)

    # adapt_and_predict: one entity at a time, all its support rows.
    for i in range(12):
        meta, support, labels, query = entity_inputs(full, spec, i)
        entity = dict(meta)
        entity.update({f"support_{k}": v for k, v in support.items()})
        entity.update({f"query_{k}": v for k, v in query.items()})
        entity["support_label"] = labels.astype(np.float32)
        out = session.run("adapt_and_predict", entity)
        n_query = len(out["score"])
        np.testing.assert_allclose(out["score"], scores[i, :n_query], atol=TOL)
        np.testing.assert_allclose(out["meta_embedding"], embeddings[i], atol=TOL)


def test_limaml_embed_with_a_custom_block(
    ranker_export, synthetic_tasks, synthetic_spec, tmp_path
):
    from tf_limaml import cli

    output = str(tmp_path / "embeddings")
    argv = ["embed", "--export", ranker_export["export_base"]]
    argv += ["--tasks", synthetic_tasks["test"], "--output", output]
    assert cli.main(argv) == 0
    stored = {}
    for path in glob.glob(os.path.join(output, "embeddings-*.tfrecord.gz")):
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            feature = tf.train.Example.FromString(record.numpy()).features.feature
            entity = feature["entity_id"].bytes_list.value[0]
            stored[entity] = np.array(feature["embedding"].float_list.value)
    batch = _batch(synthetic_tasks, synthetic_spec)
    expected = ranker_export["model"].meta_embedding(batch).numpy()
    assert len(stored) == len(batch["entity_id"])
    for entity, embedding in zip(batch["entity_id"], expected, strict=True):
        np.testing.assert_allclose(stored[entity], embedding, atol=TOL)


def test_a_block_with_an_encode_step_compiles_with_xla(
    synthetic_tasks, synthetic_spec, caplog
):
    class EncodedRanker(Ranker):
        """The same model with its string lookup moved to an `encode` step."""

        def encode(self, raw):
            numeric = {f"f{k}": raw[f"f{k}"] for k in range(4)}
            return {"item_id": self.item_lookup(raw["item_id"]), **numeric}

        def call(self, features):
            item = self.item_embedding(features["item_id"])
            numeric = tf.stack([features[f"f{k}"] for k in range(4)], axis=-1)
            return self.tower(
                tf.concat([features["meta_embedding"], item, numeric], axis=-1)
            )

    class LeakyRanker(EncodedRanker):
        def encode(self, raw):
            return {**super().encode(raw), "topics": raw["topics"]}

    with caplog.at_level(logging.WARNING, logger="tf_limaml.model"):
        model = LiMAMLModel(synthetic_spec, global_block=LeakyRanker(ITEMS))
    assert not model.uses_xla
    assert "`encode` step returns the string features ['topics']" in (
        _warnings(caplog)[0].getMessage()
    )
    caplog.clear()

    batch = _batch(synthetic_tasks, synthetic_spec, "train", tasks=16)
    results = []
    for jit in (True, False):
        tf.keras.utils.set_random_seed(4)
        with caplog.at_level(logging.WARNING, logger="tf_limaml.model"):
            model = LiMAMLModel(
                synthetic_spec,
                MetaConfig(jit_compile=jit),
                meta_units=[16, 8],
                global_block=EncodedRanker(ITEMS),
            )
        assert model.uses_xla == jit and not _warnings(caplog)
        grads, out = tf.function(
            lambda b, m=model: step.meta_gradients(m, b), jit_compile=model.uses_xla
        )(model.encode(batch))
        results.append((float(out["loss"]), [tf.convert_to_tensor(g) for g in grads]))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


# ------------------------------------------------------------- Sequential
@tf.keras.utils.register_keras_serializable(package="test_custom_blocks")
class Columns(tf.keras.layers.Layer):
    """Stacks the named columns of a feature dict into one [N, k] tensor."""

    def __init__(self, keys, **kwargs):
        super().__init__(**kwargs)
        self.keys = list(keys)

    def call(self, features):
        return tf.concat(
            [
                features[k] if features[k].shape.rank == 2 else features[k][:, None]
                for k in self.keys
            ],
            axis=-1,
        )

    def get_config(self):
        return {**super().get_config(), "keys": self.keys}


def _numeric_spec(spec):
    """The synthetic spec with its numeric request features only."""
    config = spec.to_dict()
    config["request_features"] = [
        f for f in config["request_features"] if f["type"] == "numeric"
    ]
    return tf_limaml.FeatureSpec.from_dict(config)


def _sequential(spec):
    numeric = [f.name for f in spec.request_features if f.type == "numeric"]
    return tf.keras.Sequential(
        [
            Columns(["meta_embedding", *numeric]),
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dense(1),
        ],
        name="sequential_block",
    )


def test_sequential_global_block_trains_scores_and_round_trips(
    synthetic_tasks, synthetic_spec, tmp_path, caplog
):
    spec = _numeric_spec(synthetic_spec)
    tf.keras.utils.set_random_seed(1)
    with caplog.at_level(logging.WARNING, logger="tf_limaml.model"):
        model = LiMAMLModel(
            spec,
            MetaConfig(inner_steps=1, inner_lr=0.5),
            meta_units=[8, 4],
            global_block=_sequential(spec),
        )
    # Numbers only: the step still compiles with XLA.
    assert model.uses_xla and not _warnings(caplog)
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3))
    train = data.task_dataset(synthetic_tasks["train"], spec, 32, 32, 32)
    history = model.fit(train, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][-1])

    batch = _batch(synthetic_tasks, spec)
    embedding = model.meta_embedding(batch).numpy()
    scores = model.predict_query(batch).numpy()
    # The task axis is flattened for the block and restored: row (t, q) is the
    # block applied to task t's embedding and query row q.
    t, q = 3, 2
    row = {
        f.name: batch[f"query_{f.name}"][t, q : q + 1] for f in spec.request_features
    }
    logit = model.global_block({"meta_embedding": embedding[t : t + 1], **row})
    np.testing.assert_allclose(
        scores[t, q], tf.sigmoid(logit).numpy().ravel()[0], atol=1e-6
    )

    tf_limaml.save_model(model, tmp_path / "m")
    with open(tmp_path / "m" / "config.json") as f:
        assert json.load(f)["global_block"]["class_name"] == "Sequential"
    loaded = tf_limaml.load_model(tmp_path / "m")
    assert isinstance(loaded.global_block, tf.keras.Sequential)
    np.testing.assert_allclose(loaded.predict_query(batch).numpy(), scores, atol=1e-6)

    export_dir = export.export_model(model, str(tmp_path / "export"), max_support=32)
    session = SessionSignatures(export_dir)
    mask = batch["query_mask"] > 0
    request = {f.name: batch[f"query_{f.name}"][mask] for f in spec.request_features}
    rows_embedding = np.repeat(embedding, mask.sum(axis=1), axis=0)
    got = session.run("serving_default", {"meta_embedding": rows_embedding, **request})[
        "score"
    ]
    np.testing.assert_allclose(got, scores[mask], atol=TOL)
    session.close()


# ------------------------------------------------------------- meta block
class LinearMetaBlock(tf.keras.layers.Layer):
    """A meta block with fast weights: e = [onehot(segment), activity] W + b."""

    def __init__(
        self,
        segments,
        dim=4,
        kernel_initializer="glorot_uniform",
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.lookup = tf.keras.layers.StringLookup(vocabulary=segments)
        self.width = len(segments) + 2
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.width, dim),
            initializer=kernel_initializer,
            regularizer=kernel_regularizer,
        )
        self.bias = self.add_weight(name="bias", shape=(dim,), initializer="zeros")

    def adaptable_weights(self):
        return {"kernel": self.kernel, "bias": self.bias}

    def encode(self, raw):
        return {"segment": self.lookup(raw["segment"]), "activity": raw["activity"]}

    def call(self, inputs, weights=None):
        weights = {**self.adaptable_weights(), **(weights or {})}
        x = tf.concat(
            [
                tf.one_hot(inputs["segment"], self.width - 1),
                (inputs["activity"][:, None] - 30.0) / 10.0,
            ],
            axis=-1,
        )
        return maml.dense(x, weights["kernel"], weights["bias"])


def test_custom_meta_block_adapts_per_task(synthetic_tasks, synthetic_spec):
    segments = list(synthetic_spec.feature("segment").vocabulary)
    tf.keras.utils.set_random_seed(2)
    model = LiMAMLModel(
        synthetic_spec,
        MetaConfig(inner_steps=2, inner_lr=0.5, jit_compile=False),
        global_units=[16],
        cross_layers=0,
        meta_block=LinearMetaBlock(segments, name="linear_meta"),
    )
    assert model.meta_dim == 4 and model.uses_xla is False
    assert set(model.adaptable_variables()) == {
        "meta_block/kernel",
        "meta_block/bias",
    }
    batch = _batch(synthetic_tasks, synthetic_spec, tasks=6)
    batch["support_mask"][0] = 0.0  # a cold-start entity
    fast = model.adapt(batch)
    assert fast["meta_block/kernel"].shape == (6, len(segments) + 2, 4)
    embeddings = model.meta_embedding(batch).numpy()
    default = model.meta_embedding(batch, steps=0).numpy()
    np.testing.assert_allclose(embeddings[0], default[0], atol=1e-7)
    assert np.abs(embeddings[1:] - default[1:]).max() > 1e-4
    # Vectorized over tasks = one task at a time.
    for t in range(1, 6):
        one = {k: v[t : t + 1] for k, v in batch.items()}
        np.testing.assert_allclose(
            model.meta_embedding(one).numpy()[0], embeddings[t], atol=1e-5
        )


def test_an_unregistered_block_saves_but_loading_says_what_to_do(
    synthetic_spec, tmp_path
):
    model = LiMAMLModel(
        synthetic_spec, MetaConfig(jit_compile=False), global_block=Ranker(ITEMS)
    )
    tf_limaml.save_model(model, tmp_path / "m")
    with pytest.raises(ValueError, match="register_keras_serializable"):
        tf_limaml.load_model(tmp_path / "m")


def test_blocks_that_miss_the_protocol_are_refused(synthetic_spec):
    with pytest.raises(ValueError, match="Keras layer or model"):
        LiMAMLModel(synthetic_spec, global_block=lambda features: features)
    with pytest.raises(ValueError, match="no fast weights"):
        LiMAMLModel(synthetic_spec, meta_block=tf.keras.layers.Dense(4))
    with pytest.raises(ValueError, match="adapt='all'"):
        LiMAMLModel(synthetic_spec, MetaConfig(adapt="all"), global_block=Ranker(ITEMS))


def test_our_global_block_takes_the_same_dict(synthetic_spec):
    block = tf_limaml.GlobalBlock(synthetic_spec.request_features, meta_dim=4)
    block.build(None)
    raw = {
        "item_id": tf.constant(["3", "7"]),
        "topics": tf.constant([["news", ""], ["film", "tech"]]),
        **{f"f{k}": tf.constant([0.1, -0.2]) for k in range(4)},
    }
    encoded = block.encode(raw)
    embedding = tf.random.normal([2, 4])
    np.testing.assert_allclose(
        block({"meta_embedding": embedding, **encoded}).numpy(),
        block(embedding, encoded).numpy(),
    )


def test_a_custom_blocks_regularization_reaches_the_loss(
    synthetic_tasks, synthetic_spec, caplog
):
    segments = list(synthetic_spec.feature("segment").vocabulary)
    block = LinearMetaBlock(
        segments,
        kernel_initializer="ones",
        kernel_regularizer=tf.keras.regularizers.L2(0.5),
        name="regularized_meta",
    )
    penalty = 0.5 * block.width * 4  # 0.5 * sum(ones^2)
    with caplog.at_level(logging.WARNING, logger="tf_limaml.model"):
        model = LiMAMLModel(
            synthetic_spec,
            MetaConfig(jit_compile=False),
            global_units=[8],
            cross_layers=0,
            l2=0.01,
            meta_block=block,
        )
    # The model-level l2 regularizes the library's global block only, and says so.
    assert "regularizes the library's blocks only" in _warnings(caplog)[0].getMessage()
    glob = model.global_block.adaptable_weights()
    ours = 0.01 * sum(
        float(tf.reduce_sum(glob[k] ** 2)) for k in glob if k.endswith("kernel")
    )
    batch = _batch(synthetic_tasks, synthetic_spec, tasks=4)
    out = model.forward(model.encode(batch), AdaptOptions(inner_steps=1), training=True)
    np.testing.assert_allclose(
        float(out["regularization_loss"]), penalty + ours, rtol=1e-5
    )
    with tf.GradientTape() as tape:
        out = model.forward(
            model.encode(batch), AdaptOptions(inner_steps=0), training=True
        )
        loss = out["regularization_loss"]
    np.testing.assert_allclose(
        tape.gradient(loss, block.kernel).numpy(), 2 * 0.5 * block.kernel.numpy()
    )
