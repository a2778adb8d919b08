"""Meta-train step throughput: the `reference` and the `small` configurations.

`reference` measures tasks/s, in one run, medians over repeats after warm-up, of:
  (a) xla            the production step: vectorized over tasks, XLA-compiled;
  (b) no_xla         the same step without XLA;
  (c) first_order    (a) without the second-order term;
  (d) per_task_loop  the same math one task at a time inside tf.function, the
                     way most MAML code is written;
  (e) plain_step     a plain (non-meta) training step of the same network on
                     the same number of examples, T * (S + Q) rows.
With `--baseline REV`, (a) and (d) are also built from the library as of git
revision REV (below) and timed in the same rounds.

`small` is a network where fixed costs dominate (32 tasks of 20 + 20 rows, 64
numeric request features, no meta features, full-network MAML on a 128-64-1
MLP). It times `LiMAMLModel`'s Keras train function, fed from a dataset
iterator as `fit` feeds it, with the 64 features as 64 scalar features and as
one feature of shape [64]. With `--baseline REV` it also times the same steps
of the library as of git revision REV (imported beside this one as
`tf_limaml_baseline`), interleaved, and reports the speed-up.

Each configuration counts the FLOPs of one step by hand from the layer shapes
(`StepConfig.step_flops`), measures this machine's float32 matmul rate
(1024 x 1024) in the same rounds, and reports the achieved GFLOP/s and its
fraction of that peak; with --profile it names the top ops of the step (TF
profiler, host time per op type). One JSON record per configuration.

    python bench/meta_train.py [--config all|reference|small] [--baseline REV]
        [--repeats 7] [--steps 10] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.common import HERE, median_seconds, record  # noqa: E402
from tf_limaml import features as _features  # noqa: E402
from tf_limaml import model as _model  # noqa: E402

# The library a step is built from: this checkout, or a baseline revision.
CURRENT = types.SimpleNamespace(
    name="current",
    FeatureSpec=_features.FeatureSpec,
    LiMAMLModel=_model.LiMAMLModel,
    MetaConfig=_model.MetaConfig,
)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """A meta-train step everyone measures (issue: performance).

    The defaults are the `reference` configuration; `SMALL` is the small one.
    """

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
    interaction: str = "product"
    inner_steps: int = 1
    inner_lr: float = 0.1
    adapt: str = "meta_block"
    # Numeric request features standardized with given statistics (as the
    # analyzer writes them) rather than fed raw.
    standardized: bool = False
    # The numeric request features as one feature of shape [n].
    numeric_vector: bool = False

    def _request_numeric(self) -> list[dict]:
        stats = {"mean": 0.0, "std": 1.0} if self.standardized else {"normalize": False}
        if self.numeric_vector:
            shape = {"shape": [self.request_numeric]}
            return [{"name": "r", "type": "numeric", **shape, **stats}]
        return [
            {"name": f"r{i}", "type": "numeric", **stats}
            for i in range(self.request_numeric)
        ]

    def spec(self, lib: types.SimpleNamespace = CURRENT):
        vocabulary = [f"v{i}" for i in range(self.meta_vocabulary)]
        return lib.FeatureSpec.from_dict(
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
                    self._request_numeric()
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

    def model(self, lib: types.SimpleNamespace = CURRENT, **meta_config):
        config = lib.MetaConfig(
            inner_steps=self.inner_steps,
            inner_lr=self.inner_lr,
            adapt=self.adapt,
            **meta_config,
        )
        return lib.LiMAMLModel(
            self.spec(lib),
            config,
            meta_units=self.meta_units,
            global_units=self.global_units,
            cross_layers=self.cross_layers,
            interaction=self.interaction,
        )

    def batch(self, seed: int = 0) -> dict[str, tf.Tensor]:
        """A random raw task batch of these shapes."""
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
                    batch[key] = tf.constant(
                        rng.normal(size=(t, rows, *feature.shape)), tf.float32
                    )
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
        of the meta block on T tasks (2 per multiply-add). A backward pass
        costs 2x its forward (input and weight gradients). The inner backward
        of the global block needs input gradients only (1x) when only the meta
        block adapts, both (2x) with adapt="all". The second-order term
        back-propagates through the inner forward and backward, about 2x their
        cost. In all: 6 F(T*S) + 3 F(T*Q) + 12 Fm, or 9 F(T*S) + 3 F(T*Q) +
        12 Fm with adapt="all". Elementwise ops, losses and the optimizer are
        not counted. The count is of the network as written: an implementation
        that skips work (e.g. the meta embedding's share of the first layer
        once per task instead of once per row) is credited with it.

        `small`: T=32, S=Q=20; the meta MLP 8 -> 64 -> 32 (a learned constant
        input, no meta features) is 2,560 multiply-adds per task; a row of the
        global block is (32 + 64) * 128 + 128 * 64 + 64 * 1 = 20,544. So F(640)
        = 26.3 MFLOP, Fm = 0.16 MFLOP and a step 12 * 26.3 + 12 * 0.16 = 317.5
        MFLOP.
        """
        d = self.meta_units[-1]
        request_width = (
            self.request_numeric + self.request_categorical * self.embedding_dim
        )
        product = self.interaction == "product"
        # meta embedding, request features, and the product term
        cross_width = d + request_width + (d if product else 0)
        per_row = (request_width * d if product else 0) + (
            self.cross_layers * cross_width * cross_width
        )
        width = cross_width
        for units in self.global_units:
            per_row += width * units
            width = units
        per_row += width
        meta_width = self.meta_numeric + self.meta_categorical * self.embedding_dim
        # No meta features: the MLP reads MetaBlock's learned constant input.
        per_task, width = 0, meta_width or 8
        for units in self.meta_units:
            per_task += width * units
            width = units
        forward_support = 2.0 * self.tasks * self.support * per_row
        forward_query = 2.0 * self.tasks * self.query * per_row
        forward_meta = 2.0 * self.tasks * per_task
        inner = 9 if self.adapt == "all" else 6
        total = inner * forward_support + 3 * forward_query + 12 * forward_meta
        return {
            "step": total,
            "forward_support": forward_support,
            "forward_query": forward_query,
            "forward_meta": forward_meta,
        }


