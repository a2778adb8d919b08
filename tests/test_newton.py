"""The embedding fit (`tf_limaml.newton`) and the model's use of it.

* The vectorized fit equals a per-task float64 reference written in numpy
  (central-difference Jacobians, an explicit Gauss-Newton loop).
* With enough steps it reaches the MAP: the objective's gradient vanishes.
* An entity with no support keeps the default exactly; the step grows with
  the support size n (the shrinkage is built in).
* Offline (embed, then score) equals in-graph (adapt and predict) to 1e-5,
  through the SavedModel's signatures too.
"""

import numpy as np
import pytest
import tensorflow as tf

from tf_limaml import newton
from tf_limaml.config import AdaptOptions, Architecture, ConfigError, MetaConfig
from tf_limaml.features import FeatureSpec
from tf_limaml.model import LiMAMLModel

T, S, D = 5, 7, 3


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, S, D))
    a = rng.normal(size=(D, D))
    labels = rng.integers(0, 2, size=(T, S)).astype(np.float64)
    mask = np.ones((T, S))
    mask[1, 4:] = 0.0
    mask[2, 1:] = 0.0
    mask[3] = 0.0
    embedding = rng.normal(size=(T, D)) * 0.3
    prior = np.array([0.5, 2.0, 1.0])
    return x, a, labels, mask, embedding, prior


def _logits_np(x, a, e):
    """A nonlinear logit in e: tanh(x A e) summed with the last dim as offset."""
    return np.tanh(np.einsum("sd,de,e->s", x, a, e)) + e[-1]


def _reference_fit(x, a, labels, mask, embedding, prior, steps):
    """Per task, float64, numeric Jacobians: an independent Gauss-Newton loop."""
    out = embedding.copy()
    for t in range(T):
        e0 = embedding[t].copy()
        e = e0.copy()
        for _ in range(steps):
            z = _logits_np(x[t], a, e)
            jac = np.zeros((S, D))
            for j in range(D):
                h = np.zeros(D)
                h[j] = 1e-6
                jac[:, j] = (
                    _logits_np(x[t], a, e + h) - _logits_np(x[t], a, e - h)
                ) / 2e-6
            p = 1.0 / (1.0 + np.exp(-z))
            g = jac.T @ (mask[t] * (p - labels[t])) + prior * (e - e0)
            h_mat = (jac * (mask[t] * p * (1 - p))[:, None]).T @ jac + np.diag(prior)
            e = e - np.linalg.solve(h_mat, g)
        out[t] = e
    return out


def _tf_fit(x, a, labels, mask, embedding, prior, steps, first_order=True):
    x, a = tf.constant(x), tf.constant(a)

    def support_logits(e):
        inner = tf.einsum("tsd,de,te->ts", x, a, e)
        return tf.tanh(inner) + e[:, -1:]

    return newton.fit_embedding(
        support_logits,
        tf.constant(embedding),
        tf.constant(labels),
        tf.constant(mask),
        tf.constant(prior),
        steps,
        first_order,
    )


@pytest.mark.parametrize("steps", [1, 3])
def test_fit_equals_a_per_task_float64_reference(steps):
    problem = _problem()
    got = _tf_fit(*problem, steps).numpy()
    expected = _reference_fit(*problem, steps)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # The fit moved every task with support (the comparison is not vacuous).
    moved = np.abs(got - problem[4]).max(axis=1)
    assert (moved[[0, 1, 2, 4]] > 1e-3).all()


def test_enough_steps_reach_the_map():
    """Logits linear in e: Gauss-Newton is Newton on a convex objective."""
    x, _, labels, mask, embedding, prior = _problem(1)

    def support_logits(e):
        return tf.einsum("tsd,td->ts", x, e)

    fitted = tf.Variable(
        newton.fit_embedding(
            support_logits, tf.constant(embedding), labels, mask, prior, 12
        )
    )
    with tf.GradientTape() as tape:
        objective = newton.support_objective(
            support_logits(fitted), labels, mask, fitted, embedding, prior
        )
        total = tf.reduce_sum(objective)
    gradient = tape.gradient(total, fitted).numpy()
    assert np.abs(gradient).max() < 1e-8
    # ... and the MAP is below the default on the objective.
    start = newton.support_objective(
        support_logits(tf.constant(embedding)),
        labels,
        mask,
        tf.constant(embedding),
        embedding,
        prior,
    )
    assert (objective.numpy() <= start.numpy() + 1e-12).all()
    assert (objective.numpy()[[0, 1, 2, 4]] < start.numpy()[[0, 1, 2, 4]]).all()


