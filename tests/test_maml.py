"""tf_limaml.maml: the functional core against an unvectorized reference."""

import numpy as np
import pytest
import tensorflow as tf

from tf_limaml import maml

TASKS, SUPPORT, QUERY, INPUTS, HIDDEN = 5, 6, 4, 3, 4
EMPTY = 3  # the task with no support row
LR = 0.4
STEPS = 2


def _tasks(seed=0):
    """Support and query rows of TASKS tasks, support sizes 6, 4, 1, 0 and 5."""
    rng = np.random.default_rng(seed)
    sizes = [6, 4, 1, 0, 5]
    return {
        "support_x": rng.normal(size=(TASKS, SUPPORT, INPUTS)),
        "support_y": rng.integers(0, 2, size=(TASKS, SUPPORT)).astype(float),
        "support_mask": np.array([[1.0] * n + [0.0] * (SUPPORT - n) for n in sizes]),
        "query_x": rng.normal(size=(TASKS, QUERY, INPUTS)),
        "query_y": rng.integers(0, 2, size=(TASKS, QUERY)).astype(float),
    }


def _initial_params(seed=1):
    rng = np.random.default_rng(seed)
    return {
        "dense_0/kernel": rng.normal(size=(INPUTS, HIDDEN)),
        "dense_0/bias": rng.normal(size=(HIDDEN,)) * 0.1,
        "dense_1/kernel": rng.normal(size=(HIDDEN, 1)),
        "dense_1/bias": np.array([0.1]),
    }


def _mlp(x, params):
    """A plain MLP; with per-task params x is [T, N, in], else [N, in]."""
    hidden = tf.tanh(maml.dense(x, params["dense_0/kernel"], params["dense_0/bias"]))
    return maml.dense(hidden, params["dense_1/kernel"], params["dense_1/bias"])[..., 0]


def _masked_mean_bce(labels, logits, mask):
    losses = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    return tf.reduce_sum(losses * mask, -1) / tf.maximum(tf.reduce_sum(mask, -1), 1)


def _vectorized(params, tasks, first_order, lr=LR, steps=STEPS):
    """Meta-gradient of the mean query loss, all tasks at once with maml.*."""
    t = {k: tf.constant(v, params["dense_0/kernel"].dtype) for k, v in tasks.items()}

    def support_loss(fast):
        logits = _mlp(t["support_x"], fast)
        return _masked_mean_bce(t["support_y"], logits, t["support_mask"])

    with tf.GradientTape() as tape:
        fast = maml.tile(params, TASKS)
        fast, _ = maml.adapt(support_loss, fast, steps, lr, first_order)
        query = tf.reduce_mean(
            _masked_mean_bce(
                t["query_y"], _mlp(t["query_x"], fast), tf.ones_like(t["query_y"])
            )
        )
    grads = tape.gradient(query, params)
    return {k: g.numpy() for k, g in grads.items()}, float(query)


def _reference(params, tasks, first_order, lr=LR, steps=STEPS):
    """The same meta-gradient, one task at a time, nested tapes, float64."""
    params = {k: tf.constant(v, tf.float64) for k, v in params.items()}
    with tf.GradientTape() as outer:
        outer.watch(list(params.values()))
        total = tf.constant(0.0, tf.float64)
        for i in range(TASKS):
            fast = dict(params)
            x = tf.constant(tasks["support_x"][i], tf.float64)
            y = tf.constant(tasks["support_y"][i], tf.float64)
            mask = tf.constant(tasks["support_mask"][i], tf.float64)
            for _ in range(steps):
                with tf.GradientTape() as inner:
                    inner.watch(list(fast.values()))
                    loss = _masked_mean_bce(y, _mlp(x, fast), mask)
                grads = inner.gradient(loss, fast)
                if first_order:
                    grads = {k: tf.stop_gradient(g) for k, g in grads.items()}
                fast = {k: fast[k] - lr * grads[k] for k in fast}
            qx = tf.constant(tasks["query_x"][i], tf.float64)
            qy = tf.constant(tasks["query_y"][i], tf.float64)
            total += _masked_mean_bce(qy, _mlp(qx, fast), tf.ones_like(qy))
        query = total / TASKS
    grads = outer.gradient(query, params)
    return {k: g.numpy() for k, g in grads.items()}, float(query)


