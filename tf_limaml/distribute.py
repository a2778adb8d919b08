"""Distribution strategies by name, `TF_CONFIG` checks, and which worker writes.

`limaml train --strategy` and `training.train(strategy=...)` take a name:

* `"none"`: the default strategy (one device);
* `"mirrored"`: `tf.distribute.MirroredStrategy` over this machine's GPUs (or
  its CPU; `devices=N` splits the CPU into N logical devices, for testing);
* `"multi_worker"`: `tf.distribute.MultiWorkerMirroredStrategy`, with the
  cluster and this worker's place in it read from `TF_CONFIG`.

The unit of the batch is a task: a global batch of T tasks is cut into T / R
tasks per replica, each replica's loss is divided by R, and the summed
gradients are the mean over the T tasks, as on one device.

Example (each of two workers runs, with its own task index):

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' \\
        limaml train --strategy multi_worker ...
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import tensorflow as tf

from tf_limaml.errors import UserInputError

STRATEGIES = ("none", "mirrored", "multi_worker")
_ADDRESS = re.compile(r"^[^\s:]+:\d+$")
_EXAMPLE_TF_CONFIG = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}'
)


class StrategyError(UserInputError):
    """A strategy that cannot be built as asked; the message says what to fix."""


def read_tf_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The cluster of a multi-worker run, from the `TF_CONFIG` variable, checked.

    Args:
        environ: The environment (default `os.environ`).

    Returns:
        The parsed `TF_CONFIG`: `{"cluster": {job: [host:port, ...]}, "task":
        {"type": job, "index": i}}`.

    Raises:
        StrategyError: `TF_CONFIG` is unset, not JSON, or not a cluster with
            this worker in it.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "")
    if not raw.strip():
        raise StrategyError(
            "--strategy multi_worker reads the cluster from the TF_CONFIG "
            "environment variable, which is not set; set it on every worker, e.g. "
            f"TF_CONFIG='{_EXAMPLE_TF_CONFIG}' (index 0, 1, ... per worker)"
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise StrategyError(
            f"TF_CONFIG is not valid JSON ({err}): {raw[:200]!r}"
        ) from None
    if not isinstance(config, dict):
        raise StrategyError(f"TF_CONFIG must be a JSON object, got {raw[:200]!r}")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise StrategyError(
            f'TF_CONFIG needs a non-empty "cluster" object (job name -> list of '
            f"host:port), got {cluster!r}; e.g. {_EXAMPLE_TF_CONFIG}"
        )
    for job, addresses in cluster.items():
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and _ADDRESS.match(a) for a in addresses)
        ):
            raise StrategyError(
                f"TF_CONFIG cluster[{job!r}] must be a non-empty list of "
                f'"host:port" strings, got {addresses!r}'
            )
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise StrategyError(
            f'TF_CONFIG needs a "task" object with "type" and "index" (this '
            f"worker's place in the cluster), got {task!r}"
        )
    if task["type"] not in cluster:
        raise StrategyError(
            f"TF_CONFIG task type {task['type']!r} is not a job of the cluster "
            f"{sorted(cluster)}"
        )
    index = task["index"]
    if (
        isinstance(index, bool)
        or not isinstance(index, int)
        or not 0 <= index < len(cluster[task["type"]])
    ):
        raise StrategyError(
            f"TF_CONFIG task index {index!r} is not an index of "
            f"cluster[{task['type']!r}] (0..{len(cluster[task['type']]) - 1})"
        )
    return config


def get_strategy(
    strategy: tf.distribute.Strategy | str | None = None, devices: int | None = None
) -> tf.distribute.Strategy:
    """A `tf.distribute.Strategy` from a name (or the strategy itself).

    `"mirrored"` with `devices` and `"multi_worker"` configure TensorFlow's
    runtime, so build them at the start of the program, before TensorFlow runs
    any op (`limaml train` does).

    Args:
        strategy: A strategy (returned as is), one of `STRATEGIES`, or None for
            the strategy in scope (the default strategy outside any scope).
        devices: With `"mirrored"`: replicas, the first N GPUs, or on a machine
            without GPUs N logical CPU devices (for testing). None: every GPU,
            or the CPU.

    Raises:
        StrategyError: An unknown name, a bad `devices`, a missing or
            malformed `TF_CONFIG`, or a runtime that is already started.
    """
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if strategy is None:
        return tf.distribute.get_strategy()
    if strategy not in STRATEGIES:
        raise StrategyError(
            f"strategy must be one of {STRATEGIES} or a tf.distribute.Strategy, "
            f"got {strategy!r}"
        )
    if devices is not None and (
        isinstance(devices, bool) or not isinstance(devices, int) or devices < 1
    ):
        raise StrategyError(f"devices must be a positive integer, got {devices!r}")
    if devices is not None and strategy != "mirrored":
        raise StrategyError(
            f"devices applies to the mirrored strategy only, got strategy "
            f"{strategy!r} with devices={devices}"
        )
    if strategy == "none":
        return tf.distribute.get_strategy()
    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy(_mirrored_devices(devices))
    read_tf_config()
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as err:
        raise StrategyError(
            f"MultiWorkerMirroredStrategy could not start ({err}); build it "
            "before TensorFlow runs any op: call "
            "tf_limaml.distribute.get_strategy('multi_worker') first in the program"
        ) from None


def _mirrored_devices(devices: int | None) -> list[str] | None:
    """Device names for MirroredStrategy (None: its default, every GPU or the CPU)."""
    if devices is None:
        return None
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if devices > len(gpus):
            raise StrategyError(
                f"devices={devices}, but this machine has {len(gpus)} GPU(s)"
            )
        return [f"/gpu:{i}" for i in range(devices)]
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu) or [None]
    if len(current) != devices:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * devices
            )
        except RuntimeError as err:
            raise StrategyError(
                f"cannot split the CPU into {devices} devices ({err}); build the "
                "strategy before TensorFlow runs any op"
            ) from None
    return [f"/cpu:{i}" for i in range(devices)]


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this worker writes the run's files (always, outside multi-worker).

    The chief is the "chief" task, or worker 0 of a cluster without one.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    jobs = resolver.cluster_spec().as_dict()
    return (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in jobs
    )


@contextlib.contextmanager
def write_dir(model_dir: str, strategy: tf.distribute.Strategy) -> Iterator[str]:
    """The directory this worker writes a run's files to.

    `model_dir` on the chief. Other workers of a multi-worker run get a
    temporary directory, deleted on exit: they must still write (a checkpoint
    write is collective under MultiWorkerMirroredStrategy), but not where the
    chief does.
    """
    if is_chief(strategy):
        yield model_dir
        return
    path = tempfile.mkdtemp(prefix="limaml-worker-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
