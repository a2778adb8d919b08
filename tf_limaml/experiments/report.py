"""The comparison report: report.json, report.md and lift.png.

`aggregate` turns per-seed measurements into means and standard deviations,
`compare` puts the shipped model (the `limaml` row) against the strongest
baseline of the run at every k and writes the verdict, `check_targets` judges
the means against the targets of the MovieLens issue (or, for a user's own
data, `target_set="own"`, only against that run's own baselines), and
`write_report` writes the three files:

* `report.json`: `{"models": {NAME: {"overall_auc", "overall_auc_std", "logloss",
  "logloss_std", "mean_member_auc", "mean_member_auc_std", "support_k": {"1":
  {...}, ..., "all": {...}}, "wall_s", ...}}, "protocol": {...}, "comparison":
  {...}, "targets": [...], ...}`; values are means over the seeds;
* `report.md`: the verdict up top (with its warnings), the protocol, the
  tables, the chart, the shipped model against the strongest baseline at
  every k, every target with what was measured (met or not), and what was
  tried;
* `lift.png`: overall-AUC lift over `global` against the support size k, one
  line per model (matplotlib, Agg backend).

The verdict (`compare`): at every k the strongest baseline is the best of
`BASELINES` (the ID embedding, fine-tuning, global) at that k. Every lift is a
difference of seed-mean AUCs with a 90% interval from a paired bootstrap over
the test entities (`tf_limaml.intervals`); the verdict names the winner on the
AUC difference averaged over k (the shipped model, the strongest baseline, or
neither when the interval holds 0) and what to ship. It warns below
`MIN_TEST_ENTITIES` test entities and when its interval holds 0. When
`limaml tune` fell back to global or to fine-tuning, the report says so in
those words and the `limaml` row is named for what it is, not LiMAML.

Per seed, a model's measurement is a dict:

    {"overall_auc": ..., "logloss": ..., "mean_member_auc": ...,
     "support_k": {"1": {"overall_auc": ..., "logloss": ..., "mean_member_auc": ...,
                         "rows": QueryRows},   # optional: for the intervals
                   ..., "all": {...}},
     "wall_s": ...,
     "health": {"healthy": ..., "reasons": [...]}}   # optional

`rows` (`protocol.QueryRows`: entity, label and score of each test query row)
is what the bootstrap resamples; without it, lifts are points. Rows are never
written to report.json.

Every model whose health check failed in some seed is listed under
`report["failed"]` (model, seed, reasons).

Example:

    report = report.aggregate([seed0, seed1, seed2], protocol=Protocol().describe())
    report.write_report(report, "runs/demo")
    print(report.format_table(report))
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tf_limaml.intervals import EntityBootstrap, Resampled

logger = logging.getLogger(__name__)

MODEL_ORDER = (
    "global",
    "id_embedding",
    "finetune",
    "maml",
    "limaml",
    "limaml_offline",
    "limaml_sequence",
    "limaml_multi_entity",
)
MODEL_LABELS = {
    "global": "global (no per-member signal)",
    "id_embedding": "global + member-ID embedding (wide & deep)",
    "finetune": "global + plain fine-tuning of the meta block",
    "maml": "full-network MAML",
    "limaml": "LiMAML, in-graph adaptation",
    "limaml_offline": "LiMAML, offline embeddings + serving_default",
    "limaml_sequence": "LiMAML with the sequence meta block (transformer over the "
    "support interactions)",
    "limaml_multi_entity": "LiMAML with member and movie meta blocks (the movie's "
    "embedding from its own adapted meta block)",
}
# What the buckets of `report["models"][name]["buckets"]` group by.
BUCKET_LABELS = {
    "member_history": "members by training-history length (support rows)",
    "item_popularity": "query rows by the item's number of training ratings",
}
METRICS = ("overall_auc", "logloss", "mean_member_auc")
METRIC_LABELS = {
    "overall_auc": "overall AUC",
    "logloss": "log loss",
    "mean_member_auc": "mean per-member AUC",
}
K_ORDER = ("1", "3", "5", "10", "all")
# The targets.
AUC_LIFT_TARGET = 0.02
MEMBER_AUC_TOLERANCE = 0.005
OFFLINE_TOLERANCE = 1e-4
PROTOTYPE_FULL_SUPPORT_AUC = 0.760
SMALL_KS = ("1", "3", "5")
# The model the run ships (the `limaml` row) and the baselines it must beat:
# at each k the strongest of them is its yardstick (`compare`).
SHIPPED = "limaml"
BASELINES = ("id_embedding", "finetune", "global")
BASELINE_LABELS = {
    "id_embedding": "the ID embedding",
    "finetune": "fine-tuning",
    "global": "global",
}
# What the shipped row is when `limaml tune` did not choose a meta-learned
# recipe (tune's trial families), in the verdict and in the tables' rows.
SHIPPED_LABELS = {
    "global": "the global model (tune fell back to global)",
    "finetune": "fine-tuning of the global model (tune fell back to fine-tuning)",
    "meta_default": "the meta-trained network, unadapted (tune chose no adaptation)",
}
FALLBACK_ROWS = {
    "global": "shipped (global fallback)",
    "finetune": "shipped (fine-tuning fallback)",
    "meta_default": "shipped (unadapted meta-trained network)",
}
SHIP_NOTES = {
    "id_embedding": " (it scores only the members it was trained on: new members "
    "need it retrained)",
}
# Intervals of every lift: a paired bootstrap over the test entities.
INTERVAL_LEVEL = 0.9
INTERVAL_RESAMPLES = 1000
# Below this many test entities the report warns that its differences are
# noise: on MovieLens-100K's 93 test members the pooled AUC moves by about
# +-0.01 with the members drawn, the size of the lifts the report is about.
MIN_TEST_ENTITIES = 100
# Which targets a report is judged on: the MovieLens issue's, or only the
# run's own baselines (any other data: MovieLens's numbers mean nothing there).
TARGET_SETS = ("movielens", "own")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaNs are skipped."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return float("nan"), float("nan")
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return float(np.mean(finite)), std


def _k_sort_key(k: str) -> tuple[int, int]:
    return (1, 0) if k == "all" else (0, int(k))


def aggregate(
    per_seed: Sequence[Mapping[str, Mapping[str, Any]]],
    protocol: Mapping[str, Any] | None = None,
    target_set: str = "movielens",
    **extra: Any,
) -> dict[str, Any]:
    """Means and standard deviations over seeds of every model's measurements.

    Args:
        per_seed: One dict per seed: model name -> its measurement (see the
            module docstring). A model may be missing from some seeds.
        protocol: The protocol, stored as is.
        target_set: "movielens" (the MovieLens issue's targets) or "own"
            (LiMAML against the run's own global model only).
        **extra: More top-level entries (run times, configuration, tried,
            data, tune).

    Returns:
        The report dict (the content of report.json).

    Raises:
        ValueError: No seeds, a model name outside MODEL_ORDER, or an unknown
            target_set.
    """
    if not per_seed:
        raise ValueError("aggregate needs the measurements of at least one seed")
    if target_set not in TARGET_SETS:
        raise ValueError(f"target_set must be one of {TARGET_SETS}, got {target_set!r}")
    names = [n for n in MODEL_ORDER if any(n in seed for seed in per_seed)]
    unknown = sorted({n for seed in per_seed for n in seed} - set(MODEL_ORDER))
    if unknown:
        raise ValueError(
            f"Unknown model name {unknown[0]!r}; expected one of "
            f"{list(MODEL_ORDER)}"
        )
    models: dict[str, Any] = {}
    for name in names:
        runs = [seed[name] for seed in per_seed if name in seed]
        entry: dict[str, Any] = {"seeds": len(runs)}
        for metric in METRICS:
            mean, std = _mean_std([r.get(metric, float("nan")) for r in runs])
            entry[metric] = mean
            entry[f"{metric}_std"] = std
        ks = sorted({k for r in runs for k in r.get("support_k", {})}, key=_k_sort_key)
        entry["support_k"] = {}
        for k in ks:
            cell = {}
            for metric in METRICS:
                mean, std = _mean_std(
                    [
                        r["support_k"][k].get(metric, float("nan"))
                        for r in runs
                        if k in r.get("support_k", {})
                    ]
                )
                cell[metric] = mean
                cell[f"{metric}_std"] = std
            entry["support_k"][k] = cell
        entry["wall_s"], entry["wall_s_std"] = _mean_std(
            [r.get("wall_s", float("nan")) for r in runs]
        )
        entry["per_seed"] = {
            metric: [r.get(metric) for r in runs] for metric in METRICS
        }
        buckets = _aggregate_buckets([r.get("buckets") for r in runs])
        if buckets:
            entry["buckets"] = buckets
        details = [r["details"] for r in runs if r.get("details")]
        if details:
            entry["details"] = details
        models[name] = entry
    failed = []
    for seed, results in enumerate(per_seed):
        for name in names:
            health = (results.get(name) or {}).get("health")
            if health and not health.get("healthy", True):
                failed.append(
                    {"model": name, "seed": seed, "reasons": list(health["reasons"])}
                )
    report = {
        "models": models,
        "protocol": dict(protocol or {}),
        "seeds": len(per_seed),
        "target_set": target_set,
        "failed": failed,
    }
    report.update({k: v for k, v in extra.items() if v is not None})
    report["comparison"] = compare(report, per_seed)
    report["targets"] = check_targets(report)
    return report


def _aggregate_buckets(
    runs: Sequence[Mapping[str, Any] | None],
) -> dict[str, dict[str, dict[str, float]]]:
    """Per bucket dimension and label: mean and std over seeds of each metric,
    and the rows and members it holds (the same test members every seed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    names: list[str] = []  # first-seen order: the demo puts member history first
    for r in runs:
        names += [n for n in (r or {}) if n not in names]
    for name in names:
        labels: list[str] = []
        for r in runs:
            for label in (r or {}).get(name, {}):
                if label not in labels:
                    labels.append(label)
        out[name] = {}
        for label in labels:
            cells = [r[name][label] for r in runs if r and label in r.get(name, {})]
            entry: dict[str, float] = {}
            for metric in METRICS:
                mean, std = _mean_std([c.get(metric, float("nan")) for c in cells])
                entry[metric], entry[f"{metric}_std"] = mean, std
            entry["rows"] = max(int(c.get("rows", 0)) for c in cells)
            entry["members"] = max(int(c.get("members", 0)) for c in cells)
            out[name][label] = entry
    return out


def _get(
    models: Mapping[str, Any], name: str, metric: str, k: str | None = None
) -> float:
    entry = models.get(name)
    if entry is None:
        return float("nan")
    if k is not None:
        entry = entry.get("support_k", {}).get(k)
        if entry is None:
            return float("nan")
    value = entry.get(metric)
    return float("nan") if value is None else float(value)


def check_targets(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Judges the issue's targets on the means over seeds.

    Returns:
        One dict per target: "target", "measured" (text), "met" (True, False,
        or None when a model it needs was not run), "stretch" (bool).
    """
    models = report["models"]
    out = []

    def add(target: str, measured: str, met: bool | None, stretch: bool = False):
        out.append(
            {"target": target, "measured": measured, "met": met, "stretch": stretch}
        )

    if report.get("target_set", "movielens") == "own":
        _own_targets(report, add)
        _offline_target(models, add, shipped_label(report))
        return out

    g_auc, l_auc = _get(models, "global", "overall_auc"), _get(
        models, "limaml", "overall_auc"
    )
    g_ll, l_ll = _get(models, "global", "logloss"), _get(models, "limaml", "logloss")
    have = not (math.isnan(g_auc) or math.isnan(l_auc))
    add(
        f"LiMAML overall AUC >= global + {AUC_LIFT_TARGET}, with lower log loss",
        f"LiMAML {l_auc:.4f} vs global {g_auc:.4f} (lift {l_auc - g_auc:+.4f}); log loss "
        f"{l_ll:.4f} vs {g_ll:.4f}",
        (l_auc >= g_auc + AUC_LIFT_TARGET and l_ll < g_ll) if have else None,
    )
    g_m, l_m = (
        _get(models, "global", "mean_member_auc"),
        _get(models, "limaml", "mean_member_auc"),
    )
    add(
        f"LiMAML mean per-member AUC >= global - {MEMBER_AUC_TOLERANCE}",
        f"LiMAML {l_m:.4f} vs global {g_m:.4f} ({l_m - g_m:+.4f})",
        (l_m >= g_m - MEMBER_AUC_TOLERANCE) if have else None,
    )
    _strongest_target(report, add)
    cells, wins = [], []
    for k in SMALL_KS:
        lk, ik = (
            _get(models, "limaml", "overall_auc", k),
            _get(models, "id_embedding", "overall_auc", k),
        )
        if math.isnan(lk) or math.isnan(ik):
            continue
        cells.append(f"k={k}: {lk:.4f} vs {ik:.4f} ({lk - ik:+.4f})")
        wins.append(lk > ik)
    add(
        "At k <= 5, LiMAML overall AUC beats the ID-embedding baseline",
        "LiMAML vs ID embedding, " + "; ".join(cells) if cells else "not measured",
        all(wins) if wins else None,
    )
    _offline_target(models, add)
    cells, ok = [], []
    for k in K_ORDER:
        lk, ik = (
            _get(models, "limaml", "overall_auc", k),
            _get(models, "id_embedding", "overall_auc", k),
        )
        if math.isnan(lk) or math.isnan(ik):
            continue
        cells.append(f"k={k}: {lk - ik:+.4f}")
        ok.append(lk >= ik)
    add(
        "Stretch: LiMAML at least matches the ID-embedding baseline at every k",
        "LiMAML - ID embedding, " + "; ".join(cells) if cells else "not measured",
        all(ok) if ok else None,
        stretch=True,
    )
    if "limaml_sequence" in models:
        _sequence_targets(models, add)
    add(
        f"Stretch: LiMAML beats the prototype's {PROTOTYPE_FULL_SUPPORT_AUC} at full support",
        f"LiMAML {l_auc:.4f}",
        (l_auc > PROTOTYPE_FULL_SUPPORT_AUC) if have else None,
        stretch=True,
    )
    return out


def _sequence_targets(models: Mapping[str, Any], add: Callable) -> None:
    """The sequence meta block: above the ID embedding at small k, and not
    below LiMAML at full support."""
    cells, wins = [], []
    for k in SMALL_KS:
        sk = _get(models, "limaml_sequence", "overall_auc", k)
        ik = _get(models, "id_embedding", "overall_auc", k)
        if math.isnan(sk) or math.isnan(ik):
            continue
        cells.append(f"k={k}: {sk:.4f} vs {ik:.4f} ({sk - ik:+.4f})")
        wins.append(sk > ik)
    add(
        "At k = 1, 3 and 5, limaml_sequence overall AUC beats the ID-embedding "
        "baseline",
        (
            "limaml_sequence vs ID embedding, " + "; ".join(cells)
            if cells
            else "not measured"
        ),
        all(wins) if wins else None,
    )
    s_all = _get(models, "limaml_sequence", "overall_auc")
    l_all = _get(models, "limaml", "overall_auc")
    have = not (math.isnan(s_all) or math.isnan(l_all))
    add(
        "At full support, limaml_sequence overall AUC is not below LiMAML's",
        f"limaml_sequence {s_all:.4f} vs LiMAML {l_all:.4f} ({s_all - l_all:+.4f})",
        (s_all >= l_all) if have else None,
    )


def _offline_target(
    models: Mapping[str, Any], add: Callable, name: str = "LiMAML"
) -> None:
    diffs = _offline_differences(models)
    add(
        f"Offline-embedding path matches in-graph {name} to {OFFLINE_TOLERANCE:g} AUC",
        (
            f"largest |offline - in-graph| overall AUC over seeds and k: {max(diffs):.2e}"
            if diffs
            else "not measured"
        ),
        (max(diffs) <= OFFLINE_TOLERANCE) if diffs else None,
    )


def _strongest_target(report: Mapping[str, Any], add: Callable) -> None:
    """The shipped model against the run's strongest baseline at every k."""
    c = report.get("comparison")
    if not c:
        add(
            "At every k, the shipped model's overall AUC is not below the strongest "
            "baseline of this run",
            "not measured",
            None,
        )
        return
    names = ", ".join(BASELINE_LABELS[b] for b in c["baselines"])
    cells = []
    for k, cell in c["by_k"].items():
        mark = ""
        if cell["lift"] < 0:
            mark = " (shown below)" if _below(cell) else " (below, within noise)"
        cells.append(
            f"k={k}: {_lift_text(cell, c['level'])} vs "
            f"{BASELINE_LABELS[cell['strongest']]}{mark}"
        )
    add(
        f"At every k, {c['shipped_label']} overall AUC is not below the strongest "
        f"baseline of this run ({names})",
        f"{c['shipped_label']} - the strongest baseline at k"
        + (f", {c['level']:.0%} intervals" if c["low"] is not None else "")
        + ": "
        + "; ".join(cells),
        all(cell["lift"] >= 0 for cell in c["by_k"].values()),
    )


def _own_targets(report: Mapping[str, Any], add: Callable) -> None:
    """Against the run's own baselines only: the strongest of them at every k,
    and never below global."""
    models = report["models"]
    name = shipped_label(report)
    _strongest_target(report, add)
    g_m = _get(models, "global", "mean_member_auc")
    l_m = _get(models, "limaml", "mean_member_auc")
    have = not (math.isnan(g_m) or math.isnan(l_m))
    add(
        f"{name} mean per-member AUC >= global's - {MEMBER_AUC_TOLERANCE}",
        f"{name} {l_m:.4f} vs global {g_m:.4f} ({l_m - g_m:+.4f})",
        (l_m >= g_m - MEMBER_AUC_TOLERANCE) if have else None,
    )
    ks = sorted(
        set(models.get("global", {}).get("support_k", {}))
        & set(models.get("limaml", {}).get("support_k", {})),
        key=_k_sort_key,
    )
    over_global = (report.get("comparison") or {}).get("lift_over_global", {})
    cells, ok = [], []
    for k in ks:
        lk = _get(models, "limaml", "overall_auc", k)
        gk = _get(models, "global", "overall_auc", k)
        if math.isnan(lk) or math.isnan(gk):
            continue
        cell = over_global.get("limaml", {}).get(k)
        cells.append(
            f"k={k}: {_lift_text(cell, INTERVAL_LEVEL)}"
            if cell
            else f"k={k}: {lk - gk:+.4f}"
        )
        ok.append(lk >= gk)
    add(
        f"At every support size k, {name} overall AUC >= global's",
        f"{name} - global, " + "; ".join(cells) if cells else "not measured",
        all(ok) if ok else None,
    )


def _offline_differences(models: Mapping[str, Any]) -> list[float]:
    """|offline - in-graph| overall AUC per seed (full support) and per k (means)."""
    online, offline = models.get("limaml"), models.get("limaml_offline")
    if not online or not offline:
        return []
    diffs = []
    a, b = online["per_seed"]["overall_auc"], offline["per_seed"]["overall_auc"]
    diffs += [
        abs(x - y)
        for x, y in zip(a, b, strict=False)
        if x is not None and y is not None
    ]
    for k, cell in offline.get("support_k", {}).items():
        if k in online.get("support_k", {}):
            diffs.append(
                abs(cell["overall_auc"] - online["support_k"][k]["overall_auc"])
            )
    return [d for d in diffs if not math.isnan(d)]


# ------------------------------------------- the shipped model vs the baselines
def shipped_label(report: Mapping[str, Any]) -> str:
    """What the `limaml` row is, in words: LiMAML, or what tune fell back to."""
    family = (report.get("tune") or {}).get("chosen_family")
    return SHIPPED_LABELS.get(family, "LiMAML")


def row_name(report: Mapping[str, Any], name: str) -> str:
    """A model's row name in the tables: `limaml` is not called LiMAML when
    tune fell back to something that is not meta-learned."""
    family = (report.get("tune") or {}).get("chosen_family")
    if family in FALLBACK_ROWS and name in (SHIPPED, f"{SHIPPED}_offline"):
        return FALLBACK_ROWS[family] + (", offline" if name != SHIPPED else "")
    return name


def _reference_rows(per_seed: Sequence[Mapping[str, Any]]):
    """The first `QueryRows` of any model and k: the rows every other must match."""
    for results in per_seed:
        for entry in results.values():
            for cell in entry.get("support_k", {}).values():
                if cell.get("rows") is not None:
                    return cell["rows"]
    return None


def _resampled_aucs(
    per_seed: Sequence[Mapping[str, Any]], names: Sequence[str], seed: int
) -> tuple[dict[str, dict[str, Resampled]], int] | None:
    """{model: {k: overall AUC as a `Resampled`, its mean over the seeds}} on
    one bootstrap over the test entities, and the number of entities; None
    when no measurement kept its rows."""
    reference = _reference_rows(per_seed)
    if reference is None:
        return None
    boot = EntityBootstrap(
        reference.entity_id, reference.label, INTERVAL_RESAMPLES, seed
    )
    out: dict[str, dict[str, Resampled]] = {}
    for name in names:
        per_k: dict[str, list[Resampled]] = {}
        aligned = True
        for results in per_seed:
            for k, cell in results.get(name, {}).get("support_k", {}).items():
                rows = cell.get("rows")
                if rows is None:
                    continue
                if not rows.same_rows(reference) or not np.isfinite(rows.score).all():
                    aligned = False
                    break
                per_k.setdefault(k, []).append(boot.auc(rows.score))
        if not aligned:
            logger.warning(
                "%s: its scored rows are not the test rows of the other models, or "
                "not finite; it gets no intervals",
                name,
            )
            continue
        if per_k:
            out[name] = {k: Resampled.mean(v) for k, v in per_k.items()}
    return out, boot.n_entities


def _rivals(report: Mapping[str, Any], ks: Sequence[str]) -> list[str]:
    """The baselines the shipped model is judged against, present at every k."""
    models = report["models"]
    family = (report.get("tune") or {}).get("chosen_family")
    return [
        b
        for b in BASELINES
        if b in models
        and not (b == "global" and family == "global")
        and all(not math.isnan(_get(models, b, "overall_auc", k)) for k in ks)
    ]


def compare(
    report: Mapping[str, Any],
    per_seed: Sequence[Mapping[str, Any]] = (),
    seed: int = 0,
) -> dict[str, Any] | None:
    """The shipped model against the strongest baseline at every k, and the verdict.

    The strongest baseline at k is the one of `BASELINES` with the highest
    overall AUC at k (means over seeds). Every lift is the difference of the
    seed-mean AUCs, with a paired percentile interval from a bootstrap over
    the test entities (`tf_limaml.intervals`, `INTERVAL_RESAMPLES` resamples,
    level `INTERVAL_LEVEL`) when the measurements kept their rows
    (`protocol.QueryRows`); without rows, points only.

    The verdict compares the shipped model with the baseline of the highest
    mean AUC over k, on their AUC difference averaged over k:

    * its interval above 0: the shipped model wins; ship it;
    * below 0: that baseline wins; ship it;
    * containing 0: no model is shown better; ship the shipped model (tune's
      choice) and say that this test set cannot tell them apart.

    Warnings: fewer than `MIN_TEST_ENTITIES` test entities, or a verdict
    interval containing 0.

    Returns:
        None without the shipped model or a baseline; else {"shipped",
        "shipped_label", "ks", "level", "resamples", "test_entities",
        "by_k": {k: {"strongest", "strongest_auc", "shipped_auc", "lift",
        "low", "high", "over": {baseline: {"lift", "low", "high"}}}},
        "lift_over_global": {model: {k: {"lift", "low", "high"}}},
        "strongest": baseline, "mean_lift", "low", "high", "winner", "ship",
        "text", "warnings"}.
    """
    models = report["models"]
    if SHIPPED not in models:
        return None
    ks = sorted(models[SHIPPED].get("support_k", {}), key=_k_sort_key)
    rivals = _rivals(report, ks)
    if not ks or not rivals:
        return None
    measured = _resampled_aucs(per_seed, list(models), seed) if per_seed else None
    aucs, n_entities = measured if measured else ({}, None)

    def lift(a: str, b: str, k: str | None = None) -> dict[str, float]:
        """a - b at k (None: averaged over ks), with its interval if any."""
        over = [k] if k is not None else ks
        point = float(
            np.mean(
                [
                    _get(models, a, "overall_auc", x)
                    - _get(models, b, "overall_auc", x)
                    for x in over
                ]
            )
        )
        if a in aucs and b in aucs and all(x in aucs[a] and x in aucs[b] for x in over):
            diff = Resampled.mean([aucs[a][x] - aucs[b][x] for x in over])
            low, high = diff.interval(INTERVAL_LEVEL)
            return {"lift": point, "low": low, "high": high}
        return {"lift": point, "low": None, "high": None}

    by_k = {}
    for k in ks:
        strongest = max(rivals, key=lambda b: _get(models, b, "overall_auc", k))
        by_k[k] = {
            "strongest": strongest,
            "strongest_auc": _get(models, strongest, "overall_auc", k),
            "shipped_auc": _get(models, SHIPPED, "overall_auc", k),
            **lift(SHIPPED, strongest, k),
            "over": {b: lift(SHIPPED, b, k) for b in rivals},
        }
    over_global = {}
    if "global" in models:
        for name, entry in models.items():
            if name == "global":
                continue
            over_global[name] = {
                k: lift(name, "global", k)
                for k in entry.get("support_k", {})
                if k in models["global"].get("support_k", {})
            }
    strongest = max(
        rivals,
        key=lambda b: np.mean([_get(models, b, "overall_auc", k) for k in ks]),
    )
    overall = lift(SHIPPED, strongest)
    out = {
        "shipped": SHIPPED,
        "shipped_label": shipped_label(report),
        "baselines": rivals,
        "ks": ks,
        "level": INTERVAL_LEVEL,
        "resamples": INTERVAL_RESAMPLES if aucs else None,
        "test_entities": n_entities,
        "by_k": by_k,
        "lift_over_global": over_global,
        "strongest": strongest,
        "mean_lift": overall["lift"],
        "low": overall["low"],
        "high": overall["high"],
    }
    out.update(_verdict(out))
    return out


def _lift_text(cell: Mapping[str, Any], level: float) -> str:
    if cell.get("low") is None:
        return f"{cell['lift']:+.4f}"
    return f"{cell['lift']:+.4f} [{cell['low']:+.4f}, {cell['high']:+.4f}]"


def _below(cell: Mapping[str, Any]) -> bool:
    """Shown below 0: the interval's upper bound (or, without one, the point)."""
    high = cell.get("high")
    return (high if high is not None else cell["lift"]) < 0


def _verdict(c: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict line, what to ship, and the warnings (see `compare`)."""
    shipped, rival = c["shipped_label"], BASELINE_LABELS[c["strongest"]]
    level = f"{c['level']:.0%}"
    have = c["low"] is not None
    span = (
        f" ({level} interval [{c['low']:+.4f}, {c['high']:+.4f}], bootstrap over "
        f"{c['test_entities']} test entities)"
        if have
        else " (no interval: the per-row scores were not kept)"
    )
    losing = [k for k, cell in c["by_k"].items() if _below(cell)]
    lost_to = sorted({BASELINE_LABELS[c["by_k"][k]["strongest"]] for k in losing})
    losses = (
        f"; it is below {' and '.join(lost_to)} at k = {', '.join(losing)}"
        if losing
        else ""
    )
    low = c["low"] if have else c["mean_lift"]
    high = c["high"] if have else c["mean_lift"]
    if low > 0:
        winner, ship = c["shipped"], c["shipped"]
        text = (
            f"**Verdict: {shipped} wins on this data**, "
            f"{c['mean_lift']:+.4f} overall AUC over the strongest baseline, "
            f"{rival}, averaged over k{span}{losses}. Ship {shipped}."
        )
    elif high < 0:
        winner, ship = c["strongest"], c["strongest"]
        note = SHIP_NOTES.get(c["strongest"], "")
        text = (
            f"**Verdict: {rival} wins on this data**: {shipped} is "
            f"{-c['mean_lift']:.4f} overall AUC below it, averaged over k{span}"
            f"{losses}. Ship {rival}{note}."
        )
    else:
        winner, ship = None, c["shipped"]
        text = (
            f"**Verdict: no model is shown better on this data.** {shipped} minus "
            f"the strongest baseline, {rival}: {c['mean_lift']:+.4f} overall AUC "
            f"averaged over k{span}{losses}. Ship {shipped}, the model this run "
            f"ships: this test set cannot tell it from {rival}."
        )
    warnings = []
    n = c["test_entities"]
    if n is not None and n < MIN_TEST_ENTITIES:
        widths = [
            cell["high"] - cell["low"]
            for cell in c["by_k"].values()
            if cell.get("low") is not None
        ]
        warnings.append(
            f"**Too few test entities to trust small differences: {n}** (fewer "
            f"than {MIN_TEST_ENTITIES}). Here the {level} interval of a lift is up "
            f"to {max(widths, default=float('nan')):.4f} AUC wide; differences "
            "smaller than that mean nothing on this test set."
        )
    if have and c["low"] <= 0 <= c["high"]:
        warnings.append(
            f"**This test set cannot tell {shipped} from {rival}**: the {level} "
            f"interval of their difference, [{c['low']:+.4f}, {c['high']:+.4f}], "
            "contains 0."
        )
    return {"winner": winner, "ship": ship, "text": text, "warnings": warnings}


# ------------------------------------------------------ what was analyzed
def data_summary(tasks_dir: str | os.PathLike) -> dict[str, Any]:
    """What a run analyzed, from make-tasks output: features and rejected rows.

    Reads DIR/spec.json (the completed spec: numeric mean/std, vocabularies,
    each feature's `statistics` provenance when the analyzer wrote one) and
    DIR/stats.json (rows read, in tasks, rejected, by reason and by feature).

    Returns:
        {"features": [{"name", "role", "type", "mean", "std", "vocabulary_size",
        "hash_buckets", "statistics"}], "rows": {...}, "rejected_by_reason":
        {...}, "rejected_by_feature": {...}}; missing files give empty parts.
    """
    tasks_dir = os.fspath(tasks_dir)
    out: dict[str, Any] = {"features": [], "rows": {}}
    spec_path = os.path.join(tasks_dir, "spec.json")
    if os.path.exists(spec_path):
        with open(spec_path, encoding="utf-8") as f:
            spec = json.load(f)
        for role in ("meta_features", "request_features"):
            for feature in spec.get(role, []):
                vocabulary = feature.get("vocabulary")
                entry = {
                    "name": feature.get("name"),
                    "role": role.split("_")[0],
                    "type": feature.get("type"),
                    "mean": feature.get("mean"),
                    "std": feature.get("std"),
                    "vocabulary_size": (
                        len(vocabulary) if isinstance(vocabulary, list) else vocabulary
                    ),
                    "hash_buckets": feature.get("hash_buckets"),
                    "statistics": feature.get("statistics"),
                }
                out["features"].append(
                    {k: v for k, v in entry.items() if v is not None}
                )
    stats_path = os.path.join(tasks_dir, "stats.json")
    if os.path.exists(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
        out["rows"] = {
            k: v
            for k, v in stats.items()
            if k.startswith(("rows_", "entities_")) and not isinstance(v, dict)
        }
        for key in ("rejected_by_reason", "rejected_by_feature"):
            if isinstance(stats.get(key), dict):
                out[key] = {k: v for k, v in stats[key].items() if v}
    return out


def tune_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a `tf_limaml.experiments.tune.tune` result the report keeps."""
    keep = (
        "name",
        "family",
        "fallback",
        "recipe",
        "knobs",
        "healthy",
        "fold_auc",
        "fold_lift",
        "fold_lift_interval",
        "mean_lift",
        "mean_lift_interval",
        "min_lift",
        "eligible",
        "why_not",
        "verdict",
        "chosen",
    )
    trial = result["trials"][result["chosen"]]
    return {
        "chosen": result["chosen"],
        "chosen_name": result["chosen_name"],
        "chosen_family": trial.get("family"),
        "is_fallback": bool(trial["fallback"]),
        "rule": result["rule"],
        "budget": result["budget"],
        "global_fold_auc": result["global_fold"]["auc"],
        "trials": [{k: t.get(k) for k in keep} for t in result["trials"]],
    }


# ------------------------------------------------------------------ writing
def _pm(mean: float, std: float, digits: int = 4) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(report: Mapping[str, Any]) -> str:
    """The main table and the support sweep of overall AUC, as markdown."""
    models = report["models"]
    lines = [
        "| model | overall AUC | log loss | mean member AUC | wall s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in models.items():
        lines.append(
            f"| {row_name(report, name)} | {_pm(m['overall_auc'], m['overall_auc_std'])} | "
            f"{_pm(m['logloss'], m['logloss_std'])} | "
            f"{_pm(m['mean_member_auc'], m['mean_member_auc_std'])} | "
            f"{m['wall_s']:.0f} |"
        )
    lines += ["", sweep_table(report, "overall_auc")]
    return "\n".join(lines)


def sweep_table(report: Mapping[str, Any], metric: str) -> str:
    """One metric against the support size k, one row per model (markdown)."""
    models = report["models"]
    ks = sorted(
        {k for m in models.values() for k in m.get("support_k", {})}, key=_k_sort_key
    )
    lines = [
        f"| {METRIC_LABELS[metric]} by k | " + " | ".join(ks) + " |",
        "| --- |" + " --- |" * len(ks),
    ]
    for name, m in models.items():
        cells = []
        for k in ks:
            cell = m.get("support_k", {}).get(k)
            cells.append(_pm(cell[metric], cell[f"{metric}_std"]) if cell else "n/a")
        lines.append(f"| {row_name(report, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bucket_table(report: Mapping[str, Any], name: str) -> str:
    """Overall AUC per bucket of one dimension, one row per model (markdown)."""
    models = report["models"]
    labels: list[str] = []
    counts: dict[str, tuple[int, int]] = {}
    for m in models.values():
        for label, cell in m.get("buckets", {}).get(name, {}).items():
            if label not in labels:
                labels.append(label)
            counts[label] = (cell.get("members", 0), cell.get("rows", 0))
    if not labels:
        return ""
    lines = [
        "| overall AUC by bucket | " + " | ".join(labels) + " |",
        "| --- |" + " --- |" * len(labels),
        "| members / query rows | "
        + " | ".join(f"{counts[x][0]} / {counts[x][1]}" for x in labels)
        + " |",
    ]
    for model, m in models.items():
        per = m.get("buckets", {}).get(name)
        if not per:
            continue
        cells = [
            _pm(per[x]["overall_auc"], per[x]["overall_auc_std"]) if x in per else "n/a"
            for x in labels
        ]
        lines.append(f"| {row_name(report, model)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bucket_names(report: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for m in report["models"].values():
        for name in m.get("buckets", {}):
            if name not in names:
                names.append(name)
    return names


def _lift_panel(ax, report: Mapping[str, Any], cells_of: Callable, labels) -> None:
    """One panel: each model's overall-AUC lift over global at each x label."""
    models = report["models"]
    x = np.arange(len(labels))
    ax.axhline(0.0, color="grey", linewidth=1, linestyle="--", label="global")
    base = cells_of(models["global"])
    for name, m in models.items():
        if name == "global":
            continue
        cells = cells_of(m)
        lift, err = [], []
        for label in labels:
            cell, ref = cells.get(label), base.get(label)
            lift.append(
                cell["overall_auc"] - ref["overall_auc"] if cell and ref else np.nan
            )
            err.append(cell["overall_auc_std"] if cell else np.nan)
        style = "--" if name == "limaml_offline" else "-"
        ax.errorbar(
            x,
            lift,
            yerr=err,
            marker="o",
            linestyle=style,
            capsize=3,
            label=row_name(report, name),
        )
    ax.set_xticks(x, labels)
    ax.grid(True, alpha=0.3)


def plot_lift(report: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Writes lift.png: overall-AUC lift over global against k, one line per model.

    Raises:
        ValueError: The report has no `global` model to take the lift over.
    """
    import matplotlib  # noqa: PLC0415 - optional extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    models = report["models"]
    if "global" not in models:
        raise ValueError("The lift chart needs the `global` model; it was not run.")
    ks = [k for k in K_ORDER if k in models["global"].get("support_k", {})]
    ks += sorted(
        (k for k in models["global"].get("support_k", {}) if k not in ks),
        key=_k_sort_key,
    )
    buckets = [
        b for b in bucket_names(report) if b in models["global"].get("buckets", {})
    ]
    fig, axes = plt.subplots(
        1, 1 + len(buckets), figsize=(7 + 5 * len(buckets), 4.5), squeeze=False
    )
    ax = axes[0][0]
    _lift_panel(ax, report, lambda m: m.get("support_k", {}), ks)
    ax.set_xticks(np.arange(len(ks)), [f"k={k}" for k in ks])
    ax.set_xlabel("support interactions per test member (latest k)")
    ax.set_ylabel("overall AUC - global's overall AUC")
    ax.set_title(
        f"Lift over global by support size (means over {report.get('seeds', 1)} "
        "seeds; bars: the model's AUC std)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    for ax, name in zip(axes[0][1:], buckets, strict=True):
        labels = list(models["global"]["buckets"][name])
        _lift_panel(
            ax, report, lambda m, n=name: m.get("buckets", {}).get(n, {}), labels
        )
        ax.set_xlabel(BUCKET_LABELS.get(name, name), fontsize=9)
        ax.set_title(
            f"Lift over global by {name.replace('_', ' ')} (full support)", fontsize=10
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _targets_md(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Targets",
        "",
        "Judged on the means over seeds. A target not met is reported as measured.",
        "",
    ]
    for t in report.get("targets", []):
        verdict = {True: "**met**", False: "**NOT met**", None: "not measured"}[
            t["met"]
        ]
        lines.append(f"- {t['target']}: {verdict}. {t['measured']}.")
    return lines


def _tried_md(report: Mapping[str, Any]) -> list[str]:
    lines = []
    chosen = []
    for name, m in report["models"].items():
        for i, detail in enumerate(m.get("details", [])):
            chosen.append(
                f"- {name}, seed {i}: "
                + ", ".join(f"{k}={_short(v)}" for k, v in detail.items())
            )
    if chosen:
        lines += [
            "## Chosen in this run",
            "",
            "Hyperparameters picked on the val members during this run:",
            "",
        ] + chosen
        lines.append("")
    tried = report.get("tried")
    if tried:
        lines += ["## What was tried", ""]
        source = tried.get("source")
        if source:
            lines += [f"Measured by {source}.", ""]
        for note in tried.get("notes", []):
            lines.append(f"- {note}")
        if tried.get("notes"):
            lines.append("")
        rows = tried.get("experiments", [])
        if rows:
            metrics = [c for c in rows[0] if c not in ("name", "change")]
            lines.append("| experiment | change | " + " | ".join(metrics) + " |")
            lines.append("| --- | --- |" + " --- |" * len(metrics))
            for row in rows:
                lines.append(
                    f"| {row.get('name', '')} | {row.get('change', '')} | "
                    + " | ".join(_short(row.get(c)) for c in metrics)
                    + " |"
                )
        lines.append("")
    return lines


def _data_md(data: Mapping[str, Any] | None) -> list[str]:
    if not data:
        return []
    lines = ["", "## Data analyzed", ""]
    rows = data.get("rows", {})
    if rows:
        lines += [", ".join(f"{k}: {v}" for k, v in rows.items()) + ".", ""]
    for key, title in (
        ("rejected_by_reason", "Rejected rows by reason"),
        ("rejected_by_feature", "Rejected rows by feature"),
    ):
        if data.get(key):
            lines.append(
                f"{title}: "
                + ", ".join(f"{k}: {v}" for k, v in data[key].items())
                + "."
            )
            lines.append("")
    features = data.get("features", [])
    if features:
        lines += [
            "| feature | role | type | mean | std | vocabulary | statistics |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for f in features:
            vocab = f.get("vocabulary_size")
            if vocab is None and f.get("hash_buckets"):
                vocab = f"{f['hash_buckets']} hash buckets"
            lines.append(
                f"| {f['name']} | {f.get('role', '')} | {f.get('type', '')} | "
                f"{_short(f.get('mean', ''))} | {_short(f.get('std', ''))} | "
                f"{'' if vocab is None else vocab} | "
                f"{_short(f.get('statistics', ''))} |"
            )
    return lines


def _span(value: Any, interval: Any) -> str:
    if value is None:
        return "n/a"
    if not interval or interval[0] is None:
        return f"{value:+.4f}"
    return f"{value:+.4f} [{interval[0]:+.4f}, {interval[1]:+.4f}]"


def _tune_md(tune: Mapping[str, Any] | None) -> list[str]:
    if not tune:
        return []
    trial = tune["trials"][tune["chosen"]]
    family = tune.get("chosen_family")
    fell_back = {
        "global": " **Tune fell back to global**: no candidate was shown to help, "
        "so the shipped model is the global model, not LiMAML.",
        "finetune": " **Tune fell back to fine-tuning**: the shipped model is the "
        "global model with its meta block fine-tuned at test time; nothing "
        "meta-learned is shipped, and it is not called LiMAML here.",
        "meta_default": " Tune chose the meta-trained network without adaptation: "
        "every entity gets the same scores; it is not called LiMAML here.",
    }.get(family, "")
    rule = tune["rule"]
    lines = [
        "## Recipe chosen for this data (limaml tune)",
        "",
        "Chosen on the tuning fold (a held-out third of the train members): trial "
        f"{tune['chosen']}, **{tune['chosen_name']}**"
        + (" (the global fallback)" if tune["is_fallback"] else "")
        + ", fold mean lift over global "
        + _span(trial["mean_lift"], trial.get("mean_lift_interval"))
        + "."
        + fell_back,
        "",
    ]
    if "intervals" in rule:
        lines += [
            f"Intervals: {rule['intervals']}. Eligible: "
            + "; ".join(rule["constraints"])
            + f". Chosen: {rule['choice']}; else {rule['fallback']}.",
            "",
        ]
    ks = list(tune["global_fold_auc"])
    lines += [
        "| # | trial | family | fold lift over global by k ("
        + ", ".join(ks)
        + ") [interval] | mean lift [interval] | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, t in enumerate(tune["trials"]):
        intervals = t.get("fold_lift_interval") or {}
        lifts = "; ".join(
            f"{k}: {_span(t['fold_lift'].get(k), intervals.get(k))}" for k in ks
        )
        verdict = t.get("verdict") or (
            "eligible" if t.get("eligible") else f"not eligible: {t.get('why_not')}"
        )
        lines.append(
            f"| {i} | {t['name']} | {t.get('family') or ''} | {lifts} | "
            f"{_span(t['mean_lift'], t.get('mean_lift_interval'))} | {verdict} |"
        )
    lines.append("")
    return lines


def _comparison_md(report: Mapping[str, Any]) -> list[str]:
    """The shipped model against the strongest baseline at every k, and every
    model's lift over global, each lift with its interval."""
    c = report.get("comparison")
    if not c:
        return []
    have = c["low"] is not None
    source = (
        f"{c['level']:.0%} intervals from a paired bootstrap over the "
        f"{c['test_entities']} test entities ({c['resamples']} resamples; "
        "seed-mean AUCs, the seeds on the same resamples)"
        if have
        else "no intervals: the per-row scores were not kept"
    )
    shipped = c["shipped_label"]
    lines = [
        "## The shipped model against the strongest baseline",
        "",
        "At each k the strongest baseline is the best of "
        + ", ".join(BASELINE_LABELS[b] for b in c["baselines"])
        + f" at that k. Lifts in overall AUC, {source}.",
        "",
        f"| k | strongest baseline | its AUC | {shipped} AUC | lift over it | "
        + " | ".join(f"lift over {BASELINE_LABELS[b]}" for b in c["baselines"])
        + " |",
        "| --- | --- | --- | --- | --- |" + " --- |" * len(c["baselines"]),
    ]
    for k, cell in c["by_k"].items():
        lines.append(
            f"| {k} | {BASELINE_LABELS[cell['strongest']]} | "
            f"{cell['strongest_auc']:.4f} | {cell['shipped_auc']:.4f} | "
            f"{_lift_text(cell, c['level'])} | "
            + " | ".join(
                _lift_text(cell["over"][b], c["level"]) for b in c["baselines"]
            )
            + " |"
        )
    over = c.get("lift_over_global") or {}
    if over:
        ks = [k for k in K_ORDER if any(k in v for v in over.values())]
        lines += [
            "",
            "Every model's lift over global (overall AUC), " + source + ":",
            "",
            "| lift over global by k | " + " | ".join(ks) + " |",
            "| --- |" + " --- |" * len(ks),
        ]
        for name, cells in over.items():
            lines.append(
                f"| {row_name(report, name)} | "
                + " | ".join(
                    _lift_text(cells[k], c["level"]) if k in cells else "n/a"
                    for k in ks
                )
                + " |"
            )
    lines.append("")
    return lines


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def to_markdown(report: Mapping[str, Any], chart: str | None = "lift.png") -> str:
    """The text of report.md."""
    lines = [f"# {report.get('title', 'LiMAML comparison report')}", ""]
    if report.get("summary"):
        lines += [report["summary"], ""]
    comparison = report.get("comparison")
    if comparison:
        lines += [comparison["text"], ""]
        lines += [f"- {w}" for w in comparison["warnings"]]
        if comparison["warnings"]:
            lines.append("")
    if report.get("failed"):
        lines += [
            "## FAILED models",
            "",
            "These models failed the health check (non-finite validation loss, "
            "non-finite or constant scores, or AUC <= 0.5); their numbers below "
            "are not results.",
            "",
        ]
        lines += [
            f"- **{f['model']}**, seed {f['seed']}: " + "; ".join(f["reasons"])
            for f in report["failed"]
        ]
        lines.append("")
    lines += [
        f"Seeds: {report.get('seeds')}. Values are means ± sample standard "
        "deviations over seeds.",
        "",
    ]
    lines += ["## Protocol", ""]
    for key, value in report.get("protocol", {}).items():
        lines.append(
            f"- **{key}**: {_short(value) if not isinstance(value, str) else value}"
        )
    lines += _data_md(report.get("data"))
    if report.get("training"):
        lines += ["", "## How the models were trained", ""]
        lines += [f"- {line}" for line in report["training"]]
    lines += [
        "",
        "## Results (full support)",
        "",
        format_table(report).split("\n\n")[0],
        "",
    ]
    lines += ["Models:", ""]
    lines += [
        f"- `{row_name(report, n)}`: "
        + (
            MODEL_LABELS[n]
            if row_name(report, n) == n
            else f"{shipped_label(report)}, what this run ships in LiMAML's place"
        )
        for n in report["models"]
    ]
    lines += [
        "",
        "## Support-size sweep",
        "",
        "Every test member's support cut to its latest k interactions "
        "(`all`: the whole first half of its history).",
        "",
    ]
    for metric in METRICS:
        lines += [sweep_table(report, metric), ""]
    names = bucket_names(report)
    if names:
        lines += [
            "## By activity bucket",
            "",
            "Full support; the paper's headline is the gain on infrequent members. "
            "Member-history buckets are quartiles of the test members' training "
            "history lengths.",
            "",
        ]
        for name in names:
            lines += [
                f"**{BUCKET_LABELS.get(name, name)}**",
                "",
                bucket_table(report, name),
                "",
            ]
    if chart:
        lines += [
            f"![overall-AUC lift over global by support size and bucket]({chart})",
            "",
        ]
    lines += _comparison_md(report)
    lines += _targets_md(report) + [""]
    lines += _tune_md(report.get("tune"))
    lines += _tried_md(report)
    run = report.get("run")
    if run:
        lines += ["## Run", ""]
        for key, value in run.items():
            lines.append(f"- {key}: {_short(value)}")
        lines.append("")
    config = report.get("config")
    if config:
        lines += [
            "## Configuration",
            "",
            "```json",
            json.dumps(config, indent=2, default=str),
            "```",
            "",
        ]
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """A value JSON can hold: NaN and Inf become null, numpy scalars Python ones."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def write_report(
    report: Mapping[str, Any], out_dir: str | os.PathLike
) -> dict[str, str]:
    """Writes report.json, report.md and lift.png into `out_dir`.

    NaN values (e.g. a metric of a model that was not run) are written as
    null in the JSON.

    Returns:
        {"json": path, "markdown": path, "chart": path}.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "report.json"),
        "markdown": os.path.join(out_dir, "report.md"),
        "chart": os.path.join(out_dir, "lift.png"),
    }
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(json_safe(dict(report)), f, indent=2)
    chart = None
    if "global" in report["models"]:
        plot_lift(report, paths["chart"])
        chart = os.path.basename(paths["chart"])
    else:
        paths.pop("chart")
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(to_markdown(report, chart))
    logger.info("Report written to %s", out_dir)
    return paths