def _max_abs_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_meta_gradient_equals_the_per_task_float64_reference(first_order):
    tasks = _tasks()
    init = _initial_params()
    params = {k: tf.Variable(v, dtype=tf.float64) for k, v in init.items()}
    expected, expected_loss = _reference(init, tasks, first_order)
    got, loss = _vectorized(params, tasks, first_order)
    assert abs(loss - expected_loss) <= 1e-12
    # The same math in the same precision: equal up to float64 rounding.
    assert _max_abs_diff(got, expected) <= 1e-12
    # Meta-training: a few outer SGD steps follow the reference's trajectory.
    reference = {k: v.copy() for k, v in init.items()}
    for _ in range(3):
        got, _ = _vectorized(params, tasks, first_order)
        expected, _ = _reference(reference, tasks, first_order)
        assert _max_abs_diff(got, expected) <= 1e-6
        for k, variable in params.items():
            variable.assign_sub(0.5 * got[k])
            reference[k] = reference[k] - 0.5 * expected[k]
    np.testing.assert_allclose(
        {k: v.numpy() for k, v in params.items()}["dense_0/kernel"],
        reference["dense_0/kernel"],
        atol=1e-6,
    )
    # float32 follows the float64 reference up to float32 rounding.
    params32 = {k: tf.Variable(v, dtype=tf.float32) for k, v in init.items()}
    got32, _ = _vectorized(params32, tasks, first_order)
    expected, _ = _reference(init, tasks, first_order)
    assert _max_abs_diff(got32, expected) <= 1e-6


def test_first_and_second_order_differ():
    tasks = _tasks()
    params = {k: tf.Variable(v) for k, v in _initial_params().items()}
    second, _ = _vectorized(params, tasks, first_order=False)
    first, _ = _vectorized(params, tasks, first_order=True)
    assert _max_abs_diff(second, first) > 1e-3


def test_hand_computed_step():
    """loss_t = (w * x_t - y_t)^2; one step: w_t = w - lr * 2 x_t (w x_t - y_t)."""
    w = tf.Variable([1.5])
    x = tf.constant([2.0, -1.0])
    y = tf.constant([1.0, 0.0])
    fast, before = maml.adapt(
        lambda p: (p["w"][:, 0] * x - y) ** 2, maml.tile({"w": w}, 2), lr=0.1
    )
    # Task 0: w x - y = 2, gradient 8, w = 0.7; task 1: -1.5, gradient 3, w = 1.2.
    np.testing.assert_allclose(fast["w"].numpy()[:, 0], [0.7, 1.2], atol=1e-6)
    np.testing.assert_allclose(before.numpy(), [4.0, 2.25], atol=1e-6)


def test_adaptation_lowers_each_tasks_support_loss():
    tasks = {k: tf.constant(v, tf.float32) for k, v in _tasks().items()}
    params = {k: tf.constant(v, tf.float32) for k, v in _initial_params().items()}

    def support_loss(fast):
        logits = _mlp(tasks["support_x"], fast)
        return _masked_mean_bce(tasks["support_y"], logits, tasks["support_mask"])

    fast, before = maml.adapt(support_loss, maml.tile(params, TASKS), 3, 0.1)
    after = support_loss(fast).numpy()
    has_support = tasks["support_mask"].numpy().sum(1) > 0
    assert np.all(after[has_support] < before.numpy()[has_support])


def test_gradients_reach_every_initial_parameter():
    tasks = _tasks()
    for first_order in (False, True):
        params = {k: tf.Variable(v) for k, v in _initial_params().items()}
        grads, _ = _vectorized(params, tasks, first_order)
        for name, grad in grads.items():
            assert np.all(np.isfinite(grad)), name
            assert np.abs(grad).max() > 1e-6, (name, first_order)


def test_meta_sgd_learning_rates_per_weight():
    tasks = {k: tf.constant(v, tf.float32) for k, v in _tasks().items()}
    params = {k: tf.constant(v, tf.float32) for k, v in _initial_params().items()}
    rates = {k: tf.Variable(tf.fill(v.shape, 0.2)) for k, v in params.items()}

    def support_loss(fast):
        logits = _mlp(tasks["support_x"], fast)
        return _masked_mean_bce(tasks["support_y"], logits, tasks["support_mask"])

    with tf.GradientTape() as tape:
        fast, _ = maml.adapt(support_loss, maml.tile(params, TASKS), 1, rates)
        query = tf.reduce_mean(
            _masked_mean_bce(
                tasks["query_y"],
                _mlp(tasks["query_x"], fast),
                tf.ones_like(tasks["query_y"]),
            )
        )
    lr_grads = tape.gradient(query, rates)
    for name, grad in lr_grads.items():
        assert grad is not None and np.abs(grad.numpy()).max() > 0, name
    # Equal per-weight rates give the scalar rate's result.
    scalar, _ = maml.adapt(support_loss, maml.tile(params, TASKS), 1, 0.2)
    for name in fast:
        np.testing.assert_allclose(fast[name].numpy(), scalar[name].numpy(), atol=1e-7)
    # Each weight moves by its own rate: a zero rate freezes it.
    frozen = dict(rates, **{"dense_1/bias": tf.zeros([1])})
    moved, _ = maml.adapt(support_loss, maml.tile(params, TASKS), 1, frozen)
    np.testing.assert_array_equal(
        moved["dense_1/bias"].numpy(), np.tile(params["dense_1/bias"].numpy(), [5, 1])
    )
    with pytest.raises(KeyError, match="dense_1/bias"):
        maml.adapt(
            support_loss,
            maml.tile(params, TASKS),
            1,
            {k: v for k, v in rates.items() if k != "dense_1/bias"},
        )


