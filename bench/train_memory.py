"""Peak RSS of `limaml train` on the MovieLens-100K tasks.

Builds the ML-100K tasks in-process (the embedded recbole copy, support = first
half of each member's history), then runs `limaml train` in a subprocess and
reads its peak resident set size from the kernel (ru_maxrss of the child).

    python bench/train_memory.py [--epochs 3] [--max-support 128]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import record  # noqa: E402


def write_movielens_tasks(output_dir: str) -> tuple[str, str, int, int]:
    """Train task file + spec of every ML-100K member; returns (tasks, spec, n, rows)."""
    from tf_limaml import data  # noqa: PLC0415
    from tf_limaml.datasets import movielens  # noqa: PLC0415
    from tf_limaml.tasks import build_tasks  # noqa: PLC0415

    rows, spec = movielens.load()
    histories, _, counts = build_tasks(spec, rows, "fraction:0.5")
    tasks_path = os.path.join(output_dir, "train-00000-of-00001.tfrecord.gz")
    count = data.write_tasks(tasks_path, data.tasks_from_histories(spec, histories))
    spec_path = os.path.join(output_dir, "spec.json")
    spec.save(spec_path)
    return tasks_path, spec_path, count, counts["rows_in_tasks"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-support", type=int, default=128)
    parser.add_argument("--max-query", type=int, default=128)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tasks, spec, n_tasks, n_rows = write_movielens_tasks(tmp)
        command = [
            sys.executable,
            "-m",
            "tf_limaml.cli",
            "train",
            "--tasks",
            tasks,
            "--features",
            spec,
            "--model-dir",
            os.path.join(tmp, "model"),
            "--epochs",
            str(args.epochs),
            "--max-support",
            str(args.max_support),
            "--max-query",
            str(args.max_query),
        ]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak_gb = peak_kib * 1024 / 1e9
    return record(
        {
            "benchmark": "train_memory",
            "dataset": "movielens-100k",
            "tasks": n_tasks,
            "interactions": n_rows,
            "epochs": args.epochs,
            "max_support": args.max_support,
            "max_query": args.max_query,
            "peak_rss_gb": round(peak_gb, 3),
            "wall_s": round(wall, 1),
            "target_gb": 2.0,
            "meets_target": peak_gb <= 2.0,
        }
    )


if __name__ == "__main__":
    main()