def test_no_support_keeps_the_default_exactly():
    problem = _problem()
    got = _tf_fit(*problem, 3).numpy()
    np.testing.assert_array_equal(got[3], problem[4][3])


def test_the_step_grows_with_the_support_size():
    """Offset-only logits: the same label rate moves n rows further than one."""
    sizes = [1, 3, 10, 100]
    width = max(sizes)
    mask = np.array([[1.0] * n + [0.0] * (width - n) for n in sizes])
    labels = np.ones_like(mask)
    fitted = newton.fit_embedding(
        lambda e: tf.broadcast_to(e[:, :1], [len(sizes), width]),
        tf.zeros([len(sizes), 1], tf.float64),
        tf.constant(labels),
        tf.constant(mask),
        tf.constant([4.0], tf.float64),
        steps=1,
    ).numpy()[:, 0]
    # One Newton step from 0: n * 0.5 / (n * 0.25 + 4).
    np.testing.assert_allclose(fitted, [n * 0.5 / (n * 0.25 + 4.0) for n in sizes])
    assert np.all(np.diff(fitted) > 0)


def test_first_order_gradients_reach_the_default_and_the_prior():
    x, a, labels, mask, embedding, prior = _problem()
    embedding = tf.Variable(embedding)
    prior = tf.Variable(prior)
    for first_order in (True, False):
        with tf.GradientTape() as tape:
            fitted = newton.fit_embedding(
                lambda e: tf.tanh(tf.einsum("tsd,de,te->ts", x, a, e)) + e[:, -1:],
                embedding,
                labels,
                mask,
                prior,
                2,
                first_order,
            )
            loss = tf.reduce_sum(tf.square(fitted))
        grads = tape.gradient(loss, [embedding, prior])
        assert all(g is not None and np.abs(g.numpy()).max() > 0 for g in grads)


def test_bad_steps_and_priors_are_refused():
    with pytest.raises(ValueError, match="steps"):
        newton.fit_embedding(lambda e: e, tf.zeros([1, 1]), [[1.0]], [[1.0]], 1.0, -1)
    with pytest.raises(ConfigError, match="embedding_prior"):
        MetaConfig(embedding_prior=0.0)
    with pytest.raises(ConfigError, match="embedding_steps"):
        AdaptOptions(embedding_steps=1.5)
    with pytest.raises(ConfigError, match="residual_dim"):
        Architecture(residual_dim=-1)


SPEC = FeatureSpec.from_dict(
    {
        "entity": "member",
        "time": "t",
        "label": "y",
        "meta_features": [{"name": "a", "type": "numeric", "normalize": False}],
        "request_features": [
            {"name": "r", "type": "numeric", "normalize": False},
            {"name": "q", "type": "numeric", "normalize": False},
        ],
    }
)
Q = 4


def _tasks(seed=0):
    rng = np.random.default_rng(seed)
    support_mask = np.ones((T, S), np.float32)
    support_mask[1, 3:] = 0.0
    support_mask[3] = 0.0
    return {
        "a": tf.constant(rng.normal(size=T), tf.float32),
        "support_r": tf.constant(rng.normal(size=(T, S)), tf.float32),
        "support_q": tf.constant(rng.normal(size=(T, S)), tf.float32),
        "support_label": tf.constant(rng.integers(0, 2, (T, S)), tf.float32),
        "support_mask": tf.constant(support_mask),
        "query_r": tf.constant(rng.normal(size=(T, Q)), tf.float32),
        "query_q": tf.constant(rng.normal(size=(T, Q)), tf.float32),
        "query_label": tf.constant(rng.integers(0, 2, (T, Q)), tf.float32),
        "query_mask": tf.ones((T, Q)),
    }


def _model(jit=False, **config):
    tf.keras.utils.set_random_seed(0)
    return LiMAMLModel(
        SPEC,
        MetaConfig(
            inner_lr=0.1,
            embedding_steps=2,
            embedding_prior=1.5,
            jit_compile=jit,
            **config,
        ),
        meta_units=[8, 4],
        global_units=[8],
        cross_layers=1,
        residual_dim=2,
    )


def _offline_scores(model, tasks, embeddings):
    rows = {name: tf.reshape(tasks[f"query_{name}"], [-1]) for name in ("r", "q")}
    per_row = np.repeat(embeddings, Q, axis=0)
    return model.score(tf.constant(per_row), rows).numpy().reshape(T, Q)


