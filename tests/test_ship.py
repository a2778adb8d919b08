"""Tune -> train --recipe -> export -> embed, from the command line.

What `limaml tune` chose is trained whole by `limaml train --recipe` (warm
start, meta-training, the adapt-time knobs in config.json), exported by
`limaml export`, embedded by `limaml embed` (Beam) and scored by
`serving_default` through the TF1 loader, as TF Serving runs it: the served
AUC must equal `limaml evaluate`'s to 1e-6. Tune's fallback recipe must ship
the global network's scores.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
import pytest

from tf_limaml import cli, evaluation
from tf_limaml.config import AdaptOptions, MetaConfig
from tf_limaml.experiments import baselines, ship, tune
from tf_limaml.experiments.protocol import (
    Protocol,
    Splits,
    records_from_dir,
    task_batch,
)
from tf_limaml.experiments.recipes import Architecture, Recipe
from tf_limaml.features import FeatureSpec

AUC_TOLERANCE = 1e-6
# A small recipe for the tests that do not run tune (seconds, not minutes).
# The global network reaches a val AUC of about 0.64 on the synthetic members.
SMALL = Recipe(
    architecture=Architecture(meta_units=(16, 8), global_units=(32, 16)),
    epochs=4,
    batch_size=256,
    learning_rate=3e-3,
    pretrain_epochs=1,
    meta_epochs=2,
    meta_learning_rate=3e-3,
)


def _main(capsys, *argv: str) -> str:
    """Runs `limaml ARGV` in-process; returns its stdout (the code must be 0)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _test_batch(tasks_dir: str):
    spec = FeatureSpec.load(os.path.join(tasks_dir, "spec.json"))
    return spec, task_batch(records_from_dir(tasks_dir)["test"], spec)


def _longest_support(batch) -> int:
    return max(int(batch["support_mask"].sum(axis=1).max()), 1)


def _served_scores(capsys, tmp_path, model_dir: str, tasks_dir: str):
    """`limaml export` + `limaml embed` + serving_default (TF1 loader), on test.

    Returns:
        (query scores [T, Q] as served, the test batch).
    """
    from serving_fixture import SessionSignatures

    from tf_limaml.experiments.movielens_demo import read_embeddings

    spec, batch = _test_batch(tasks_dir)
    # Every support row, as the in-process evaluation adapts on them all.
    longest = _longest_support(batch)
    export_dir = _main(
        capsys,
        "export",
        "--model-dir",
        model_dir,
        "--export-base",
        tmp_path / "export",
        "--max-support",
        longest,
    ).strip()
    test_pattern = os.path.join(tasks_dir, "test-*.tfrecord.gz")
    out = tmp_path / "embeddings"
    summary = json.loads(
        _main(
            capsys,
            "embed",
            "--export",
            export_dir,
            "--tasks",
            test_pattern,
            "--output",
            out,
        )
    )
    assert summary["records_rejected"] == 0, summary
    embeddings = read_embeddings(str(out / "embeddings-*.tfrecord.gz"))
    mask = batch["query_mask"] > 0
    ids = [i.decode() for i in batch["entity_id"]]
    rows = np.repeat(np.stack([embeddings[i] for i in ids]), mask.sum(axis=1), 0)
    served = SessionSignatures(export_dir)
    try:
        dtypes = served.input_dtypes("serving_default")
        inputs = {
            f.name: batch[spec.batch_key("query", f.name)][mask].astype(
                object if dtypes[f.name].name == "string" else dtypes[f.name].name
            )
            for f in spec.request_features
        }
        inputs["meta_embedding"] = rows.astype(np.float32)
        scores = np.zeros(mask.shape, np.float32)
        scores[mask] = served.run("serving_default", inputs)["score"]
    finally:
        served.close()
    return scores, batch


def _auc(batch, scores) -> float:
    mask = batch["query_mask"] > 0
    return evaluation.auc(batch["query_label"][mask], np.asarray(scores)[mask])


@pytest.fixture(scope="module")
def tasks_dir(synthetic_tasks):
    return os.path.dirname(synthetic_tasks["spec"])


