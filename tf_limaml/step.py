"""The guarded, compiled meta-train step around `LiMAMLModel.forward`.

`LiMAMLModel.train_step` is the shape of `tfrs.Model.train_step`: a
`tf.GradientTape` over the loss, then the optimizer. What this module adds:

* `meta_gradients`: gradients of the query loss (the inner loop inside), and
  one flag saying whether the loss and every gradient are finite;
* `apply_gradients`: a non-finite step leaves the weights as they were (on
  one device the update is skipped; under a distribution strategy, whose
  all-reduce must run, every replica's gradients are zeroed when any
  replica's step is not finite, `all_replicas_finite`);
* small embedding tables get their gradient dense (`dense_table_gradient`);
* `FunctionCache` and `IteratorDispatch`: the compiled functions, traced once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from tf_limaml.optimizers import LazyAdam

if TYPE_CHECKING:
    from tf_limaml.blocks import TaskBatch
    from tf_limaml.model import LiMAMLModel

LOSS_NAMES = ("loss", "support_loss", "query_loss", "regularization_loss")


def replica_mean(loss: tf.Tensor) -> tf.Tensor:
    """A replica's loss scaled so that the gradients the strategy sums across
    replicas are the mean over every task of the global batch."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss / tf.cast(replicas, loss.dtype)


def masked_task_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Per-task mean over real rows: sum(mask * v) / max(sum(mask), 1); [T, N] -> [T]."""
    return tf.reduce_sum(values * mask, axis=-1) / tf.maximum(
        tf.reduce_sum(mask, axis=-1), 1.0
    )


def all_replicas_finite(finite: tf.Tensor) -> tf.Tensor:
    """True when the step is finite on every replica in sync.

    Under a strategy the update cannot be skipped, so a non-finite step must
    zero the gradients of every replica: a replica that zeroed only its own
    would leave the others' share of the step to be applied. One all-reduce
    of a scalar; outside a strategy (or with one replica), `finite` itself.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return finite
    not_finite = context.all_reduce(
        tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.float32)
    )
    return tf.equal(not_finite, 0.0)


def where_finite(finite: tf.Tensor, grad):
    """The gradient if the step is finite, else zeros of its shape."""
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(
            tf.where(finite, grad.values, tf.zeros_like(grad.values)),
            grad.indices,
            grad.dense_shape,
        )
    return tf.where(finite, grad, tf.zeros_like(grad))


class FunctionCache:
    """`tf.function`s by key, kept outside Keras attribute tracking."""

    def __init__(self):
        self._functions: dict[Hashable, Callable] = {}

    def get(self, key: Hashable, fn: Callable, jit: bool) -> Callable:
        """The cached function for `key`, traced from `fn` on first use."""
        if key not in self._functions:
            self._functions[key] = tf.function(
                fn, jit_compile=jit, reduce_retracing=True
            )
        return self._functions[key]

    def clear(self) -> None:
        self._functions.clear()


class IteratorDispatch:
    """Calls a tf.function through its concrete function for the iterator it
    was last given, with that iterator's flat inputs.

    A tf.function finds its concrete function by hashing the type spec of its
    arguments on every call, and an iterator's spec has one entry per tensor
    of the batch: with tens of features that lookup, in Python, costs as much
    as a small meta-train step. `fit` passes the same iterator for a whole
    epoch, so the lookup is done once per epoch instead. The call itself then
    skips the structured-signature handling of `ConcreteFunction.__call__`
    (binding, flattening and checking the iterator and the captured
    variables on every call): the iterator flattens to one resource tensor,
    the same for the whole epoch, and the function is called with it and its
    captured inputs, 0.1 to 0.2 ms less host time a step on 2 cores. Where
    the concrete function has no such flat call (another TensorFlow), it is
    called as usual.
    """

    def __init__(self, function):
        self.function = function
        self._iterator = None
        self._concrete = None
        self._flat_inputs = None

    def __call__(self, iterator):
        if self._iterator is None or self._iterator() is not iterator:
            self._concrete = self.function.get_concrete_function(iterator)
            self._iterator = weakref.ref(iterator)
            self._flat_inputs = _flat_inputs(self._concrete, iterator)
        if self._flat_inputs is None:
            return self._concrete(iterator)
        return self._concrete._call_flat(
            self._flat_inputs, self._concrete.captured_inputs
        )


def _flat_inputs(concrete, iterator) -> list[tf.Tensor] | None:
    """The tensors `concrete._call_flat` takes for `iterator`, or None when
    this TensorFlow's concrete functions do not take them that way."""
    if not callable(getattr(concrete, "_call_flat", None)):
        return None
    try:
        flat = tf.nest.flatten(iterator, expand_composites=True)
        expected = concrete.inputs[
            : len(concrete.inputs) - len(concrete.captured_inputs)
        ]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(flat) != len(expected) or any(
        t.dtype != e.dtype for t, e in zip(flat, expected, strict=True)
    ):
        return None
    return flat


