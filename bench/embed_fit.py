"""What the embedding fit costs the embed job, per entity (issue #23).

`limaml embed` computes each entity's meta embedding with `LiMAMLModel.embed`:
the meta block, the inner loop's gradient steps if any, then `embedding_steps`
Newton steps on the personal residual (`tf_limaml.newton`). This bench times
`embed` on one batch of the embed job's size, in alternated rounds, for

- `default`: no fit (the meta block only);
- `fit_N`: the residual fitted by N Newton steps (the MovieLens recipe: 2);
- `gradient_1`: one gradient step on the meta block and no fit (the previous
  recipe), for scale;

on the `reference` network of `bench/meta_train.py` with the recipe's 8 + 1
residual dimensions, and prints one JSON record: microseconds per entity
(median over rounds, with the min and max) and each figure's ratio to
`default`. With `--baseline REV`, the fit of the library as of REV is timed
in the same rounds, on the same weights (and the largest difference of the
two embeddings is printed).

    python bench/embed_fit.py [--tasks 1024] [--support 64] [--rounds 7]
        [--baseline REV]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RESIDUAL_DIM = 8


def build(config, residual_dim: int, lib):
    """The reference network with the residual, from library `lib`
    (`bench/meta_train.py`'s CURRENT or a baseline revision)."""
    import tensorflow as tf  # noqa: PLC0415

    tf.keras.utils.set_random_seed(0)
    return lib.LiMAMLModel(
        config.spec(lib),
        lib.MetaConfig(inner_steps=0, inner_lr=0.1, adapt="meta_block"),
        meta_units=config.meta_units,
        global_units=config.global_units,
        cross_layers=config.cross_layers,
        interaction=config.interaction,
        residual_dim=residual_dim,
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1024, help="Entities per batch.")
    parser.add_argument("--support", type=int, default=64, help="Support rows each.")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="Also time the fit of the library as of git revision REV, in the "
        "same rounds (`fit_2@REV`).",
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    import dataclasses  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from bench import meta_train  # noqa: PLC0415
    from bench.common import record  # noqa: PLC0415
    from tf_limaml.config import AdaptOptions  # noqa: PLC0415

    config = dataclasses.replace(
        meta_train.REFERENCE, tasks=args.tasks, support=args.support, query=1
    )
    model = build(config, RESIDUAL_DIM, meta_train.CURRENT)
    batch = config.batch()
    variants = {
        "default": (model, AdaptOptions(inner_steps=0, embedding_steps=0)),
        "fit_2": (model, AdaptOptions(inner_steps=0, embedding_steps=2)),
        "fit_4": (model, AdaptOptions(inner_steps=0, embedding_steps=4)),
        "gradient_1": (model, AdaptOptions(inner_steps=1, embedding_steps=0)),
    }
    if args.baseline:
        lib = meta_train.load_baseline(args.baseline)
        old = build(config, RESIDUAL_DIM, lib)
        old.set_weights(model.get_weights())
        options = {"inner_steps": 0, "embedding_steps": 2}
        variants[f"fit_2@{args.baseline}"] = (old, options)
    first_call = {}
    for name, (embedder, options) in variants.items():
        start = time.perf_counter()
        embedder.embed(batch, options).numpy()
        first_call[name] = round(time.perf_counter() - start, 2)
    if args.baseline:
        gap = np.abs(
            model.embed(batch, variants["fit_2"][1]).numpy()
            - old.embed(batch, options).numpy()
        ).max()
    samples = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (embedder, options) in variants.items():
            start = time.perf_counter()
            embedder.embed(batch, options).numpy()
            samples[name].append((time.perf_counter() - start) / args.tasks * 1e6)
    base = statistics.median(samples["default"])
    results = {
        name: {
            "us_per_entity": round(statistics.median(v), 1),
            "min": round(min(v), 1),
            "max": round(max(v), 1),
            "over_default": round(statistics.median(v) / base, 2),
        }
        for name, v in samples.items()
    }
    result = {
        "benchmark": "embed_fit",
        "config": {
            "network": "bench/meta_train.py reference",
            "tasks": args.tasks,
            "support": args.support,
            "residual_dim": RESIDUAL_DIM,
            "meta_embedding": int(model.meta_dim),
            "rounds": args.rounds,
            "threads": tf.config.threading.get_intra_op_parallelism_threads() or "all",
        },
        "results": results,
        "first_call_s": first_call,
    }
    if args.baseline:
        result["max_abs_difference_from_baseline"] = float(gap)
        result["fit_2_speedup_over_baseline"] = round(
            results[f"fit_2@{args.baseline}"]["us_per_entity"]
            / results["fit_2"]["us_per_entity"],
            2,
        )
    return record(result, save=not args.no_record)


if __name__ == "__main__":
    main()
