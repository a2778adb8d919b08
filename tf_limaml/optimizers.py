"""LazyAdam: Adam whose sparse updates touch only the rows a batch looked up.

Keras's optimizers accept an embedding table's sparse gradient
(`tf.IndexedSlices`) but still update every row: Adam decays both moments of
the whole table and moves every row by its momentum, so a step costs the
table's size, not the batch's. For a hashed feature of 1,000,000 buckets that
is most of the step. `LazyAdam` updates the moments and the weights of the
looked-up rows only, as TF1's `LazyAdamOptimizer` and TF Addons' `LazyAdam`
did; a row that no batch looks up keeps its moments until one does.

A dense gradient gets Keras's own Adam update, bit for bit, and
`LiMAMLModel` hands tables of up to `LiMAMLModel.dense_table_limit` numbers to
the optimizer dense, so with it only larger tables are updated lazily.

Example:

    model.compile(optimizer=tf_limaml.optimizers.LazyAdam(1e-3))
"""

from __future__ import annotations

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="tf_limaml")
class LazyAdam(tf.keras.optimizers.Adam):
    """Adam with lazy sparse updates: only the looked-up rows of a table move.

    Takes the arguments of `tf.keras.optimizers.Adam`. For a dense gradient it
    is Adam. For a sparse one (`tf.IndexedSlices`, an embedding table's
    gradient) the first and second moments and the weights of the rows in the
    gradient are updated as Adam would, with the step's bias correction; the
    other rows do not change. Duplicate ids are summed first (Keras's
    `apply_gradients` does it before `update_step`).

    On the first step this equals Adam exactly (untouched rows have zero
    moments, so Adam leaves them in place too); later, Adam would keep moving a
    row with old momentum, and LazyAdam does not.
    """

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        beta_1_power = tf.pow(beta_1, local_step)
        beta_2_power = tf.pow(beta_2, local_step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        epsilon = tf.cast(self.epsilon, dtype)
        if self.adaptive_epsilon:
            epsilon = epsilon * tf.sqrt(1 - beta_2_power)
        # The slots Adam's `build` made for this variable (Keras's own
        # subclassing pattern: `_index_dict[_var_key(variable)]`).
        index = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[index], self._velocities[index]
        rows = gradient.indices
        values = tf.cast(gradient.values, dtype)
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * values
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(values)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            v_rows = tf.maximum(tf.gather(v_hat, rows), v_rows)
            v_hat.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(
            tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + epsilon), rows)
        )
