"""The meta-train step under tf.distribute.MirroredStrategy (two logical CPUs)."""

import json
import os
import subprocess
import sys

import numpy as np

SCRIPT = r"""
import json, sys
import tf_limaml
import tensorflow as tf
if len(sys.argv) > 3 and sys.argv[3] == "sabotage":
    # The sabotage companion: no replica scaling, so the replicas' summed
    # gradients are twice the mean.
    tf_limaml.step.replica_mean = lambda loss: loss
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tf_limaml import data
from tf_limaml.model import LiMAMLModel, MetaConfig
spec = tf_limaml.FeatureSpec.load(sys.argv[1])
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
dataset = data.task_dataset(sys.argv[2], spec, batch_tasks=16, drop_remainder=True)
batch = next(iter(dataset))
results = {}
for name, scope in (("mirrored", strategy.scope()), ("single", tf.device("/cpu:0"))):
    with scope:
        tf.keras.utils.set_random_seed(0)
        model = LiMAMLModel(spec, MetaConfig(inner_lr=0.3, jit_compile=False),
                            meta_units=[16, 8], global_units=[32, 16], cross_layers=1)
        model.compile(optimizer=tf.keras.optimizers.SGD(0.1))
    before = [v.numpy().copy() for v in model.trainable_variables]
    history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
    after = [v.numpy() for v in model.trainable_variables]
    results[name] = {"loss": history.history["loss"][-1],
                     "update": [(a - b).tolist() for a, b in zip(after, before)],
                     "replicas": strategy.num_replicas_in_sync if name == "mirrored" else 1}
print(json.dumps(results))
"""


def run_mirrored_and_single(synthetic_tasks, sabotage: bool = False) -> dict:
    """One seeded step on 2 mirrored CPUs and on one device, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [
        sys.executable,
        "-c",
        SCRIPT,
        synthetic_tasks["spec"],
        synthetic_tasks["train"],
    ]
    result = subprocess.run(
        args + (["sabotage"] if sabotage else []),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Elementwise |mirrored - one device| bound on the update of every weight, the
# bound docs/guarantees.md states: the replicas' gradient sums round
# differently, nothing more (measured: 7.5e-9; the largest update is 5e-3).
TOLERANCE = 1e-6


def check_mirrored_equals_single(results: dict) -> None:
    mirrored, single = results["mirrored"], results["single"]
    assert mirrored["replicas"] == 2
    # Each replica sees half the tasks; the loss scaling makes the summed
    # gradients the mean over all 16 tasks, so the updates match.
    assert len(mirrored["update"]) == len(single["update"]) > 0
    moved = 0.0
    for a, b in zip(mirrored["update"], single["update"], strict=True):
        # Element by element: the same update of every weight, not just its size.
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=TOLERANCE)
        moved = max(moved, float(np.abs(np.array(b)).max()))
    # The step moved the weights by far more than the tolerance.
    assert moved > 100 * TOLERANCE, moved


def test_mirrored_strategy_step_equals_single_device_step(synthetic_tasks):
    results = run_mirrored_and_single(synthetic_tasks)
    loss_gap = abs(results["mirrored"]["loss"] - results["single"]["loss"])
    assert loss_gap < TOLERANCE, results
    check_mirrored_equals_single(results)


# One non-finite step under MirroredStrategy on 2 CPUs, with LazyAdam and the
# item table (400 x 8) sparse. argv: spec, tasks, sabotage ("none",
# "where_finite": no zeroing; "all_replicas_finite": each replica zeroes only
# its own gradients).
NONFINITE_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
from tf_limaml import step
if sys.argv[3] == "where_finite":
    step.where_finite = lambda finite, grad: grad
elif sys.argv[3] == "all_replicas_finite":
    step.all_replicas_finite = lambda finite: finite
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tf_limaml
from tf_limaml import data
from tf_limaml.model import LiMAMLModel, MetaConfig
from tf_limaml.optimizers import LazyAdam
spec = tf_limaml.FeatureSpec.load(sys.argv[1])
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
batch = next(iter(data.task_dataset(sys.argv[2], spec, batch_tasks=16,
                                    drop_remainder=True)))
# NaN in task 3 only: the first replica's half of the batch.
values = batch["support_f0"].numpy()
values[3, 0] = np.nan
bad = dict(batch, support_f0=tf.constant(values))
with strategy.scope():
    tf.keras.utils.set_random_seed(0)
    model = LiMAMLModel(spec, MetaConfig(inner_lr=0.3, jit_compile=False),
                        meta_units=[16, 8], global_units=[32, 16], cross_layers=1)
    model.dense_table_limit = 1000
    model.compile(optimizer=LazyAdam(1e-2, global_clipnorm=10.0))
    model.optimizer.build(model.trainable_variables)
gradients = {}
update_step = model.optimizer.update_step
def spy(gradient, variable):
    gradients[variable.name] = type(gradient).__name__
    return update_step(gradient, variable)
model.optimizer.update_step = spy
variables = list(model.trainable_variables) + list(model.optimizer.variables)
before = [v.numpy().copy() for v in variables]
history = model.fit(tf.data.Dataset.from_tensors(bad), epochs=1, verbose=0)
print(json.dumps({
    "loss": history.history["loss"][-1],
    "replicas": strategy.num_replicas_in_sync,
    "trainable": len(model.trainable_variables),
    "compared": [v.name for v in variables],
    "changed": [v.name for v, old in zip(variables, before)
                if not np.array_equal(v.numpy(), old, equal_nan=False)],
    "iterations": int(model.optimizer.iterations.numpy()),
    "iterations_name": model.optimizer.iterations.name,
    "gradients": gradients,
    "named": sorted(model.nonfinite_entities),
    "batch": sorted(e.decode() for e in batch["entity_id"].numpy()),
}))
"""


def run_nonfinite_mirrored_step(synthetic_tasks, sabotage: str = "none") -> dict:
    """NONFINITE_SCRIPT in a subprocess; returns what it printed."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", NONFINITE_SCRIPT, synthetic_tasks["spec"]]
        + [synthetic_tasks["train"], sabotage],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_nonfinite_mirrored_step(result: dict) -> None:
    """The step, non-finite on one replica, moved no weight and no slot.

    Under a strategy the update runs with every replica's gradients zeroed: on
    a first step (no momentum yet) every weight and LazyAdam slot is bit-equal;
    only `iterations` counts the step.
    """
    assert result["replicas"] == 2
    assert not np.isfinite(result["loss"]), result["loss"]
    # The sparse branch ran: the item table's gradient reached LazyAdam as
    # IndexedSlices, the small tables' dense.
    kinds = result["gradients"]
    assert kinds["item_id_embedding:0"] == "IndexedSlices", kinds
    assert kinds["segment_embedding:0"] != "IndexedSlices", kinds
    # Every weight, its m and v, and `iterations`.
    assert len(result["compared"]) == 3 * result["trainable"] + 1, result
    changed = [n for n in result["changed"] if n != result["iterations_name"]]
    assert not changed, f"{len(changed)} weights or slots changed: {changed[:8]}"
    assert result["iterations"] == 1
    # Every replica recorded its tasks: the error names the whole batch.
    assert result["named"] == result["batch"], result["named"]


def test_mirrored_nonfinite_step_moves_no_weight_or_slot(synthetic_tasks):
    check_nonfinite_mirrored_step(run_nonfinite_mirrored_step(synthetic_tasks))
