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
from its test lift by 0.04. Test members are never read.

The fold has a few hundred members with a handful of query rows each, so a
lift of 0.001-0.003 AUC is the size of the fold's own sampling noise: the
rule decides on intervals, not on points. Every trial's lift over global (its
fold AUC minus global's) gets a 90% percentile interval from a paired
bootstrap over the fold's entities (`tf_limaml.intervals`, 1000 resamples,
seeded by `seed`); every trial and k is measured on the same resamples, so
trials compare with global and with each other resample by resample. The rule
(`select`):

1. **Eligible** (`eligible`): healthy, and
   * at every k, the interval of the overall-AUC lift reaches 0 or above: a
     trial is out only when its interval says it is below global (upper bound
     < 0), not when its point is a hair below;
   * the same for the mean per-member AUC at every k;
   * the interval of the lift averaged over k is above 0: a gain is shown.
   "Never below global" is read as "not shown below global" (upper bound
   >= 0), not as "shown within a tolerance of global" (lower bound >
   -tolerance): to pass the second, a trial's whole interval must fit above
   -tolerance, so the tolerance must be at least the interval's half-width,
   the fold's noise; a smaller one rejects every trial that moves scores
   (the point rule again, by another name), a larger one is a guess. Safety
   at small k comes from the upper bound (a harm the fold can see excludes
   the trial) and from the third condition (no shown gain: the fallback).
2. **Chosen**: the best eligible trial is the one of largest mean lift over k.
   The contenders are the eligible trials *not shown worse* than the best (the
   paired interval of their mean lift minus the best's reaches 0). Among them
   the most preferred family wins (`FAMILIES`: meta-learned, then fine-tuning
   of the global model, then the meta-trained network left unadapted), then
   the larger mean lift. Every candidate adapts the meta block only, so every
   one is servable as d floats per entity; full MAML is never a candidate.
3. No trial eligible: the **fallback** wins.

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
lift over global at every k and its interval, the mean lift with its interval,
its worst per-member lift, and the verdict with the reason).

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
from tf_limaml.intervals import EntityBootstrap, Resampled

logger = logging.getLogger(__name__)

