"""Health check: a model that diverged, collapsed or ranks at chance is failed,
and the train command and the demo say so with a non-zero exit."""

import json

import numpy as np
import pytest
import tensorflow as tf

from tf_limaml import cli, evaluation, training
from tf_limaml.model import LiMAMLModel

LABELS = np.array([0, 1, 0, 1, 1, 0, 1, 0], dtype=np.float32)
GOOD = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.3, 0.6, 0.4])


def test_healthy_scores_pass():
    health = evaluation.health_check(LABELS, GOOD, val_loss=0.4)
    assert health == {"healthy": True, "reasons": [], "auc": 1.0, "n_rows": 8}


@pytest.mark.parametrize(
    "scores, val_loss, reason",
    [
        (np.where(GOOD > 0.5, np.nan, GOOD), 0.4, "not finite"),
        (np.full(8, 0.5), 0.4, "constant"),
        (1.0 - GOOD, 0.4, "no better than chance"),
        (np.array([0.5, 0.6, 0.5, 0.6, 0.5, 0.6, 0.5, 0.6]), 0.4, "chance"),
        (GOOD, float("nan"), "validation loss"),
        (np.array([]), None, "no scores"),
    ],
)
def test_failed_models_name_the_reason(scores, val_loss, reason):
    labels = LABELS[: len(scores)]
    health = evaluation.health_check(labels, scores, val_loss=val_loss)
    assert not health["healthy"]
    assert any(reason in r for r in health["reasons"]), health["reasons"]


def test_one_class_labels_alone_do_not_fail():
    health = evaluation.health_check(np.ones(4), np.array([0.1, 0.2, 0.3, 0.4]))
    assert health["healthy"] and health["auc"] is None


def _constant_predict_query(self, tasks, adapt=True, steps=None):
    # A collapsed model: the same probability for every row.
    return tf.fill(tf.shape(tasks["query_label"]), 0.5)


def _train_argv(synthetic_tasks, model_dir):
    return [
        "train",
        "--tasks",
        synthetic_tasks["train"],
        "--features",
        synthetic_tasks["spec"],
        "--model-dir",
        str(model_dir),
        "--validation-tasks",
        synthetic_tasks["val"],
        "--epochs",
        "1",
        "--batch-tasks",
        "64",
    ]


def test_train_of_a_constant_model_raises_and_the_cli_exits_1(
    tmp_path, synthetic_tasks, monkeypatch, capsys
):
    monkeypatch.setattr(LiMAMLModel, "predict_query", _constant_predict_query)
    check_a_constant_model_fails_training(tmp_path, synthetic_tasks, capsys)


def check_a_constant_model_fails_training(tmp_path, synthetic_tasks, capsys):
    """`limaml train` of a model whose scores are constant exits 1 and says why."""
    code = cli.main(_train_argv(synthetic_tasks, tmp_path / "model"))
    assert code == cli.EXIT_FAILED == 1
    err = capsys.readouterr().err
    assert "failed its health check" in err and "constant" in err
    health = training.read_health(str(tmp_path / "model"))
    assert health["healthy"] is False and health["checked_on"] == "validation tasks"


def test_train_of_a_healthy_model_writes_health(tmp_path, synthetic_tasks, capsys):
    argv = _train_argv(synthetic_tasks, tmp_path / "model")
    argv[argv.index("--epochs") + 1] = "3"
    assert cli.main(argv + ["--learning-rate", "0.01"]) == 0
    health = training.read_health(str(tmp_path / "model"))
    assert health["healthy"] is True and health["auc"] > 0.5


def test_train_warn_returns_the_failed_model(tmp_path, synthetic_tasks, monkeypatch):
    from tf_limaml.features import FeatureSpec

    monkeypatch.setattr(
        LiMAMLModel,
        "predict_query",
        lambda self, tasks, adapt=True, steps=None: tf.fill(
            tf.shape(tasks["query_label"]), float("nan")
        ),
    )
    spec = FeatureSpec.load(synthetic_tasks["spec"])
    with pytest.raises(training.ModelFailedError) as err:
        training.train(
            synthetic_tasks["train"],
            spec,
            str(tmp_path / "a"),
            epochs=1,
            batch_tasks=64,
            model_kwargs={"meta_units": [8], "global_units": [8]},
        )
    assert "not finite" in str(err.value) and not err.value.health["healthy"]
    model, _ = training.train(
        synthetic_tasks["train"],
        spec,
        str(tmp_path / "b"),
        epochs=1,
        batch_tasks=64,
        model_kwargs={"meta_units": [8], "global_units": [8]},
        on_failure="warn",
    )
    assert model is not None
    assert training.read_health(str(tmp_path / "b"))["healthy"] is False


def test_synthetic_demo_lists_a_diverged_limaml_and_exits_1(
    tmp_path, monkeypatch, capsys
):
    original = LiMAMLModel.predict_query

    def diverged(self, tasks, adapt=True, steps=None):
        # Only the adapted model diverges: "global" (0 inner steps) stays healthy.
        if self.meta_config.inner_steps > 0:
            return tf.fill(tf.shape(tasks["query_label"]), float("nan"))
        return original(self, tasks, adapt=adapt, steps=steps)

    monkeypatch.setattr(LiMAMLModel, "predict_query", diverged)
    code = cli.main(
        [
            "demo",
            "--dataset",
            "synthetic",
            "--fast",
            "--epochs",
            "1",
            "--workdir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr()
    assert code == 1
    assert "[FAILED] limaml" in out.out and "LiMAML failed" in out.err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [f["model"] for f in report["failed"]] == ["limaml"]
