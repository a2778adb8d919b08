"""LiMAML's recipe on val: variants of the inner loop against the ID embedding.

Trains, for one seed, the global model, the ID-embedding baseline at every
support size k, and the given LiMAML variants (each a dict of Recipe
changes), and prints one JSON line per model with its overall and mean
per-member AUC on the val members and on the test members at every k. The
choices of the recipe read the val columns only; test is printed to record
what the chosen recipe then scores. With `--intervals`, each model after the
first also gets its overall-AUC lift over the first (on the fold with
`--fold`, else on test), with 90% intervals of a paired bootstrap over those
members.

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


class PairedLifts:
    """Overall-AUC lifts over the first model measured, with 90% intervals of a
    paired bootstrap over the scored entities (`tune.FoldScorer`: every model
    on the same resamples), at every k and averaged over k."""

    def __init__(self, batch, ks, seed: int = 0):
        from tf_limaml.experiments.protocol import cut_support, k_label  # noqa: PLC0415
        from tf_limaml.experiments.tune import FoldScorer  # noqa: PLC0415

        self.mask = FoldScorer.query_mask(batch)
        self.cuts = {k_label(k): (k, cut_support(batch, k)) for k in ks}
        self.scorer = FoldScorer.of_batch(batch, seed)
        self.reference = None

    def lifts(self, name, score):
        """{"vs": the reference's name, "lift": {k: [lift, low, high]}, with
        "mean" over k}; None for the first model, which becomes the reference."""
        import numpy as np  # noqa: PLC0415

        from tf_limaml.experiments.protocol import without_buckets  # noqa: PLC0415
        from tf_limaml.intervals import Resampled  # noqa: PLC0415

        measured = self.scorer.measure_rows(
            {
                label: np.asarray(score(without_buckets(cut), k))[self.mask]
                for label, (k, cut) in self.cuts.items()
            }
        )
        if self.reference is None:
            self.reference = (name, measured)
            return None
        reference_name, reference = self.reference
        lifts, out = [], {}
        for label, resampled in measured["auc_resampled"].items():
            lift = resampled - reference["auc_resampled"][label]
            lifts.append(lift)
            out[label] = [round(lift.estimate, 4), *map(_round4, lift.interval())]
        mean = Resampled.mean(lifts)
        out["mean"] = [round(mean.estimate, 4), *map(_round4, mean.interval())]
        return {"vs": reference_name, "lift": out}


def _round4(value: float) -> float:
    return round(value, 4)


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
    parser.add_argument(
        "--fold-window",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        default=None,
        help="With --fold: the fold is the train members whose tuning hash "
        "falls in [LO, HI) (tune's fold is [0, 1/3)); disjoint windows give "
        "disjoint folds",
    )
    parser.add_argument(
        "--intervals",
        action="store_true",
        help="Also print each model's overall-AUC lift over the first model "
        "printed on the scored members (the fold or test), at every k and "
        "averaged over k, with 90%% intervals of a paired bootstrap over them",
    )
    args = parser.parse_args(argv)
    if args.fold_window and not args.fold:
        parser.error("--fold-window picks the tuning fold's members: add --fold")

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

        start, end = args.fold_window or (0.0, tune.TUNING_FOLD)
        try:
            splits = tune.tuning_splits(records, spec, protocol, end, start)
        except ValueError as error:
            parser.error(f"--fold-window: {error}")
    else:
        splits = Splits.from_records(records, spec, protocol)
    ks = protocol.support_ks
    lines = []
    paired = PairedLifts(splits.test, ks, args.seed) if args.intervals else None

    def with_lifts(extra, name, score):
        if paired is None:
            return extra
        lifts = paired.lifts(name, score)
        return {**(extra or {}), **({"paired": lifts} if lifts else {})}

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
            with_lifts(None, "global", score),
        )
        val, test, by_k = {}, {}, {}
        start = time.perf_counter()
        for k in ks:
            model, _ = baselines.train_id_embedding(spec, splits, recipe, args.seed, k)
            score = lambda b, kk, m=model: m.task_probabilities(b)  # noqa: E731
            by_k[k] = score
            label = next(iter(_sweep(score, splits.val, [k])))
            val[label] = _sweep(score, splits.val, [k])[label]
            test[label] = _sweep(score, splits.test, [k])[label]
        emit(
            "id_embedding",
            {},
            val,
            test,
            time.perf_counter() - start,
            # The model retrained for each k scores that k.
            with_lifts(None, "id_embedding", lambda b, k: by_k[k](b, k)),
        )

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
            with_lifts(extra, name, score),
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
                with_lifts(None, label, score),
            )
            model.adapt_options = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
