"""`limaml tune`: the safe selection rule by hand, and a search on synthetic tasks."""

import dataclasses
import json

import numpy as np
import pytest

from tf_limaml.experiments import baselines, tune
from tf_limaml.experiments.protocol import Protocol, Splits, records_from_dir
from tf_limaml.experiments.recipes import Architecture, Recipe
from tf_limaml.model import MetaConfig

KS = ("1", "3", "all")
GLOBAL = {"1": 0.70, "3": 0.70, "all": 0.70}
GLOBAL_MEMBER = {"1": 0.65, "3": 0.65, "all": 0.65}


def _trial(auc, member=None, fallback=False, healthy=True, half=(0.0, 0.0)):
    """A hand-made trial: val AUC per k -> lifts over GLOBAL."""
    member = member or GLOBAL_MEMBER
    out = {"name": "t", "fallback": fallback, "healthy": healthy}
    out.update(
        tune.summarize_trial(
            dict(zip(KS, auc, strict=True)), GLOBAL, member, GLOBAL_MEMBER, half
        )
    )
    return out


FALLBACK = _trial((0.70, 0.70, 0.70), fallback=True)


def test_fallback_chosen_when_every_candidate_is_below_global_at_some_k():
    trials = [
        FALLBACK,
        # Large gain at full support, but one rating moves a member too far.
        _trial((0.685, 0.72, 0.766), half=(0.03, 0.03)),
        # Below global everywhere (nothing to personalize).
        _trial((0.688, 0.688, 0.688), half=(-0.01, -0.01)),
        # Below at k=3 only.
        _trial((0.71, 0.699, 0.75), half=(0.02, 0.02)),
    ]
    assert tune.select(trials) == 0
    assert [tune.eligible(t)[0] for t in trials] == [True, False, False, False]
    assert "k=1" in tune.eligible(trials[1])[1]


def test_best_eligible_candidate_wins_over_the_fallback():
    trials = [
        FALLBACK,
        _trial((0.705, 0.72, 0.76), half=(0.02, 0.03)),
        _trial((0.701, 0.71, 0.72), half=(0.01, 0.01)),
    ]
    assert tune.select(trials) == 1
    assert trials[1]["mean_lift"] == pytest.approx((0.005 + 0.02 + 0.06) / 3)


def test_gains_below_min_gain_keep_the_fallback():
    trials = [FALLBACK, _trial((0.701, 0.701, 0.701), half=(0.001, 0.001))]
    assert tune.select(trials) == 0
    assert tune.select(trials, min_gain=0.0005) == 1


def test_member_auc_half_split_and_health_exclude_candidates():
    lower_members = {"1": 0.64, "3": 0.65, "all": 0.65}
    trials = [
        FALLBACK,
        _trial((0.72, 0.72, 0.72), member=lower_members, half=(0.02, 0.02)),
        _trial((0.72, 0.72, 0.72), half=(0.05, -0.01)),
        _trial((0.75, 0.75, 0.75), healthy=False, half=(0.05, 0.05)),
    ]
    assert tune.select(trials) == 0
    reasons = [tune.eligible(t)[1] for t in trials[1:]]
    assert "per-member" in reasons[0] and "half" in reasons[1]
    assert "health" in reasons[2]


def test_select_needs_the_fallback():
    with pytest.raises(ValueError, match="fallback"):
        tune.select([_trial((0.8, 0.8, 0.8))])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tf_limaml.datasets import synthetic
    from tf_limaml.features import FeatureSpec

    out = tmp_path_factory.mktemp("tune_tasks")
    paths = synthetic.write_tasks(str(out), num_entities=200, seed=0)
    spec = FeatureSpec.load(paths["spec"])
    protocol = Protocol(max_support=16, max_query=16)
    splits = tune.tuning_splits(records_from_dir(str(out)), spec, protocol)
    recipe = dataclasses.replace(
        Recipe.fast(),
        architecture=Architecture(meta_units=(8, 4), global_units=(16,)),
        epochs=2,
        pretrain_epochs=1,
        meta_epochs=1,
        batch_size=256,
    )
    return {"dir": str(out), "spec": spec, "splits": splits, "recipe": recipe}


def test_tune_writes_config_and_table_with_the_global_fallback(tiny, tmp_path):
    lines = []
    result = tune.tune(
        tiny["spec"],
        tiny["splits"],
        tiny["recipe"],
        budget=1,
        ks=(1, None),
        report_line=lines.append,
    )
    trials = result["trials"]
    fallback = [t for t in trials if t["fallback"]]
    assert len(fallback) == 1
    # The fallback is LiMAML built from the global network: global's scores.
    assert fallback[0]["fold_lift"] == {"1": 0.0, "all": 0.0}
    assert fallback[0]["recipe"] == {
        "warm_start": "global",
        "meta_epochs": 0,
        "inner_steps": 0,
    }
    assert len(lines) == len(trials) + 1 and "chosen" in lines[-1]
    chosen = trials[result["chosen"]]
    assert chosen["eligible"] and chosen["min_lift"] >= 0
    paths = tune.write_outputs(result, tmp_path)
    config = json.loads(open(paths["config"]).read())
    MetaConfig.from_dict(config["meta_config"])
    recipe = Recipe.from_dict(config["recipe"])
    assert recipe == tune.chosen_recipe(result)
    table = json.loads(open(paths["trials"]).read())["trials"]
    assert len(table) == len(trials)
    for t in table:
        assert set(t["fold_auc"]) == set(t["fold_lift"]) == {"1", "all"}
    markdown = open(paths["markdown"]).read()
    assert "fallback" in markdown and markdown.count("\n| ") == len(trials) + 2