# The search space of trained candidates (Recipe fields).
SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "inner_lr": (0.05, 0.1, 0.2, 0.4),
    "inner_steps": (1, 2, 3),
    "support_prior": (0.0, 3.0, 10.0, 30.0),
    "first_order": (True, False),
    "meta_learning_rate": (3e-4, 1e-3, 3e-3, 1e-2),
    "pretrain_epochs": (0, 4, 8),
    "warm_start": ("pretrain", "global"),
    "embedding_steps": (0, 2),
    "embedding_prior": (3.0, 10.0, 30.0),
    "freeze_network": (False, True),
}
# The trained candidate safe by construction (planned right after the recipe
# given): the trained global network, frozen, plus the personal residual
# fitted by Newton steps with a meta-learned projection. Its unadapted model
# is global's exactly, and an entity moves away from it only as far as its
# support outweighs the prior.
RESIDUAL_FROM_GLOBAL = {
    "warm_start": "global",
    "freeze_network": True,
    "inner_steps": 0,
    "embedding_steps": 2,
}
# Gradient steps on the meta block from the member-ID pretraining: LiMAML as
# the paper runs it, so the search always holds it beside the residual.
MAML_STEPS_FROM_PRETRAINING = {
    "warm_start": "pretrain",
    "freeze_network": False,
    "inner_steps": 1,
    "embedding_steps": 0,
    "meta_learning_rate": 1e-3,
}
# The same residual on the member-ID pretraining, frozen: a network trained as
# the ID-embedding baseline is (on the train entities, with their IDs), the IDs
# dropped and LiMAML's fit of d floats in their place. On data where a network
# trained with IDs scores new entities better than global, this is the
# meta-learned candidate that carries that strength. It is the MovieLens
# recipe (`Recipe()`): on MovieLens-100K's tuning folds it is level with the
# ID embedding and with or ahead of the residual on global's network, and
# ahead of it on the val members at every k.
RESIDUAL_FROM_PRETRAINING = {
    "warm_start": "pretrain",
    "freeze_network": True,
    "inner_steps": 0,
    "embedding_steps": 2,
}
# The sequence meta block (`SequenceMetaBlock`, the `limaml_sequence` model)
# from the global network: it reads the support rows themselves, so the
# search holds a meta block that amortizes adaptation beside the fit and
# the gradient steps. Its own meta block learns: never frozen.
SEQUENCE_FROM_GLOBAL = {
    "meta_block": "sequence",
    "warm_start": "global",
    "freeze_network": False,
}
# The fallback: the global network as LiMAML, nothing meta-learned, nothing
# adapted (no inner step, no embedding fit). Fine-tuning adapts it at test time.
FALLBACK_CHANGES = {
    "meta_block": "mlp",
    "warm_start": "global",
    "meta_epochs": 0,
    "inner_steps": 0,
    "embedding_steps": 0,
    "learn_embedding_prior": False,
}
# Test-time scales of a trained candidate's embedding-fit prior (a stronger
# prior falls back toward the unadapted model).
EMBEDDING_PRIOR_SCALES = (0.3, 3.0, 10.0)
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
# The selection rule's intervals (see the module docstring): a paired
# percentile bootstrap over the fold's entities, the same resamples for every
# trial and k.
INTERVAL_LEVEL = 0.9
RESAMPLES = 1000
# Trial families, most preferred first: among candidates not shown worse than
# the best, a meta-learned one is chosen over fine-tuning of global, and both
# over the meta-trained network left unadapted (one model for every entity).
META_LEARNED = "meta_learned"
FINETUNE = "finetune"
META_DEFAULT = "meta_default"
GLOBAL = "global"
FAMILIES = (META_LEARNED, FINETUNE, META_DEFAULT)
# Default number of trained candidates.
DEFAULT_BUDGET = 6
FALLBACK = "fallback"
# Share of the train entities held out as the tuning fold (see the module doc).
TUNING_FOLD = 1 / 3


# ------------------------------------------------------------- the rule
def summarize_trial(
    lift: Mapping[str, Resampled],
    member_lift: Mapping[str, Resampled],
    level: float = INTERVAL_LEVEL,
) -> dict[str, Any]:
    """A trial's lifts over global on the tuning fold, per k, with intervals.

    Args:
        lift: {k label: the candidate's fold overall AUC minus global's, as a
            `Resampled` of the fold's `EntityBootstrap`}.
        member_lift: {k label: the same for the mean per-member AUC}.
        level: Level of the percentile intervals.

    Returns:
        {"fold_lift": {k: estimate}, "fold_lift_interval": {k: [low, high]},
        "fold_member_lift", "fold_member_lift_interval" (the same for the
        per-member AUC), "mean_lift" and "mean_lift_interval" (the lift
        averaged over k, resample by resample), "min_lift", "min_member_lift",
        "interval_level", and "_mean_lift": the `Resampled` mean lift, kept in
        memory for the paired comparison of candidates (never written).
    """
    mean = Resampled.mean(list(lift.values()))
    out: dict[str, Any] = {
        "fold_lift": {k: float(v.estimate) for k, v in lift.items()},
        "fold_lift_interval": {k: list(v.interval(level)) for k, v in lift.items()},
        "fold_member_lift": {k: float(v.estimate) for k, v in member_lift.items()},
        "fold_member_lift_interval": {
            k: list(v.interval(level)) for k, v in member_lift.items()
        },
        "mean_lift": float(mean.estimate),
        "mean_lift_interval": list(mean.interval(level)),
        "interval_level": float(level),
        "_mean_lift": mean,
    }
    out["min_lift"] = float(min(out["fold_lift"].values()))
    members = [v for v in out["fold_member_lift"].values() if math.isfinite(v)]
    out["min_member_lift"] = float(min(members)) if members else 0.0
    return out


def _span(estimate: float, interval: Sequence[float]) -> str:
    return f"{estimate:+.4f} [{interval[0]:+.4f}, {interval[1]:+.4f}]"


