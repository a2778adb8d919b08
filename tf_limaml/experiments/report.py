"""The comparison report: report.json, report.md and lift.png.

`aggregate` turns per-seed measurements into means and standard deviations,
`check_targets` judges them against the targets of the MovieLens issue (or,
for a user's own data, `target_set="own"`, only against that run's own
baselines), and `write_report` writes the three files:

* `report.json`: `{"models": {NAME: {"overall_auc", "overall_auc_std", "logloss",
  "logloss_std", "mean_member_auc", "mean_member_auc_std", "support_k": {"1":
  {...}, ..., "all": {...}}, "wall_s", ...}}, "protocol": {...}, "targets": [...],
  ...}`; values are means over the seeds;
* `report.md`: the protocol, the tables, the chart, every target with what was
  measured (met or not), and what was tried;
* `lift.png`: overall-AUC lift over `global` against the support size k, one
  line per model (matplotlib, Agg backend).

Per seed, a model's measurement is a dict:

    {"overall_auc": ..., "logloss": ..., "mean_member_auc": ...,
     "support_k": {"1": {"overall_auc": ..., "logloss": ..., "mean_member_auc": ...},
                   ..., "all": {...}},
     "wall_s": ...,
     "health": {"healthy": ..., "reasons": [...]}}   # optional

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
        _own_targets(models, add)
        _offline_target(models, add)
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


def _offline_target(models: Mapping[str, Any], add: Callable) -> None:
    diffs = _offline_differences(models)
    add(
        f"Offline-embedding path matches in-graph LiMAML to {OFFLINE_TOLERANCE:g} AUC",
        (
            f"largest |offline - in-graph| overall AUC over seeds and k: {max(diffs):.2e}"
            if diffs
            else "not measured"
        ),
        (max(diffs) <= OFFLINE_TOLERANCE) if diffs else None,
    )


def _own_targets(models: Mapping[str, Any], add: Callable) -> None:
    """Personalization never hurts: LiMAML against this run's global model only."""
    g_auc = _get(models, "global", "overall_auc")
    l_auc = _get(models, "limaml", "overall_auc")
    have = not (math.isnan(g_auc) or math.isnan(l_auc))
    add(
        "LiMAML overall AUC >= global's (full support)",
        f"LiMAML {l_auc:.4f} vs global {g_auc:.4f} ({l_auc - g_auc:+.4f})",
        (l_auc >= g_auc) if have else None,
    )
    g_m = _get(models, "global", "mean_member_auc")
    l_m = _get(models, "limaml", "mean_member_auc")
    add(
        f"LiMAML mean per-member AUC >= global's - {MEMBER_AUC_TOLERANCE}",
        f"LiMAML {l_m:.4f} vs global {g_m:.4f} ({l_m - g_m:+.4f})",
        (l_m >= g_m - MEMBER_AUC_TOLERANCE) if have else None,
    )
    ks = sorted(
        set(models.get("global", {}).get("support_k", {}))
        & set(models.get("limaml", {}).get("support_k", {})),
        key=_k_sort_key,
    )
    cells, ok = [], []
    for k in ks:
        lk = _get(models, "limaml", "overall_auc", k)
        gk = _get(models, "global", "overall_auc", k)
        if math.isnan(lk) or math.isnan(gk):
            continue
        cells.append(f"k={k}: {lk - gk:+.4f}")
        ok.append(lk >= gk)
    add(
        "At every support size k, LiMAML overall AUC >= global's",
        "LiMAML - global, " + "; ".join(cells) if cells else "not measured",
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
        "fallback",
        "recipe",
        "knobs",
        "healthy",
        "fold_auc",
        "fold_lift",
        "mean_lift",
        "min_lift",
        "eligible",
        "why_not",
        "chosen",
    )
    return {
        "chosen": result["chosen"],
        "chosen_name": result["chosen_name"],
        "is_fallback": bool(result["trials"][result["chosen"]]["fallback"]),
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
            f"| {name} | {_pm(m['overall_auc'], m['overall_auc_std'])} | "
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
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
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
            x, lift, yerr=err, marker="o", linestyle=style, capsize=3, label=name
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


def _tune_md(tune: Mapping[str, Any] | None) -> list[str]:
    if not tune:
        return []
    trial = tune["trials"][tune["chosen"]]
    lines = [
        "## Recipe chosen for this data (limaml tune)",
        "",
        f"Chosen on the tuning fold (a held-out third of the train members): trial {tune['chosen']}, **{tune['chosen_name']}**"
        + (" (the global fallback)" if tune["is_fallback"] else "")
        + f", fold mean lift over global {trial['mean_lift']:+.4f}.",
        "",
        f"Rule: maximize {tune['rule']['objective']}, subject to: "
        + "; ".join(tune["rule"]["constraints"])
        + f"; a personalized trial must gain >= {tune['rule']['min_gain']}, else "
        f"the fallback ({tune['rule']['fallback']}).",
        "",
    ]
    ks = list(tune["global_fold_auc"])
    lines += [
        "| # | trial | fold AUC by k (" + ", ".join(ks) + ") | fold lift by k | "
        "mean lift | eligible |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, t in enumerate(tune["trials"]):
        mark = " **(chosen)**" if t.get("chosen") else ""
        lines.append(
            f"| {i} | {t['name']}{mark} | "
            + " / ".join(_short(t["fold_auc"].get(k)) for k in ks)
            + " | "
            + " / ".join(f"{t['fold_lift'].get(k, float('nan')):+.4f}" for k in ks)
            + f" | {t['mean_lift']:+.4f} | "
            + ("yes" if t.get("eligible") else f"no: {t.get('why_not', '')}")
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
    lines += [f"- `{n}`: {MODEL_LABELS[n]}" for n in report["models"]]
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