def test_tune_falls_back_when_personalization_hurts_on_val(tiny, monkeypatch):
    check_tune_falls_back_when_personalization_hurts(tiny, monkeypatch)


def check_tune_falls_back_when_personalization_hurts(tiny, monkeypatch):
    """Every personalized candidate below global at every k: the fallback wins."""
    score = baselines.query_probabilities
    global_scores = {}

    def hurt(model, batch, steps=None, inner_lr=None, chunk=128, support_prior=None):
        p = score(model, batch, steps, inner_lr, chunk, support_prior)
        if model.meta_config.inner_steps == 0 and not steps:
            # Global (scored first on each cut) and the fallback: untouched.
            global_scores.setdefault(id(batch), p)
            return p
        # Every personalized candidate scores as global with its positives
        # pulled down: healthy, but below global at every k.
        return global_scores[id(batch)] - 0.05 * batch["query_label"]

    monkeypatch.setattr(baselines, "query_probabilities", hurt)
    result = tune.tune(
        tiny["spec"],
        tiny["splits"],
        tiny["recipe"],
        budget=1,
        ks=(1, None),
        report_line=lambda _: None,
    )
    assert result["trials"][result["chosen"]]["fallback"]
    recipe = tune.chosen_recipe(result)
    assert (recipe.warm_start, recipe.meta_epochs, recipe.inner_steps) == (
        "global",
        0,
        0,
    )
    assert recipe.adaptation() == {"inner_steps": 0}


def test_fallback_recipe_scores_exactly_as_global(tiny):
    spec, splits = tiny["spec"], tiny["splits"]
    recipe = dataclasses.replace(
        tiny["recipe"],
        warm_start="global",
        meta_epochs=0,
        inner_steps=0,
        adapt_inner_steps=0,
    )
    base, _ = baselines.train_global(spec, splits, recipe, 0)
    model, history = baselines.train_meta_learner(spec, splits, recipe, 0, init=base)
    assert history == {}
    np.testing.assert_allclose(
        baselines.query_probabilities(model, splits.test),
        baselines.query_probabilities(base, splits.test, 0),
        rtol=0,
        atol=1e-6,
    )


def test_budget_is_validated(tiny):
    with pytest.raises(ValueError, match="budget"):
        tune.tune(tiny["spec"], tiny["splits"], tiny["recipe"], budget=0)


def test_tuning_fold_is_a_stable_share_of_train_entities_and_never_test(tiny):
    records = records_from_dir(tiny["dir"])
    tuned = tune.tuning_records(records, fraction=0.25)
    ids = {split: {tune._entity_id(r) for r in rs} for split, rs in tuned.items()}
    original = {
        split: {tune._entity_id(r) for r in rs} for split, rs in records.items()
    }
    fold = ids["test"]
    # The fold is train entities only; the real test entities are never read.
    assert fold and fold <= original["train"]
    assert not fold & original["test"]
    assert ids["train"] == original["train"] - fold
    assert ids["val"] == original["val"]
    assert all(tune.in_tuning_fold(i, 0.25) for i in fold)
    assert not any(tune.in_tuning_fold(i, 0.25) for i in ids["train"])
    # About a quarter of the train entities, the same ones on every call.
    assert 0.15 < len(fold) / len(original["train"]) < 0.35
    assert tune.tuning_records(records, fraction=0.25) == tuned
    # Pinned, not compared with itself: the fold must be the same in every
    # process and release (a salted hash would pass the line above).
    pinned = [i for i in range(16) if tune.in_tuning_fold(f"m{i:06d}", 0.25)]
    assert pinned == [0, 3, 4, 6, 7, 15]
    with pytest.raises(ValueError, match="tuning fraction"):
        tune.tuning_records(records, fraction=0.0)


def test_tune_refuses_splits_whose_test_members_are_real(tiny):
    real = Splits.from_records(
        records_from_dir(tiny["dir"]),
        tiny["spec"],
        Protocol(max_support=16, max_query=16),
    )
    with pytest.raises(TypeError, match="tuning_splits"):
        tune.tune(tiny["spec"], real, tiny["recipe"], budget=1)


def test_second_trained_candidate_is_the_recipe_warm_started_from_global():
    base = Recipe()
    draws = tune._draws(base, budget=4, seed=0)
    assert draws[:2] == [{}, {"warm_start": "global"}]
    assert len(draws) == 4
    assert len({json.dumps(d, sort_keys=True) for d in draws}) == 4
    assert tune._draws(base, budget=1, seed=0) == [{}]
