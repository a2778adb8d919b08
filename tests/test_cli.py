"""The `limaml` command: help without TensorFlow, one-line errors, train + evaluate."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from tf_limaml import cli, config, errors

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
        " ['train', '--inner-lr', '-1'], ['train', '--meta-units', '8,0'],"
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
        (
            [
                "train",
                "--tasks",
                "x",
                "--features",
                "{spec}",
                "--model-dir",
                "m",
                "--inner-lr",
                "-1",
            ],
            "argument --inner-lr: MetaConfig.inner_lr must be a number >= 0, got -1.0",
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
                "--meta-config",
                "{bad_meta}",
            ],
            "--meta-config {bad_meta}: MetaConfig.support_prior must be a number >= 0, "
            "got -2",
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
    bad_meta = tmp_path / "meta.json"
    bad_meta.write_text(json.dumps({"inner_lr": 0.3, "support_prior": -2}))
    names = {
        "spec": synthetic_tasks["spec"],
        "bad_spec": bad_spec,
        "bad_meta": bad_meta,
        "tasks": synthetic_tasks["test"],
    }
    argv = [a.format(**names) for a in argv]
    message = message.format(**names)
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
    # Every query row is scored, and the output says so.
    rows = metrics["query_rows"]
    assert rows["left_out"] == 0 and rows["scored"] == rows["in_files"] > 0, rows
    assert metrics["adapted"]["n_rows"] == rows["scored"], metrics
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


def test_train_flags_are_the_config_fields(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in (config.MetaConfig, config.Architecture):
        docs = config.field_docs(cls)
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            assert re.search(rf" {flag}[ ,]", text), flag
            # The help is the field's description, with the field's default.
            default = field.default
            shown = (
                ",".join(map(str, default)) if isinstance(default, tuple) else default
            )
            assert f"{docs[field.name]} (default: {shown})" in text, flag
    for flag in ("--first-order", "--no-first-order", "--no-jit-compile"):
        assert f" {flag}" in text, flag


def test_train_flags_reach_the_saved_config(tmp_path, synthetic_tasks, capsys):
    """Flags win over the --meta-config file, which wins over MetaConfig's defaults."""
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"inner_lr": 0.5, "first_order": True}))
    model_dir = tmp_path / "model"
    argv = [
        "train",
        "--tasks",
        synthetic_tasks["train"],
        "--features",
        synthetic_tasks["spec"],
        "--model-dir",
        str(model_dir),
        "--meta-config",
        str(meta),
        "--inner-lr",
        "0.3",
        "--inner-steps",
        "2",
        "--support-prior",
        "10",
        "--no-jit-compile",
        "--meta-units",
        "16,8",
        "--global-units",
        "32",
        "--cross-layers",
        "1",
        "--epochs",
        "1",
        "--batch-tasks",
        "32",
        "--learning-rate",
        "0.01",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["meta_config"] == {
        **config.MetaConfig().to_dict(),
        "inner_lr": 0.3,
        "inner_steps": 2,
        "support_prior": 10.0,
        "first_order": True,
        "jit_compile": False,
    }
    assert saved["meta_units"] == [16, 8] and saved["global_units"] == [32]
    assert saved["cross_layers"] == 1
    assert saved["interaction"] == config.Architecture().interaction


@pytest.mark.parametrize(
    "error, code, message",
    [
        (errors.UserInputError("bad input, do this"), 2, "bad input, do this"),
        (FileNotFoundError("no such file: x"), 2, "no such file: x"),
        (errors.TrainingFailedError("the model failed"), 1, "the model failed"),
    ],
)
def test_errors_the_library_explains_are_one_line(
    monkeypatch, capsys, error, code, message
):
    def explained(args):
        raise error

    monkeypatch.setattr(cli, "cmd_serve_command", explained)
    assert cli.main(["serve-command", "x"]) == code
    assert capsys.readouterr().err == f"limaml serve-command: error: {message}\n"


@pytest.mark.parametrize(
    "bug, shown",
    [
        ("{}['missing']", "KeyError: 'missing'"),
        ("int('x')", "ValueError: invalid literal for int()"),
        ("1 / 0", "ZeroDivisionError: division by zero"),
    ],
)
def test_an_internal_bug_keeps_its_traceback_and_does_not_exit_2(bug, shown):
    # A ValueError or KeyError from a bug is not the user's: it shows where it
    # happened, and exits 1 as any uncaught exception does.
    code = (
        "import sys\nfrom tf_limaml import cli\n"
        f"def broken(args):\n    return {bug}\n"
        "cli.cmd_serve_command = broken\n"
        "sys.exit(cli.main(['serve-command', 'x']))\n"
    )
    result = _run("-c", code, env_extra={"PYTHONPATH": os.getcwd()})
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "in broken" in result.stderr and shown in result.stderr
    assert "error:" not in result.stderr


def test_serve_command_user_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["serve-command", str(tmp_path / "none")]) == 2
    assert "Export not found" in capsys.readouterr().err
    assert cli.main(["serve-command", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "holds no version directory" in err[0], err
