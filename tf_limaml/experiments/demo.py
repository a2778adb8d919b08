"""`limaml demo`: the whole chain on an embedded dataset, with a line per phase."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)


def _table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    lines = [
        "| model | query AUC | log loss | mean member AUC |",
        "| --- | --- | --- | --- |",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['auc']:.4f} | {m['loss']:.4f} | "
            f"{m['mean_member_auc']:.4f} |"
        )
    return "\n".join(lines)


def run_synthetic(args: argparse.Namespace, progress) -> int:
    """Synthetic members: meta-train LiMAML and the same network without adaptation."""
    from tf_limaml import data, evaluation, training  # noqa: PLC0415
    from tf_limaml.config import MetaConfig  # noqa: PLC0415
    from tf_limaml.datasets import synthetic  # noqa: PLC0415
    from tf_limaml.features import FeatureSpec  # noqa: PLC0415

    workdir = args.workdir or os.path.join("runs", "synthetic")
    fast = getattr(args, "fast", False)
    epochs = args.epochs or (4 if fast else 10)
    num_entities = 400 if fast else 1500
    with progress.phase(f"make tasks ({num_entities} synthetic members, in-process)"):
        paths = synthetic.write_tasks(
            os.path.join(workdir, "tasks"), num_entities=num_entities, seed=0
        )
    spec = FeatureSpec.load(paths["spec"])
    results, failed = {}, []
    for name, steps in (("limaml", 1), ("global", 0)):
        config = MetaConfig(inner_steps=steps, inner_lr=0.5)
        with progress.phase(f"train {name} ({epochs} epochs)"):
            # The demo reports a failed model rather than stopping at it.
            model, history = training.train(
                paths["train"],
                spec,
                os.path.join(workdir, name),
                config,
                epochs=epochs,
                learning_rate=3e-3,
                validation_tasks=paths["val"],
                verbose=0,
                on_failure="warn",
                strategy=getattr(args, "strategy", None),
            )
        with progress.phase(f"evaluate {name}"):
            batches = list(data.task_dataset(paths["test"], spec, 64, 32, 32))
            results[name] = evaluation.evaluate_model(model, batches)["adapted"]
            val_loss = (history.get("val_loss") or [None])[-1]
            health = training.check_trained_model(model, batches, val_loss)
        if not health["healthy"]:
            failed.append({"model": name, "seed": 0, "reasons": health["reasons"]})
    report = {
        "dataset": "synthetic",
        "models": results,
        "auc_lift": results["limaml"]["auc"] - results["global"]["auc"],
        "failed": failed,
    }
    with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
        # NaN is not JSON; a failed model's NaN metrics are written as null.
        json.dump(_json_safe(report), f, indent=2)
    print(_table([(k, v) for k, v in results.items()]))
    print(
        f"LiMAML query-AUC lift over the same network without adaptation: "
        f"{report['auc_lift']:+.4f}  (report: {os.path.join(workdir, 'report.json')})"
    )
    for entry in failed:
        print(f"[FAILED] {entry['model']}: " + "; ".join(entry["reasons"]))
    if any(entry["model"] == "limaml" for entry in failed):
        print(
            "limaml demo: error: LiMAML failed its health check (see [FAILED] above); "
            "its numbers are not results.",
            file=sys.stderr,
        )
        return 1
    return 0


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run(args: argparse.Namespace, progress) -> int:
    dataset = args.dataset or ("movielens" if not args.input else None)
    if dataset == "synthetic":
        return run_synthetic(args, progress)
    from tf_limaml.experiments import movielens_demo  # noqa: PLC0415

    return movielens_demo.run(args, progress)