REFERENCE = StepConfig()
SMALL = StepConfig(
    tasks=32,
    support=20,
    query=20,
    meta_numeric=0,
    meta_categorical=0,
    request_numeric=64,
    request_categorical=0,
    meta_units=(64, 32),
    cross_layers=0,
    global_units=(128, 64),
    interaction="concat",
    inner_steps=1,
    inner_lr=0.01,
    adapt="all",
    standardized=True,
)


def _slice_task(encoded, t):
    """Task t of an encoded batch: a TaskBatch, or a revision's dict."""
    fields = encoded._asdict() if hasattr(encoded, "_asdict") else encoded
    out = {}
    for key, value in fields.items():
        if key == "batch_size":
            out[key] = tf.constant(1)
        elif value is None:
            out[key] = None
        elif isinstance(value, dict):
            out[key] = {k: v[t : t + 1] for k, v in value.items()}
        else:
            out[key] = value[t : t + 1]
    return type(encoded)(**out) if hasattr(encoded, "_asdict") else out


def _training_loss(model, encoded, steps):
    """The meta-train loss with `steps` inner steps, second order, through the
    model's public `forward` (or a baseline revision's `_forward`)."""
    if hasattr(model, "forward"):
        options = {"inner_steps": steps, "first_order": False}
        return model.forward(encoded, options, training=True)["loss"]
    return model._forward(encoded, steps, False)["loss"]


def build_steps(
    config: StepConfig, batch, baseline: types.SimpleNamespace | None = None
) -> dict[str, callable]:
    """One callable per variant; each runs one full training step on `batch`.

    With a `baseline` library, (a) and (d) built from it too, as
    "xla@REV" and "per_task_loop@REV".
    """
    steps = {}

    def meta_step(lib=CURRENT, **meta_config):
        model = config.model(lib, **meta_config)
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
        fn = tf.function(model.train_step)
        return lambda: fn(batch)

    steps["xla"] = meta_step(jit_compile=True)
    steps["no_xla"] = meta_step(jit_compile=False)
    steps["first_order"] = meta_step(jit_compile=True, first_order=True)
    steps["per_task_loop"] = per_task_loop_step(config, batch)
    if baseline is not None:
        steps[f"xla@{baseline.name}"] = meta_step(baseline, jit_compile=True)
        steps[f"per_task_loop@{baseline.name}"] = per_task_loop_step(
            config, batch, baseline
        )
    steps["plain_step"] = plain_step_fn(config, batch)
    return steps


