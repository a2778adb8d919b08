"""Large embedding tables: sparse gradients, applied row by row (LazyAdam).

Tables of more than `LiMAMLModel.dense_table_limit` numbers reach the
optimizer as `tf.IndexedSlices`; smaller ones dense. `LazyAdam` updates only
the rows a sparse gradient names.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_limaml import data, step, training
from tf_limaml.model import LiMAMLModel, MetaConfig
from tf_limaml.optimizers import LazyAdam

SMALL = {"meta_units": [8], "global_units": [16], "cross_layers": 1}
# The synthetic spec's hashed item table: 400 rows x 8 = 3,200 numbers.
ITEM_TABLE = "item_id_embedding"
SPARSE_LIMIT = 1000


def _batches(tasks, spec, n=2):
    return list(data.task_dataset(tasks["train"], spec, 8, 16, 16).take(n))


def _model(spec, optimizer, limit=None, jit=True):
    tf.keras.utils.set_random_seed(3)
    model = LiMAMLModel(spec, MetaConfig(inner_lr=0.5, jit_compile=jit), **SMALL)
    if limit is not None:
        model.dense_table_limit = limit
    model.compile(optimizer=optimizer)
    return model


def _step(model, batch):
    model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)


def _table(model, name=ITEM_TABLE):
    return next(v for v in model.trainable_variables if name in v.name).numpy()


def _spy_gradient_types(optimizer):
    """Records the type of the gradient `update_step` gets, by variable name."""
    seen = {}
    update_step = optimizer.update_step

    def spy(gradient, variable):
        seen[variable.name.split("/")[-1].split(":")[0]] = type(gradient).__name__
        return update_step(gradient, variable)

    optimizer.update_step = spy
    return seen


def test_lazy_adam_rows_by_hand():
    """Two steps on a 5 x 2 table, against Adam's formulas applied per row."""
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-7
    start = np.arange(10, dtype=np.float32).reshape(5, 2) / 10
    variable = tf.Variable(start)
    optimizer = LazyAdam(lr, beta_1=b1, beta_2=b2, epsilon=eps)
    steps = [
        # Row 1 twice: its values are summed first.
        ([1, 3, 1], [[1.0, -2.0], [0.5, 0.5], [1.0, 0.0]]),
        ([3], [[-1.0, 2.0]]),
    ]
    expected, m, v = start.astype(np.float64), np.zeros((5, 2)), np.zeros((5, 2))
    for t, (rows, values) in enumerate(steps, start=1):
        optimizer.apply_gradients(
            [
                (
                    tf.IndexedSlices(
                        tf.constant(values), tf.constant(rows), tf.constant([5, 2])
                    ),
                    variable,
                )
            ]
        )
        grad = np.zeros((5, 2))
        np.add.at(grad, rows, values)
        touched = sorted(set(rows))
        m[touched] = b1 * m[touched] + (1 - b1) * grad[touched]
        v[touched] = b2 * v[touched] + (1 - b2) * grad[touched] ** 2
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        expected[touched] -= alpha * m[touched] / (np.sqrt(v[touched]) + eps)
        np.testing.assert_allclose(variable.numpy(), expected, rtol=0, atol=1e-6)
    # Rows 0, 2 and 4 were never looked up; row 1 was not at step 2, and kept
    # its step-1 value (Adam would have moved it by its momentum).
    np.testing.assert_array_equal(variable.numpy()[[0, 2, 4]], start[[0, 2, 4]])


def test_lazy_adam_is_adam_for_dense_gradients():
    values = []
    for optimizer in (LazyAdam(0.1), tf.keras.optimizers.Adam(0.1)):
        variable = tf.Variable(tf.ones([3, 2]))
        for scale in (1.0, -0.5):
            optimizer.apply_gradients([(scale * tf.ones([3, 2]), variable)])
        values.append(variable.numpy())
    np.testing.assert_array_equal(values[0], values[1])


