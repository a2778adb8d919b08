"""The meta-train step against hand-written JAX and torch.func MAML (issue #26).

The peer configuration, on every side:

- 32 tasks of 20 support + 20 query rows, 64 numeric features;
- an MLP 64-128-64-1 (ReLU), every weight adapted (full-network MAML);
- 1 inner step of plain SGD at lr 0.01 on the support BCE, outer Adam 1e-3 on
  the mean query BCE; second order and first order (the inner gradient a
  constant).

Implementations:

- `tf_limaml`: `LiMAMLModel`'s own Keras train function over a dataset
  iterator, as `fit` runs it, on the `small` configuration of
  `bench/meta_train.py` with the 64 features as one `[64]` feature: the
  global MLP 128-64-1 adapted with the meta block (`adapt="all"`). The meta
  block's 32-float embedding enters the first layer beside the 64 features, so
  the library does a little more work than the peers (96 inputs, not 64), and
  it also updates its loss trackers and AUC and guards against non-finite
  steps;
- `jax_vmap`: the whole step under one `jax.jit`; `jax.vmap` over tasks of
  `jax.grad` through the inner `jax.grad` (first order: `jax.lax.stop_gradient`
  on the inner gradient); optax Adam;
- `torch_vmap`: `torch.func.vmap` over tasks of `torch.func.grad` and
  `functional_call`, then `backward()` and `torch.optim.Adam`;
- `torch_loop`: the same torch.func task function, one task at a time (the
  per-task loop of learn2learn-style code).

JAX and torch run in their own environment (`make bench-peers` creates
`.venv-peers`, never touching `.venv`), each in a worker subprocess that this
process drives over a pipe: rounds alternate between every implementation,
and only one of them runs at a time. Every side runs on 2 threads. A round
times `--steps` steps of one implementation (after a warm-up); the result is
the median over rounds of tasks/s, with the min and max. The torch peers,
10 to 300 times slower here, run a fifth (vmap) and a thirtieth (loop) of the
steps per round.

    make bench-peers      # or: python bench/peers.py [--rounds 5] [--steps 300]
        [--baseline REV] [--steps-per-execution 10]
        [--peer-python .venv-peers/bin/python] [--no-record]

`--steps-per-execution N` also times tf-limaml compiled with
`steps_per_execution=N` (`tf_limaml_speN`, N steps per call of the train
function, as `fit` runs them), in the same rounds.

`--hlo DIR` instead writes the optimized HLO of every step to DIR and prints
the instruction counts of their entry computations (the profile comparison of
docs/performance.md). With `--baseline REV` the library as of revision REV is
timed in the same rounds (`bench/meta_train.py`'s `load_baseline`). One JSON record,
`{"benchmark": "peers", ...}`, printed and appended to `bench/results.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER_PYTHON = os.path.join(ROOT, ".venv-peers", "bin", "python")

TASKS, SUPPORT, QUERY, FEATURES = 32, 20, 20, 64
UNITS = (128, 64, 1)
INNER_LR, OUTER_LR = 0.01, 1e-3
THREADS = 2
ORDERS = {"second": False, "first": True}  # name -> first_order


def peer_data(seed: int = 0):
    """The peers' batch: numpy arrays xs, ys, xq, yq (same in every worker)."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(TASKS, SUPPORT, FEATURES)).astype(np.float32)
    xq = rng.normal(size=(TASKS, QUERY, FEATURES)).astype(np.float32)
    ys = rng.integers(0, 2, size=(TASKS, SUPPORT)).astype(np.float32)
    yq = rng.integers(0, 2, size=(TASKS, QUERY)).astype(np.float32)
    return xs, ys, xq, yq


# --- JAX ---------------------------------------------------------------------


