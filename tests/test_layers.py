"""Layers: functional cross vs TFRS, per-task weights, configs."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tf_limaml import maml
from tf_limaml.layers import (
    PACKED_NUMERIC_KEY,
    FeatureEmbedding,
    FunctionalCross,
    GlobalBlock,
    MetaBlock,
)

FEATURES = [
    {"name": "n", "type": "numeric", "mean": 1.0, "std": 2.0},
    {"name": "c", "type": "categorical", "vocabulary": ["a", "b"], "dim": 3},
    {"name": "m", "type": "multi_hot", "hash_buckets": 7, "dim": 2, "max_values": 3},
]


@pytest.mark.parametrize("projection_dim", [None, 3])
def test_functional_cross_equals_tfrs_cross(projection_dim):
    x0 = tf.random.stateless_normal([5, 6], seed=[1, 2])
    x = tf.random.stateless_normal([5, 6], seed=[3, 4])
    reference = tfrs.layers.dcn.Cross(projection_dim=projection_dim)
    expected = reference(x0, x)
    ours = FunctionalCross(projection_dim=projection_dim)
    ours.build(x0.shape)
    if projection_dim is None:
        weights = {"kernel": reference._dense.kernel, "bias": reference._dense.bias}
    else:
        weights = {
            "kernel_u": reference._dense_u.kernel,
            "kernel_v": reference._dense_v.kernel,
            "bias": reference._dense_v.bias,
        }
    np.testing.assert_allclose(
        ours(x0, x, weights=weights).numpy(), expected.numpy(), atol=1e-6
    )
    # Variables set to the same values give the same output as passing them in.
    for name, value in weights.items():
        getattr(ours, name).assign(value)
    np.testing.assert_allclose(ours(x0, x).numpy(), expected.numpy(), atol=1e-6)


def test_per_task_weights_run_one_weight_set_per_task():
    x = tf.random.stateless_normal([3, 4, 2], seed=[0, 1])
    kernels = tf.random.stateless_normal([3, 2, 5], seed=[2, 3])
    bias = tf.random.stateless_normal([3, 5], seed=[4, 5])
    out = maml.dense(x, kernels, bias)
    for t in range(3):
        np.testing.assert_allclose(
            out[t].numpy(), (x[t] @ kernels[t] + bias[t]).numpy(), atol=1e-5
        )
    shared = maml.dense(x, kernels[0], bias[0])
    np.testing.assert_allclose(
        shared[1].numpy(), (x[1] @ kernels[0] + bias[0]).numpy(), atol=1e-5
    )


def test_feature_embedding_encodes_and_embeds():
    layer = FeatureEmbedding(FEATURES)
    raw = {
        "n": tf.constant([3.0, 1.0]),
        "c": tf.constant(["b", "zzz"]),
        "m": tf.constant([["p", "q", ""], ["", "", ""]]),
    }
    encoded = layer.encode(raw)
    np.testing.assert_allclose(encoded["n"].numpy(), [1.0, 0.0])
    assert encoded["c"].numpy().tolist() == [2, 0]  # "b" -> 2, unknown -> OOV 0
    assert encoded["m"].numpy()[1].tolist() == [-1, -1, -1]
    out = layer(encoded)
    assert out.shape == (2, 1 + 3 + 2) and layer.output_dim == 6
    table = layer.tables["m"].numpy()
    ids = encoded["m"].numpy()[0, :2]
    np.testing.assert_allclose(out.numpy()[0, 4:], table[ids].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(out.numpy()[1, 4:], [0.0, 0.0])


def test_blocks_accept_fast_weights_and_round_trip_config():
    meta = MetaBlock(FEATURES, units=(4, 3))
    meta.build(None)
    encoded = meta.encode(
        {
            "n": tf.constant([1.0, 2.0]),
            "c": tf.constant(["a", "b"]),
            "m": tf.constant([["p", "", ""], ["q", "", ""]]),
        }
    )
    base = meta(encoded)
    fast = {
        k: tf.tile(v[None], [2] + [1] * v.shape.rank)
        for k, v in meta.adaptable_weights().items()
    }
    np.testing.assert_allclose(
        meta(encoded, weights=fast).numpy(), base.numpy(), atol=1e-6
    )
    fast["dense_1/bias"] = fast["dense_1/bias"] + tf.constant([[1.0, 0, 0], [0, 0, 0]])
    moved = meta(encoded, weights=fast).numpy()
    np.testing.assert_allclose(moved[0] - base.numpy()[0], [1.0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(moved[1], base.numpy()[1], atol=1e-6)
    clone = MetaBlock.from_config(meta.get_config())
    assert clone.get_config() == meta.get_config()

    block = GlobalBlock(FEATURES, meta_dim=3, cross_layers=2, units=(8,))
    block.build(None)
    clone = GlobalBlock.from_config(block.get_config())
    assert clone.get_config() == block.get_config()
    request = block.encode(
        {"n": tf.ones([2, 5]), "c": tf.fill([2, 5], "a"), "m": tf.fill([2, 5, 3], "p")}
    )
    logits = block(base, request)
    assert logits.shape == (2, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"units": []}, "units"),
        ({"units": [4, 0]}, "units"),
        ({"constant_input_dim": 0}, "constant_input_dim"),
    ],
)
def test_meta_block_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetaBlock(FEATURES, **kwargs)


def test_global_block_rejects_bad_arguments():
    with pytest.raises(ValueError, match="interaction"):
        GlobalBlock(FEATURES, meta_dim=3, interaction="dot")
    with pytest.raises(ValueError, match="meta_dim"):
        GlobalBlock(FEATURES, meta_dim=0)
    with pytest.raises(ValueError, match="projection_dim"):
        FunctionalCross(projection_dim=-1)


def test_layers_take_keras_weight_arguments_and_serialize_them():
    regularizer = tf.keras.regularizers.L2(0.1)
    meta = MetaBlock(
        FEATURES,
        units=(4, 3),
        kernel_initializer="ones",
        bias_initializer=tf.keras.initializers.Constant(0.5),
        kernel_regularizer=regularizer,
        embeddings_initializer="zeros",
        embeddings_regularizer="l1",
    )
    meta.build(None)
    weights = meta.adaptable_weights()
    np.testing.assert_array_equal(weights["dense_0/kernel"].numpy(), 1.0)
    np.testing.assert_array_equal(weights["dense_1/bias"].numpy(), 0.5)
    np.testing.assert_array_equal(meta.embedding.tables["c"].numpy(), 0.0)
    # Two kernels (L2) and two tables (L1); none on biases.
    assert len(meta.losses) == 4
    kernels = sum(
        float(tf.reduce_sum(weights[f"dense_{i}/kernel"] ** 2)) for i in range(2)
    )
    l2_losses = [float(x) for x in meta.losses if float(x) > 0]
    np.testing.assert_allclose(sum(l2_losses), 0.1 * kernels, rtol=1e-6)
    clone = MetaBlock.from_config(meta.get_config())
    assert clone.get_config() == meta.get_config()
    assert clone.get_config()["kernel_regularizer"]["config"]["l2"] == pytest.approx(
        0.1
    )

    block = GlobalBlock(
        FEATURES,
        meta_dim=3,
        cross_layers=1,
        projection_dim=2,
        units=(8,),
        kernel_initializer=tf.keras.initializers.GlorotNormal(seed=1),
        kernel_regularizer=regularizer,
    )
    block.build(None)
    # Every dense and cross kernel is regularized: interaction, cross U and V,
    # dense_0 and logit.
    assert len(block.losses) == 5
    clone = GlobalBlock.from_config(block.get_config())
    clone.build(None)
    assert clone.get_config() == block.get_config()
    # A seeded initializer repeats its values for equal shapes, as in Keras.
    np.testing.assert_array_equal(
        clone.adaptable_weights()["dense_0/kernel"].numpy(),
        block.adaptable_weights()["dense_0/kernel"].numpy(),
    )

    cross = FunctionalCross(kernel_initializer="ones", kernel_regularizer="l2")
    cross.build((None, 4))
    np.testing.assert_array_equal(cross.kernel.numpy(), 1.0)
    np.testing.assert_allclose(float(cross.losses[0]), 0.01 * 16, rtol=1e-6)
    assert FunctionalCross.from_config(cross.get_config()).get_config() == (
        cross.get_config()
    )

    embedding = FeatureEmbedding(FEATURES, embeddings_initializer="ones")
    embedding.build(None)
    np.testing.assert_array_equal(embedding.tables["m"].numpy(), 1.0)
    assert not embedding.losses
    assert FeatureEmbedding.from_config(embedding.get_config()).get_config() == (
        embedding.get_config()
    )


def test_unseeded_initializers_draw_each_weight_afresh():
    block = GlobalBlock(FEATURES, meta_dim=3, cross_layers=0, units=(6, 6))
    block.build(None)
    weights = block.adaptable_weights()
    assert not np.allclose(
        weights["dense_1/kernel"].numpy(), weights["dense_0/kernel"].numpy()[:6]
    )


def test_packed_numeric_features_embed_as_one_entry_each():
    features = [
        {"name": "p", "type": "numeric", "mean": 0.5, "std": 2.0, "clip": 1.0},
        {"name": "c", "type": "categorical", "vocabulary": ["a", "b"], "dim": 3},
        {"name": "v", "type": "numeric", "shape": [2], "mean": [1.0, -1.0], "std": 2},
        {"name": "l", "type": "numeric", "transform": "log1p", "mean": 1, "std": 1},
        {"name": "r", "type": "numeric", "normalize": False},
    ]
    layer = FeatureEmbedding(features)
    raw = {
        "p": tf.constant([[0.0, 9.0]]),
        "c": tf.constant([["b", "a"]]),
        "v": tf.constant([[[3.0, 3.0], [1.0, -1.0]]]),
        "l": tf.constant([[np.e - 1.0, 0.0]]),
        "r": tf.constant([[5.0, 6.0]]),
    }
    encoded = layer.encode(raw)
    packed = layer.encode(raw, pack_numeric=True)
    assert set(packed) == {PACKED_NUMERIC_KEY, "c"}
    # Columns in feature order: p, v (2), l, r.
    np.testing.assert_allclose(
        packed[PACKED_NUMERIC_KEY].numpy()[0],
        [[-0.25, 1.0, 2.0, 0.0, 5.0], [1.0, 0.0, 0.0, -1.0, 6.0]],
        atol=1e-6,
    )
    expected = tf.concat(
        [encoded["p"][..., None], encoded["v"], encoded["l"][..., None]], axis=-1
    )
    np.testing.assert_allclose(
        packed[PACKED_NUMERIC_KEY].numpy()[..., :4], expected.numpy(), atol=1e-6
    )
    np.testing.assert_allclose(layer(packed).numpy(), layer(encoded).numpy(), atol=1e-6)


@pytest.mark.parametrize("interaction", ["concat", "product"])
def test_global_block_without_crosses_matches_the_concatenated_input(interaction):
    block = GlobalBlock(
        FEATURES, meta_dim=3, interaction=interaction, cross_layers=0, units=(5,)
    )
    block.build(None)
    request = block.encode(
        {
            "n": tf.constant([[1.0, 2.0, 3.0]]),
            "c": tf.constant([["a", "b", "x"]]),
            "m": tf.constant([[["p", "q", ""], ["q", "", ""], ["", "", ""]]]),
        }
    )
    embedding = tf.constant([[0.3, -0.2, 0.5]])
    w = {k: v.numpy() for k, v in block.adaptable_weights().items()}
    rows = block.embedding(request).numpy()[0]  # [3, 6]
    e = np.repeat(embedding.numpy(), 3, axis=0)
    parts = [e, rows]
    if interaction == "product":
        parts.append(e * (rows @ w["interaction/kernel"] + w["interaction/bias"]))
    hidden = np.maximum(
        np.concatenate(parts, axis=-1) @ w["dense_0/kernel"] + w["dense_0/bias"], 0
    )
    expected = (hidden @ w["logit/kernel"] + w["logit/bias"])[:, 0]
    np.testing.assert_allclose(
        block(embedding, request).numpy()[0], expected, atol=1e-5
    )
    # Rows with their own embedding (the serving form) give the same scores.
    flat = {k: v[0] for k, v in request.items()}
    np.testing.assert_allclose(block(tf.constant(e), flat).numpy(), expected, atol=1e-5)