def eligible(trial: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a trial may be chosen, and if not, why (see the module docstring).

    Args:
        trial: A trial of `tune` (or `summarize_trial` output with "fallback"
            and "healthy").

    Returns:
        (True, "") or (False, the first reason, with the numbers).
    """
    if trial.get("fallback"):
        return True, ""
    if not trial.get("healthy", True):
        return False, "failed the health check"
    level = trial.get("interval_level", INTERVAL_LEVEL)
    values = [trial["mean_lift"], *trial["mean_lift_interval"]]
    for k, (low, high) in trial["fold_lift_interval"].items():
        values += [trial["fold_lift"][k], low, high]
    if not all(math.isfinite(v) for v in values):
        return False, "a fold AUC or its interval is not finite"
    for k, (low, high) in trial["fold_lift_interval"].items():
        if high < 0:
            return False, (
                f"below global at k={k}: lift {_span(trial['fold_lift'][k], (low, high))}"
                f", the {level:.0%} interval below 0"
            )
    for k, (low, high) in trial.get("fold_member_lift_interval", {}).items():
        if math.isfinite(high) and high < 0:
            return False, (
                f"per-member AUC below global at k={k}: "
                f"{_span(trial['fold_member_lift'][k], (low, high))}"
            )
    if not trial["mean_lift_interval"][0] > 0:
        return False, (
            f"no gain shown: mean lift {_span(trial['mean_lift'], trial['mean_lift_interval'])}"
            f", the {level:.0%} interval not above 0"
        )
    return True, ""


def _not_shown_worse(trial: Mapping[str, Any], best: Mapping[str, Any]) -> bool:
    """The paired interval of (trial - best) mean lift reaches 0 or above."""
    if trial is best:
        return True
    a, b = trial.get("_mean_lift"), best.get("_mean_lift")
    if a is None or b is None:
        return False
    return (a - b).interval(trial.get("interval_level", INTERVAL_LEVEL))[1] >= 0


def select(trials: Sequence[Mapping[str, Any]]) -> int:
    """The index of the chosen trial: the rule of `limaml tune`.

    1. The eligible trials (`eligible`), the fallback aside. None: the fallback.
    2. The best: the eligible trial of largest mean lift over k.
    3. The contenders: the eligible trials not shown worse than the best (the
       paired interval of their mean lift minus the best's reaches 0).
    4. The chosen: the contender of the most preferred family (`FAMILIES`:
       meta-learned, then fine-tuning of global, then the meta-trained
       default); within it, the largest mean lift. Ties keep the earlier trial.

    Args:
        trials: Trials of `tune` (JSON keys plus "_mean_lift"); exactly one
            has "fallback": True.

    Returns:
        The index into `trials`.

    Raises:
        ValueError: No trial is the fallback.
    """
    fallbacks = [i for i, t in enumerate(trials) if t.get("fallback")]
    if not fallbacks:
        raise ValueError(
            "select needs the global fallback among the trials (a trial with "
            "'fallback': True); build the candidates with tune.tune"
        )
    ok = [i for i, t in enumerate(trials) if not t.get("fallback") and eligible(t)[0]]
    if not ok:
        return fallbacks[0]
    best = max(ok, key=lambda i: (trials[i]["mean_lift"], -i))
    contenders = [i for i in ok if _not_shown_worse(trials[i], trials[best])]

    def preference(i: int) -> tuple[int, float, int]:
        family = trials[i].get("family", FAMILIES[-1])
        rank = FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)
        return (-rank, trials[i]["mean_lift"], -i)

    return max(contenders, key=preference)


def verdict(trial: Mapping[str, Any]) -> str:
    """The trial's verdict in words: chosen, or not and why (with the numbers)."""
    if trial.get("chosen"):
        return "**chosen**" + (
            " (the global fallback)" if trial.get("fallback") else ""
        )
    if trial.get("eligible"):
        why = trial.get("why_not")
        return "eligible, not chosen" + (f": {why}" if why else "")
    return f"not eligible: {trial.get('why_not', '')}"


def explain(trials: Sequence[Mapping[str, Any]], chosen: int) -> list[str]:
    """Why each trial was not chosen, in words ("" for the chosen one).

    Args:
        trials: The trials `select` chose from.
        chosen: `select(trials)`.

    Returns:
        One reason per trial: `eligible`'s for the ineligible, the step of
        `select` that passed over the others.
    """
    ok = [i for i, t in enumerate(trials) if not t.get("fallback") and eligible(t)[0]]
    best = max(ok, key=lambda i: (trials[i]["mean_lift"], -i)) if ok else None
    pick = trials[chosen]
    out = []
    for i, trial in enumerate(trials):
        fit, why = eligible(trial)
        if i == chosen:
            why = ""
        elif not fit:
            pass
        elif trial.get("fallback"):
            why = f"a personalized trial is eligible (trial {chosen})"
        elif not _not_shown_worse(trial, trials[best]):
            why = (
                f"shown worse than the best eligible trial, {best} (mean lift "
                f"{trials[best]['mean_lift']:+.4f})"
            )
        elif pick.get("family") != trial.get("family"):
            why = (
                f"trial {chosen} preferred: {pick.get('family')} over "
                f"{trial.get('family')}, neither shown worse than the best"
            )
        else:
            why = f"trial {chosen} has the larger mean lift ({pick['mean_lift']:+.4f})"
        out.append(why)
    return out


def rule() -> dict[str, Any]:
    """The selection rule in words, as `tune` records it."""
    level = f"{INTERVAL_LEVEL:.0%}"
    return {
        "intervals": (
            f"{level} percentile intervals of a paired bootstrap over the tuning "
            f"fold's entities ({RESAMPLES} resamples, seeded; every trial and k on "
            "the same resamples); lift = the trial's fold AUC minus global's"
        ),
        "objective": "mean over k of the lift in fold overall AUC",
        "constraints": [
            "healthy (finite, non-constant scores, AUC > 0.5, finite val loss)",
            f"at every k, the {level} interval of the overall-AUC lift reaches 0 or "
            "above (not shown below global)",
            f"at every k, the {level} interval of the mean per-member AUC lift "
            "reaches 0 or above",
            f"the {level} interval of the mean lift over k is above 0 (a gain shown)",
        ],
        "choice": (
            "among the eligible, the best is the largest mean lift; of those whose "
            "paired interval of (mean lift - the best's) reaches 0, the most "
            "preferred family wins (" + " > ".join(FAMILIES) + "), then the larger "
            "mean lift"
        ),
        "fallback": "LiMAML warm-started from the trained global network, 0 "
        "meta-epochs, 0 inner steps (scores equal global's), when no trial is "
        "eligible",
    }


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
    records: Mapping[str, Sequence[bytes]],
    fraction: float = TUNING_FOLD,
    start: float = 0.0,
) -> dict[str, list[bytes]]:
    """The records `tune` works on: a stable share of the train entities is the
    tuning fold, in the place of the test entities.

    The fold's entities play the test entities' part: every model meets them
    only through their (cut) support rows, and the candidates are scored on
    their query rows. Val is unchanged (early stopping); the real test entities
    are left out.

    Args:
        records: Serialized task records by split (`protocol.records_from_dir`).
        fraction: Share of the train entities held out, in (0, 1).
        start: Leave out the entities of the fold of this fraction: the fold
            is the entities whose tuning hash lies in [start, fraction), so
            disjoint windows give disjoint folds (`bench/limaml_recipe.py
            --fold-window`).

    Returns:
        Records by split: train without the fold, val, and the fold as test.

    Raises:
        ValueError: fraction outside (0, 1), or start outside [0, fraction).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"tuning fraction must be in (0, 1), got {fraction!r}")
    if not 0.0 <= start < fraction:
        raise ValueError(
            f"tuning fold start must be in [0, fraction={fraction}), got {start!r}"
        )
    fold = [
        in_tuning_fold(e, fraction) and not in_tuning_fold(e, start)
        for e in map(_entity_id, records["train"])
    ]
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
    start: float = 0.0,
) -> TuningSplits:
    """The task batches `tune` takes: `tuning_records` as `TuningSplits`."""
    return TuningSplits.from_records(
        tuning_records(records, fraction, start), spec, protocol
    )


# ------------------------------------------------------------ measuring
class FoldScorer:
    """Fold metrics at every k with their resamples over the fold's entities.

    Every trial is measured on the same `EntityBootstrap` (the same resamples),
    so lifts over global and differences between trials are paired.

    Args:
        entity_ids: The entity of each real query row of the fold, [N].
        labels: Each row's 0/1 label, [N].
        seed: Seeds the resamples.
        n_resamples: Resamples of the fold's entities.
    """

    def __init__(
        self,
        entity_ids: np.ndarray,
        labels: np.ndarray,
        seed: int = 0,
        n_resamples: int = RESAMPLES,
    ):
        self.ids = np.asarray(entity_ids).ravel()
        self.labels = np.asarray(labels).ravel()
        self.bootstrap = EntityBootstrap(self.ids, self.labels, n_resamples, seed)

    @classmethod
    def of_batch(cls, batch: Batch, seed: int = 0) -> FoldScorer:
        """The scorer of a task batch's real query rows (row-major, as
        `batch[query mask]` flattens them)."""
        mask = cls.query_mask(batch)
        return cls(
            np.repeat(np.asarray(batch[ENTITY_ID_KEY]), mask.sum(axis=1)),
            np.asarray(batch[f"{QUERY}_{LABEL_KEY}"])[mask],
            seed=seed,
        )

    @staticmethod
    def query_mask(batch: Batch) -> np.ndarray:
        """Which query cells `[T, Q]` of a task batch are real rows."""
        return np.asarray(batch[f"{QUERY}_{MASK_KEY}"]) > 0

    def measure_rows(self, scores: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Metrics of flat query-row scores by k label.

        Returns:
            {"auc": {k}, "member_auc": {k}, "auc_resampled": {k: Resampled},
            "member_resampled": {k: Resampled}, "health": {"healthy", "reasons"}}.
        """
        out: dict[str, Any] = {
            "auc": {},
            "member_auc": {},
            "auc_resampled": {},
            "member_resampled": {},
        }
        health = {"healthy": True, "reasons": []}
        nan = Resampled(float("nan"), np.full(self.bootstrap.n_resamples, np.nan))
        for label, values in scores.items():
            values = np.asarray(values, dtype=np.float64).ravel()
            check = evaluation.health_check(self.labels, values, name=f"k={label}")
            if not check["healthy"]:
                health = {
                    "healthy": False,
                    "reasons": [f"k={label}: {r}" for r in check["reasons"]],
                }
            if np.isfinite(values).all():
                auc = self.bootstrap.auc(values)
                member = self.bootstrap.member_auc(values)
            else:
                auc = member = nan
            out["auc"][label] = float(auc.estimate)
            out["member_auc"][label] = float(member.estimate)
            out["auc_resampled"][label] = auc
            out["member_resampled"][label] = member
        out["health"] = health
        return out


