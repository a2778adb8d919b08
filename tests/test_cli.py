"""The `limaml` command: help without TensorFlow, one-line errors, train + evaluate."""

import json
import os
import subprocess
import sys

import pytest

from tf_limaml import cli

PYTHON = sys.executable


def _run(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.update(env_extra or {})
    return subprocess.run(
        [PYTHON, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_help_and_argument_errors_do_not_import_tensorflow():
    code = (
        "import sys\nfrom tf_limaml import cli\n"
        "for argv in (['--help'], ['train', '--help'], ['train', '--epochs', 'x'],"
        " ['make-tasks', '--help'], ['demo', '--dataset', 'nope']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "assert 'apache_beam' not in sys.modules, 'beam was imported'\n"
    )
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--tasks", "x", "--features", "missing.json", "--model-dir", "m"],
            "feature spec not found: missing.json",
        ),
        (
            [
                "train",
                "--tasks",
                "x",
                "--features",
                "{spec}",
                "--model-dir",
                "m",
                "--epochs",
                "0",
            ],
            "--epochs: expected a positive integer, got '0'",
        ),
        (
            [
                "train",
                "--tasks",
                "nothing-*.gz",
                "--features",
                "{spec}",
                "--model-dir",
                "m",
            ],
            "no task files match 'nothing-*.gz'",
        ),
        (
            ["train", "--tasks", "x", "--features", "{bad_spec}", "--model-dir", "m"],
            "Invalid feature spec: `request_features[0][x].type` = None: must be "
            "one of ['numeric', 'categorical', 'multi_hot']",
        ),
        (
            [
                "train",
                "--tasks",
                "x",
                "--features",
                "{spec}",
                "--model-dir",
                "m",
                "--bogus",
            ],
            "unrecognized arguments: --bogus",
        ),
        (
            ["evaluate", "--tasks", "{tasks}", "--model-dir", "no-such-model"],
            "No model in no-such-model",
        ),
    ],
)
def test_user_errors_print_one_line_and_exit_2(
    tmp_path, synthetic_tasks, argv, message
):
    bad_spec = tmp_path / "bad.json"
    bad_spec.write_text(
        json.dumps(
            {
                "entity": "e",
                "time": "t",
                "label": "y",
                "request_features": [{"name": "x"}],
            }
        )
    )
    argv = [
        a.format(
            spec=synthetic_tasks["spec"],
            bad_spec=bad_spec,
            tasks=synthetic_tasks["test"],
        )
        for a in argv
    ]
    result = _run("-m", "tf_limaml.cli", *argv, env_extra={"PYTHONPATH": os.getcwd()})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    command = argv[0]
    assert lines[-1].startswith(f"limaml {command}: error: "), result.stderr
    assert message in lines[-1], result.stderr
    assert sum("error:" in line for line in lines) == 1, result.stderr


def test_keras_3_already_loaded_is_refused():
    # A loaded `keras` module is harmless until tf.keras resolves to it.
    result = _run(
        "-c", "import keras\nimport tensorflow as tf\ntf.keras.Model\nimport tf_limaml"
    )
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "TF_USE_LEGACY_KERAS=1" in result.stderr
    result = _run(
        "-c",
        "import keras\nimport tf_limaml\nimport tensorflow as tf\nassert tf.keras.__name__.startswith('tf_keras')",
    )
    assert result.returncode == 0, result.stderr


def test_train_then_evaluate(tmp_path, synthetic_tasks, capsys):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"inner_steps": 1, "inner_lr": 0.5}))
    model_dir = tmp_path / "model"
    assert (
        cli.main(
            [
                "train",
                "--tasks",
                synthetic_tasks["train"],
                "--features",
                synthetic_tasks["spec"],
                "--model-dir",
                str(model_dir),
                "--meta-config",
                str(meta),
                "--epochs",
                "1",
                "--batch-tasks",
                "64",
            ]
        )
        == 0
    )
    assert (model_dir / "config.json").exists() and (model_dir / "weights").is_dir()
    out = tmp_path / "metrics.json"
    capsys.readouterr()
    assert (
        cli.main(
            [
                "evaluate",
                "--tasks",
                synthetic_tasks["test"],
                "--model-dir",
                str(model_dir),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == metrics
    assert set(metrics) >= {"adapted", "unadapted", "n_tasks"}
    assert metrics["n_tasks"] > 0
    for key in ("adapted", "unadapted"):
        assert metrics[key]["loss"] > 0
    # The synthetic members differ in a way their support rows reveal, so
    # adapting on them must beat the unadapted default.
    assert metrics["adapted"]["auc"] > metrics["unadapted"]["auc"] + 0.01, metrics


def test_tune_needs_a_make_tasks_directory(tmp_path, capsys):
    assert cli.main(["tune", "--tasks", str(tmp_path / "nope"), "--output", "x"]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["tune", "--tasks", str(tmp_path), "--output", "x", "--budget", "0"])


def test_tune_writes_the_chosen_config_and_every_trial(
    tmp_path, synthetic_tasks, capsys
):
    tasks_dir = os.path.dirname(synthetic_tasks["spec"])
    out = tmp_path / "tune"
    code = cli.main(
        ["tune", "--tasks", tasks_dir, "--output", str(out), "--budget", "1", "--fast"]
    )
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["config"] == str(out / "tune_config.json")
    assert captured.err.count("[tune] trial") >= 2  # the fallback + a trained one
    config = json.loads((out / "tune_config.json").read_text())
    assert set(config) >= {"meta_config", "recipe", "chosen_trial", "is_fallback"}
    trials = json.loads((out / "tune_trials.json").read_text())["trials"]
    assert sum(t["fallback"] for t in trials) == 1
    assert (out / "tune_trials.md").exists()
