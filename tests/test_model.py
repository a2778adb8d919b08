"""LiMAMLModel: the inner loop's math, vectorization, padding, cold start, training."""

import numpy as np
import pytest
import tensorflow as tf

import tf_limaml
from tf_limaml import data, maml, step
from tf_limaml.config import AdaptOptions
from tf_limaml.features import FeatureSpec
from tf_limaml.model import LiMAMLModel, MetaConfig
from tf_limaml.saving import load_model, save_model

TINY_SPEC = FeatureSpec.from_dict(
    {
        "entity": "member",
        "time": "t",
        "label": "y",
        "meta_features": [{"name": "a", "type": "numeric", "normalize": False}],
        "request_features": [{"name": "r", "type": "numeric", "normalize": False}],
    }
)


def _tiny_model(inner_lr=0.1, **config):
    """e = a*w + b; logit = e + r (global weights fixed to ones, linear)."""
    model = LiMAMLModel(
        TINY_SPEC,
        MetaConfig(inner_lr=inner_lr, jit_compile=False, **config),
        meta_units=[1],
        global_units=[1],
        cross_layers=0,
        interaction="concat",
    )
    meta = model.meta_block.adaptable_weights()
    meta["dense_0/kernel"].assign([[0.5]])
    meta["dense_0/bias"].assign([0.0])
    glob = model.global_block.adaptable_weights()
    glob["dense_0/kernel"].assign([[1.0], [1.0]])
    glob["dense_0/bias"].assign([0.0])
    glob["logit/kernel"].assign([[1.0]])
    glob["logit/bias"].assign([0.0])
    model.global_block._activation = tf.keras.activations.linear
    return model


def test_hand_computed_inner_step():
    model = _tiny_model(inner_lr=0.1)
    tasks = {
        "a": tf.constant([2.0]),
        "support_r": tf.constant([[0.0, -1.0]]),
        "support_label": tf.constant([[1.0, 0.0]]),
        "support_mask": tf.constant([[1.0, 1.0]]),
    }
    fast = model.adapt(tasks, steps=1)
    # e = 2 * 0.5 = 1; logits = [1, 0]; errors sigma(logit) - y = [-0.2689414, 0.5];
    # mean = 0.1155293; dL/dw = 0.1155293 * a = 0.2310586, dL/db = 0.1155293.
    np.testing.assert_allclose(
        fast["meta_block/dense_0/kernel"].numpy().ravel(),
        [0.5 - 0.1 * 0.23105857],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        fast["meta_block/dense_0/bias"].numpy().ravel(), [-0.1 * 0.11552929], atol=1e-6
    )
    embedding = model.meta_embedding(tasks, steps=1).numpy().ravel()
    np.testing.assert_allclose(embedding, [2 * 0.47689414 - 0.01155293], atol=1e-6)
    # Global weights are not adapted in LiMAML mode.
    assert all(k.startswith("meta_block/") for k in fast)


def test_full_maml_adapts_global_block_too():
    model = _tiny_model(adapt="all")
    tasks = {
        "a": tf.constant([2.0]),
        "support_r": tf.constant([[0.0, -1.0]]),
        "support_label": tf.constant([[1.0, 0.0]]),
        "support_mask": tf.constant([[1.0, 1.0]]),
    }
    fast = model.adapt(tasks)
    # dL/d(logit bias) = mean error = 0.1155293.
    np.testing.assert_allclose(
        fast["global_block/logit/bias"].numpy().ravel(), [-0.1 * 0.11552929], atol=1e-6
    )


@pytest.fixture
def float64():
    tf.keras.backend.set_floatx("float64")
    yield
    tf.keras.backend.set_floatx("float32")


def _first_batch(paths, spec, tasks=8, support=16, query=16):
    return next(iter(data.task_dataset(paths["train"], spec, tasks, support, query)))


