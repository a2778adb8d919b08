"""`limaml tune`: a budgeted search of LiMAML's recipe on held-out entities.

Personalization must never make a member's scores worse than the global
model's. So every candidate is measured against the global model *on the
tuning fold, at every support size k of the sweep* (each fold member's support
cut to its latest k rows, as `protocol.cut_support` does for test). The
tuning fold is a stable third of the TRAIN members (`tuning_splits`): no model
of the search trains on their query rows, the global model sees their support
rows as it sees the test members', and val still early-stops every model, so
the fold's scores are unbiased by early stopping. The val members alone (a
tenth) were too few: on MovieLens-100K a recipe's val lift over global differed
from its test lift by 0.04. Test members are never read. The rule (`select`):

1. a candidate is eligible when it is healthy, its fold overall AUC is not
   below global's at any k, its fold mean per-member AUC is not below global's
   by more than `MEMBER_TOLERANCE` at any k, and its mean lift over k is not
   negative on either half of the fold's members (a cheap guard against a lift
   that one lucky half of the members carries);
2. among the eligible, the one with the largest mean lift over k wins, if
   that lift is at least `MIN_GAIN`; otherwise the **fallback** wins.

The fallback is always a candidate: LiMAML warm-started from the trained
global network with zero meta-epochs and zero inner steps, so its scores are
global's and its lift is exactly 0 at every k. A safe choice always exists.

Candidates come from a seeded random search over inner lr, inner steps,
support prior, first/second order, meta learning rate, pretraining epochs and
the warm-start source (the member-ID pretraining or the global model); the
first one trained is the recipe given (the MovieLens recipe by default). Each
trained candidate is also scored with cheap test-time knobs, no retraining:
no adaptation (its meta-learned default), and the inner lr scaled down
and/or a larger support prior, since shrinking the step falls back toward the
model's default. The global model adapted at test time (plain fine-tuning of
its meta block) is a candidate family too.

Outputs (`write_outputs`): `tune_config.json` (the chosen MetaConfig and the
recipe fields), `tune_trials.json` and `tune_trials.md` (every trial, with its
fold AUC, lift and member-AUC lift at every k).

This module is an experiment tool: it imports `baselines`; the core modules
never import it.

Example:

    result = tune.tune(spec, splits, Recipe(), budget=4, seed=0)
    tune.write_outputs(result, "runs/tune")
    recipe = tune.chosen_recipe(result)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tf_limaml import evaluation
from tf_limaml.experiments import baselines, report
from tf_limaml.experiments.protocol import (
    SUPPORT_KS,
    Batch,
    Protocol,
    Splits,
    Timer,
    cut_support,
    k_label,
)
from tf_limaml.experiments.recipes import Recipe
from tf_limaml.features import ENTITY_ID_KEY, LABEL_KEY, MASK_KEY, QUERY

logger = logging.getLogger(__name__)

# The search space of trained candidates (Recipe fields).
SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "inner_lr": (0.05, 0.1, 0.2, 0.4),
    "inner_steps": (1, 2, 3),
    "support_prior": (0.0, 3.0, 10.0, 30.0),
    "first_order": (True, False),
    "meta_learning_rate": (3e-4, 1e-3, 3e-3),
    "pretrain_epochs": (0, 4, 8),
    "warm_start": ("pretrain", "global"),
}
# Test-time knobs of each trained candidate: inner lr scales, and support
# priors added to the trained one. A prior c scales an entity's step by
# n / (n + c): a large c leaves an entity with one or two rows at the default
# and still adapts one with a hundred, the fall-back toward the default by
# support size that the constraint at every k asks for.
LR_SCALES = (0.25, 0.5, 1.0)
PRIOR_BOOSTS = (0.0, 20.0, 90.0)
# Test-time adaptation of the global network itself (plain fine-tuning).
GLOBAL_ADAPT_LRS = (0.01, 0.03, 0.1, 0.3)
GLOBAL_ADAPT_PRIORS = (0.0, 10.0, 30.0, 100.0)
# The selection rule's margins (see the module docstring).
MIN_GAIN = 0.002
MEMBER_TOLERANCE = 0.003
# Default number of trained candidates.
DEFAULT_BUDGET = 6
FALLBACK = "fallback"
# Share of the train entities held out as the tuning fold (see the module doc).
TUNING_FOLD = 1 / 3


# ------------------------------------------------------------- the rule
def summarize_trial(
    fold_auc: Mapping[str, float],
    global_auc: Mapping[str, float],
    fold_member_auc: Mapping[str, float],
    global_member_auc: Mapping[str, float],
    half_lift: Sequence[float] = (),
) -> dict[str, Any]:
    """A trial's lifts over global on the tuning fold, per k, and their summaries.

    Args:
        fold_auc: {k label: the candidate's fold overall AUC}.
        global_auc: {k label: global's fold overall AUC}.
        fold_member_auc: {k label: the candidate's fold mean per-member AUC}.
        global_member_auc: {k label: global's}.
        half_lift: Mean lift over k on each half of the fold's members.

    Returns:
        {"fold_lift": {k: ...}, "fold_member_lift": {k: ...}, "mean_lift",
        "min_lift", "min_member_lift", "half_lift"}.
    """
    lift = {k: float(fold_auc[k]) - float(global_auc[k]) for k in global_auc}
    member = {
        k: float(fold_member_auc[k]) - float(global_member_auc[k])
        for k in global_member_auc
    }
    return {
        "fold_lift": lift,
        "fold_member_lift": member,
        "mean_lift": float(np.mean(list(lift.values()))),
        "min_lift": float(min(lift.values())),
        "min_member_lift": float(min(member.values())) if member else 0.0,
        "half_lift": [float(v) for v in half_lift],
    }


def eligible(
    trial: Mapping[str, Any], member_tolerance: float = MEMBER_TOLERANCE
) -> tuple[bool, str]:
    """Whether a trial may be chosen, and if not, why (see the module docstring)."""
    if trial.get("fallback"):
        return True, ""
    if not trial.get("healthy", True):
        return False, "failed the health check"
    for value in (trial["mean_lift"], trial["min_lift"]):
        if not math.isfinite(value):
            return False, "a fold AUC is not finite"
    if trial["min_lift"] < 0:
        worst = min(trial["fold_lift"], key=trial["fold_lift"].get)
        return (
            False,
            f"below global on the fold at k={worst} ({trial['min_lift']:+.4f})",
        )
    if trial["min_member_lift"] < -member_tolerance:
        return False, (
            f"fold per-member AUC {trial['min_member_lift']:+.4f} below global "
            f"(tolerance {member_tolerance})"
        )
    if any(v < 0 for v in trial.get("half_lift", ())):
        return False, "mean lift negative on one half of the fold's members"
    return True, ""


def select(
    trials: Sequence[Mapping[str, Any]],
    min_gain: float = MIN_GAIN,
    member_tolerance: float = MEMBER_TOLERANCE,
) -> int:
    """The index of the chosen trial: the safe rule of `limaml tune`.

    Args:
        trials: Trials with "fold_lift" ({k: lift over global on the fold}),
            "mean_lift", "min_lift", "min_member_lift", optionally "half_lift"
            and "healthy"; exactly one has "fallback": True.
        min_gain: Least mean lift over k for a personalized candidate to be
            preferred over the fallback.
        member_tolerance: Most a candidate's fold per-member AUC may fall below
            global's at any k.

    Returns:
        The index into `trials`: the eligible trial of largest mean lift when
        that lift is >= min_gain, else the fallback.

    Raises:
        ValueError: No trial is the fallback.
    """
    fallbacks = [i for i, t in enumerate(trials) if t.get("fallback")]
    if not fallbacks:
        raise ValueError(
            "select needs the global fallback among the trials (a trial with "
            "'fallback': True); build the candidates with tune.tune"
        )
    best, best_lift = fallbacks[0], min_gain
    for i, trial in enumerate(trials):
        if trial.get("fallback") or not eligible(trial, member_tolerance)[0]:
            continue
        # Strictly larger: among equals the earlier one (or the fallback) stays.
        if trial["mean_lift"] > best_lift:
            best, best_lift = i, trial["mean_lift"]
    return best


# ------------------------------------------------------- the tuning split
def _entity_id(record: bytes) -> bytes:
    import tensorflow as tf  # noqa: PLC0415 - baselines has loaded it already

    example = tf.train.SequenceExample.FromString(record)
    return example.context.feature[ENTITY_ID_KEY].bytes_list.value[0]


def in_tuning_fold(entity_id: bytes | str, fraction: float = TUNING_FOLD) -> bool:
    """Whether a train entity is in the tuning fold (a stable SHA-256 share)."""
    if isinstance(entity_id, str):
        entity_id = entity_id.encode()
    digest = hashlib.sha256(b"limaml-tune:" + entity_id).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def tuning_records(
    records: Mapping[str, Sequence[bytes]], fraction: float = TUNING_FOLD
) -> dict[str, list[bytes]]:
    """The records `tune` works on: a stable share of the train entities is the
    tuning fold, in the place of the test entities.

    The fold's entities play the test entities' part: the global model trains
    on their support rows only, and the candidates are scored on their query
    rows. Val is unchanged (early stopping); the real test entities are left
    out.

    Args:
        records: Serialized task records by split (`protocol.records_from_dir`).
        fraction: Share of the train entities held out, in (0, 1).

    Returns:
        Records by split: train without the fold, val, and the fold as test.

    Raises:
        ValueError: fraction outside [0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"tuning fraction must be in (0, 1), got {fraction!r}")
    fold = [in_tuning_fold(_entity_id(r), fraction) for r in records["train"]]
    return {
        "train": [r for r, f in zip(records["train"], fold, strict=True) if not f],
        "val": list(records["val"]),
        "test": [r for r, f in zip(records["train"], fold, strict=True) if f],
    }


@dataclasses.dataclass
class TuningSplits(Splits):
    """`protocol.Splits` whose `test` is the tuning fold (see `tuning_records`).

    A type of its own, so `tune` can refuse splits whose test members are the
    real ones.
    """


def tuning_splits(
    records: Mapping[str, Sequence[bytes]],
    spec,
    protocol: Protocol,
    fraction: float = TUNING_FOLD,
) -> TuningSplits:
    """The task batches `tune` takes: `tuning_records` as `TuningSplits`."""
    return TuningSplits.from_records(tuning_records(records, fraction), spec, protocol)


# ------------------------------------------------------------ measuring
def _half_of(ids: np.ndarray) -> np.ndarray:
    """0 or 1 per member by a stable hash: the two halves of the fold's members."""
    out = []
    for i in ids:
        text = i.decode() if isinstance(i, bytes) else str(i)
        out.append(hashlib.sha256(text.encode()).digest()[0] & 1)
    return np.asarray(out)


class _FoldScorer:
    """Metrics at every k, from query probabilities of the tuning fold's tasks."""

    def __init__(self, fold: Batch, ks: Sequence[int | None]):
        self.ks = list(ks)
        self.cuts = {k_label(k): cut_support(fold, k) for k in ks}
        mask = np.asarray(fold[f"{QUERY}_{MASK_KEY}"]) > 0
        self.mask = mask
        self.labels = np.asarray(fold[f"{QUERY}_{LABEL_KEY}"])[mask]
        self.ids = np.repeat(np.asarray(fold[ENTITY_ID_KEY]), mask.sum(axis=1))
        self.half = np.repeat(_half_of(fold[ENTITY_ID_KEY]), mask.sum(axis=1))

    def measure(self, score: Callable[[Batch], np.ndarray]) -> dict[str, Any]:
        """{"auc": {k}, "member_auc": {k}, "half_auc": [{k}, {k}], "health"}."""
        out: dict[str, Any] = {"auc": {}, "member_auc": {}, "half_auc": [{}, {}]}
        health = {"healthy": True, "reasons": []}
        for label, cut in self.cuts.items():
            scores = np.asarray(score(cut))[self.mask]
            check = evaluation.health_check(self.labels, scores, name=f"k={label}")
            if not check["healthy"]:
                health = {
                    "healthy": False,
                    "reasons": [f"k={label}: {r}" for r in check["reasons"]],
                }
            summary = evaluation.summarize(self.ids, self.labels, scores)
            out["auc"][label] = float(summary["auc"])
            out["member_auc"][label] = float(summary["mean_member_auc"])
            for h in (0, 1):
                rows = self.half == h
                out["half_auc"][h][label] = evaluation.auc(
                    self.labels[rows], scores[rows]
                )
        out["health"] = health
        return out


def _trial(
    name: str,
    changes: Mapping[str, Any],
    knobs: Mapping[str, Any],
    measured: Mapping[str, Any],
    reference: Mapping[str, Any],
    fallback: bool = False,
) -> dict[str, Any]:
    half = []
    for h in (0, 1):
        values = [
            measured["half_auc"][h][k] - reference["half_auc"][h][k]
            for k in reference["auc"]
        ]
        finite = [v for v in values if math.isfinite(v)]
        half.append(float(np.mean(finite)) if finite else 0.0)
    trial = {
        "name": name,
        "fallback": fallback,
        "recipe": dict(changes),
        "knobs": dict(knobs),
        "healthy": measured["health"]["healthy"],
        "reasons": list(measured["health"]["reasons"]),
        "fold_auc": dict(measured["auc"]),
        "fold_member_auc": dict(measured["member_auc"]),
    }
    trial.update(
        summarize_trial(
            measured["auc"],
            reference["auc"],
            measured["member_auc"],
            reference["member_auc"],
            half,
        )
    )
    return trial


def _draws(base: Recipe, budget: int, seed: int) -> list[dict[str, Any]]:
    """The trained candidates' recipe changes: the base recipe, the base recipe
    warm-started from the global model, then random draws.

    The second is there on purpose: meta-training from the global network keeps
    the unadapted default near global's, so it is the trained candidate most
    likely to stay at or above global for entities with one or two rows.
    """
    rng = np.random.default_rng(seed)
    draws: list[dict[str, Any]] = [{}]
    seen = {json.dumps({k: getattr(base, k) for k in SEARCH_SPACE}, sort_keys=True)}
    if budget > 1 and base.warm_start != "global":
        draws.append({"warm_start": "global"})
        seen.add(
            json.dumps(
                {k: getattr(base, k) for k in SEARCH_SPACE} | {"warm_start": "global"},
                sort_keys=True,
            )
        )
    attempts = 0
    while len(draws) < budget and attempts < 100 * budget:
        attempts += 1
        change = {
            k: values[int(rng.integers(len(values)))]
            for k, values in SEARCH_SPACE.items()
        }
        change = {k: v.item() if hasattr(v, "item") else v for k, v in change.items()}
        key = json.dumps(change, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        draws.append({k: v for k, v in change.items() if getattr(base, k) != v})
    return draws


def tune(
    spec,
    splits: Splits,
    recipe: Recipe | None = None,
    budget: int = DEFAULT_BUDGET,
    seed: int = 0,
    ks: Sequence[int | None] = SUPPORT_KS,
    report_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Searches LiMAML's recipe on the tuning fold against the global model.

    Args:
        spec: The FeatureSpec.
        splits: `tuning_splits(records, spec, protocol)`: the fold is scored,
            train trains, val early-stops.
        recipe: The starting recipe; its fields outside the search space are
            kept, and it is the first trained candidate.
        budget: Trained candidates (meta-training runs), >= 1; the fallback and
            the test-time knobs come on top, without training.
        seed: Seeds the search and every model.
        ks: Support sizes of the sweep (None: the whole support).
        report_line: Called with one line per trial (default: the log).

    Returns:
        {"chosen": index, "trials": [...], "global_fold": {...}, "recipe":
        the chosen recipe's dict, "meta_config": the scored MetaConfig's dict,
        "rule": {...}, "budget", "seed"}.

    Raises:
        ValueError: budget < 1.
        TypeError: `splits` is not `TuningSplits` (its test members would be
            tuned on).
    """
    if not isinstance(splits, TuningSplits):
        raise TypeError(
            "tune needs tune.tuning_splits(records, spec, protocol), which holds "
            f"out a fold of the train members to score on; got {type(splits).__name__}"
            ", whose test members must never be tuned on"
        )
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(
            f"tune budget must be an integer >= 1 (trained candidates), got {budget!r}"
        )
    base = recipe or Recipe()
    line = report_line or (lambda text: logger.info("%s", text))
    scorer = _FoldScorer(splits.test, ks)
    trials: list[dict[str, Any]] = []

    def record(trial: dict[str, Any], seconds: float) -> None:
        trial["wall_s"] = round(seconds, 1)
        trials.append(trial)
        status = "" if trial["healthy"] else "  FAILED: " + "; ".join(trial["reasons"])
        lifts = " ".join(f"{k}:{v:+.4f}" for k, v in trial["fold_lift"].items())
        line(
            f"[tune] trial {len(trials) - 1:2d} {trial['name']:<28} mean lift "
            f"{trial['mean_lift']:+.4f} (fold lift by k {lifts}){status}"
        )

    with Timer() as timer:
        global_model, _ = baselines.train_global(spec, splits, base, seed)
        reference = scorer.measure(
            lambda cut: baselines.query_probabilities(global_model, cut, 0)
        )
    global_s = timer.seconds
    if not reference["health"]["healthy"]:
        logger.warning(
            "The global model failed its health check on the tuning fold: %s",
            "; ".join(reference["health"]["reasons"]),
        )
    # The fallback: LiMAML built from the global network, nothing meta-learned,
    # nothing adapted. Measured, not assumed, so the equality is checked.
    fallback_recipe = dataclasses.replace(
        base, warm_start="global", meta_epochs=0, inner_steps=0
    )
    with Timer() as timer:
        fallback, _ = baselines.train_meta_learner(
            spec, splits, fallback_recipe, seed, init=global_model
        )
        measured = scorer.measure(
            lambda cut: baselines.query_probabilities(fallback, cut, 0)
        )
    record(
        _trial(
            FALLBACK,
            {"warm_start": "global", "meta_epochs": 0, "inner_steps": 0},
            {"inner_steps": 0},
            measured,
            reference,
            fallback=True,
        ),
        global_s + timer.seconds,
    )
    # The global network adapted at test time: plain fine-tuning of its meta block.
    for prior in GLOBAL_ADAPT_PRIORS:
        for lr in GLOBAL_ADAPT_LRS:
            with Timer() as timer:
                measured = scorer.measure(
                    lambda cut, lr=lr, prior=prior: baselines.query_probabilities(
                        fallback, cut, 1, lr, support_prior=prior
                    )
                )
            record(
                _trial(
                    f"global+adapt lr={lr:g} c={prior:g}",
                    {"warm_start": "global", "meta_epochs": 0, "inner_steps": 0},
                    {"inner_steps": 1, "inner_lr": lr, "support_prior": prior},
                    measured,
                    reference,
                ),
                timer.seconds,
            )
    pretrained: dict[int, Any] = {}
    for number, change in enumerate(_draws(base, budget, seed)):
        candidate = dataclasses.replace(base, **change)
        with Timer() as timer:
            if candidate.warm_start == "global":
                init = global_model
            else:
                if candidate.pretrain_epochs not in pretrained:
                    pretrained[candidate.pretrain_epochs] = (
                        baselines.pretrain(spec, splits, candidate, seed)
                        if candidate.pretrain_epochs
                        else None
                    )
                init = pretrained[candidate.pretrain_epochs]
            model, history = baselines.train_meta_learner(
                spec, splits, candidate, seed, init=init
            )
        train_s = timer.seconds
        val_losses = history.get("val_loss", [])
        val_loss = min(val_losses) if val_losses else None
        name = (
            "recipe as given"
            if not change
            else (
                "recipe from global"
                if change == {"warm_start": "global"}
                else f"search {number}"
            )
        )
        # Test-time knobs: the default, then scaled steps and larger priors.
        knob_grid = [{"inner_steps": 0}]
        for boost in PRIOR_BOOSTS:
            for scale in LR_SCALES:
                knob_grid.append(
                    {
                        "inner_steps": candidate.inner_steps,
                        "inner_lr": candidate.inner_lr * scale,
                        "support_prior": candidate.support_prior + boost,
                    }
                )
        for knobs in knob_grid:
            with Timer() as timer:
                measured = scorer.measure(
                    lambda cut, kn=knobs, m=model: baselines.query_probabilities(
                        m,
                        cut,
                        kn["inner_steps"],
                        kn.get("inner_lr"),
                        support_prior=kn.get("support_prior"),
                    )
                )
            if val_loss is not None and not math.isfinite(val_loss):
                measured["health"] = {
                    "healthy": False,
                    "reasons": [f"validation loss {val_loss}"]
                    + measured["health"]["reasons"],
                }
            label = (
                "default (no adaptation)"
                if knobs["inner_steps"] == 0
                else f"lr={knobs['inner_lr']:g} c={knobs['support_prior']:g}"
            )
            record(
                _trial(
                    f"{name}: {label}",
                    change,
                    knobs,
                    measured,
                    reference,
                ),
                train_s + timer.seconds,
            )
            train_s = 0.0
    chosen = select(trials)
    trial = trials[chosen]
    chosen_recipe = recipe_of(base, trial)
    for i, t in enumerate(trials):
        ok, why = eligible(t)
        t["eligible"] = ok
        t["why_not"] = why
        t["chosen"] = i == chosen
    line(
        f"[tune] chosen: trial {chosen} {trial['name']} (fold mean lift "
        f"{trial['mean_lift']:+.4f}, worst k {trial['min_lift']:+.4f})"
    )
    return {
        "chosen": chosen,
        "chosen_name": trial["name"],
        "trials": trials,
        "global_fold": {
            "auc": reference["auc"],
            "member_auc": reference["member_auc"],
            "healthy": reference["health"]["healthy"],
        },
        "recipe": chosen_recipe.to_dict(),
        "meta_config": scored_meta_config(chosen_recipe).to_dict(),
        "rule": {
            "objective": "mean over k of (fold overall AUC - global's fold overall AUC)",
            "constraints": [
                "healthy (finite, non-constant scores, AUC > 0.5, finite val loss)",
                "fold overall AUC >= global's at every k",
                f"fold mean per-member AUC >= global's - {MEMBER_TOLERANCE} at every k",
                "mean lift over k >= 0 on each half of the fold's members",
            ],
            "min_gain": MIN_GAIN,
            "fallback": "LiMAML warm-started from the trained global network, 0 "
            "meta-epochs, 0 inner steps (scores equal global's)",
        },
        "budget": budget,
        "seed": seed,
        "support_ks": [k_label(k) for k in ks],
    }


def recipe_of(base: Recipe, trial: Mapping[str, Any]) -> Recipe:
    """The recipe a trial stands for: its training changes and test-time knobs."""
    recipe = dataclasses.replace(base, **trial["recipe"])
    knobs = trial["knobs"]
    return dataclasses.replace(
        recipe,
        adapt_inner_steps=knobs.get("inner_steps"),
        adapt_inner_lr=knobs.get("inner_lr"),
        adapt_support_prior=knobs.get("support_prior"),
    )


def scored_meta_config(recipe: Recipe):
    """The MetaConfig LiMAML is scored and exported with under `recipe`."""
    config = dataclasses.replace(
        recipe.meta_config(), support_prior=float(recipe.support_prior)
    )
    return dataclasses.replace(config, **recipe.adaptation())


def chosen_recipe(result: Mapping[str, Any]) -> Recipe:
    """The chosen recipe of a `tune` result (or of a loaded tune_config.json)."""
    return Recipe.from_dict(result["recipe"])


# -------------------------------------------------------------- writing
def trials_markdown(result: Mapping[str, Any]) -> str:
    """Every trial as a markdown table: fold AUC and lift over global per k."""
    ks = list(result["support_ks"])
    lines = [
        "Global model on the tuning fold: "
        + ", ".join(f"k={k} AUC {result['global_fold']['auc'][k]:.4f}" for k in ks),
        "",
        "| # | trial | fold AUC by k ("
        + ", ".join(ks)
        + ") | fold lift by k | mean lift | eligible | chosen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, t in enumerate(result["trials"]):
        aucs = " / ".join(f"{t['fold_auc'][k]:.4f}" for k in ks)
        lifts = " / ".join(f"{t['fold_lift'][k]:+.4f}" for k in ks)
        verdict = "yes" if t.get("eligible") else f"no: {t.get('why_not', '')}"
        lines.append(
            f"| {i} | {t['name']} | {aucs} | {lifts} | {t['mean_lift']:+.4f} | "
            f"{verdict} | {'**yes**' if t.get('chosen') else ''} |"
        )
    return "\n".join(lines)


def write_outputs(result: Mapping[str, Any], out_dir: str | os.PathLike) -> dict:
    """Writes tune_config.json, tune_trials.json and tune_trials.md.

    Returns:
        {"config": path, "trials": path, "markdown": path}.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "config": os.path.join(out_dir, "tune_config.json"),
        "trials": os.path.join(out_dir, "tune_trials.json"),
        "markdown": os.path.join(out_dir, "tune_trials.md"),
    }
    trial = result["trials"][result["chosen"]]
    config = {
        "meta_config": result["meta_config"],
        "recipe": result["recipe"],
        "chosen_trial": result["chosen"],
        "chosen_name": result["chosen_name"],
        "is_fallback": bool(trial["fallback"]),
        "fold_lift": trial["fold_lift"],
        "rule": result["rule"],
    }
    with open(paths["config"], "w", encoding="utf-8") as f:
        json.dump(report.json_safe(config), f, indent=2)
    with open(paths["trials"], "w", encoding="utf-8") as f:
        json.dump(report.json_safe(dict(result)), f, indent=2)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("# limaml tune: every trial\n\n" + trials_markdown(result) + "\n")
    return paths