def trial_of(
    name: str,
    measured: Mapping[str, Any],
    reference: Mapping[str, Any],
    family: str,
    changes: Mapping[str, Any] | None = None,
    knobs: Mapping[str, Any] | None = None,
    fallback: bool = False,
) -> dict[str, Any]:
    """A trial: a candidate's fold measurement against global's (`FoldScorer`).

    Args:
        name: The trial's name in the table.
        measured: The candidate's `FoldScorer.measure_rows` output.
        reference: The global model's.
        family: One of `FAMILIES`, or "global" for the fallback.
        changes: Its recipe changes (training).
        knobs: Its test-time adaptation.
        fallback: Whether this is the global fallback.

    Returns:
        The trial dict (`summarize_trial` keys, plus name, family, recipe,
        knobs, healthy, reasons, fold_auc, fold_member_auc).
    """
    trial = {
        "name": name,
        "fallback": fallback,
        "family": GLOBAL if fallback else family,
        "recipe": dict(changes or {}),
        "knobs": dict(knobs or {}),
        "healthy": measured["health"]["healthy"],
        "reasons": list(measured["health"]["reasons"]),
        "fold_auc": dict(measured["auc"]),
        "fold_member_auc": dict(measured["member_auc"]),
    }
    ks = list(reference["auc_resampled"])
    trial.update(
        summarize_trial(
            {
                k: measured["auc_resampled"][k] - reference["auc_resampled"][k]
                for k in ks
            },
            {
                k: measured["member_resampled"][k] - reference["member_resampled"][k]
                for k in ks
            },
        )
    )
    return trial


