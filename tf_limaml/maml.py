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

`adapt_dense` computes the same for parameters that the model uses only as
the kernel or bias of `dense`, without a per-task copy of any kernel. The
inner gradient of a dense kernel on task t is x_t^T delta_t (the layer's
inputs times the loss gradient at its outputs, summed over t's rows), a
matrix of rank at most the number of rows; the adapted kernel stays in that
factored form, `LowRankKernel`, W - lr * x_t^T delta_t, which `dense`
applies as x W - lr * (x x_t^T) delta_t (or as x W - lr * x (x_t^T delta_t)
when a task has so many rows that this is cheaper). W is never tiled: it runs
as one matmul over the rows of all tasks, and its outer gradient is one
matmul too, not a sum of per-task copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class _Term:
    """scale * x^T delta, per task, on kernel rows [start, stop)."""

    start: int
    stop: int
    x: tf.Tensor  # [T, S, stop - start]
    delta: tf.Tensor  # [T, S, out]
    scale: tf.Tensor  # scalar


class LowRankKernel:
    """Per-task dense kernels kept factored: W_t = W - sum_k lr_k x_kt^T delta_kt.

    What `adapt_dense` returns for a kernel: W is the shared `[in, out]`
    kernel, and each inner step adds one term from that step's layer inputs
    x `[T, S, in]` and output gradients delta `[T, S, out]`. `dense` applies
    it without forming W_t; `materialize` forms it.

    Attributes:
        base: The shared kernel W, `[in, out]`.
    """

    def __init__(self, base: tf.Tensor | tf.Variable, terms: tuple[_Term, ...] = ()):
        self.base = base
        self._terms = tuple(terms)

    @property
    def shape(self) -> tf.TensorShape:
        return tf.TensorShape(self.base.shape)

    @property
    def dtype(self) -> tf.DType:
        return self.base.dtype

    def add(self, term: _Term) -> LowRankKernel:
        return LowRankKernel(self.base, self._terms + (term,))

    def __getitem__(self, key) -> LowRankKernel:
        """Rows `[..., a:b, :]` of every task's kernel (e.g. one input's share)."""
        start, stop = _row_range(key, self.shape[0])
        terms = []
        for term in self._terms:
            low, high = max(term.start, start), min(term.stop, stop)
            if low < high:
                x = term.x[..., low - term.start : high - term.start]
                terms.append(
                    _Term(low - start, high - start, x, term.delta, term.scale)
                )
        return LowRankKernel(self.base[start:stop], tuple(terms))

    def apply(self, x: tf.Tensor) -> tf.Tensor:
        """x W_t for inputs `[T, in]` or `[T, Q, in]`."""
        y = _dense(x, self.base, None)
        rows = x if x.shape.rank == 3 else x[:, None, :]
        for term in self._terms:
            columns = rows[..., term.start : term.stop]
            if _factored_is_cheaper(columns, term):
                # (x x_t^T) delta_t: Q * S * (in + out) per task.
                similarity = tf.einsum("tqi,tsi->tqs", columns, term.x)
                update = tf.einsum("tqs,tso->tqo", similarity, term.delta)
            else:
                # x (x_t^T delta_t): S * in * out + Q * in * out per task.
                gradient = tf.einsum("tsi,tso->tio", term.x, term.delta)
                update = tf.einsum("tqi,tio->tqo", columns, gradient)
            if x.shape.rank == 2:
                update = update[:, 0, :]
            y -= term.scale * update
        return y

    def materialize(self) -> tf.Tensor:
        """The per-task kernels `[T, in, out]` (the shared one when no term)."""
        kernel = tf.convert_to_tensor(self.base)
        for term in self._terms:
            gradient = tf.einsum("tsi,tso->tio", term.x, term.delta)
            rows = [[0, 0], [term.start, self.shape[0] - term.stop], [0, 0]]
            kernel = kernel - term.scale * tf.pad(gradient, rows)
        return kernel


def _factored_is_cheaper(columns: tf.Tensor, term: _Term) -> bool:
    query, support = columns.shape[1], term.x.shape[1]
    width, out = columns.shape[-1], term.delta.shape[-1]
    if None in (query, support, width, out):
        return True
    return query * support * (width + out) <= (support + query) * width * out


def _row_range(key: Any, rows: int) -> tuple[int, int]:
    """(start, stop) of a `[..., a:b, :]` key on a kernel of `rows` rows."""
    if (
        isinstance(key, tuple)
        and len(key) == 3
        and key[0] is Ellipsis
        and isinstance(key[1], slice)
        and key[1].step in (None, 1)
        and key[2] == slice(None)
    ):
        start, stop, _ = key[1].indices(rows)
        return start, stop
    raise TypeError(
        f"A kernel adapted by `adapt_dense` supports row slices "
        f"`[..., a:b, :]` only, got {key!r}"
    )


class _Recorder:
    """The support pass of one inner step: every `dense` call on a probe."""

    def __init__(self, tape: tf.GradientTape):
        self.tape = tape
        self.kernels: list[tuple[_Probe, tf.Tensor, tf.Tensor]] = []
        self.biases: list[tuple[_Probe, tf.Tensor]] = []

    def record(self, x, y, kernel: _Probe | None, bias: _Probe | None) -> None:
        self.tape.watch(y)
        if kernel is not None:
            self.kernels.append((kernel, x, y))
        if bias is not None:
            self.biases.append((bias, y))


class _Probe:
    """A parameter during a support pass of `adapt_dense`: `dense` runs with
    its value and records its inputs and outputs."""

    def __init__(self, name: str, value, recorder: _Recorder, start: int = 0):
        self.name = name
        self.value = value
        self.recorder = recorder
        self.start = start

    @property
    def shape(self) -> tf.TensorShape:
        return tf.TensorShape(self.value.shape)

    def __getitem__(self, key) -> _Probe:
        start, _ = _row_range(key, self.shape[0])
        return _Probe(self.name, self.value[key], self.recorder, self.start + start)


def adapt_dense(
    task_loss: Callable[[dict[str, Any]], tf.Tensor],
    params: Params,
    steps: int = 1,
    lr: float | tf.Tensor | Mapping[str, float | tf.Tensor] = 0.01,
    first_order: bool = False,
) -> tuple[dict[str, Any], tf.Tensor | None]:
    """`adapt(task_loss, tile(params, T), ...)` for dense kernels and biases.

    Same result, up to float rounding, for a `task_loss` that uses every
    parameter only as the `kernel` or `bias` of `dense` (a kernel may be cut
    into row blocks, `kernel[..., a:b, :]`, each applied by its own `dense`
    call, and any parameter may be used more than once), on inputs whose
    first axis is the task (`[T, S, in]` or `[T, in]`). Nothing is tiled:
    see the module docstring.

    Args:
        task_loss: fast params -> per-task losses `[T]`.
        params: Shared parameters, name -> kernel `[in, out]` or bias `[out]`
            (not tiled).
        steps: Inner steps k >= 0.
        lr: Inner learning rate: one number, or a dict name -> number (scalar
            rates only; per-weight rates need `adapt`).
        first_order: Drop the second-order term.

    Returns:
        (adapted params, the per-task loss `[T]` before the first step, or None
        when `steps` is 0). Adapted kernels are `LowRankKernel`s and adapted
        biases `[T, out]` tensors; a parameter the loss does not reach is
        returned unchanged (shared).

    Raises:
        ValueError: `steps` is not an integer >= 0, or a rate is not a scalar.
        TypeError: `task_loss` uses a parameter other than through `dense`
            (raised by TensorFlow on the probe object) or slices it otherwise.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be an integer >= 0, got {steps!r}")
    fast: dict[str, Any] = dict(params)
    first_loss = None
    for _ in range(steps):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            recorder = _Recorder(tape)
            probes = {
                name: _Probe(name, value, recorder) for name, value in fast.items()
            }
            per_task = task_loss(probes)
            total = tf.reduce_sum(per_task)
        outputs = {id(y): y for _, _, y in recorder.kernels}
        outputs.update({id(y): y for _, y in recorder.biases})
        gradients = tape.gradient(total, list(outputs.values()))
        deltas = dict(zip(outputs, gradients, strict=True))
        if first_loss is None:
            first_loss = per_task
        updated = dict(fast)
        for probe, x, y in recorder.kernels:
            delta = deltas[id(y)]
            if delta is None:
                continue
            if x.shape.rank == 2:
                x, delta = x[:, None, :], delta[:, None, :]
            if first_order:
                x, delta = tf.stop_gradient(x), tf.stop_gradient(delta)
            kernel = updated[probe.name]
            if not isinstance(kernel, LowRankKernel):
                kernel = LowRankKernel(kernel)
            rate = _scalar_rate(lr, probe.name, delta.dtype)
            term = _Term(probe.start, probe.start + x.shape[-1], x, delta, rate)
            updated[probe.name] = kernel.add(term)
        for probe, y in recorder.biases:
            delta = deltas[id(y)]
            if delta is None:
                continue
            gradient = delta if delta.shape.rank == 2 else tf.reduce_sum(delta, 1)
            if probe.shape[-1] != gradient.shape[-1]:
                raise ValueError(
                    f"`adapt_dense` needs biases of the layer's width; {probe.name!r} "
                    f"has shape {probe.shape} for outputs {delta.shape}"
                )
            if first_order:
                gradient = tf.stop_gradient(gradient)
            rate = _scalar_rate(lr, probe.name, gradient.dtype)
            updated[probe.name] = updated[probe.name] - rate * gradient
        fast = updated
    return fast, first_loss


def _scalar_rate(lr, name: str, dtype: tf.DType) -> tf.Tensor:
    rate = _rate(lr, name, dtype)
    if rate.shape.rank != 0:
        raise ValueError(
            f"`adapt_dense` takes scalar rates; the rate of {name!r} has shape "
            f"{rate.shape}. Use `adapt` for per-weight rates."
        )
    return rate


def materialize(
    fast: Mapping[str, Any], params: Params, num_tasks: int | tf.Tensor
) -> dict[str, tf.Tensor]:
    """`adapt_dense`'s result as `adapt`'s: every parameter `[T, *shape]`.

    Args:
        fast: Adapted params from `adapt_dense` (or `adapt`: returned as they
            are).
        params: The shared params it started from (for the ranks); a name
            not in it is returned as it is.
        num_tasks: T.
    """
    out = {}
    for name, value in fast.items():
        if isinstance(value, LowRankKernel):
            value = value.materialize()
        if name in params and value.shape.rank == params[name].shape.rank:
            value = tile({name: value}, num_tasks)[name]
        out[name] = value
    return out


def dense(x: tf.Tensor, kernel: Any, bias: Any = None) -> tf.Tensor:
    """x @ kernel + bias, with shared or per-task weights.

    Args:
        x: Inputs `[..., in]`. With per-task weights, the first axis is tasks:
            `[T, in]` or `[T, N, in]`.
        kernel: `[in, out]` (shared), `[T, in, out]` (one weight set per task)
            or a `LowRankKernel` (per task, factored).
        bias: `[out]`, `[T, out]` or None.

    Returns:
        `[..., out]`.

    Raises:
        ValueError: A per-task kernel with inputs of rank other than 2 or 3.
    """
    kernel_probe = kernel if isinstance(kernel, _Probe) else None
    bias_probe = bias if isinstance(bias, _Probe) else None
    if kernel_probe is not None:
        kernel = kernel_probe.value
    if bias_probe is not None:
        bias = bias_probe.value
    y = _dense(x, kernel, bias)
    if kernel_probe is not None or bias_probe is not None:
        (kernel_probe or bias_probe).recorder.record(x, y, kernel_probe, bias_probe)
    return y


def _dense(x: tf.Tensor, kernel: Any, bias: Any) -> tf.Tensor:
    if isinstance(kernel, LowRankKernel):
        y = kernel.apply(x)
    elif kernel.shape.rank == 2:
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
