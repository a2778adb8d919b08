"""Layers: functional cross vs TFRS, per-task weights, configs."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tf_limaml.layers import (
    FeatureEmbedding,
    FunctionalCross,
    GlobalBlock,
    MetaBlock,
    apply_dense,
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
    out = apply_dense(x, kernels, bias)
    for t in range(3):
        np.testing.assert_allclose(
            out[t].numpy(), (x[t] @ kernels[t] + bias[t]).numpy(), atol=1e-5
        )
    shared = apply_dense(x, kernels[0], bias[0])
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