def jax_step_factory(first_order: bool):
    """(step(), loss()) of the JAX MAML step; `step` runs one step, async."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415

    xs, ys, xq, yq = (jnp.asarray(a) for a in peer_data())
    keys = jax.random.split(jax.random.PRNGKey(0), len(UNITS))
    params, width = [], FEATURES
    for key, units in zip(keys, UNITS, strict=True):
        kernel = jax.nn.initializers.glorot_uniform()(key, (width, units))
        params.append((kernel, jnp.zeros((units,))))
        width = units

    def mlp(params, x):
        for kernel, bias in params[:-1]:
            x = jax.nn.relu(x @ kernel + bias)
        kernel, bias = params[-1]
        return (x @ kernel + bias)[..., 0]

    def bce(params, x, y):
        return optax.sigmoid_binary_cross_entropy(mlp(params, x), y).mean()

    def task_loss(params, xs, ys, xq, yq):
        grads = jax.grad(bce)(params, xs, ys)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        fast = jax.tree_util.tree_map(lambda p, g: p - INNER_LR * g, params, grads)
        return bce(fast, xq, yq)

    def meta_loss(params, xs, ys, xq, yq):
        losses = jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq)
        return losses.mean()

    optimizer = optax.adam(OUTER_LR)

    @jax.jit
    def step(params, state, xs, ys, xq, yq):
        loss, grads = jax.value_and_grad(meta_loss)(params, xs, ys, xq, yq)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    carry = {"params": params, "state": optimizer.init(params), "loss": None}

    def run():
        carry["params"], carry["state"], carry["loss"] = step(
            carry["params"], carry["state"], xs, ys, xq, yq
        )

    def sync():
        jax.block_until_ready((carry["params"], carry["loss"]))
        return float(carry["loss"])

    def hlo():
        lowered = step.lower(carry["params"], carry["state"], xs, ys, xq, yq)
        return lowered.compile().as_text()

    return run, sync, hlo


# --- torch -------------------------------------------------------------------


def torch_step_factory(first_order: bool, vectorized: bool):
    """(step(), sync()) of the torch.func MAML step, vmap or per-task loop."""
    import torch  # noqa: PLC0415
    from torch.func import functional_call, grad, vmap  # noqa: PLC0415

    torch.manual_seed(0)
    layers, width = [], FEATURES
    for i, units in enumerate(UNITS):
        layers.append(torch.nn.Linear(width, units))
        if i < len(UNITS) - 1:
            layers.append(torch.nn.ReLU())
        width = units
    model = torch.nn.Sequential(*layers)
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=OUTER_LR)
    xs, ys, xq, yq = (torch.from_numpy(a) for a in peer_data())
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def loss_of(weights, x, y):
        return bce(functional_call(model, weights, (x,))[..., 0], y)

    def task_loss(weights, xs, ys, xq, yq):
        grads = grad(loss_of)(weights, xs, ys)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        fast = {k: weights[k] - INNER_LR * grads[k] for k in weights}
        return loss_of(fast, xq, yq)

    batched = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))
    carry = {"loss": None}

    def run():
        optimizer.zero_grad(set_to_none=True)
        if vectorized:
            loss = batched(params, xs, ys, xq, yq).mean()
        else:
            loss = (
                sum(task_loss(params, xs[t], ys[t], xq[t], yq[t]) for t in range(TASKS))
                / TASKS
            )
        loss.backward()
        optimizer.step()
        carry["loss"] = loss

    def sync():
        return float(carry["loss"])

    return run, sync, None


# --- the worker (runs in the peer environment) ---------------------------------


def worker(framework: str) -> None:
    """Reads commands from stdin, one JSON line each; answers on stdout.

    {"build": name, "first_order": bool} builds (and warms up) a step;
    {"time": name, "steps": n} runs n steps and answers the seconds;
    {"hlo": name} answers the optimized HLO text (JAX only).
    """
    if framework == "jax":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=true"
            + f" intra_op_parallelism_threads={THREADS}"
        )
        import jax  # noqa: PLC0415

        jax.config.update("jax_platforms", "cpu")
        versions = {"jax": jax.__version__}
        import optax  # noqa: PLC0415

        versions["optax"] = optax.__version__
    else:
        import torch  # noqa: PLC0415

        torch.set_num_threads(THREADS)
        torch.set_num_interop_threads(1)
        versions = {"torch": torch.__version__}
    steps: dict[str, tuple] = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not reach the pipe
    out.write(json.dumps({"ready": True, "versions": versions}) + "\n")
    out.flush()
    for line in sys.stdin:
        command = json.loads(line)
        if "build" in command:
            name = command["build"]
            if framework == "jax":
                steps[name] = jax_step_factory(command["first_order"])
            else:
                steps[name] = torch_step_factory(
                    command["first_order"], command["vectorized"]
                )
            run, sync, _ = steps[name]
            start = time.perf_counter()
            run()
            sync()
            first = time.perf_counter() - start
            for _ in range(command.get("warmup", 20)):
                run()
            answer = {"first_call_s": first, "loss": sync()}
        elif "time" in command:
            run, sync, _ = steps[command["time"]]
            start = time.perf_counter()
            for _ in range(command["steps"]):
                run()
            loss = sync()
            answer = {"seconds": time.perf_counter() - start, "loss": loss}
        elif "hlo" in command:
            answer = {"hlo": steps[command["hlo"]][2]()}
        else:
            answer = {"error": f"unknown command {command!r}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


class Worker:
    """A peer worker subprocess (`python bench/peers.py --worker NAME`)."""

    def __init__(self, python: str, framework: str):
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)  # the main process's dump flags are its own
        env.update(
            OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), PYTHONPATH=""
        )
        self.process = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker", framework],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.versions = self.ask(None)["versions"]

    def ask(self, command: dict | None) -> dict:
        if command is not None:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"peer worker exited ({self.process.poll()}); see its stderr above"
            )
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


# --- tf-limaml (this process) --------------------------------------------------


def tf_limaml_steps(
    baseline: str | None, steps_per_execution: int = 1
) -> dict[str, tuple]:
    """name -> (run, sync, steps per call) of `LiMAMLModel`'s Keras train
    function; with `steps_per_execution` > 1 also the current library compiled
    with it (`fit` then runs that many steps per call of the function)."""
    import dataclasses  # noqa: PLC0415

    import tensorflow as tf  # noqa: PLC0415

    from bench import meta_train  # noqa: PLC0415

    libs = [meta_train.CURRENT]
    if baseline:
        libs.append(meta_train.load_baseline(baseline))
    config = dataclasses.replace(meta_train.SMALL, numeric_vector=True)
    variants = [(lib, 1) for lib in libs]
    if steps_per_execution > 1:
        variants.append((meta_train.CURRENT, steps_per_execution))
    steps = {}
    for lib, per_call in variants:
        suffix = "" if lib is meta_train.CURRENT else f"@{lib.name}"
        if per_call > 1:
            suffix += f"_spe{per_call}"
        for order, first_order in ORDERS.items():
            model = config.model(lib, first_order=first_order)
            model.compile(
                optimizer=tf.keras.optimizers.Adam(OUTER_LR),
                steps_per_execution=per_call,
            )
            dataset = tf.data.Dataset.from_tensors(config.batch()).repeat()
            iterator = iter(dataset)
            train_function = model.make_train_function()
            carry = {}

            def run(fn=train_function, it=iterator, carry=carry):
                carry["logs"] = fn(it)

            def sync(carry=carry):
                return float(carry["logs"]["loss"])

            steps[f"tf_limaml{suffix}/{order}"] = (run, sync, per_call)
    return steps


def time_local(run, sync, per_call: int, steps: int) -> float:
    """Seconds for `steps` steps, `per_call` of them per call of `run`."""
    start = time.perf_counter()
    for _ in range(max(1, steps // per_call)):
        run()
    sync()
    return time.perf_counter() - start


def summarize(samples: dict[str, list[float]], steps: int) -> dict[str, dict]:
    out = {}
    for name, seconds in samples.items():
        rates = [TASKS * steps / s for s in seconds]
        out[name] = {
            "tasks_per_s": round(statistics.median(rates), 1),
            "min": round(min(rates), 1),
            "max": round(max(rates), 1),
            "rounds": [round(r, 1) for r in rates],
        }
    return out


def hlo_counts(text: str) -> dict[str, int]:
    """Instructions of an optimized HLO module's entry computation, by kind:
    loop fusions, library (YNNPACK) fusions, other fusions, dots, copies."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    counts = {"loop_fusion": 0, "library_fusion": 0, "other_fusion": 0}
    counts.update(dot=0, copy=0)
    for line in lines[start + 1 :]:
        if line.startswith("}"):
            break
        if " fusion(" in line:
            if "kind=kLoop" in line:
                counts["loop_fusion"] += 1
            elif "kind=kCustom" in line:
                counts["library_fusion"] += 1
            else:
                counts["other_fusion"] += 1
        elif " dot(" in line:
            counts["dot"] += 1
        elif " copy(" in line:
            counts["copy"] += 1
    return counts