def test_second_order_gradient_matches_finite_differences(
    float64, synthetic_tasks, synthetic_spec
):
    tf.keras.utils.set_random_seed(1)
    model = LiMAMLModel(
        synthetic_spec,
        MetaConfig(inner_lr=0.5, inner_steps=2, jit_compile=False),
        meta_units=[6, 4],
        global_units=[8],
        cross_layers=1,
    )
    batch = _first_batch(synthetic_tasks, synthetic_spec, tasks=4, support=8, query=8)
    encoded = model.encode(batch)

    def loss(first_order=False):
        options = AdaptOptions(inner_steps=2, first_order=first_order)
        return model.forward(encoded, options, training=True)["loss"]

    variables = {
        "meta kernel": model.meta_block.adaptable_weights()["dense_0/kernel"],
        "meta bias": model.meta_block.adaptable_weights()["dense_1/bias"],
        "global kernel": model.global_block.adaptable_weights()["dense_0/kernel"],
    }
    for order in (False, True):
        with tf.GradientTape(persistent=True) as tape:
            value = loss(first_order=order)
        grads = {k: tape.gradient(value, v) for k, v in variables.items()}
        if not order:
            second = grads
        else:
            first = grads
    eps = 1e-6
    rng = np.random.default_rng(0)
    for name, variable in variables.items():
        flat = variable.numpy().ravel()
        for index in rng.choice(flat.size, size=min(3, flat.size), replace=False):
            original = variable.numpy()
            bumped = flat.copy()
            bumped[index] += eps
            variable.assign(bumped.reshape(original.shape))
            up = float(loss())
            bumped[index] -= 2 * eps
            variable.assign(bumped.reshape(original.shape))
            down = float(loss())
            variable.assign(original)
            numeric = (up - down) / (2 * eps)
            analytic = float(second[name].numpy().ravel()[index])
            assert abs(analytic - numeric) <= 1e-3 * max(abs(numeric), 1e-4), (
                name,
                index,
                analytic,
                numeric,
            )
    difference = max(
        float(tf.reduce_max(tf.abs(second[k] - first[k]))) for k in variables
    )
    scale = max(float(tf.reduce_max(tf.abs(second[k]))) for k in variables)
    assert (
        difference > 1e-3 * scale
    ), "first-order gradient should differ from second-order"


def test_vectorized_inner_loop_equals_per_task_steps(
    synthetic_tasks, synthetic_spec, small_model_kwargs
):
    tf.keras.utils.set_random_seed(2)
    model = LiMAMLModel(
        synthetic_spec,
        MetaConfig(inner_lr=0.3, inner_steps=2, jit_compile=False),
        **small_model_kwargs,
    )
    batch = _first_batch(synthetic_tasks, synthetic_spec, tasks=6)
    fast = model.adapt(batch)
    embeddings = model.meta_embedding(batch).numpy()
    scores = model.predict_query(batch).numpy()
    grads, _ = step.meta_gradients(model, model.encode(batch))
    per_task_grads = []
    for t in range(6):
        one = {k: v[t : t + 1] for k, v in batch.items()}
        fast_one = model.adapt(one)
        for name, value in fast_one.items():
            np.testing.assert_allclose(
                value.numpy()[0], fast[name].numpy()[t], atol=1e-5
            )
        np.testing.assert_allclose(
            model.meta_embedding(one).numpy()[0], embeddings[t], atol=1e-5
        )
        np.testing.assert_allclose(
            model.predict_query(one).numpy()[0], scores[t], atol=1e-5
        )
        per_task_grads.append(step.meta_gradients(model, model.encode(one))[0])
    # The outer loss is the mean of the tasks' query losses (all tasks have a query).
    for i, grad in enumerate(grads):
        mean = np.mean(
            [tf.convert_to_tensor(g[i]).numpy() for g in per_task_grads], axis=0
        )
        np.testing.assert_allclose(tf.convert_to_tensor(grad).numpy(), mean, atol=1e-5)