def losses(
    model: LiMAMLModel,
    batch: TaskBatch,
    query_logits: tf.Tensor,
    support_loss: tf.Tensor,
) -> dict[str, tf.Tensor]:
    """The meta-train losses: the query loss (mean over tasks with a query),
    the support loss before adaptation, the regularization and their sum."""
    pointwise = model.pointwise_loss(
        batch.query_label[..., None], query_logits[..., None]
    )
    per_task = masked_task_mean(pointwise, batch.query_mask)
    has_query = tf.cast(tf.reduce_sum(batch.query_mask, -1) > 0, per_task.dtype)
    query_loss = tf.reduce_sum(per_task * has_query) / tf.maximum(
        tf.reduce_sum(has_query), 1.0
    )
    # On the variables: fast weights are tensors and carry no penalty.
    penalties = [tf.cast(loss, query_logits.dtype) for loss in model.losses]
    regularization = (
        tf.add_n(penalties) if penalties else tf.constant(0.0, query_logits.dtype)
    )
    return {
        "query_loss": query_loss,
        "support_loss": tf.reduce_mean(support_loss),
        "regularization_loss": regularization,
        "loss": query_loss + regularization,
    }


def dispatch(model: LiMAMLModel, train_function, cached: bool):
    """Keras's train function, through `IteratorDispatch` on one device."""
    if (
        cached
        or model._cluster_coordinator
        or model.distribute_strategy.num_replicas_in_sync != 1
        or not hasattr(train_function, "get_concrete_function")
    ):
        return train_function
    model.train_function = IteratorDispatch(train_function)
    return model.train_function


def meta_gradients(model: LiMAMLModel, batch: TaskBatch):
    """(gradients of `model.trainable_variables`, forward outputs + "finite").

    The loss is the query loss after the inner loop of `model.meta_config`,
    scaled by `replica_mean`; a variable the loss does not reach gets zeros.
    """
    with tf.GradientTape() as tape:
        out = model.forward(batch, training=True)
        scaled = replica_mean(out["loss"])
    variables = model.trainable_variables
    grads = tape.gradient(scaled, variables)
    grads = [
        tf.zeros_like(v) if g is None else g
        for g, v in zip(grads, variables, strict=True)
    ]
    # Checked here so that XLA fuses the checks into the step.
    finite = tf.math.is_finite(out["loss"])
    for grad in grads:
        values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
        finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(values)))
    out["finite"] = finite
    return grads, out


def dense_table_gradient(
    grad: tf.Tensor | tf.IndexedSlices,
    optimizer: tf.keras.optimizers.Optimizer,
    limit: int,
    shape: Sequence[int] | None = None,
) -> tf.Tensor | tf.IndexedSlices:
    """An embedding table's sparse gradient as a dense one, for small tables.

    Keras's optimizers update every row of a table either way (Adam's
    moments decay on all rows; for the others an unused row's update is
    zero), but their sparse path first merges duplicate ids with
    `tf.unique`, which XLA compiles to sorts: 1.6 ms of a 13 ms reference
    step for six tables. Done on every path (compiled or not, distributed
    or not), so that `LazyAdam` is Adam for these tables wherever the
    step runs. Kept sparse for other optimizers (a lazy one skips unused
    rows) and for tables of more than `limit` numbers: there the dense work
    is the table's size (128 MB a pass for 1M x 32), and `LazyAdam` updates
    only the looked-up rows.

    Args:
        grad: A variable's gradient.
        optimizer: The optimizer that applies it.
        limit: The most numbers a table may have to be made dense.
        shape: The variable's shape. Without it, the gradient's static
            `dense_shape`, which a gradient returned by a `tf.function` (the
            compiled part of the step under a strategy) does not have.
    """
    if not isinstance(grad, tf.IndexedSlices) or not (
        isinstance(optimizer, LazyAdam)
        or type(optimizer).__module__.startswith("tf_keras.")
    ):
        return grad
    if shape is None or not tf.TensorShape(shape).is_fully_defined():
        shape = (
            None
            if grad.dense_shape is None
            else (tf.get_static_value(grad.dense_shape))
        )
    if shape is None or int(np.prod(shape)) > limit:
        return grad
    return tf.math.unsorted_segment_sum(grad.values, grad.indices, int(shape[0]))


def densify_small_tables(model: LiMAMLModel, grads) -> list:
    """`dense_table_gradient` on every gradient, for the model's optimizer."""
    return [
        dense_table_gradient(
            g, model.optimizer, model.dense_table_limit, tuple(v.shape)
        )
        for g, v in zip(grads, model.trainable_variables, strict=True)
    ]


