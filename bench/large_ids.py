"""A 1,000,000-bucket hashed request feature (dim 32): step time and peak RSS.

Meta-trains through `training.train` (the `limaml train` path: default
architecture, XLA) on synthetic tasks whose item ids are hashed into
`--buckets` rows of `--dim` numbers, and times the steps after the first
(compilation) ones. One child process per variant of how the table's gradient
is applied, so each reports its own peak RSS (ru_maxrss):

* `dense`: the gradient made dense, Keras's Adam (how tables of up to
  `LiMAMLModel.dense_table_limit` numbers are applied);
* `keras-sparse`: the sparse gradient handed to Keras's Adam, which still
  decays both moments and moves every row;
* `lazy`: the sparse gradient handed to `LazyAdam` (the default of
  `training.train`), which updates only the rows of the batch;
* `floor`: `lazy` with a table of 1,000 rows, the same data otherwise: the
  step without a large table.

The variants run `--rounds` times, in alternating order (a drift in the
machine's load then hits them alike); a variant's step time is the median of
its rounds' medians.

    python bench/large_ids.py [--buckets 1000000] [--dim 32] [--steps 30]
    python bench/large_ids.py --variant lazy          # one variant, no record
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import record  # noqa: E402

VARIANTS = ("dense", "keras-sparse", "lazy", "floor")
FLOOR_BUCKETS = 1000
WARMUP_STEPS = 3


def write_tasks(output_dir: str, num_entities: int, num_items: int) -> dict[str, str]:
    from tf_limaml.datasets import synthetic  # noqa: PLC0415

    return synthetic.write_tasks(
        output_dir, num_entities=num_entities, num_items=num_items, seed=0
    )


def large_spec(spec_path: str, buckets: int, dim: int):
    """The synthetic spec with its item id hashed into `buckets` rows of `dim`."""
    from tf_limaml.features import FeatureSpec  # noqa: PLC0415

    config = FeatureSpec.load(spec_path).to_dict()
    (item,) = [f for f in config["request_features"] if f["name"] == "item_id"]
    item.update(hash_buckets=buckets, dim=dim)
    return FeatureSpec.from_dict(config)


def run_variant(args: argparse.Namespace) -> dict:
    """Trains one variant in this process; returns its step times and peak RSS."""
    import tensorflow as tf  # noqa: PLC0415

    from tf_limaml import training  # noqa: PLC0415
    from tf_limaml.model import LiMAMLModel, MetaConfig  # noqa: PLC0415

    buckets = FLOOR_BUCKETS if args.variant == "floor" else args.buckets
    spec = large_spec(os.path.join(args.tasks_dir, "spec.json"), buckets, args.dim)
    optimizer = None
    if args.variant in ("dense", "keras-sparse"):
        optimizer = lambda: tf.keras.optimizers.Adam(  # noqa: E731
            args.learning_rate, global_clipnorm=training.GRADIENT_CLIPNORM
        )
    if args.variant == "dense":
        LiMAMLModel.dense_table_limit = 1 << 62

    class StepTimes(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ms: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.ms.append((time.perf_counter() - self.start) * 1000)

    times = StepTimes()
    start = time.perf_counter()
    model, _ = training.train(
        os.path.join(args.tasks_dir, "train-*"),
        spec,
        tempfile.mkdtemp(dir=args.tasks_dir, prefix=f"model-{args.variant}-"),
        MetaConfig(),
        epochs=1,
        steps_per_epoch=WARMUP_STEPS + args.steps,
        batch_tasks=args.batch_tasks,
        learning_rate=args.learning_rate,
        verbose=0,
        on_failure="warn",
        callbacks=[times],
        optimizer=optimizer,
    )
    wall = time.perf_counter() - start
    (table,) = [v for v in model.trainable_variables if "item_id" in v.name]
    timed = times.ms[WARMUP_STEPS:]
    return {
        "variant": args.variant,
        "optimizer": type(model.optimizer).__name__,
        "table_shape": table.shape.as_list(),
        "step_ms_median": round(statistics.median(timed), 2),
        "step_ms_mean": round(statistics.fmean(timed), 2),
        "first_steps_ms": [round(t) for t in times.ms[:WARMUP_STEPS]],
        "timed_steps": len(timed),
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
        "train_wall_s": round(wall, 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buckets", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="Timed steps.")
    parser.add_argument("--batch-tasks", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--entities", type=int, default=600)
    parser.add_argument(
        "--items", type=int, default=200_000, help="Distinct item ids hashed."
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", choices=("all", *VARIANTS), default="all")
    parser.add_argument("--tasks-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant != "all" and args.tasks_dir:
        result = run_variant(args)
        print(json.dumps(result), flush=True)
        return result
    with tempfile.TemporaryDirectory() as tmp:
        tasks_dir = args.tasks_dir or tmp
        if not args.tasks_dir:
            write_tasks(tasks_dir, args.entities, args.items)
        variants = VARIANTS if args.variant == "all" else (args.variant,)
        rounds: dict[str, list[dict]] = {v: [] for v in variants}
        order = []
        for i in range(args.rounds):
            order += list(variants if i % 2 == 0 else reversed(variants))
        for variant in order:
            child = [
                sys.executable,
                os.path.abspath(__file__),
                *(argv if argv is not None else sys.argv[1:]),
                "--variant",
                variant,
                "--tasks-dir",
                tasks_dir,
            ]
            out = subprocess.run(
                child, check=True, capture_output=True, text=True
            ).stdout
            rounds[variant].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rounds[variant][-1]), file=sys.stderr, flush=True)
    if args.variant != "all":
        return rounds[args.variant][0]
    step_ms = {
        k: round(statistics.median(r["step_ms_median"] for r in v), 2)
        for k, v in rounds.items()
    }
    return record(
        {
            "benchmark": "large_ids",
            "buckets": args.buckets,
            "dim": args.dim,
            "table_mb": round(args.buckets * args.dim * 4 / 2**20, 1),
            "batch_tasks": args.batch_tasks,
            "timed_steps": args.steps,
            "rounds": args.rounds,
            "step_ms": step_ms,
            "table_ms_over_floor": {
                k: round(step_ms[k] - step_ms["floor"], 2)
                for k in ("dense", "keras-sparse", "lazy")
            },
            "dense_over_lazy": round(step_ms["dense"] / step_ms["lazy"], 2),
            "keras_sparse_over_lazy": round(
                step_ms["keras-sparse"] / step_ms["lazy"], 2
            ),
            "peak_rss_mb": {
                k: max(r["peak_rss_mb"] for r in v) for k, v in rounds.items()
            },
            "rounds_step_ms": {
                k: [r["step_ms_median"] for r in v] for k, v in rounds.items()
            },
        }
    )


if __name__ == "__main__":
    main()
