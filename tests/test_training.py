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
    check_restored_state_equals_checkpoint,
    check_resume_runs_only_the_remaining_steps,
    checkpoint_tensors,
    resume_and_write_restored_state,
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


def test_resume_restores_every_weight_and_optimizer_slot(crashed_training, tmp_path):
    """Right after the restore, before any step: the weights, LazyAdam's m and
    v of every trainable weight and `iterations` equal the checkpoint's."""
    compared = check_resume_restores_the_checkpoint(crashed_training, tmp_path)
    assert compared > 20, compared


def check_resume_restores_the_checkpoint(crashed_training, tmp_path) -> int:
    """Resumes a copy of the crashed run as `training.train` does and compares
    its state, right after BackupAndRestore's restore, with the checkpoint."""
    model_dir = tmp_path / "model"
    shutil.copytree(crashed_training["model_dir"], model_dir)
    latest = tf.train.latest_checkpoint(str(model_dir / "backup" / "chief"))
    assert latest is not None
    checkpoint = checkpoint_tensors(latest)
    written = resume_and_write_restored_state(
        lambda **kwargs: crashed_training["train"](model_dir, **kwargs),
        str(tmp_path / "restored" / "state"),
    )
    return check_restored_state_equals_checkpoint(
        checkpoint_tensors(written["path"]), checkpoint, written["trainable"]
    )


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

    # The re-run resumes at step 2 and meets the poisoned batch again: the
    # error names the step of the whole run, 2 + the steps this run took.
    finite_steps = []

    class CountFiniteSteps(tf.keras.callbacks.Callback):
        # After StopOnNonFiniteLoss in the list: the failing step never gets here.
        def on_train_batch_end(self, batch, logs=None):
            finite_steps.append(batch)

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
            callbacks=[CountFiniteSteps()],
        )
    step = 2 + len(finite_steps) + 1
    assert f"Non-finite loss at training step {step} (batch" in str(info.value), (
        finite_steps,
        str(info.value),
    )


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


# Trains a tiny model with seed 11 in this process and writes its weights:
# argv = tasks, spec, output directory, "seed" or "sabotage" (seed from the pid),
# the architecture as JSON.
SEEDED_TRAINING = r"""
import json, os, sys
import numpy as np
import tensorflow as tf
from tf_limaml import training
from tf_limaml.features import FeatureSpec
from tf_limaml.model import MetaConfig

tasks, spec, out, mode = sys.argv[1:5]
training.HEALTH_BATCHES = 1  # the check after training is not under test here
if mode == "sabotage":
    # The seed is ignored: each process seeds from its own pid.
    set_seed = tf.keras.utils.set_random_seed
    tf.keras.utils.set_random_seed = lambda seed: set_seed(os.getpid())
model, _ = training.train(
    tasks, FeatureSpec.load(spec), os.path.join(out, "model"),
    MetaConfig(jit_compile=False), epochs=1, steps_per_epoch=4, batch_tasks=16,
    seed=11, verbose=0, model_kwargs=json.loads(sys.argv[5]), on_failure="warn",
)
np.savez(os.path.join(out, "weights.npz"),
         *[v.numpy() for v in model.trainable_variables])
"""


def train_in_two_processes(tmp_path, synthetic_tasks, sabotage=False) -> list:
    """SEEDED_TRAINING in two child processes at once, with other PYTHONHASHSEEDs.

    Returns:
        Each process's trainable weights, in order.
    """
    processes, outs = [], []
    for run, hash_seed in enumerate(("1", "2")):
        out = tmp_path / f"process{run}"
        out.mkdir()
        outs.append(out)
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", SEEDED_TRAINING, synthetic_tasks["train"]]
                + [synthetic_tasks["spec"], str(out)]
                + ["sabotage" if sabotage else "seed", json.dumps(SMALL)],
                env={**_env(), "PYTHONHASHSEED": hash_seed},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    weights = []
    for out in outs:
        with np.load(out / "weights.npz") as arrays:
            weights.append([arrays[f"arr_{i}"] for i in range(len(arrays.files))])
    return weights


def check_same_seed_gives_identical_weights(weights: list) -> None:
    """The processes' weights are bit-identical, array by array."""
    first, second = weights
    assert len(first) == len(second) > 0
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.shape, b.shape)
        assert a.tobytes() == b.tobytes(), f"weight {i} differs between the processes"


def test_same_seed_gives_identical_weights_in_two_processes(tmp_path, synthetic_tasks):
    check_same_seed_gives_identical_weights(
        train_in_two_processes(tmp_path, synthetic_tasks)
    )


def test_steps_per_execution_runs_every_step_as_single_steps_do(
    synthetic_tasks, synthetic_spec, small_model_kwargs
):
    """`compile(steps_per_execution=4)` (several meta-train steps per call of
    the train function, through `step.IteratorDispatch`) takes the same 8 steps,
    to the same weights, as one step per call."""
    from tf_limaml.model import LiMAMLModel  # noqa: PLC0415

    batches = list(
        data.task_dataset(synthetic_tasks["train"], synthetic_spec, 8, 16, 16)
        .repeat()
        .take(8)
    )
    dataset = tf.data.Dataset.from_tensors(batches[0])
    for batch in batches[1:]:
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(batch))
    trained = {}
    for per_call in (1, 4):
        tf.keras.utils.set_random_seed(3)
        model = LiMAMLModel(
            synthetic_spec, MetaConfig(inner_lr=0.5), **small_model_kwargs
        )
        start = [w.numpy().copy() for w in model.trainable_weights]
        model.compile(
            optimizer=tf.keras.optimizers.Adam(1e-2), steps_per_execution=per_call
        )
        model.fit(dataset, epochs=1, verbose=0)
        assert int(model.optimizer.iterations) == 8, per_call
        trained[per_call] = [w.numpy() for w in model.trainable_weights]
    moved = max(
        float(np.max(np.abs(a - b))) for a, b in zip(trained[1], start, strict=True)
    )
    assert moved > 1e-3
    for a, b in zip(trained[1], trained[4], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
