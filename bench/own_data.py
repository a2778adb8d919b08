"""Your own data, first try: `limaml demo --input` on tables we prepare nothing for.

Two experiments on MovieLens-100K, each written as a plain CSV:

* ``statistics``: the same interactions and columns twice, once with the
  hand-prepared spec (hand-written mean, std and vocabularies) and once with a
  types-only spec (no mean, no std, every vocabulary ``"auto"``), both with the
  fixed recipe (``--tune-budget 0``). make-tasks computes the statistics of the
  second from the training members. LiMAML's overall AUC should match.
* ``tuned``: the types-only table again, with the demo's own tuning (`limaml
  tune` on the val members) instead of the fixed recipe: LiMAML must not fall
  below global at any support size k.
* ``no_member_features``: the held-out proxy of a ratings table with no
  member features: MovieLens-100K written as a CSV of member, item, time,
  rating, genres and release year only (the member columns dropped), a
  types-only spec and the demo's own tuning.
* ``short_histories``: the held-out proxy of a table of people rating items
  with a few dozen rows each, one entity feature and a coarse time: every
  member keeps only their first 20 to 48 ratings (a stable hash of the id
  picks how many), occupation is the one member feature, and the time is the
  day (no tie-break column: make-tasks orders same-day ratings by their
  content, not by when they were made), with a types-only spec and the demo's
  own tuning.
* ``no_personal_signal``: the held-out proxy of a table where personalization
  has nothing to give: the members-without-features table with every label
  redrawn from its item's positive rate alone (seeded), so a member's history
  says nothing about their next label. Tune must fall back to global: the
  shipped model within 0.002 of global at every k.
* ``item_entity``: the movie is the entity (meta features: genres, release year;
  request features: the rating member's age, gender, occupation and zip prefix),
  with a types-only spec and the demo's own tuning. Per-movie signal is small
  here, so LiMAML must not fall below global at any support size k.

Prints one JSON line (and appends it to bench/results.jsonl).

    python bench/own_data.py --experiment statistics --seeds 3
    python bench/own_data.py --experiment tuned --seeds 3
    python bench/own_data.py --experiment item_entity --seeds 3
    python bench/own_data.py --experiment no_member_features --seeds 3
    python bench/own_data.py --experiment short_histories --seeds 3
    python bench/own_data.py --experiment no_member_features --max-members 400
    python bench/own_data.py --experiment no_personal_signal --seeds 3

`--max-members N` keeps N members of the member-entity tables (several hundred
members, as a smaller user table has; the tuning fold shrinks with them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import record  # noqa: E402

_STATISTIC_KEYS = ("mean", "std", "default", "allow_oov")


def types_only(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec a new user writes: types (and hash buckets) only, no statistics."""
    out = json.loads(json.dumps(spec))
    for part in ("meta_features", "request_features"):
        for feature in out[part]:
            for key in _STATISTIC_KEYS:
                feature.pop(key, None)
            if "vocabulary" in feature:
                feature["vocabulary"] = "auto"
    return out


def _write(path: str, obj: Any) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    return path


def _demo(workdir: str, csv_path: str, spec_path: str, args, *extra: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "tf_limaml.cli",
        "demo",
        "--input",
        csv_path,
        "--features",
        spec_path,
        "--workdir",
        workdir,
        "--seeds",
        str(args.seeds),
        *extra,
    ]
    if args.fast:
        command.append("--fast")
    completed = subprocess.run(command, check=False)
    with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    report["exit_code"] = completed.returncode
    return report


def _member_sample(rows: list[dict], max_members: int | None) -> list[dict]:
    """The rows of at most `max_members` members, picked by a stable hash of
    the id (None: every member): a smaller table from the same source."""
    if max_members is None:
        return rows
    import zlib  # noqa: PLC0415

    members = sorted(
        {str(r["user_id"]) for r in rows}, key=lambda m: zlib.crc32(m.encode())
    )
    kept = set(members[:max_members])
    return [r for r in rows if str(r["user_id"]) in kept]


def _auc(report: dict, model: str, k: str = "all") -> float | None:
    entry = report["models"].get(model)
    if entry is None:
        return None
    return entry["support_k"][k]["overall_auc"]


def _sweep(report: dict, model: str) -> dict[str, float]:
    entry = report["models"][model]["support_k"]
    return {k: round(v["overall_auc"], 4) for k, v in entry.items()}


