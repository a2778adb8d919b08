"""Training under tf.distribute: mirrored and two MultiWorkerMirroredStrategy workers.

The two workers are processes on 127.0.0.1, each with its TF_CONFIG, as on two
machines. The unit of the batch is a task, so two workers that split a global
batch of tasks take the one-device step.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from guarantees import check_restored_state_equals_checkpoint, checkpoint_tensors

from tf_limaml import cli, training
from tf_limaml.model import LiMAMLModel, MetaConfig
from tf_limaml.saving import load_model

SMALL = {"meta_units": [16, 8], "global_units": [32, 16], "cross_layers": 1}
# Elementwise |multi-worker - one device| bound on the weights after the SGD
# steps below: the replicas' gradient sums round differently, nothing more
# (measured: 1.5e-8; with auto-sharding OFF, 7e-3).
TOLERANCE = 1e-6

WORKER = r"""
import json, os, sys, time
args = json.loads(sys.argv[1])
from tf_limaml import distribute
# First, before TensorFlow runs any op (the runtime is configured here).
strategy = distribute.get_strategy(args.pop("strategy"))
import tensorflow as tf
from tf_limaml import training
from tf_limaml.features import FeatureSpec
from tf_limaml.model import LiMAMLModel, MetaConfig

LiMAMLModel.dense_table_limit = args.pop("dense_table_limit", 1 << 22)


class Interrupted(Exception):
    pass


class Steps(tf.keras.callbacks.Callback):
    def __init__(self, stop_at, pause):
        super().__init__()
        self.stop_at, self.pause, self.steps, self.restored = stop_at, pause, 0, None

    def on_train_begin(self, logs=None):
        # BackupAndRestore, earlier in the list, has restored by now.
        self.restored = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.stop_at:
            raise Interrupted()
        # A slow step leaves a test time to kill a worker mid-run; the
        # checkpoint of this step (BackupAndRestore runs first) is written.
        time.sleep(self.pause)


class WriteRestoredState(tf.keras.callbacks.Callback):
    # Every worker writes its state as restored (the write is collective).
    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_begin(self, logs=None):
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        tf.train.Checkpoint(model=self.model).write(
            os.path.join(self.path, f"worker{index}", "state"))
        result["trainable"] = len(self.model.trainable_variables)


steps = Steps(args.pop("stop_at"), args.pop("pause", 0))
callbacks = [steps]
snapshot = args.pop("write_restored_state", None)
if snapshot:
    callbacks.append(WriteRestoredState(snapshot))
# SGD unless told otherwise: the one-device comparisons hold it to 1e-6.
sgd = args.pop("optimizer", "sgd") == "sgd"
result = {"interrupted": False}
try:
    model, _ = training.train(
        spec=FeatureSpec.load(args.pop("spec")),
        meta_config=MetaConfig(**args.pop("meta")),
        strategy=strategy,
        callbacks=callbacks,
        optimizer=(lambda: tf.keras.optimizers.SGD(0.1)) if sgd else None,
        verbose=0,
        **args,
    )
    result["iterations"] = int(model.optimizer.iterations.numpy())
except Interrupted:
    result["interrupted"] = True
result.update(restored=steps.restored, steps=steps.steps,
              replicas=strategy.num_replicas_in_sync,
              chief=distribute.is_chief(strategy))