def test_tune_train_recipe_export_embed_serves_the_evaluated_auc(
    tasks_dir, tmp_path, capsys
):
    tune_dir = tmp_path / "tune"
    start = tmp_path / "start.json"  # tune searches around a small recipe
    start.write_text(json.dumps(SMALL.to_dict()))
    _main(
        capsys,
        *("tune", "--tasks", tasks_dir, "--output", tune_dir),
        *("--budget", "1", "--recipe", start),
    )
    config_path = tune_dir / "tune_config.json"
    tuned = json.loads(config_path.read_text())
    recipe = Recipe.from_dict(tuned["recipe"])
    model_dir = tmp_path / "model"
    summary = json.loads(
        _main(
            capsys,
            *("train", "--recipe", config_path, "--tasks", tasks_dir),
            *("--model-dir", model_dir),
        )
    )
    assert summary["fallback"] == tuned["is_fallback"], (summary, tuned)
    # (a) The recipe's adapt-time knobs are saved with the model: what it
    # resolves to is the MetaConfig tune scored.
    saved = json.loads((model_dir / "config.json").read_text())
    options = AdaptOptions.from_dict(saved["adapt_options"])
    assert options.overrides == recipe.adaptation(), saved["adapt_options"]
    assert options.resolve(MetaConfig.from_dict(saved["meta_config"])) == (
        MetaConfig.from_dict(tuned["meta_config"])
    )
    assert Recipe.from_dict(json.loads((model_dir / "recipe.json").read_text())) == (
        recipe
    )
    # (b) Served (export + embed + serving_default) == evaluated, to 1e-6.
    scores, batch = _served_scores(capsys, tmp_path, str(model_dir), tasks_dir)
    metrics = json.loads(
        _main(
            capsys,
            *("evaluate", "--tasks", os.path.join(tasks_dir, "test-*.tfrecord.gz")),
            *("--model-dir", model_dir, "--max-support", _longest_support(batch)),
        )
    )
    served_auc = _auc(batch, scores)
    assert metrics["adapted"]["n_rows"] == int(batch["query_mask"].sum())
    assert abs(served_auc - metrics["adapted"]["auc"]) <= AUC_TOLERANCE, (
        tuned["chosen_name"],
        served_auc,
        metrics["adapted"]["auc"],
    )


def test_fallback_recipe_ships_the_global_network(tasks_dir, tmp_path, capsys):
    recipe = dataclasses.replace(SMALL, **tune.FALLBACK_CHANGES, adapt_inner_steps=0)
    assert ship.is_fallback(recipe)
    # With the embedding fit left on, the same network is not the fallback.
    assert not ship.is_fallback(dataclasses.replace(recipe, embedding_steps=2))
    path = tmp_path / "fallback.json"  # a bare Recipe JSON this time
    path.write_text(json.dumps(recipe.to_dict()))
    model_dir = tmp_path / "model"
    summary = json.loads(
        _main(
            capsys,
            *("train", "--recipe", path, "--tasks", tasks_dir),
            *("--model-dir", model_dir),
        )
    )
    assert summary["fallback"] and summary["meta_epochs"] == 0, summary
    served, batch = _served_scores(capsys, tmp_path, str(model_dir), tasks_dir)
    # The global baseline of the same recipe and seed, trained here.
    spec = FeatureSpec.load(os.path.join(tasks_dir, "spec.json"))
    splits = Splits.from_records(records_from_dir(tasks_dir), spec, Protocol())
    base, _ = baselines.train_global(spec, splits, recipe, seed=0)
    expected = baselines.query_probabilities(base, batch, 0)
    mask = batch["query_mask"] > 0
    np.testing.assert_allclose(served[mask], expected[mask], rtol=0, atol=1e-6)
    assert abs(_auc(batch, served) - _auc(batch, expected)) <= AUC_TOLERANCE