@pytest.mark.parametrize("inner_steps", [0, 1])
def test_offline_embed_then_score_equals_in_graph(inner_steps):
    model = _model(inner_steps=inner_steps)
    tasks = _tasks()
    embeddings = model.embed(tasks).numpy()
    in_graph = model.predict_query(tasks).numpy()
    np.testing.assert_allclose(
        _offline_scores(model, tasks, embeddings), in_graph, atol=1e-5
    )
    default = model.embed(tasks, AdaptOptions(inner_steps=0, embedding_steps=0))
    moved = np.abs(embeddings - default.numpy()).max(axis=1)
    assert (moved[[0, 1, 2, 4]] > 1e-4).all()
    # No support: the default, exactly (the entity's cold start).
    np.testing.assert_array_equal(embeddings[3], default.numpy()[3])


def test_the_offset_channel_is_added_to_the_logit():
    model = _model()
    tasks = _tasks()
    embeddings = model.embed(tasks).numpy()
    shifted = embeddings.copy()
    shifted[:, -1] += 0.7
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    np.testing.assert_allclose(
        logit(_offline_scores(model, tasks, shifted))
        - logit(_offline_scores(model, tasks, embeddings)),
        0.7,
        atol=1e-4,
    )


def test_meta_training_learns_the_prior_under_xla():
    model = _model(jit=True, inner_steps=1, learn_embedding_prior=True)
    start = model.embedding_prior().numpy()
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05))
    history = model.fit(
        tf.data.Dataset.from_tensors(_tasks()).repeat(4), epochs=2, verbose=0
    )
    assert model.uses_xla
    assert np.isfinite(history.history["loss"]).all()
    assert np.abs(model.embedding_prior().numpy() - start).max() > 1e-3


def test_saved_and_loaded_model_keeps_the_fit(tmp_path):
    from tf_limaml.saving import load_model, save_model

    model = _model(learn_embedding_prior=True)
    model.log_embedding_prior.assign(np.log([0.5, 1.0, 2.0]))
    tasks = _tasks()
    save_model(model, str(tmp_path / "m"))
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.meta_config.embedding_steps == 2
    np.testing.assert_allclose(
        loaded.predict_query(tasks).numpy(), model.predict_query(tasks).numpy()
    )


def test_the_residual_is_zero_by_default_and_only_it_is_fitted():
    model = _model()
    tasks = _tasks()
    assert model.meta_dim == 4 + 3 and model.fitted_dims == (4, 5, 6)
    default = model.embed(tasks, AdaptOptions(inner_steps=0, embedding_steps=0))
    np.testing.assert_array_equal(default.numpy()[:, 4:], 0.0)
    fitted = model.embed(tasks, AdaptOptions(inner_steps=0)).numpy()
    np.testing.assert_array_equal(fitted[:, :4], default.numpy()[:, :4])
    assert np.abs(fitted[:, 4:]).max() > 1e-3


def test_a_frozen_network_keeps_the_unadapted_model_exactly():
    model = _model(inner_steps=0, learn_embedding_prior=True)
    tasks = _tasks()
    before = model.predict_query(tasks, adapt=False).numpy()
    adapted_before = model.predict_query(tasks).numpy()
    model.freeze_network()
    trainable = {v.name for v in model.trainable_variables}
    assert any("residual/kernel" in n for n in trainable)
    assert any("embedding_prior" in n for n in trainable)
    assert not any("dense_0" in n or "cross" in n for n in trainable), trainable
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05))
    model.fit(tf.data.Dataset.from_tensors(tasks).repeat(4), epochs=2, verbose=0)
    np.testing.assert_array_equal(model.predict_query(tasks, adapt=False), before)
    # ... while what personalizes did learn.
    assert np.abs(model.predict_query(tasks).numpy() - adapted_before).max() > 1e-4


def test_second_order_meta_training_runs_the_fit_first_order_under_xla():
    """MAML's second order through the gradient step; the fit stays first order
    (forward-mode Jacobians have no second derivative inside XLA)."""
    model = _model(jit=True, inner_steps=1, first_order=False)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05))
    history = model.fit(
        tf.data.Dataset.from_tensors(_tasks()).repeat(2), epochs=1, verbose=0
    )
    assert model.uses_xla and np.isfinite(history.history["loss"]).all()


