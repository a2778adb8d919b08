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


def check_mirrored_equals_single(results: dict) -> None:
    mirrored, single = results["mirrored"], results["single"]
    assert mirrored["replicas"] == 2
    # Each replica sees half the tasks; the loss scaling makes the summed
    # gradients the mean over all 16 tasks, so the updates match.
    assert len(mirrored["update"]) == len(single["update"]) > 0
    moved = 0
    for a, b in zip(mirrored["update"], single["update"], strict=True):
        # Element by element: the same update of every weight, not just its size.
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-3, atol=1e-6)
        moved += int(np.count_nonzero(np.array(b)))
    assert moved > 0, "the step moved no weight"


def test_mirrored_strategy_step_equals_single_device_step(synthetic_tasks):
    results = run_mirrored_and_single(synthetic_tasks)
    assert abs(results["mirrored"]["loss"] - results["single"]["loss"]) < 1e-4, results
    check_mirrored_equals_single(results)
