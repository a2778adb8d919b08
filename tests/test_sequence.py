"""SequenceMetaBlock: masking, order, config, vectorized = per task, the model path."""

import numpy as np
import pytest
import tensorflow as tf

import tf_limaml
from tf_limaml import maml
from tf_limaml.model import LiMAMLModel, MetaConfig
from tf_limaml.sequence import SUPPORT_SEQUENCE_KEY, SequenceMetaBlock

META = [
    {"name": "segment", "type": "categorical", "vocabulary": ["a", "b"], "dim": 4},
    {"name": "age", "type": "numeric", "mean": 0.0, "std": 1.0},
]
REQUEST = [
    {"name": "item", "type": "categorical", "hash_buckets": 50, "dim": 4},
    {"name": "price", "type": "numeric", "mean": 0.0, "std": 1.0},
]
T, S = 3, 6


def _block(**kwargs):
    tf.keras.utils.set_random_seed(0)
    args = dict(units=(8, 4), model_dim=8, num_heads=2, request_embedding="own")
    args.update(kwargs)
    block = SequenceMetaBlock(META, REQUEST, **args)
    block.build(None)
    return block


def _inputs(block, mask, labels=None, items=None, prices=None, seed=0):
    rng = np.random.default_rng(seed)
    items = items if items is not None else rng.integers(0, 9, (T, S)).astype(str)
    prices = prices if prices is not None else rng.normal(size=(T, S))
    labels = labels if labels is not None else rng.integers(0, 2, (T, S))
    meta = block.encode(
        {"segment": tf.constant(["a", "b", "a"][:T]), "age": tf.constant([0.5] * T)}
    )
    features = block.encode_support(
        {"item": tf.constant(items), "price": tf.constant(prices, tf.float32)}
    )
    return {
        **meta,
        SUPPORT_SEQUENCE_KEY: {
            "features": features,
            "label": tf.constant(labels, tf.float32),
            "mask": tf.constant(mask, tf.float32),
        },
    }


MASK = np.array(
    [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], np.float32
)


def test_padding_never_changes_the_embedding():
    block = _block()
    base = block(_inputs(block, MASK, seed=0)).numpy()
    # Same real rows; padding rows hold other items, NaN prices and a label of 9.
    dirty_items = np.random.default_rng(1).integers(0, 49, (T, S)).astype(str)
    rng0 = np.random.default_rng(0)  # the draws of _inputs(seed=0)
    real_items = rng0.integers(0, 9, (T, S)).astype(str)
    real_prices = rng0.normal(size=(T, S))
    real_labels = rng0.integers(0, 2, (T, S))
    items = np.where(MASK > 0, real_items, dirty_items)
    prices = np.where(MASK > 0, real_prices, np.nan)
    labels = np.where(MASK > 0, real_labels, 9.0)
    dirty = _inputs(block, MASK, labels=labels, items=items, prices=prices)
    assert np.all(np.isfinite(block(dirty).numpy()))
    np.testing.assert_allclose(block(dirty).numpy(), base, atol=1e-6)


def test_more_padding_never_changes_the_embedding():
    """The attention masks: extra padded positions take no attention weight."""
    block = _block()
    rng = np.random.default_rng(0)
    items = rng.integers(0, 9, (T, S)).astype(str)
    prices = rng.normal(size=(T, S))
    labels = rng.integers(0, 2, (T, S))
    base = block(_inputs(block, MASK, labels, items, prices)).numpy()
    pad = lambda x, v: np.concatenate(  # noqa: E731
        [x, np.full((T, 4), v, dtype=x.dtype)], axis=1
    )
    longer = block(
        _inputs(block, pad(MASK, 0), pad(labels, 1), pad(items, "7"), pad(prices, 3.0))
    ).numpy()
    np.testing.assert_allclose(longer, base, atol=1e-5)


