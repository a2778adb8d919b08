"""Training runs: resume after SIGKILL, non-finite losses, determinism."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from guarantees import (
    COUNTING_CLI,
    check_nonfinite_step_is_not_applied,
    check_resume_runs_only_the_remaining_steps,
    train_counting_steps,
)

from tf_limaml import data, training
from tf_limaml.datasets import synthetic
from tf_limaml.model import MetaConfig
from tf_limaml.saving import load_model

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
    steps_file = tmp_path / "steps"
    steps_total = 4 * math.ceil(data.count_tasks(synthetic_tasks["train"]) / 16)

    def run_again():
        subprocess.run(
            [sys.executable, "-c", COUNTING_CLI, str(steps_file)]
            + _train_command(synthetic_tasks, killed_dir, meta)[3:],
            check=True,
            env=_env(),
            capture_output=True,
            timeout=600,
        )
        return int(steps_file.read_text())

    check_resume_runs_only_the_remaining_steps(str(killed_dir), steps_total, run_again)
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


def test_training_resumes_from_its_checkpoint(crashed_training, tmp_path):
    """In process and fast: a crashed run's re-run does only the steps left."""
    model_dir = tmp_path / "model"
    shutil.copytree(crashed_training["model_dir"], model_dir)
    k = check_resume_runs_only_the_remaining_steps(
        str(model_dir),
        crashed_training["steps_total"],
        lambda: train_counting_steps(lambda: crashed_training["train"](model_dir)),
    )
    assert k == 3  # checkpoints every 3 steps, crashed after 5


def _poisoned_tasks(tmp_path, spec, bad_step, batch_tasks=8, seed=0):
    """Tasks whose first non-finite batch is training step `bad_step` (1-based).

    Returns:
        (path, entity ids of that batch, the poisoned entity id).
    """
    from tf_limaml.tasks import build_tasks

    rows = synthetic.generate_interactions(num_entities=40, seed=3)
    histories, _, _ = build_tasks(spec, rows)
    path = tmp_path / "train.tfrecord.gz"
    data.write_tasks(path, data.tasks_from_histories(spec, histories))
    # The order training will see: the same dataset call, the same seeds.
    tf.keras.utils.set_random_seed(seed)
    batches = data.task_dataset(
        str(path), spec, batch_tasks, 32, 32, shuffle=True, seed=seed, repeat=True
    )
    ids = next(iter(batches.skip(bad_step - 1)))["entity_id"].numpy()
    batch_ids = sorted(e.decode() for e in ids)
    bad = next(h for h in histories if h.entity_id == batch_ids[0])
    bad.support[0]["f0"] = float("nan")
    data.write_tasks(path, data.tasks_from_histories(spec, histories))
    return str(path), batch_ids, bad.entity_id


def test_nonfinite_loss_names_step_and_entities(tmp_path, synthetic_spec):
    path, batch_ids, bad_id = _poisoned_tasks(tmp_path, synthetic_spec, bad_step=3)
    with pytest.raises(training.NonFiniteLossError) as info:
        training.train(
            path,
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
    assert "Non-finite loss at training step 3 (batch 2 of its epoch)" in message
    named = message.split("entities [")[1].split("]")[0].split(", ")
    assert sorted(named) == batch_ids and bad_id in named
    # The last good checkpoint is step 2's, and it is finite.
    latest = tf.train.latest_checkpoint(str(tmp_path / "model" / "backup" / "chief"))
    reader = tf.train.load_checkpoint(latest)
    assert (
        reader.get_tensor("model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 2
    )
    model = training.LiMAMLModel.from_config(
        json.loads((tmp_path / "model" / "config.json").read_text())
    )
    tf.train.Checkpoint(model=model).read(latest).expect_partial()
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_nonfinite_step_leaves_every_weight_bit_equal(
    synthetic_tasks, synthetic_spec, jit_compile
):
    spec = synthetic_spec
    batch = next(iter(data.task_dataset(synthetic_tasks["train"], spec, 8)))
    bad = dict(batch)
    values = bad["support_f0"].numpy()
    values[3, 0] = np.nan
    bad["support_f0"] = tf.constant(values)
    tf.keras.utils.set_random_seed(0)
    model = training.LiMAMLModel(spec, MetaConfig(jit_compile=jit_compile), **SMALL)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2, global_clipnorm=10.0))
    named = check_nonfinite_step_is_not_applied(model, batch, bad)
    assert named == [e.decode() for e in batch["entity_id"].numpy()]


def test_same_seed_gives_identical_weights(tmp_path, synthetic_tasks, synthetic_spec):
    check_same_seed_gives_identical_weights(tmp_path, synthetic_tasks, synthetic_spec)


def check_same_seed_gives_identical_weights(tmp_path, synthetic_tasks, synthetic_spec):
    """Two trainings with seed 11 end with bit-identical weights."""
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