print(json.dumps(result), flush=True)
# Skip the runtime's teardown: the collective executor can outlive a stopped run.
os._exit(0)
"""


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(train_args, workers=2, stop_at=0, pause=0):
    """Starts WORKER in `workers` processes of one cluster; returns them."""
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(workers)]
    base = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    base.update(PYTHONPATH=os.getcwd(), TF_CPP_MIN_LOG_LEVEL="3")
    args = json.dumps(
        {**train_args, "strategy": "multi_worker", "stop_at": stop_at, "pause": pause}
    )
    processes = []
    for index in range(workers):
        config = {
            "cluster": {"worker": addresses},
            "task": {"type": "worker", "index": index},
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, args],
                env={**base, "TF_CONFIG": json.dumps(config)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def _run_workers(train_args, workers=2, stop_at=0, timeout=600):
    """Runs WORKER in `workers` processes of one cluster; returns their results."""
    processes = _start_workers(train_args, workers, stop_at)
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            assert process.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return results


def _train_args(tasks, model_dir, **overrides):
    return {
        "tasks": tasks["train"],
        "spec": tasks["spec"],
        "model_dir": str(model_dir),
        "meta": {"inner_lr": 0.5, "jit_compile": False},
        "model_kwargs": SMALL,
        "epochs": 1,
        "steps_per_epoch": 4,
        "batch_tasks": 16,
        "seed": 5,
        **overrides,
    }


def _train_here(tasks, spec, model_dir, strategy, stop_at=0, **overrides):
    """training.train in this process; returns the Steps-like counts."""
    args = _train_args(tasks, model_dir, **overrides)
    args.pop("spec")
    meta = MetaConfig(**args.pop("meta"))
    counts = {"steps": 0, "restored": None}

    class Interrupted(Exception):
        pass

    class Steps(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            counts["restored"] = int(self.model.optimizer.iterations.numpy())

        def on_train_batch_end(self, batch, logs=None):
            counts["steps"] += 1
            if counts["steps"] == stop_at:
                raise Interrupted()

    try:
        model, _ = training.train(
            spec=spec,
            meta_config=meta,
            strategy=strategy,
            callbacks=[Steps()],
            optimizer=lambda: tf.keras.optimizers.SGD(0.1),
            verbose=0,
            **args,
        )
        counts["iterations"] = int(model.optimizer.iterations.numpy())
    except Interrupted:
        counts["interrupted"] = True
    return counts


def _weights(model_dir):
    return {
        v.name + str(i): v.numpy()
        for i, v in enumerate(load_model(model_dir).trainable_variables)
    }


@pytest.mark.slow
def test_two_workers_take_the_one_device_steps(
    tmp_path, synthetic_tasks, synthetic_spec, monkeypatch
):
    """Same seed and global batch of 16 tasks: 8 per worker, the same weights.

    The hashed item table (400 x 8) is applied sparse (its rows all-gathered),
    the two small tables dense (all-reduced).
    """
    monkeypatch.setattr(LiMAMLModel, "dense_table_limit", 1000)
    results = _run_workers(
        _train_args(synthetic_tasks, tmp_path / "workers", dense_table_limit=1000)
    )
    assert [r["replicas"] for r in results] == [2, 2]
    assert [r["chief"] for r in results] == [True, False]
    assert [r["iterations"] for r in results] == [4, 4]
    _train_here(synthetic_tasks, synthetic_spec, tmp_path / "single", "none")
    workers, single = _weights(tmp_path / "workers"), _weights(tmp_path / "single")
    moved = 0.0
    for name, value in single.items():
        np.testing.assert_allclose(workers[name], value, rtol=0, atol=TOLERANCE)
        moved = max(moved, float(np.abs(value - _initial(synthetic_spec)[name]).max()))
    # The steps moved the weights by far more than the tolerance.
    assert moved > 100 * TOLERANCE
    # Only the chief wrote the model directory; the other worker's files are gone.
    assert not list((tmp_path / "workers" / "backup").glob("workertemp_*/*"))


def _initial(spec):
    tf.keras.utils.set_random_seed(5)
    model = LiMAMLModel(spec, MetaConfig(inner_lr=0.5, jit_compile=False), **SMALL)
    return {v.name + str(i): v.numpy() for i, v in enumerate(model.trainable_variables)}


@pytest.mark.slow
def test_two_workers_resume_from_the_chief_checkpoint(tmp_path, synthetic_tasks):
    args = _train_args(
        synthetic_tasks, tmp_path / "model", steps_per_epoch=6, checkpoint_every=2
    )
    first = _run_workers(args, stop_at=3)
    assert all(r["interrupted"] and r["steps"] == 3 for r in first)
    checkpoint = tf.train.latest_checkpoint(
        str(tmp_path / "model" / "backup" / "chief")
    )
    assert checkpoint is not None
    second = _run_workers(args)
    for result in second:
        # Restored at step 2 (the checkpoint before the interruption) and ran
        # only the 4 steps left.
        assert result["restored"] == 2, second
        assert result["steps"] == 4 and result["iterations"] == 6, second


# A hung worker fails the test instead of blocking CI.
KILL_TIMEOUT = 240
ITERATIONS = "model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"


def _wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_workers_resume_after_one_worker_is_killed(tmp_path, synthetic_tasks):
    """SIGKILL worker 1 mid-run, then restart the cluster as a manager would.

    The chief then blocks in (or fails out of) a collective op, so it is killed
    too; the restarted workers resume from the chief's checkpoint: right after
    the restore, every worker's weights, LazyAdam slots and `iterations` equal
    its tensors.
    """
    total = 60
    args = _train_args(
        synthetic_tasks,
        tmp_path / "model",
        steps_per_epoch=total,
        checkpoint_every=2,
        optimizer="lazy_adam",
    )
    backup = str(tmp_path / "model" / "backup" / "chief")
    chief, worker = _start_workers(args, pause=0.25)
    try:
        _wait(
            lambda: tf.train.latest_checkpoint(backup) is not None
            or chief.poll() is not None,
            KILL_TIMEOUT,
            "the chief's first checkpoint",
        )
        # Both still training: the kill lands mid-run.
        codes = [chief.poll(), worker.poll()]
        assert codes == [None, None], f"a worker exited before the kill: {codes}"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=KILL_TIMEOUT)
        try:
            chief.wait(timeout=10)
        except subprocess.TimeoutExpired:
            chief.send_signal(signal.SIGKILL)
            chief.wait(timeout=KILL_TIMEOUT)
    finally:
        for process in (chief, worker):
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert worker.returncode == -signal.SIGKILL
    checkpoint = tf.train.latest_checkpoint(backup)
    step = int(tf.train.load_checkpoint(checkpoint).get_tensor(ITERATIONS))
    assert 0 < step < total, step
    # Read now: the finished run deletes its checkpoints.
    chief_checkpoint = checkpoint_tensors(checkpoint)

    restored = tmp_path / "restored"
    restarted = _run_workers(
        dict(args, write_restored_state=str(restored)), timeout=KILL_TIMEOUT
    )
    assert [r["chief"] for r in restarted] == [True, False], restarted
    for index, result in enumerate(restarted):
        assert result["restored"] == step, (step, restarted)
        assert result["steps"] == total - step, (step, restarted)
        assert result["iterations"] == total, restarted
        check_restored_state_equals_checkpoint(
            checkpoint_tensors(str(restored / f"worker{index}" / "state")),
            chief_checkpoint,
            result["trainable"],
        )


@pytest.mark.parametrize("strategy", ["none", "mirrored"])
def test_training_resumes_under_a_strategy(
    tmp_path, synthetic_tasks, synthetic_spec, strategy
):
    model_dir = tmp_path / "model"
    kwargs = {"steps_per_epoch": 6, "checkpoint_every": 2}
    first = _train_here(
        synthetic_tasks, synthetic_spec, model_dir, strategy, stop_at=3, **kwargs
    )
    assert first.get("interrupted") and first["restored"] == 0
    second = _train_here(synthetic_tasks, synthetic_spec, model_dir, strategy, **kwargs)
    assert second["restored"] == 2, second
    assert second["steps"] == 4 and second["iterations"] == 6, second


# ------------------------------------------------------------------ the command
def _train_argv(tasks, model_dir, meta_path, *extra):
    return [
        "train",
        "--tasks",
        tasks["train"],
        "--features",
        tasks["spec"],
        "--model-dir",
        str(model_dir),
        "--meta-config",
        str(meta_path),
        "--epochs",
        "1",
        "--batch-tasks",
        "16",
        *extra,
    ]


@pytest.fixture
def meta_path(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"inner_lr": 0.5, "jit_compile": False}))
    return path


@pytest.mark.parametrize(
    "tf_config, message",
    [
        (None, "reads the cluster from the TF_CONFIG environment variable"),
        ('{"cluster": ', "TF_CONFIG is not valid JSON"),
        ('["worker"]', "TF_CONFIG must be a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', 'needs a non-empty "cluster"'),
        (
            '{"cluster": {"worker": ["127.0.0.1"]}, '
            '"task": {"type": "worker", "index": 0}}',
            'must be a non-empty list of "host:port"',
        ),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}}', 'needs a "task" object'),
        (
            '{"cluster": {"worker": ["127.0.0.1:1"]}, '
            '"task": {"type": "chief", "index": 0}}',
            "task type 'chief' is not a job of the cluster",
        ),
        (
            '{"cluster": {"worker": ["127.0.0.1:1"]}, '
            '"task": {"type": "worker", "index": 1}}',
            "task index 1 is not an index",
        ),
    ],
)
def test_multi_worker_needs_a_good_tf_config(
    tmp_path, synthetic_tasks, meta_path, monkeypatch, capsys, tf_config, message
):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    argv = _train_argv(
        synthetic_tasks, tmp_path / "m", meta_path, "--strategy", "multi_worker"
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("limaml train: error: "), err
    assert message in err[0], err
    assert not (tmp_path / "m").exists()


def test_devices_need_the_mirrored_strategy(
    tmp_path, synthetic_tasks, meta_path, capsys
):
    argv = _train_argv(synthetic_tasks, tmp_path / "m", meta_path, "--devices", "2")
    assert cli.main(argv) == 2
    assert "--devices applies to --strategy mirrored" in capsys.readouterr().err


def test_train_command_under_the_mirrored_strategy(
    tmp_path, synthetic_tasks, meta_path, capsys
):
    argv = _train_argv(
        synthetic_tasks, tmp_path / "m", meta_path, "--strategy", "mirrored"
    )
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert "strategy mirrored: 1 replica(s)" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["model_dir"] == str(
        tmp_path / "m"
    )
    assert (tmp_path / "m" / "weights" / "model.index").exists()


@pytest.mark.slow
def test_train_command_on_two_cpus_and_on_a_one_worker_cluster(
    tmp_path, synthetic_tasks, meta_path
):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(PYTHONPATH=os.getcwd(), TF_CPP_MIN_LOG_LEVEL="3")
    (port,) = _free_ports(1)
    worker = {
        "cluster": {"worker": [f"127.0.0.1:{port}"]},
        "task": {"type": "worker", "index": 0},
    }
    runs = {
        "mirrored": (["--strategy", "mirrored", "--devices", "2"], env, 2),
        "multi_worker": (
            ["--strategy", "multi_worker"],
            {**env, "TF_CONFIG": json.dumps(worker)},
            1,
        ),
    }
    processes = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tf_limaml.cli",
                *_train_argv(synthetic_tasks, tmp_path / name, meta_path, *flags),
            ],
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (flags, run_env, _) in runs.items()
    }
    for name, process in processes.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        assert f"strategy {name}: {runs[name][2]} replica(s)" in err
        assert json.loads(out.strip().splitlines()[-1])["final"]["loss"] > 0
        assert (tmp_path / name / "weights" / "model.index").exists()


@pytest.mark.slow
def test_demo_trains_its_models_under_the_strategy(tmp_path, monkeypatch, capsys):
    strategies = []
    original = training.train

    def spy(*args, **kwargs):
        model, history = original(*args, **kwargs)
        strategies.append(type(model.distribute_strategy).__name__)
        return model, history

    monkeypatch.setattr(training, "train", spy)
    argv = ["demo", "--dataset", "synthetic", "--fast", "--epochs", "1"]
    argv += ["--workdir", str(tmp_path), "--strategy", "mirrored"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert strategies == ["MirroredStrategy", "MirroredStrategy"]
    assert (tmp_path / "report.json").exists()