def per_task_loop_step(
    config: StepConfig, batch, lib: types.SimpleNamespace = CURRENT
) -> callable:
    """(d): the meta-train step one task at a time."""
    loop_model = config.model(lib, jit_compile=False)
    loop_optimizer = tf.keras.optimizers.Adam(1e-3)

    @tf.function
    def per_task_loop(encoded):
        # One task at a time: a tf.range loop runs the tasks sequentially,
        # as a loop over tasks does in most MAML code.
        with tf.GradientTape() as tape:
            total = tf.constant(0.0)
            for t in tf.range(config.tasks):
                total += _training_loss(
                    loop_model, _slice_task(encoded, t), config.inner_steps
                )
            loss = total / config.tasks
        variables = loop_model.trainable_variables
        grads = tape.gradient(loss, variables)
        loop_optimizer.apply_gradients(
            (g, v) for g, v in zip(grads, variables, strict=True) if g is not None
        )
        return loss

    loop_encoded = loop_model.encode(batch)
    return lambda: per_task_loop(loop_encoded)


def plain_step_fn(config: StepConfig, batch) -> callable:
    """(e): a plain training step of the same network on T * (S + Q) rows."""
    plain_model = config.model(jit_compile=True)
    plain_optimizer = tf.keras.optimizers.Adam(1e-3)

    @tf.function(jit_compile=True)
    def plain_gradients(encoded):
        # Support and query rows as one ordinary batch, no adaptation.
        with tf.GradientTape() as tape:
            losses = []
            for part in ("support", "query"):
                logits, _ = plain_model.logits(encoded, part, None)
                rows, labels, mask = encoded.part(part)
                losses.append(plain_model.support_loss(labels, logits, mask))
            loss = tf.reduce_mean(tf.concat(losses, axis=0))
        return tape.gradient(loss, plain_model.trainable_variables), loss

    @tf.function
    def plain_step(batch):
        grads, loss = plain_gradients(plain_model.encode(batch))
        plain_optimizer.apply_gradients(
            zip(grads, plain_model.trainable_variables, strict=True)
        )
        return loss

    return lambda: plain_step(batch)


@functools.cache
def _matmul_chain(size: int, number: int):
    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])

    @tf.function
    def run():
        c = a
        for _ in range(number):
            c = tf.matmul(c, b) * 1e-3  # scaled to stay finite; the scale is O(n^2)
        return c

    return run


def matmul_peak_gflops(size: int = 1024, number: int = 20, repeats: int = 5) -> float:
    """float32 matmul rate of this machine (size x size), GFLOP/s."""
    run = _matmul_chain(size, number)
    seconds = median_seconds(lambda: run().numpy(), repeats=repeats, warmup=1)
    return 2.0 * size**3 * number / seconds / 1e9


def profile_top_ops(fn, steps: int = 5, top: int = 8) -> list[dict[str, float]]:
    """Self time per TF op type over a few steps (TF profiler), ms per step."""
    import glob  # noqa: PLC0415
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