def test_empty_support_task_is_not_adapted():
    tasks = {k: tf.constant(v, tf.float32) for k, v in _tasks().items()}
    # Garbage in the padding rows must not reach any task.
    tasks["support_x"] = tf.where(
        tasks["support_mask"][..., None] > 0, tasks["support_x"], 1e6
    )
    params = {k: tf.constant(v, tf.float32) for k, v in _initial_params().items()}

    def support_loss(fast):
        logits = _mlp(tasks["support_x"], fast)
        return _masked_mean_bce(tasks["support_y"], logits, tasks["support_mask"])

    fast, before = maml.adapt(support_loss, maml.tile(params, TASKS), 3, 0.5)
    assert float(before[EMPTY]) == 0.0
    for name, value in fast.items():
        assert np.all(np.isfinite(value.numpy())), name
        np.testing.assert_array_equal(value.numpy()[EMPTY], params[name].numpy())
        assert np.abs(value.numpy()[0] - params[name].numpy()).max() > 0


def test_zero_steps_and_argument_checks():
    params = {"w": tf.ones([2, 3])}
    fast, loss = maml.adapt(lambda p: tf.reduce_sum(p["w"], [1, 2]), params, 0)
    assert loss is None and fast["w"] is params["w"]
    with pytest.raises(ValueError, match="steps"):
        maml.adapt(lambda p: p["w"], params, -1)
    assert maml.tile({"w": tf.ones([2, 3])}, 4)["w"].shape == (4, 2, 3)


def test_dense_runs_per_task_kernels():
    x = tf.random.normal([2, 5, 3])
    kernels = tf.random.normal([2, 3, 4])
    per_task = maml.dense(x, kernels)
    np.testing.assert_allclose(
        per_task.numpy()[1], (x[1] @ kernels[1]).numpy(), atol=1e-5
    )
    assert maml.dense(x[:, 0], kernels, tf.zeros([2, 4])).shape == (2, 4)


def test_adapt_compiles_with_xla():
    tasks = {k: tf.constant(v, tf.float32) for k, v in _tasks().items()}
    params = {k: tf.Variable(v, dtype=tf.float32) for k, v in _initial_params().items()}

    def meta_gradient():
        def support_loss(fast):
            logits = _mlp(tasks["support_x"], fast)
            return _masked_mean_bce(tasks["support_y"], logits, tasks["support_mask"])

        with tf.GradientTape() as tape:
            fast, _ = maml.adapt(support_loss, maml.tile(params, TASKS), 2, LR)
            query = tf.reduce_mean(
                _masked_mean_bce(
                    tasks["query_y"],
                    _mlp(tasks["query_x"], fast),
                    tf.ones_like(tasks["query_y"]),
                )
            )
        return tape.gradient(query, params)

    compiled = tf.function(meta_gradient, jit_compile=True)()
    eager = meta_gradient()
    for name in params:
        np.testing.assert_allclose(
            compiled[name].numpy(), eager[name].numpy(), atol=1e-5
        )