def test_padding_rows_change_nothing(
    synthetic_tasks, synthetic_spec, small_model_kwargs
):
    tf.keras.utils.set_random_seed(3)
    model = LiMAMLModel(
        synthetic_spec,
        MetaConfig(inner_lr=0.3, jit_compile=False),
        **small_model_kwargs,
    )
    tight = _first_batch(synthetic_tasks, synthetic_spec, tasks=8, support=40, query=40)
    padded = _first_batch(
        synthetic_tasks, synthetic_spec, tasks=8, support=64, query=64
    )
    # Fill padding rows with garbage: masked rows must not matter.
    garbage = dict(padded)
    mask = padded["support_mask"] > 0
    garbage["support_f0"] = tf.where(mask, padded["support_f0"], 1e3)
    garbage["support_label"] = tf.where(mask, padded["support_label"], 1.0)
    garbage["support_item_id"] = tf.where(mask, padded["support_item_id"], "junk")
    base = model.meta_embedding(tight).numpy()
    for batch in (padded, garbage):
        np.testing.assert_allclose(model.meta_embedding(batch).numpy(), base, atol=1e-5)
        np.testing.assert_allclose(
            model.predict_query(batch).numpy()[:, :40],
            model.predict_query(tight).numpy(),
            atol=1e-5,
        )


def test_empty_support_gives_the_unadapted_embedding(
    synthetic_tasks, synthetic_spec, small_model_kwargs
):
    model = LiMAMLModel(
        synthetic_spec,
        MetaConfig(inner_lr=0.3, inner_steps=3, jit_compile=False),
        **small_model_kwargs,
    )
    batch = dict(_first_batch(synthetic_tasks, synthetic_spec, tasks=4))
    batch["support_mask"] = tf.concat(
        [tf.zeros_like(batch["support_mask"][:2]), batch["support_mask"][2:]], axis=0
    )
    adapted = model.meta_embedding(batch).numpy()
    unadapted = model.meta_embedding(batch, steps=0).numpy()
    assert np.isfinite(adapted).all()
    np.testing.assert_allclose(adapted[:2], unadapted[:2], atol=1e-7)
    assert np.abs(adapted[2:] - unadapted[2:]).max() > 1e-4
    assert np.isfinite(model.predict_query(batch).numpy()).all()
    # A batch whose support has zero rows at all.
    empty = dict(batch)
    for key in [k for k in batch if k.startswith("support_")]:
        empty[key] = batch[key][:, :0]
    np.testing.assert_allclose(
        model.meta_embedding(empty).numpy(), unadapted, atol=1e-6
    )


def test_no_meta_features_uses_a_learned_constant(small_model_kwargs):
    spec = FeatureSpec.from_dict(
        {
            "entity": "e",
            "time": "t",
            "label": "y",
            "request_features": [{"name": "r", "type": "numeric", "normalize": False}],
        }
    )
    model = LiMAMLModel(spec, MetaConfig(jit_compile=False), **small_model_kwargs)
    tasks = {
        "entity_id": tf.constant(["a", "b"]),
        "support_r": tf.constant([[1.0, 2.0], [0.0, 0.0]]),
        "support_label": tf.constant([[1.0, 0.0], [0.0, 0.0]]),
        "support_mask": tf.constant([[1.0, 1.0], [0.0, 0.0]]),
    }
    embedding = model.meta_embedding(tasks).numpy()
    default = model.meta_embedding(tasks, steps=0).numpy()
    np.testing.assert_allclose(default[0], default[1])
    np.testing.assert_allclose(embedding[1], default[1], atol=1e-7)
    assert np.abs(embedding[0] - default[0]).max() > 0


@pytest.fixture(scope="module")
def trained_pair(synthetic_tasks, synthetic_spec):
    """LiMAML and the same network trained without adaptation, fixed seeds."""
    from tf_limaml import training

    models = {}
    for name, steps in (("limaml", 1), ("plain", 0)):
        model, _ = training.train(
            synthetic_tasks["train"],
            synthetic_spec,
            str(synthetic_tasks["spec"]).replace("spec.json", f"model_{name}"),
            MetaConfig(inner_steps=steps, inner_lr=0.5),
            epochs=6,
            learning_rate=3e-3,
            seed=0,
            verbose=0,
            model_kwargs={
                "meta_units": [32, 16],
                "global_units": [64, 32],
                "cross_layers": 1,
            },
        )
        models[name] = model
    return models


