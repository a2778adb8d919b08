"""Same numbers as a git revision: train the same model with both libraries.

Builds `bench/meta_train.py`'s step configurations with this checkout and with
the library as of `--baseline REV` (loaded beside it, as that bench does),
seeds both the same, runs `fit` for a few steps on the same batches, and
prints JSON: the largest difference of any weight, of the adapted query
scores and of the meta embeddings, per configuration and per order.

    python bench/equivalence.py --baseline 4624b48 [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import meta_train  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _train(config, lib, steps: int, **meta_config):
    tf.keras.utils.set_random_seed(0)
    model = config.model(lib, **meta_config)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    batches = [config.batch(seed) for seed in range(3)]
    for i in range(steps):
        model.train_step(batches[i % len(batches)])
    test = config.batch(seed=99)
    embed = getattr(model, "embed", None) or model.meta_embedding
    return (
        [v.numpy() for v in model.trainable_variables],
        model.predict_query(test).numpy(),
        embed(test).numpy(),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    baseline = meta_train.load_baseline(args.baseline)
    result = {"baseline": args.baseline, "steps": args.steps, "runs": []}
    for name, config in (
        ("reference", meta_train.StepConfig()),
        ("small", meta_train.SMALL),
    ):
        for first_order in (False, True):
            ours = _train(
                config, meta_train.CURRENT, args.steps, first_order=first_order
            )
            theirs = _train(config, baseline, args.steps, first_order=first_order)
            weights = max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(ours[0], theirs[0], strict=True)
            )
            result["runs"].append(
                {
                    "config": name,
                    "first_order": first_order,
                    "max_weight_difference": weights,
                    "max_score_difference": float(np.max(np.abs(ours[1] - theirs[1]))),
                    "max_embedding_difference": float(
                        np.max(np.abs(ours[2] - theirs[2]))
                    ),
                }
            )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