def dump_hlo(directory: str, local: dict, workers: dict) -> dict[str, dict]:
    """Writes the optimized HLO of the JAX steps and of tf-limaml's compiled
    steps (XLA's dump, from XLA_FLAGS) to `directory`; returns their counts."""
    import glob  # noqa: PLC0415

    counts = {}
    for order, first_order in ORDERS.items():
        name = f"jax_vmap/{order}"
        workers["jax"].ask({"build": name, "first_order": first_order})
        text = workers["jax"].ask({"hlo": name})["hlo"]
        with open(os.path.join(directory, f"jax_{order}.txt"), "w") as f:
            f.write(text)
        counts[name] = hlo_counts(text)
    # One module per compiled step (module numbers grow with compile order).
    pattern = os.path.join(
        directory, "tf", "*inference__lambda*after_optimizations.txt"
    )
    dumped = sorted(glob.glob(pattern))

    # The tf-limaml steps were compiled in `local`'s order.
    for name, path in zip(local, dumped[-len(local) :], strict=False):
        with open(path, encoding="utf-8") as f:
            counts[name] = hlo_counts(f.read())
    return counts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="Steps per round.")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--baseline", metavar="REV")
    parser.add_argument("--peer-python", default=PEER_PYTHON)
    parser.add_argument(
        "--only",
        default="",
        help="Comma-separated name prefixes to time (e.g. tf_limaml,jax_vmap).",
    )
    parser.add_argument(
        "--hlo",
        metavar="DIR",
        help="Only dump the optimized HLO of every step to DIR and print the "
        "instruction counts of each (no timing, no record).",
    )
    parser.add_argument(
        "--steps-per-execution",
        type=int,
        default=1,
        metavar="N",
        help="Also time tf-limaml compiled with steps_per_execution=N (the "
        "`tf_limaml_speN` rows): fit then runs N steps per call.",
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    if not os.path.exists(args.peer_python):
        raise SystemExit(
            f"No peer environment at {args.peer_python}: run `make bench-peers` "
            "(it creates .venv-peers with jax[cpu], optax and torch)."
        )
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.steps_per_execution < 1 or args.steps % args.steps_per_execution:
        raise SystemExit(
            f"--steps ({args.steps}) must be a multiple of --steps-per-execution "
            f"({args.steps_per_execution})"
        )
    if args.hlo:
        os.makedirs(os.path.join(args.hlo, "tf"), exist_ok=True)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_dump_to={os.path.join(args.hlo, 'tf')} --xla_dump_hlo_as_text"
        )
    sys.path.insert(0, ROOT)
    import tensorflow as tf  # noqa: PLC0415

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(THREADS)
    from bench.common import record  # noqa: PLC0415

    only = [p for p in args.only.split(",") if p]

    def wanted(name: str) -> bool:
        return not only or any(name.startswith(p) for p in only)

    local = {
        k: v
        for k, v in tf_limaml_steps(args.baseline, args.steps_per_execution).items()
        if wanted(k)
    }
    first_call = {}
    for name, (run, sync, per_call) in local.items():
        start = time.perf_counter()
        run()
        sync()
        first_call[name] = time.perf_counter() - start
        time_local(run, sync, per_call, args.warmup)
    workers = {"jax": Worker(args.peer_python, "jax")}
    if args.hlo:
        counts = dump_hlo(args.hlo, local, workers)
        workers["jax"].close()
        print(json.dumps({"hlo": args.hlo, "entry_instructions": counts}), flush=True)
        return counts
    workers["torch"] = Worker(args.peer_python, "torch")
    remote: dict[str, Worker] = {}
    for order, first_order in ORDERS.items():
        for name, framework, extra in (
            ("jax_vmap", "jax", {}),
            ("torch_vmap", "torch", {"vectorized": True}),
            ("torch_loop", "torch", {"vectorized": False}),
        ):
            key = f"{name}/{order}"
            if not wanted(key):
                continue
            warmup = args.warmup if framework == "jax" else min(args.warmup, 3)
            answer = workers[framework].ask(
                {"build": key, "first_order": first_order, "warmup": warmup, **extra}
            )
            first_call[key] = answer["first_call_s"]
            remote[key] = workers[framework]
    samples: dict[str, list[float]] = {name: [] for name in [*local, *remote]}
    # The torch peers are 10 to 300 times slower: they run a fraction of the
    # steps per round (a figure is per task, so it compares all the same).
    fraction = {"torch_vmap": 5, "torch_loop": 30}
    steps_of = {
        name: max(1, args.steps // fraction.get(name.split("/")[0], 1))
        for name in samples
    }
    for _ in range(args.rounds):
        for name in samples:
            if name in local:
                seconds = time_local(*local[name], steps_of[name])
            else:
                seconds = remote[name].ask({"time": name, "steps": steps_of[name]})[
                    "seconds"
                ]
            samples[name].append(seconds * args.steps / steps_of[name])
    for w in workers.values():
        w.close()
    results = summarize(samples, args.steps)
    ratios = {}
    for order in ORDERS:
        ours = results.get(f"tf_limaml/{order}", {}).get("tasks_per_s")
        for peer in ("jax_vmap", "torch_vmap", "torch_loop"):
            theirs = results.get(f"{peer}/{order}", {}).get("tasks_per_s")
            if ours and theirs:
                ratios[f"tf_limaml_over_{peer}/{order}"] = round(ours / theirs, 2)
        per_call = args.steps_per_execution
        batched = results.get(f"tf_limaml_spe{per_call}/{order}", {}).get("tasks_per_s")
        theirs = results.get(f"jax_vmap/{order}", {}).get("tasks_per_s")
        if batched and theirs:
            ratios[f"tf_limaml_spe{per_call}_over_jax_vmap/{order}"] = round(
                batched / theirs, 2
            )
        if args.baseline:
            base = results.get(f"tf_limaml@{args.baseline}/{order}", {})
            if ours and base.get("tasks_per_s"):
                ratios[f"tf_limaml_over_baseline/{order}"] = round(
                    ours / base["tasks_per_s"], 2
                )
    result = {
        "benchmark": "peers",
        "config": {
            "tasks": TASKS,
            "support": SUPPORT,
            "query": QUERY,
            "features": FEATURES,
            "units": list(UNITS),
            "inner_steps": 1,
            "inner_lr": INNER_LR,
            "outer": f"Adam {OUTER_LR}",
            "threads": THREADS,
            "rounds": args.rounds,
            "steps_per_round": steps_of,
            "tf_limaml_model": "bench/meta_train.py SMALL, one [64] feature",
            "steps_per_execution": args.steps_per_execution,
        },
        "results": results,
        "ratios": ratios,
        "first_call_s": {k: round(v, 2) for k, v in first_call.items()},
        "peer_versions": {**workers["jax"].versions, **workers["torch"].versions},
    }
    if args.baseline:
        result["baseline"] = args.baseline
    return record(result, save=not args.no_record)


if __name__ == "__main__":
    main()
