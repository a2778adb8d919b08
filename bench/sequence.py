"""The sequence meta block on MovieLens-100K: which variant, against LiMAML.

Trains, per seed, the demo's pretraining once, then LiMAML (the MLP meta
block) and `limaml_sequence` variants on the same tasks, and scores every one
on the test members at each support size k (the demo's protocol, tasks built
in-process with make-tasks' split). Variants:

* ``shared1``: request rows embedded by the global block's tables, 1 inner step;
* ``shared0``: the same, 0 inner steps (pure amortized inference);
* ``own1``: the block's own request tables, 1 inner step;
* ``norecency1``: shared1 without the recency vectors.

Prints one JSON line (and appends it to bench/results.jsonl).

    python bench/sequence.py --seeds 1 --variants shared1,shared0,own1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from bench.common import record  # noqa: E402

# name -> (SequenceOptions changes, Recipe changes)
VARIANTS = {
    "shared1": ({}, {}),
    "shared0": ({"inner_steps": 0}, {}),
    "own1": ({"request_embedding": "own"}, {}),
    "norecency1": ({"recency": False}, {}),
    "pool1": ({"adapt": ("output", "pool_query")}, {}),
    "layers2": ({"num_layers": 2}, {}),
    "cut1": ({}, {"support_cut": 1.0}),
    "cut_default": ({"support_cut": None}, {}),
    "cut1_0step": ({"inner_steps": 0}, {"support_cut": 1.0}),
    "cut1_own": ({"request_embedding": "own"}, {"support_cut": 1.0}),
    "cut1_layers0": ({"num_layers": 0}, {"support_cut": 1.0}),
    "cut1_lr3": ({}, {"support_cut": 1.0, "meta_learning_rate": 3e-3}),
    "cut1_patience6": ({}, {"support_cut": 1.0, "meta_patience": 6}),
    "cut1_mlp": ({"adapt": ("mlp",)}, {"support_cut": 1.0}),
    "cut1_pool": ({"adapt": ("output", "pool_query")}, {"support_cut": 1.0}),
    "cut1_lr05": ({}, {"support_cut": 1.0, "inner_lr": 0.5}),
    "cut1_prior3": ({}, {"support_cut": 1.0, "support_prior": 3.0}),
    "cut1_steps3": ({"inner_steps": 3}, {"support_cut": 1.0}),
    "cut1_innerlr1": ({}, {"support_cut": 1.0, "inner_lr": 1.0}),
    "cut1_dim64": ({"model_dim": 64, "num_heads": 4}, {"support_cut": 1.0}),
    "cut1_unfrozen": ({}, {"support_cut": 1.0, "freeze_request_embeddings": False}),
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--variants", default="shared1,shared0,own1")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--no-limaml", action="store_true")
    args = parser.parse_args(argv)

    from tf_limaml import tasks
    from tf_limaml.datasets import movielens
    from tf_limaml.experiments import baselines, protocol
    from tf_limaml.experiments.recipes import Recipe, SequenceOptions

    rows, spec = movielens.load()
    proto = protocol.Protocol()
    histories, _, _ = tasks.build_tasks(spec, rows)
    records = protocol.records_from_histories(
        histories, spec, proto.split_seed, proto.val_fraction, proto.test_fraction
    )
    splits = protocol.Splits.from_records(records, spec, proto)
    base_recipe = Recipe.fast() if args.fast else Recipe()
    names = [v for v in args.variants.split(",") if v]
    results: dict[str, list] = {}
    for seed in range(args.seeds):
        init = baselines.pretrain(spec, splits, base_recipe, seed)
        candidates = [] if args.no_limaml else [("limaml", None)]
        candidates += [(n, VARIANTS[n]) for n in names]
        for name, changes in candidates:
            start = time.perf_counter()
            if changes is None:
                model, history = baselines.train_meta_learner(
                    spec, splits, base_recipe, seed, init=init
                )
            else:
                block_changes, recipe_changes = changes
                recipe = dataclasses.replace(
                    base_recipe,
                    sequence=dataclasses.replace(SequenceOptions(), **block_changes),
                    **recipe_changes,
                )
                model, history = baselines.train_meta_learner(
                    spec, splits, recipe, seed, init=init, sequence=True
                )
            sweep = protocol.evaluate_sweep(
                lambda batch, k, m=model: baselines.query_probabilities(m, batch),
                splits.test,
                proto.support_ks,
            )
            val = protocol.evaluate_sweep(
                lambda batch, k, m=model: baselines.query_probabilities(m, batch),
                splits.val,
                proto.support_ks,
            )
            entry = {k: round(v["overall_auc"], 4) for k, v in sweep.items()} | {
                "member_auc_all": round(sweep["all"]["mean_member_auc"], 4),
                # What a choice may read: the val members' AUC (mean over k).
                "val_mean_auc": round(
                    float(np.mean([v["overall_auc"] for v in val.values()])), 4
                ),
                "epochs": len(history.get("loss", [])),
                "seconds": round(time.perf_counter() - start, 1),
            }
            results.setdefault(name, []).append(entry)
            print(name, seed, json.dumps(entry), file=sys.stderr, flush=True)
    out = {
        "bench": "sequence",
        "seeds": args.seeds,
        "fast": args.fast,
        "results": results,
    }
    return record(out)


if __name__ == "__main__":
    main()
