"""Several personalized entities on MovieLens-100K: member-only LiMAML vs member + movie.

Runs the demo's chain for the two models on the same splits and seeds:

* ``limaml``: the demo's LiMAML (the member is the only entity);
* ``limaml_multi_entity``: `tf_limaml.experiments.multi_entity`: an item
  (movie) LiMAML model meta-trained on the train members' ratings, its
  adapted embeddings joined into the member model as the request feature
  ``item_id__meta_embedding`` (out-of-fold for training rows).

Prints one JSON line (and appends it to bench/results.jsonl): overall AUC and
AUC per support size k (mean and std over seeds), and the overall AUC of the
test query rows bucketed by the movie's number of training ratings.

    python bench/multi_entity.py --seeds 3            # the demo's recipe
    python bench/multi_entity.py --seeds 1 --fast     # development
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import record  # noqa: E402

MODELS = ("limaml", "limaml_multi_entity", "limaml_multi_entity_round2")


class _Progress:
    """The demo's progress lines, on stderr."""

    def phase(self, name):
        from tf_limaml.cli import Progress  # noqa: PLC0415

        return Progress().phase(name)


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 4), "std": round(std, 4)}


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fast", action="store_true", help="Recipe.fast()")
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--rounds",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: also a second alternation (member embeddings into the item "
        "tasks, then both models again), reported as limaml_multi_entity_round2",
    )
    args = parser.parse_args(argv)

    from beam_pipelines import make_tasks  # noqa: PLC0415
    from tf_limaml.datasets import movielens  # noqa: PLC0415
    from tf_limaml.experiments import baselines, multi_entity  # noqa: PLC0415
    from tf_limaml.experiments.protocol import (  # noqa: PLC0415
        Protocol,
        Splits,
        Timer,
        evaluate_sweep,
        records_from_dir,
    )
    from tf_limaml.experiments.recipes import Recipe  # noqa: PLC0415
    from tf_limaml.features import FeatureSpec  # noqa: PLC0415

    workdir = args.workdir or tempfile.mkdtemp(prefix="multi_entity_")
    os.makedirs(workdir, exist_ok=True)
    rows, spec = movielens.load()
    csv_path = os.path.join(workdir, "interactions.csv")
    movielens.write_csv(rows, csv_path)
    spec_path = os.path.join(workdir, "spec.json")
    spec.save(spec_path)
    protocol = Protocol()
    recipe = Recipe.fast() if args.fast else Recipe()
    tasks_dir = os.path.join(workdir, "tasks")
    make_tasks.run(protocol.make_tasks_args(csv_path, spec_path, tasks_dir))
    spec = FeatureSpec.load(os.path.join(tasks_dir, "spec.json"))
    records = records_from_dir(tasks_dir)
    splits = Splits.from_records(records, spec, protocol)
    counts = multi_entity.item_rating_counts(records["train"], spec)
    progress = _Progress()
    ks = protocol.support_ks
    per_seed = []
    for seed in range(args.seeds):
        entry: dict[str, Any] = {"seed": seed}
        with Timer() as timer:
            init = multi_entity._init(spec, splits, recipe, seed)
            model, history = baselines.train_meta_learner(
                spec, splits, recipe, seed, init=init
            )

            def member_only(batch, k, m=model):
                return baselines.query_probabilities(m, batch)

            sweep = evaluate_sweep(member_only, splits.test, ks)
        entry["limaml"] = {
            "sweep": sweep,
            "buckets": multi_entity.bucket_metrics(
                splits.test, member_only(splits.test, None), counts
            ),
            "wall_s": round(timer.seconds, 1),
            "meta_epochs": len(history.get("loss", [])),
        }
        with Timer() as timer:
            score, details = multi_entity.train_multi_entity(
                spec,
                splits,
                records,
                recipe,
                protocol,
                seed,
                workdir,
                progress,
                csv_path,
            )
            sweep = evaluate_sweep(score, splits.test, ks)
        entry["limaml_multi_entity"] = {
            "sweep": sweep,
            "buckets": multi_entity.bucket_metrics(
                splits.test, score(splits.test, None), counts
            ),
            "wall_s": round(timer.seconds, 1),
            "details": details,
        }
        if args.rounds == 2:
            with Timer() as timer:
                score2, details2 = multi_entity.second_round(
                    score,
                    spec,
                    splits,
                    recipe,
                    protocol,
                    seed,
                    workdir,
                    progress,
                    csv_path,
                )
                sweep = evaluate_sweep(score2, splits.test, ks)
            entry["limaml_multi_entity_round2"] = {
                "sweep": sweep,
                "buckets": multi_entity.bucket_metrics(
                    splits.test, score2(splits.test, None), counts
                ),
                "wall_s": round(timer.seconds, 1),
                "details": details2,
            }
        per_seed.append(entry)
        print(
            {m: entry[m]["sweep"]["all"] for m in MODELS if m in entry},
            file=sys.stderr,
            flush=True,
        )
    summary: dict[str, Any] = {}
    names = [n for n in MODELS if n in per_seed[0]]
    for name in names:
        labels = list(per_seed[0][name]["sweep"])
        buckets = list(per_seed[0][name]["buckets"])
        summary[name] = {
            "overall_auc_by_k": {
                k: _mean_std([e[name]["sweep"][k]["overall_auc"] for e in per_seed])
                for k in labels
            },
            "logloss": _mean_std(
                [e[name]["sweep"]["all"]["logloss"] for e in per_seed]
            ),
            "mean_member_auc": _mean_std(
                [e[name]["sweep"]["all"]["mean_member_auc"] for e in per_seed]
            ),
            "auc_by_movie_ratings": {
                b: _mean_std([e[name]["buckets"][b]["auc"] for e in per_seed])
                for b in buckets
            },
            "wall_s_per_seed": _mean_std([e[name]["wall_s"] for e in per_seed]),
        }
    rows_by_bucket = {b: v["rows"] for b, v in per_seed[0]["limaml"]["buckets"].items()}
    lift = {
        name: {
            k: round(
                summary[name]["overall_auc_by_k"][k]["mean"]
                - summary["limaml"]["overall_auc_by_k"][k]["mean"],
                4,
            )
            for k in summary["limaml"]["overall_auc_by_k"]
        }
        for name in names[1:]
    }
    return record(
        {
            "benchmark": "multi_entity",
            "seeds": args.seeds,
            "recipe": "fast" if args.fast else "demo",
            "test_query_rows_by_movie_ratings": rows_by_bucket,
            "rounds": args.rounds,
            "lift_over_limaml_by_k": lift,
            **summary,
            "per_seed_details": {
                name: [e[name]["details"] for e in per_seed] for name in names[1:]
            },
            "wall_s": round(time.perf_counter() - START, 1),
            "workdir": workdir,
        }
    )


START = time.perf_counter()

if __name__ == "__main__":
    main()