def check_affine_fit_equals_the_differentiated_fit(monkeypatch) -> None:
    """The one-pass fit (`GlobalBlock.fitted_logit_terms`) gives the embeddings
    and the outer gradients of the fit that differentiates the block."""
    from tf_limaml import blocks

    model = _model(inner_steps=1, learn_embedding_prior=True)
    tasks = _tasks()
    batch = model.encode(tasks)
    calls = []
    hook = blocks.GlobalBlockAdapter.fitted_logit_terms

    def counted(self, *args, **kwargs):
        terms = hook(self, *args, **kwargs)
        calls.append(terms is not None)
        return terms

    def fitted():
        with tf.GradientTape() as tape:
            fast, _ = model.inner_loop(batch, model.meta_config)
            embedding = model.adapted_embedding(batch, fast, model.meta_config)
            objective = tf.reduce_sum(tf.sin(embedding))
        return embedding, tape.gradient(objective, model.trainable_variables)

    with monkeypatch.context() as patch:
        patch.setattr(blocks.GlobalBlockAdapter, "fitted_logit_terms", counted)
        one_pass, one_pass_grads = fitted()
    assert calls == [True], calls
    with monkeypatch.context() as patch:
        patch.setattr(
            blocks.GlobalBlockAdapter, "fitted_logit_terms", lambda *a, **k: None
        )
        differentiated, differentiated_grads = fitted()
    np.testing.assert_allclose(one_pass, differentiated, rtol=1e-5, atol=1e-6)
    for variable, a, b in zip(
        model.trainable_variables, one_pass_grads, differentiated_grads, strict=True
    ):
        assert (a is None) == (b is None), variable.name
        if a is not None:
            np.testing.assert_allclose(
                tf.convert_to_tensor(a),
                tf.convert_to_tensor(b),
                rtol=1e-4,
                atol=1e-6,
                err_msg=variable.name,
            )


def test_the_residual_fit_in_one_pass_equals_the_differentiated_fit(monkeypatch):
    check_affine_fit_equals_the_differentiated_fit(monkeypatch)


def test_fitted_logit_terms_are_the_logit_and_its_jacobian():
    """The hook's affine form reproduces the block's logit at any residual."""
    model = _model()
    batch = model.encode(_tasks())
    embedding = model.embed(_tasks()).numpy()
    start = model.fitted_dims[0]
    block = model.global_block
    base, jacobian = block.fitted_logit_terms(tf.constant(embedding), batch.support)
    assert jacobian.shape == (T, S, model.meta_dim - start)
    rng = np.random.default_rng(1)
    moved = embedding.copy()
    moved[:, start:] = rng.normal(size=moved[:, start:].shape)
    want = block(tf.constant(moved), batch.support)
    got = base + tf.einsum("tsd,td->ts", jacobian, moved[:, start:])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_differentiating_the_fit_reaches_the_projection_through_the_fit():
    """differentiate_fit: the outer gradient of the residual's projection also
    flows through the fit's Jacobian (and meta-training runs under XLA)."""
    tasks = _tasks()

    def projection_gradient(model):
        batch = model.encode(tasks)
        kernel = next(v for v in model.trainable_variables if "residual" in v.name)
        with tf.GradientTape() as tape:
            logits = model.forward(batch, training=True)["query_logits"]
            loss = tf.reduce_sum(batch.query_mask * tf.square(logits))
        return tape.gradient(loss, kernel).numpy()

    first = projection_gradient(_model(inner_steps=0))
    second = projection_gradient(_model(inner_steps=0, differentiate_fit=True))
    assert np.abs(first - second).max() > 1e-4 * np.abs(first).max()
    model = _model(jit=True, inner_steps=0, differentiate_fit=True)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05))
    history = model.fit(tf.data.Dataset.from_tensors(tasks).repeat(3), verbose=0)
    assert model.uses_xla and np.isfinite(history.history["loss"]).all()


def test_export_warns_of_cold_start_embeddings_only_when_nothing_adapts(
    tmp_path, caplog
):
    from tf_limaml.export.saved_model import export_model

    model = _model(inner_steps=0)
    with caplog.at_level("WARNING", logger="tf_limaml.export.saved_model"):
        export_model(model, tmp_path / "fit", warmup_batch_sizes=(1,))
    assert "cold-start" not in caplog.text
    model.adapt_options = AdaptOptions(embedding_steps=0)
    with caplog.at_level("WARNING", logger="tf_limaml.export.saved_model"):
        export_model(model, tmp_path / "none", warmup_batch_sizes=(1,))
    assert "cold-start" in caplog.text


def test_differentiating_the_fit_without_the_affine_hook_is_refused(monkeypatch):
    from tf_limaml import blocks

    model = _model(inner_steps=0, differentiate_fit=True)
    monkeypatch.setattr(
        blocks.GlobalBlockAdapter, "fitted_logit_terms", lambda *a, **k: None
    )
    with pytest.raises(ValueError, match="differentiate_fit needs a global block"):
        model.forward(model.encode(_tasks()), training=True)