def test_train_recipe_refuses_conflicting_flags_and_bad_recipes(
    tasks_dir, tmp_path, capsys
):
    good = tmp_path / "recipe.json"
    good.write_text(json.dumps(SMALL.to_dict()))
    bad_field = tmp_path / "bad.json"
    bad_field.write_text(json.dumps({"recipe": {"inner_lrr": 0.1}}))
    base = ["train", "--tasks", tasks_dir, "--model-dir", str(tmp_path / "m")]
    for extra, expected in (
        (["--recipe", str(good), "--inner-lr", "0.1"], "--inner-lr"),
        (["--recipe", str(good), "--epochs", "3"], "--epochs"),
        (["--recipe", str(good), "--strategy", "mirrored"], "--strategy"),
        (["--recipe", str(tmp_path / "nope.json")], "recipe file not found"),
        (["--recipe", str(bad_field)], "inner_lrr"),
        ([], "--features SPEC.json is required"),
    ):
        capsys.readouterr()
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not glob.glob(str(tmp_path / "m" / "*"))
    capsys.readouterr()
    argv = ["train", "--recipe", str(good), "--tasks", "x.tfrecord.gz"]
    assert cli.main(argv + ["--model-dir", "m"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_pretrained_recipe_saves_its_knobs_history_and_health(tasks_dir, tmp_path):
    from tf_limaml.saving import load_model

    recipe = dataclasses.replace(
        SMALL,
        **tune.MAML_STEPS_FROM_PRETRAINING,
        meta_epochs=1,
        adapt_inner_lr=0.05,
        adapt_support_prior=30.0,
    )
    model_dir = tmp_path / "model"
    spec = FeatureSpec.load(os.path.join(tasks_dir, "spec.json"))
    summary = ship.train_recipe(spec, tasks_dir, recipe, model_dir, seed=1)
    assert summary["meta_epochs"] == 1 and not summary["fallback"], summary
    model = load_model(model_dir)
    assert model.adapt_options == AdaptOptions(inner_lr=0.05, support_prior=30.0)
    assert model.meta_config == dataclasses.replace(
        recipe.meta_config(), support_prior=recipe.support_prior
    )
    assert len(json.loads((model_dir / "history.json").read_text())["loss"]) == 1
    assert json.loads((model_dir / "health.json").read_text())["healthy"]
    args = json.loads((model_dir / "training_args.json").read_text())
    assert args["max_support"] == Protocol().max_support and args["seed"] == 1
    assert "pretrained" in args["warm_start"]


@pytest.mark.slow
def test_demo_keeps_the_shipped_model_and_serves_its_reported_auc(tmp_path, capsys):
    """`limaml demo --input` ships seed 0's LiMAML: WORKDIR/shipped/{model,export/1}."""
    from tf_limaml.datasets import synthetic
    from tf_limaml.saving import load_model

    synthetic.write_csv(
        synthetic.generate_interactions(300, 200, 0), tmp_path / "c.csv"
    )
    synthetic.synthetic_spec(200).save(str(tmp_path / "spec.json"))
    workdir = tmp_path / "demo"
    out = _main(
        capsys,
        *("demo", "--input", tmp_path / "c.csv", "--features", tmp_path / "spec.json"),
        *("--fast", "--seeds", "1", "--epochs", "2", "--tune-budget", "1"),
        *("--workdir", workdir),
    )
    report = json.loads((workdir / "report.json").read_text())
    shipped = report["shipped"]
    assert shipped["model_dir"] == os.path.join("shipped", "model")
    assert shipped["export"] == os.path.join("shipped", "export", "1")
    assert shipped["reported_overall_auc"] == report["models"]["limaml"]["overall_auc"]
    assert shipped["abs_auc_diff"] <= AUC_TOLERANCE, shipped
    assert shipped["max_abs_auc_diff_over_k"] <= AUC_TOLERANCE, shipped
    assert "Shipped: the LiMAML model of seed 0" in out
    assert "Shipped:" in (workdir / "report.md").read_text()
    tuned = Recipe.from_dict(
        json.loads((workdir / "tune" / "tune_config.json").read_text())["recipe"]
    )
    model = load_model(workdir / "shipped" / "model")
    assert model.adapt_options.overrides == tuned.adaptation()
    assert os.path.isdir(workdir / "shipped" / "export" / "1" / "variables")