@pytest.mark.parametrize(
    "jit", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "xla"]
)
def test_large_tables_take_the_sparse_path_with_the_dense_update_for_sgd(
    synthetic_tasks, synthetic_spec, jit
):
    """Sparse and dense application of a table's gradient: the same SGD update."""
    batch = _batches(synthetic_tasks, synthetic_spec, 1)[0]
    weights, seen = [], []
    for limit in (SPARSE_LIMIT, None):
        model = _model(synthetic_spec, tf.keras.optimizers.SGD(0.1), limit, jit)
        seen.append(_spy_gradient_types(model.optimizer))
        before = _table(model)
        _step(model, batch)
        assert np.abs(_table(model) - before).max() > 1e-4
        weights.append([v.numpy() for v in model.trainable_variables])
    sparse, dense = seen
    assert sparse[ITEM_TABLE] == "IndexedSlices", sparse
    assert dense[ITEM_TABLE] != "IndexedSlices", dense
    # The small tables are applied dense either way.
    assert sparse["segment_embedding"] != "IndexedSlices", sparse
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "shape, sparse", [((1_000_000, 32), True), ((10_000, 32), False)]
)
def test_the_default_limit_keeps_a_million_row_table_sparse(
    synthetic_spec, shape, sparse
):
    model = _model(synthetic_spec, LazyAdam(1e-3))
    gradient = tf.IndexedSlices(
        tf.ones([4, shape[1]]), tf.constant([0, 5, 5, 9]), tf.constant(shape)
    )
    applied = step.dense_table_gradient(
        gradient, model.optimizer, model.dense_table_limit
    )
    assert isinstance(applied, tf.IndexedSlices) is sparse


def test_lazy_adam_moves_only_the_rows_of_the_batch(synthetic_tasks, synthetic_spec):
    """Step 2 changes only the item rows batch 2 looks up; Adam moves others."""
    first, second = _batches(synthetic_tasks, synthetic_spec, 2)
    item = synthetic_spec.request_features[0]
    assert item.name == "item_id" and item.hash_buckets == 400
    ids = set()
    for part in ("support", "query"):
        ids |= set(
            tf.strings.to_hash_bucket_fast(second[f"{part}_item_id"], item.hash_buckets)
            .numpy()
            .ravel()
            .tolist()
        )
    changed = {}
    for name, optimizer in (
        ("lazy", LazyAdam(0.01)),
        ("adam", tf.keras.optimizers.Adam(0.01)),
    ):
        model = _model(synthetic_spec, optimizer, SPARSE_LIMIT, jit=False)
        _step(model, first)
        before = _table(model)
        _step(model, second)
        changed[name] = set(np.flatnonzero(np.any(_table(model) != before, axis=1)))
    assert changed["lazy"] and changed["lazy"] <= ids
    assert changed["adam"] - ids, "Adam should move rows by their momentum"


def test_training_uses_lazy_adam(tmp_path, synthetic_tasks, synthetic_spec):
    model, _ = training.train(
        synthetic_tasks["train"],
        synthetic_spec,
        str(tmp_path / "model"),
        MetaConfig(jit_compile=False),
        epochs=1,
        steps_per_epoch=1,
        batch_tasks=8,
        verbose=0,
        model_kwargs=SMALL,
        on_failure="warn",
    )
    assert isinstance(model.optimizer, LazyAdam)


MIRRORED = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from tf_limaml import data
from tf_limaml.features import FeatureSpec
from tf_limaml.model import LiMAMLModel, MetaConfig
from tf_limaml.optimizers import LazyAdam
spec = FeatureSpec.load(sys.argv[1])
batch = next(iter(data.task_dataset(sys.argv[2], spec, 16, 16, 16)))
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
weights = []
for scope in (strategy.scope(), tf.device("/cpu:0")):
    with scope:
        tf.keras.utils.set_random_seed(0)
        model = LiMAMLModel(spec, MetaConfig(inner_lr=0.5, jit_compile=False),
                            meta_units=[8], global_units=[16], cross_layers=1)
        # The hashed item table (3,200 numbers) takes the sparse path.
        model.dense_table_limit = 1000
        model.compile(optimizer=LazyAdam(0.01))
    for _ in range(2):
        model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
    weights.append({v.name + str(i): v.numpy()
                    for i, v in enumerate(model.trainable_variables)})
print(json.dumps({
    "worst": max(float(np.abs(weights[0][k] - weights[1][k]).max())
                 for k in weights[1]),
    "replicas": strategy.num_replicas_in_sync}))
"""


def test_hashed_tables_under_the_mirrored_strategy(synthetic_tasks):
    """Two replicas, sparse item table, LazyAdam: the one-device weights."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            MIRRORED,
            synthetic_tasks["spec"],
            synthetic_tasks["train"],
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = json.loads(result.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["worst"] < 1e-5, result