def _vectorized_dense(params, tasks, first_order, lr=LR, steps=STEPS):
    """`_vectorized` with `maml.adapt_dense`: no tiling, factored kernels."""
    t = {k: tf.constant(v, params["dense_0/kernel"].dtype) for k, v in tasks.items()}

    def support_loss(fast):
        logits = _mlp(t["support_x"], fast)
        return _masked_mean_bce(t["support_y"], logits, t["support_mask"])

    with tf.GradientTape() as tape:
        fast, _ = maml.adapt_dense(support_loss, params, steps, lr, first_order)
        query = tf.reduce_mean(
            _masked_mean_bce(
                t["query_y"], _mlp(t["query_x"], fast), tf.ones_like(t["query_y"])
            )
        )
    grads = tape.gradient(query, params)
    return {k: g.numpy() for k, g in grads.items()}, float(query)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_adapt_dense_meta_gradient_equals_the_float64_reference(first_order):
    tasks = _tasks()
    init = _initial_params()
    params = {k: tf.Variable(v, dtype=tf.float64) for k, v in init.items()}
    expected, expected_loss = _reference(init, tasks, first_order)
    got, loss = _vectorized_dense(params, tasks, first_order)
    assert abs(loss - expected_loss) <= 1e-12
    assert _max_abs_diff(got, expected) <= 1e-12
    params32 = {k: tf.Variable(v, dtype=tf.float32) for k, v in init.items()}
    got32, _ = _vectorized_dense(params32, tasks, first_order)
    assert _max_abs_diff(got32, expected) <= 1e-6


def test_adapt_dense_takes_row_blocks_and_reused_weights():
    """A kernel cut into row blocks, and a layer applied twice, as `adapt`."""
    tasks = {k: tf.constant(v) for k, v in _tasks().items()}
    init = _initial_params()
    init["dense_1/kernel"] = np.random.default_rng(2).normal(size=(HIDDEN, HIDDEN))
    init["dense_1/bias"] = np.full(HIDDEN, 0.1)
    params = {k: tf.Variable(v) for k, v in init.items()}

    def model(x, p):
        hidden = tf.tanh(
            maml.dense(x[..., :1], p["dense_0/kernel"][..., :1, :])
            + maml.dense(x[..., 1:], p["dense_0/kernel"][..., 1:, :], p["dense_0/bias"])
        )
        for _ in range(2):  # one weight set, used twice
            hidden = tf.tanh(maml.dense(hidden, p["dense_1/kernel"], p["dense_1/bias"]))
        return tf.reduce_sum(hidden, -1)

    def support_loss(fast):
        logits = model(tasks["support_x"], fast)
        return _masked_mean_bce(tasks["support_y"], logits, tasks["support_mask"])

    results = []
    for dense_only in (False, True):
        with tf.GradientTape() as tape:
            if dense_only:
                fast, before = maml.adapt_dense(support_loss, params, 2, LR)
            else:
                fast, before = maml.adapt(support_loss, maml.tile(params, TASKS), 2, LR)
            query = tf.reduce_mean(
                _masked_mean_bce(
                    tasks["query_y"],
                    model(tasks["query_x"], fast),
                    tf.ones_like(tasks["query_y"]),
                )
            )
        grads = tape.gradient(query, params)
        results.append((maml.materialize(fast, params, TASKS), before, grads))
    (tiled, before, grads), (factored, before_d, grads_d) = results
    assert isinstance(
        maml.adapt_dense(support_loss, params, 1, LR)[0]["dense_0/kernel"],
        maml.LowRankKernel,
    )
    np.testing.assert_allclose(before_d.numpy(), before.numpy(), atol=1e-12)
    for name in params:
        np.testing.assert_allclose(factored[name], tiled[name], atol=1e-12)
        np.testing.assert_allclose(grads_d[name], grads[name], atol=1e-12)
    # The task with no support row keeps the shared weights.
    np.testing.assert_allclose(
        factored["dense_1/kernel"][EMPTY], init["dense_1/kernel"], atol=1e-12
    )


def test_adapt_dense_refuses_per_weight_rates_and_compiles_with_xla():
    tasks = {k: tf.constant(v, tf.float32) for k, v in _tasks().items()}
    params = {k: tf.Variable(v, dtype=tf.float32) for k, v in _initial_params().items()}

    def support_loss(fast):
        logits = _mlp(tasks["support_x"], fast)
        return _masked_mean_bce(tasks["support_y"], logits, tasks["support_mask"])

    rates = {k: tf.fill(v.shape, 0.1) for k, v in params.items()}
    with pytest.raises(ValueError, match="scalar rates"):
        maml.adapt_dense(support_loss, params, 1, rates)
    with pytest.raises(ValueError, match="steps"):
        maml.adapt_dense(support_loss, params, -1)

    def embedding():
        fast, _ = maml.adapt_dense(support_loss, params, 2, LR)
        return _mlp(tasks["query_x"], fast)

    np.testing.assert_allclose(
        tf.function(embedding, jit_compile=True)().numpy(),
        embedding().numpy(),
        atol=1e-5,
    )