def test_meta_training_beats_the_unadapted_network(
    trained_pair, synthetic_tasks, synthetic_spec
):
    from tf_limaml import evaluation

    batches = list(
        data.task_dataset(synthetic_tasks["test"], synthetic_spec, 64, 32, 32)
    )
    limaml = evaluation.evaluate_model(trained_pair["limaml"], batches)
    plain = evaluation.evaluate_model(trained_pair["plain"], batches)
    assert limaml["adapted"]["auc"] >= plain["adapted"]["auc"] + 0.02, (limaml, plain)
    # Adaptation itself is what helps: the meta-learned default alone is worse.
    assert limaml["adapted"]["auc"] > limaml["unadapted"]["auc"]


def test_adaptation_lowers_support_loss_for_most_tasks(
    trained_pair, synthetic_tasks, synthetic_spec
):
    model = trained_pair["limaml"]
    lowered = total = 0
    for batch in data.task_dataset(synthetic_tasks["test"], synthetic_spec, 64, 32, 32):
        encoded = model.encode(batch)
        before = model.support_loss(
            encoded.support_label,
            model.logits(encoded, "support", None)[0],
            encoded.support_mask,
        )
        config = AdaptOptions(inner_steps=1, first_order=True).resolve(
            model.meta_config
        )
        fast, _ = model.inner_loop(encoded, config)
        after = model.support_loss(
            encoded.support_label,
            model.logits(encoded, "support", fast)[0],
            encoded.support_mask,
        )
        has_support = encoded.support_mask.numpy().sum(1) > 0
        lowered += int(np.sum((after.numpy() < before.numpy())[has_support]))
        total += int(has_support.sum())
    assert total > 0
    assert lowered / total >= 0.95, (lowered, total)


def test_config_round_trip_and_save_load(
    tmp_path, synthetic_tasks, synthetic_spec, small_model_kwargs
):
    model = LiMAMLModel(
        synthetic_spec,
        MetaConfig(inner_lr=0.2, learn_inner_lr=True, jit_compile=False),
        **small_model_kwargs,
    )
    config = model.get_config()
    clone = LiMAMLModel.from_config(config)
    assert clone.get_config() == config
    assert clone.meta_config == model.meta_config
    assert len(clone.trainable_variables) == len(model.trainable_variables)
    batch = _first_batch(synthetic_tasks, synthetic_spec)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    np.testing.assert_allclose(
        loaded.predict_query(batch).numpy(),
        model.predict_query(batch).numpy(),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        loaded.meta_embedding(batch).numpy(),
        model.meta_embedding(batch).numpy(),
        atol=1e-6,
    )


