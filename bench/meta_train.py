"""Meta-train step throughput against its floor and ceiling, on the `reference` config.

Measures tasks/s, in one run, medians over repeats after warm-up, of:
  (a) xla            the production step: vectorized over tasks, XLA-compiled;
  (b) no_xla         the same step without XLA;
  (c) first_order    (a) without the second-order term;
  (d) per_task_loop  the same math one task at a time inside tf.function, the
                     way most MAML code is written;
  (e) plain_step     a plain (non-meta) training step of the same network on
                     the same number of examples, T * (S + Q) rows.
It also counts the FLOPs of one reference step by hand from the layer shapes,
measures this machine's float32 matmul rate (1024 x 1024), and reports the
achieved GFLOP/s and its fraction of that peak; with --profile it names the
top ops of the step (TF profiler, host time per op type).

    python bench/meta_train.py [--repeats 5] [--steps 10] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.common import median_seconds, record  # noqa: E402
from tf_limaml.features import FeatureSpec  # noqa: E402
from tf_limaml.model import LiMAMLModel, MetaConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """The configuration everyone measures (issue: performance)."""

    tasks: int = 32
    support: int = 32
    query: int = 32
    meta_numeric: int = 8
    meta_categorical: int = 3
    meta_vocabulary: int = 1000
    request_numeric: int = 16
    request_categorical: int = 3
    request_buckets: int = 10_000
    embedding_dim: int = 16
    meta_units: tuple[int, ...] = (64, 32)
    cross_layers: int = 2
    global_units: tuple[int, ...] = (256, 128)
    inner_steps: int = 1

    def spec(self) -> FeatureSpec:
        vocabulary = [f"v{i}" for i in range(self.meta_vocabulary)]
        return FeatureSpec.from_dict(
            {
                "entity": "entity",
                "time": "time",
                "label": "label",
                "meta_features": (
                    [
                        {"name": f"m{i}", "type": "numeric", "normalize": False}
                        for i in range(self.meta_numeric)
                    ]
                    + [
                        {
                            "name": f"mc{i}",
                            "type": "categorical",
                            "vocabulary": vocabulary,
                            "dim": self.embedding_dim,
                        }
                        for i in range(self.meta_categorical)
                    ]
                ),
                "request_features": (
                    [
                        {"name": f"r{i}", "type": "numeric", "normalize": False}
                        for i in range(self.request_numeric)
                    ]
                    + [
                        {
                            "name": f"rc{i}",
                            "type": "categorical",
                            "hash_buckets": self.request_buckets,
                            "dim": self.embedding_dim,
                        }
                        for i in range(self.request_categorical)
                    ]
                ),
            }
        )

    def model(self, **meta_config) -> LiMAMLModel:
        config = MetaConfig(inner_steps=self.inner_steps, inner_lr=0.1, **meta_config)
        return LiMAMLModel(
            self.spec(),
            config,
            meta_units=self.meta_units,
            global_units=self.global_units,
            cross_layers=self.cross_layers,
        )

    def batch(self, seed: int = 0) -> dict[str, tf.Tensor]:
        """A random raw task batch of the reference shapes."""
        rng = np.random.default_rng(seed)
        t, spec = self.tasks, self.spec()
        batch: dict[str, tf.Tensor] = {
            "entity_id": tf.constant([f"e{i}" for i in range(t)])
        }
        for feature in spec.meta_features:
            if feature.is_numeric:
                batch[feature.name] = tf.constant(rng.normal(size=t), tf.float32)
            else:
                batch[feature.name] = tf.constant(
                    rng.choice(feature.vocabulary, size=t).astype(object).astype(bytes)
                )
        for part, rows in (("support", self.support), ("query", self.query)):
            for feature in spec.request_features:
                key = spec.batch_key(part, feature.name)
                if feature.is_numeric:
                    batch[key] = tf.constant(rng.normal(size=(t, rows)), tf.float32)
                else:
                    batch[key] = tf.constant(
                        rng.integers(0, 10**6, size=(t, rows)).astype(str).astype(bytes)
                    )
            batch[f"{part}_label"] = tf.constant(
                rng.integers(0, 2, size=(t, rows)), tf.float32
            )
            batch[f"{part}_mask"] = tf.ones((t, rows), tf.float32)
        return batch

    def step_flops(self) -> dict[str, float]:
        """FLOPs of one meta-train step, counted by hand from the layer shapes.

        F(N) is the forward matmul FLOPs of the global block on N rows, Fm that
        of the meta block on T tasks. A backward pass costs 2x its forward
        (input and weight gradients), and the inner backward needs input
        gradients only (1x). The second-order term back-propagates through the
        inner forward and backward, about 2x their cost. In all:
        6 F(T*S) + 3 F(T*Q) + 12 Fm.
        """
        d = self.meta_units[-1]
        request_width = (
            self.request_numeric + self.request_categorical * self.embedding_dim
        )
        cross_width = d + request_width + d  # meta embedding, request, product term
        per_row = request_width * d + self.cross_layers * cross_width * cross_width
        width = cross_width
        for units in self.global_units:
            per_row += width * units
            width = units
        per_row += width
        meta_width = self.meta_numeric + self.meta_categorical * self.embedding_dim
        per_task, width = 0, meta_width
        for units in self.meta_units:
            per_task += width * units
            width = units
        forward_support = 2.0 * self.tasks * self.support * per_row
        forward_query = 2.0 * self.tasks * self.query * per_row
        forward_meta = 2.0 * self.tasks * per_task
        total = 6 * forward_support + 3 * forward_query + 12 * forward_meta
        return {
            "step": total,
            "forward_support": forward_support,
            "forward_query": forward_query,
            "forward_meta": forward_meta,
        }


REFERENCE = ReferenceConfig()


def _slice_task(encoded, t):
    out = {}
    for key, value in encoded.items():
        if key == "batch_size":
            out[key] = tf.constant(1)
        elif isinstance(value, dict):
            out[key] = {k: v[t : t + 1] for k, v in value.items()}
        else:
            out[key] = value[t : t + 1]
    return out


def build_steps(config: ReferenceConfig, batch) -> dict[str, callable]:
    """One callable per variant; each runs one full training step on `batch`."""
    steps = {}

    def meta_step(**meta_config):
        model = config.model(**meta_config)
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
        fn = tf.function(model.train_step)
        return lambda: fn(batch)

    steps["xla"] = meta_step(jit_compile=True)
    steps["no_xla"] = meta_step(jit_compile=False)
    steps["first_order"] = meta_step(jit_compile=True, first_order=True)

    loop_model = config.model(jit_compile=False)
    loop_optimizer = tf.keras.optimizers.Adam(1e-3)

    @tf.function
    def per_task_loop(encoded):
        # One task at a time: a tf.range loop runs the tasks sequentially,
        # as a loop over tasks does in most MAML code.
        with tf.GradientTape() as tape:
            total = tf.constant(0.0)
            for t in tf.range(config.tasks):
                total += loop_model._forward(
                    _slice_task(encoded, t), config.inner_steps, False
                )["loss"]
            loss = total / config.tasks
        variables = loop_model.trainable_variables
        grads = tape.gradient(loss, variables)
        loop_optimizer.apply_gradients(
            (g, v) for g, v in zip(grads, variables, strict=True) if g is not None
        )
        return loss

    loop_encoded = loop_model.encode(batch)
    steps["per_task_loop"] = lambda: per_task_loop(loop_encoded)

    plain_model = config.model(jit_compile=True)
    plain_optimizer = tf.keras.optimizers.Adam(1e-3)

    @tf.function(jit_compile=True)
    def plain_gradients(encoded):
        # Support and query rows as one ordinary batch, no adaptation.
        with tf.GradientTape() as tape:
            losses = []
            for part in ("support", "query"):
                logits, _ = plain_model._logits(encoded, part, None)
                losses.append(
                    plain_model._per_task_loss(
                        encoded[f"{part}_label"], logits, encoded[f"{part}_mask"]
                    )
                )
            loss = tf.reduce_mean(tf.concat(losses, axis=0))
        return tape.gradient(loss, plain_model.trainable_variables), loss

    @tf.function
    def plain_step(batch):
        grads, loss = plain_gradients(plain_model.encode(batch))
        plain_optimizer.apply_gradients(
            zip(grads, plain_model.trainable_variables, strict=True)
        )
        return loss

    steps["plain_step"] = lambda: plain_step(batch)
    return steps


def matmul_peak_gflops(size: int = 1024, number: int = 20, repeats: int = 5) -> float:
    """float32 matmul rate of this machine (size x size), GFLOP/s."""
    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])

    @tf.function
    def run():
        c = a
        for _ in range(number):
            c = tf.matmul(c, b) * 1e-3  # scaled to stay finite; the scale is O(n^2)
        return c

    seconds = median_seconds(lambda: run().numpy(), repeats=repeats, warmup=1)
    return 2.0 * size**3 * number / seconds / 1e9


def profile_top_ops(fn, steps: int = 5, top: int = 8) -> list[dict[str, float]]:
    """Self time per TF op type over a few steps (TF profiler), ms per step."""
    import glob  # noqa: PLC0415
    import json  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from tensorflow.python.profiler.internal import (
        _pywrap_profiler_plugin,
    )  # noqa: PLC0415

    logdir = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".profile")
    shutil.rmtree(logdir, ignore_errors=True)
    tf.profiler.experimental.start(logdir)
    for _ in range(steps):
        fn()
    tf.profiler.experimental.stop()
    planes = sorted(glob.glob(os.path.join(logdir, "plugins/profile/*/*.xplane.pb")))
    if not planes:
        return []
    raw = _pywrap_profiler_plugin.xspace_to_tools_data(
        [planes[-1]], "framework_op_stats", {}
    )[0]
    table = json.loads(raw)[0]
    columns = [c["id"] for c in table["cols"]]
    totals: dict[str, float] = {}
    for row in table["rows"]:
        cells = dict(zip(columns, (c.get("v") for c in row["c"]), strict=True))
        if cells["type"] != "IDLE":
            totals[cells["type"]] = (
                totals.get(cells["type"], 0.0) + cells["total_self_time"]
            )
    busy = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    shutil.rmtree(logdir, ignore_errors=True)
    return [
        {
            "op_type": name,
            "ms_per_step": round(us / 1000.0 / steps, 3),
            "share": round(us / busy, 3),
        }
        for name, us in ranked
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="Steps per timed repeat.")
    parser.add_argument("--profile", action="store_true", help="Name the top ops.")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    config = REFERENCE
    batch = config.batch()
    steps = build_steps(config, batch)
    seconds = {}
    for name, fn in steps.items():
        start = time.perf_counter()
        fn()  # trace + compile
        seconds[f"{name}_first_call_s"] = time.perf_counter() - start
        fn()
    # Round robin: on a shared machine, load drifts; interleaving the variants
    # (and the matmul peak) exposes each to the same drift, so ratios hold.
    samples: dict[str, list[float]] = {name: [] for name in [*steps, "peak"]}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            samples[name].append(
                median_seconds(fn, repeats=1, warmup=0, number=args.steps)
            )
        samples["peak"].append(matmul_peak_gflops(repeats=1))
    for name in steps:
        seconds[name] = statistics.median(samples[name])
    tasks_per_s = {name: round(config.tasks / seconds[name], 1) for name in steps}
    flops = config.step_flops()
    gflops = flops["step"] / seconds["xla"] / 1e9
    peak = statistics.median(samples["peak"])
    result = {
        "benchmark": "meta_train",
        "config": "reference",
        "tasks_per_s": tasks_per_s,
        "step_ms": {name: round(seconds[name] * 1e3, 2) for name in steps},
        "first_call_s": {
            name: round(seconds[f"{name}_first_call_s"], 2) for name in steps
        },
        "ratios": {
            "xla_over_per_task_loop": round(
                tasks_per_s["xla"] / tasks_per_s["per_task_loop"], 2
            ),
            "xla_cost_over_plain_step": round(
                tasks_per_s["plain_step"] / tasks_per_s["xla"], 2
            ),
            "xla_over_no_xla": round(tasks_per_s["xla"] / tasks_per_s["no_xla"], 2),
        },
        "step_gflop": round(flops["step"] / 1e9, 3),
        "gflops_per_s": round(gflops, 2),
        "matmul_peak_gflops_per_s": round(peak, 2),
        "roofline_fraction": round(gflops / peak, 3),
        "reference": dataclasses.asdict(config),
    }
    if args.profile:
        # XLA fuses the step into a few clusters, so op types are named on the
        # unfused (no-XLA) step; the XLA step's time is one cluster op.
        result["top_ops_no_xla"] = profile_top_ops(steps["no_xla"])
        result["top_ops_xla"] = profile_top_ops(steps["xla"])
    if args.no_record:
        print(json.dumps(result), flush=True)
        return result
    return record(result)


if __name__ == "__main__":
    main()