def statistics_experiment(args, root: str) -> dict[str, Any]:
    from tf_limaml.datasets import movielens  # noqa: PLC0415

    rows, spec = movielens.load()
    csv_path = os.path.join(root, "interactions.csv")
    movielens.write_csv(rows, csv_path)
    hand = _write(os.path.join(root, "hand.json"), spec.to_dict())
    auto = _write(os.path.join(root, "types_only.json"), types_only(spec.to_dict()))
    reports = {
        name: _demo(
            os.path.join(root, name), csv_path, path, args, "--tune-budget", "0"
        )
        for name, path in (("hand_prepared", hand), ("types_only", auto))
    }
    limaml = {name: _auc(r, "limaml") for name, r in reports.items()}
    return {
        "experiment": "statistics",
        "seeds": args.seeds,
        "limaml_overall_auc": {k: round(v, 4) for k, v in limaml.items()},
        "global_overall_auc": {
            name: round(_auc(r, "global"), 4) for name, r in reports.items()
        },
        "difference": round(limaml["types_only"] - limaml["hand_prepared"], 4),
        "target_abs_difference": 0.005,
        "exit_codes": {name: r["exit_code"] for name, r in reports.items()},
    }


ITEM_ENTITY_SPEC = {
    "entity": "item_id",
    "time": "timestamp",
    "label": {"column": "rating", "threshold": 4},
    "tie_break": "user_id",
    "meta_features": [
        {"name": "genres", "type": "multi_hot", "vocabulary": "auto"},
        {"name": "release_year", "type": "numeric"},
    ],
    "request_features": [
        {"name": "age_bucket", "type": "categorical", "vocabulary": "auto"},
        {"name": "gender", "type": "categorical", "vocabulary": "auto"},
        {"name": "occupation", "type": "categorical", "vocabulary": "auto"},
        {"name": "zip_prefix", "type": "categorical", "vocabulary": "auto"},
    ],
}


def _lift_summary(report: dict) -> dict[str, Any]:
    """LiMAML against global and the strongest baseline at every k, and what
    tune chose."""
    limaml, base = _sweep(report, "limaml"), _sweep(report, "global")
    lift = {k: round(limaml[k] - base[k], 4) for k in limaml}
    member = {m: report["models"][m]["mean_member_auc"] for m in ("limaml", "global")}
    tuned = report.get("tune") or {}
    others = {
        name: _sweep(report, name)
        for name in ("id_embedding", "finetune")
        if name in report["models"]
    }
    strongest = {
        k: max((sweep[k] for sweep in others.values()), default=float("nan"))
        for k in limaml
    }
    return {
        "limaml_auc_by_k": limaml,
        "global_auc_by_k": base,
        "baselines_auc_by_k": others,
        "lift_over_strongest_baseline_by_k": {
            k: round(limaml[k] - strongest[k], 4) for k in limaml
        },
        "lift_by_k": lift,
        "worst_lift": min(lift.values()),
        "mean_entity_auc_lift": round(member["limaml"] - member["global"], 4),
        "tune_chose": tuned.get("chosen_name"),
        "failed": report.get("failed"),
        "exit_code": report["exit_code"],
    }


def item_entity_experiment(args, root: str) -> dict[str, Any]:
    from tf_limaml.datasets import movielens  # noqa: PLC0415

    rows, _ = movielens.load()
    # One movie lacks a year; a types-only spec has no default for it, so its
    # rows go to the dead letter, as they would for a user.
    csv_path = os.path.join(root, "interactions.csv")
    movielens.write_csv(rows, csv_path)
    spec_path = _write(os.path.join(root, "spec.json"), ITEM_ENTITY_SPEC)
    report = _demo(os.path.join(root, "item_entity"), csv_path, spec_path, args)
    return {"experiment": "item_entity", "seeds": args.seeds, **_lift_summary(report)}


NO_MEMBER_FEATURES_COLUMNS = (
    "user_id",
    "item_id",
    "timestamp",
    "rating",
    "genres",
    "release_year",
)
NO_MEMBER_FEATURES_SPEC = {
    "entity": "user_id",
    "time": "timestamp",
    "label": {"column": "rating", "threshold": 4},
    "tie_break": "item_id",
    "meta_features": [],
    "request_features": [
        {"name": "item_id", "type": "categorical", "vocabulary": "auto"},
        {"name": "genres", "type": "multi_hot", "vocabulary": "auto"},
        {"name": "release_year", "type": "numeric"},
    ],
}


POSITIVE_RATING, NEGATIVE_RATING = 5, 1


def item_only_labels(rows: list[dict], seed: int = 0) -> list[dict]:
    """The rows with each rating redrawn from its item's share of ratings >= 4
    alone (5 with that probability, else 1): the member carries no signal."""
    import random  # noqa: PLC0415

    counts: dict[str, list[int]] = {}
    for row in rows:
        seen = counts.setdefault(str(row["item_id"]), [0, 0])
        seen[0] += int(row["rating"]) >= 4
        seen[1] += 1
    draw = random.Random(seed)
    out = []
    for row in rows:
        positives, total = counts[str(row["item_id"])]
        liked = draw.random() < positives / total
        out.append({**row, "rating": POSITIVE_RATING if liked else NEGATIVE_RATING})
    return out