def test_learned_inner_rates_are_trained(
    synthetic_tasks, synthetic_spec, small_model_kwargs
):
    model = LiMAMLModel(
        synthetic_spec,
        MetaConfig(inner_lr=0.2, learn_inner_lr=True, jit_compile=False),
        **small_model_kwargs,
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    batch = _first_batch(synthetic_tasks, synthetic_spec)
    before = {k: v.numpy().copy() for k, v in model.inner_lrs.items()}
    logs = model.train_step(batch)
    assert set(logs) >= {
        "loss",
        "support_loss",
        "query_loss",
        "regularization_loss",
        "auc",
    }
    assert any(
        np.abs(model.inner_lrs[k].numpy() - v).max() > 0 for k, v in before.items()
    )


def test_xla_step_matches_eager_step(
    synthetic_tasks, synthetic_spec, small_model_kwargs
):
    batch = _first_batch(synthetic_tasks, synthetic_spec)
    results = []
    for jit in (True, False):
        tf.keras.utils.set_random_seed(5)
        model = LiMAMLModel(
            synthetic_spec,
            MetaConfig(inner_lr=0.3, jit_compile=jit),
            **small_model_kwargs,
        )
        grads, out = tf.function(
            lambda b, m=model: step.meta_gradients(m, b), jit_compile=jit
        )(model.encode(batch))
        results.append(
            (float(out["loss"]), [tf.convert_to_tensor(g).numpy() for g in grads])
        )
    assert abs(results[0][0] - results[1][0]) < 1e-5
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_meta_config_validation():
    with pytest.raises(ValueError, match="inner_steps"):
        MetaConfig(inner_steps=-1)
    with pytest.raises(ValueError, match="adapt"):
        MetaConfig(adapt="everything")
    with pytest.raises(ValueError, match="Unknown MetaConfig key 'inner_step'"):
        MetaConfig.from_dict({"inner_step": 2})
    assert tf_limaml.MetaConfig.from_dict({"inner_steps": 3}).inner_steps == 3


def test_support_prior_shrinks_the_inner_step():
    tasks = {
        "a": tf.constant([2.0]),
        "support_r": tf.constant([[0.0, -1.0]]),
        "support_label": tf.constant([[1.0, 0.0]]),
        "support_mask": tf.constant([[1.0, 1.0]]),
    }
    plain = _tiny_model(inner_lr=0.1).adapt(tasks)
    shrunk = _tiny_model(inner_lr=0.1, support_prior=2.0).adapt(tasks)
    # n = 2 support rows, c = 2: the step is n / (n + c) = 1/2 of the plain one.
    for name in plain:
        start = 0.5 if name.endswith("kernel") else 0.0
        np.testing.assert_allclose(
            shrunk[name].numpy() - start, 0.5 * (plain[name].numpy() - start), atol=1e-7
        )
    with pytest.raises(ValueError, match="support_prior"):
        MetaConfig(support_prior=-1.0)


TINY_TASKS = {
    "a": tf.constant([2.0]),
    "support_r": tf.constant([[0.0, -1.0]]),
    "support_label": tf.constant([[1.0, 0.0]]),
    "support_mask": tf.constant([[1.0, 1.0]]),
    "query_r": tf.constant([[0.5]]),
}


def test_per_call_overrides_equal_a_model_built_with_them():
    model = _tiny_model(inner_lr=0.1)
    for changes in ({"inner_lr": 0.3}, {"support_prior": 2.0}):
        built = _tiny_model(**{"inner_lr": 0.1, **changes})
        for name, value in built.adapt(TINY_TASKS).items():
            np.testing.assert_allclose(
                model.adapt(TINY_TASKS, **changes)[name].numpy(), value.numpy()
            )
        np.testing.assert_allclose(
            model.predict_query(TINY_TASKS, **changes).numpy(),
            built.predict_query(TINY_TASKS).numpy(),
        )
        np.testing.assert_allclose(
            model.meta_embedding(TINY_TASKS, **changes).numpy(),
            built.meta_embedding(TINY_TASKS).numpy(),
        )
    # The override is per call: the model's own config is untouched.
    assert model.meta_config.inner_lr == 0.1 and model.meta_config.support_prior == 0
    np.testing.assert_allclose(
        model.predict_query(TINY_TASKS).numpy(),
        _tiny_model(inner_lr=0.1).predict_query(TINY_TASKS).numpy(),
    )
    with pytest.raises(ValueError, match="inner_lr"):
        model.adapt(TINY_TASKS, inner_lr=-1.0)


def test_assigning_adapt_options_retraces_and_keeps_the_trained_config():
    model = _tiny_model(inner_lr=0.1)
    before = model.predict_query(TINY_TASKS).numpy()
    model.adapt_options = AdaptOptions(inner_lr=0.3)
    np.testing.assert_allclose(
        model.predict_query(TINY_TASKS).numpy(),
        _tiny_model(inner_lr=0.3).predict_query(TINY_TASKS).numpy(),
    )
    assert np.abs(model.predict_query(TINY_TASKS).numpy() - before).max() > 1e-4
    # The trained config is not touched, and both are saved, each by its name.
    assert model.meta_config.inner_lr == 0.1
    config = model.get_config()
    assert config["meta_config"]["inner_lr"] == 0.1
    assert config["adapt_options"]["inner_lr"] == 0.3
    assert LiMAMLModel.from_config(config).adapt_options == model.adapt_options
    with pytest.raises(AttributeError):
        model.meta_config = MetaConfig(inner_lr=0.3)


class _HookedModel(LiMAMLModel):
    """Changes the inner loop through the public hooks only."""

    def adaptable_variables(self):
        return {k: v for k, v in super().adaptable_variables().items() if "bias" in k}

    def inner_lr(self, name, config=None):
        return 2.0 * super().inner_lr(name, config)

    def support_loss(self, labels, logits, mask, config=None):
        # A sum over rows instead of a mean: the step scales with n.
        n = tf.reduce_sum(mask, axis=-1)
        return super().support_loss(labels, logits, mask, config) * n


def test_public_hooks_change_the_inner_loop():
    model = _HookedModel(
        TINY_SPEC,
        MetaConfig(inner_lr=0.1, jit_compile=False),
        meta_units=[1],
        global_units=[1],
        cross_layers=0,
        interaction="concat",
    )
    plain = _tiny_model(inner_lr=0.1)
    model.set_weights(plain.get_weights())
    model.global_block._activation = tf.keras.activations.linear
    fast = model.adapt(TINY_TASKS)
    assert list(fast) == ["meta_block/dense_0/bias"]
    # Twice the rate on twice the loss (n = 2 rows): 4 times the plain step.
    np.testing.assert_allclose(
        fast["meta_block/dense_0/bias"].numpy().ravel(),
        4 * plain.adapt(TINY_TASKS)["meta_block/dense_0/bias"].numpy().ravel(),
        atol=1e-7,
    )


def test_l2_regularization_loss_by_hand():
    """l2 * sum(kernel^2) over the blocks' kernels, through `model.losses`."""
    model = LiMAMLModel(
        TINY_SPEC,
        MetaConfig(inner_lr=0.1, jit_compile=False),
        meta_units=[1],
        global_units=[1],
        cross_layers=0,
        interaction="concat",
        l2=0.01,
    )
    meta = model.meta_block.adaptable_weights()
    meta["dense_0/kernel"].assign([[0.5]])
    glob = model.global_block.adaptable_weights()
    glob["dense_0/kernel"].assign([[1.0], [2.0]])
    glob["logit/kernel"].assign([[-3.0]])
    # 0.01 * (0.25 + 1 + 4 + 9); biases are not regularized.
    expected = 0.01 * 14.25
    assert len(model.losses) == 3
    np.testing.assert_allclose(float(tf.add_n(model.losses)), expected, rtol=1e-6)
    tasks = {
        "a": tf.constant([2.0]),
        "support_r": tf.constant([[0.0, -1.0]]),
        "support_label": tf.constant([[1.0, 0.0]]),
        "support_mask": tf.constant([[1.0, 1.0]]),
        "query_r": tf.constant([[1.0]]),
        "query_label": tf.constant([[1.0]]),
        "query_mask": tf.constant([[1.0]]),
    }
    out = model.forward(model.encode(tasks), AdaptOptions(inner_steps=1), training=True)
    np.testing.assert_allclose(float(out["regularization_loss"]), expected, rtol=1e-6)
    np.testing.assert_allclose(
        float(out["loss"]), float(out["query_loss"]) + expected, rtol=1e-6
    )
    # The penalty's gradient reaches the variables: 2 * l2 * kernel.
    with tf.GradientTape() as tape:
        out = model.forward(
            model.encode(tasks), AdaptOptions(inner_steps=0), training=True
        )
        loss = out["regularization_loss"]
    np.testing.assert_allclose(
        tape.gradient(loss, glob["logit/kernel"]).numpy(), [[-0.06]], rtol=1e-6
    )
    assert model.get_config()["l2"] == 0.01
    assert LiMAMLModel.from_config(model.get_config()).l2 == 0.01


class _PerWeightRates(LiMAMLModel):
    """The same rates as tensors of each weight's shape: the tiled inner loop."""

    def inner_lr(self, name, config=None):
        rate = super().inner_lr(name, config)
        return tf.fill(self.adaptable_variables()[name].shape, rate)


@pytest.mark.parametrize("adapt", ["meta_block", "all"])
def test_dense_only_inner_loop_equals_the_tiled_one(
    synthetic_tasks, synthetic_spec, small_model_kwargs, adapt
):
    batch = _first_batch(synthetic_tasks, synthetic_spec, tasks=6)
    results = []
    for cls in (LiMAMLModel, _PerWeightRates):
        tf.keras.utils.set_random_seed(4)
        model = cls(
            synthetic_spec,
            MetaConfig(inner_lr=0.3, inner_steps=2, adapt=adapt, jit_compile=False),
            **small_model_kwargs,
        )
        # The dense-only inner loop keeps its kernels factored.
        fast, _ = model.inner_loop(model.encode(batch), model.meta_config)
        dense_only = any(isinstance(v, maml.LowRankKernel) for v in fast.values())
        assert dense_only == (cls is LiMAMLModel)
        grads, out = step.meta_gradients(model, model.encode(batch))
        results.append((model.adapt(batch), out, grads))
    (fast, out, grads), (fast_t, out_t, grads_t) = results
    assert set(fast) == set(fast_t)
    for name in fast:
        np.testing.assert_allclose(fast[name].numpy(), fast_t[name].numpy(), atol=1e-5)
    np.testing.assert_allclose(float(out["loss"]), float(out_t["loss"]), atol=1e-6)
    for a, b in zip(grads, grads_t, strict=True):
        np.testing.assert_allclose(
            tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(), atol=1e-5
        )


def test_numeric_only_step_encodes_inside_the_compiled_step():
    """With no string feature, the raw batch enters the compiled step."""
    rng = np.random.default_rng(0)
    batch = {
        "entity_id": tf.constant(["m1", "m2", "m3"]),
        "a": tf.constant(rng.normal(size=3), tf.float32),
    }
    for part in ("support", "query"):
        batch[f"{part}_r"] = tf.constant(rng.normal(size=(3, 4)), tf.float32)
        batch[f"{part}_label"] = tf.constant(rng.integers(0, 2, (3, 4)), tf.float32)
        batch[f"{part}_mask"] = tf.ones((3, 4))
    weights = []
    for inside in (True, False):
        tf.keras.utils.set_random_seed(6)
        model = LiMAMLModel(
            TINY_SPEC, MetaConfig(inner_lr=0.2), meta_units=[4, 2], global_units=[4]
        )
        assert model.encode_compiles
        model.encode_compiles = inside
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
        logs = model.train_step(batch)
        weights.append([v.numpy() for v in model.trainable_variables] + [logs])
    for a, b in zip(weights[0][:-1], weights[1][:-1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for name, value in weights[0][-1].items():
        np.testing.assert_allclose(float(value), float(weights[1][-1][name]), atol=1e-6)


def test_train_function_follows_each_new_iterator(synthetic_tasks, synthetic_spec):
    tf.keras.utils.set_random_seed(7)
    model = LiMAMLModel(
        synthetic_spec, MetaConfig(jit_compile=False), meta_units=[4], global_units=[4]
    )
    model.compile(optimizer=tf.keras.optimizers.SGD(0.0))
    train_function = model.make_train_function()
    assert model.make_train_function() is train_function
    dataset = data.task_dataset(synthetic_tasks["train"], synthetic_spec, 4, 8, 8)
    first, second = list(dataset.take(2))
    losses = []
    for batch in (first, second, first):
        model.reset_metrics()
        iterator = iter(tf.data.Dataset.from_tensors(batch))
        losses.append(float(train_function(iterator)["loss"]))
    assert losses[0] != losses[1] and losses[0] == pytest.approx(losses[2], abs=1e-6)
    history = model.fit(dataset.take(2), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2


def test_train_function_flat_call_matches_the_structured_call(
    synthetic_tasks, synthetic_spec, monkeypatch
):
    # IteratorDispatch calls the concrete function flat; without the flat
    # inputs (another TensorFlow) it calls it as usual. Same steps either way.
    from tf_limaml import step  # noqa: PLC0415

    dataset = data.task_dataset(synthetic_tasks["train"], synthetic_spec, 4, 8, 8)
    batch = next(iter(dataset))
    runs = []
    for flat in (True, False):
        if not flat:
            monkeypatch.setattr(step, "_flat_inputs", lambda concrete, iterator: None)
        tf.keras.utils.set_random_seed(3)
        model = LiMAMLModel(synthetic_spec, meta_units=[4], global_units=[4])
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
        train_function = model.make_train_function()
        iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
        losses = [float(train_function(iterator)["loss"]) for _ in range(3)]
        assert (train_function._flat_inputs is not None) == flat
        runs.append((losses, [v.numpy() for v in model.trainable_variables]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: tf.keras.optimizers.Adam(0.1),
        lambda: tf.keras.optimizers.SGD(0.1, momentum=0.9),
        lambda: tf.keras.optimizers.Adagrad(0.1),
    ],
    ids=["adam", "momentum", "adagrad"],
)
def test_dense_table_gradients_update_as_the_sparse_ones(
    synthetic_tasks, synthetic_spec, small_model_kwargs, optimizer
):
    """The compiled step applies a table's gradient dense: the same update."""
    batch = _first_batch(synthetic_tasks, synthetic_spec, tasks=4)
    tables = []
    for dense in (False, True):
        tf.keras.utils.set_random_seed(8)
        model = LiMAMLModel(
            synthetic_spec, MetaConfig(jit_compile=True), **small_model_kwargs
        )
        model.compile(optimizer=optimizer())
        for _ in range(2):
            grads, out = step.meta_gradients(model, model.encode(batch))
            assert any(isinstance(g, tf.IndexedSlices) for g in grads)
            if dense:
                grads = step.densify_small_tables(model, grads)
                assert not any(isinstance(g, tf.IndexedSlices) for g in grads)
            step.apply_gradients(model, grads, out["finite"])
        tables.append([v.numpy() for v in model.trainable_variables])
    for sparse, dense in zip(*tables, strict=True):
        np.testing.assert_allclose(dense, sparse, atol=1e-6)


@pytest.mark.parametrize("learn_inner_lr", [False, True])
def test_adapted_input_embeddings_move_looked_up_rows_only(
    synthetic_tasks, synthetic_spec, small_model_kwargs, learn_inner_lr
):
    """`adapt_embeddings=True`: the looked-up meta-feature rows adapt per task
    (`MetaBlockAdapter.input_embeddings`), the numeric inputs keep a zero rate
    (`input_rates`)."""
    from tf_limaml.blocks import META_INPUTS

    model = LiMAMLModel(
        synthetic_spec,
        MetaConfig(
            inner_lr=0.5,
            inner_steps=1,
            adapt_embeddings=True,
            learn_inner_lr=learn_inner_lr,
            jit_compile=False,
        ),
        **small_model_kwargs,
    )
    batch = _first_batch(synthetic_tasks, synthetic_spec, tasks=4)
    adapted = model.adapt(batch)[META_INPUTS].numpy()
    start = model.meta_block.embed_inputs(
        model.encode(batch).meta, tf.constant(4)
    ).numpy()
    mask = model.meta_block.embedding_input_mask().numpy()
    assert adapted.shape == start.shape and 0 < mask.sum() < mask.size
    moved = np.abs(adapted - start).max(axis=0)
    assert moved[mask == 1].max() > 1e-4
    np.testing.assert_array_equal(moved[mask == 0], 0.0)