def apply_gradients(model: LiMAMLModel, grads, finite: tf.Tensor) -> None:
    """Applies `grads` to `model.trainable_variables` unless the step is not finite.

    Zeroed gradients are not enough on their own: Adam's moments would still
    move every weight. On one device the update is skipped; under a
    distribution strategy (even of one replica) the all-reduce must stay
    unconditional, so zeroing it is, with `finite` the flag of every replica
    (`all_replicas_finite`).
    """
    grads = [where_finite(finite, g) for g in grads]
    pairs = list(zip(grads, model.trainable_variables, strict=True))
    if tf.distribute.has_strategy():
        model.optimizer.apply_gradients(pairs)
        return

    def apply():
        model.optimizer.apply_gradients(pairs)
        return tf.constant(True)

    tf.cond(finite, apply, lambda: tf.constant(False))


def apply_step(model: LiMAMLModel, batch: TaskBatch):
    """Gradients, guarded update and metrics: the whole step on one device."""
    grads, out = meta_gradients(model, batch)
    grads = densify_small_tables(model, grads)
    apply_gradients(model, grads, out["finite"])
    return update_metrics(model, batch, out), out["finite"]


def update_metrics(
    model: LiMAMLModel, batch: TaskBatch, out: Mapping[str, tf.Tensor]
) -> dict[str, tf.Tensor]:
    """Updates the loss trackers and the ranking task's metrics; returns logs."""
    for name, tracker in model.loss_trackers.items():
        tracker.update_state(out[name])
    model.task(
        labels=tf.reshape(batch.query_label, [-1, 1]),
        predictions=tf.reshape(out["query_logits"], [-1, 1]),
        sample_weight=tf.reshape(batch.query_mask, [-1]),
        compute_metrics=True,
    )
    return {m.name: m.result() for m in model.metrics}


class NonfiniteRecord:
    """Entity ids of the last non-finite step, kept on the host.

    A string variable cannot exist under MultiWorkerMirroredStrategy, which
    broadcasts every variable's initial value (strings cannot be).
    """

    def __init__(self):
        self.step = -1
        self.ids: list[bytes] = []

    def record(self, step: tf.Tensor, entity_ids: tf.Tensor) -> tf.Tensor:
        """Graph op that records `entity_ids` for `step`; returns False."""

        def record(step, ids):
            # Each replica reports its share of the step's batch.
            if self.step != step:
                self.step, self.ids = step, []
            self.ids.extend(ids.tolist())
            return False

        flag = tf.numpy_function(record, [step, entity_ids], tf.bool, stateful=True)
        return tf.ensure_shape(flag, [])

    def watch(self, finite: tf.Tensor, step: tf.Tensor, batch: Mapping[str, Any]):
        """Records the batch's entity ids when the step was not finite."""
        if "entity_id" not in batch:
            return
        entity_ids = batch["entity_id"]
        if entity_ids.dtype != tf.string:
            entity_ids = tf.strings.as_string(entity_ids)
        tf.cond(
            finite,
            lambda: tf.constant(True),
            lambda: self.record(step, entity_ids),
        )

    @property
    def entities(self) -> list[str]:
        return [e.decode("utf-8", "replace") for e in self.ids]


def train_step(model: LiMAMLModel, batch: Mapping[str, Any]) -> dict[str, tf.Tensor]:
    """`LiMAMLModel.train_step`: one guarded meta-train step on a raw batch."""
    functions = model.compiled_functions
    if not tf.distribute.has_strategy():
        # One compiled function for the whole step (gradients, update and
        # metrics): on small networks the ops around the step, each run on
        # its own by the executor, cost as much as the step's math. Not under
        # a strategy, even of one replica: its apply_gradients synchronizes
        # (merge_call), which a nested function cannot.
        if model.encode_compiles:
            # No string to look up: encoding joins the compiled step too.
            batch = {k: tf.convert_to_tensor(v) for k, v in batch.items()}
            numbers = {k: v for k, v in batch.items() if v.dtype != tf.string}
            compiled = functions.get(
                "train_step_raw",
                lambda raw: apply_step(model, model.encode(raw)),
                model.uses_xla,
            )
            logs, finite = compiled(numbers)
        else:
            compiled = functions.get(
                "train_step", lambda b: apply_step(model, b), model.uses_xla
            )
            logs, finite = compiled(model.encode(batch))
    else:
        # The all-reduce of the update stays outside the compiled part.
        encoded = model.encode(batch)
        compiled = functions.get(
            "meta_gradients", lambda b: meta_gradients(model, b), model.uses_xla
        )
        grads, out = compiled(encoded)
        finite = all_replicas_finite(out["finite"])
        apply_gradients(model, densify_small_tables(model, grads), finite)
        logs = update_metrics(model, encoded, out)
    model.nonfinite_record.watch(finite, model.optimizer.iterations, batch)
    return logs
