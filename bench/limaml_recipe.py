"""LiMAML's recipe on val: variants of the inner loop against the ID embedding.

Trains, for one seed, the global model, the ID-embedding baseline at every
support size k, and the given LiMAML variants (each a dict of Recipe
changes), and prints one JSON line per model with its overall and mean
per-member AUC on the val members and on the test members at every k. The
choices of the recipe read the val columns only; test is printed to record
what the chosen recipe then scores.

    python bench/limaml_recipe.py --tasks runs/demo/tasks --seed 0 \
        --variant '{"name": "newton", "embedding_steps": 2}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sweep(score, batch, ks):
    from tf_limaml.experiments.protocol import evaluate_sweep  # noqa: PLC0415

    out = evaluate_sweep(score, batch, ks)
    return {
        k: [round(v["overall_auc"], 4), round(v["mean_member_auc"], 4)]
        for k, v in out.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--baselines", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--fold",
        action="store_true",
        help="Score on the tuning fold (a third of the train members, as "
        "`limaml tune` does) in place of the test members",
    )
    args = parser.parse_args(argv)

    from tf_limaml.experiments import baselines  # noqa: PLC0415
    from tf_limaml.experiments.protocol import (  # noqa: PLC0415
        Protocol,
        Splits,
        records_from_dir,
    )
    from tf_limaml.experiments.recipes import Architecture, Recipe  # noqa: PLC0415
    from tf_limaml.features import FeatureSpec  # noqa: PLC0415

    spec = FeatureSpec.load(os.path.join(args.tasks, "spec.json"))
    protocol = Protocol()
    records = records_from_dir(args.tasks)
    if args.fold:
        from tf_limaml.experiments import tune  # noqa: PLC0415

        splits = tune.tuning_splits(records, spec, protocol)
    else:
        splits = Splits.from_records(records, spec, protocol)
    ks = protocol.support_ks
    lines = []

    def emit(name, changes, val, test, seconds, extra=None):
        line = {
            "name": name,
            "seed": args.seed,
            "scored_on": "fold" if args.fold else "test",
            "changes": changes,
            "val": val,
            "test": test,
            "seconds": round(seconds, 1),
            **(extra or {}),
        }
        lines.append(line)
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    if args.baselines:
        recipe = Recipe()
        start = time.perf_counter()
        base, _ = baselines.train_global(spec, splits, recipe, args.seed)
        score = lambda b, k: baselines.query_probabilities(base, b, 0)  # noqa: E731
        emit(
            "global",
            {},
            _sweep(score, splits.val, ks),
            _sweep(score, splits.test, ks),
            time.perf_counter() - start,
        )
        val, test = {}, {}
        start = time.perf_counter()
        for k in ks:
            model, _ = baselines.train_id_embedding(spec, splits, recipe, args.seed, k)
            score = lambda b, kk, m=model: m.task_probabilities(b)  # noqa: E731
            label = next(iter(_sweep(score, splits.val, [k])))
            val[label] = _sweep(score, splits.val, [k])[label]
            test[label] = _sweep(score, splits.test, [k])[label]
        emit("id_embedding", {}, val, test, time.perf_counter() - start)

    inits = {}
    for text in args.variant:
        changes = json.loads(text)
        name = changes.pop("name", text)
        grid = changes.pop("grid", [])
        architecture = Architecture(**changes.pop("architecture", {}))
        recipe = dataclasses.replace(Recipe(), architecture=architecture, **changes)
        start = time.perf_counter()
        key = (architecture, recipe.pretrain_epochs, recipe.warm_start)
        if key not in inits:
            if recipe.warm_start == "global":
                inits[key] = baselines.train_global(spec, splits, recipe, args.seed)[0]
            else:
                inits[key] = baselines.pretrain(spec, splits, recipe, args.seed)
        model, history = baselines.train_meta_learner(
            spec, splits, recipe, args.seed, init=inits[key]
        )
        score = lambda b, k, m=model: baselines.query_probabilities(m, b)  # noqa: E731
        extra = {"meta_epochs": len(history.get("loss", []))}
        if model.log_embedding_prior is not None:
            import numpy as np  # noqa: PLC0415

            extra["prior"] = [
                round(float(x), 3) for x in np.exp(model.log_embedding_prior.numpy())
            ]
        emit(
            name,
            {**changes, "architecture": dataclasses.asdict(architecture)},
            _sweep(score, splits.val, ks),
            _sweep(score, splits.test, ks),
            time.perf_counter() - start,
            extra,
        )
        for options in grid:
            # Test-time knobs on the same trained model (no retraining).
            from tf_limaml.config import AdaptOptions  # noqa: PLC0415

            saved = model.adapt_options
            model.adapt_options = saved.merged(AdaptOptions(**options))
            label = name + " " + json.dumps(options, sort_keys=True)
            emit(
                label,
                options,
                _sweep(score, splits.val, ks),
                _sweep(score, splits.test, ks),
                0.0,
            )
            model.adapt_options = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