@functools.cache
def load_baseline(rev: str) -> types.SimpleNamespace:
    """The library as of git revision `rev`, importable beside this one.

    `git archive` writes its `tf_limaml/` to a temporary directory as
    `tf_limaml_baseline/` with every `tf_limaml` name rewritten, so both
    versions (and their Keras registrations) live in one process and their
    steps can be timed in the same rounds.
    """
    root = os.path.dirname(HERE)
    archive = subprocess.run(
        ["git", "archive", rev, "tf_limaml"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    directory = tempfile.mkdtemp(prefix="limaml-baseline-")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    package = os.path.join(directory, "tf_limaml_baseline")
    os.rename(os.path.join(directory, "tf_limaml"), package)
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    text = re.sub(r"\btf_limaml\b", "tf_limaml_baseline", f.read())
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    sys.path.insert(0, directory)
    features = importlib.import_module("tf_limaml_baseline.features")
    model = importlib.import_module("tf_limaml_baseline.model")
    return types.SimpleNamespace(
        name=rev,
        FeatureSpec=features.FeatureSpec,
        LiMAMLModel=model.LiMAMLModel,
        MetaConfig=model.MetaConfig,
    )


def keras_train_step(config: StepConfig, lib: types.SimpleNamespace = CURRENT):
    """One `fit` step of `config`'s model: its Keras train function, fed from
    a dataset iterator (as `fit` feeds it, no Python arguments per step)."""
    model = config.model(lib)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    iterator = iter(tf.data.Dataset.from_tensors(config.batch()).repeat())
    train_function = model.make_train_function()
    return lambda: train_function(iterator)


def time_round_robin(
    steps: dict[str, callable], repeats: int, number: int
) -> tuple[dict[str, float], dict[str, float], float]:
    """(median seconds per step, first-call seconds, median matmul peak GFLOP/s).

    Round robin: on a shared machine, load drifts; interleaving the variants
    (and the matmul peak) exposes each to the same drift, so ratios hold.
    """
    first_call = {}
    for name, fn in steps.items():
        start = time.perf_counter()
        fn()  # trace + compile
        first_call[name] = time.perf_counter() - start
        fn()
    samples: dict[str, list[float]] = {name: [] for name in [*steps, "peak"]}
    for _ in range(repeats):
        for name, fn in steps.items():
            samples[name].append(median_seconds(fn, repeats=1, warmup=0, number=number))
        samples["peak"].append(matmul_peak_gflops(repeats=1))
    seconds = {name: statistics.median(samples[name]) for name in steps}
    return seconds, first_call, statistics.median(samples["peak"])


def run_reference(args) -> dict:
    config = REFERENCE
    baseline = load_baseline(args.baseline) if args.baseline else None
    steps = build_steps(config, config.batch(), baseline)
    seconds, first_call, peak = time_round_robin(steps, args.repeats, args.steps)
    tasks_per_s = {name: round(config.tasks / seconds[name], 1) for name in steps}
    flops = config.step_flops()
    gflops = flops["step"] / seconds["xla"] / 1e9
    result = {
        "benchmark": "meta_train",
        "config": "reference",
        "tasks_per_s": tasks_per_s,
        "step_ms": {name: round(seconds[name] * 1e3, 2) for name in steps},
        "first_call_s": {name: round(first_call[name], 2) for name in steps},
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
    if baseline is not None:
        rev = baseline.name
        result["baseline"] = rev
        result["ratios"][f"xla_over_per_task_loop@{rev}"] = round(
            tasks_per_s[f"xla@{rev}"] / tasks_per_s[f"per_task_loop@{rev}"], 2
        )
        result["ratios"][f"xla_over_xla@{rev}"] = round(
            tasks_per_s["xla"] / tasks_per_s[f"xla@{rev}"], 2
        )
    if args.profile:
        # XLA fuses the step into a few clusters, so op types are named on the
        # unfused (no-XLA) step; the XLA step's time is one cluster op.
        result["top_ops_no_xla"] = profile_top_ops(steps["no_xla"])
        result["top_ops_xla"] = profile_top_ops(steps["xla"])
    return result


def run_small(args) -> dict:
    """The small configuration: 64 scalar features and one [64] feature, with
    this checkout and, given `--baseline`, that revision, in the same rounds."""
    layouts = {
        "scalars": SMALL,
        "vector": dataclasses.replace(SMALL, numeric_vector=True),
    }
    libs = [CURRENT] + ([load_baseline(args.baseline)] if args.baseline else [])
    steps = {}
    for lib in libs:
        suffix = "" if lib is CURRENT else f"@{lib.name}"
        for layout, config in layouts.items():
            steps[layout + suffix] = keras_train_step(config, lib)
    seconds, first_call, peak = time_round_robin(steps, args.repeats, args.steps)
    tasks_per_s = {name: round(SMALL.tasks / seconds[name], 1) for name in steps}
    flops = SMALL.step_flops()["step"]
    gflops = {name: round(flops / seconds[name] / 1e9, 2) for name in steps}
    result = {
        "benchmark": "meta_train",
        "config": "small",
        "tasks_per_s": tasks_per_s,
        "step_ms": {name: round(seconds[name] * 1e3, 2) for name in steps},
        "first_call_s": {name: round(first_call[name], 2) for name in steps},
        "step_gflop": round(flops / 1e9, 4),
        "gflops_per_s": gflops,
        "matmul_peak_gflops_per_s": round(peak, 2),
        "roofline_fraction": {
            name: round(value / peak, 3) for name, value in gflops.items()
        },
        "small": dataclasses.asdict(SMALL),
    }
    if args.baseline:
        result["baseline"] = args.baseline
        result["speedup_over_baseline"] = {
            layout: round(
                tasks_per_s[layout] / tasks_per_s[f"{layout}@{args.baseline}"], 2
            )
            for layout in layouts
        }
    if args.profile:
        result["top_ops"] = profile_top_ops(steps["scalars"])
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", choices=("all", "reference", "small"), default="all"
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="Also time the steps of the library as of git revision REV: the "
        "small configuration's, and the reference's (a) and (d).",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="Steps per timed repeat.")
    parser.add_argument("--profile", action="store_true", help="Name the top ops.")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    runs = {"reference": run_reference, "small": run_small}
    results = []
    for name, run in runs.items():
        if args.config not in ("all", name):
            continue
        results.append(record(run(args), save=not args.no_record))
    return results


if __name__ == "__main__":
    main()
