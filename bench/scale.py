"""Memory and speed of `limaml make-tasks` and `limaml embed` as the entities grow.

For each entity count (default 50,000 and 200,000) the bench writes synthetic
interactions (`tf_limaml.datasets.synthetic`, a handful of rows per entity) as
CSV shards, then runs, each as its own child process of the `limaml` command:

* `limaml make-tasks` on them;
* `limaml embed` on the task records it wrote, with an untrained model of the
  default architecture exported for the synthetic spec.

Per run it reports the peak RSS of the job (`os.wait4`'s `ru_maxrss` of that
one child: the largest single process of the job, workers included once
reaped) and the peak of the whole process tree (psutil, sampled every 50 ms;
this is what `--direct_running_mode=multi_processing` needs, where the work
is spread over several processes), the wall time, the CPU time and the rate
(rows/s, entities/s, entities per CPU-second). The ratios RSS(largest)/RSS(smallest)
say whether memory grows with the entity count.

Then it runs `limaml embed` once more on task records of the `reference`
configuration of `bench/meta_train.py` (S=32 support rows per entity), and
`bench/storage.py` turns that job's entities per CPU-second into the CPU hours
of a daily refresh, beside the bytes per entity of the three ways to store
personalization.

Prints one JSON object and appends it to bench/results.jsonl (`bench.common.record`).

    python bench/scale.py                                   # 50k and 200k
    python bench/scale.py --entities 2000,4000 --no-record  # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_USE_LEGACY_KERAS"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import RESULTS, record  # noqa: E402

# Entities per generated chunk (and CSV shard): the generator holds one chunk
# of rows at a time, whatever the entity count.
CHUNK_ENTITIES = 10_000
SAMPLE_EVERY_S = 0.05
REFRESH_SUPPORT = 32


def write_interactions(
    input_dir: str,
    entities: int,
    min_rows: int = 4,
    max_rows: int = 8,
    seed: int = 0,
    chunk_entities: int = CHUNK_ENTITIES,
) -> dict[str, Any]:
    """Synthetic interactions of `entities` members as CSV shards, a chunk at a time.

    Each chunk of `chunk_entities` members is `synthetic.generate_interactions`
    with its own seed; member ids carry the chunk number, so they are unique.

    Returns:
        {"pattern": glob of the shards, "rows": rows written, "entities": entities}.
    """
    from tf_limaml.datasets import synthetic  # noqa: PLC0415

    os.makedirs(input_dir, exist_ok=True)
    rows = 0
    chunks = (entities + chunk_entities - 1) // chunk_entities
    for chunk in range(chunks):
        count = min(chunk_entities, entities - chunk * chunk_entities)
        generated = synthetic.generate_interactions(
            num_entities=count,
            seed=seed * 100_003 + chunk,
            min_interactions=min_rows,
            max_interactions=max_rows,
        )
        path = os.path.join(input_dir, f"interactions-{chunk:05d}.csv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(generated[0]))
            writer.writeheader()
            for row in generated:
                row["member_id"] = f"c{chunk:04d}_{row['member_id']}"
                writer.writerow(row)
        rows += len(generated)
    return {
        "pattern": os.path.join(input_dir, "interactions-*.csv"),
        "rows": rows,
        "entities": entities,
    }


def _rss(process) -> tuple[int, int, int]:
    """(bytes resident in `process`, in its largest descendant, in all together) now."""
    import psutil  # noqa: PLC0415

    try:
        root = process.memory_info().rss
        children = process.children(recursive=True)
    except psutil.Error:
        return 0, 0, 0
    sizes = []
    for child in children:
        try:
            sizes.append(child.memory_info().rss)
        except psutil.Error:
            pass
    return root, max(sizes, default=0), root + sum(sizes)


def measure(command: Sequence[str], env: dict[str, str] | None = None) -> dict:
    """Runs one child process to its end; its peak memory, times and output.

    Returns:
        peak_rss_mb: `ru_maxrss` of the child from `os.wait4`: the largest
            single process (the child, or a reaped descendant);
        sampled every 50 ms with psutil (None without it):
            peak_main_rss_mb, the child itself (with the DirectRunner, the
            runner and its buffers); peak_worker_rss_mb, its largest
            descendant (a multi_processing SDK worker; 0 with none);
            peak_tree_rss_mb, the child and its descendants together;
        wall_s, cpu_s (user + system of the child and its reaped
        descendants), returncode, and the last lines of its output.
    """
    try:
        import psutil  # noqa: PLC0415
    except ImportError:
        psutil = None
    started = time.perf_counter()
    child = subprocess.Popen(
        list(command),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peaks = [0, 0, 0]
    done = threading.Event()
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(child.stdout), daemon=True)
    reader.start()

    def sample():
        process = psutil.Process(child.pid)
        while not done.is_set():
            peaks[:] = map(max, peaks, _rss(process))
            done.wait(SAMPLE_EVERY_S)

    sampler = None
    if psutil is not None:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    # wait4 reports this one child's usage; the process-wide RUSAGE_CHILDREN
    # would mix in every earlier measurement.
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    child.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    if sampler is not None:
        sampler.join()

    def mb(n: int) -> float | None:
        return round(n / 2**20, 1) if psutil is not None else None

    return {
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "peak_main_rss_mb": mb(peaks[0]),
        "peak_worker_rss_mb": mb(peaks[1]),
        "peak_tree_rss_mb": mb(peaks[2]),
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "returncode": child.returncode,
        "output_tail": "".join(output[-20:]),
    }


def limaml(*args: str) -> list[str]:
    """The command line of `limaml ARGS` with this checkout's package."""
    return [sys.executable, "-m", "tf_limaml.cli", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_USE_LEGACY_KERAS"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _checked(run: dict, what: str) -> dict:
    if run["returncode"] != 0:
        raise RuntimeError(
            f"{what} exited with {run['returncode']}:\n{run['output_tail']}"
        )
    return run


def export_untrained(spec, export_base: str, model_kwargs: dict, max_support: int):
    """An export of a seeded, untrained LiMAMLModel (speed does not need training)."""
    import tensorflow as tf  # noqa: PLC0415

    from tf_limaml import export  # noqa: PLC0415
    from tf_limaml.model import LiMAMLModel, MetaConfig  # noqa: PLC0415

    tf.keras.utils.set_random_seed(0)
    model = LiMAMLModel(spec, MetaConfig(jit_compile=False), **model_kwargs)
    return model, export.export_model(model, export_base, max_support=max_support)


def reference_tasks(path: str, entities: int, support: int, distinct: int = 500):
    """Task records of the reference spec: `entities` records, `support` rows each.

    `distinct` random records are encoded once and repeated with unique ids.
    """
    import numpy as np  # noqa: PLC0415

    from bench.meta_train import REFERENCE  # noqa: PLC0415
    from tf_limaml import data  # noqa: PLC0415

    spec = REFERENCE.spec()
    rng = np.random.default_rng(0)

    def request_row(t: int) -> dict:
        row = {"time": t, "label": int(rng.integers(2))}
        for feature in spec.request_features:
            row[feature.name] = (
                float(rng.normal())
                if feature.is_numeric
                else str(int(rng.integers(10**6)))
            )
        return row

    base = []
    for i in range(distinct):
        meta = {
            f.name: (
                float(rng.normal()) if f.is_numeric else str(rng.choice(f.vocabulary))
            )
            for f in spec.meta_features
        }
        rows = [request_row(t) for t in range(support + 2)]
        base.append(
            data.encode_task(spec, f"r{i}", meta, rows[:support], rows[support:])
        )

    def records():
        for i in range(entities):
            task = type(base[0])()
            task.CopyFrom(base[i % distinct])
            task.context.feature["entity_id"].bytes_list.value[0] = f"e{i:09d}".encode()
            yield task

    data.write_tasks(path, records())
    return spec


def run_entities(args, workdir: str, entities: int, export_dir: str) -> dict:
    """make-tasks, then embed, on `entities` synthetic members: one child each."""
    env = child_env()
    inputs = write_interactions(
        os.path.join(workdir, f"input-{entities}"),
        entities,
        args.min_rows,
        args.max_rows,
        args.seed,
    )
    spec_path = os.path.join(workdir, "spec.json")
    tasks_dir = os.path.join(workdir, f"tasks-{entities}")
    beam_flags = [f"--direct_running_mode={args.running_mode}"]
    if args.running_mode == "multi_processing":
        beam_flags.append(f"--direct_num_workers={args.workers}")
    passes = passes_for(entities, args.entities_per_pass)
    # One shard per pass, in both jobs: each pass sorts and writes one shard.
    pass_flags = (
        ["--passes", str(passes), "--num-shards", str(passes)] if passes > 1 else []
    )
    make_tasks = _checked(
        measure(
            limaml(
                "make-tasks",
                "--input",
                inputs["pattern"],
                "--features",
                spec_path,
                "--output",
                tasks_dir,
                "--max-support",
                str(args.max_support),
                "--max-query",
                str(args.max_query),
                "--overwrite",
                *pass_flags,
                *beam_flags,
            ),
            env,
        ),
        "limaml make-tasks",
    )
    with open(os.path.join(tasks_dir, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    embeddings_dir = os.path.join(workdir, f"embeddings-{entities}")
    embed = _checked(
        measure(
            limaml(
                "embed",
                "--export",
                export_dir,
                "--tasks",
                os.path.join(tasks_dir, "*-of-*.tfrecord.gz"),
                "--output",
                embeddings_dir,
                "--overwrite",
                *pass_flags,
                *beam_flags,
            ),
            env,
        ),
        "limaml embed",
    )
    with open(os.path.join(embeddings_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    for run in (make_tasks, embed):
        run.pop("output_tail")
        run.pop("returncode")
    make_tasks["rows_per_s"] = round(inputs["rows"] / make_tasks["wall_s"])
    make_tasks["entities_per_s"] = round(entities / make_tasks["wall_s"])
    embedded = summary["entities_out"]
    embed["entities_per_s"] = round(embedded / embed["wall_s"], 1)
    embed["entities_per_cpu_s"] = round(embedded / max(embed["cpu_s"], 1e-9), 1)
    if not args.keep:
        for path in (inputs["pattern"].rsplit("/", 1)[0], tasks_dir, embeddings_dir):
            shutil.rmtree(path, ignore_errors=True)
    return {
        "entities": entities,
        "rows": inputs["rows"],
        "passes": passes,
        "make_tasks": make_tasks,
        "make_tasks_conservation_holds": stats["conservation"]["holds"],
        "embed": embed,
        "embed_entities_out": embedded,
        "embed_balanced": summary["balanced"],
    }


def passes_for(entities: int, entities_per_pass: int) -> int:
    """Passes that keep about `entities_per_pass` entities each (0: one pass)."""
    if entities_per_pass <= 0:
        return 1
    return max(1, -(-entities // entities_per_pass))


RSS_KEYS = ("peak_rss_mb", "peak_main_rss_mb", "peak_worker_rss_mb", "peak_tree_rss_mb")


def _ratio(runs: list[dict], job: str, key: str) -> float | None:
    first, last = runs[0][job][key], runs[-1][job][key]
    return round(last / first, 3) if first and last is not None else None


def _marginal(runs: list[dict], job: str, count: str, seconds: str) -> float | None:
    """(count at the largest - at the smallest) / (seconds likewise)."""
    if len(runs) < 2:
        return None
    extra = runs[-1][job][seconds] - runs[0][job][seconds]
    items = runs[-1][count] - runs[0][count]
    return round(items / extra, 1) if extra > 0 else None


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--entities",
        default="50000,200000",
        help="Comma-separated entity counts, smallest first.",
    )
    parser.add_argument("--min-rows", type=int, default=4, help="Rows per entity, min.")
    parser.add_argument("--max-rows", type=int, default=8, help="Rows per entity, max.")
    parser.add_argument("--max-support", type=int, default=32)
    parser.add_argument("--max-query", type=int, default=32)
    parser.add_argument(
        "--running-mode",
        default="in_memory",
        choices=("in_memory", "multi_threading", "multi_processing"),
        help="--direct_running_mode of both jobs.",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--entities-per-pass",
        type=int,
        default=25_000,
        help="Run both jobs with --passes ceil(entities / this), one shard per "
        "pass, so each pass holds about this many entities (0: one pass).",
    )
    parser.add_argument(
        "--refresh-entities",
        type=int,
        default=20_000,
        help="Reference-configuration records embedded for the refresh cost "
        "(0: skip that run).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="Scratch (default: temp).")
    parser.add_argument("--keep", action="store_true", help="Keep the scratch files.")
    parser.add_argument(
        "--no-record", action="store_true", help="Print only; no results.jsonl line."
    )
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.entities.split(",") if n.strip()]
    if not counts or counts != sorted(counts) or counts[0] <= 0:
        parser.error(f"--entities must be positive counts, smallest first: {counts}")

    from bench import storage  # noqa: PLC0415
    from tf_limaml import training  # noqa: PLC0415
    from tf_limaml.datasets import synthetic  # noqa: PLC0415

    workdir = args.workdir or tempfile.mkdtemp(prefix="limaml-scale-")
    os.makedirs(workdir, exist_ok=True)
    spec = synthetic.synthetic_spec()
    spec.save(os.path.join(workdir, "spec.json"))
    _, export_dir = export_untrained(
        spec,
        os.path.join(workdir, "export"),
        training.default_model_kwargs(),
        args.max_support,
    )
    runs = [run_entities(args, workdir, n, export_dir) for n in counts]

    result: dict[str, Any] = {
        "bench": "scale",
        "running_mode": args.running_mode,
        "workers": args.workers if args.running_mode == "multi_processing" else None,
        "entities_per_pass": args.entities_per_pass,
        "rows_per_entity": [args.min_rows, args.max_rows],
        "max_support": args.max_support,
        "max_query": args.max_query,
        "model": {**training.default_model_kwargs(), "weights": "untrained"},
        "runs": runs,
        # RSS at the largest entity count over RSS at the smallest.
        "rss_ratio": {
            "entities": [counts[0], counts[-1]],
            **{
                job: {key: _ratio(runs, job, key) for key in RSS_KEYS}
                for job in ("make_tasks", "embed")
            },
            "limit": 1.2,
        },
        # Between the smallest and the largest run: start-up costs cancel.
        "marginal": {
            "make_tasks_rows_per_s": _marginal(runs, "make_tasks", "rows", "wall_s"),
            "make_tasks_rows_per_cpu_s": _marginal(runs, "make_tasks", "rows", "cpu_s"),
            "embed_entities_per_s": _marginal(runs, "embed", "entities", "wall_s"),
            "embed_entities_per_cpu_s": _marginal(runs, "embed", "entities", "cpu_s"),
        },
    }
    if args.refresh_entities:
        result["refresh"] = refresh_run(args, workdir)
        result["storage"] = storage.costs(
            entities_per_cpu_s=result["refresh"]["projection_entities_per_cpu_s"]
        )
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return record(result, args.results, save=not args.no_record)


def refresh_run(args, workdir: str) -> dict:
    """`limaml embed` on reference-configuration records: the refresh's speed.

    Two runs, of a quarter of --refresh-entities and of all of them; the
    marginal rate between them leaves out the start-up (imports, loading and
    tracing the model), which a daily job over 100M entities pays once.
    """
    from bench.meta_train import REFERENCE  # noqa: PLC0415

    model_kwargs = {
        "meta_units": list(REFERENCE.meta_units),
        "global_units": list(REFERENCE.global_units),
        "cross_layers": REFERENCE.cross_layers,
        "interaction": REFERENCE.interaction,
    }
    export_dir = None
    runs = []
    for entities in (max(args.refresh_entities // 4, 1), args.refresh_entities):
        tasks = os.path.join(workdir, f"reference-tasks-{entities}.tfrecord.gz")
        spec = reference_tasks(tasks, entities, REFRESH_SUPPORT)
        if export_dir is None:
            _, export_dir = export_untrained(
                spec,
                os.path.join(workdir, "reference-export"),
                model_kwargs,
                REFRESH_SUPPORT,
            )
        output = os.path.join(workdir, f"reference-embeddings-{entities}")
        run = _checked(
            measure(
                limaml(
                    "embed",
                    "--export",
                    export_dir,
                    "--tasks",
                    tasks,
                    "--output",
                    output,
                    f"--direct_running_mode={args.running_mode}",
                ),
                child_env(),
            ),
            "limaml embed (reference)",
        )
        with open(os.path.join(output, "summary.json"), encoding="utf-8") as f:
            embedded = json.load(f)["entities_out"]
        run.pop("output_tail")
        run.pop("returncode")
        runs.append(
            {
                "entities": embedded,
                **run,
                "entities_per_s": round(embedded / run["wall_s"], 1),
                "entities_per_cpu_s": round(embedded / max(run["cpu_s"], 1e-9), 1),
            }
        )
    wrapped = [{"entities": r["entities"], "embed": r} for r in runs]
    marginal = _marginal(wrapped, "embed", "entities", "cpu_s")
    # With few entities the start-up's noise can hide the per-entity cost (the
    # larger run's CPU time no larger); the whole larger run, start-up
    # included, then gives a slower rate: a projection that errs high.
    basis = "marginal" if marginal else "whole_run"
    return {
        "config": "reference (bench/meta_train.py), untrained",
        "support_rows": REFRESH_SUPPORT,
        "runs": runs,
        "marginal_entities_per_s": _marginal(wrapped, "embed", "entities", "wall_s"),
        "marginal_entities_per_cpu_s": marginal,
        "projection_entities_per_cpu_s": marginal or runs[-1]["entities_per_cpu_s"],
        "projection_basis": basis,
        "cores": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