def test_no_support_gives_the_static_default_and_no_nan():
    block = _block()
    empty = _inputs(block, np.zeros((T, S), np.float32))
    static_only = {k: v for k, v in empty.items() if k != SUPPORT_SEQUENCE_KEY}
    out = block(empty).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, block(static_only).numpy(), atol=1e-6)


def test_support_changes_the_embedding():
    block = _block()
    with_support = block(_inputs(block, MASK)).numpy()
    without = block(_inputs(block, np.zeros((T, S), np.float32))).numpy()
    assert np.abs(with_support - without).max() > 1e-3


@pytest.mark.parametrize("recency", [True, False])
def test_order_matters_only_with_recency(recency):
    block = _block(recency=recency)
    full = np.ones((T, S), np.float32)
    rng = np.random.default_rng(0)
    items = rng.integers(0, 9, (T, S)).astype(str)
    prices = rng.normal(size=(T, S))
    labels = rng.integers(0, 2, (T, S))
    perm = np.array([5, 3, 1, 0, 2, 4])
    a = block(_inputs(block, full, labels, items, prices)).numpy()
    b = block(
        _inputs(block, full, labels[:, perm], items[:, perm], prices[:, perm])
    ).numpy()
    if recency:
        assert np.abs(a - b).max() > 1e-4
    else:
        # Without recency the encoder is a set function: order cannot matter.
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_cut_support_ranks_like_a_short_one():
    """Recency counts real rows: the latest k with zeros in front = k rows alone."""
    block = _block()
    rng = np.random.default_rng(0)
    items = rng.integers(0, 9, (T, S)).astype(str)
    prices = rng.normal(size=(T, S))
    labels = rng.integers(0, 2, (T, S))
    cut = np.zeros((T, S), np.float32)
    cut[:, -2:] = 1
    front = np.zeros((T, S), np.float32)
    front[:, :2] = 1
    a = block(_inputs(block, cut, labels, items, prices)).numpy()
    roll = lambda x: np.roll(x, 2, axis=1)  # noqa: E731
    b = block(_inputs(block, front, roll(labels), roll(items), roll(prices))).numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_get_config_round_trip():
    block = _block(adapt=("output", "pool_query"), num_layers=2, recency=False)
    clone = SequenceMetaBlock.from_config(block.get_config())
    clone.build(None)
    assert clone.get_config() == block.get_config()
    clone.set_weights(block.get_weights())
    inputs = _inputs(block, MASK)
    np.testing.assert_allclose(clone(inputs).numpy(), block(inputs).numpy(), atol=1e-6)
    restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(block))
    assert isinstance(restored, SequenceMetaBlock)
    restored.build(None)
    assert sorted(restored.adaptable_weights()) == sorted(block.adaptable_weights())


@pytest.mark.parametrize(
    "adapt,names",
    [
        (("output",), {"dense_1/kernel", "dense_1/bias"}),
        (("pool_query",), {"pool_query"}),
        (
            ("mlp",),
            {"dense_0/kernel", "dense_0/bias", "dense_1/kernel", "dense_1/bias"},
        ),
    ],
)
def test_adapt_chooses_the_fast_weights(adapt, names):
    assert set(_block(adapt=adapt).adaptable_weights()) == names