def no_personal_signal_experiment(args, root: str) -> dict[str, Any]:
    from tf_limaml.datasets import movielens  # noqa: PLC0415

    rows = item_only_labels(_member_sample(movielens.load()[0], args.max_members))
    csv_path = os.path.join(root, "interactions.csv")
    movielens.write_csv(rows, csv_path, NO_MEMBER_FEATURES_COLUMNS)
    spec_path = _write(os.path.join(root, "spec.json"), NO_MEMBER_FEATURES_SPEC)
    report = _demo(os.path.join(root, "no_personal_signal"), csv_path, spec_path, args)
    summary = _lift_summary(report)
    return {
        "experiment": "no_personal_signal",
        "seeds": args.seeds,
        "max_members": args.max_members,
        "rows": len(rows),
        **summary,
        "largest_abs_lift": max(abs(v) for v in summary["lift_by_k"].values()),
        "target_abs_lift": 0.002,
    }


def no_member_features_experiment(args, root: str) -> dict[str, Any]:
    from tf_limaml.datasets import movielens  # noqa: PLC0415

    rows = _member_sample(movielens.load()[0], args.max_members)
    csv_path = os.path.join(root, "interactions.csv")
    movielens.write_csv(rows, csv_path, NO_MEMBER_FEATURES_COLUMNS)
    spec_path = _write(os.path.join(root, "spec.json"), NO_MEMBER_FEATURES_SPEC)
    report = _demo(os.path.join(root, "no_member_features"), csv_path, spec_path, args)
    return {
        "experiment": "no_member_features",
        "seeds": args.seeds,
        "max_members": args.max_members,
        "rows": len(rows),
        **_lift_summary(report),
    }


SHORT_HISTORIES_COLUMNS = (
    "user_id",
    "item_id",
    "day",
    "rating",
    "occupation",
    "genres",
    "release_year",
)
# The members-without-features spec with the day as time (no tie-break) and
# occupation as the one member feature; the same label and request features.
SHORT_HISTORIES_SPEC = {
    **{k: v for k, v in NO_MEMBER_FEATURES_SPEC.items() if k != "tie_break"},
    "time": "day",
    "meta_features": [
        {"name": "occupation", "type": "categorical", "vocabulary": "auto"},
    ],
}
SHORT_HISTORY_ROWS = (20, 48)
SECONDS_PER_DAY = 86_400


def short_history_length(user_id: str) -> int:
    """How many of a member's first ratings the proxy keeps: a stable hash of the id."""
    import zlib  # noqa: PLC0415

    low, high = SHORT_HISTORY_ROWS
    return low + zlib.crc32(str(user_id).encode()) % (high - low + 1)


def short_histories_experiment(args, root: str) -> dict[str, Any]:
    from tf_limaml.datasets import movielens  # noqa: PLC0415

    by_member: dict[str, list[dict]] = {}
    for row in _member_sample(movielens.load()[0], args.max_members):
        by_member.setdefault(str(row["user_id"]), []).append(row)
    rows = []
    for member, history in sorted(by_member.items()):
        history.sort(key=lambda r: (r["timestamp"], str(r["item_id"])))
        rows += [
            {**row, "day": int(row["timestamp"]) // SECONDS_PER_DAY}
            for row in history[: short_history_length(member)]
        ]
    csv_path = os.path.join(root, "interactions.csv")
    written = movielens.write_csv(rows, csv_path, SHORT_HISTORIES_COLUMNS)
    spec_path = _write(os.path.join(root, "spec.json"), SHORT_HISTORIES_SPEC)
    report = _demo(os.path.join(root, "short_histories"), csv_path, spec_path, args)
    return {
        "experiment": "short_histories",
        "seeds": args.seeds,
        "max_members": args.max_members,
        "rows": written,
        "members": len(by_member),
        **_lift_summary(report),
    }


def tuned_experiment(args, root: str) -> dict[str, Any]:
    from tf_limaml.datasets import movielens  # noqa: PLC0415

    rows, spec = movielens.load()
    csv_path = os.path.join(root, "interactions.csv")
    movielens.write_csv(rows, csv_path)
    auto = _write(os.path.join(root, "types_only.json"), types_only(spec.to_dict()))
    report = _demo(os.path.join(root, "tuned"), csv_path, auto, args)
    return {"experiment": "tuned", "seeds": args.seeds, **_lift_summary(report)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experiment",
        choices=(
            "statistics",
            "item_entity",
            "tuned",
            "no_member_features",
            "short_histories",
            "no_personal_signal",
        ),
        default="statistics",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--max-members",
        type=int,
        default=None,
        help="no_member_features, no_personal_signal and short_histories: keep "
        "at most this many members (a stable hash of the id picks them)",
    )
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix=f"own_data_{args.experiment}_")
    os.makedirs(root, exist_ok=True)
    run = {
        "statistics": statistics_experiment,
        "item_entity": item_entity_experiment,
        "tuned": tuned_experiment,
        "no_member_features": no_member_features_experiment,
        "short_histories": short_histories_experiment,
        "no_personal_signal": no_personal_signal_experiment,
    }[args.experiment]
    return record({"benchmark": "own_data", "workdir": root, **run(args, root)})


if __name__ == "__main__":
    main()