def _draws(base: Recipe, budget: int, seed: int) -> list[dict[str, Any]]:
    """The trained candidates' recipe changes: the base recipe, then the
    planned ones it is not already (warm-started from the global model,
    `RESIDUAL_FROM_GLOBAL`, `MAML_STEPS_FROM_PRETRAINING`,
    `SEQUENCE_FROM_GLOBAL`, `RESIDUAL_FROM_PRETRAINING`), then random draws,
    `budget` in all.

    The warm start from global is there on purpose: meta-training from the
    global network keeps the unadapted default near global's, so it is the
    trained candidate most likely to stay at or above global for entities
    with one or two rows.
    """
    rng = np.random.default_rng(seed)
    draws: list[dict[str, Any]] = [{}]
    seen = {json.dumps({k: getattr(base, k) for k in SEARCH_SPACE}, sort_keys=True)}
    for planned in (
        {"warm_start": "global"},
        RESIDUAL_FROM_GLOBAL,
        MAML_STEPS_FROM_PRETRAINING,
        SEQUENCE_FROM_GLOBAL,
        RESIDUAL_FROM_PRETRAINING,
    ):
        change = {k: v for k, v in planned.items() if getattr(base, k) != v}
        key = json.dumps(
            {k: getattr(base, k) for k in SEARCH_SPACE} | change, sort_keys=True
        )
        if len(draws) < budget and change and key not in seen:
            draws.append(change)
            seen.add(key)
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
    fold = splits.test
    mask = FoldScorer.query_mask(fold)
    scorer = FoldScorer.of_batch(fold, seed)
    cuts = {k_label(k): cut_support(fold, k) for k in ks}

    def measure(score: Callable[[Batch], np.ndarray]) -> dict[str, Any]:
        # One call per trial: the fold's query scores at every k.
        return scorer.measure_rows(
            {label: np.asarray(score(cut))[mask] for label, cut in cuts.items()}
        )

    trials: list[dict[str, Any]] = []

    def record(trial: dict[str, Any], seconds: float) -> None:
        trial["wall_s"] = round(seconds, 1)
        trials.append(trial)
        status = "" if trial["healthy"] else "  FAILED: " + "; ".join(trial["reasons"])
        lifts = " ".join(f"{k}:{v:+.4f}" for k, v in trial["fold_lift"].items())
        line(
            f"[tune] trial {len(trials) - 1:2d} {trial['name']:<28} mean lift "
            f"{_span(trial['mean_lift'], trial['mean_lift_interval'])} "
            f"(fold lift by k {lifts}){status}"
        )

    with Timer() as timer:
        global_model, _ = baselines.train_global(spec, splits, base, seed)
        reference = measure(
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
    fallback_recipe = dataclasses.replace(base, **FALLBACK_CHANGES)
    with Timer() as timer:
        fallback, _ = baselines.train_meta_learner(
            spec, splits, fallback_recipe, seed, init=global_model
        )
        measured = measure(lambda cut: baselines.query_probabilities(fallback, cut, 0))
    record(
        trial_of(
            FALLBACK,
            measured,
            reference,
            GLOBAL,
            FALLBACK_CHANGES,
            {"inner_steps": 0},
            fallback=True,
        ),
        global_s + timer.seconds,
    )
    # The global network adapted at test time: plain fine-tuning of its meta block.
    for prior in GLOBAL_ADAPT_PRIORS:
        for lr in GLOBAL_ADAPT_LRS:
            with Timer() as timer:
                measured = measure(
                    lambda cut, lr=lr, prior=prior: baselines.query_probabilities(
                        fallback, cut, 1, lr, support_prior=prior
                    )
                )
            record(
                trial_of(
                    f"global+adapt lr={lr:g} c={prior:g}",
                    measured,
                    reference,
                    FINETUNE,
                    FALLBACK_CHANGES,
                    {"inner_steps": 1, "inner_lr": lr, "support_prior": prior},
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
        if not change:
            name = "recipe as given"
        elif change == {"warm_start": "global"}:
            name = "recipe from global"
        elif candidate == dataclasses.replace(base, **RESIDUAL_FROM_GLOBAL):
            name = "residual from global"
        elif candidate == dataclasses.replace(base, **MAML_STEPS_FROM_PRETRAINING):
            name = "MAML steps from pretraining"
        elif candidate == dataclasses.replace(base, **SEQUENCE_FROM_GLOBAL):
            name = "sequence meta block from global"
        elif candidate == dataclasses.replace(base, **RESIDUAL_FROM_PRETRAINING):
            name = "residual from pretraining"
        else:
            name = f"search {number}"
        # Test-time knobs: the default, then scaled steps and larger priors.
        # The model's own step count: a sequence meta block has its own.
        inner_steps = model.meta_config.inner_steps
        knob_grid = [{"inner_steps": 0}]
        for boost in PRIOR_BOOSTS:
            for scale in LR_SCALES:
                knob_grid.append(
                    {
                        "inner_steps": inner_steps,
                        "inner_lr": candidate.inner_lr * scale,
                        "support_prior": candidate.support_prior + boost,
                    }
                )
        trained = {
            "inner_steps": inner_steps,
            "inner_lr": candidate.inner_lr,
            "support_prior": candidate.support_prior,
        }
        if candidate.embedding_steps and not inner_steps:
            # Only the embedding fit adapts: the inner-lr knobs are one trial.
            trained = {"inner_steps": 0, "embedding_steps": candidate.embedding_steps}
            knob_grid = [knob_grid[0], trained]
        if candidate.embedding_steps and not candidate.learn_embedding_prior:
            for scale in EMBEDDING_PRIOR_SCALES:
                knob_grid.append(
                    {**trained, "embedding_prior": candidate.embedding_prior * scale}
                )
        for knobs in knob_grid:
            with Timer() as timer:
                measured = measure(
                    lambda cut, kn=knobs, m=model: baselines.query_probabilities(
                        m,
                        cut,
                        kn["inner_steps"],
                        kn.get("inner_lr"),
                        support_prior=kn.get("support_prior"),
                        options=_fit_options(kn),
                    )
                )
            if val_loss is not None and not math.isfinite(val_loss):
                measured["health"] = {
                    "healthy": False,
                    "reasons": [f"validation loss {val_loss}"]
                    + measured["health"]["reasons"],
                }
            adapts = knobs != {"inner_steps": 0}
            if not adapts:
                label = "default (no adaptation)"
            elif not knobs["inner_steps"] and "embedding_prior" in knobs:
                label = f"fit prior={knobs['embedding_prior']:g}"
            elif not knobs["inner_steps"]:
                label = (
                    "fit, learned prior"
                    if candidate.learn_embedding_prior
                    else f"fit prior={candidate.embedding_prior:g}"
                )
            else:
                label = f"lr={knobs['inner_lr']:g} c={knobs['support_prior']:g}"
                if "embedding_prior" in knobs:
                    label += f" prior={knobs['embedding_prior']:g}"
            record(
                trial_of(
                    f"{name}: {label}",
                    measured,
                    reference,
                    META_LEARNED if adapts else META_DEFAULT,
                    change,
                    knobs,
                ),
                train_s + timer.seconds,
            )
            train_s = 0.0
    chosen = select(trials)
    trial = trials[chosen]
    chosen_recipe = recipe_of(base, trial)
    for i, (t, why) in enumerate(zip(trials, explain(trials, chosen), strict=True)):
        t["eligible"] = eligible(t)[0]
        t["chosen"] = i == chosen
        t["why_not"] = why
        t["verdict"] = verdict(t)
    line(
        f"[tune] chosen: trial {chosen} {trial['name']} (fold mean lift "
        f"{_span(trial['mean_lift'], trial['mean_lift_interval'])}, "
        f"{INTERVAL_LEVEL:.0%} interval; worst k {trial['min_lift']:+.4f})"
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
        "rule": rule(),
        "budget": budget,
        "seed": seed,
        "support_ks": [k_label(k) for k in ks],
    }


def _fit_options(knobs: Mapping[str, Any]):
    """The embedding fit's test-time knobs of a trial (None: the trained ones).

    The default-only trial (`{"inner_steps": 0}`) fits nothing.
    """
    from tf_limaml.config import AdaptOptions  # noqa: PLC0415

    if knobs == {"inner_steps": 0}:
        return AdaptOptions(embedding_steps=0)
    prior = knobs.get("embedding_prior")
    return AdaptOptions(
        embedding_steps=knobs.get("embedding_steps"),
        embedding_prior=None if prior is None else float(prior),
    )


def recipe_of(base: Recipe, trial: Mapping[str, Any]) -> Recipe:
    """The recipe a trial stands for: its training changes and test-time knobs."""
    recipe = dataclasses.replace(base, **trial["recipe"])
    knobs = trial["knobs"]
    return dataclasses.replace(
        recipe,
        adapt_inner_steps=knobs.get("inner_steps"),
        adapt_inner_lr=knobs.get("inner_lr"),
        adapt_support_prior=knobs.get("support_prior"),
        adapt_embedding_steps=(
            0 if knobs == {"inner_steps": 0} else knobs.get("embedding_steps")
        ),
        adapt_embedding_prior=knobs.get("embedding_prior"),
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
    """Every trial as a markdown table: its lift over global per k with its
    interval, the mean lift with its interval, and the verdict with the reason."""
    ks = list(result["support_ks"])
    rule_ = result["rule"]
    lines = [
        "Global model on the tuning fold: "
        + ", ".join(f"k={k} AUC {result['global_fold']['auc'][k]:.4f}" for k in ks),
        "",
        f"Intervals: {rule_['intervals']}.",
        "",
        "Eligible: " + "; ".join(rule_["constraints"]) + ".",
        "",
        f"Chosen: {rule_['choice']}; else {rule_['fallback']}.",
        "",
        "| # | trial | family | fold lift over global by k ("
        + ", ".join(ks)
        + "), [interval] | mean lift [interval] | worst per-member lift "
        "[interval] | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, t in enumerate(result["trials"]):
        lifts = "; ".join(
            f"{k}: {_span(t['fold_lift'][k], t['fold_lift_interval'][k])}" for k in ks
        )
        member = t.get("fold_member_lift", {})
        worst = min(
            (k for k in member if math.isfinite(member[k])),
            key=member.get,
            default=None,
        )
        member_cell = (
            f"k={worst}: {_span(member[worst], t['fold_member_lift_interval'][worst])}"
            if worst is not None
            else "n/a"
        )
        lines.append(
            f"| {i} | {t['name']} | {t.get('family', '')} | {lifts} | "
            f"{_span(t['mean_lift'], t['mean_lift_interval'])} | {member_cell} | "
            f"{t.get('verdict') or verdict(t)} |"
        )
    return "\n".join(lines)


def public_trial(trial: Mapping[str, Any]) -> dict[str, Any]:
    """A trial without its in-memory resamples (the keys starting with "_")."""
    return {k: v for k, v in trial.items() if not k.startswith("_")}


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
        "family": trial["family"],
        "fold_lift": trial["fold_lift"],
        "fold_lift_interval": trial["fold_lift_interval"],
        "mean_lift_interval": trial["mean_lift_interval"],
        "rule": result["rule"],
    }
    with open(paths["config"], "w", encoding="utf-8") as f:
        json.dump(report.json_safe(config), f, indent=2)
    written = dict(result, trials=[public_trial(t) for t in result["trials"]])
    with open(paths["trials"], "w", encoding="utf-8") as f:
        json.dump(report.json_safe(written), f, indent=2)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("# limaml tune: every trial\n\n" + trials_markdown(result) + "\n")
    return paths