def test_vectorized_equals_per_task():
    block = _block(adapt=("output", "pool_query"))
    inputs = _inputs(block, MASK)
    fast = maml.tile(block.adaptable_weights(), T)
    rng = np.random.default_rng(3)
    fast = {
        k: v + rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in fast.items()
    }
    together = block(inputs, weights=fast).numpy()
    for t in range(T):
        one = tf.nest.map_structure(lambda v, t=t: v[t : t + 1], inputs)
        alone = block(one, weights={k: v[t] for k, v in fast.items()}).numpy()
        np.testing.assert_allclose(together[t : t + 1], alone, atol=1e-5)


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="request_features"):
        SequenceMetaBlock(META, [])
    with pytest.raises(ValueError, match="multiple of"):
        SequenceMetaBlock(META, REQUEST, model_dim=7, num_heads=2)
    with pytest.raises(ValueError, match="adapt"):
        SequenceMetaBlock(META, REQUEST, adapt=("everything",))


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("mode", ["shared", "own"])
def test_model_trains_adapts_and_scores_through_the_sequence(
    synthetic_spec, synthetic_tasks, mode
):
    from tf_limaml import data

    spec = synthetic_spec
    tf.keras.utils.set_random_seed(0)
    block = SequenceMetaBlock(
        spec.meta_features,
        spec.request_features,
        units=(8, 4),
        model_dim=8,
        request_embedding=mode,
        name="meta_block",
    )
    model = LiMAMLModel(
        spec,
        MetaConfig(inner_steps=1, inner_lr=0.1),
        meta_block=block,
        global_units=[16],
        cross_layers=0,
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    batch = next(iter(data.task_dataset(synthetic_tasks["train"], spec, batch_tasks=8)))
    before = [v.numpy().copy() for v in block.trainable_variables]
    model.fit(tf.data.Dataset.from_tensors(batch).repeat(2), epochs=1, verbose=0)
    moved = [
        float(np.abs(v.numpy() - b).max())
        for v, b in zip(block.trainable_variables, before, strict=True)
    ]
    # The encoder and token weights learn from the outer loss.
    assert sum(m > 0 for m in moved) >= len(moved) - 2, moved
    emb_adapted = model.meta_embedding(batch).numpy()
    emb_amortized = model.meta_embedding(batch, steps=0).numpy()
    assert emb_adapted.shape == (8, 4) and np.all(np.isfinite(emb_adapted))
    assert np.abs(emb_adapted - emb_amortized).max() > 0
    # Padding: the embedding is the same with the support cut to its real rows
    # plus garbage, and a task with an empty support gets the static default.
    dirty = dict(batch)
    mask = batch["support_mask"].numpy()
    dirty["support_label"] = np.where(mask > 0, batch["support_label"].numpy(), 9.0)
    np.testing.assert_allclose(
        model.meta_embedding(dirty).numpy(), emb_adapted, atol=1e-5
    )
    if mode == "shared":
        # One set of request tables: the block reads the global block's.
        assert not block.row_embedding.weights


def test_shared_embedding_needs_the_library_global_block(synthetic_spec):
    spec = synthetic_spec

    class Ranker(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.out = tf.keras.layers.Dense(1)

        def call(self, features):
            return self.out(
                tf.concat(
                    [features["meta_embedding"], features["f0"][:, None]], axis=-1
                )
            )

    block = SequenceMetaBlock(
        spec.meta_features, spec.request_features, request_embedding="shared"
    )
    with pytest.raises(ValueError, match="request_embedding='own'"):
        LiMAMLModel(spec, meta_block=block, global_block=Ranker())


def test_public_name():
    assert tf_limaml.SequenceMetaBlock is SequenceMetaBlock


# ------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def sequence_export(synthetic_tasks, synthetic_spec, tmp_path_factory):
    from serving_fixture import SessionSignatures

    from tf_limaml import data, export

    spec = synthetic_spec
    tf.keras.utils.set_random_seed(0)
    block = SequenceMetaBlock(
        spec.meta_features,
        spec.request_features,
        units=(8, 4),
        model_dim=8,
        name="meta_block",
    )
    model = LiMAMLModel(
        spec,
        MetaConfig(inner_steps=1, inner_lr=0.3),
        meta_block=block,
        global_units=[16],
        cross_layers=0,
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    train = data.task_dataset(synthetic_tasks["train"], spec, 32, 16, 16)
    model.fit(train.take(3), epochs=1, verbose=0)
    base = str(tmp_path_factory.mktemp("sequence_export"))
    export_dir = export.export_model(model, base, max_support=16)
    return {"model": model, "base": base, "session": SessionSignatures(export_dir)}


def test_export_signatures_serve_the_sequence_model_like_keras(
    sequence_export, synthetic_tasks, synthetic_spec
):
    from serving_fixture import entity_inputs

    from tf_limaml import data

    spec, model = synthetic_spec, sequence_export["model"]
    session = sequence_export["session"]
    ds = data.task_dataset(synthetic_tasks["test"], spec, 1000, 16, 32)
    batch = {k: v.numpy() for k, v in next(iter(ds)).items()}
    embeddings = model.meta_embedding(batch).numpy()
    scores = model.predict_query(batch).numpy()
    inputs = {f.name: batch[f.name] for f in spec.meta_features}
    for key in ["support_label", "support_mask"] + [
        f"support_{f.name}" for f in spec.request_features
    ]:
        inputs[key] = batch[key]
    got = session.run("meta_embedding", inputs)["meta_embedding"]
    np.testing.assert_allclose(got, embeddings, atol=1e-5)
    # serving_default: stored d floats + request features = in-graph adaptation.
    mask = batch["query_mask"] > 0
    request = {f.name: batch[f"query_{f.name}"][mask] for f in spec.request_features}
    rows = np.repeat(embeddings, mask.sum(axis=1), axis=0)
    got = session.run("serving_default", {"meta_embedding": rows, **request})["score"]
    np.testing.assert_allclose(got, scores[mask], atol=1e-5)
    for i in range(5):
        meta, support, labels, query = entity_inputs(batch, spec, i)
        entity = dict(meta)
        entity.update({f"support_{k}": v for k, v in support.items()})
        entity.update({f"query_{k}": v for k, v in query.items()})
        entity["support_label"] = labels.astype(np.float32)
        out = session.run("adapt_and_predict", entity)
        np.testing.assert_allclose(out["meta_embedding"], embeddings[i], atol=1e-5)
        np.testing.assert_allclose(
            out["score"], scores[i, : len(out["score"])], atol=1e-5
        )


def test_limaml_embed_writes_the_sequence_embeddings(
    sequence_export, synthetic_tasks, synthetic_spec, tmp_path
):
    import glob
    import os

    from tf_limaml import cli, data

    output = str(tmp_path / "embeddings")
    argv = ["embed", "--export", sequence_export["base"]]
    argv += ["--tasks", synthetic_tasks["test"], "--output", output]
    assert cli.main(argv) == 0
    stored = {}
    for path in glob.glob(os.path.join(output, "embeddings-*.tfrecord.gz")):
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            feature = tf.train.Example.FromString(record.numpy()).features.feature
            stored[feature["entity_id"].bytes_list.value[0]] = np.array(
                feature["embedding"].float_list.value
            )
    ds = data.task_dataset(synthetic_tasks["test"], synthetic_spec, 1000, 16, 32)
    batch = {k: v.numpy() for k, v in next(iter(ds)).items()}
    expected = sequence_export["model"].meta_embedding(batch).numpy()
    assert len(stored) == len(batch["entity_id"])
    for entity, embedding in zip(batch["entity_id"], expected, strict=True):
        np.testing.assert_allclose(stored[entity], embedding, atol=1e-5)


def test_save_and_load_model_round_trips_the_sequence_block(
    sequence_export, synthetic_tasks, synthetic_spec, tmp_path
):
    from tf_limaml import data
    from tf_limaml.saving import load_model, save_model

    model = sequence_export["model"]
    save_model(model, str(tmp_path / "model"))
    loaded = load_model(str(tmp_path / "model"))
    assert isinstance(loaded.meta_block, SequenceMetaBlock)
    ds = data.task_dataset(synthetic_tasks["test"], synthetic_spec, 64, 16, 32)
    batch = next(iter(ds))
    np.testing.assert_allclose(
        loaded.meta_embedding(batch).numpy(),
        model.meta_embedding(batch).numpy(),
        atol=1e-6,
    )
