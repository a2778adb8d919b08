"""Training runs: resume after SIGKILL, non-finite losses, determinism."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tf_limaml import data, training
from tf_limaml.datasets import synthetic
from tf_limaml.model import MetaConfig, load_model

SMALL = {"meta_units": [16, 8], "global_units": [32, 16], "cross_layers": 1}


def _train_command(tasks, model_dir, meta, epochs=4):
    return [
        sys.executable,
        "-m",
        "tf_limaml.cli",
        "train",
        "--tasks",
        tasks["train"],
        "--features",
        tasks["spec"],
        "--model-dir",
        str(model_dir),
        "--meta-config",
        str(meta),
        "--epochs",
        str(epochs),
        "--batch-tasks",
        "16",
        "--checkpoint-every",
        "3",
        "--seed",
        "7",
    ]


def _env():
    return {**os.environ, "PYTHONPATH": os.getcwd(), "TF_CPP_MIN_LOG_LEVEL": "3"}


def _checkpoints(model_dir):
    backup = os.path.join(model_dir, "backup")
    return [
        f for root, _, files in os.walk(backup) for f in files if f.endswith(".index")
    ]


@pytest.mark.slow
def test_training_resumes_after_sigkill(tmp_path, synthetic_tasks):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"inner_lr": 0.5, "jit_compile": False}))
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(
        _train_command(synthetic_tasks, reference_dir, meta),
        check=True,
        env=_env(),
        capture_output=True,
        timeout=600,
    )
    process = subprocess.Popen(
        _train_command(synthetic_tasks, killed_dir, meta),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    backup = os.path.join(killed_dir, "backup", "chief")
    # Kill as soon as a checkpoint is complete (its state file names it): the
    # whole run now ends about a second after the first one is written.
    while time.time() < deadline and not (
        _checkpoints(killed_dir) and tf.train.latest_checkpoint(backup)
    ):
        time.sleep(0.02)
    assert process.poll() is None, "training finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "weights").exists()
    # The checkpoint left behind is readable.
    model = training.LiMAMLModel.from_config(
        json.loads((killed_dir / "config.json").read_text())
    )
    latest = tf.train.latest_checkpoint(os.path.join(killed_dir, "backup", "chief"))
    assert latest is not None
    tf.train.Checkpoint(model=model).read(latest).expect_partial()
    subprocess.run(
        _train_command(synthetic_tasks, killed_dir, meta),
        check=True,
        env=_env(),
        capture_output=True,
        timeout=600,
    )
    batches = list(
        data.task_dataset(
            synthetic_tasks["test"], load_model(reference_dir).spec, 64, 32, 32
        )
    )
    from tf_limaml import evaluation

    resumed = evaluation.evaluate_model(load_model(killed_dir), batches)["adapted"]
    reference = evaluation.evaluate_model(load_model(reference_dir), batches)["adapted"]
    # Resuming mid-epoch replays that epoch's order from its start, so the runs
    # see batches in a different order: close, not identical.
    assert abs(resumed["auc"] - reference["auc"]) < 0.03, (resumed, reference)
    assert abs(resumed["loss"] - reference["loss"]) < 0.03, (resumed, reference)


def test_nonfinite_loss_names_step_and_entities(tmp_path, synthetic_spec):
    rows = synthetic.generate_interactions(num_entities=40, seed=3)
    from tf_limaml.tasks import build_tasks

    histories, _, _ = build_tasks(synthetic_spec, rows)
    bad = histories[5]
    bad.support[0]["f0"] = float("nan")
    path = tmp_path / "train.tfrecord.gz"
    data.write_tasks(path, data.tasks_from_histories(synthetic_spec, histories))
    with pytest.raises(training.NonFiniteLossError) as info:
        training.train(
            str(path),
            synthetic_spec,
            str(tmp_path / "model"),
            MetaConfig(jit_compile=False),
            epochs=2,
            batch_tasks=8,
            checkpoint_every=1,
            verbose=0,
            model_kwargs=SMALL,
        )
    message = str(info.value)
    assert "training step" in message and bad.entity_id in message
    model = load_model(tmp_path / "model")  # the last good checkpoint
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


def test_same_seed_gives_identical_weights(tmp_path, synthetic_tasks, synthetic_spec):
    weights = []
    for run in range(2):
        model, _ = training.train(
            synthetic_tasks["train"],
            synthetic_spec,
            str(tmp_path / f"run{run}"),
            MetaConfig(jit_compile=False),
            epochs=1,
            batch_tasks=32,
            seed=11,
            verbose=0,
            model_kwargs=SMALL,
        )
        weights.append([v.numpy() for v in model.trainable_variables])
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)
