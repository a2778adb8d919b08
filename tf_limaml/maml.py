"""Functional MAML: tile shared weights per task, adapt them, run dense layers.

No Keras model here: parameters are a dict name -> tensor (or variable), and a
model is any function of such a dict. `tf_limaml.LiMAMLModel` is a Keras face
over these three functions.

The inner loop is vectorized over tasks. `tile` gives every task its own copy
of each parameter, `[T, *shape]`; `task_loss(fast)` returns one loss per task,
`[T]`, where task t reads only slice t of every parameter. The gradient of the
*sum* of those losses with respect to the tiled parameters is then every
task's own gradient, in one `tape.gradient` call and no Python loop over tasks.

Under an outer `tf.GradientTape`, `adapt` is differentiable: second order (the
default) lets the outer tape record the inner tape; `first_order=True` wraps
the inner gradient in `tf.stop_gradient` (FOMAML).

Example (a one-layer model, two tasks, one support row each):

    params = {"kernel": tf.Variable(tf.ones([3, 1])), "bias": tf.Variable([0.0])}
    x = tf.random.normal([2, 1, 3])          # [T, N, in]
    y = tf.constant([[1.0], [0.0]])          # [T, N]

    def task_loss(fast):
        logits = maml.dense(x, fast["kernel"], fast["bias"])[..., 0]
        losses = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
        return tf.reduce_mean(losses, axis=-1)   # [T]

    with tf.GradientTape() as tape:
        fast, support_loss = maml.adapt(task_loss, maml.tile(params, 2), lr=0.1)
        outer = tf.reduce_mean(task_loss(fast))   # the query loss, in practice
    meta_grads = tape.gradient(outer, params)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import tensorflow as tf

Params = Mapping[str, tf.Tensor | tf.Variable]
LearningRate = float | tf.Tensor | tf.Variable | Mapping[str, float | tf.Tensor]


def tile(params: Params, num_tasks: int | tf.Tensor) -> dict[str, tf.Tensor]:
    """One copy of every parameter per task: name -> `[T, *shape]`.

    Tile once, before the inner loop: under an outer tape the gradients of the
    copies flow back to the shared parameters (summed over tasks).

    Args:
        params: Shared parameters by name (tensors or variables).
        num_tasks: T, a Python int or a scalar int tensor.

    Returns:
        A new dict with the same names.
    """
    tiled = {}
    for name, value in params.items():
        value = tf.convert_to_tensor(value)
        tiled[name] = tf.tile(
            tf.expand_dims(value, 0), [num_tasks] + [1] * value.shape.rank
        )
    return tiled


def _rate(lr: LearningRate, name: str, dtype: tf.DType):
    if isinstance(lr, Mapping):
        if name not in lr:
            raise KeyError(
                f"`lr` has no rate for parameter {name!r}; it has {sorted(lr)}. Give "
                "every parameter a rate (or pass one float)."
            )
        lr = lr[name]
    if isinstance(lr, (int, float)):
        # Not tf.cast: it would round a Python float through float32 first.
        return tf.constant(lr, dtype)
    return tf.cast(lr, dtype)


def adapt(
    task_loss: Callable[[dict[str, tf.Tensor]], tf.Tensor],
    params: Params,
    steps: int = 1,
    lr: LearningRate = 0.01,
    first_order: bool = False,
) -> tuple[dict[str, tf.Tensor], tf.Tensor | None]:
    """`steps` gradient steps of every task on its own loss, all tasks at once.

    Args:
        task_loss: fast params -> per-task losses `[T]`. Task t must depend only
            on slice t of each parameter (as after `tile`). A task whose loss
            does not depend on its parameters (e.g. an empty support set
            masked to a zero loss) gets a zero gradient and keeps them.
        params: Per-task parameters, name -> `[T, *shape]` (see `tile`).
        steps: Inner steps k >= 0 (0 returns `params` unchanged).
        lr: Inner learning rate: one number, or a dict name -> rate (a float or
            a tensor broadcastable to the parameter, e.g. a learned per-weight
            rate of shape `shape` as in Meta-SGD).
        first_order: Drop the second-order term: the inner gradient is treated
            as a constant by an outer tape.

    Returns:
        (adapted params name -> `[T, *shape]`, the per-task loss `[T]` before
        the first step, or None when `steps` is 0). A parameter the loss does
        not reach (gradient None) is returned unchanged.

    Raises:
        ValueError: `steps` is not an integer >= 0.
        KeyError: `lr` is a dict without a rate for some parameter.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be an integer >= 0, got {steps!r}")
    fast = dict(params)
    names = list(fast)
    first_loss = None
    for _ in range(steps):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([fast[n] for n in names])
            per_task = task_loss(fast)
            total = tf.reduce_sum(per_task)
        grads = tape.gradient(total, [fast[n] for n in names])
        if first_loss is None:
            first_loss = per_task
        updated = {}
        for name, grad in zip(names, grads, strict=True):
            if grad is None:
                updated[name] = fast[name]
                continue
            if first_order:
                grad = tf.stop_gradient(grad)
            updated[name] = fast[name] - _rate(lr, name, grad.dtype) * grad
        fast = updated
    return fast, first_loss


def dense(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None = None) -> tf.Tensor:
    """x @ kernel + bias, with shared or per-task weights.

    Args:
        x: Inputs `[..., in]`. With per-task weights, the first axis is tasks:
            `[T, in]` or `[T, N, in]`.
        kernel: `[in, out]` (shared) or `[T, in, out]` (one weight set per task).
        bias: `[out]`, `[T, out]` or None.

    Returns:
        `[..., out]`.

    Raises:
        ValueError: A per-task kernel with inputs of rank other than 2 or 3.
    """
    if kernel.shape.rank == 2:
        if x.shape.rank == 2:
            y = tf.matmul(x, kernel)
        else:
            # A plain 2-D matmul on flattened rows: XLA's CPU backend runs
            # rank-3 dots with a broadcast kernel far slower (and their
            # second-order gradients slower still).
            rows = tf.reshape(x, [-1, tf.shape(x)[-1]])
            y = tf.reshape(
                tf.matmul(rows, kernel),
                tf.concat([tf.shape(x)[:-1], tf.shape(kernel)[-1:]], axis=0),
            )
            y.set_shape(x.shape[:-1].concatenate(kernel.shape[-1:]))
    elif x.shape.rank == 2:
        y = tf.einsum("ti,tio->to", x, kernel)
    elif x.shape.rank == 3:
        y = tf.einsum("tsi,tio->tso", x, kernel)
    else:
        raise ValueError(
            f"Per-task kernels need inputs of rank 2 or 3, got shape {x.shape}"
        )
    if bias is None:
        return y
    if bias.shape.rank == 2 and y.shape.rank == 3:
        bias = bias[:, None, :]
    return y + bias
